//! `litework bench`: a contention load test on fresh queues.
//!
//! One run measures, side by side on the same machine and filesystem:
//!
//! 1. raw SQLite: one process doing 100-row `UPDATE` transactions on a
//!    plain table for a second, with litework's connection settings (the
//!    ceiling any queue on this file system can approach);
//! 2. with `--compare-seed`, the plain pattern: N processes, each claiming
//!    one item per transaction and recording it in another;
//! 3. litework: N `bench-worker` processes running the real [`Worker`]
//!    (group commit, K executors each) over M items added by a real
//!    `litework add`;
//! 4. with `--pickup`, the delay from just before the transaction that
//!    adds an item to an idle queue to the start of its run, and the CPU the idle workers use
//!    before it: once with the commit watch, once polling only;
//! 5. with `--status-at`, `status` and a metrics scrape on a large queue.
//!
//! Every run over items ends with a check: every item done (or failed, for
//! `--work fail=…`) with its attempts run exactly once each, nothing left
//! running, and the kept counts equal to a recount.
//!
//! [`Worker`]: litework::worker::Worker

mod chaos;
mod worker;

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use litework::histogram::Snapshot;
use litework::metrics::{Exporter, SupervisorMetrics, WebConfig};
use litework::queue::{self, NewItem, Queue};

use crate::cli::{BenchArgs, WorkKind};
use crate::commands::DbFlags;
pub use worker::bench_worker;
use worker::WorkerOutput;

/// How long any one phase may take before the bench gives up on it.
const PHASE_DEADLINE: Duration = Duration::from_secs(600);
/// How long idle workers settle before their CPU is measured, and for how
/// long it is measured.
const IDLE_SETTLE: Duration = Duration::from_secs(1);
const IDLE_WINDOW: Duration = Duration::from_secs(3);

/// What the bench workers of a phase do.
#[derive(Clone, Copy)]
enum Role {
    /// The plain pattern.
    Seed,
    Litework,
    /// Time items from their commit to their start, following the queue.
    Pickup {
        poll_only: bool,
    },
}

/// CPU time used so far by the processes `pids`, all their threads
/// included (Linux: from `/proc/<pid>/task/*/schedstat`, in nanoseconds).
fn cpu_ns(pids: &[u32]) -> anyhow::Result<u64> {
    let mut total = 0u64;
    for pid in pids {
        let tasks = format!("/proc/{pid}/task");
        for task in std::fs::read_dir(&tasks).with_context(|| tasks.clone())? {
            let path = task?.path().join("schedstat");
            // A thread that ended between the listing and the read used
            // nothing more.
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let ns = text
                .split_whitespace()
                .next()
                .and_then(|f| f.parse::<u64>().ok());
            total += ns.with_context(|| format!("{}: {text:?}", path.display()))?;
        }
    }
    Ok(total)
}

#[derive(Debug, serde::Serialize)]
struct Machine {
    cpus: usize,
    sqlite: &'static str,
    litework: &'static str,
    dir: PathBuf,
}

#[derive(Debug, serde::Serialize)]
struct Raw {
    row_updates_per_s: f64,
    transactions: u64,
}

#[derive(Debug, Default, serde::Serialize)]
struct Check {
    done: u64,
    failed: u64,
    pending: u64,
    running: u64,
    /// Items whose attempt count is not 1 (retries, lost leases).
    attempts_not_one: u64,
    /// Sum of attempts over all items; every attempt ran once.
    attempts: u64,
    runs: u64,
    /// Rows in the attempts history: failures and lost leases. A run of
    /// work that cannot fail must leave none.
    history: u64,
    counts_agree: bool,
    passed: bool,
}

#[derive(Debug, serde::Serialize)]
struct RunReport {
    enqueue_s: f64,
    enqueue_peak_rss_kb: u64,
    wall_s: f64,
    items_per_s: f64,
    claims: u64,
    claim_p50_us: f64,
    claim_p99_us: f64,
    claim_max_us: f64,
    busy_waits: u64,
    busy_waited_s: f64,
    /// The write transactions' lock-hold times, summed over the workers.
    lock_held_s: f64,
    /// `lock_held_s` over the wall time: near 1, the single write lock is
    /// what limits the rate.
    lock_busy: f64,
    lease_lost: u64,
    retried: u64,
    worker_peak_rss_kb: u64,
    worker_rss_start_kb: u64,
    check: Check,
}

