//! The worker: claim, execute, record, in one process.
//!
//! One thread (the caller's) owns the database session. Each turn it
//! records the outcomes that arrived since the last one, extends its leases
//! when a heartbeat is due and claims the next batch, all in one immediate
//! transaction: a group commit. K executor threads take the claimed items
//! from a crossbeam channel and leave their outcomes in an outbox.
//! Timeouts, lost leases and shutdown reach a running item through its
//! [`Cancel`], which kills a command's process group.
//!
//! The batch adapts to the work. A worker holds up to `depth` items:
//! its K running ones plus as many as its executors finish in about
//! [`HORIZON`], measured as it goes. Fast items (a no-op handler) get
//! batches of hundreds and one transaction per batch; items that take
//! seconds get no more than K, so no worker hoards slow work. A turn
//! happens when an executor would otherwise go idle, when the held items
//! fall to half of `depth`, when a heartbeat is due, or when outcomes have
//! waited [`FLUSH_AFTER`]; executors wake the database thread only when one
//! of those is reached, not once per item.
//!
//! When a claim comes up short the thread does not take the write lock
//! again to find out whether more came: it notes the claim's
//! `PRAGMA data_version` (which changes only when another connection
//! commits) and checks it when a [`CommitWatch`] says another process
//! wrote to the log, and on a timer backing off to [`WATCHED_POLL`] or
//! `idle_poll`, whichever is longer (without a watch: to `idle_poll`).
//! Only when it moved does it look, in a read transaction, for anything
//! ready, and claims only if there is; it counts as idle again only after
//! a claim comes up short, so a claim refused by a held lock is tried
//! again. It also wakes at the `run_after` of the earliest delayed item.
//! Its own commits do not move `data_version`, so when it puts an item
//! back itself it keeps track: a retry moves that wake-up time earlier, a
//! release (ready at once) makes it claim again straight away.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::histogram::Histogram;
use crate::metrics::{Attempt, WorkerMetrics};
use crate::queue::running::RunningSlots;
use crate::queue::watch::CommitWatch;
use crate::queue::{
    now_ms, Backoff, Completion, FailureKind, Job, Queue, Recorded, Session, Turn, WorkerInfo,
};

/// What a handler reports for one item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Success, with the result to store.
    Done(Vec<u8>),
    /// Failure worth retrying (with backoff, until the attempt limit).
    Retry(String),
    /// Failure retrying cannot mend: the item ends `failed` now.
    Fail(String),
}

/// Why a running item is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// It ran past `--timeout`.
    Timeout,
    /// Its lease was taken away; any result would be dropped.
    LeaseLost,
    /// The worker is shutting down and the drain deadline passed.
    Shutdown,
}

type Hook = Box<dyn FnMut() + Send>;

/// The stop signal of one running item. Handlers poll
/// [`Cancel::is_cancelled`]; the command runner installs a hook that kills
/// the child's process group.
#[derive(Default)]
pub struct Cancel {
    state: Mutex<(Option<CancelReason>, Option<Hook>)>,
    started: OnceLock<Instant>,
    /// The worker's `timeout`: how long the item may run once started.
    limit: Option<Duration>,
}

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cancel")
            .field("reason", &self.reason())
            .finish()
    }
}

impl Cancel {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Option<CancelReason>, Option<Hook>)> {
        // A panic while holding this lock cannot leave the pair half-set.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Why the item was cancelled, if it was.
    pub fn reason(&self) -> Option<CancelReason> {
        self.lock().0
    }

    /// Returns true if and only if the item should stop now.
    pub fn is_cancelled(&self) -> bool {
        self.reason().is_some()
    }

    /// Cancels (the first reason wins) and runs the hook, if any.
    pub fn cancel(&self, reason: CancelReason) {
        let mut state = self.lock();
        if state.0.is_none() {
            state.0 = Some(reason);
        }
        if let Some(hook) = state.1.as_mut() {
            hook();
        }
    }

    /// Installs `hook`, run on cancellation; runs it at once if the item is
    /// already cancelled.
    pub fn set_hook(&self, mut hook: Hook) {
        let mut state = self.lock();
        if state.0.is_some() {
            hook();
        }
        state.1 = Some(hook);
    }

    /// Removes the hook; once this returns it will not run again.
    pub fn clear_hook(&self) {
        self.lock().1 = None;
    }

    /// When an executor started the item; `None` while it waits for one.
    pub fn started(&self) -> Option<Instant> {
        self.started.get().copied()
    }

    /// When the item's time is up, if it has a timeout and has started. The
    /// worker's loop cancels it then, and a handler that can may cancel
    /// itself (the command runner does: the loop may be waiting for the
    /// write lock at that moment).
    pub fn deadline(&self) -> Option<Instant> {
        Some(self.started()? + self.limit?)
    }

    fn mark_started(&self) {
        self.started.get_or_init(Instant::now);
    }
}

/// Runs one item. Implemented for closures `Fn(&Job, &Cancel) -> Outcome`.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, job: &Job, cancel: &Cancel) -> Outcome;
}

impl<F> Handler for F
where
    F: Fn(&Job, &Cancel) -> Outcome + Send + Sync + 'static,
{
    fn handle(&self, job: &Job, cancel: &Cancel) -> Outcome {
        self(job, cancel)
    }
}

impl Handler for crate::exec::CommandSpec {
    fn handle(&self, job: &Job, cancel: &Cancel) -> Outcome {
        self.run(job, cancel)
    }
}

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Identity to register; `None` makes a fresh one ([`new_worker_id`]).
    pub id: Option<String>,
    /// Executor threads: items run at once.
    pub concurrency: usize,
    /// How long a claim holds an item without a heartbeat. Leases are
    /// extended every third of this while items run.
    pub lease: Duration,
    /// Longest an item may run before it is killed and counted failed.
    pub timeout: Option<Duration>,
    /// Keep waiting for new items instead of exiting when the queue drains.
    pub follow: bool,
    /// After a stop signal, how long running items may take to finish
    /// before they are stopped and released.
    pub drain_timeout: Duration,
    pub backoff: Backoff,
    /// Longest pause between checks for new work when idle and commits
    /// cannot be watched; with a watch, the longer of this and
    /// [`WATCHED_POLL`].
    pub idle_poll: Duration,
    /// Watch the database's log for other processes' commits (inotify), so
    /// an idle worker need not poll often; see [`CommitWatch`].
    pub watch_commits: bool,
    /// How often to requeue expired leases of other workers.
    pub sweep_interval: Duration,
    /// Where this worker's `/metrics` is served, recorded in the `workers`
    /// table for service discovery (the caller runs the server).
    pub metrics_addr: Option<String>,
}

impl Default for WorkerConfig {
    fn default() -> WorkerConfig {
        WorkerConfig {
            id: None,
            concurrency: 1,
            lease: Duration::from_secs(30),
            timeout: None,
            follow: false,
            drain_timeout: Duration::from_secs(30),
            backoff: Backoff::default(),
            idle_poll: Duration::from_millis(4),
            watch_commits: true,
            sweep_interval: Duration::from_secs(10),
            metrics_addr: None,
        }
    }
}

