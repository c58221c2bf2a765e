//! `litework run`: the supervisor, driven through the real binary.

use crate::util::{live_workers, process_gone, wait_until, Sandbox, BLOCK_UNTIL_GO, DEADLINE};

/// Every pid a worker ever registered under.
fn all_worker_pids(sb: &Sandbox) -> Vec<i32> {
    let conn = sb.conn();
    let mut stmt = conn
        .prepare("SELECT pid FROM workers")
        .expect("preparing the workers query");
    let rows = stmt.query_map([], |r| r.get(0)).expect("querying workers");
    rows.collect::<rusqlite::Result<_>>()
        .expect("reading workers")
}

fn numbers(n: usize) -> String {
    (1..=n).map(|i| format!("{i}\n")).collect()
}

/// The run's final summary line.
fn run_summary(stderr: &str) -> &str {
    stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("litework run: "))
        .unwrap_or_else(|| panic!("no run summary in stderr:\n{stderr}"))
}

#[test]
fn a_batch_with_four_workers_ends_all_done_and_a_rerun_does_nothing() {
    let sb = Sandbox::new();
    sb.write("items.txt", numbers(3000));
    // Each run of an item leaves one line in a per-worker log.
    let cmd = r#"echo "$1" >> "$DIR/ran-$LITEWORK_WORKER_ID""#;
    let args = ["run", "--input", "items.txt", "-w", "4", "-c", "2"];
    let out = sb.lw(args).args(["--", "sh", "-c", cmd, "sh", "{}"]).run();
    assert_eq!(sb.count("done"), 3000, "{}", out.report("not all done"));
    let mut ran: Vec<u32> = sb
        .files_starting_with("ran-")
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(sb.path(f)).expect("reading a run log");
            text.lines()
                .map(|l| l.parse().expect("a number"))
                .collect::<Vec<u32>>()
        })
        .collect();
    ran.sort_unstable();
    assert_eq!(
        ran,
        (1..=3000).collect::<Vec<u32>>(),
        "each item ran exactly once"
    );
    assert_eq!(
        sb.files_starting_with("ran-").len(),
        4,
        "all four workers took part"
    );
    assert!(
        run_summary(&out.stderr).contains("3000 done, 0 failed"),
        "{}",
        out.stderr
    );

    let again = sb.lw(args).args(["--", "sh", "-c", cmd, "sh", "{}"]).run();
    again.assert_stderr_has("added 0 items (3000 already present)");
    assert!(
        run_summary(&again.stderr).contains("0 items finished"),
        "{}",
        again.stderr
    );
    let lines: usize = sb
        .files_starting_with("ran-")
        .iter()
        .map(|f| {
            std::fs::read_to_string(sb.path(f))
                .unwrap_or_default()
                .lines()
                .count()
        })
        .sum();
    assert_eq!(lines, 3000, "the re-run ran nothing");
}

#[test]
fn a_killed_worker_is_restarted_and_its_items_redone_at_once() {
    let sb = Sandbox::new();
    sb.write("items.txt", numbers(40));
    // With an hour-long lease only the supervisor's immediate requeue can
    // bring the killed worker's items back within the test's deadline.
    let run = sb
        .lw([
            "run",
            "-i",
            "items.txt",
            "-w",
            "2",
            "-c",
            "2",
            "--lease",
            "1h",
        ])
        .args(["--shell", "--", BLOCK_UNTIL_GO])
        .spawn();
    wait_until("four items started", DEADLINE, || {
        sb.files_starting_with("started-").len() == 4
    });
    let (victim, pid) = live_workers(&sb).remove(0);
    // SAFETY: kill(2) on a worker pid read from the database; the worker
    // is a child of the supervisor, which has not reaped it yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    wait_until("the dead worker's leases are requeued", DEADLINE, || {
        sb.attempts()
            .iter()
            .filter(|a| a.worker.as_deref() == Some(&victim))
            .count()
            == 2
    });
    std::fs::write(sb.path("go"), "").expect("creating go");
    let out = run.wait(0);

    assert_eq!(sb.count("done"), 40, "{}", out.report("not all done"));
    for a in sb.attempts() {
        assert_eq!(a.worker.as_deref(), Some(victim.as_str()), "{a:?}");
        assert_eq!(a.outcome, "lost", "{a:?}");
    }
    let summary = run_summary(&out.stderr);
    assert!(summary.contains("1 worker restarts"), "{summary}");
    let status: String = sb
        .conn()
        .query_row("SELECT status FROM workers WHERE id = ?1", [&victim], |r| {
            r.get(0)
        })
        .expect("the dead worker's row");
    assert_eq!(status, "dead");
}

