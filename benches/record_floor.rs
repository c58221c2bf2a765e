//! The floor under "25% of raw": how fast litework's own code records
//! outcomes when claiming costs nothing.
//!
//! P processes each claim their share of a new queue (not timed), wait
//! until all are ready, then record every item `done` through
//! `Session::turn`, 256 per transaction, as a worker's group commit does.
//! That is the record half of an item's cost alone. It runs twice: on the
//! schema as it is, and with the `items_leased` index dropped, which is
//! what a claim that writes no item row (a lease on a range of items)
//! would leave to the record. Raw SQLite (one process, 100 consecutive
//! rows per transaction, as `litework bench` measures it) runs in the
//! same round, and each round is repeated.
//!
//!     cargo bench --bench record_floor -- [ITEMS] [PROCESSES] [ROUNDS]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use litework::queue::{Completion, NewItem, Options, Queue, Turn};

/// Items per transaction, claimed and recorded.
const BATCH: usize = 256;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.first().map(String::as_str) == Some("record") {
        let db = args.get(1).context("record: no database")?;
        let share: usize = args.get(2).context("record: no share")?.parse()?;
        return record(Path::new(db), share);
    }
    let items: usize = args.first().map_or(Ok(400_000), |a| a.parse())?;
    let procs: usize = args.get(1).map_or(Ok(4), |a| a.parse())?;
    let rounds: usize = args.get(2).map_or(Ok(3), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    let template = dir.path().join("template.db");
    let queue = Queue::create(&template)?;
    queue.add((1..=items).map(|i| Ok(NewItem::new(i.to_string()))), 3)?;
    drop(queue);

    println!("record-only floor: {items} items, {procs} processes, {BATCH} per transaction");
    let mut shares = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let raw = raw_updates(&dir.path().join("raw.db"))?;
        let with = timed_records(dir.path(), &template, items, procs, false)?;
        let without = timed_records(dir.path(), &template, items, procs, true)?;
        println!(
            "  round {round}: raw {raw:.0} row updates/s; recording {with:.0} items/s ({:.1}% \
             of raw); without items_leased {without:.0} items/s ({:.1}%)",
            100.0 * with / raw,
            100.0 * without / raw
        );
        shares.0.push(with / raw);
        shares.1.push(without / raw);
    }
    println!(
        "  median share of raw: {:.1}% as is, {:.1}% without items_leased",
        100.0 * median(&mut shares.0),
        100.0 * median(&mut shares.1)
    );
    Ok(())
}

/// One child: claims `share` items, says "ready", waits for a line on
/// standard input, then records them all.
fn record(db: &Path, share: usize) -> anyhow::Result<()> {
    let queue = Queue::open(db)?;
    let mut session = queue.session()?;
    let worker = format!("floor-{}", std::process::id());
    let lease = Duration::from_secs(3600);
    let mut jobs = Vec::with_capacity(share);
    while jobs.len() < share {
        let turn = Turn {
            claim: BATCH.min(share - jobs.len()),
            ..Turn::default()
        };
        let got = session.turn(&worker, lease, &turn)?.claimed;
        if got.is_empty() {
            bail!("claimed {} of {share} items", jobs.len());
        }
        jobs.extend(got);
    }
    println!("ready");
    std::io::stdout().flush()?;
    let mut go = String::new();
    std::io::stdin().read_line(&mut go)?;
    for chunk in jobs.chunks(BATCH) {
        let turn = Turn {
            finished: chunk
                .iter()
                .map(|job| (job.clone(), Completion::Done { result: Vec::new() }))
                .collect(),
            ..Turn::default()
        };
        session.turn(&worker, lease, &turn)?;
    }
    Ok(())
}

/// Items recorded per second by `procs` children on a copy of `template`.
fn timed_records(
    dir: &Path,
    template: &Path,
    items: usize,
    procs: usize,
    without_lease_index: bool,
) -> anyhow::Result<f64> {
    let db = dir.join("floor.db");
    remove_db(&db);
    std::fs::copy(template, &db)?;
    if without_lease_index {
        litework::queue::plain_connection(&db, false)?.execute_batch("DROP INDEX items_leased")?;
    }
    let me = std::env::current_exe()?;
    let mut children = Vec::new();
    for p in 0..procs {
        let share = items / procs + usize::from(p < items % procs);
        let mut child = Command::new(&me)
            .arg("record")
            .arg(&db)
            .arg(share.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let out = child.stdout.take().context("child stdout")?;
        children.push((child, BufReader::new(out)));
    }
    for (_, out) in &mut children {
        let mut line = String::new();
        out.read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("a recording process failed before it was ready");
        }
    }
    let started = Instant::now();
    for (child, _) in &mut children {
        writeln!(child.stdin.as_mut().context("child stdin")?, "go")?;
    }
    for (mut child, _) in children {
        if !child.wait()?.success() {
            bail!("a recording process failed");
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let status = Queue::open_with(&db, &Options::default())?.status()?;
    let done = status.done;
    if done != items as u64 {
        bail!("{done} of {items} items recorded done");
    }
    Ok(items as f64 / secs)
}

/// `litework bench`'s raw SQLite figure: 100 consecutive rows updated per
/// transaction for one second, in row updates per second.
fn raw_updates(path: &Path) -> anyhow::Result<f64> {
    remove_db(path);
    let mut conn = litework::queue::plain_connection(path, false)?;
    conn.execute_batch(
        "CREATE TABLE raw (id INTEGER PRIMARY KEY, n INTEGER NOT NULL);
         WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < 100000)
         INSERT INTO raw (id, n) SELECT i, 0 FROM k;",
    )?;
    let mut rows = 0u64;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(1) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut update = tx.prepare_cached("UPDATE raw SET n = n + 1 WHERE id = ?1")?;
            let first = rows % 100_000;
            for id in first + 1..=first + 100 {
                update.execute([id as i64])?;
            }
        }
        tx.commit()?;
        rows += 100;
    }
    Ok(rows as f64 / started.elapsed().as_secs_f64())
}

/// Removes a database file left by the previous round, with its WAL.
fn remove_db(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        // Missing on the first round.
        let _ = std::fs::remove_file(name);
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 0 {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}