/// What one worker did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct WorkerReport {
    pub id: String,
    pub done: u64,
    pub retried: u64,
    pub failed: u64,
    /// Outcomes dropped because the lease had been taken away.
    pub lost: u64,
    /// Items handed back unfinished: at shutdown, or claimed ahead and
    /// left waiting [`HOLD_LIMIT`] while the running ones took long.
    pub released: u64,
}

/// A fresh identity for one process start: host, pid and 48 random bits,
/// so a restarted worker (even one that got the same pid) is never taken
/// for the one that died.
pub fn new_worker_id() -> String {
    format!(
        "{}-{}-{:012x}",
        host_name(),
        std::process::id(),
        fastrand::u64(..) >> 16
    )
}

/// This machine's host name, or "localhost" if it has none.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(s) if r == 0 && !s.is_empty() => s.to_string(),
        _ => "localhost".to_string(),
    }
}

/// How others reach `addr`: a wildcard address is replaced by the host
/// name.
pub fn advertised(addr: std::net::SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("{}:{}", host_name(), addr.port())
    } else {
        addr.to_string()
    }
}

/// A worker process's loop; see the module doc.
pub struct Worker {
    queue: Queue,
    config: WorkerConfig,
    handler: Arc<dyn Handler>,
    id: String,
    metrics: Arc<WorkerMetrics>,
    claim_latency: Arc<Histogram>,
}

struct InFlight {
    job: Job,
    cancel: Arc<Cancel>,
    claimed: Instant,
}

/// An executor's report. The lease token is part of the key: after a lost
/// lease the same item may be claimed again by this very worker, and the
/// old run's outcome must not land on the new lease.
struct Finished {
    id: i64,
    token: i64,
    outcome: Outcome,
}

/// Where executors leave outcomes. An executor wakes the database thread
/// only when the outbox holds `wake_at` outcomes, a threshold the database
/// thread sets before it sleeps.
struct Outbox {
    items: Mutex<Vec<Finished>>,
    wake_at: AtomicUsize,
    wake: Sender<()>,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Finished>> {
        // Pushing a value cannot leave the vector half-changed.
        self.items
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push(&self, f: Finished) {
        let waiting = {
            let mut items = self.lock();
            items.push(f);
            items.len()
        };
        // Read after the push: a threshold lowered before the database
        // thread looked at the outbox is seen here, so no wake-up is lost.
        if waiting >= self.wake_at.load(Ordering::SeqCst) {
            let _ = self.wake.try_send(());
        }
    }

    fn take(&self) -> Vec<Finished> {
        std::mem::take(&mut *self.lock())
    }
}

/// How far ahead a worker claims: items its executors finish in this long.
pub const HORIZON: Duration = Duration::from_millis(20);
/// The most items one worker holds, running and waiting, at once.
const MAX_DEPTH: usize = 2048;
/// Longest an outcome waits for a turn when no other reason for one comes.
pub const FLUSH_AFTER: Duration = Duration::from_millis(5);
/// How often the finish rate behind `depth` is measured.
const RATE_WINDOW: Duration = Duration::from_millis(25);
/// A claimed item that waited this long for an executor goes back to the
/// queue: the work became slower than the batch was sized for, and other
/// workers may be idle.
pub const HOLD_LIMIT: Duration = Duration::from_secs(1);

impl Worker {
    pub fn new(queue: Queue, config: WorkerConfig, handler: impl Handler) -> Worker {
        let id = config.id.clone().unwrap_or_else(new_worker_id);
        Worker {
            queue,
            config,
            handler: Arc::new(handler),
            id,
            metrics: Arc::new(WorkerMetrics::new()),
            claim_latency: Arc::new(Histogram::new()),
        }
    }

    /// This worker's metrics, to serve with [`crate::metrics::Exporter`].
    pub fn metrics(&self) -> Arc<WorkerMetrics> {
        self.metrics.clone()
    }

    /// How long each turn that claimed took, lock wait included.
    pub fn claim_latency(&self) -> Arc<Histogram> {
        self.claim_latency.clone()
    }

    /// Records where this worker's metrics are served, for discovery.
    pub fn advertise_metrics(&mut self, addr: std::net::SocketAddr) {
        self.config.metrics_addr = Some(advertised(addr));
    }