#[test]
fn an_item_that_kills_its_worker_every_time_ends_failed_and_the_rest_finish() {
    let sb = Sandbox::new();
    sb.write("items.txt", "a\nb\npoison\nc\nd\n");
    // The item's shell is a direct child of the worker: $PPID is the worker.
    let script = r#"if [ "$1" = poison ]; then kill -9 $PPID; fi"#;
    let out = sb
        .lw(["run", "-i", "items.txt", "-w", "1", "-c", "1"])
        .args(["--restart-backoff", "10ms", "--max-attempts", "3"])
        .args(["--shell", "--", script])
        .run_expect(1);
    let items = sb.items();
    let poison = items
        .iter()
        .find(|i| i.payload == b"poison")
        .expect("the poison item");
    assert_eq!(
        (poison.status.as_str(), poison.attempts),
        ("failed", 3),
        "{poison:?}"
    );
    let error = poison.last_error.as_deref().unwrap_or_default();
    assert!(error.contains("died while running this item"), "{error}");
    assert_eq!(
        sb.count("done"),
        4,
        "{}",
        out.report("the others should be done")
    );
    let lost = sb.attempts().iter().filter(|a| a.outcome == "lost").count();
    assert_eq!(lost, 3);
    assert!(
        run_summary(&out.stderr).contains("3 worker restarts"),
        "{}",
        out.stderr
    );
    out.assert_stderr_has("list --status failed");
}

#[test]
fn a_slot_that_only_crashes_stops_the_run_with_an_error() {
    let sb = Sandbox::new();
    sb.write("items.txt", "x\n");
    let out = sb
        .lw(["run", "-i", "items.txt", "-w", "1", "--max-attempts", "100"])
        .args(["--restart-backoff", "1ms", "--shell", "--", "kill -9 $PPID"])
        .run_expect(3);
    out.assert_stderr_has("crashed 5 times in a row without finishing an item");
    assert_eq!(sb.count("running"), 0);
    assert_eq!(sb.count("pending"), 1);
}

#[test]
fn a_killed_supervisor_leaves_no_worker_and_a_second_run_finishes() {
    let sb = Sandbox::new();
    sb.write("items.txt", numbers(10));
    let args = ["run", "-i", "items.txt", "-w", "2", "-c", "2"];
    let first = sb.lw(args).args(["--shell", "--", BLOCK_UNTIL_GO]).spawn();
    wait_until("four items started", DEADLINE, || {
        sb.files_starting_with("started-").len() == 4
    });
    let pids = all_worker_pids(&sb);
    assert_eq!(pids.len(), 2);
    first.signal(libc::SIGKILL);
    for pid in pids {
        wait_until(&format!("worker {pid} is gone"), DEADLINE, || {
            process_gone(pid)
        });
    }
    wait_until("the orphaned leases are released", DEADLINE, || {
        sb.count("running") == 0
    });
    drop(first);

    std::fs::write(sb.path("go"), "").expect("creating go");
    let out = sb.lw(args).args(["--shell", "--", BLOCK_UNTIL_GO]).run();
    assert_eq!(sb.count("done"), 10, "{}", out.report("not all done"));
    // Released at shutdown, not lost: the attempt was given back.
    assert!(
        sb.items().iter().all(|i| i.attempts == 1),
        "{:#?}",
        sb.items()
    );
}

