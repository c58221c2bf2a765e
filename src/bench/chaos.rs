//! `litework bench --chaos`: the kill-and-verify loop, for users to run
//! against their own machine and settings.
//!
//! It makes a fresh queue of no-op items whose command appends the item id
//! to a log, runs `litework run` over it, SIGKILLs a random worker every
//! `--kill-every` (jittered) and, a third of the way through, the
//! supervisor itself, then starts the run again. At the end it checks what
//! litework promises: every item `done` and recorded once, the kept counts
//! in agreement, `PRAGMA integrity_check` ok, and every item run at least
//! once; it reports how many ran more than once.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use rusqlite::{Connection, OpenFlags};

use crate::cli::BenchArgs;
use crate::commands::DbFlags;

/// What one chaos run did and found.
#[derive(Debug, serde::Serialize)]
struct ChaosReport {
    items: usize,
    workers: usize,
    workers_killed: u64,
    supervisor_killed: bool,
    /// Exit status of the last `litework run`: 0 once every item is done.
    run_status: Option<i32>,
    wall_s: f64,
    done: i64,
    counts_agree: bool,
    integrity: String,
    ran_at_least_once: usize,
    extra_runs: usize,
    passed: bool,
}

pub fn bench(args: BenchArgs, flags: DbFlags) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("finding the litework executable")?;
    let (dir, temporary) = super::bench_dir(args.dir.as_deref(), "chaos")?;
    let report = chaos(&exe, &dir, &args, flags)?;
    // A failed run keeps its queue and logs for a look.
    if temporary && report.passed {
        let _ = std::fs::remove_dir_all(&dir);
    } else if !report.passed {
        note!("chaos: the queue and logs are in {}", dir.display());
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "chaos: {} items, {} workers; {} workers and {} supervisor killed; {:.1}s; \
             last run exited {}\n\
             done {} of {}, kept counts {}, integrity_check {}, every item ran: {}, \
             extra runs {}\n{}",
            report.items,
            report.workers,
            report.workers_killed,
            if report.supervisor_killed {
                "the"
            } else {
                "no"
            },
            report.wall_s,
            report
                .run_status
                .map_or_else(|| "by a signal".to_string(), |c| c.to_string()),
            report.done,
            report.items,
            if report.counts_agree {
                "agree"
            } else {
                "DISAGREE"
            },
            report.integrity,
            report.ran_at_least_once == report.items,
            report.extra_runs,
            if report.passed { "PASSED" } else { "FAILED" },
        );
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn chaos(exe: &Path, dir: &Path, args: &BenchArgs, flags: DbFlags) -> anyhow::Result<ChaosReport> {
    let n = args.items.unwrap_or(20_000);
    let concurrency = args.concurrency.unwrap_or(2);
    let db = dir.join("chaos.db");
    let log = dir.join("ran");
    let input = dir.join("items.txt");
    let items: String = (1..=n).map(|i| format!("{i}\n")).collect();
    std::fs::write(&input, items).context("writing the items")?;
    let started = Instant::now();

    let start = || -> anyhow::Result<Child> {
        let mut a: Vec<OsString> = vec!["--db".into(), db.clone().into(), "--quiet".into()];
        a.extend(["run", "--input"].map(OsString::from));
        a.push(input.clone().into());
        for (flag, value) in [
            ("--workers", args.workers.to_string()),
            ("--concurrency", concurrency.to_string()),
            ("--max-attempts", "1000".to_string()),
            ("--restart-backoff", "10ms".to_string()),
            // A worker killed just before the supervisor is a death nobody
            // sees: only its lease expiring frees its items. Short leases
            // and sweeps keep that wait (and the idle workers being killed
            // meanwhile, which count as crashes) short.
            ("--lease", "2s".to_string()),
            ("--sweep-interval", "500ms".to_string()),
            ("--progress", "none".to_string()),
        ] {
            a.push(flag.into());
            a.push(value.into());
        }
        a.extend(
            [
                "--shell",
                "--",
                r#"echo "$LITEWORK_ITEM_ID" >> "$LITEWORK_CHAOS_LOG""#,
            ]
            .map(OsString::from),
        );
        let output = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("run.log"))
            .context("opening run.log")?;
        Command::new(exe)
            .args(flags.args())
            .args(a)
            .env("LITEWORK_CHAOS_LOG", &log)
            .stdout(Stdio::null())
            .stderr(output)
            .spawn()
            .context("starting litework run")
    };

    let mut run = start()?;
    let mut kills = 0u64;
    let mut supervisor_killed = false;
    let run_status = loop {
        if let Some(status) = run.try_wait()? {
            break status.code();
        }
        let (done, workers) = peek(&db);
        if !supervisor_killed && done >= (n / 3) as i64 {
            run.kill().context("killing the supervisor")?;
            run.wait()?;
            // Its workers see their lifeline close, release and exit.
            let gone = Instant::now() + Duration::from_secs(30);
            while peek(&db).1.iter().any(|&pid| is_worker(pid, &db)) && Instant::now() < gone {
                std::thread::sleep(Duration::from_millis(20));
            }
            run = start()?;
            supervisor_killed = true;
            continue;
        }
        if !workers.is_empty() {
            let pid = workers[fastrand::usize(..workers.len())];
            if is_worker(pid, &db) {
                // SAFETY: kill(2) on a pid just checked to be a worker of
                // this chaos run's database.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                kills += 1;
            }
        }
        let every = args.kill_every.as_millis() as u64;
        std::thread::sleep(Duration::from_millis(every / 2 + fastrand::u64(..=every)));
    };
    let wall_s = started.elapsed().as_secs_f64();

    let conn = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("{}", db.display()))?;
    let done: i64 = conn.query_row(
        "SELECT count(*) FROM items WHERE status = 'done'",
        [],
        |r| r.get(0),
    )?;
    // Every status, against a recount.
    let counts_agree: bool = conn.query_row(
        "SELECT NOT EXISTS (
             SELECT 1 FROM counts
             WHERE n <> (SELECT count(*) FROM items WHERE items.status = counts.status))
         AND (SELECT sum(n) FROM counts) = (SELECT count(*) FROM items)",
        [],
        |r| r.get(0),
    )?;
    let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let mut runs: HashMap<&str, usize> = HashMap::new();
    for line in text.lines() {
        *runs.entry(line).or_default() += 1;
    }
    let extra_runs = runs.values().map(|n| n - 1).sum();
    // A run that ended before any worker was killed tested nothing.
    let passed = done == n as i64
        && counts_agree
        && integrity == "ok"
        && runs.len() == n
        && supervisor_killed
        && kills > 0
        && run_status == Some(0);
    Ok(ChaosReport {
        items: n,
        workers: args.workers,
        workers_killed: kills,
        supervisor_killed,
        run_status,
        wall_s,
        done,
        counts_agree,
        integrity,
        ran_at_least_once: runs.len(),
        extra_runs,
        passed,
    })
}

/// Items done and the pids of workers registered as running; nothing if
/// the database is not there yet.
fn peek(db: &Path) -> (i64, Vec<i32>) {
    let Ok(conn) = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return (0, Vec::new());
    };
    let _ = conn.busy_timeout(Duration::from_secs(5));
    let done = conn
        .query_row("SELECT n FROM counts WHERE status = 'done'", [], |r| {
            r.get(0)
        })
        .unwrap_or(0);
    let pids = conn
        .prepare("SELECT pid FROM workers WHERE status = 'running'")
        .and_then(|mut s| {
            s.query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<i32>>>()
        })
        .unwrap_or_default();
    (done, pids)
}

/// Returns true if and only if `pid` is a `litework worker` on `db`: a pid
/// from the table may have died and been reused since.
fn is_worker(pid: i32, db: &Path) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let db: PathBuf = db.to_path_buf();
    let db = db.as_os_str().as_encoded_bytes();
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    args.contains(&db) && args.contains(&&b"worker"[..])
}
