//! Command-line definitions: one subcommand per verb.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

use litework::input::Format;
use litework::queue::Status;

const EXIT_CODES: &str = "\
Exit status: 0 success; 1 some items ended failed (worker: items it recorded \
failed); 2 usage or input error (bad arguments, malformed input, a file that \
is not a litework database): nothing was changed; 3 a failure while working \
(I/O, database); 130 (run) stopped by a signal before the queue drained.";

/// Run large batches of work items across worker processes coordinated
/// through one SQLite database.
#[derive(Debug, Parser)]
#[command(name = "litework", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// The queue database file.
    #[arg(
        long,
        global = true,
        env = "LITEWORK_DB",
        default_value = "litework.db"
    )]
    pub db: PathBuf,

    /// Fsync every commit (synchronous = FULL): no committed outcome is lost
    /// on power failure, at some cost in speed.
    #[arg(long, global = true)]
    pub durable: bool,

    /// Open a database on a network filesystem (NFS, SMB, ...) anyway. Only
    /// safe if every litework process runs on the same machine.
    #[arg(long, global = true)]
    pub allow_network_fs: bool,

    /// How long one statement waits for another process to let go of the
    /// write lock. Past it a command fails with an error saying so; a
    /// worker keeps its outcomes and tries again with backoff.
    #[arg(long, global = true, value_parser = nonzero_duration, default_value = "60s")]
    pub busy_timeout: Duration,

    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = ArgAction::Count)]
    pub verbose: u8,

    /// Only errors in the log.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    /// Log line format on standard error.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the queue database (does nothing if it already exists).
    Init,
    /// Add items from a file or standard input, all in one transaction.
    Add(AddArgs),
    /// Add the input and process the queue with N supervised worker
    /// processes, restarting the ones that crash; resumes where it stopped.
    Run(RunArgs),
    /// Process items: claim, run the command, record, until the queue drains.
    Worker(WorkerArgs),
    /// Show counts by status, rates and the age of the oldest ready item.
    Status(StatusArgs),
    /// List items, with their last errors.
    List(ListArgs),
    /// Send failed items (or the given ids) back to pending with fresh attempts.
    Retry(RetryArgs),
    /// Requeue expired leases, or every lease of a worker known to be dead.
    RequeueStale(RequeueArgs),
    /// Write items and their results as JSON Lines or CSV.
    Export(ExportArgs),
    /// Load test on a fresh queue: items/s, claim latency, lock waits and a
    /// check that every item was done exactly once. `--chaos` instead
    /// kills workers and the supervisor during a run and verifies that
    /// nothing was lost or recorded twice.
    Bench(BenchArgs),
    /// Internal: started by each worker to kill its items' process groups
    /// if the worker dies.
    #[command(hide = true)]
    BenchWorker(BenchWorkerArgs),
    #[command(hide = true)]
    KeepGroups {
        /// Also kill processes started for this worker that were never
        /// listed.
        #[arg(long)]
        worker_id: Option<String>,
        /// The memory-mapped list of groups the worker keeps.
        #[arg(long)]
        groups_file: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// Input file; `-` or nothing reads standard input.
    pub input: Option<PathBuf>,

    /// How the input is split into items.
    #[arg(long, value_enum, default_value_t = Format::Lines)]
    pub format: Format,

    /// Use each payload as its dedupe key, so adding the same input again
    /// adds nothing (JSON Lines records with a "key" keep their own).
    #[arg(long, alias = "dedupe")]
    pub key_from_payload: bool,

    /// Priority of items that do not set one; higher runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i64,

    /// Attempts before an item ends failed, for items that do not set it.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,

    /// Do not run the items before this long from now (e.g. 10m).
    #[arg(long, value_parser = duration)]
    pub delay: Option<Duration>,

    /// Longest record accepted, in bytes.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub max_record: usize,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Items run at once (executor threads). Default: number of CPUs.
    #[arg(short = 'c', long, value_parser = at_least_one)]
    pub concurrency: Option<usize>,

    /// How long a claim holds an item; extended every third of it while the
    /// item runs.
    #[arg(long, value_parser = lease, default_value = "30s")]
    pub lease: Duration,

    /// Kill an item's process group after this long and count a failure.
    #[arg(long, value_parser = duration)]
    pub timeout: Option<Duration>,

    /// Keep waiting for new items instead of exiting when the queue drains.
    #[arg(long)]
    pub follow: bool,

    /// On SIGINT/SIGTERM, how long running items may take to finish before
    /// they are killed and released back to pending.
    #[arg(long, value_parser = duration, default_value = "30s")]
    pub drain_timeout: Duration,

    /// Pass the payload on standard input instead of as an argument.
    #[arg(long, conflicts_with = "shell")]
    pub stdin: bool,

    /// Run the command words as a `sh -c` script; the payload is "$1".
    #[arg(long)]
    pub shell: bool,

    /// Most bytes of standard output kept as an item's result.
    #[arg(long, default_value_t = 1024 * 1024)]
    pub max_output: usize,

    /// Delay before the first retry; doubles each attempt (with jitter).
    #[arg(long, value_parser = duration, default_value = "1s")]
    pub backoff_base: Duration,

    /// Longest delay between retries.
    #[arg(long, value_parser = duration, default_value = "5m")]
    pub backoff_max: Duration,

    /// An exit status meaning "failed for good, do not retry" (repeatable).
    #[arg(long, value_name = "CODE")]
    pub permanent_exit: Vec<i32>,

    /// How often to requeue other workers' expired leases.
    #[arg(long, value_parser = duration, default_value = "10s")]
    pub sweep_interval: Duration,

    /// Longest pause between checks for new items when idle and commits
    /// cannot be watched (a check is one read of `PRAGMA data_version`,
    /// no write lock). While the database's log is watched, the longer of
    /// this and 1s.
    #[arg(long, value_parser = duration, default_value = "4ms")]
    pub idle_poll: Duration,

    /// Find new items by polling alone, every --idle-poll at most, instead
    /// of also watching the database's log for other processes' commits
    /// (inotify).
    #[arg(long)]
    pub poll_only: bool,

    /// Limit each item's CPU time (seconds; SIGXCPU, then SIGKILL).
    #[arg(long, value_name = "SECONDS")]
    pub limit_cpu: Option<u64>,

    /// Limit each item's address space (bytes; K, M, G suffixes).
    #[arg(long, value_name = "BYTES", value_parser = size)]
    pub limit_memory: Option<u64>,

    /// Limit each item's open files.
    #[arg(long, value_name = "N")]
    pub limit_files: Option<u64>,

    /// Limit the size of files an item writes (bytes; K, M, G suffixes).
    #[arg(long, value_name = "BYTES", value_parser = size)]
    pub limit_file_size: Option<u64>,

    /// Basic authentication (bcrypt) and TLS for the metrics endpoints, from
    /// a file in the format of the Prometheus exporters' web config.
    #[arg(long, value_name = "FILE")]
    pub web_config: Option<PathBuf>,

    /// Where to serve /metrics and /healthz (default 127.0.0.1:0, a free
    /// port). A worker records its address in the workers table. Under
    /// `run` this is the supervisor's address (give a fixed port for
    /// Prometheus, e.g. 127.0.0.1:9464); its workers bind the same IP on
    /// free ports and are listed by the supervisor's /sd endpoint.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,

    /// Identity to register under (the supervisor sets it); must be unique
    /// per process start.
    #[arg(long, hide = true)]
    pub worker_id: Option<String>,

    /// Started by `litework run`: standard input is the supervisor's
    /// lifeline, and end-of-file on it means stop now.
    #[arg(long, hide = true)]
    pub supervised: bool,

    /// The command and its arguments. `{}` is replaced by the payload (as
    /// part of that one argument), `{id}` and `{attempt}` by the item's id
    /// and attempt; without `{}` the payload is appended as the last
    /// argument.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

impl WorkerArgs {
    /// The options as `litework worker` arguments, for the supervisor to
    /// pass on (everything but the identity, which it sets per start).
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut opt = |name: &str, value: String| {
            a.push(format!("--{name}").into());
            a.push(value.into());
        };
        let d = |d: Duration| humantime::format_duration(d).to_string();
        if let Some(c) = self.concurrency {
            opt("concurrency", c.to_string());
        }
        opt("lease", d(self.lease));
        if let Some(t) = self.timeout {
            opt("timeout", d(t));
        }
        opt("drain-timeout", d(self.drain_timeout));
        opt("max-output", self.max_output.to_string());
        opt("backoff-base", d(self.backoff_base));
        opt("backoff-max", d(self.backoff_max));
        for code in &self.permanent_exit {
            opt("permanent-exit", code.to_string());
        }
        opt("sweep-interval", d(self.sweep_interval));
        let limits = [
            ("limit-cpu", self.limit_cpu),
            ("limit-memory", self.limit_memory),
            ("limit-files", self.limit_files),
            ("limit-file-size", self.limit_file_size),
        ];
        for (name, value) in limits {
            if let Some(v) = value {
                opt(name, v.to_string());
            }
        }
        let ip = self
            .metrics_addr
            .as_deref()
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            .map_or_else(|| "127.0.0.1".to_string(), |a| a.ip().to_string());
        let ip = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip
        };
        opt("metrics-addr", format!("{ip}:0"));
        opt("idle-poll", d(self.idle_poll));
        if let Some(path) = &self.web_config {
            a.push("--web-config".into());
            a.push(path.clone().into_os_string());
        }
        for (on, flag) in [
            (self.follow, "--follow"),
            (self.stdin, "--stdin"),
            (self.shell, "--shell"),
            (self.poll_only, "--poll-only"),
        ] {
            if on {
                a.push(flag.into());
            }
        }
        a.push("--".into());
        a.extend(self.command.iter().cloned());
        a
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Items to add first, one per line (or as --format says); `-` reads
    /// standard input. Without it, the queue is processed as it is.
    #[arg(long, short = 'i')]
    pub input: Option<PathBuf>,

    /// How the input is split into items.
    #[arg(long, value_enum, default_value_t = Format::Lines)]
    pub format: Format,

    /// Do not use payloads as dedupe keys: adding the same input twice
    /// queues it twice.
    #[arg(long)]
    pub no_dedupe: bool,

    /// Attempts before an item ends failed, for items that do not set it.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,

    /// Worker processes. Default: number of CPUs.
    #[arg(short = 'w', long, value_parser = at_least_one)]
    pub workers: Option<usize>,

    /// First delay before restarting a worker that died without finishing
    /// an item; doubles (with jitter) while it keeps doing so, up to 30 s.
    #[arg(long, value_parser = duration, default_value = "500ms")]
    pub restart_backoff: Duration,

    /// Progress on standard error: a bar on a terminal, else a log line
    /// every 10 s.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,

    #[command(flatten)]
    pub worker: WorkerArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressMode {
    Auto,
    Bar,
    Log,
    None,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Kill a random worker every --kill-every and the supervisor once,
    /// then verify every item is done exactly once.
    #[arg(long)]
    pub chaos: bool,

    /// Items in the batch [default: 200000; 20000 with --chaos].
    #[arg(long)]
    pub items: Option<usize>,

    /// Worker processes.
    #[arg(short = 'w', long, default_value_t = 4, value_parser = at_least_one)]
    pub workers: usize,

    /// Items at once per worker [default: 4; 2 with --chaos].
    #[arg(short = 'c', long, value_parser = at_least_one)]
    pub concurrency: Option<usize>,

    /// What each item does: noop, sleep=DURATION, or fail=RATE (a no-op
    /// that fails with probability RATE and is retried). A command after
    /// `--` runs once per item instead.
    #[arg(long, value_parser = work_kind, default_value = "noop")]
    pub work: WorkKind,

    /// Also run the plain pattern (one item claimed per transaction, its
    /// completion in another) with the same processes and settings.
    #[arg(long)]
    pub compare_seed: bool,

    /// Also measure pickup latency: add this many items one at a time to
    /// an idle queue and time each from commit to start.
    #[arg(long, value_name = "ITEMS")]
    pub pickup: Option<usize>,

    /// Also time `status` and a metrics scrape on a queue of this many
    /// items.
    #[arg(long, value_name = "ITEMS")]
    pub status_at: Option<u64>,

    /// Measure this many times (raw SQLite, the plain pattern, litework,
    /// one after the other each time) and report each run and the median:
    /// on a shared machine one run can be off by a fifth.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub runs: u32,

    /// Mean time between worker kills (jittered by ±50%).
    #[arg(long, value_parser = duration, default_value = "300ms")]
    pub kill_every: Duration,

    /// Keep the databases (and logs) in this directory instead of a
    /// temporary one; it must be empty or not exist.
    #[arg(long)]
    pub dir: Option<PathBuf>,

    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,

    /// The command to run per item (as for `worker`).
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// The work a bench item does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WorkKind {
    Noop,
    Sleep(Duration),
    Fail(f64),
}

impl std::fmt::Display for WorkKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkKind::Noop => write!(f, "noop"),
            WorkKind::Sleep(d) => write!(f, "sleep={}", humantime::format_duration(*d)),
            WorkKind::Fail(rate) => write!(f, "fail={rate}"),
        }
    }
}