#[derive(Debug, serde::Serialize)]
struct Pickup {
    /// `"watch"` (the default) or `"poll"` (`--poll-only` workers).
    finds_items_by: &'static str,
    items: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// CPU the workers used while the queue was empty, in cores per worker.
    idle_cores_per_worker: f64,
    /// Wake-ups by the commit watch, all workers together.
    commit_wakeups: u64,
}

#[derive(Debug, serde::Serialize)]
struct StatusAt {
    items: u64,
    add_s: f64,
    add_peak_rss_kb: u64,
    status_ms: f64,
    scrape_ms: f64,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    machine: Machine,
    items: usize,
    workers: usize,
    concurrency: usize,
    work: String,
    raw: Raw,
    seed: Option<RunReport>,
    litework: RunReport,
    speedup_vs_seed: Option<f64>,
    share_of_raw: f64,
    pickup: Option<Pickup>,
    pickup_polling: Option<Pickup>,
    status_at: Option<StatusAt>,
    passed: bool,
}

pub fn bench(args: BenchArgs, flags: DbFlags) -> anyhow::Result<ExitCode> {
    if args.chaos {
        return chaos::bench(args, flags);
    }
    let exe = std::env::current_exe().context("finding the litework executable")?;
    let concurrency = args.concurrency.unwrap_or(4);
    let items = args.items.unwrap_or(200_000);
    let (dir, temporary) = bench_dir(args.dir.as_deref(), "bench")?;
    let result = repeat(&exe, &dir, &args, items, concurrency, flags);
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let reports = result?;
    let passed = reports.iter().all(|r| r.passed);
    match reports.as_slice() {
        [one] if args.json => println!("{}", serde_json::to_string(one)?),
        [one] => print_report(one),
        many => {
            let summary = Summary::of(many);
            if args.json {
                let all = serde_json::json!({
                    "runs": many,
                    "median": summary.median,
                    "min": summary.min,
                    "max": summary.max,
                    "passed": passed,
                });
                println!("{all}");
            } else {
                for (i, r) in many.iter().enumerate() {
                    println!("run {} of {}:", i + 1, many.len());
                    print_report(r);
                }
                summary.print(many.len());
            }
        }
    }
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `--runs` measurements, each in a directory of its own when there are
/// several; pickup and `--status-at` are measured in the first only.
fn repeat(
    exe: &Path,
    dir: &Path,
    args: &BenchArgs,
    items: usize,
    concurrency: usize,
    flags: DbFlags,
) -> anyhow::Result<Vec<Report>> {
    let runs = args.runs.max(1);
    let mut reports = Vec::new();
    for run in 1..=runs {
        let here = if runs == 1 {
            dir.to_path_buf()
        } else {
            let d = dir.join(format!("run-{run}"));
            std::fs::create_dir(&d).with_context(|| format!("{}", d.display()))?;
            d
        };
        if runs > 1 {
            note!("bench: run {run} of {runs}");
        }
        let extras = run == 1;
        reports.push(load(exe, &here, args, items, concurrency, flags, extras)?);
    }
    Ok(reports)
}

/// The figures compared across runs.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Figures {
    items_per_s: f64,
    raw_row_updates_per_s: f64,
    share_of_raw: f64,
    seed_items_per_s: Option<f64>,
    speedup_vs_seed: Option<f64>,
}

/// Median, least and most of each figure over several runs (each figure
/// on its own, so the three need not come from the same run).
struct Summary {
    median: Figures,
    min: Figures,
    max: Figures,
}

