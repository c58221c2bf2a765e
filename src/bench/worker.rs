//! One worker process of `litework bench` (the hidden `bench-worker`
//! verb).
//!
//! It opens the queue, prints `ready`, and waits for a line on stdin so
//! that all workers start at once. It then runs like `litework worker`
//! (the real [`Worker`], with a built-in handler or a command) or, with
//! `--seed`, like the plain pattern: one item claimed per transaction and
//! its completion in a transaction of its own. End of stdin stops it. Its
//! report is one JSON line on stdout.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use litework::exec::{CommandSpec, Keeper, PayloadMode};
use litework::histogram::{Histogram, Snapshot};
use litework::queue::{
    self, busy, Backoff, Completion, FailureKind, Job, Queue, Recorded, Turn, WorkerInfo,
};
use litework::worker::{new_worker_id, Cancel, Handler, Outcome, Worker, WorkerConfig};

use crate::cli::{BenchWorkerArgs, WorkKind};

/// What one bench worker did, as it reports it.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct WorkerOutput {
    pub done: u64,
    pub retried: u64,
    pub failed: u64,
    pub lost: u64,
    /// Handler invocations: items run, retries included.
    pub runs: u64,
    pub claim: Snapshot,
    pub pickup: Snapshot,
    pub busy_waits: u64,
    pub busy_waited_ns: u64,
    /// Time this worker's write transactions held the write lock.
    pub lock_held_ns: u64,
    pub rss_start_kb: u64,
    pub rss_end_kb: u64,
    pub rss_peak_kb: u64,
    /// Wake-ups by the commit watch.
    pub commit_wakeups: u64,
}

struct BenchHandler {
    work: WorkKind,
    command: Option<CommandSpec>,
    runs: AtomicU64,
    pickup: Option<Histogram>,
}

impl Handler for BenchHandler {
    fn handle(&self, job: &Job, cancel: &Cancel) -> Outcome {
        self.runs.fetch_add(1, Ordering::Relaxed);
        if let Some(h) = &self.pickup {
            let sent = std::str::from_utf8(&job.payload)
                .ok()
                .and_then(|s| s.parse::<u128>().ok());
            if let Some(sent) = sent {
                let waited = wall_clock_ns().saturating_sub(sent);
                h.record(Duration::from_nanos(
                    u64::try_from(waited).unwrap_or(u64::MAX),
                ));
            }
        }
        if let Some(spec) = &self.command {
            return spec.run(job, cancel);
        }
        match self.work {
            WorkKind::Noop => Outcome::Done(Vec::new()),
            WorkKind::Sleep(d) => {
                std::thread::sleep(d);
                Outcome::Done(Vec::new())
            }
            WorkKind::Fail(rate) => {
                if fastrand::f64() < rate {
                    Outcome::Retry("bench: simulated failure".into())
                } else {
                    Outcome::Done(Vec::new())
                }
            }
        }
    }
}

/// Nanoseconds since the Unix epoch: comparable across processes.
pub fn wall_clock_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// `VmRSS` and `VmHWM` of this process in KiB, from /proc.
pub fn memory_kb() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

