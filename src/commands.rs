//! The verbs, built on the library.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;

use litework::exec::{CommandSpec, Keeper, Limits, PayloadMode};
use litework::input::{Defaults, Format, Records, Spool};
use litework::metrics::{Exporter, WebConfig};
use litework::queue::{self, AddReport, Backoff, ItemRow, NewItem, Queue, StatusReport};
use litework::supervisor::{Supervisor, SupervisorConfig};
use litework::worker::{Worker, WorkerConfig};

use crate::cli::{
    Cli, Command, ExportArgs, ExportFormat, ListArgs, LogFormat, ProgressMode, RequeueArgs,
    RetryArgs, RunArgs, StatusArgs, WorkerArgs,
};

/// Some items ended failed.
const EXIT_ITEMS_FAILED: u8 = 1;

/// Stopped by a signal before the queue drained (128 + SIGINT).
const EXIT_INTERRUPTED: u8 = 130;

/// The global options that say how a database is opened. Every litework
/// process a verb starts gets them too.
#[derive(Debug, Clone, Copy)]
pub struct DbFlags {
    pub durable: bool,
    pub allow_network_fs: bool,
    pub busy_timeout: Duration,
}

impl DbFlags {
    fn of(cli: &Cli) -> DbFlags {
        DbFlags {
            durable: cli.durable,
            allow_network_fs: cli.allow_network_fs,
            busy_timeout: cli.busy_timeout,
        }
    }

    /// How this process opens a database.
    pub fn options(self, create: bool) -> queue::Options {
        queue::Options {
            create,
            durable: self.durable,
            allow_network_fs: self.allow_network_fs,
            busy_timeout: self.busy_timeout,
            ..queue::Options::default()
        }
    }

    /// The same, as arguments for a litework child process.
    pub fn args(self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        if self.durable {
            a.push("--durable".into());
        }
        if self.allow_network_fs {
            a.push("--allow-network-fs".into());
        }
        let timeout = humantime::format_duration(self.busy_timeout).to_string();
        a.extend(["--busy-timeout".into(), timeout.into()]);
        a
    }
}

pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let global = global_args(&cli);
    let flags = DbFlags::of(&cli);
    let opts = |create: bool| flags.options(create);
    let open = |create: bool| Queue::open_with(&cli.db, &opts(create));
    match cli.command {
        Command::Init => {
            open(true)?;
            note!("{}: ready", cli.db.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Add(args) => {
            let defaults = Defaults {
                key_from_payload: args.key_from_payload,
                priority: args.priority,
                max_attempts: Some(args.max_attempts),
                delay: args.delay,
                max_record: args.max_record,
            };
            add(
                &cli.db,
                args.input.as_deref(),
                args.format,
                defaults,
                opts(true),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => run(&cli.db, global, args, opts(true)),
        Command::Worker(args) => worker(open(false)?, args),
        Command::Status(args) => status(open(false)?, args),
        Command::List(args) => list(open(false)?, args),
        Command::Retry(args) => retry(open(false)?, args),
        Command::RequeueStale(args) => requeue(open(false)?, args),
        Command::Export(args) => export(open(false)?, args),
        Command::Bench(args) => crate::bench::bench(args, flags),
        Command::BenchWorker(args) => crate::bench::bench_worker(&cli.db, &opts(false), args),
        Command::KeepGroups {
            worker_id,
            groups_file,
        } => {
            litework::exec::keep_groups(
                std::io::stdin().lock(),
                worker_id.as_deref(),
                groups_file.as_deref(),
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Adds an input file (or stdin) in one transaction and reports it.
fn add(
    db: &Path,
    input: Option<&Path>,
    format: Format,
    defaults: Defaults,
    opts: queue::Options,
) -> anyhow::Result<AddReport> {
    let max_attempts = defaults.max_attempts.unwrap_or(3);
    let (reader, name): (Box<dyn BufRead>, String) = match input {
        None => (Box::new(std::io::stdin().lock()), "<stdin>".into()),
        Some(p) if p.as_os_str() == "-" => (Box::new(std::io::stdin().lock()), "<stdin>".into()),
        Some(p) => {
            let file = std::fs::File::open(p).map_err(|source| litework::Error::InputIo {
                input: p.display().to_string(),
                source,
            })?;
            (
                Box::new(BufReader::with_capacity(256 * 1024, file)),
                p.display().to_string(),
            )
        }
    };
    let mut records = Records::new(reader, name.clone(), format, defaults).peekable();
    // Look at the first record before touching the database, so that an
    // empty or malformed input does not even create the file.
    match records.peek() {
        None => return Err(litework::Error::EmptyInput { input: name }.into()),
        Some(Err(_)) => {
            if let Some(Err(e)) = records.next() {
                return Err(e.into());
            }
        }
        Some(Ok(_)) => {}
    }
    let report = if db.exists() {
        add_to_existing(db, records, max_attempts, &opts)?
    } else {
        add_to_new(db, records, max_attempts, &opts)?
    };
    let noun = if report.added == 1 { "item" } else { "items" };
    note!(
        "{}: added {} {noun} ({} already present)",
        db.display(),
        report.added,
        report.duplicates
    );
    Ok(report)
}

/// Adds to a queue that exists. The input is read to its end into a spool
/// file first, and only then added in one transaction: the write lock is
/// held for as long as the inserts take, never for as long as the input
/// takes to arrive. A slow producer (`slow-script | litework add -`) would
/// otherwise keep every worker from recording, heartbeating or claiming
/// until their leases expired under them.
fn add_to_existing(
    db: &Path,
    records: impl Iterator<Item = litework::Result<NewItem>>,
    max_attempts: u32,
    opts: &queue::Options,
) -> anyhow::Result<AddReport> {
    // Opened first: a file that is not a litework queue is refused before
    // any input is read.
    let queue = Queue::open_with(db, opts)?;
    let dir = db.parent().unwrap_or(Path::new("."));
    let spool = Spool::fill(dir, records)?;
    Ok(queue.add(spool.items()?, max_attempts)?)
}

/// A name beside `db` for a staging file of this process.
fn staging_name(db: &Path) -> PathBuf {
    let mut name = db.file_name().unwrap_or(db.as_os_str()).to_owned();
    name.push(format!(
        ".adding-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    db.with_file_name(name)
}

/// Adds to a database that does not exist yet without ever showing a
/// half-made or empty one: the items go into a new file beside `db`, which
/// takes the name `db` only once the whole input was added. If another
/// process created `db` in the meantime, the items are moved into it
/// instead. A refused input leaves nothing behind, and no file another
/// process may have open is ever removed.
fn add_to_new(
    db: &Path,
    records: impl Iterator<Item = litework::Result<NewItem>>,
    max_attempts: u32,
    opts: &queue::Options,
) -> anyhow::Result<AddReport> {
    // Said of the database, not of the staging file the error would name.
    if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(litework::Error::BadPath {
                path: db.to_path_buf(),
                reason: format!("no such directory {}", dir.display()),
            }
            .into());
        }
    }
    let staging = staging_name(db);
    // The staging file is written through one plain connection, checkpointed
    // and closed before it is linked: SQLite finds -wal and -shm files by
    // name but shares locks by inode, so no connection to it may stay.
    let report = Queue::stage(&staging, records, max_attempts, opts)?;
    // link(2) fails if `db` exists: the rename that cannot replace.
    let result = match std::fs::hard_link(&staging, db) {
        Ok(()) => Ok(report),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Queue::open_with(db, opts)
            .and_then(|q| q.take_items_from(&staging))
            .map(|moved| AddReport {
                // The staging file kept one of each key already.
                duplicates: moved.duplicates + report.duplicates,
                ..moved
            })
            .map_err(Into::into),
        Err(e) => Err(anyhow::Error::new(e).context(format!("{}: cannot create", db.display()))),
    };
    queue::remove_files(&staging);
    result
}

/// The options every child `litework` gets before its verb.
fn global_args(cli: &Cli) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["--db".into(), cli.db.clone().into_os_string()];
    a.extend(DbFlags::of(cli).args());
    if cli.quiet {
        a.push("--quiet".into());
    }
    for _ in 0..cli.verbose {
        a.push("--verbose".into());
    }
    if cli.log_format == LogFormat::Json {
        a.extend(["--log-format".into(), "json".into()]);
    }
    a
}

/// The longest the supervisor waits for the write lock in one try.
const SUPERVISOR_WRITE_WAIT: Duration = Duration::from_millis(250);

fn run(
    db: &Path,
    global: Vec<OsString>,
    args: RunArgs,
    opts: queue::Options,
) -> anyhow::Result<ExitCode> {
    // Check everything before adding anything: the command, the web
    // configuration and the metrics address (bound now, answered later).
    // Numeric options were checked when parsed.
    worker_spec(&args.worker)?;
    let addr = args.worker.metrics_addr.as_deref().unwrap_or("127.0.0.1:0");
    let bound = Exporter::bind(addr, web_config(&args.worker)?)?;
    if args.input.is_some() {
        let defaults = Defaults {
            key_from_payload: !args.no_dedupe,
            max_attempts: Some(args.max_attempts),
            ..Defaults::default()
        };
        add(
            db,
            args.input.as_deref(),
            args.format,
            defaults,
            opts.clone(),
        )?;
    }
    let queue = Queue::open_with(db, &opts)?;
    let exe = std::env::current_exe().context("finding the litework executable")?;
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let config = SupervisorConfig {
        exe,
        global_args: global,
        worker_args: args.worker.to_args(),
        workers,
        sweep_interval: args.worker.sweep_interval,
        drain_timeout: args.worker.drain_timeout,
        restart_backoff: Backoff {
            base: args.restart_backoff,
            max: Duration::from_secs(30),
        },
        follow: args.worker.follow,
    };

    let (tx, stop) = crossbeam_channel::bounded(4);
    ctrlc::set_handler(move || {
        let _ = tx.try_send(());
    })
    .context("installing the SIGINT/SIGTERM handler")?;

    let supervisor = Supervisor::new(queue.clone(), config);
    let targets = queue.clone();
    let discovery: litework::metrics::Discovery = Box::new(move || discovery(&targets));
    let registry = supervisor.metrics().registry().clone();
    let exporter = bound.serve(registry, Some(discovery))?;
    let url = format!("http://{}", exporter.addr());
    tracing::info!(metrics = %format!("{url}/metrics"), sd = %format!("{url}/sd"), "serving");

    // The supervisor's own writes (sweeps, taking back a dead worker's
    // leases) are tried again every turn when the lock is busy; waiting the
    // whole busy timeout in one would hold up its signals, restarts and
    // progress as long. Its workers, other processes, keep the full wait.
    litework::queue::busy::set_limit(opts.busy_timeout.min(SUPERVISOR_WRITE_WAIT));
    let mut progress = Progress::new(args.progress);
    let summary = supervisor.run(stop, &mut |s| progress.tick(s))?;
    drop(exporter);
    progress.finish();

    let s = &summary.status;
    note!(
        "litework run: {} done, {} failed, {} pending, {} running; {} items finished in {:.1}s \
         ({:.1} items/s), {} retries, {} worker restarts",
        s.done,
        s.failed,
        s.pending,
        s.running,
        summary.finished,
        summary.wall_s,
        summary.finished as f64 / summary.wall_s.max(1e-9),
        summary.retries,
        summary.restarts
    );
    if s.failed > 0 {
        note!(
            "failed items: litework --db {} list --status failed",
            shell_word(&db.display().to_string())
        );
    }
    Ok(if summary.interrupted {
        ExitCode::from(EXIT_INTERRUPTED)
    } else if s.failed > 0 {
        ExitCode::from(EXIT_ITEMS_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

/// The Prometheus HTTP service-discovery document: one target group per
/// running worker that serves metrics; `[]` when there is none.
fn discovery(queue: &Queue) -> String {
    let targets = match queue.session().and_then(|mut s| s.metrics_targets()) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "discovery: cannot read the workers table");
            Vec::new()
        }
    };
    let groups: Vec<serde_json::Value> = targets
        .into_iter()
        .map(|(id, addr)| {
            serde_json::json!({
                "targets": [addr],
                "labels": { "litework_worker": id },
            })
        })
        .collect();
    serde_json::Value::Array(groups).to_string()
}

/// A word as it would be typed at a shell prompt.
fn shell_word(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+=:,@".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Progress of a run on standard error.
enum Progress {
    Bar(indicatif::ProgressBar),
    Log { last: Option<Instant> },
    Off,
}

impl Progress {
    fn new(mode: ProgressMode) -> Progress {
        let terminal = std::io::stderr().is_terminal();
        match mode {
            ProgressMode::Bar | ProgressMode::Auto if terminal || mode == ProgressMode::Bar => {
                let bar = indicatif::ProgressBar::new(0);
                let style = indicatif::ProgressStyle::with_template(
                    "{elapsed_precise} [{wide_bar}] {pos}/{len} {per_sec} eta {eta} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
                bar.set_style(style);
                Progress::Bar(bar)
            }
            ProgressMode::None => Progress::Off,
            _ => Progress::Log { last: None },
        }
    }

    fn tick(&mut self, s: &StatusReport) {
        match self {
            Progress::Bar(bar) => {
                bar.set_length(s.total);
                bar.set_position(s.done + s.failed);
                bar.set_message(format!(
                    "done {} failed {} running {}",
                    s.done, s.failed, s.running
                ));
            }
            Progress::Log { last } => {
                if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                    *last = Some(Instant::now());
                    tracing::info!(
                        done = s.done,
                        failed = s.failed,
                        running = s.running,
                        pending = s.pending,
                        total = s.total,
                        rate = format!("{:.1}/s", s.done_per_s + s.failed_per_s),
                        "progress"
                    );
                }
            }
            Progress::Off => {}
        }
    }

    fn finish(&mut self) {
        if let Progress::Bar(bar) = self {
            bar.finish();
        }
    }
}

/// The metrics endpoints' access settings, from `--web-config`.
fn web_config(args: &WorkerArgs) -> litework::Result<WebConfig> {
    match &args.web_config {
        Some(path) => WebConfig::load(path),
        None => Ok(WebConfig::default()),
    }
}

/// The command runner `args` describe, checked.
fn worker_spec(args: &WorkerArgs) -> litework::Result<CommandSpec> {
    let mode = match (args.stdin, args.shell) {
        (true, _) => PayloadMode::Stdin,
        (_, true) => PayloadMode::Shell,
        _ => PayloadMode::Argument,
    };
    let mut spec = CommandSpec::new(args.command.clone(), mode)?;
    spec.max_output = args.max_output;
    spec.permanent_exit = args.permanent_exit.clone();
    spec.limits = Limits {
        cpu_seconds: args.limit_cpu,
        address_space: args.limit_memory,
        open_files: args.limit_files,
        file_size: args.limit_file_size,
    };
    spec.limits.check()?;
    Ok(spec)
}

fn worker(queue: Queue, args: WorkerArgs) -> anyhow::Result<ExitCode> {
    // The only place a signal handler is installed, and the first thing
    // done: a supervisor stopping at once passes its SIGTERM on to a worker
    // still starting, which must stop, not die of it. The worker itself
    // just listens on the channel; a second signal skips the drain.
    let (tx, stop) = crossbeam_channel::bounded(4);
    let signalled = tx.clone();
    ctrlc::set_handler(move || {
        let _ = signalled.try_send(());
    })
    .context("installing the SIGINT/SIGTERM handler")?;
    let mut spec = worker_spec(&args)?;
    let id = args
        .worker_id
        .clone()
        .unwrap_or_else(litework::worker::new_worker_id);
    let exe = std::env::current_exe().context("finding the litework executable")?;
    let keeper = std::sync::Arc::new(Keeper::start(&exe, &id)?);
    spec.keeper = Some(keeper.clone());
    spec.worker_id = id.clone();
    let config = WorkerConfig {
        id: Some(id),
        concurrency: args
            .concurrency
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        lease: args.lease,
        timeout: args.timeout,
        follow: args.follow,
        drain_timeout: args.drain_timeout,
        backoff: Backoff {
            base: args.backoff_base,
            max: args.backoff_max,
        },
        idle_poll: args.idle_poll,
        watch_commits: !args.poll_only,
        sweep_interval: args.sweep_interval,
        metrics_addr: None,
    };
    let mut worker = Worker::new(queue, config, spec);
    // Bound before any work starts: a busy port is a start-up error.
    let addr = args.metrics_addr.as_deref().unwrap_or("127.0.0.1:0");
    let registry = worker.metrics().registry().clone();
    let exporter = Exporter::serve(addr, registry, None, web_config(&args)?)?;
    worker.advertise_metrics(exporter.addr());
    tracing::debug!(addr = %exporter.addr(), "serving metrics");

    if args.supervised {
        // The supervisor holds the other end of our stdin; end-of-file means
        // it is gone, and we must not outlive it: stop now (two signals).
        let lifeline = tx.clone();
        std::thread::Builder::new()
            .name("lifeline".into())
            .spawn(move || {
                let mut sink = [0u8; 64];
                let mut stdin = std::io::stdin().lock();
                while matches!(std::io::Read::read(&mut stdin, &mut sink), Ok(n) if n > 0) {}
                let _ = lifeline.try_send(());
                let _ = lifeline.try_send(());
            })
            .context("starting the lifeline thread")?;
    }

    let report = worker.run(stop)?;
    keeper.finish();
    if !args.supervised {
        note!(
            "worker {}: {} done, {} retried, {} failed, {} lost leases, {} released",
            report.id,
            report.done,
            report.retried,
            report.failed,
            report.lost,
            report.released
        );
    }
    Ok(if report.failed > 0 {
        ExitCode::from(EXIT_ITEMS_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

fn status(queue: Queue, args: StatusArgs) -> anyhow::Result<ExitCode> {
    if args.recount {
        queue.session()?.recount()?;
    }
    let s = queue.status()?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &s)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(out, "{}", queue.path().display())?;
    for (name, n) in [
        ("pending", s.pending),
        ("running", s.running),
        ("done", s.done),
        ("failed", s.failed),
        ("total", s.total),
    ] {
        writeln!(out, "  {name:<8} {n:>12}")?;
    }
    writeln!(
        out,
        "  rate     {:>12.1} done/s, {:.1} failed/s (last minute)",
        s.done_per_s, s.failed_per_s
    )?;
    match s.oldest_ready_age_s {
        Some(age) => writeln!(out, "  oldest ready item waiting {age:.1}s")?,
        None => writeln!(out, "  no item ready to run")?,
    }
    writeln!(out, "  workers  {:>12} running", s.workers)?;
    Ok(ExitCode::SUCCESS)
}

fn list(queue: Queue, args: ListArgs) -> anyhow::Result<ExitCode> {
    let rows = queue.session()?.list(args.status, Some(args.limit))?;
    let mut out = std::io::stdout().lock();
    if args.json {
        for row in &rows {
            serde_json::to_writer(&mut out, &row_json(row))?;
            writeln!(out)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let width = if std::io::stdout().is_terminal() {
        40
    } else {
        60
    };
    writeln!(
        out,
        "{:>8}  {:<8} {:>8}  {:<width$}  LAST ERROR",
        "ID", "STATUS", "ATTEMPTS", "PAYLOAD"
    )?;
    for r in &rows {
        let payload = one_line(&String::from_utf8_lossy(&r.payload), width);
        let error = r
            .last_error
            .as_deref()
            .map(|e| one_line(e, 100))
            .unwrap_or_default();
        let attempts = format!("{}/{}", r.attempts, r.max_attempts);
        writeln!(
            out,
            "{:>8}  {:<8} {:>8}  {:<width$}  {error}",
            r.id, r.status, attempts, payload
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn retry(queue: Queue, args: RetryArgs) -> anyhow::Result<ExitCode> {
    let mut session = queue.session()?;
    if args.ids.is_empty() {
        let n = session.retry_failed()?;
        note!("{} failed items back to pending", n);
    } else {
        let report = session.retry_ids(&args.ids)?;
        note!("{} items back to pending", report.retried);
        if !report.running.is_empty() {
            let ids: Vec<String> = report.running.iter().map(i64::to_string).collect();
            note!(
                "left running (their worker still holds them): {}",
                ids.join(", ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn requeue(queue: Queue, args: RequeueArgs) -> anyhow::Result<ExitCode> {
    let moved = match &args.worker {
        Some(w) => {
            // A mistyped id would requeue nothing and say so as if done.
            if !queue.session()?.knows_worker(w)? {
                return Err(litework::Error::NoSuchWorker {
                    path: queue.path().to_path_buf(),
                    id: w.clone(),
                }
                .into());
            }
            queue.requeue_worker(w)?
        }
        None => queue.requeue_expired()?,
    };
    note!(
        "requeued {} items ({} back to pending, {} of them never started; \
         {} out of attempts and now failed)",
        moved.total(),
        moved.pending,
        moved.never_started,
        moved.failed
    );
    Ok(ExitCode::SUCCESS)
}

fn export(queue: Queue, args: ExportArgs) -> anyhow::Result<ExitCode> {
    let sink: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(
            std::fs::File::create(p).with_context(|| format!("{}: cannot create", p.display()))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut out = BufWriter::new(sink);
    let mut session = queue.session()?;
    match args.format {
        ExportFormat::Jsonl => session.each_item(args.status, None, |row| {
            serde_json::to_writer(&mut out, &row_json(&row))?;
            out.write_all(b"\n")
        })?,
        ExportFormat::Csv => {
            let mut w = csv::Writer::from_writer(&mut out);
            w.write_record(CSV_COLUMNS)?;
            session.each_item(args.status, None, |row| {
                // Text goes in the plain column; bytes that are not UTF-8 in
                // the `_base64` one, so the two can never be confused.
                let split = |b: Option<&[u8]>| match b.map(std::str::from_utf8) {
                    None => (String::new(), String::new()),
                    Some(Ok(s)) => (s.to_string(), String::new()),
                    Some(Err(_)) => (String::new(), b.map(b64).unwrap_or_default()),
                };
                let (payload, payload_b64) = split(Some(&row.payload));
                let (result, result_b64) = split(row.result.as_deref());
                w.write_record([
                    row.id.to_string(),
                    row.key.clone().unwrap_or_default(),
                    row.status.clone(),
                    row.attempts.to_string(),
                    payload,
                    payload_b64,
                    result,
                    result_b64,
                    row.last_error.clone().unwrap_or_default(),
                ])
                .map_err(std::io::Error::other)
            })?;
            w.flush()?;
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

const CSV_COLUMNS: [&str; 9] = [
    "id",
    "key",
    "status",
    "attempts",
    "payload",
    "payload_base64",
    "result",
    "result_base64",
    "error",
];

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// An item as one JSON object; bytes that are not UTF-8 go in `*_base64`.
fn row_json(r: &ItemRow) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("id".into(), r.id.into());
    m.insert("key".into(), r.key.clone().into());
    m.insert("status".into(), r.status.clone().into());
    m.insert("priority".into(), r.priority.into());
    m.insert("attempts".into(), r.attempts.into());
    m.insert("max_attempts".into(), r.max_attempts.into());
    let mut bytes = |name: &str, b: &[u8]| match std::str::from_utf8(b) {
        Ok(s) => m.insert(name.into(), s.into()),
        Err(_) => m.insert(format!("{name}_base64"), b64(b).into()),
    };
    bytes("payload", &r.payload);
    match &r.result {
        Some(res) => bytes("result", res),
        None => None,
    };
    m.insert("error".into(), r.last_error.clone().into());
    m.insert("created_at_ms".into(), r.created_at.into());
    m.insert("finished_at_ms".into(), r.finished_at.into());
    serde_json::Value::Object(m)
}

fn one_line(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        flat
    } else {
        let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use litework::queue::WorkerInfo;

    #[test]
    fn discovery_lists_running_workers_with_an_address_and_is_empty_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let queue = Queue::create(dir.path().join("q.db")).unwrap();
        assert_eq!(discovery(&queue), "[]");
        let mut s = queue.session().unwrap();
        for (id, addr) in [("w1", Some("127.0.0.1:1234")), ("w2", None)] {
            s.register_worker(&WorkerInfo {
                id: id.into(),
                pid: 1,
                host: "h".into(),
                metrics_addr: addr.map(String::from),
            })
            .unwrap();
        }
        let want = r#"[{"labels":{"litework_worker":"w1"},"targets":["127.0.0.1:1234"]}]"#;
        assert_eq!(discovery(&queue), want);
        s.worker_stopped("w1").unwrap();
        assert_eq!(discovery(&queue), "[]");
    }
}
