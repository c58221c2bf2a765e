//! Faults from outside the queue: a worker frozen past its lease, a disk
//! that fills up under a running worker, and input, filters, commands and
//! files that must be refused before anything changes.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::util::{
    http_get, process_gone, read_pid, summary, wait_until, writing_since, Item, Running, Sandbox,
    BLOCK_UNTIL_GO, DEADLINE,
};

/// `db` with `suffix` appended: its `-wal` or `-shm` file.
fn sidecar(db: &Path, suffix: &str) -> PathBuf {
    let mut name = db.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// A filesystem mounted for one test. Dropping it unmounts it, also when
/// the test fails; lazily, so a process still inside cannot keep it.
struct Mount {
    at: PathBuf,
}

impl Mount {
    /// Runs `mount ARGS AT`, to be undone when dropped.
    fn new(args: &[&str], at: &Path) -> Result<Mount, String> {
        mount(args, at)?;
        Ok(Mount {
            at: at.to_path_buf(),
        })
    }

    /// Makes `dir` read-only for everyone, root included, by binding it
    /// onto itself and remounting the binding read-only.
    fn read_only(dir: &Path) -> Result<Mount, String> {
        let source = dir.to_str().expect("the sandbox path is UTF-8");
        let bound = Mount::new(&["--bind", source], dir)?;
        // The same mount, changed: dropping `bound` still takes it away.
        mount(&["-o", "remount,ro,bind"], dir)?;
        Ok(bound)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // No panic here: this may run while a failed test unwinds.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.at)
            .status();
    }
}

/// Runs `mount ARGS AT`; `Err` carries what mount printed.
fn mount(args: &[&str], at: &Path) -> Result<(), String> {
    let out = std::process::Command::new("mount")
        .args(args)
        .arg(at)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "mount {} {}: {}: {}",
            args.join(" "),
            at.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The one-letter state of each thread of `pid` (R, S, D, T...).
fn thread_states(pid: i32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
        .filter_map(|stat| {
            // The state follows the command name, which is in parentheses.
            let (_, rest) = stat.rsplit_once(')')?;
            Some(rest.split_whitespace().next()?.to_string())
        })
        .collect()
}

/// Returns true if and only if process `pid` holds SQLite's WAL write lock
/// on the database whose shared-memory file is `shm`: a POSIX write lock
/// on byte 120 of that file, as `/proc/locks` lists it.
fn holds_write_lock(pid: i32, shm: &Path) -> bool {
    const WAL_WRITE_LOCK: u64 = 120;
    let inode = std::fs::metadata(shm)
        .unwrap_or_else(|e| panic!("{}: {e}", shm.display()))
        .ino()
        .to_string();
    let pid = pid.to_string();
    let locks = std::fs::read_to_string("/proc/locks").expect("reading /proc/locks");
    locks.lines().any(|line| {
        // `N: POSIX ADVISORY WRITE PID MAJ:MIN:INODE START END`; a lock
        // being waited for has an extra `->` and is not held.
        let f: Vec<&str> = line.split_whitespace().collect();
        let covers = |start: &str, end: &str| {
            start.parse::<u64>().is_ok_and(|s| s <= WAL_WRITE_LOCK)
                && (end == "EOF" || end.parse::<u64>().is_ok_and(|e| e >= WAL_WRITE_LOCK))
        };
        f.len() == 8
            && f[1] == "POSIX"
            && f[3] == "WRITE"
            && f[4] == pid
            && f[5].rsplit(':').next() == Some(inode.as_str())
            && covers(f[6], f[7])
    })
}

/// Stops `worker` with SIGSTOP at a moment it holds no write transaction
/// on the sandbox's queue. Frozen inside one, it would keep every other
/// process from writing at all, which is not what these tests are about;
/// frozen while its running file shows it in a write (`id`), a sweeper
/// would leave its leases alone for a while.
fn freeze_outside_a_transaction(sb: &Sandbox, worker: &Running, id: &str) {
    let shm = sidecar(sb.db(), "-shm");
    let what = "the worker is stopped outside a write transaction";
    wait_until(what, DEADLINE, || {
        worker.signal(libc::SIGSTOP);
        wait_until("every thread of the worker has stopped", DEADLINE, || {
            let states = thread_states(worker.pid());
            !states.is_empty() && states.iter().all(|s| s == "T" || s == "t")
        });
        if holds_write_lock(worker.pid(), &shm) || writing_since(sb.db(), id) != 0 {
            worker.signal(libc::SIGCONT);
            return false;
        }
        true
    });
}

/// Worker A's item: records its pid, marks itself started, blocks until
/// the test creates `$DIR/go-A`, then marks that it got that far and
/// answers.
const ITEM_OF_A: &str = r#"echo $$ > "$DIR/pid-A"
touch "$DIR/started-A"
while [ ! -e "$DIR/go-A" ] && [ -d "$DIR" ]; do sleep 0.05; done
touch "$DIR/answered-A"
printf 'from A'"#;

/// Where both frozen-worker tests start from: worker A was stopped while
/// running the only item, and worker B swept A's expired lease, ran the
/// item again and recorded it. Returns A, the pid of A's item (still
/// running, blocked on `go-A`), and the item as B left it.
fn frozen_worker_overtaken(sb: &Sandbox) -> (Running, i32, Item) {
    sb.add("lines", "the-item\n", &[]);
    // A sweeps once at start and then not for an hour: only B may take
    // A's lease back.
    let a = sb
        .lw(["worker", "-c", "1", "--lease", "1s"])
        .args(["--sweep-interval", "1h", "--worker-id", "A"])
        .args(["--shell", "--", ITEM_OF_A])
        .spawn();
    wait_until("A's item has started", DEADLINE, || {
        sb.path("started-A").exists()
    });
    let item_pid = read_pid(&sb.path("pid-A"));
    freeze_outside_a_transaction(sb, &a, "A");
    let held = sb.only_item();
    assert_eq!(
        (held.status.as_str(), held.lease_owner.as_deref()),
        ("running", Some("A")),
        "{held:?}"
    );

    // Stopped, A cannot extend its lease; B's sweep takes the item back
    // once the lease has expired, and B runs it.
    let b = sb
        .lw(["worker", "-c", "1", "--sweep-interval", "100ms"])
        .args(["--worker-id", "B", "--shell", "--", "printf 'from B'"])
        .spawn();
    wait_until("B has recorded the item as done", DEADLINE, || {
        let item = sb.only_item();
        item.status == "done" && item.result.as_deref() == Some(&b"from B"[..])
    });
    let b = b.wait(0);
    assert_eq!(summary(&b.stderr).counts(), (1, 0, 0, 0, 0));
    let after_b = sb.only_item();
    assert_eq!(after_b.attempts, 2, "A's attempt and B's: {after_b:?}");
    assert_eq!(after_b.lease_owner, None, "{after_b:?}");
    assert!(!process_gone(item_pid), "A's item still runs");
    (a, item_pid, after_b)
}

/// A, running again, finds its lease gone and stops; the queue must be
/// exactly as B left it, with A's attempt in the history as lost.
fn assert_a_changed_nothing(sb: &Sandbox, mut a: Running, after_b: &Item) {
    wait_until("A notices it lost its lease", DEADLINE, || {
        a.stderr_so_far().contains("lease lost")
    });
    // With nothing left to run A stops by itself; a SIGTERM makes sure.
    if !a.exited() {
        a.signal(libc::SIGTERM);
    }
    let out = a.wait(0);
    let s = summary(&out.stderr);
    assert_eq!(
        (s.worker.as_str(), s.counts()),
        ("A", (0, 0, 0, 1, 0)),
        "{}",
        out.report("A should count one lost lease and nothing else")
    );

    assert_eq!(
        sb.only_item(),
        *after_b,
        "A's late outcome must not touch the row"
    );
    crate::util::assert_one_lost_attempt(sb, "A");

    // Recorded once: one outcome counted, to B; one item done.
    let conn = sb.conn();
    let mut stmt = conn
        .prepare("SELECT id, finished, status FROM workers ORDER BY id")
        .unwrap();
    let workers: Vec<(String, i64, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    let row = |id: &str, finished, status: &str| (id.to_string(), finished, status.to_string());
    assert_eq!(workers, [row("A", 0, "stopped"), row("B", 1, "stopped")]);
    let kept: (i64, i64) = conn
        .query_row(
            "SELECT (SELECT n FROM counts WHERE status = 'done'),
                    (SELECT sum(done) FROM throughput)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(kept, (1, 1), "(done items, done in throughput)");
}

/// A worker that cannot extend its lease because another program holds
/// the write lock keeps it: a sweep that gets the lock first leaves the
/// lease alone, though it has run out, as the worker shows it is waiting.
#[test]
fn a_lease_a_worker_could_not_extend_for_a_held_lock_is_not_swept() {
    let sb = Sandbox::new();
    sb.add("lines", "the-item\n", &[]);
    let worker = sb
        .lw(["worker", "-c", "1", "--lease", "1s", "--worker-id", "W"])
        .args(["--sweep-interval", "1h", "--shell", "--", BLOCK_UNTIL_GO])
        .spawn();
    wait_until("the item has started", DEADLINE, || {
        sb.files_starting_with("started-").len() == 1
    });
    let other = sb.hold_write_lock();
    let expires = sb.only_item().lease_expires.expect("a lease");
    wait_until("its lease has run out", DEADLINE, || now_ms() > expires);
    // Stopped in its wait, so that the sweep below gets the lock first.
    stop_while_writing(&sb, &worker, "W");
    other.execute_batch("ROLLBACK").expect("letting go");
    sb.lw(["requeue-stale"])
        .run()
        .assert_stderr_has("requeued 0 items");
    worker.signal(libc::SIGCONT);

    std::fs::write(sb.path("go"), "").unwrap();
    let out = worker.wait(0);
    assert_eq!(summary(&out.stderr).counts(), (1, 0, 0, 0, 0));
    let item = sb.only_item();
    assert_eq!((item.status.as_str(), item.attempts), ("done", 1));
    assert_eq!(sb.attempts(), []);
}

/// The other side: a worker frozen while it waited for the lock is spared
/// only as long as it could have waited (its busy timeout, and a second);
/// then a sweep takes its lease, as from any stalled worker.
#[test]
fn a_worker_frozen_while_it_waited_for_the_lock_loses_its_lease_in_the_end() {
    let sb = Sandbox::new();
    sb.add("lines", "the-item\n", &[]);
    let worker = sb
        .lw(["--busy-timeout", "1s", "worker", "-c", "1", "--lease", "1s"])
        .args(["--worker-id", "W", "--sweep-interval", "1h"])
        .args(["--shell", "--", BLOCK_UNTIL_GO])
        .spawn();
    wait_until("the item has started", DEADLINE, || {
        sb.files_starting_with("started-").len() == 1
    });
    let other = sb.hold_write_lock();
    let since = stop_while_writing(&sb, &worker, "W");
    other.execute_batch("ROLLBACK").expect("letting go");
    // Its busy timeout (1 s) and the grace (1 s) past the start of its wait.
    wait_until("the worker could have waited no longer", DEADLINE, || {
        now_ms() > since + 2000
    });
    sb.lw(["requeue-stale"])
        .run()
        .assert_stderr_has("requeued 1 items");
    let lost: Vec<_> = sb
        .attempts()
        .into_iter()
        .map(|a| (a.worker, a.outcome))
        .collect();
    assert_eq!(lost, [(Some("W".to_string()), "lost".to_string())]);
    // Told to stop before it runs on, it finds its lease gone and stops.
    worker.signal(libc::SIGTERM);
    worker.signal(libc::SIGCONT);
    std::fs::write(sb.path("go"), "").unwrap();
    worker.wait(0);
}

/// The time now, in ms since the epoch, as litework keeps times.
fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970");
    i64::try_from(now.as_millis()).expect("ms fit")
}

/// Stops `worker` (SIGSTOP, every thread) while its running file shows it
/// in a write, and returns since when. A worker whose waits end and begin
/// again (a short busy timeout) may be caught between two: it is let go
/// on and stopped again.
fn stop_while_writing(sb: &Sandbox, worker: &Running, id: &str) -> i64 {
    let mut since = 0;
    wait_until("the worker is stopped in a write", DEADLINE, || {
        if writing_since(sb.db(), id) == 0 {
            return false;
        }
        worker.signal(libc::SIGSTOP);
        wait_until("every thread of the worker has stopped", DEADLINE, || {
            let states = thread_states(worker.pid());
            !states.is_empty() && states.iter().all(|s| s == "T" || s == "t")
        });
        since = writing_since(sb.db(), id);
        if since == 0 {
            worker.signal(libc::SIGCONT);
        }
        since != 0
    });
    since
}

#[test]
fn paused_worker_loses_its_lease_and_its_late_result_changes_nothing() {
    let sb = Sandbox::new();
    let (a, item_pid, after_b) = frozen_worker_overtaken(&sb);
    // A's item answers while A is still stopped, so A wakes up holding a
    // result it no longer has the right to record.
    std::fs::write(sb.path("go-A"), "").unwrap();
    wait_until("A's item has answered and exited", DEADLINE, || {
        process_gone(item_pid)
    });
    assert!(sb.path("answered-A").exists());
    a.signal(libc::SIGCONT);
    assert_a_changed_nothing(&sb, a, &after_b);
}

#[test]
fn paused_worker_that_wakes_to_a_lost_lease_kills_its_item() {
    let sb = Sandbox::new();
    let (a, item_pid, after_b) = frozen_worker_overtaken(&sb);
    // Its item still waits for go-A, which never comes: only A's kill
    // can end it.
    a.signal(libc::SIGCONT);
    wait_until("A kills its item", DEADLINE, || process_gone(item_pid));
    assert!(
        !sb.path("answered-A").exists(),
        "the item must have been killed, not let finish"
    );
    assert_a_changed_nothing(&sb, a, &after_b);
}

/// Writes zeros to `path` until its filesystem has no room left.
fn fill(path: &Path) {
    let mut file = File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let page = [0u8; 4096];
    loop {
        match file.write(&page) {
            Ok(n) if n > 0 => {}
            Ok(_) => panic!("{}: write returned 0", path.display()),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return,
            Err(e) => panic!("{}: {e}", path.display()),
        }
    }
}

/// The value of `series` (a metric name, with labels if any) in what the
/// worker at `addr` serves on /metrics.
fn metric(addr: &str, series: &str) -> Option<f64> {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
#[ignore = "needs root to mount a tmpfs; .ci/run runs it"]
fn disk_full_is_a_clear_error_and_processing_resumes_when_room_returns() {
    let sb = Sandbox::new();
    // The whole sandbox, queue and marker files, on a 2 MiB tmpfs. Declared
    // after the sandbox, so it is unmounted before the sandbox is removed.
    let args = ["-t", "tmpfs", "-o", "size=2m", "litework-test"];
    let _tmpfs = Mount::new(&args, sb.dir()).unwrap_or_else(|e| panic!("{e}"));
    let payloads: String = (1..=8).map(|n| format!("item-{n}\n")).collect();
    sb.add("lines", payloads, &[]);

    // The worker starts while there is room (it registers, and SQLite sets
    // up its -wal and -shm files); its first two items wait for `go`, and
    // their 20 kB results need pages the full disk will not have.
    let answer = r"head -c 20000 /dev/zero | tr '\0' x";
    let script = format!("{BLOCK_UNTIL_GO}\n{answer}");
    let mut worker = sb
        .lw(["worker", "-c", "2", "--worker-id", "W"])
        .args(["--shell", "--", &script])
        .spawn();
    wait_until("two items have started", DEADLINE, || {
        sb.files_starting_with("started-").len() == 2
    });
    let addr: String = sb
        .conn()
        .query_row("SELECT metrics_addr FROM workers WHERE id = 'W'", [], |r| {
            r.get(0)
        })
        .expect("the worker registered its metrics address");
    let in_flight = || metric(&addr, "litework_items_in_flight");
    wait_until("the worker counts two items in flight", DEADLINE, || {
        in_flight() == Some(2.0)
    });

    let filler = sb.path("filler");
    fill(&filler);

    // Adding to the full disk is a failure (3), not bad input, says so,
    // and adds nothing.
    let before = sb.items();
    let refused = sb.lw(["add"]).stdin("late-item\n").run_expect(3);
    refused.assert_stderr_has("full");
    assert_eq!(sb.items(), before, "a refused add adds nothing");

    std::fs::write(sb.path("go"), "").unwrap();
    wait_until(
        "the worker holds both outcomes and says the disk is full",
        DEADLINE,
        || in_flight() == Some(0.0) && worker.stderr_so_far().contains("database or disk is full"),
    );
    assert!(!worker.exited(), "the worker must wait out a full disk");
    let started = sb.files_starting_with("started-");
    assert_eq!(started, ["started-1", "started-2"]);
    for item in sb.items() {
        let want = if item.id <= 2 {
            ("running", Some("W"), 1)
        } else {
            ("pending", None, 0)
        };
        let got = (
            item.status.as_str(),
            item.lease_owner.as_deref(),
            item.attempts,
        );
        assert_eq!(got, want, "not recorded yet, not lost: {item:?}");
        assert_eq!(item.result, None, "{item:?}");
    }
    assert_eq!(sb.attempts(), []);

    std::fs::remove_file(&filler).unwrap();
    let out = worker.wait(0);
    assert_eq!(
        summary(&out.stderr).counts(),
        (8, 0, 0, 0, 0),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("database is locked"),
        "{}",
        out.report("a full disk is not a lock")
    );
    let full = vec![b'x'; 20_000];
    for item in sb.items() {
        let got = (item.status.as_str(), item.attempts, &item.lease_owner);
        assert_eq!(got, ("done", 1, &None), "item {}", item.id);
        let whole = item.result.as_deref() == Some(&full[..]);
        assert!(whole, "item {}: result is not the 20 kB answer", item.id);
    }
    assert_eq!(sb.attempts(), []);
    let check: String = sb
        .conn()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

/// A worker told twice to stop while the disk is full cannot release its
/// item. It says so, exits 3 (not cleanly), and leaves its file of running
/// items behind, so that the requeue afterwards sees that nothing was
/// running any more and gives the attempt back, as the release would
/// have. (It used to remove the file on its way out, and the requeue then
/// charged every held item as if it had killed its worker.)
#[test]
#[ignore = "needs root to mount a tmpfs; .ci/run runs it"]
fn a_worker_stopped_on_a_full_disk_leaves_what_it_ran_for_the_requeue() {
    let sb = Sandbox::new();
    let args = ["-t", "tmpfs", "-o", "size=2m", "litework-test"];
    let _tmpfs = Mount::new(&args, sb.dir()).unwrap_or_else(|e| panic!("{e}"));
    sb.add("lines", "item-1\n", &[]);
    // Its own id: a worker that stops uncleanly has its keeper kill every
    // process that carries its id, the other test's worker "W" included.
    let worker = sb
        .lw(["worker", "-c", "1", "--worker-id", "F"])
        .args(["--drain-timeout", "1h", "--shell", "--", BLOCK_UNTIL_GO])
        .spawn();
    wait_until("the item has started", DEADLINE, || {
        sb.files_starting_with("started-").len() == 1
    });
    let filler = sb.path("filler");
    fill(&filler);

    worker.signal(libc::SIGTERM);
    wait_until("the worker drains", DEADLINE, || {
        worker.stderr_so_far().contains("draining")
    });
    worker.signal(libc::SIGTERM);
    let out = worker.wait(3);
    out.assert_stderr_has("outcomes were not recorded");
    let running_file = "queue.db-running-46"; // "F" in hex
    assert_eq!(sb.files_starting_with(running_file), [running_file]);
    let item = sb.only_item();
    let held = (
        item.status.as_str(),
        item.attempts,
        item.lease_owner.as_deref(),
    );
    assert_eq!(held, ("running", 1, Some("F")), "still leased: {item:?}");

    std::fs::remove_file(&filler).unwrap();
    sb.lw(["requeue-stale", "--worker", "F"]).run();
    let item = sb.only_item();
    assert_eq!(
        (item.status.as_str(), item.attempts),
        ("pending", 0),
        "{item:?}"
    );
    assert_eq!(sb.attempts(), [], "no attempt charged");
    assert_eq!(sb.files_starting_with(running_file), Vec::<String>::new());
}

/// Far past the 16 MiB default of `--max-record`: the line is refused by
/// number as soon as the limit is passed, without keeping it whole.
#[test]
fn line_of_100_megabytes_is_refused_naming_the_line_and_the_limit() {
    let sb = Sandbox::new();
    sb.add("lines", "existing\n", &[]);
    let before = sb.items();
    let path = sb.path("huge.txt");
    {
        let mut file = File::create(&path).unwrap();
        file.write_all(b"ok-1\nok-2\n").unwrap();
        let mebibyte = vec![b'a'; 1 << 20];
        for _ in 0..100 {
            file.write_all(&mebibyte).unwrap();
        }
        file.write_all(b"\nafter\n").unwrap();
    }
    let out = sb.lw(["add"]).arg(&path).run_expect(2);
    out.assert_stderr_has("huge.txt: line 3: ");
    out.assert_stderr_has("16777216-byte limit");
    assert_eq!(sb.items(), before, "nothing of the input is added");
}

/// `--max-record N` is the longest record accepted: one byte more is
/// refused, whatever ends the record.
#[test]
fn record_one_byte_over_max_record_is_refused() {
    let sb = Sandbox::new();
    sb.add("lines", "existing\n", &[]);
    let before = sb.items();
    let cases: [(&str, &[u8]); 4] = [
        ("lines", b"abcd\nabcde\n"),
        ("lines", b"abcd\r\nabcde\r\n"),
        ("lines", b"abcd\nabcde"),
        ("nul", b"abcd\0abcde\0"),
    ];
    for (format, input) in cases {
        let out = sb
            .lw(["add", "--max-record", "4", "--format", format])
            .stdin(input)
            .run_expect(2);
        out.assert_stderr_has("line 2: ");
        out.assert_stderr_has("4-byte limit");
        assert_eq!(sb.items(), before, "{format} {input:?}");
    }
}

#[test]
fn unknown_status_filter_is_refused_naming_the_accepted_values() {
    let sb = Sandbox::new();
    sb.add("lines", "x\n", &[]);
    for verb in ["list", "export"] {
        let out = sb.lw([verb, "--status", "finished"]).run_expect(2);
        out.assert_stderr_has("\"finished\"");
        out.assert_stderr_has("pending, running, done or failed");
        assert!(out.stdout.is_empty(), "{}", out.report("printed items"));
    }
}

/// The program is checked once, before the worker registers or claims:
/// a path to nothing, or to a file that cannot be executed, and `run`
/// refuses it before adding its input. (A bare name missing from PATH is
/// in cli.rs.)
#[test]
fn command_that_cannot_run_is_refused_before_anything_is_claimed() {
    let sb = Sandbox::new();
    sb.add("lines", "a\nb\n", &[]);
    let before = sb.items();
    let plain = sb.write("plain.sh", "#!/bin/sh\necho hello\n");
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
    sb.write("more.txt", "c\nd\n");

    let cases: [&[&str]; 3] = [
        &["worker", "--", "./no-such-tool"],
        &["worker", "--", "./plain.sh"],
        &["run", "--input", "more.txt", "--", "./no-such-tool"],
    ];
    for args in cases {
        let out = sb.lw(args).run_expect(2);
        out.assert_stderr_has(&format!("{}: ", args[args.len() - 1]));
        out.assert_stderr_has("executable");
    }
    assert_eq!(sb.items(), before, "nothing claimed, nothing added");
    let workers: i64 = sb
        .conn()
        .query_row("SELECT count(*) FROM workers", [], |r| r.get(0))
        .unwrap();
    assert_eq!(workers, 0, "no worker registered");
}

/// A database litework cannot write is refused by every verb before
/// SQLite creates a -wal or -shm file beside it. Root ignores mode bits,
/// so as root the sandbox is remounted read-only instead of chmod 0444.
#[test]
fn read_only_database_is_refused_saying_so() {
    let sb = Sandbox::new();
    sb.add("lines", "a\n", &[]);
    // Through litework, whose last connection removes the -wal and -shm
    // files as it closes; a read-only reader would leave them behind.
    let before = sb.lw(["export"]).run().stdout;
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    let read_only = if unsafe { libc::geteuid() } == 0 {
        match Mount::read_only(sb.dir()) {
            Ok(mount) => Some(mount),
            // Root in a container without CAP_SYS_ADMIN: nothing can make a
            // file read-only for it. Any other failure is the test's own.
            Err(e) if e.to_lowercase().contains("permission denied") => {
                eprintln!("skipped: root, and not allowed to mount: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        }
    } else {
        let mode = std::fs::Permissions::from_mode(0o444);
        std::fs::set_permissions(sb.db(), mode).unwrap();
        None
    };

    let sidecars = || -> Vec<bool> {
        ["-wal", "-shm", "-journal"]
            .iter()
            .map(|suffix| sidecar(sb.db(), suffix).exists())
            .collect()
    };
    let sidecars_before = sidecars();
    let verbs: [&[&str]; 3] = [&["status"], &["add"], &["worker", "--", "true"]];
    for verb in verbs {
        let out = sb.lw(verb).stdin("b\n").run_expect(2);
        out.assert_stderr_has(&format!("{}: ", sb.db().display()));
        out.assert_stderr_has("read-only");
    }
    // The refused verbs created no -wal, -shm or -journal file.
    assert_eq!(sidecars(), sidecars_before);
    drop(read_only);
    assert_eq!(sb.lw(["export"]).run().stdout, before);
}

fn wal_size(sb: &Sandbox) -> u64 {
    let mut name = sb.db().as_os_str().to_owned();
    name.push("-wal");
    std::fs::metadata(name).map_or(0, |m| m.len())
}

/// A reader that keeps one snapshot open (a long `sqlite3` session, a
/// stuck export) holds checkpoints back and the WAL grows; once it goes,
/// the next checkpoint lets SQLite start the WAL over and cut it back to
/// the journal size limit.
#[test]
fn wal_grows_under_a_long_lived_reader_and_shrinks_once_it_goes() {
    const LIMIT: u64 = 16 * 1024 * 1024;
    let sb = Sandbox::new();
    let batch = |from: usize| {
        (from..from + 300)
            .map(|i| format!("{i}\n"))
            .collect::<String>()
    };
    sb.add("lines", batch(0), &[]);

    let reader = crate::util::open_read_only(sb.db());
    reader.execute_batch("BEGIN").expect("beginning a read");
    let seen: i64 = reader
        .query_row("SELECT count(*) FROM items", [], |r| r.get(0))
        .expect("reading inside the snapshot");
    assert_eq!(seen, 300);

    // Each result is 64 KiB: 300 of them are about 19 MiB of WAL.
    let worker = sb
        .lw(["worker", "--follow", "-c", "2", "--idle-poll", "20ms"])
        .args(["--shell", "--", "head -c 65536 /dev/zero | tr '\\0' x"])
        .spawn();
    wait_until("the first batch is done", DEADLINE, || {
        sb.count("done") == 300
    });
    let grown = wal_size(&sb);
    assert!(
        grown > LIMIT,
        "the WAL should grow past {LIMIT} under the reader: {grown}"
    );

    reader.execute_batch("COMMIT").expect("ending the read");
    drop(reader);
    sb.add("lines", batch(300), &[]);
    wait_until("the second batch is done", DEADLINE, || {
        sb.count("done") == 600
    });
    let after = wal_size(&sb);
    assert!(
        after <= LIMIT,
        "the WAL should be cut back to {LIMIT}: {after} (was {grown})"
    );

    worker.signal(libc::SIGTERM);
    worker.wait(0);
}
