//! `litework run`: a thin supervisor over N worker processes.
//!
//! The supervisor owns no item state. It starts workers (the `litework`
//! executable itself), learns about them only from their exit status and
//! the database, and keeps three promises:
//!
//! 1. A worker that dies abnormally has its leases requeued at once, under
//!    the identity the supervisor gave it, and is restarted with backoff.
//!    A slot whose worker keeps dying without recording a single outcome
//!    is crash-looping: its restarts back off further and, if every slot
//!    is crash-looping, the run stops with an error instead of spinning.
//! 2. Expired leases are swept every `sweep_interval`: the safety net for
//!    deaths nobody saw.
//! 3. Workers do not outlive the supervisor. Each worker's standard input
//!    is a pipe whose write end only the supervisor holds; when the
//!    supervisor dies, however it dies, the kernel closes it and the worker
//!    reads end-of-file, stops its items and releases their leases at
//!    once. (A parent-death signal would do less: on Linux it fires when
//!    the *thread* that spawned the child exits, and a worker killed by it
//!    could not release its leases.)
//!
//! Workers run in their own process group, so a Ctrl-C at the terminal
//! reaches only the supervisor, which forwards one SIGTERM per Ctrl-C:
//! the first makes workers drain, the second makes them stop now.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use tracing::{error, info, warn};

use crate::error::{Error, Result};
use crate::metrics::{RequeueCause, SupervisorMetrics};
use crate::queue::{now_ms, Backoff, Queue, Requeued, Session, StatusReport};

/// Consecutive crashes without a recorded outcome that make a slot
/// crash-looping.
pub const CRASH_LOOP: u32 = 5;

/// How the supervisor runs its workers.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// The `litework` executable to start workers from.
    pub exe: PathBuf,
    /// Arguments before the `worker` verb (`--db`, logging options).
    pub global_args: Vec<OsString>,
    /// Arguments after `worker` (its options, `--`, the command).
    pub worker_args: Vec<OsString>,
    /// Worker processes to keep running.
    pub workers: usize,
    /// How often to requeue expired leases.
    pub sweep_interval: Duration,
    /// After the first stop signal, how long workers get to drain before
    /// they are told to stop now; they are killed if still there 10 s later.
    pub drain_timeout: Duration,
    /// Delay between restarts of a slot that crashed without progress.
    pub restart_backoff: Backoff,
    /// Keep running (and restarting workers) when the queue drains.
    pub follow: bool,
}

/// What a run did, for the summary.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunSummary {
    /// Counts at the end.
    pub status: StatusReport,
    /// Items that ended done or failed during this run.
    pub finished: u64,
    /// Failed or lost attempts during this run.
    pub retries: u64,
    pub restarts: u64,
    pub wall_s: f64,
    /// Stopped by a signal before the queue drained.
    pub interrupted: bool,
}

enum SlotState {
    Running {
        child: Child,
        /// Held only to be closed: see the module doc, promise 3.
        _lifeline: Option<ChildStdin>,
    },
    Waiting {
        until: Instant,
    },
    Finished,
}

struct Slot {
    n: usize,
    id: String,
    state: SlotState,
    /// Crashes in a row without a single recorded outcome.
    fruitless: u32,
}

/// The longest the supervisor's loop sleeps: progress is reported and the
/// sweep and stop deadlines are looked at this often.
const TICK: Duration = Duration::from_millis(200);

/// The supervisor; see the module doc.
pub struct Supervisor {
    queue: Queue,
    config: SupervisorConfig,
    metrics: Arc<SupervisorMetrics>,
    /// A message for every worker that exited, so that the loop reaps it
    /// (and takes its leases back) at once instead of at the next tick.
    exited_tx: Sender<()>,
    exited: Receiver<()>,
}

impl Supervisor {
    pub fn new(queue: Queue, config: SupervisorConfig) -> Supervisor {
        let metrics = Arc::new(SupervisorMetrics::new(queue.clone()));
        let (exited_tx, exited) = crossbeam_channel::unbounded();
        Supervisor {
            queue,
            config,
            metrics,
            exited_tx,
            exited,
        }
    }

    /// The supervisor's metrics, to serve with [`crate::metrics::Exporter`].
    pub fn metrics(&self) -> Arc<SupervisorMetrics> {
        self.metrics.clone()
    }