#[test]
fn sigterm_drains_within_the_deadline_and_leaves_nothing_running() {
    let sb = Sandbox::new();
    sb.write("items.txt", numbers(6));
    let run = sb
        .lw([
            "run",
            "-i",
            "items.txt",
            "-w",
            "2",
            "-c",
            "1",
            "--drain-timeout",
            "1s",
        ])
        .args([
            "--shell",
            "--",
            "touch \"$DIR/started-$LITEWORK_ITEM_ID\"; sleep 1000",
        ])
        .spawn();
    wait_until("two items started", DEADLINE, || {
        sb.files_starting_with("started-").len() == 2
    });
    run.signal(libc::SIGTERM);
    let out = run.wait(130);
    assert_eq!(
        sb.count("running"),
        0,
        "{}",
        out.report("items left running")
    );
    assert_eq!(sb.count("pending"), 6);
    assert!(
        sb.items().iter().all(|i| i.attempts == 0),
        "{:#?}",
        sb.items()
    );
    assert!(
        run_summary(&out.stderr).contains("6 pending"),
        "{}",
        out.stderr
    );
}

/// A worker that cannot be started (here: the executable is gone for a
/// while, as under a process limit or an upgrade) is tried again after
/// the restart backoff; it does not end the run, which finishes once the
/// worker can start again.
#[test]
fn a_worker_that_cannot_be_started_is_tried_again_and_the_run_goes_on() {
    let sb = Sandbox::new();
    let exe = sb.path("lw-copy");
    std::fs::copy(env!("CARGO_BIN_EXE_litework"), &exe).expect("copying litework");
    sb.write("items.txt", "1\n");
    let run = crate::util::Cmd::new(&exe, sb.dir())
        .env("DIR", sb.dir())
        .arg("--db")
        .arg(sb.db())
        .args(["run", "--input", "items.txt", "-w", "1", "-c", "1"])
        .args(["--shell", "--", BLOCK_UNTIL_GO])
        .spawn();
    wait_until("the item started", DEADLINE, || {
        sb.files_starting_with("started-").len() == 1
    });
    let away = sb.path("lw-away");
    std::fs::rename(&exe, &away).expect("moving litework away");
    let (_, pid) = live_workers(&sb).remove(0);
    // SAFETY: kill(2) on a worker pid read from the database; the worker
    // is a child of the supervisor, which has not reaped it yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    wait_until("a restart fails", DEADLINE, || {
        run.stderr_so_far()
            .contains("cannot start a worker; will try again")
    });
    std::fs::rename(&away, &exe).expect("moving litework back");
    std::fs::write(sb.path("go"), "").expect("creating go");
    let out = run.wait(0);
    assert!(
        run_summary(&out.stderr).contains("1 done, 0 failed"),
        "{}",
        out.stderr
    );
}

/// `litework run 2>&1 | head -1`: standard error closed by its reader
/// before the summary. The run still ends with its own exit status, not
/// a panic's (101).
#[test]
fn a_closed_standard_error_does_not_change_the_exit_status() {
    let sb = Sandbox::new();
    sb.write("items.txt", numbers(20));
    let mut run = std::process::Command::new(env!("CARGO_BIN_EXE_litework"))
        .current_dir(sb.dir())
        .arg("--db")
        .arg(sb.db())
        .args(["run", "--input", "items.txt", "-w", "2", "--", "true"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting litework run");
    drop(run.stderr.take());
    let status = run.wait().expect("waiting for litework run");
    assert_eq!(status.code(), Some(0));
    assert_eq!(sb.count("done"), 20);
}

/// The summary's retries are the attempts that were tried again: an
/// item's last, failed attempt is not one.
#[test]
fn the_summary_counts_retries_not_failed_attempts() {
    let sb = Sandbox::new();
    sb.write("items.txt", "ok\nflaky\nbad\n");
    let script = r#"case "$1" in
        flaky) test "$LITEWORK_ATTEMPT" -gt 2 ;;
        bad) exit 1 ;;
    esac"#;
    let out = sb
        .lw(["run", "--input", "items.txt", "-w", "1", "-c", "1"])
        .args(["--max-attempts", "3", "--backoff-base", "10ms"])
        .args(["--", "sh", "-c", script, "sh"])
        .run_expect(1);
    // flaky: 2 failed attempts, both retried; bad: 3, the last one final.
    assert_eq!(sb.attempts().len(), 5);
    let summary = run_summary(&out.stderr);
    assert!(summary.contains("2 done, 1 failed"), "{summary}");
    assert!(summary.contains(" 4 retries"), "{summary}");
}