impl Summary {
    fn of(reports: &[Report]) -> Summary {
        let figures: Vec<Figures> = reports
            .iter()
            .map(|r| Figures {
                items_per_s: r.litework.items_per_s,
                raw_row_updates_per_s: r.raw.row_updates_per_s,
                share_of_raw: r.share_of_raw,
                seed_items_per_s: r.seed.as_ref().map(|s| s.items_per_s),
                speedup_vs_seed: r.speedup_vs_seed,
            })
            .collect();
        let pick = |at: fn(&[f64]) -> f64| {
            // `at` of the runs that have the figure, in order.
            let maybe = |f: &dyn Fn(&Figures) -> Option<f64>| {
                let mut v: Vec<f64> = figures.iter().filter_map(f).collect();
                v.sort_by(f64::total_cmp);
                (!v.is_empty()).then(|| at(&v))
            };
            let each = |f: fn(&Figures) -> f64| maybe(&|x| Some(f(x))).unwrap_or(f64::NAN);
            Figures {
                items_per_s: each(|f| f.items_per_s),
                raw_row_updates_per_s: each(|f| f.raw_row_updates_per_s),
                share_of_raw: each(|f| f.share_of_raw),
                seed_items_per_s: maybe(&|f| f.seed_items_per_s),
                speedup_vs_seed: maybe(&|f| f.speedup_vs_seed),
            }
        };
        Summary {
            median: pick(median),
            min: pick(|v| v[0]),
            max: pick(|v| v[v.len() - 1]),
        }
    }

    fn print(&self, runs: usize) {
        let (m, lo, hi) = (&self.median, &self.min, &self.max);
        println!("median of {runs} runs (lowest to highest in parentheses):");
        println!(
            "  litework {} items/s ({} to {}); raw SQLite {} row updates/s ({} to {})",
            thousands(m.items_per_s),
            thousands(lo.items_per_s),
            thousands(hi.items_per_s),
            thousands(m.raw_row_updates_per_s),
            thousands(lo.raw_row_updates_per_s),
            thousands(hi.raw_row_updates_per_s),
        );
        if let (Some(x), Some(a), Some(b)) =
            (m.speedup_vs_seed, lo.speedup_vs_seed, hi.speedup_vs_seed)
        {
            println!("  litework = {x:.1}x the plain pattern ({a:.1}x to {b:.1}x)");
        }
        println!(
            "  litework = {:.1}% of the raw row-update rate ({:.1}% to {:.1}%)",
            m.share_of_raw * 100.0,
            lo.share_of_raw * 100.0,
            hi.share_of_raw * 100.0
        );
    }
}

/// The middle value of sorted, non-empty `v` (the mean of the two middle
/// ones for an even count).
fn median(v: &[f64]) -> f64 {
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The given directory (made if missing, refused unless empty), or a new
/// temporary one to remove afterwards.
fn bench_dir(given: Option<&Path>, what: &str) -> anyhow::Result<(PathBuf, bool)> {
    match given {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("--dir {}", d.display()))?;
            let mut entries = std::fs::read_dir(d).with_context(|| format!("{}", d.display()))?;
            if entries.next().is_some() {
                return Err(litework::Error::Config(format!(
                    "--dir {}: not empty; bench makes fresh queues",
                    d.display()
                ))
                .into());
            }
            Ok((d.to_path_buf(), false))
        }
        None => Ok((temp_dir(what)?, true)),
    }
}

/// A new directory of our own under the system's temporary directory.
fn temp_dir(what: &str) -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!(
        "litework-{what}-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir(&d).with_context(|| format!("{}", d.display()))?;
    Ok(d)
}