    /// Runs workers until the queue drains (or, with `follow`, until
    /// stopped). `progress` is called at least five times a second with the
    /// queue's counts. The first message on `stop` drains, the second stops
    /// now.
    pub fn run(
        self,
        stop: Receiver<()>,
        progress: &mut dyn FnMut(&StatusReport),
    ) -> Result<RunSummary> {
        let started = Instant::now();
        let started_ms = now_ms();
        let mut session = self.queue.session()?;
        let before = session.status()?;
        let mut slots: Vec<Slot> = (0..self.config.workers.max(1))
            .map(|n| Slot {
                n,
                id: String::new(),
                state: SlotState::Finished,
                fruitless: 0,
            })
            .collect();
        let mut restarts = 0u64;
        let mut stops = 0u32;
        let mut stop_began: Option<Instant> = None;
        let mut last_sweep = Instant::now();
        let mut stop = stop;
        let mut fatal: Option<Error> = None;
        // Dead workers whose leases could not be requeued yet (the
        // database refused a write): retried every turn.
        let mut unrequeued: Vec<String> = Vec::new();
        let mut last_status = before.clone();

        // Leases left by an earlier run that died are expired or about to
        // be; take back the expired ones before starting.
        let swept = transient_ok(session.requeue_expired(), Requeued::default())?;
        if swept.total() > 0 {
            info!(
                pending = swept.pending,
                failed = swept.failed,
                "requeued expired leases of an earlier run"
            );
        }
        for slot in &mut slots {
            self.start_or_wait(slot);
        }

        loop {
            // Reap exited workers.
            for slot in &mut slots {
                let SlotState::Running { child, .. } = &mut slot.state else {
                    continue;
                };
                let status = match child.try_wait() {
                    Ok(Some(status)) => status,
                    Ok(None) => continue,
                    Err(e) => {
                        warn!(slot = slot.n, error = %e, "cannot check worker");
                        continue;
                    }
                };
                let clean = matches!(status.code(), Some(0) | Some(1));
                if status.code() == Some(2) {
                    // The worker refused its arguments or the database: every
                    // restart would do the same.
                    fatal.get_or_insert(Error::Config(format!(
                        "worker {} exited with status 2 (its error is above); stopping",
                        slot.id
                    )));
                }
                if clean {
                    // It ran to its end: whatever crashes came before, the
                    // slot is not crash-looping now.
                    slot.fruitless = 0;
                    slot.state = SlotState::Finished;
                    continue;
                }
                // Died: take its leases back before anything else.
                warn!(slot = slot.n, worker = %slot.id, status = %status, "worker died");
                unrequeued.push(slot.id.clone());
                let finished = transient_ok(session.worker_finished(&slot.id), 0)?;
                slot.fruitless = if finished > 0 { 0 } else { slot.fruitless + 1 };
                if stop_began.is_some() || fatal.is_some() {
                    slot.state = SlotState::Finished;
                    continue;
                }
                // A crash after progress, or a first crash, restarts at once;
                // crashes in a row without progress back off.
                let delay = if slot.fruitless <= 1 {
                    Duration::ZERO
                } else {
                    self.config.restart_backoff.delay(slot.fruitless - 1)
                };
                if slot.fruitless >= CRASH_LOOP {
                    error!(
                        slot = slot.n, crashes = slot.fruitless, next_in = ?delay,
                        "worker slot is crash-looping: it keeps dying without finishing an item"
                    );
                }
                slot.state = SlotState::Waiting {
                    until: Instant::now() + delay,
                };
            }

            self.requeue_dead(&mut session, &mut unrequeued, true)?;

            let status = transient_ok(session.status(), last_status.clone())?;
            last_status = status.clone();
            let open = status.pending + status.running > 0 || !unrequeued.is_empty();
            progress(&status);

            if let Some(e) = fatal.take() {
                if stop_began.is_none() {
                    stop_began = Some(Instant::now());
                    stops = 1;
                    signal_all(&mut slots, libc::SIGTERM);
                }
                fatal = Some(e);
            }

            // Every slot crash-looping and none running: give up.
            let all_looping = slots.iter().all(|s| {
                s.fruitless >= CRASH_LOOP && !matches!(s.state, SlotState::Running { .. })
            });
            if all_looping && stop_began.is_none() {
                return Err(Error::CrashLoop {
                    crashes: CRASH_LOOP,
                });
            }

            // Restart what is due, if there is anything left to do.
            if stop_began.is_none() {
                for slot in &mut slots {
                    let due = match slot.state {
                        SlotState::Waiting { until } => Instant::now() >= until,
                        // A worker that found the queue drained, while items
                        // came back (a retry after another worker's crash).
                        SlotState::Finished => open && status.running == 0,
                        SlotState::Running { .. } => false,
                    };
                    if due && (open || self.config.follow) {
                        // Waiting: it died (or could not start). A worker
                        // that had finished and is started again because
                        // items came back is not a restart.
                        let after_death = matches!(slot.state, SlotState::Waiting { .. });
                        if self.start_or_wait(slot) && after_death {
                            restarts += 1;
                            self.metrics.restarts.inc();
                        }
                    } else if due && matches!(slot.state, SlotState::Waiting { .. }) {
                        slot.state = SlotState::Finished;
                    }
                }
            }

            let live = slots
                .iter()
                .filter(|s| matches!(s.state, SlotState::Running { .. }))
                .count();
            self.metrics.workers_live.set(live as i64);
            let running = live > 0;
            let waiting = slots
                .iter()
                .any(|s| matches!(s.state, SlotState::Waiting { .. }));
            let stopping = stop_began.is_some();
            if !running && (stopping || (!waiting && (!open || !self.config.follow))) {
                break;
            }

            // A stop that takes too long: tell workers to stop now, then kill.
            if let Some(at) = stop_began {
                let elapsed = at.elapsed();
                if stops < 2 && elapsed >= self.config.drain_timeout + Duration::from_secs(2) {
                    stops = 2;
                    info!("drain timeout passed; telling the workers to stop their items now");
                    signal_all(&mut slots, libc::SIGTERM);
                }
                if elapsed >= self.config.drain_timeout + Duration::from_secs(12) {
                    warn!("workers did not stop; killing them");
                    signal_all(&mut slots, libc::SIGKILL);
                }
            }

            if last_sweep.elapsed() >= self.config.sweep_interval {
                last_sweep = Instant::now();
                let moved = transient_ok(session.requeue_expired(), Requeued::default())?;
                let seconds = last_sweep.elapsed().as_secs_f64();
                self.metrics.sweep_seconds.observe(seconds);
                self.metrics.requeued(RequeueCause::Expired, moved.total());
                if moved.total() > 0 {
                    info!(
                        pending = moved.pending,
                        never_started = moved.never_started,
                        failed = moved.failed,
                        "requeued expired leases"
                    );
                }
            }

            // Until the next tick, or the next restart that is due (none
            // once stopping: a slot left waiting then would wake us
            // over and over).
            let now = Instant::now();
            let nap = slots
                .iter()
                .filter_map(|s| match s.state {
                    SlotState::Waiting { until } if stop_began.is_none() => {
                        Some(until.saturating_duration_since(now))
                    }
                    _ => None,
                })
                .fold(TICK, Duration::min);
            crossbeam_channel::select! {
                recv(stop) -> msg => match msg {
                    Ok(()) => {
                        stops += 1;
                        if stop_began.is_none() {
                            stop_began = Some(Instant::now());
                            info!("stopping: workers drain their running items");
                        } else {
                            info!("second stop: workers stop their items now");
                        }
                        signal_all(&mut slots, libc::SIGTERM);
                    }
                    Err(_) => stop = crossbeam_channel::never(),
                },
                recv(self.exited) -> _ => {}
                default(nap) => {}
            }
            // The next turn reaps every worker that has exited by now:
            // their messages would only bring empty turns.
            while self.exited.try_recv().is_ok() {}
        }

        // Dead workers whose leases the database refused so far: a few more
        // tries before leaving them to expire and a later sweep.
        let give_up = Instant::now() + self.config.drain_timeout.min(Duration::from_secs(10));
        while !unrequeued.is_empty() && Instant::now() < give_up {
            self.requeue_dead(&mut session, &mut unrequeued, false)?;
            if !unrequeued.is_empty() {
                std::thread::sleep(TICK);
            }
        }
        for worker in &unrequeued {
            warn!(
                %worker,
                "could not requeue the dead worker's leases; they go back when they expire"
            );
        }
        if let Some(e) = fatal {
            return Err(e);
        }
        let status = session.status()?;
        progress(&status);
        let finished = (status.done + status.failed).saturating_sub(before.done + before.failed);
        // Every failed attempt leaves a history row; those of items that
        // ended failed in this run were not followed by a retry.
        let failed_here = status.failed.saturating_sub(before.failed);
        Ok(RunSummary {
            retries: session
                .attempts_since(started_ms)?
                .saturating_sub(failed_here),
            finished,
            restarts,
            wall_s: started.elapsed().as_secs_f64(),
            interrupted: stop_began.is_some() && status.pending + status.running > 0,
            status,
        })
    }

