//! The verbs, built on the library.

use std::io::{BufRead, BufReader, BufWriter, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Context;
use base64::Engine;

use litework::exec::{CommandSpec, PayloadMode};
use litework::input::{Defaults, Records};
use litework::queue::{self, Backoff, ItemRow, Queue};
use litework::worker::{Worker, WorkerConfig};

use crate::cli::{
    AddArgs, Cli, Command, ExportArgs, ExportFormat, ListArgs, RequeueArgs, RetryArgs, StatusArgs,
    WorkerArgs,
};

/// Some items ended failed.
const EXIT_ITEMS_FAILED: u8 = 1;

pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let opts = |create: bool| queue::Options {
        create,
        durable: cli.durable,
        ..queue::Options::default()
    };
    let open = |create: bool| Queue::open_with(&cli.db, &opts(create));
    match cli.command {
        Command::Init => {
            open(true)?;
            eprintln!("{}: ready", cli.db.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Add(args) => add(&cli.db, args, opts(true)),
        Command::Worker(args) => worker(open(false)?, args),
        Command::Status(args) => status(open(false)?, args),
        Command::List(args) => list(open(false)?, args),
        Command::Retry(args) => retry(open(false)?, args),
        Command::RequeueStale(args) => requeue(open(false)?, args),
        Command::Export(args) => export(open(false)?, args),
    }
}

fn add(db: &std::path::Path, args: AddArgs, opts: queue::Options) -> anyhow::Result<ExitCode> {
    let defaults = Defaults {
        key_from_payload: args.key_from_payload,
        priority: args.priority,
        max_attempts: Some(args.max_attempts),
        delay: args.delay,
        max_record: args.max_record,
    };
    let (reader, name): (Box<dyn BufRead>, String) = match &args.input {
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
    let mut records = Records::new(reader, name.clone(), args.format, defaults).peekable();
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
    let queue = Queue::open_with(db, &opts)?;
    let report = queue.add(records, args.max_attempts)?;
    eprintln!(
        "{}: added {} items ({} already present)",
        db.display(),
        report.added,
        report.duplicates
    );
    Ok(ExitCode::SUCCESS)
}

fn worker(queue: Queue, args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let mode = match (args.stdin, args.shell) {
        (true, _) => PayloadMode::Stdin,
        (_, true) => PayloadMode::Shell,
        _ => PayloadMode::Argument,
    };
    let mut spec = CommandSpec::new(args.command, mode)?;
    let config = WorkerConfig {
        id: args.worker_id,
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
        sweep_interval: args.sweep_interval,
    };
    if config.concurrency == 0 {
        return Err(litework::Error::Config("--concurrency must be at least 1".into()).into());
    }
    if config.lease < std::time::Duration::from_millis(300) {
        return Err(litework::Error::Config("--lease must be at least 300ms".into()).into());
    }
    spec.max_output = args.max_output;
    spec.permanent_exit = args.permanent_exit;
    let worker = {
        let id = config
            .id
            .clone()
            .unwrap_or_else(litework::worker::new_worker_id);
        spec.worker_id = id.clone();
        Worker::new(
            queue,
            WorkerConfig {
                id: Some(id),
                ..config
            },
            spec,
        )
    };

    // The only place a signal handler is installed; the worker itself just
    // listens on a channel. A second signal skips the drain.
    let (tx, stop) = crossbeam_channel::bounded(4);
    ctrlc::set_handler(move || {
        let _ = tx.try_send(());
    })
    .context("installing the SIGINT/SIGTERM handler")?;

    let report = worker.run(stop)?;
    eprintln!(
        "worker {}: {} done, {} retried, {} failed, {} lost leases, {} released",
        report.id, report.done, report.retried, report.failed, report.lost, report.released
    );
    Ok(if report.failed > 0 {
        ExitCode::from(EXIT_ITEMS_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

fn status(queue: Queue, args: StatusArgs) -> anyhow::Result<ExitCode> {
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
        eprintln!("{} failed items back to pending", n);
    } else {
        let report = session.retry_ids(&args.ids)?;
        eprintln!("{} items back to pending", report.retried);
        if !report.running.is_empty() {
            let ids: Vec<String> = report.running.iter().map(i64::to_string).collect();
            eprintln!(
                "left running (their worker still holds them): {}",
                ids.join(", ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn requeue(queue: Queue, args: RequeueArgs) -> anyhow::Result<ExitCode> {
    let moved = match &args.worker {
        Some(w) => queue.requeue_worker(w)?,
        None => queue.requeue_expired()?,
    };
    eprintln!(
        "requeued {} items ({} back to pending, {} out of attempts and now failed)",
        moved.total(),
        moved.pending,
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
            w.write_record([
                "id", "key", "status", "attempts", "payload", "result", "error",
            ])?;
            session.each_item(args.status, None, |row| {
                let text = |b: &[u8]| match std::str::from_utf8(b) {
                    Ok(s) => s.to_string(),
                    Err(_) => format!("base64:{}", b64(b)),
                };
                w.write_record([
                    row.id.to_string(),
                    row.key.clone().unwrap_or_default(),
                    row.status.clone(),
                    row.attempts.to_string(),
                    text(&row.payload),
                    row.result.as_deref().map(text).unwrap_or_default(),
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