fn work_kind(s: &str) -> Result<WorkKind, String> {
    match s.split_once('=') {
        None if s == "noop" => Ok(WorkKind::Noop),
        Some(("sleep", d)) => duration(d).map(WorkKind::Sleep),
        Some(("fail", r)) => match r.parse::<f64>() {
            Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(WorkKind::Fail(rate)),
            _ => Err(format!("{r:?} is not a rate between 0 and 1")),
        },
        _ => Err("expected noop, sleep=DURATION or fail=RATE".into()),
    }
}

/// A process of `litework bench`: started and stopped through its stdin,
/// reports on its stdout.
#[derive(Debug, Args)]
pub struct BenchWorkerArgs {
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,

    #[arg(long, value_parser = work_kind, default_value = "noop")]
    pub work: WorkKind,

    /// The plain pattern: one claim per transaction, one completion per
    /// transaction, one item at a time.
    #[arg(long)]
    pub seed: bool,

    /// Payloads are the wall-clock time they were added (nanoseconds);
    /// measure the delay to their start. Keeps running until stdin closes.
    #[arg(long)]
    pub pickup: bool,

    /// Find new items by polling only (no commit watch).
    #[arg(long)]
    pub poll_only: bool,

    #[arg(last = true)]
    pub command: Vec<OsString>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// One JSON object instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Count the items afresh before reporting (a scan of the whole table).
    /// Only needed after editing the items table by hand: litework keeps
    /// the counts itself.
    #[arg(long)]
    pub recount: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only items with this status (pending, running, done, failed).
    #[arg(long, value_parser = status)]
    pub status: Option<Status>,