    /// Takes back the leases of the dead workers in `unrequeued`; those the
    /// database refused for now stay in it, to be tried again (said in the
    /// log when `say_refused`). An error retrying cannot mend is returned.
    fn requeue_dead(
        &self,
        session: &mut Session,
        unrequeued: &mut Vec<String>,
        say_refused: bool,
    ) -> Result<()> {
        let mut i = 0;
        while i < unrequeued.len() {
            match session.requeue_worker(&unrequeued[i]) {
                Ok(moved) => {
                    let worker = unrequeued.remove(i);
                    let (pending, failed) = (moved.pending, moved.failed);
                    let never_started = moved.never_started;
                    info!(
                        %worker, pending, never_started, failed,
                        "requeued the dead worker's leases"
                    );
                    self.metrics
                        .requeued(RequeueCause::DeadWorker, moved.total());
                }
                Err(e) if e.is_transient() => {
                    if say_refused {
                        warn!(error = %e, "cannot requeue a dead worker's leases yet");
                    }
                    i += 1;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Starts the slot's worker; returns false if it could not be started
    /// (no process or memory left, the executable gone), which counts as a
    /// crash without progress: the slot tries again after its backoff, and
    /// a run whose every slot keeps failing ends as a crash loop. One
    /// failed start must not end a long run whose other workers are fine.
    fn start_or_wait(&self, slot: &mut Slot) -> bool {
        let Err(e) = self.start(slot) else {
            return true;
        };
        slot.fruitless += 1;
        let delay = self
            .config
            .restart_backoff
            .delay(slot.fruitless.saturating_sub(1));
        warn!(slot = slot.n, error = %e, next_in = ?delay, "cannot start a worker; will try again");
        slot.state = SlotState::Waiting {
            until: Instant::now() + delay,
        };
        false
    }

    /// Starts the worker of `slot` under a fresh identity.
    fn start(&self, slot: &mut Slot) -> Result<()> {
        slot.id = format!("{}.{}", crate::worker::new_worker_id(), slot.n);
        let mut cmd = Command::new(&self.config.exe);
        cmd.args(&self.config.global_args)
            .arg("worker")
            .arg("--worker-id")
            .arg(&slot.id)
            .arg("--supervised")
            .args(&self.config.worker_args)
            .stdin(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().map_err(|e| {
            Error::Start(format!(
                "cannot start worker {}: {e}",
                self.config.exe.display()
            ))
        })?;
        let lifeline = child.stdin.take();
        info!(slot = slot.n, worker = %slot.id, pid = child.id(), "worker started");
        self.watch_exit(&child);
        slot.state = SlotState::Running {
            child,
            _lifeline: lifeline,
        };
        Ok(())
    }

    /// Sends on `exited` when `child` exits. Without it (no thread could be
    /// started), the exit is seen at the next tick.
    fn watch_exit(&self, child: &Child) {
        let Ok(pid) = i32::try_from(child.id()) else {
            return;
        };
        let tx = self.exited_tx.clone();
        let watcher = std::thread::Builder::new()
            .name("worker-exit".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                // Not reaped here: the pid stays this worker's until the
                // loop's `try_wait`. If the loop reaped it first this fails
                // at once (or, should the pid already belong to a newer
                // worker of ours, waits for that one): either way the
                // message is merely one too many.
                let _ = crate::exec::wait_exited_no_reap(pid);
                let _ = tx.send(());
            });
        if let Err(error) = watcher {
            warn!(%error, every = ?TICK, "cannot watch a worker for its exit; checking on a timer");
        }
    }
}

use std::os::unix::process::CommandExt;

/// A transient database error (lock held too long, disk full) is logged
/// and `fallback` used instead: the supervisor keeps its workers going and
/// tries again on its next turn.
fn transient_ok<T>(r: Result<T>, fallback: T) -> Result<T> {
    match r {
        Err(e) if e.is_transient() => {
            warn!(error = %e, "database write refused; trying again shortly");
            Ok(fallback)
        }
        other => other,
    }
}

fn signal_all(slots: &mut [Slot], signal: i32) {
    for slot in slots {
        if let SlotState::Running { child, .. } = &mut slot.state {
            // The child is not reaped until `try_wait` sees it exit, so its
            // pid cannot have been reused.
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: plain syscall on our own unreaped child.
                unsafe {
                    libc::kill(pid, signal);
                }
            }
        }
    }
}
