//! Stopping a worker: the graceful drain on SIGTERM, the drain deadline,
//! a second signal, and a worker killed outright.

use crate::util::{
    process_gone, read_pid, summary, wait_until, Sandbox, BLOCK_UNTIL_GO, DEADLINE, LINGER,
};

#[test]
fn sigterm_lets_running_items_finish_and_claims_nothing_more() {
    let sb = Sandbox::new();
    sb.add("lines", "a\nb\nc\nd\n", &[]);
    let worker = sb
        .lw(["worker", "-c", "2", "--", "sh", "-c", BLOCK_UNTIL_GO, "sh"])
        .spawn();
    wait_until("two items started", DEADLINE, || {
        sb.files_starting_with("started-").len() == 2
    });

    worker.signal(libc::SIGTERM);
    // Releasing the items before the worker has taken in the signal would
    // let it claim the other two; its log is the only sign that it has.
    wait_until("the worker logs that it is draining", DEADLINE, || {
        worker.stderr_so_far().contains("draining")
    });
    std::fs::write(sb.path("go"), "").unwrap();
    let out = worker.wait(0);
    assert_eq!(summary(&out.stderr).counts(), (2, 0, 0, 0, 0));

    let started = sb.files_starting_with("started-");
    assert_eq!(
        started.len(),
        2,
        "nothing started after the signal: {started:?}"
    );
    for item in sb.items() {
        let ran = started.contains(&format!("started-{}", item.id));
        let want = if ran { ("done", 1) } else { ("pending", 0) };
        assert_eq!((item.status.as_str(), item.attempts), want, "{item:?}");
        assert_eq!(item.lease_owner, None, "{item:?}");
    }
    assert_eq!(sb.count("running"), 0);
}

#[test]
fn drain_timeout_kills_running_items_and_gives_their_attempts_back() {
    let sb = Sandbox::new();
    sb.add("lines", "a\nb\n", &[]);
    let script = format!(
        r#"( {LINGER} ) & echo $! > "$DIR/child-$LITEWORK_ITEM_ID"
        echo $$ > "$DIR/leader-$LITEWORK_ITEM_ID"
        touch "$DIR/started-$LITEWORK_ITEM_ID"
        wait"#
    );
    let worker = sb
        .lw(["worker", "-c", "2", "--drain-timeout", "1s"])
        .args(["--", "sh", "-c", &script, "sh"])
        .spawn();
    wait_until("both items started", DEADLINE, || {
        sb.files_starting_with("started-").len() == 2
    });
    let pids: Vec<i32> = ["child-1", "child-2", "leader-1", "leader-2"]
        .iter()
        .map(|name| read_pid(&sb.path(name)))
        .collect();

    worker.signal(libc::SIGTERM);
    let out = worker.wait(0);
    assert_eq!(summary(&out.stderr).counts(), (0, 0, 0, 0, 2));

    for item in sb.items() {
        assert_eq!(
            (item.status.as_str(), item.attempts),
            ("pending", 0),
            "{item:?}"
        );
        assert_eq!(item.lease_owner, None, "{item:?}");
    }
    assert!(
        sb.attempts().is_empty(),
        "a release is not a failed attempt"
    );
    for pid in pids {
        wait_until(
            &format!("process {pid} of an item is gone"),
            DEADLINE,
            || process_gone(pid),
        );
    }
}

#[test]
fn second_sigterm_skips_the_drain() {
    let sb = Sandbox::new();
    sb.add("lines", "a\n", &[]);
    let worker = sb
        .lw(["worker", "-c", "1", "--drain-timeout", "1h"])
        .args(["--", "sh", "-c", BLOCK_UNTIL_GO, "sh"])
        .spawn();
    wait_until("the item started", DEADLINE, || {
        sb.path("started-1").exists()
    });

    worker.signal(libc::SIGTERM);
    wait_until("the worker logs that it is draining", DEADLINE, || {
        worker.stderr_so_far().contains("draining")
    });
    worker.signal(libc::SIGTERM);
    let out = worker.wait(0);
    assert_eq!(summary(&out.stderr).counts(), (0, 0, 0, 0, 1));
    let item = sb.only_item();
    assert_eq!((item.status.as_str(), item.attempts), ("pending", 0));
}