    /// At most this many items.
    #[arg(long, default_value_t = 50)]
    pub limit: u64,

    /// JSON Lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RetryArgs {
    /// Items to retry; without ids, every failed item.
    pub ids: Vec<i64>,
}

#[derive(Debug, Args)]
pub struct RequeueArgs {
    /// Requeue every lease held by this worker (known to be dead) instead
    /// of only the expired ones.
    #[arg(long)]
    pub worker: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    Jsonl,
    Csv,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
    pub format: ExportFormat,

    /// Only items with this status; all items by default.
    #[arg(long, value_parser = status)]
    pub status: Option<Status>,

    /// Write here instead of standard output.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 5m, 1h)"))
}

/// The shortest `--lease`: it is extended every third of it, so a shorter
/// one leaves a heartbeat no time to get through a busy moment.
const MIN_LEASE: Duration = Duration::from_millis(300);

fn lease(s: &str) -> Result<Duration, String> {
    match duration(s)? {
        d if d < MIN_LEASE => Err("must be at least 300ms".into()),
        d => Ok(d),
    }
}

/// A count of processes or threads.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
}

fn nonzero_duration(s: &str) -> Result<Duration, String> {
    match duration(s)? {
        d if d.is_zero() => Err("must be more than zero".into()),
        d => Ok(d),
    }
}

/// A byte count: digits with an optional K, M or G (powers of 1024).
fn size(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, ""),
    };
    let scale: u64 = match unit.to_ascii_uppercase().as_str() {
        "" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(format!("unknown unit {unit:?} (use K, M or G)")),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 4096, 512M, 2G)"))?;
    n.checked_mul(scale)
        .ok_or_else(|| format!("{s} is too large"))
}

fn status(s: &str) -> Result<Status, String> {
    s.parse()
}
