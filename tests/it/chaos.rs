//! The promise itself: kill any process at any moment and every item still
//! ends `done`, recorded exactly once, in a database that checks out.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::util::{live_workers, supervisor_addr, wait_until, Running, Sandbox, DEADLINE};

const ITEMS: usize = 3000;

/// Returns true if and only if `pid` is a litework worker on this test's
/// database: a pid read from the table may belong to a worker that died
/// since, and must not be reused to kill someone else's process.
fn is_our_worker(sb: &Sandbox, pid: i32) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let db = sb.db().as_os_str().as_encoded_bytes();
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.contains(&db) && args.contains(&&b"worker"[..])
}

fn start_run(sb: &Sandbox) -> Running {
    // Short leases and sweeps: a worker killed just before the supervisor
    // dies unseen, and only its lease expiring frees its items.
    sb.lw(["run", "-i", "items.txt", "-w", "4", "-c", "2"])
        .args(["--lease", "2s", "--sweep-interval", "500ms"])
        .args(["--metrics-addr", "127.0.0.1:0", "--progress", "none"])
        .args(["--restart-backoff", "10ms", "--max-attempts", "1000"])
        .args(["--shell", "--", r#"echo "$LITEWORK_ITEM_ID" >> "$DIR/ran""#])
        .spawn()
}

#[test]
fn every_item_is_done_exactly_once_whatever_is_killed() {
    let sb = Sandbox::new();
    let items: String = (1..=ITEMS).map(|i| format!("{i}\n")).collect();
    sb.write("items.txt", items);

    let mut run = start_run(&sb);
    supervisor_addr(&run);
    let mut kills = 0;
    let mut supervisor_killed = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if run.exited() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the chaos run did not finish in time"
        );
        let done = sb.count("done") as usize;
        if !supervisor_killed && done >= ITEMS / 3 {
            // Kill the supervisor outright, then start it again: its workers
            // release their items and go, the new run continues.
            run.signal(libc::SIGKILL);
            wait_until("the killed supervisor's workers are gone", DEADLINE, || {
                live_workers(&sb)
                    .iter()
                    .all(|(_, pid)| !is_our_worker(&sb, *pid))
            });
            drop(run);
            run = start_run(&sb);
            supervisor_addr(&run);
            supervisor_killed = true;
            continue;
        }
        let workers = live_workers(&sb);
        if !workers.is_empty() {
            let (_, pid) = workers[fastrand::usize(..workers.len())];
            if is_our_worker(&sb, pid) {
                // SAFETY: kill(2) on a pid just checked to be one of our
                // workers (see is_our_worker).
                unsafe { libc::kill(pid, libc::SIGKILL) };
                kills += 1;
            }
        }
        // The pace of the chaos, not a wait for anything: a kill every
        // 100-300 ms, as promised by the issue.
        std::thread::sleep(Duration::from_millis(100 + fastrand::u64(..200)));
    }
    let out = run.wait(0);
    assert!(
        supervisor_killed,
        "{}",
        out.report("the run ended before the supervisor kill")
    );
    assert!(kills > 0, "no worker was killed");

    // Every item done, each recorded once: one row, status done, its own
    // attempts; the kept counts agree with the table.
    let items = sb.items();
    assert_eq!(items.len(), ITEMS);
    let not_done: Vec<_> = items.iter().filter(|i| i.status != "done").collect();
    assert!(not_done.is_empty(), "not done: {not_done:#?}");
    let conn = sb.conn();
    let kept: i64 = conn
        .query_row("SELECT n FROM counts WHERE status = 'done'", [], |r| {
            r.get(0)
        })
        .expect("the kept count");
    assert_eq!(kept, ITEMS as i64);
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_eq!(integrity, "ok");

    // Every item ran at least once; some more than once (their worker died
    // mid-item, or after running it but before recording it).
    let log = std::fs::read_to_string(sb.path("ran")).expect("the run log");
    let mut runs: HashMap<usize, usize> = HashMap::new();
    for line in log.lines() {
        *runs.entry(line.parse().expect("an item id")).or_default() += 1;
    }
    assert_eq!(runs.len(), ITEMS, "every item ran");
    let extra: usize = runs.values().map(|n| n - 1).sum();
    eprintln!("chaos: {kills} workers and the supervisor killed; {extra} extra runs");
}

#[test]
fn bench_chaos_runs_the_kill_and_verify_loop_and_reports() {
    let sb = Sandbox::new();
    let out = sb
        .bare()
        .args(["bench", "--chaos", "--items", "400", "-w", "2"])
        .args(["--kill-every", "100ms"])
        .args(["--json", "--dir"])
        .arg(sb.path("chaos"))
        .run();
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("bench --json prints one JSON object");
    assert_eq!(report["passed"], true, "{report}");
    assert_eq!(report["done"], 400);
    assert_eq!(report["integrity"], "ok");
    assert_eq!(report["supervisor_killed"], true);
}