/// The processes of an item never outlive it, not even when its worker is
/// killed outright: otherwise they run on unseen while another worker
/// redoes the item. That covers everything the item started, not only the
/// process the worker spawned.
#[test]
fn killed_worker_takes_every_process_of_its_item_with_it() {
    let sb = Sandbox::new();
    sb.add("lines", "a\n", &[]);
    let script = format!(
        r#"( {LINGER} ) & echo $! > "$DIR/child"
        echo $$ > "$DIR/leader"
        wait"#
    );
    let worker = sb
        .lw(["worker", "-c", "1", "--", "sh", "-c", &script, "sh"])
        .spawn();
    let leader = read_pid(&sb.path("leader"));
    let child = read_pid(&sb.path("child"));
    worker.signal(libc::SIGKILL);
    drop(worker);

    wait_until("the item's leader died with its worker", DEADLINE, || {
        process_gone(leader)
    });
    wait_until(
        "the item's background child died with its worker",
        DEADLINE,
        || process_gone(child),
    );
}

#[test]
fn items_of_a_killed_worker_are_swept_and_finished_by_another() {
    let sb = Sandbox::new();
    sb.add("lines", "survivor\n", &[]);
    let a = sb
        .lw(["worker", "-c", "1", "--lease", "1s"])
        .args(["--worker-id", "doomed"])
        .args(["--", "sh", "-c", BLOCK_UNTIL_GO, "sh"])
        .spawn();
    wait_until("the item started", DEADLINE, || {
        sb.path("started-1").exists()
    });
    a.signal(libc::SIGKILL);
    drop(a);
    assert_eq!(sb.only_item().status, "running", "nobody has swept yet");

    // B finds nothing to claim, sees an item still running, and waits; its
    // sweep requeues the item once the dead worker's lease has expired.
    let b = sb
        .lw(["worker", "-c", "1", "--sweep-interval", "100ms"])
        .args(["--", "printf", "rescued"])
        .run();
    assert_eq!(summary(&b.stderr).counts(), (1, 0, 0, 0, 0));

    let item = sb.only_item();
    assert_eq!((item.status.as_str(), item.attempts), ("done", 2));
    assert_eq!(item.result.as_deref(), Some(&b"rescued"[..]));
    let history = sb.attempts();
    assert_eq!(history.len(), 1, "{history:#?}");
    assert_eq!(
        (history[0].worker.as_deref(), history[0].outcome.as_str()),
        (Some("doomed"), "lost")
    );
    let error = history[0].error.clone().unwrap_or_default();
    assert!(error.contains("expired"), "{error:?}");
}

/// The supervisor's sweep waiting for a write lock another program holds
/// must not hold up a stop: it passes the signal on while the lock is
/// still held. (It waited out the whole busy timeout, 60 s, first.)
#[test]
fn a_stop_is_passed_on_while_another_program_holds_the_write_lock() {
    let sb = Sandbox::new();
    sb.write("items.txt", "1\n2\n");
    let run = sb
        .lw(["run", "--input", "items.txt", "-w", "1", "-c", "1"])
        .args(["--sweep-interval", "100ms", "--shell", "--", BLOCK_UNTIL_GO])
        .spawn();
    wait_until("an item started", DEADLINE, || {
        sb.files_starting_with("started-").len() == 1
    });
    let addr = crate::util::supervisor_addr(&run);
    let busy_waits = || {
        let (_, body) = crate::util::http_get(&addr, "/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix("litework_sqlite_busy_waits_total "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = busy_waits();

    let other = sb.hold_write_lock();
    wait_until(
        "a sweep of the supervisor waits for the lock",
        DEADLINE,
        || busy_waits() > before,
    );
    run.signal(libc::SIGTERM);
    wait_until("the supervisor passes the stop on", DEADLINE, || {
        run.stderr_so_far().contains("stopping: workers drain")
    });
    other.execute_batch("ROLLBACK").expect("letting go");

    std::fs::write(sb.path("go"), "").expect("creating go");
    run.wait(130);
    assert_eq!(sb.count("done"), 1);
    assert_eq!(sb.count("pending"), 1);
}