fn load(
    exe: &Path,
    dir: &Path,
    args: &BenchArgs,
    items: usize,
    concurrency: usize,
    flags: DbFlags,
    extras: bool,
) -> anyhow::Result<Report> {
    let fleet = Fleet {
        exe,
        flags,
        workers: args.workers,
        concurrency,
        work: args.work,
        command: &args.command,
    };
    note!("bench: raw SQLite 100-row update transactions for 1 s");
    let raw = raw_updates(&dir.join("raw.db"), flags.durable)?;

    let input = dir.join("items.txt");
    write_items(&input, items as u64)?;
    let seed = if args.compare_seed {
        let slow = !args.command.is_empty() || matches!(args.work, WorkKind::Sleep(_));
        if slow && concurrency > 1 {
            // It runs one item at a time per process, as the seed script
            // does: with work that takes time the comparison also counts
            // litework's executors, not only its batching.
            note!(
                "bench: note: the plain pattern runs one item at a time per process; with \
                 work that takes time, litework's {concurrency} executors per process add up \
                 to {concurrency}x to the ratio"
            );
        }
        note!("bench: plain pattern, {items} items");
        Some(fleet.run(&dir.join("seed.db"), &input, items, true)?)
    } else {
        None
    };
    note!("bench: litework, {items} items");
    let litework = fleet.run(&dir.join("litework.db"), &input, items, false)?;
    let _ = std::fs::remove_file(&input);

    let (pickup, pickup_polling) = match args.pickup {
        Some(n) if n > 0 && extras => {
            note!("bench: idle cost and pickup latency, {n} items one at a time");
            (
                Some(fleet.pickup(&dir.join("pickup.db"), n, false)?),
                Some(fleet.pickup(&dir.join("pickup-polling.db"), n, true)?),
            )
        }
        _ => (None, None),
    };
    let status_at = match args.status_at {
        Some(n) if n > 0 && extras => {
            note!("bench: status and scrape at {n} items");
            Some(status_at(exe, dir, n, flags)?)
        }
        _ => None,
    };

    let mut passed = litework.check.passed;
    if let Some(s) = &seed {
        passed &= s.check.passed;
    }
    Ok(Report {
        machine: Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            sqlite: rusqlite::version(),
            litework: env!("CARGO_PKG_VERSION"),
            dir: dir.to_path_buf(),
        },
        items,
        workers: args.workers,
        concurrency,
        work: if args.command.is_empty() {
            args.work.to_string()
        } else {
            format!("command {:?}", args.command)
        },
        speedup_vs_seed: seed.as_ref().map(|s| litework.items_per_s / s.items_per_s),
        share_of_raw: litework.items_per_s / raw.row_updates_per_s,
        raw,
        seed,
        litework,
        pickup,
        pickup_polling,
        status_at,
        passed,
    })
}

/// Updates a 100,000-row table 100 consecutive rows per transaction, for
/// a second.
fn raw_updates(path: &Path, durable: bool) -> anyhow::Result<Raw> {
    let mut conn = queue::plain_connection(path, durable)?;
    conn.execute_batch(
        "CREATE TABLE raw (id INTEGER PRIMARY KEY, n INTEGER NOT NULL);
         WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < 100000)
         INSERT INTO raw (id, n) SELECT i, 0 FROM k;",
    )?;
    let mut transactions = 0u64;
    let started = Instant::now();
    let until = started + Duration::from_secs(1);
    while Instant::now() < until {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut update = tx.prepare_cached("UPDATE raw SET n = n + 1 WHERE id = ?1")?;
            // Consecutive rows, as a queue's claims and completions are.
            let first = (transactions * 100) % 100_000;
            for id in first + 1..=first + 100 {
                update.execute([id as i64])?;
            }
        }
        tx.commit()?;
        transactions += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(Raw {
        row_updates_per_s: (transactions * 100) as f64 / secs,
        transactions,
    })
}

fn write_items(path: &Path, n: u64) -> anyhow::Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("{}", path.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    for i in 1..=n {
        writeln!(w, "{i}")?;
    }
    w.flush()?;
    Ok(())
}

/// Runs `cmd` to the end; its wall time and peak resident memory.
fn timed(mut cmd: Command) -> anyhow::Result<(Duration, u64)> {
    let started = Instant::now();
    let child = cmd.spawn().context("starting litework")?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child, not yet reaped (std never waits on it).
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let took = started.elapsed();
    if r != pid {
        bail!("waiting for {cmd:?}: {}", std::io::Error::last_os_error());
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{cmd:?} failed (wait status {status})");
    }
    Ok((took, u64::try_from(usage.ru_maxrss).unwrap_or(0)))
}

/// `litework add` of a file of numbers into a new queue.
fn enqueue(exe: &Path, db: &Path, input: &Path, flags: DbFlags) -> anyhow::Result<(Duration, u64)> {
    let mut cmd = Command::new(exe);
    cmd.args(flags.args());
    cmd.arg("--db").arg(db).args(["-q", "add"]).arg(input);
    timed(cmd)
}

/// The worker processes of one phase.
struct Fleet<'a> {
    exe: &'a Path,
    flags: DbFlags,
    workers: usize,
    concurrency: usize,
    work: WorkKind,
    command: &'a [OsString],
}

struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Running {
    fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            let status = self.child.wait()?;
            bail!("a bench worker ended early ({status})");
        }
        Ok(line)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stdin = None;
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Fleet<'_> {
    /// Starts the workers and waits until every one has its queue open.
    fn start(&self, db: &Path, role: Role) -> anyhow::Result<Vec<Running>> {
        let mut all = Vec::with_capacity(self.workers);
        for _ in 0..self.workers {
            let mut cmd = Command::new(self.exe);
            cmd.args(self.flags.args());
            cmd.arg("--db").arg(db).args(["-q", "bench-worker"]);
            cmd.arg("--concurrency").arg(self.concurrency.to_string());
            cmd.arg("--work").arg(self.work.to_string());
            match role {
                Role::Seed => {
                    cmd.arg("--seed");
                }
                Role::Litework => {}
                Role::Pickup { poll_only } => {
                    cmd.arg("--pickup");
                    if poll_only {
                        cmd.arg("--poll-only");
                    }
                }
            }
            if !self.command.is_empty() {
                cmd.arg("--").args(self.command);
            }
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
            let mut child = cmd.spawn().context("starting a bench worker")?;
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                bail!("a bench worker without pipes");
            };
            all.push(Running {
                child,
                stdin: Some(stdin),
                stdout: BufReader::new(stdout),
            });
        }
        for w in &mut all {
            let line = w.line()?;
            if line.trim() != "ready" {
                bail!("a bench worker said {line:?} instead of ready");
            }
        }
        Ok(all)
    }

    fn go(all: &mut [Running]) -> anyhow::Result<()> {
        for w in all.iter_mut() {
            if let Some(stdin) = &mut w.stdin {
                stdin.write_all(b"go\n")?;
                stdin.flush()?;
            }
        }
        Ok(())
    }

    fn reports(all: &mut [Running]) -> anyhow::Result<Vec<WorkerOutput>> {
        let mut out = Vec::with_capacity(all.len());
        for w in all.iter_mut() {
            let line = w.line()?;
            out.push(serde_json::from_str(&line).context("reading a bench worker's report")?);
        }
        for w in all.iter_mut() {
            w.stdin = None;
            w.child.wait()?;
        }
        Ok(out)
    }

    /// Adds `items` to a fresh queue and runs it to the end.
    fn run(&self, db: &Path, input: &Path, items: usize, seed: bool) -> anyhow::Result<RunReport> {
        let (enqueue_took, enqueue_rss) = enqueue(self.exe, db, input, self.flags)?;
        let role = if seed { Role::Seed } else { Role::Litework };
        let mut all = self.start(db, role)?;
        let started = Instant::now();
        Fleet::go(&mut all)?;
        let outputs = Fleet::reports(&mut all)?;
        let wall = started.elapsed();
        drop(all);

        let mut claim = Snapshot::default();
        for o in &outputs {
            claim.merge(&o.claim);
        }
        let sum = |f: fn(&WorkerOutput) -> u64| outputs.iter().map(f).sum::<u64>();
        let us = |q: Option<Duration>| q.map_or(0.0, |d| d.as_secs_f64() * 1e6);
        let fail_free = !matches!(self.work, WorkKind::Fail(r) if r > 0.0);
        let check = check(db, items as u64, sum(|o| o.runs), fail_free)?;
        let lock_held_s = sum(|o| o.lock_held_ns) as f64 / 1e9;
        Ok(RunReport {
            enqueue_s: enqueue_took.as_secs_f64(),
            enqueue_peak_rss_kb: enqueue_rss,
            wall_s: wall.as_secs_f64(),
            items_per_s: items as f64 / wall.as_secs_f64(),
            claims: claim.count(),
            claim_p50_us: us(claim.quantile(0.5)),
            claim_p99_us: us(claim.quantile(0.99)),
            claim_max_us: us(claim.max()),
            busy_waits: sum(|o| o.busy_waits),
            busy_waited_s: sum(|o| o.busy_waited_ns) as f64 / 1e9,
            lock_held_s,
            lock_busy: lock_held_s / wall.as_secs_f64(),
            lease_lost: sum(|o| o.lost),
            retried: sum(|o| o.retried),
            worker_peak_rss_kb: outputs.iter().map(|o| o.rss_peak_kb).max().unwrap_or(0),
            worker_rss_start_kb: outputs.iter().map(|o| o.rss_start_kb).max().unwrap_or(0),
            check,
        })
    }

    /// Measures the CPU the workers use on an empty queue, then adds `n`
    /// items one at a time, a few milliseconds apart, and reports how long
    /// each waited to start.
    fn pickup(&self, db: &Path, n: usize, poll_only: bool) -> anyhow::Result<Pickup> {
        let queue = Queue::open_with(db, &self.flags.options(true))?;
        let mut all = self.start(db, Role::Pickup { poll_only })?;
        Fleet::go(&mut all)?;
        // Past the first checks of an empty queue, into steady idleness.
        std::thread::sleep(IDLE_SETTLE);
        let pids: Vec<u32> = all.iter().map(|w| w.child.id()).collect();
        let before = cpu_ns(&pids)?;
        let idle_from = Instant::now();
        std::thread::sleep(IDLE_WINDOW);
        let idle_ns = cpu_ns(&pids)?.saturating_sub(before);
        let idle_cores = idle_ns as f64 / 1e9 / idle_from.elapsed().as_secs_f64();
        let mut session = queue.session()?;
        for _ in 0..n {
            // Long enough apart for the workers to go idle between items.
            std::thread::sleep(Duration::from_micros(fastrand::u64(2_000..20_000)));
            let sent = worker::wall_clock_ns().to_string();
            session.add([Ok(NewItem::new(sent))], 1)?;
        }
        let deadline = Instant::now() + PHASE_DEADLINE;
        while session.status()?.done < n as u64 {
            if Instant::now() > deadline {
                bail!("pickup: items not done within {PHASE_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for w in &mut all {
            w.stdin = None;
        }
        let mut pickup = Snapshot::default();
        let mut commit_wakeups = 0;
        for o in Fleet::reports(&mut all)? {
            pickup.merge(&o.pickup);
            commit_wakeups += o.commit_wakeups;
        }
        let ms = |q: Option<Duration>| q.map_or(0.0, |d| d.as_secs_f64() * 1e3);
        Ok(Pickup {
            finds_items_by: if poll_only { "poll" } else { "watch" },
            idle_cores_per_worker: idle_cores / self.workers.max(1) as f64,
            commit_wakeups,
            items: n,
            p50_ms: ms(pickup.quantile(0.5)),
            p99_ms: ms(pickup.quantile(0.99)),
            max_ms: ms(pickup.max()),
        })
    }
}

/// What the queue says after a run, against what it must say.
fn check(db: &Path, items: u64, runs: u64, fail_free: bool) -> anyhow::Result<Check> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("{}", db.display()))?;
    let mut c = Check {
        runs,
        ..Check::default()
    };
    let mut counted = std::collections::HashMap::new();
    let mut stmt = conn.prepare(
        "SELECT status, count(*), sum(attempts), sum(attempts <> 1) FROM items GROUP BY status",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let status: String = r.get(0)?;
        let n: i64 = r.get(1)?;
        c.attempts += u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0);
        c.attempts_not_one += u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0);
        let n = u64::try_from(n).unwrap_or(0);
        match status.as_str() {
            "done" => c.done = n,
            "failed" => c.failed = n,
            "pending" => c.pending = n,
            "running" => c.running = n,
            _ => {}
        }
        counted.insert(status, n);
    }
    let mut kept = conn.prepare("SELECT status, n FROM counts")?;
    let kept: Vec<(String, i64)> = kept
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    c.counts_agree = kept.iter().all(|(status, n)| {
        u64::try_from(*n).ok() == Some(counted.get(status).copied().unwrap_or(0))
    });
    c.history = conn.query_row("SELECT count(*) FROM attempts", [], |r| r.get::<_, i64>(0))? as u64;
    c.passed = c.pending == 0
        && c.running == 0
        && c.done + c.failed == items
        && c.counts_agree
        && c.runs == c.attempts
        && (!fail_free || (c.done == items && c.attempts_not_one == 0 && c.history == 0));
    Ok(c)
}