    /// This worker's identity, as registered and as written in its leases.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Runs until the queue is drained (or, with `follow`, until stopped).
    ///
    /// A message on `stop` starts a graceful stop: no more claims, running
    /// items get `drain_timeout` to finish, then they are cancelled and
    /// released with their attempt given back. A second message skips the
    /// wait. A disconnected `stop` never stops the worker.
    pub fn run(self, stop: Receiver<()>) -> Result<WorkerReport> {
        let mut session = self.queue.session()?;
        session.register_worker(&WorkerInfo {
            id: self.id.clone(),
            pid: std::process::id(),
            host: host_name(),
            metrics_addr: self.config.metrics_addr.clone(),
        })?;
        info!(worker = %self.id, concurrency = self.config.concurrency, "worker started");

        let k = self.config.concurrency.max(1);
        let (job_tx, job_rx) = crossbeam_channel::bounded::<(Job, Arc<Cancel>)>(MAX_DEPTH + k);
        let (wake_tx, wake) = crossbeam_channel::bounded::<()>(1);
        let outbox = Arc::new(Outbox {
            items: Mutex::new(Vec::new()),
            wake_at: AtomicUsize::new(1),
            wake: wake_tx,
        });
        // What the executors run, in a file that outlives this process:
        // if it dies, only those items are charged an attempt.
        let limit = crate::queue::busy::limit();
        let slots = match RunningSlots::create(self.queue.path(), &self.id, k, limit) {
            Ok(s) => Some(Arc::new(s)),
            Err(error) => {
                warn!(
                    worker = %self.id, %error,
                    "cannot record running items beside the database; if this worker dies, \
                     every item it holds is charged an attempt"
                );
                None
            }
        };
        let executors: Vec<JoinHandle<()>> = (0..k)
            .map(|n| {
                spawn_executor(Executor {
                    slot: n,
                    handler: self.handler.clone(),
                    jobs: job_rx.clone(),
                    outbox: outbox.clone(),
                    slots: slots.clone(),
                })
            })
            .collect::<std::io::Result<_>>()
            .map_err(|e| Error::Start(format!("cannot start executor threads: {e}")))?;

        let watch = if self.config.watch_commits {
            match CommitWatch::start(self.queue.path()) {
                Ok(w) => Some(w),
                Err(error) => {
                    warn!(
                        worker = %self.id, %error,
                        "cannot watch the database for commits; polling for new items instead"
                    );
                    None
                }
            }
        } else {
            None
        };
        let commits = watch
            .as_ref()
            .map_or_else(crossbeam_channel::never, |w| w.events().clone());
        let mut state = Loop {
            cfg: &self.config,
            slots: slots.clone(),
            metrics: &self.metrics,
            claim_latency: &self.claim_latency,
            id: &self.id,
            session: &mut session,
            job_tx: Some(job_tx),
            job_rx,
            outbox,
            wake,
            stop,
            in_flight: HashMap::new(),
            finished: Vec::new(),
            finished_since: None,
            depth: k,
            rate: 0.0,
            rate_since: Instant::now(),
            rate_count: 0,
            report: WorkerReport {
                id: self.id.clone(),
                ..WorkerReport::default()
            },
            stopping: None,
            cancelled_all: None,
            last_hand_back: Instant::now(),
            idle: None,
            poll: MIN_POLL,
            watch,
            commits,
            watching: false,
            arm_failed: false,
            woken: None,
            prompted: false,
            last_check: Instant::now(),
            gap: AFTER_COMMIT_POLL,
            recheck: false,
            last_heartbeat: Instant::now(),
            last_sweep: None,
            trouble: None,
            forced: false,
        };
        let result = state.run();
        if result.is_err() {
            state.bail();
        }
        let abandoned = !state.in_flight.is_empty();
        // Outcomes (releases included) that never reached the database: the
        // leases are still ours there.
        let unrecorded = state.finished.len();
        let trouble = state.trouble.as_ref().map(|t| t.last.clone());
        let report = state.report.clone();
        drop(state);
        if !abandoned {
            for handle in executors {
                let _ = handle.join();
            }
        }
        let stopped = session.worker_stopped(&self.id);
        if unrecorded == 0 {
            // Nothing of ours runs any more (threads left behind by
            // `abandon` had their items released): the file has served.
            crate::queue::running::remove_slots(self.queue.path(), &self.id);
        } else if let Some(slots) = &slots {
            // Without it, whoever requeues the leases would charge each an
            // attempt as if it had been running.
            slots.keep();
        }
        result?;
        if unrecorded > 0 {
            // Not a clean exit: a supervisor takes the leases back at once
            // instead of waiting for them to expire.
            return Err(Error::Unrecorded {
                outcomes: unrecorded,
                cause: trouble.unwrap_or_else(|| "the database refused the releases".into()),
            });
        }
        stopped?;
        info!(
            worker = %self.id, done = report.done, retried = report.retried,
            failed = report.failed, lost = report.lost, released = report.released,
            "worker stopped"
        );
        Ok(report)
    }
}

const MIN_POLL: Duration = Duration::from_millis(1);
/// The first pause between checks after the commit watch fired: the
/// commit is published a few microseconds after the write that fired it.
const AFTER_COMMIT_POLL: Duration = Duration::from_micros(100);
/// With a [`CommitWatch`] armed, the longest pause between idle checks:
/// a safety net for file systems that report no writes.
pub const WATCHED_POLL: Duration = Duration::from_secs(1);
/// A watch that fires this long (or `idle_poll`, if longer) after the last
/// check starts a new burst: the pause before checking goes back to
/// [`AFTER_COMMIT_POLL`]. Inside a burst (a transaction that writes as it
/// goes fires the watch again at every check) the pause doubles up to
/// `idle_poll`.
const QUIET: Duration = Duration::from_millis(50);
/// A check that sees another commit within this long of the watch firing
/// counts as a wake-up by the watch in `litework_commit_wakeups_total`.
const WOKEN_FOR: Duration = Duration::from_secs(1);
/// After cancelling everything at shutdown, how long to wait for handlers
/// that ignore their [`Cancel`] before releasing their items anyway.
const ABANDON_AFTER: Duration = Duration::from_secs(5);

/// One executor thread's share of the worker.
struct Executor {
    slot: usize,
    handler: Arc<dyn Handler>,
    jobs: Receiver<(Job, Arc<Cancel>)>,
    outbox: Arc<Outbox>,
    slots: Option<Arc<RunningSlots>>,
}

fn spawn_executor(ex: Executor) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("executor-{}", ex.slot))
        .spawn(move || {
            for (job, cancel) in ex.jobs.iter() {
                let outcome = if cancel.is_cancelled() {
                    // Shut down or lost while it waited: the reason decides
                    // what is recorded, and the handler never runs.
                    Outcome::Retry("cancelled before it started".into())
                } else {
                    if let Some(s) = &ex.slots {
                        s.set(ex.slot, job.id, job.token);
                    }
                    cancel.mark_started();
                    let outcome = run_handler(&*ex.handler, &job, &cancel);
                    if let Some(s) = &ex.slots {
                        s.clear(ex.slot);
                    }
                    outcome
                };
                ex.outbox.push(Finished {
                    id: job.id,
                    token: job.token,
                    outcome,
                });
            }
        })
}

/// Runs the handler; a panic is a failure worth retrying.
fn run_handler(handler: &dyn Handler, job: &Job, cancel: &Cancel) -> Outcome {
    catch_unwind(AssertUnwindSafe(|| handler.handle(job, cancel))).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Outcome::Retry(format!("handler panicked: {msg}"))
    })
}

/// The database thread's state between turns.
struct Loop<'a> {
    cfg: &'a WorkerConfig,
    /// The running file, which also shows when this worker is in a write.
    slots: Option<Arc<RunningSlots>>,
    metrics: &'a WorkerMetrics,
    claim_latency: &'a Histogram,
    id: &'a str,
    session: &'a mut Session,
    job_tx: Option<Sender<(Job, Arc<Cancel>)>>,
    job_rx: Receiver<(Job, Arc<Cancel>)>,
    outbox: Arc<Outbox>,
    wake: Receiver<()>,
    stop: Receiver<()>,
    /// Held items (running or waiting for an executor) by `(id, lease
    /// token)`.
    in_flight: HashMap<(i64, i64), InFlight>,
    /// Outcomes waiting for the next turn, and since when.
    finished: Vec<(Job, Completion)>,
    finished_since: Option<Instant>,
    /// How many items to hold; see the module doc.
    depth: usize,
    /// Outcomes per second, smoothed, and the window being counted.
    rate: f64,
    rate_since: Instant,
    rate_count: u64,
    report: WorkerReport,
    /// Set by the first stop signal: the drain deadline.
    stopping: Option<Instant>,
    /// When every running item was cancelled for shutdown.
    cancelled_all: Option<Instant>,
    /// When held items were last checked by `hand_back_stale`.
    last_hand_back: Instant,
    /// Set when a claim found less than it asked for.
    idle: Option<Idle>,
    poll: Duration,
    watch: Option<CommitWatch>,
    /// The watch's messages, or `never` without one.
    commits: Receiver<()>,
    /// Whether the watch could be armed when idleness was last checked.
    watching: bool,
    /// Arming failed last time (logged once until it works again).
    arm_failed: bool,
    /// When the watch last fired, if no check has seen `data_version` move
    /// since.
    woken: Option<Instant>,
    /// The watch fired since the last check.
    prompted: bool,
    /// When idleness was last checked, and how long after that a fired
    /// watch waits before the next check.
    last_check: Instant,
    gap: Duration,
    /// Check idleness at once: the watch was not armed when the last claim
    /// committed.
    recheck: bool,
    last_heartbeat: Instant,
    last_sweep: Option<Instant>,
    /// A transient database error being waited out.
    trouble: Option<Trouble>,
    /// A second stop signal arrived.
    forced: bool,
}

