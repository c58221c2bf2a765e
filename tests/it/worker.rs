//! The worker loop through the binary: exclusive claims across processes,
//! fencing of a lost lease, retries with backoff, timeouts.

use std::collections::BTreeMap;

use crate::util::{process_gone, read_pid, summary, wait_until, Sandbox, DEADLINE, LINGER};

#[test]
fn concurrent_workers_run_each_item_exactly_once() {
    const ITEMS: usize = 2000;
    const WORKERS: usize = 4;
    let sb = Sandbox::new();
    let input: String = (1..=ITEMS).map(|n| format!("item-{n}\n")).collect();
    sb.add("lines", input, &[]);
    std::fs::create_dir(sb.path("logs")).unwrap();

    // Each run appends one line to its worker's log; O_APPEND keeps the
    // lines of the concurrent runs of one worker whole.
    let script = r#"printf '%s %s\n' "$LITEWORK_ITEM_ID" "$LITEWORK_WORKER_ID" \
        >> "$DIR/logs/$LITEWORK_WORKER_ID""#;
    let workers: Vec<_> = (1..=WORKERS)
        .map(|n| {
            let id = format!("w{n}");
            sb.lw(["worker", "-c", "4", "--worker-id", &id])
                .args(["--", "sh", "-c", script, "sh"])
                .spawn()
        })
        .collect();
    let summaries: Vec<_> = workers
        .into_iter()
        .map(|w| summary(&w.wait(0).stderr))
        .collect();

    let mut runs: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for n in 1..=WORKERS {
        let worker = format!("w{n}");
        let log = std::fs::read_to_string(sb.path("logs").join(&worker)).unwrap_or_default();
        for line in log.lines() {
            let (id, by) = line
                .split_once(' ')
                .unwrap_or_else(|| panic!("malformed log line {line:?}"));
            assert_eq!(by, worker, "LITEWORK_WORKER_ID of a run of {worker}");
            runs.entry(id.parse().unwrap())
                .or_default()
                .push(worker.clone());
        }
    }
    let twice: Vec<_> = runs.iter().filter(|(_, by)| by.len() > 1).collect();
    assert!(twice.is_empty(), "items run more than once: {twice:?}");
    let expected: Vec<i64> = (1..=ITEMS as i64).collect();
    assert_eq!(runs.keys().copied().collect::<Vec<_>>(), expected);

    let items = sb.items();
    assert_eq!(items.len(), ITEMS);
    for item in &items {
        assert_eq!(
            (item.status.as_str(), item.attempts),
            ("done", 1),
            "{item:?}"
        );
        assert_eq!(item.lease_owner, None, "{item:?}");
    }
    assert!(sb.attempts().is_empty(), "no attempt failed or was lost");
    let done: u64 = summaries.iter().map(|s| s.done).sum();
    assert_eq!(done, ITEMS as u64, "{summaries:?}");
    assert!(
        summaries.iter().all(|s| s.lost == 0 && s.failed == 0),
        "{summaries:?}"
    );
    let stopped: i64 = sb
        .conn()
        .query_row(
            "SELECT count(*) FROM workers WHERE status = 'stopped'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stopped, WORKERS as i64);
}

#[test]
fn worker_whose_lease_was_taken_cannot_overwrite_the_new_owner() {
    let sb = Sandbox::new();
    sb.add("lines", "the-item\n", &[]);

    let script_a = r#"touch "$DIR/a-started"
        while [ ! -e "$DIR/go" ] && [ -d "$DIR" ]; do sleep 0.05; done
        printf from-a"#;
    let a = sb
        .lw(["worker", "-c", "1", "--lease", "60s"])
        .args(["--worker-id", "worker-a"])
        .args(["--", "sh", "-c", script_a, "sh"])
        .spawn();
    wait_until("worker A started the item", DEADLINE, || {
        sb.path("a-started").exists()
    });
    assert_eq!(sb.only_item().lease_owner.as_deref(), Some("worker-a"));

    let requeue = sb.lw(["requeue-stale", "--worker", "worker-a"]).run();
    requeue.assert_stderr_has("requeued 1 items (1 back to pending");
    let b = sb
        .lw(["worker", "-c", "1", "--worker-id", "worker-b"])
        .args(["--", "printf", "from-b"])
        .run();
    assert_eq!(summary(&b.stderr).counts(), (1, 0, 0, 0, 0));
    let after_b = sb.only_item();
    assert_eq!(after_b.status, "done");
    assert_eq!(after_b.result.as_deref(), Some(&b"from-b"[..]));
    assert_eq!(after_b.attempts, 2, "A's attempt and B's");

    std::fs::write(sb.path("go"), "").unwrap();
    let a = a.wait(0);
    a.assert_stderr_has("lease lost");
    let a_summary = summary(&a.stderr);
    assert_eq!(a_summary.worker, "worker-a");
    assert_eq!(
        a_summary.counts(),
        (0, 0, 0, 1, 0),
        "A counts one lost lease"
    );
    assert_eq!(
        sb.only_item(),
        after_b,
        "A's late outcome must not touch the row"
    );

    crate::util::assert_one_lost_attempt(&sb, "worker-a");
}

#[test]
fn failing_item_is_retried_with_backoff_then_fails_and_retry_revives_it() {
    let sb = Sandbox::new();
    sb.add("lines", "doomed\n", &["--max-attempts", "3"]);

    let fail = r#"echo "disk on fire" >&2; exit 3"#;
    let out = sb
        .lw(["worker", "-c", "1", "--backoff-base", "50ms"])
        .args(["--", "sh", "-c", fail, "sh"])
        .run_expect(1);
    assert_eq!(summary(&out.stderr).counts(), (0, 2, 1, 0, 0));

    let item = sb.only_item();
    assert_eq!((item.status.as_str(), item.attempts), ("failed", 3));
    let error = item.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("exit status 3") && error.contains("disk on fire"),
        "last_error {error:?} should give the exit status and the stderr text"
    );
    assert!(item.finished_at.is_some());
    let history: Vec<_> = sb
        .attempts()
        .into_iter()
        .map(|a| (a.item_id, a.attempt, a.outcome, a.error.unwrap_or_default()))
        .collect();
    let want = "exit status 3: disk on fire".to_string();
    assert_eq!(
        history,
        (1..=3)
            .map(|n| (item.id, n, "error".to_string(), want.clone()))
            .collect::<Vec<_>>()
    );

    let retry = sb.lw(["retry"]).run();
    retry.assert_stderr_has("1 failed items back to pending");
    let item = sb.only_item();
    assert_eq!((item.status.as_str(), item.attempts), ("pending", 0));
    assert_eq!(item.finished_at, None);

    sb.lw(["worker", "-c", "1", "--", "printf", "mended"]).run();
    let item = sb.only_item();
    assert_eq!((item.status.as_str(), item.attempts), ("done", 1));
    assert_eq!(item.result.as_deref(), Some(&b"mended"[..]));
    assert_eq!(
        sb.attempts().len(),
        3,
        "the history of the failed run is kept"
    );

    // By id, given twice: one item, counted once.
    let again = sb.lw(["retry", "1", "1"]).run();
    again.assert_stderr_has("1 items back to pending");
}