/// Times `status` (a process, as a user runs it) and a scrape of the
/// supervisor's queue metrics on a queue of `n` items: median of five.
fn status_at(exe: &Path, dir: &Path, n: u64, flags: DbFlags) -> anyhow::Result<StatusAt> {
    let db = dir.join("status.db");
    let input = dir.join("status-items.txt");
    write_items(&input, n)?;
    let (add, add_rss) = enqueue(exe, &db, &input, flags)?;
    let _ = std::fs::remove_file(&input);

    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e3
    };
    let mut status = Vec::new();
    for _ in 0..5 {
        let mut cmd = Command::new(exe);
        cmd.args(flags.args());
        cmd.arg("--db").arg(&db).arg("status").stdout(Stdio::null());
        status.push(timed(cmd)?.0);
    }

    let queue = Queue::open_with(&db, &flags.options(false))?;
    let metrics = SupervisorMetrics::new(queue);
    let exporter = Exporter::serve(
        "127.0.0.1:0",
        metrics.registry().clone(),
        None,
        WebConfig::default(),
    )?;
    let mut scrape = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let body = http_get(exporter.addr(), "/metrics")?;
        scrape.push(started.elapsed());
        if !body.contains("litework_queue_items{") {
            bail!("the scrape has no litework_queue_items gauge");
        }
    }
    Ok(StatusAt {
        items: n,
        add_s: add.as_secs_f64(),
        add_peak_rss_kb: add_rss,
        status_ms: median(status),
        scrape_ms: median(scrape),
    })
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(addr)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    stream.read_to_string(&mut body)?;
    if !body.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", body.lines().next().unwrap_or(""));
    }
    Ok(body)
}