struct Trouble {
    since: Instant,
    failures: u64,
    logged: Instant,
    last: String,
    /// No write is tried before this.
    retry_at: Instant,
}

/// What the last claim that came up short (or the last look since) saw.
struct Idle {
    data_version: i64,
    next_ready_at: Option<i64>,
}

impl Loop<'_> {
    fn run(&mut self) -> Result<()> {
        loop {
            self.collect();
            self.enforce_deadlines();
            self.hand_back_stale();

            let held = self.in_flight.len();
            // An executor may be idle, or about to be.
            let starving = held < self.executors();
            let refill = held <= self.depth / 2;
            let free = self.free_slots();
            let want = if self.stopping.is_none()
                && free > 0
                && (starving || refill)
                && self.maybe_ready()?
            {
                free
            } else {
                0
            };
            let flush = !self.finished.is_empty()
                && (starving
                    || self.stopping.is_some()
                    || self.finished.len() >= (self.depth / 2).max(1)
                    || self
                        .finished_since
                        .is_some_and(|t| t.elapsed() >= FLUSH_AFTER));
            // After a failure a try is due at `retry_at`: with nothing else
            // to write, a heartbeat tells whether the database came back.
            let probe = self.trouble.is_some();
            let beat = self.last_heartbeat.elapsed() >= self.cfg.lease / 3 || probe;
            let may_write = self
                .trouble
                .as_ref()
                .is_none_or(|t| Instant::now() >= t.retry_at);
            if (flush || want > 0 || beat) && may_write {
                self.turn(want, beat)?;
            }
            if self.trouble.is_none() && self.sweep_due() {
                self.sweep()?;
            }

            // Told twice to stop while the database refuses writes: waiting
            // for it could take forever.
            if let (true, Some(t)) = (self.forced, &self.trouble) {
                return Err(Error::Unrecorded {
                    outcomes: self.finished.len() + self.in_flight.len(),
                    cause: t.last.clone(),
                });
            }
            if self.in_flight.is_empty() && self.finished.is_empty() {
                if self.stopping.is_some() {
                    return Ok(());
                }
                if !self.cfg.follow && self.idle.is_some() && self.trouble.is_none() {
                    let (pending, running) = self.session.open_counts()?;
                    if pending == 0 && running == 0 {
                        debug!(worker = %self.id, "queue drained");
                        return Ok(());
                    }
                }
            }
            if self.abandon_due() {
                self.abandon();
                return Ok(());
            }
            self.wait();
        }
    }

    /// Releases the claimed items that waited [`HOLD_LIMIT`] without an
    /// executor (their attempt is given back). Looked at every tenth of
    /// the limit at most.
    fn hand_back_stale(&mut self) {
        if self.stopping.is_some()
            || self.in_flight.len() <= self.executors()
            || self.last_hand_back.elapsed() < HOLD_LIMIT / 10
        {
            return;
        }
        self.last_hand_back = Instant::now();
        let stale =
            |f: &InFlight| f.cancel.started().is_none() && f.claimed.elapsed() >= HOLD_LIMIT;
        if !self.in_flight.values().any(stale) {
            return;
        }
        let mut waiting = Vec::new();
        while let Ok(queued) = self.job_rx.try_recv() {
            waiting.push(queued);
        }
        let mut released = 0;
        for (job, cancel) in waiting {
            let key = (job.id, job.token);
            if self.in_flight.get(&key).is_some_and(stale) {
                self.in_flight.remove(&key);
                self.push_finished(job, Completion::Release);
                released += 1;
            } else if let Some(tx) = &self.job_tx {
                if let Err(e) = tx.send((job, cancel)) {
                    let (job, _) = e.into_inner();
                    self.in_flight.remove(&key);
                    self.push_finished(job, Completion::Release);
                }
            }
        }
        debug!(worker = %self.id, released, "handed back items that waited too long");
        // Items got slow: hold no more than the executors until the
        // measured rate says otherwise. The rate is measured afresh: the
        // fast stretch behind it would raise the depth again at once, and
        // the items just handed back would be claimed ahead again.
        self.depth = self.executors();
        self.rate = 0.0;
        self.rate_count = 0;
        self.rate_since = Instant::now();
    }

    fn executors(&self) -> usize {
        self.cfg.concurrency.max(1)
    }

    fn free_slots(&self) -> usize {
        self.depth.saturating_sub(self.in_flight.len())
    }

    /// Takes what the executors left in the outbox.
    fn collect(&mut self) {
        for f in self.outbox.take() {
            self.finish(f);
        }
    }

    /// Sets `depth` from the rate at which outcomes are recorded.
    fn adapt(&mut self, recorded: usize) {
        self.rate_count += recorded as u64;
        let window = self.rate_since.elapsed();
        if window < RATE_WINDOW {
            return;
        }
        let now = self.rate_count as f64 / window.as_secs_f64();
        self.rate = if self.rate == 0.0 {
            now
        } else {
            0.5 * self.rate + 0.5 * now
        };
        self.rate_since = Instant::now();
        self.rate_count = 0;
        let ahead = (self.rate * HORIZON.as_secs_f64()) as usize;
        let k = self.executors();
        self.depth = (k + ahead).clamp(k, MAX_DEPTH);
    }

    /// Whether a claim might find something, without taking the write lock.
    /// A transient read error counts as trouble, and the claim is tried
    /// once it has been waited out.
    fn maybe_ready(&mut self) -> Result<bool> {
        let Some(idle) = &self.idle else {
            return Ok(true);
        };
        if idle.next_ready_at.is_some_and(|at| at <= now_ms()) {
            return Ok(true);
        }
        let seen = idle.data_version;
        // Armed before the read, so a commit after the read fires it.
        self.arm();
        self.last_check = Instant::now();
        let prompted = std::mem::take(&mut self.prompted);
        let now_at = match self.session.data_version() {
            Ok(v) => v,
            Err(e) => return self.unsure(e),
        };
        if now_at == seen {
            if prompted {
                // Woken by a write whose commit is not visible (yet, or
                // ever: a long transaction writing as it goes): the next
                // wake-up in this burst waits longer.
                self.gap = (self.gap * 2).min(self.cfg.idle_poll.max(AFTER_COMMIT_POLL));
            }
            return Ok(false);
        }
        if self.woken.take().is_some_and(|at| at.elapsed() < WOKEN_FOR) {
            self.metrics.commit_wakeups.inc();
        }
        self.gap = AFTER_COMMIT_POLL;
        // Another connection committed: whatever it was, look before
        // taking the write lock.
        let seen = match self.session.look() {
            Ok(seen) => seen,
            Err(e) => return self.unsure(e),
        };
        if seen.ready || seen.next_ready_at.is_some_and(|at| at <= now_ms()) {
            // Not idle until a claim says so: should this claim not happen
            // (writes failing), the next round tries again.
            self.idle = None;
            return Ok(true);
        }
        self.idle = Some(Idle {
            data_version: seen.data_version,
            next_ready_at: seen.next_ready_at,
        });
        Ok(false)
    }

    /// A read for [`Self::maybe_ready`] failed: a transient error is waited
    /// out like a failed write, then the claim decides.
    fn unsure(&mut self, e: Error) -> Result<bool> {
        if !e.is_transient() {
            return Err(e);
        }
        self.troubled(&e);
        self.idle = None;
        Ok(true)
    }

    /// Arms the commit watch, remembering whether that worked. A failure
    /// is logged once, and so is the recovery.
    fn arm(&mut self) {
        let Some(w) = &self.watch else {
            self.watching = false;
            return;
        };
        match w.arm() {
            Ok(()) if !self.watching => {
                if self.arm_failed {
                    info!(worker = %self.id, "watching the database for commits again");
                }
                self.watching = true;
                self.arm_failed = false;
            }
            Ok(()) => {}
            Err(error) => {
                if !self.arm_failed {
                    warn!(
                        worker = %self.id, %error,
                        "cannot watch the database for commits; polling for new items"
                    );
                }
                self.watching = false;
                self.arm_failed = true;
            }
        }
    }

    fn turn(&mut self, want: usize, beat: bool) -> Result<()> {
        let extend: Vec<(i64, i64)> = if beat {
            self.in_flight.keys().copied().collect()
        } else {
            Vec::new()
        };
        let finished = std::mem::take(&mut self.finished);
        let waiting_since = self.finished_since.take();
        let turn = Turn {
            finished,
            extend,
            claim: want,
            heartbeat: beat,
        };
        let started = Instant::now();
        self.writing(true);
        let result = self.session.turn(self.id, self.cfg.lease, &turn);
        self.writing(false);
        let result = match result {
            Ok(r) => r,
            Err(e) => {
                self.finished = turn.finished;
                self.finished_since = waiting_since;
                if e.is_transient() {
                    self.troubled(&e);
                    return Ok(());
                }
                return Err(e);
            }
        };
        if let Some(t) = self.trouble.take() {
            let after = t.since.elapsed();
            info!(worker = %self.id, failures = t.failures, ?after, "database writable again");
        }
        if want > 0 {
            let took = started.elapsed();
            self.claim_latency.record(took);
            self.metrics.claim_seconds.observe(took.as_secs_f64());
            self.metrics.claimed.inc_by(result.claimed.len() as u64);
        }
        if beat {
            self.last_heartbeat = Instant::now();
            let kept = turn.extend.len().saturating_sub(result.lost.len());
            self.metrics.leases_extended.inc_by(kept as u64);
        }
        for ((job, completion), (_, recorded)) in turn.finished.iter().zip(&result.recorded) {
            self.count(job, completion, *recorded);
        }
        let outcomes = turn
            .finished
            .iter()
            .filter(|(_, c)| !matches!(c, Completion::Release))
            .count();
        self.adapt(outcomes);
        for key in &result.lost {
            if let Some(f) = self.in_flight.get(key) {
                let item = key.0;
                warn!(worker = %self.id, item, "lease lost while running; stopping the item");
                f.cancel.cancel(CancelReason::LeaseLost);
            }
        }
        if !result.claimed.is_empty() {
            self.poll = MIN_POLL;
        }
        // Held before anything else can fail: a claimed item must be in
        // `in_flight` to be run or released.
        for job in result.claimed {
            self.dispatch(job);
        }
        if let Some(seen) = result.short {
            self.idle = Some(Idle {
                data_version: seen.data_version,
                next_ready_at: seen.next_ready_at,
            });
            // A commit between ours and arming the watch would be missed
            // until the next timer: check at once (that arms it first).
            self.recheck = true;
        } else if want > 0 {
            self.idle = None;
        }
        Ok(())
    }

    /// Counts a recorded outcome. An item this worker sent back to pending
    /// may be ready before anything else commits (our own commits do not
    /// move `data_version`): a retry brings the idle wake-up forward to its
    /// `run_after`, a release drops the idle state so the next turn claims.
    fn count(&mut self, job: &Job, completion: &Completion, recorded: Recorded) {
        if recorded == Recorded::LeaseLost {
            self.report.lost += 1;
            self.metrics.finished(Attempt::Lost);
            warn!(worker = %self.id, item = job.id, "lease lost; outcome dropped");
            return;
        }
        self.metrics.finished(outcome_of(completion));
        match completion {
            Completion::Done { .. } => self.report.done += 1,
            Completion::Failed { .. } => self.report.failed += 1,
            Completion::Retry { run_after, .. } => {
                self.report.retried += 1;
                // Ready at `run_after` (now, without backoff): an idle
                // worker wakes for it then, though no other commit came.
                if let Some(idle) = &mut self.idle {
                    let due = *run_after;
                    idle.next_ready_at = Some(idle.next_ready_at.map_or(due, |at| at.min(due)));
                }
            }
            Completion::Release => {
                self.report.released += 1;
                self.idle = None;
            }
        }
    }

    fn dispatch(&mut self, job: Job) {
        let cancel = Arc::new(Cancel {
            limit: self.cfg.timeout,
            ..Cancel::default()
        });
        let flight = InFlight {
            job: job.clone(),
            cancel: cancel.clone(),
            claimed: Instant::now(),
        };
        self.in_flight.insert((job.id, job.token), flight);
        debug!(worker = %self.id, item = job.id, attempt = job.attempt, "claimed");
        if let Some(tx) = &self.job_tx {
            // The channel holds more than MAX_DEPTH jobs and we never hold
            // more, so this does not block.
            if let Err(e) = tx.send((job, cancel)) {
                let (job, _) = e.into_inner();
                self.in_flight.remove(&(job.id, job.token));
                self.push_finished(job, Completion::Release);
            }
        }
    }

    /// Turns an executor's report into the completion to record.
    fn finish(&mut self, f: Finished) {
        let Some(flight) = self.in_flight.remove(&(f.id, f.token)) else {
            return;
        };
        let job = flight.job;
        let elapsed = flight
            .cancel
            .started()
            .map_or(Duration::ZERO, |at| at.elapsed());
        let completion = match (flight.cancel.reason(), f.outcome) {
            (Some(CancelReason::LeaseLost), _) => {
                self.report.lost += 1;
                self.metrics.finished(Attempt::Lost);
                self.metrics.observe(Attempt::Lost, elapsed.as_secs_f64());
                return;
            }
            // It finished before the kill landed: keep the result.
            (_, Outcome::Done(result)) => Completion::Done { result },
            (Some(CancelReason::Shutdown), _) => Completion::Release,
            (Some(CancelReason::Timeout), outcome) => {
                let limit = self.cfg.timeout.unwrap_or(elapsed);
                let mut error = format!("timed out after {}", humantime::format_duration(limit));
                if let Outcome::Retry(e) | Outcome::Fail(e) = outcome {
                    error = format!("{error} ({e})");
                }
                self.cfg
                    .backoff
                    .completion(&job, error, FailureKind::Timeout)
            }
            (None, Outcome::Retry(error)) => {
                self.cfg.backoff.completion(&job, error, FailureKind::Error)
            }
            (None, Outcome::Fail(error)) => Completion::Failed {
                error,
                kind: FailureKind::Permanent,
            },
        };
        let seconds = elapsed.as_secs_f64();
        self.metrics.observe(outcome_of(&completion), seconds);
        let (item, attempt) = (job.id, job.attempt);
        match &completion {
            Completion::Retry { error, .. } => {
                warn!(worker = %self.id, item, attempt, %error, "item failed, will retry")
            }
            Completion::Failed { error, .. } => {
                warn!(worker = %self.id, item, attempt, %error, "item failed")
            }
            _ => debug!(worker = %self.id, item, ?elapsed, "item finished"),
        }
        self.push_finished(job, completion);
    }

    fn push_finished(&mut self, job: Job, completion: Completion) {
        self.finished_since.get_or_insert_with(Instant::now);
        self.finished.push((job, completion));
    }

    fn enforce_deadlines(&mut self) {
        if let Some(limit) = self.cfg.timeout {
            let now = Instant::now();
            for f in self.in_flight.values() {
                let late = f.cancel.started().is_some_and(|at| now >= at + limit);
                if late && !f.cancel.is_cancelled() {
                    f.cancel.cancel(CancelReason::Timeout);
                }
            }
        }
        if self.stopping.is_some_and(|d| Instant::now() >= d) && self.cancelled_all.is_none() {
            self.cancel_all();
        }
    }

    fn cancel_all(&mut self) {
        if !self.in_flight.is_empty() {
            let items = self.in_flight.len();
            info!(worker = %self.id, items, "stopping running items");
        }
        for f in self.in_flight.values() {
            f.cancel.cancel(CancelReason::Shutdown);
        }
        self.cancelled_all.get_or_insert_with(Instant::now);
    }

    fn begin_stop(&mut self) {
        if self.stopping.is_some() {
            self.forced = true;
            info!(worker = %self.id, "second stop signal");
            self.cancel_all();
            return;
        }
        let running = self.in_flight.len();
        info!(worker = %self.id, running, "stopping: no new claims, draining");
        self.stopping = Some(Instant::now() + self.cfg.drain_timeout);
        // Jobs claimed but not yet picked up by an executor go back at once.
        while let Ok((job, _)) = self.job_rx.try_recv() {
            self.in_flight.remove(&(job.id, job.token));
            self.push_finished(job, Completion::Release);
        }
    }

    fn abandon_due(&self) -> bool {
        let late = self
            .cancelled_all
            .is_some_and(|at| at.elapsed() >= ABANDON_AFTER);
        late && !self.in_flight.is_empty()
    }

    /// Releases items whose handler ignored cancellation; their threads are
    /// left behind and end with the process. Best effort: if the database
    /// refuses, the leases expire and a sweep takes them back.
    fn abandon(&mut self) {
        // Outcomes already posted are kept, not turned into releases.
        self.collect();
        let items = self.in_flight.len();
        warn!(worker = %self.id, items, "handlers ignored cancellation; releasing their items");
        let held: Vec<Job> = self.in_flight.values().map(|f| f.job.clone()).collect();
        for job in held {
            self.push_finished(job, Completion::Release);
        }
        self.job_tx = None;
        let _ = self.turn(0, false);
        if !self.finished.is_empty() {
            warn!(worker = %self.id, "could not release the items; their leases will expire");
        }
    }

    /// After a database error the loop cannot go on: stop the items, give
    /// them a moment, and try once to record what finished and release the
    /// rest, so that nothing waits for a lease to expire.
    fn bail(&mut self) {
        self.cancel_all();
        let until = Instant::now() + ABANDON_AFTER;
        self.outbox.wake_at.store(1, Ordering::SeqCst);
        loop {
            self.collect();
            if self.in_flight.is_empty() {
                break;
            }
            let left = until.saturating_duration_since(Instant::now());
            if self.wake.recv_timeout(left).is_err() {
                break;
            }
        }
        self.abandon();
    }

    fn sweep_due(&self) -> bool {
        self.last_sweep
            .is_none_or(|at| at.elapsed() >= self.cfg.sweep_interval)
    }

    /// Shows in the running file that this worker is in a write (or no
    /// longer is): while it waits for the lock it cannot extend its leases,
    /// and a sweeper on this machine lets them be meanwhile.
    fn writing(&self, on: bool) {
        if let Some(slots) = &self.slots {
            slots.writing(on.then(now_ms));
        }
    }

    fn sweep(&mut self) -> Result<()> {
        self.last_sweep = Some(Instant::now());
        self.writing(true);
        let swept = self.session.requeue_expired();
        self.writing(false);
        match swept {
            Ok(moved) if moved.total() > 0 => {
                self.metrics.requeued_expired.inc_by(moved.total());
                let (pending, failed) = (moved.pending, moved.failed);
                info!(worker = %self.id, pending, failed, "requeued expired leases");
                self.idle = None;
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) if e.is_transient() => {
                self.troubled(&e);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn troubled(&mut self, e: &Error) {
        let now = Instant::now();
        let t = self.trouble.get_or_insert(Trouble {
            since: now,
            failures: 0,
            logged: now,
            last: String::new(),
            retry_at: now,
        });
        t.failures += 1;
        t.last = e.to_string();
        // 10 ms doubling to 1 s between tries: a full disk must not be
        // retried flat out.
        let backoff = Duration::from_millis(10 << t.failures.min(7).saturating_sub(1));
        t.retry_at = now + backoff.min(Duration::from_secs(1));
        // Logged on the first failure, then at most once a minute.
        if t.failures == 1 || t.logged.elapsed() >= Duration::from_secs(60) {
            t.logged = now;
            let failures = t.failures;
            warn!(worker = %self.id, error = %e, failures, "database busy or full; will retry");
        }
    }

    /// Sleeps until the executors have left enough outcomes for a turn, a
    /// stop signal, or the next deadline.
    fn wait(&mut self) {
        self.metrics.in_flight.set(self.in_flight.len() as i64);
        let held = self.in_flight.len();
        let k = self.executors();
        // Wake when an executor is about to go idle (held below K), when
        // held items fall to half of depth, or when enough outcomes for a
        // flush are waiting.
        let wake_at = if self.stopping.is_some() || held < k {
            1
        } else {
            (held + 1 - k)
                .min(held.saturating_sub(self.depth / 2))
                .min((self.depth / 2).saturating_sub(self.finished.len()))
                .max(1)
        };
        self.outbox.wake_at.store(wake_at, Ordering::SeqCst);
        // Anything left before the threshold was lowered would not wake us.
        if self.outbox.lock().len() >= wake_at {
            return;
        }

        let now = Instant::now();
        // While writes fail, nothing but the next try (and the deadlines
        // below) is worth waking for.
        let mut until = match &self.trouble {
            Some(t) => t.retry_at,
            None => self.last_heartbeat + self.cfg.lease / 3,
        };
        let mut consider = |t: Instant| until = until.min(t);
        if let Some(limit) = self.cfg.timeout {
            for f in self.in_flight.values() {
                // A cancelled item's deadline has done its work; waiting on
                // it again would spin until the item returns.
                if f.cancel.is_cancelled() {
                    continue;
                }
                match f.cancel.started() {
                    Some(at) => consider(at + limit),
                    // It may start while we sleep: look again soon.
                    None => consider(now + FLUSH_AFTER),
                }
            }
        }
        if let (Some(at), None) = (self.finished_since, &self.trouble) {
            consider(at + FLUSH_AFTER);
        }
        if let Some(d) = self.stopping {
            if self.cancelled_all.is_none() {
                consider(d);
            }
        }
        if let Some(at) = self.cancelled_all {
            consider(at + ABANDON_AFTER);
        }
        if self.stopping.is_none() && held > k {
            // Items claimed ahead wait for an executor: look for ones that
            // waited past HOLD_LIMIT as often as `hand_back_stale` looks,
            // or with slow items nothing would wake us before the next
            // heartbeat while other workers sit idle.
            consider(self.last_hand_back + HOLD_LIMIT / 10);
        }
        if self.trouble.is_none() {
            if let Some(at) = self.last_sweep {
                consider(at + self.cfg.sweep_interval);
            }
            let could_claim = held < k || held <= self.depth / 2;
            let may_claim = could_claim && self.free_slots() > 0 && self.stopping.is_none();
            if may_claim && self.idle.is_none() {
                // Not known to be idle (say an item of ours was released
                // since the last claim, and our own commits do not move
                // `data_version`): claim now rather than sleep until the
                // next heartbeat or sweep.
                consider(now);
            }
            if self.idle.is_some() && may_claim {
                // Idle: check again soon, backing off to `idle_poll` (or,
                // with the watch armed, to `WATCHED_POLL`: a commit wakes
                // us anyway), jittered so idle workers do not poll in
                // lockstep.
                let mut cap = self.cfg.idle_poll.max(MIN_POLL);
                if self.watching {
                    cap = cap.max(WATCHED_POLL);
                }
                self.poll = self.poll.min(cap);
                let jittered = self.poll.mul_f64(0.5 + fastrand::f64() / 2.0);
                consider(now + jittered);
                if std::mem::take(&mut self.recheck) {
                    consider(now);
                }
                self.poll = (self.poll * 2).min(cap);
                if let Some(at) = self.idle.as_ref().and_then(|i| i.next_ready_at) {
                    let ms = u64::try_from((at - now_ms()).max(0)).unwrap_or(0);
                    consider(now + Duration::from_millis(ms));
                }
            }
        }
        let mut deadline = until;
        loop {
            let mut again = false;
            let timeout = deadline.saturating_duration_since(Instant::now());
            select! {
                recv(self.wake) -> _ => self.collect(),
                recv(self.commits) -> msg => {
                    match msg {
                        // The commit that fired the watch is likely not
                        // visible yet: check, and again soon after. But
                        // no sooner than `gap` after the last check: a
                        // transaction that writes as it goes fires the
                        // watch again at every check.
                        Ok(()) => {
                            // Long after the last check: a new burst of
                            // writes (or one of our own commits), not
                            // the same slow transaction.
                            if self.last_check.elapsed() >= QUIET.max(self.cfg.idle_poll) {
                                self.gap = AFTER_COMMIT_POLL;
                            }
                            self.woken = Some(Instant::now());
                            self.prompted = true;
                            self.poll = self.gap;
                            let at = self.last_check + self.gap;
                            if at > Instant::now() {
                                deadline = deadline.min(at);
                                again = true;
                            }
                        }
                        Err(_) => {
                            warn!(
                                worker = %self.id,
                                "the commit watch stopped; polling for new items"
                            );
                            self.commits = crossbeam_channel::never();
                            self.watch = None;
                            self.watching = false;
                        }
                    }
                }
                recv(self.stop) -> msg => {
                    match msg {
                        Ok(()) => self.begin_stop(),
                        // Nobody can send a stop any more: never stop.
                        Err(_) => self.stop = crossbeam_channel::never(),
                    }
                }
                default(timeout) => {}
            }
            if !again {
                break;
            }
        }
    }
}

/// The metrics label of a completion.
fn outcome_of(c: &Completion) -> Attempt {
    match c {
        Completion::Done { .. } => Attempt::Done,
        Completion::Retry { .. } => Attempt::Retry,
        Completion::Failed { .. } => Attempt::Failed,
        Completion::Release => Attempt::Released,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{NewItem, Status};

    fn queue_with(n: usize) -> (tempfile::TempDir, Queue) {
        let dir = tempfile::tempdir().unwrap();
        let queue = Queue::create(dir.path().join("q.db")).unwrap();
        let items = (0..n).map(|i| Ok(NewItem::new(i.to_string())));
        queue.add(items, 2).unwrap();
        (dir, queue)
    }

    /// Handlers wait at a gate until the test opens it.
    #[derive(Clone, Default)]
    struct Gate(Arc<(Mutex<bool>, std::sync::Condvar)>);

    impl Gate {
        fn wait(&self) {
            let (open, cv) = &*self.0;
            let mut open = open.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
        }

        fn open(&self) {
            let (open, cv) = &*self.0;
            *open.lock().unwrap() = true;
            cv.notify_all();
        }
    }

    fn config(concurrency: usize) -> WorkerConfig {
        WorkerConfig {
            concurrency,
            backoff: Backoff {
                base: Duration::ZERO,
                max: Duration::ZERO,
            },
            ..WorkerConfig::default()
        }
    }

    #[test]
    fn closure_handler_runs_every_item_and_failures_retry_then_fail() {
        let (_dir, queue) = queue_with(200);
        let handler = |job: &Job, _: &Cancel| {
            let n: u32 = String::from_utf8_lossy(&job.payload).parse().unwrap_or(0);
            match n % 50 {
                0 => Outcome::Retry("even fifty".into()),
                1 => panic!("handler bug"),
                _ => Outcome::Done(format!("{}", n * 2).into_bytes()),
            }
        };
        let (_keep, stop) = crossbeam_channel::bounded(1);
        let report = Worker::new(queue.clone(), config(4), handler)
            .run(stop)
            .unwrap();
        assert_eq!((report.done, report.failed, report.retried), (192, 8, 8));
        let failed = queue
            .session()
            .unwrap()
            .list(Some(Status::Failed), None)
            .unwrap();
        assert!(failed
            .iter()
            .any(|r| r.last_error.as_deref() == Some("handler panicked: handler bug")));
        let status = queue.status().unwrap();
        assert_eq!((status.pending, status.running, status.workers), (0, 0, 0));
    }

    #[test]
    fn stop_drains_then_releases_items_whose_handler_honours_cancel() {
        let (_dir, queue) = queue_with(3);
        let (started_tx, started) = crossbeam_channel::unbounded();
        let handler = move |job: &Job, cancel: &Cancel| {
            let _ = started_tx.send(job.id);
            while !cancel.is_cancelled() {
                std::thread::park_timeout(Duration::from_millis(5));
            }
            Outcome::Retry("interrupted".into())
        };
        let cfg = WorkerConfig {
            drain_timeout: Duration::from_millis(100),
            ..config(2)
        };
        let (tx, stop) = crossbeam_channel::bounded(1);
        let worker = Worker::new(queue.clone(), cfg, handler);
        let run = std::thread::spawn(move || worker.run(stop));
        for _ in 0..2 {
            started.recv_timeout(Duration::from_secs(20)).unwrap();
        }
        tx.send(()).unwrap();
        let report = run.join().unwrap().unwrap();
        assert_eq!((report.done, report.released), (0, 2));
        let rows = queue.session().unwrap().list(None, None).unwrap();
        assert!(
            rows.iter()
                .all(|r| r.status == "pending" && r.attempts == 0),
            "{rows:?}"
        );
    }

    #[test]
    fn fast_items_are_claimed_in_batches_and_a_partly_failing_batch_is_recorded_once() {
        let (_dir, queue) = queue_with(5000);
        let runs = Arc::new(Mutex::new(HashMap::<i64, u32>::new()));
        let seen = runs.clone();
        let handler = move |job: &Job, _: &Cancel| {
            *seen.lock().unwrap().entry(job.id).or_default() += 1;
            let n: u32 = String::from_utf8_lossy(&job.payload).parse().unwrap_or(0);
            if n % 3 == 0 {
                Outcome::Fail(format!("{n} is a multiple of three"))
            } else {
                Outcome::Done(Vec::new())
            }
        };
        let (_keep, stop) = crossbeam_channel::bounded(1);
        let worker = Worker::new(queue.clone(), config(4), handler);
        let claims = worker.claim_latency();
        let report = worker.run(stop).unwrap();
        assert_eq!((report.done, report.failed, report.lost), (3333, 1667, 0));
        // Batches: far fewer claiming turns than items.
        let turns = claims.snapshot().count();
        assert!(turns < 5000 / 8, "{turns} claiming turns for 5000 items");
        let runs = runs.lock().unwrap();
        assert_eq!(runs.len(), 5000);
        assert!(runs.values().all(|&n| n == 1), "an item ran twice");
        let s = queue.status().unwrap();
        assert_eq!((s.done, s.failed, s.pending, s.running), (3333, 1667, 0, 0));
    }

    #[test]
    fn a_lease_lost_while_its_batch_runs_drops_only_that_outcome() {
        let (dir, queue) = queue_with(40);
        let gate = Gate::default();
        let (started_tx, started) = crossbeam_channel::unbounded();
        let held = gate.clone();
        let handler = move |job: &Job, _: &Cancel| {
            if job.id <= 4 {
                let _ = started_tx.send(job.id);
                held.wait();
            }
            Outcome::Done(Vec::new())
        };
        let (tx, stop) = crossbeam_channel::bounded(2);
        let worker = Worker::new(queue.clone(), config(4), handler);
        let run = std::thread::spawn(move || worker.run(stop));
        for _ in 0..4 {
            started.recv_timeout(Duration::from_secs(20)).unwrap();
        }
        // Item 2's lease passes to another worker while 1..=4 still run.
        let thief = rusqlite::Connection::open(dir.path().join("q.db")).unwrap();
        thief
            .execute(
                "UPDATE items SET lease_token = lease_token + 1, lease_owner = 'thief'
                 WHERE id = 2",
                [],
            )
            .unwrap();
        gate.open();
        let deadline = Instant::now() + Duration::from_secs(20);
        while queue.status().unwrap().done < 39 {
            assert!(Instant::now() < deadline, "39 items not done in 20 s");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Item 2 stays running under the thief, so the worker waits for
        // it: stop it.
        tx.send(()).unwrap();
        tx.send(()).unwrap();
        let report = run.join().unwrap().unwrap();
        assert_eq!((report.done, report.lost), (39, 1));
        let owner: String = thief
            .query_row("SELECT lease_owner FROM items WHERE id = 2", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(owner, "thief");
        let s = queue.status().unwrap();
        assert_eq!((s.done, s.running), (39, 1));
    }

    #[test]
    fn items_claimed_ahead_go_back_when_the_work_turns_slow() {
        // More slow items than the worker claims ahead: it is never idle.
        let (dir, queue) = queue_with(7000);
        let gate = Gate::default();
        let held = gate.clone();
        let handler = move |job: &Job, _: &Cancel| {
            if job.id > 2000 {
                held.wait();
            }
            Outcome::Done(Vec::new())
        };
        let (_keep, stop) = crossbeam_channel::bounded(1);
        // No heartbeat or sweep for an hour: the hand-back must not wait
        // for one to wake the worker.
        let config = WorkerConfig {
            lease: Duration::from_secs(3 * 3600),
            sweep_interval: Duration::from_secs(3600),
            ..config(1)
        };
        let worker = Worker::new(queue.clone(), config, handler);
        let run = std::thread::spawn(move || worker.run(stop));
        // The fast items grew the batch, so the slow ones were claimed
        // ahead; stuck behind the one running, they must be handed back
        // within about HOLD_LIMIT.
        let watch = rusqlite::Connection::open(dir.path().join("q.db")).unwrap();
        let slow = || -> (i64, i64) {
            watch
                .query_row(
                    "SELECT count(*) FILTER (WHERE status = 'pending'),
                            count(*) FILTER (WHERE status = 'running')
                     FROM items WHERE id > 2000",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap()
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut claimed_ahead = false;
        loop {
            let (pending, running) = slow();
            claimed_ahead |= running >= 10;
            if claimed_ahead && running <= 2 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "claimed ahead: {claimed_ahead}; {pending} pending, {running} running"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        gate.open();
        let report = run.join().unwrap().unwrap();
        assert_eq!(report.done, 7000);
        assert!(report.released > 0, "{report:?}");
        // A handed-back item got its attempt back.
        let most: i64 = watch
            .query_row("SELECT max(attempts) FROM items", [], |r| r.get(0))
            .unwrap();
        assert_eq!(most, 1);
    }
}