#[test]
fn a_retried_item_is_claimed_again_at_once_without_waiting_for_a_timer() {
    // The worker's own commits do not move `data_version`, so after it puts
    // an item back (a retry) only its own bookkeeping can tell it to claim
    // again. With the lease and sweep timers an hour away, a worker that
    // forgot would sleep past the deadline of `run`.
    let sb = Sandbox::new();
    sb.add("lines", "flaky\n", &["--max-attempts", "3"]);
    let out = sb
        .lw(["worker", "-c", "2", "--backoff-base", "10ms"])
        .args(["--lease", "3h", "--sweep-interval", "1h"])
        .args(["--", "sh", "-c", r#"test "$LITEWORK_ATTEMPT" -gt 1"#, "sh"])
        .run();
    assert_eq!(summary(&out.stderr).counts(), (1, 1, 0, 0, 0));
    let item = sb.only_item();
    assert_eq!((item.status.as_str(), item.attempts), ("done", 2));
}

#[test]
fn a_claim_refused_by_a_held_write_lock_is_tried_again_once_the_lock_goes() {
    // Another program commits an item and at once holds the write lock
    // past the worker's busy timeout, then lets go without committing
    // anything. Nothing moves `data_version` after that, so a worker that
    // took what it saw before its failed claim for idleness would never
    // claim the item: the lease and sweep timers are an hour away.
    let sb = Sandbox::new();
    sb.add("lines", "warm-up\n", &[]);
    let worker = sb
        .lw(["--busy-timeout", "200ms", "worker", "--follow", "-c", "1"])
        .args(["--lease", "3h", "--sweep-interval", "1h", "--", "true"])
        .spawn();
    wait_until("the warm-up item is done", DEADLINE, || {
        sb.count("done") == 1
    });

    let other = rusqlite::Connection::open(sb.db()).expect("opening the queue");
    other
        .busy_timeout(DEADLINE)
        .expect("setting a busy timeout");
    // The worker may win the race for the lock between the commit and the
    // second BEGIN; then the item simply runs, and we try again.
    let mut refused = false;
    for done in 2..12 {
        other
            .execute_batch(
                "BEGIN IMMEDIATE;
                 INSERT INTO items (payload, priority, max_attempts, run_after, created_at)
                 VALUES ('late', 0, 3, 0, 0);
                 UPDATE counts SET n = n + 1 WHERE status = 'pending';
                 COMMIT;
                 BEGIN IMMEDIATE;",
            )
            .expect("adding an item and taking the write lock");
        let pending: i64 = other
            .query_row(
                "SELECT count(*) FROM items WHERE status = 'pending'",
                [],
                |r| r.get(0),
            )
            .expect("counting pending items");
        refused = pending == 1;
        if refused {
            wait_until("the worker's claim gives up on the lock", DEADLINE, || {
                worker.stderr_so_far().contains("database busy or full")
            });
        }
        other
            .execute_batch("ROLLBACK")
            .expect("letting go of the lock");
        wait_until("the added item is done", DEADLINE, || {
            sb.count("done") == done
        });
        if refused {
            break;
        }
    }
    assert!(refused, "the worker claimed first ten times out of ten");
    worker.signal(libc::SIGTERM);
    let out = worker.wait(0);
    out.assert_stderr_has("database writable again");
}

#[test]
fn permanent_exit_status_fails_the_item_at_once() {
    let sb = Sandbox::new();
    sb.add("lines", "hopeless\n", &["--max-attempts", "3"]);

    let out = sb
        .lw(["worker", "-c", "1", "--backoff-base", "50ms"])
        .args(["--permanent-exit", "7"])
        .args(["--", "sh", "-c", "echo no such account >&2; exit 7", "sh"])
        .run_expect(1);
    assert_eq!(summary(&out.stderr).counts(), (0, 0, 1, 0, 0));

    let item = sb.only_item();
    assert_eq!((item.status.as_str(), item.attempts), ("failed", 1));
    assert_eq!(
        item.last_error.as_deref(),
        Some("exit status 7 (permanent): no such account")
    );
    let history = sb.attempts();
    assert_eq!(history.len(), 1, "{history:#?}");
    assert_eq!(
        (history[0].attempt, history[0].outcome.as_str()),
        (1, "permanent")
    );
}

#[test]
fn timeout_kills_the_item_and_everything_it_started() {
    let sb = Sandbox::new();
    sb.add("lines", "slow\n", &["--max-attempts", "1"]);

    let script = format!(r#"( {LINGER} ) & echo $! > "$DIR/bg.pid"; wait"#);
    let out = sb
        .lw(["worker", "-c", "1", "--timeout", "1s"])
        .args(["--", "sh", "-c", &script, "sh"])
        .run_expect(1);
    assert_eq!(summary(&out.stderr).counts(), (0, 0, 1, 0, 0));

    let item = sb.only_item();
    assert_eq!((item.status.as_str(), item.attempts), ("failed", 1));
    let error = item.last_error.clone().unwrap_or_default();
    assert!(error.contains("timed out"), "last_error {error:?}");
    let history = sb.attempts();
    assert_eq!(history.len(), 1, "{history:#?}");
    assert_eq!(history[0].outcome, "timeout");

    let background = read_pid(&sb.path("bg.pid"));
    wait_until(
        &format!("the item's background process {background} is gone"),
        DEADLINE,
        || process_gone(background),
    );
}

/// A process that left the item's process group and let go of its
/// output (`setsid`, or GNU `timeout`, which makes a group of its own)
/// still dies with the item on a timeout: it carries the item's id.
#[test]
fn timeout_kills_what_left_the_items_process_group_too() {
    let sb = Sandbox::new();
    sb.add("lines", "slow\n", &["--max-attempts", "1"]);

    let stray = format!(r#"echo $$ > "$DIR/stray.pid"; {LINGER}"#);
    let script = format!(
        r#"setsid -f sh -c '{stray}' </dev/null >/dev/null 2>&1; {LINGER}"#,
        stray = stray.replace('\'', r#"'\''"#)
    );
    let out = sb
        .lw(["worker", "-c", "1", "--timeout", "1s"])
        .args(["--", "sh", "-c", &script, "sh"])
        .run_expect(1);
    assert_eq!(summary(&out.stderr).counts(), (0, 0, 1, 0, 0));
    assert_eq!(sb.attempts()[0].outcome, "timeout");

    // LINGER ends with the sandbox, should the test fail.
    let stray = read_pid(&sb.path("stray.pid"));
    wait_until(
        &format!("the process {stray} that left the item's group is gone"),
        DEADLINE,
        || process_gone(stray),
    );
}

/// The worker's loop may be waiting for the write lock (here: for its
/// heartbeat, held back by another program) just when an item's time is
/// up; the item is killed on time all the same.
#[test]
fn a_timeout_is_kept_while_the_worker_waits_for_the_write_lock() {
    let sb = Sandbox::new();
    sb.add("lines", "slow\n", &["--max-attempts", "1"]);
    let script = format!(r#"echo $$ > "$DIR/item.pid"; {LINGER}"#);
    // A heartbeat every 100 ms: the loop is soon stuck in one.
    let worker = sb
        .lw(["worker", "-c", "1", "--timeout", "1s", "--lease", "300ms"])
        .args(["--sweep-interval", "1h", "--", "sh", "-c", &script, "sh"])
        .spawn();
    let item = read_pid(&sb.path("item.pid"));

    let other = sb.hold_write_lock();
    wait_until("the item is killed at its timeout", DEADLINE, || {
        process_gone(item)
    });
    other.execute_batch("ROLLBACK").expect("letting go");

    let out = worker.wait(1);
    assert_eq!(summary(&out.stderr).counts(), (0, 0, 1, 0, 0));
    assert_eq!(sb.attempts()[0].outcome, "timeout");
}

#[test]
fn higher_priority_items_run_first_and_ties_in_the_order_added() {
    let sb = Sandbox::new();
    sb.add("lines", "low-1\nlow-2\n", &["--priority", "-1"]);
    sb.add("lines", "mid-1\n", &[]);
    let jsonl = r#"{"payload":"high-1","priority":5}
{"payload":"mid-2"}
{"payload":"high-2","priority":5}
"#;
    sb.add("jsonl", jsonl, &[]);

    let log = sb.path("order");
    let script = r#"printf '%s\n' "$1" >> "$DIR/order""#;
    sb.lw(["worker", "-c", "1", "--", "sh", "-c", script, "sh"])
        .run();
    let order = std::fs::read_to_string(log).unwrap();
    assert_eq!(
        order.lines().collect::<Vec<_>>(),
        ["high-1", "high-2", "mid-1", "mid-2", "low-1", "low-2"]
    );
}

#[test]
fn a_killed_worker_is_charged_only_for_what_it_was_running() {
    let sb = Sandbox::new();
    let mut items: String = (1..=2000).map(|i| format!("fast-{i}\n")).collect();
    items.extend((1..=50).map(|i| format!("slow-{i}\n")));
    // One attempt each: an item charged for the death ends failed.
    sb.add("lines", items, &["--max-attempts", "1"]);
    let script = r#"case "$1" in
        slow-*) touch "$DIR/started-$1"; exec sleep 600 ;;
        esac"#;
    let mut worker = sb
        .lw(["worker", "-c", "2", "--worker-id", "doomed"])
        .args(["--shell", "--", script])
        .spawn();
    // The fast items grew its batch: it holds slow items beyond the two
    // its executors run.
    let slow_held = || -> (usize, i64) {
        let started = sb.files_starting_with("started-slow-").len();
        let held: i64 = sb
            .conn()
            .query_row(
                "SELECT count(*) FROM items WHERE status = 'running' AND payload LIKE 'slow-%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        (started, held)
    };
    wait_until("two slow items run and more are held", DEADLINE, || {
        let (started, held) = slow_held();
        started == 2 && held >= 3
    });
    worker.signal(libc::SIGKILL);
    wait_until("the killed worker is gone", DEADLINE, || worker.exited());
    let out = sb.lw(["requeue-stale", "--worker", "doomed"]).run();
    out.assert_stderr_has("of them never started");

    let started: Vec<String> = sb
        .files_starting_with("started-slow-")
        .into_iter()
        .map(|f| f.trim_start_matches("started-").to_string())
        .collect();
    let failed: Vec<String> = sb
        .items()
        .into_iter()
        .filter(|i| i.status == "failed")
        .map(|i| String::from_utf8_lossy(&i.payload).into_owned())
        .collect();
    let mut failed_sorted = failed.clone();
    failed_sorted.sort();
    assert_eq!(failed_sorted, started, "only the running items are charged");
    for item in sb.items() {
        let payload = String::from_utf8_lossy(&item.payload).into_owned();
        if payload.starts_with("slow-") && !started.contains(&payload) {
            assert_eq!(
                (item.status.as_str(), item.attempts),
                ("pending", 0),
                "{payload} never ran and keeps its attempt"
            );
        }
    }
    assert!(
        sb.files_starting_with("queue.db-running-").is_empty(),
        "the dead worker's running file is removed"
    );
}