/// `x` rounded, with thousands separated by commas.
fn thousands(x: f64) -> String {
    let s = format!("{:.0}", x);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn print_report(r: &Report) {
    println!(
        "litework bench: {} items ({}), {} workers x {} executors; SQLite {}, {} CPUs",
        r.items, r.work, r.workers, r.concurrency, r.machine.sqlite, r.machine.cpus
    );
    println!(
        "  raw SQLite     {:>10} row updates/s (100-row transactions, one process)",
        thousands(r.raw.row_updates_per_s)
    );
    // litework's latency is of its whole turn (record what finished,
    // extend, claim a batch), the plain pattern's of a one-item claim.
    let line = |name: &str, what: &str, run: &RunReport| {
        println!(
            "  {name:<14} {:>10} items/s  {what} p50 {:.0} us, p99 {:.0} us, max {:.0} us; \
             {} lock waits ({:.2} s); write lock held {:.0}% of the run",
            thousands(run.items_per_s),
            run.claim_p50_us,
            run.claim_p99_us,
            run.claim_max_us,
            run.busy_waits,
            run.busy_waited_s,
            run.lock_busy * 100.0,
        );
    };
    if let Some(seed) = &r.seed {
        line("plain pattern", "claim", seed);
    }
    line("litework", "turn", &r.litework);
    let lw = &r.litework;
    if let Some(x) = r.speedup_vs_seed {
        println!("  litework = {x:.1}x the plain pattern");
    }
    println!(
        "  litework = {:.1}% of the raw row-update rate (an item is at least 2 row writes)",
        r.share_of_raw * 100.0
    );
    println!(
        "  add: {:.2} s, peak RSS {} MB; workers: peak RSS {:.1} MB (at start {:.1} MB); \
         {} claims, {} lost leases, {} retries",
        lw.enqueue_s,
        lw.enqueue_peak_rss_kb / 1024,
        lw.worker_peak_rss_kb as f64 / 1024.0,
        lw.worker_rss_start_kb as f64 / 1024.0,
        lw.claims,
        lw.lease_lost,
        lw.retried,
    );
    let c = &lw.check;
    println!(
        "  check: {} done, {} failed, {} pending, {} running; {} runs for {} attempts; \
         {} history rows; kept counts {}",
        c.done,
        c.failed,
        c.pending,
        c.running,
        c.runs,
        c.attempts,
        c.history,
        if c.counts_agree { "agree" } else { "DISAGREE" },
    );
    for p in [&r.pickup, &r.pickup_polling].into_iter().flatten() {
        let how = if p.finds_items_by == "watch" {
            "commit watch"
        } else {
            "polling only"
        };
        println!(
            "  idle workers ({how}): {:.2}% of a core each; then {} items into the idle \
             queue: pickup p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            p.idle_cores_per_worker * 100.0,
            p.items,
            p.p50_ms,
            p.p99_ms,
            p.max_ms
        );
    }
    if let Some(s) = &r.status_at {
        println!(
            "  at {} items: status {:.1} ms, metrics scrape {:.1} ms \
             (add took {:.1} s, peak RSS {} MB)",
            s.items,
            s.status_ms,
            s.scrape_ms,
            s.add_s,
            s.add_peak_rss_kb / 1024
        );
    }
    println!("  {}", if r.passed { "PASSED" } else { "FAILED" });
}