pub fn bench_worker(
    db: &Path,
    opts: &queue::Options,
    args: BenchWorkerArgs,
) -> anyhow::Result<ExitCode> {
    let queue = Queue::open_with(db, opts)?;
    let id = new_worker_id();
    let command = if args.command.is_empty() {
        None
    } else {
        let mut spec = CommandSpec::new(args.command.clone(), PayloadMode::Argument)?;
        let exe = std::env::current_exe().context("finding the litework executable")?;
        spec.keeper = Some(Arc::new(Keeper::start(&exe, &id)?));
        spec.worker_id = id.clone();
        Some(spec)
    };
    let handler = Arc::new(BenchHandler {
        work: args.work,
        command,
        runs: AtomicU64::new(0),
        pickup: args.pickup.then(Histogram::new),
    });
    let (rss_start_kb, _) = memory_kb();

    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "ready")?;
    stdout.flush()?;
    let mut line = String::new();
    if std::io::stdin().read_line(&mut line)? == 0 {
        return Ok(ExitCode::SUCCESS);
    }
    // From now on, end of stdin means stop (twice: no drain wait).
    let (stop_tx, stop) = crossbeam_channel::bounded(2);
    std::thread::Builder::new()
        .name("bench-stdin".into())
        .spawn(move || {
            let mut sink = String::new();
            let stdin = std::io::stdin();
            while matches!(stdin.read_line(&mut sink), Ok(n) if n > 0) {
                sink.clear();
            }
            let _ = stop_tx.try_send(());
            let _ = stop_tx.try_send(());
        })
        .context("starting the stdin thread")?;

    let backoff = Backoff {
        base: Duration::ZERO,
        max: Duration::ZERO,
    };
    let mut out = WorkerOutput::default();
    if args.seed {
        out.claim = seed_loop(&queue, &id, &handler, &backoff, &mut out)?;
    } else {
        let config = WorkerConfig {
            id: Some(id),
            concurrency: args.concurrency.max(1),
            follow: args.pickup,
            watch_commits: !args.poll_only,
            backoff,
            ..WorkerConfig::default()
        };
        let shared = handler.clone();
        let worker = Worker::new(queue, config, move |job: &Job, cancel: &Cancel| {
            shared.handle(job, cancel)
        });
        let claims = worker.claim_latency();
        let metrics = worker.metrics();
        let report = worker.run(stop)?;
        out.commit_wakeups = metrics.commit_wakeups.get();
        out.done = report.done;
        out.retried = report.retried;
        out.failed = report.failed;
        out.lost = report.lost;
        out.claim = claims.snapshot();
    }
    out.runs = handler.runs.load(Ordering::Relaxed);
    if let Some(h) = &handler.pickup {
        out.pickup = h.snapshot();
    }
    out.busy_waits = busy::waits();
    out.busy_waited_ns = u64::try_from(busy::waited().as_nanos()).unwrap_or(u64::MAX);
    out.lock_held_ns = u64::try_from(busy::held().as_nanos()).unwrap_or(u64::MAX);
    out.rss_start_kb = rss_start_kb;
    (out.rss_end_kb, out.rss_peak_kb) = memory_kb();
    if let Some(spec) = &handler.command {
        if let Some(keeper) = &spec.keeper {
            keeper.finish();
        }
    }
    writeln!(stdout, "{}", serde_json::to_string(&out)?)?;
    stdout.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// The plain pattern, with litework's statements and connection settings:
/// claim one item in a transaction, run it, record it in another.
fn seed_loop(
    queue: &Queue,
    id: &str,
    handler: &Arc<BenchHandler>,
    backoff: &Backoff,
    out: &mut WorkerOutput,
) -> anyhow::Result<Snapshot> {
    let lease = Duration::from_secs(30);
    let claims = Histogram::new();
    let mut session = queue.session()?;
    session.register_worker(&WorkerInfo {
        id: id.to_string(),
        pid: std::process::id(),
        host: litework::worker::host_name(),
        metrics_addr: None,
    })?;
    let claim_one = Turn {
        finished: Vec::new(),
        extend: Vec::new(),
        claim: 1,
        heartbeat: false,
    };
    let cancel = Cancel::default();
    loop {
        let started = Instant::now();
        let claimed = session.turn(id, lease, &claim_one)?.claimed;
        claims.record(started.elapsed());
        let Some(job) = claimed.into_iter().next() else {
            break;
        };
        let completion = match handler.handle(&job, &cancel) {
            Outcome::Done(result) => Completion::Done { result },
            Outcome::Retry(error) => backoff.completion(&job, error, FailureKind::Error),
            Outcome::Fail(error) => Completion::Failed {
                error,
                kind: FailureKind::Permanent,
            },
        };
        let kind = match &completion {
            Completion::Done { .. } => 0,
            Completion::Retry { .. } => 1,
            _ => 2,
        };
        match session.record(&job, completion)? {
            Recorded::LeaseLost => out.lost += 1,
            Recorded::Recorded if kind == 0 => out.done += 1,
            Recorded::Recorded if kind == 1 => out.retried += 1,
            Recorded::Recorded => out.failed += 1,
        }
    }
    session.worker_stopped(id)?;
    Ok(claims.snapshot())
}
