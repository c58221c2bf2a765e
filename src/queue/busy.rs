//! Waiting out `SQLITE_BUSY`.
//!
//! Every write runs in a `BEGIN IMMEDIATE` transaction, so the only lock a
//! connection ever waits for is the single WAL write lock, and waiting for
//! it cannot deadlock. SQLite's own `busy_timeout` sleeps in steps of up to
//! 100 ms, far longer than a litework write transaction holds the lock, so
//! under contention most of the time would be spent asleep after the lock
//! was already free. This handler starts at tens of microseconds, backs off
//! exponentially to a few milliseconds, and adds jitter so that waiting
//! workers do not wake in lockstep.
//!
//! `rusqlite` takes a plain `fn` pointer as the handler, so the counters
//! and the limit are process-wide statics; the metrics exporter reads them.
//!
//! The other side of waiting is holding: [`held`] adds up how long this
//! process's write transactions kept the lock. Summed over all processes
//! and divided by the wall time, it says how busy the one write lock was;
//! near 100%, the lock is the bottleneck and only cheaper transactions
//! make the queue faster. The lock is let go inside `COMMIT`, before
//! SQLite's automatic checkpoint runs in the same call, so a hook on the
//! commit (see [`install`]) marks the moment; timing the whole `COMMIT`
//! counted checkpoints and the wait for a core as held, and summed to
//! over 100% on a busy machine.

use std::cell::Cell;
use std::ffi::c_int;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rusqlite::hooks::Wal;
use rusqlite::Connection;

static WAITS: AtomicU64 = AtomicU64::new(0);
static WAITED_NANOS: AtomicU64 = AtomicU64::new(0);
static LIMIT_MILLIS: AtomicU64 = AtomicU64::new(60_000);
static HELD_NANOS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// When the current lock wait on this thread began.
    static WAIT_STARTED: Cell<Option<Instant>> = const { Cell::new(None) };
    /// When the last commit on this thread let the write lock go.
    static RELEASED: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// WAL pages after which a commit checkpoints: SQLite's own default.
const AUTOCHECKPOINT_PAGES: c_int = 1000;

/// How many times any connection of this process slept waiting for a lock.
pub fn waits() -> u64 {
    WAITS.load(Ordering::Relaxed)
}

/// Total time this process spent asleep waiting for locks.
pub fn waited() -> Duration {
    Duration::from_nanos(WAITED_NANOS.load(Ordering::Relaxed))
}

/// How long this process's write transactions (those of `Session`: turns,
/// records, requeues, sweeps, adds) held the write lock: from `BEGIN
/// IMMEDIATE` getting it to the moment the commit let it go (before any
/// checkpoint), or to the end of a rollback.
pub fn held() -> Duration {
    Duration::from_nanos(HELD_NANOS.load(Ordering::Relaxed))
}

/// A write transaction on this thread got the lock: returns the moment,
/// for [`let_go`].
pub(crate) fn taken() -> Instant {
    let _ = RELEASED.try_with(|r| r.set(None));
    Instant::now()
}

/// The write transaction that got the lock at `taken` has ended: adds the
/// time until its commit let the lock go (or until now, after a rollback
/// or a commit that wrote nothing) to [`held`].
pub(crate) fn let_go(taken: Instant) {
    let end = RELEASED
        .try_with(Cell::take)
        .ok()
        .flatten()
        .unwrap_or_else(Instant::now);
    let nanos = u64::try_from(end.saturating_duration_since(taken).as_nanos());
    HELD_NANOS.fetch_add(nanos.unwrap_or(u64::MAX), Ordering::Relaxed);
}

/// Installs the commit hook behind [`held`] on `conn`. It takes the place
/// of SQLite's automatic checkpoint hook and does what that one does (a
/// passive checkpoint once the WAL holds 1000 pages), after noting when
/// the lock was let go.
///
/// Nothing may set `PRAGMA wal_autocheckpoint` on such a connection
/// afterwards: SQLite would put its own hook back, checkpoints would go on,
/// but [`held`] would silently count them (and the wait for a core after
/// the commit) again.
pub(crate) fn install(conn: &Connection) {
    conn.wal_hook(Some(committed));
}

/// Called by SQLite after each commit in WAL mode, once the write lock is
/// released, on the committing thread.
fn committed(wal: &Wal, pages: c_int) -> rusqlite::Result<()> {
    let _ = RELEASED.try_with(|r| r.set(Some(Instant::now())));
    if pages >= AUTOCHECKPOINT_PAGES {
        // An error here would fail the COMMIT that already succeeded; a
        // checkpoint that cannot run now (another one is running) is left
        // to a later commit, as SQLite's own hook does.
        let _ = wal.checkpoint();
    }
    Ok(())
}

/// Whether a commit on this thread let the write lock go since
/// [`taken`]: the hook is installed.
#[cfg(test)]
pub(crate) fn released_since_taken() -> bool {
    RELEASED.try_with(|r| r.get().is_some()).unwrap_or(false)
}

/// How long one statement may wait for the write lock before it fails.
pub fn limit() -> Duration {
    Duration::from_millis(LIMIT_MILLIS.load(Ordering::Relaxed))
}

/// Sets the process-wide limit of [`limit`].
pub fn set_limit(limit: Duration) {
    let ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX).max(1);
    LIMIT_MILLIS.store(ms, Ordering::Relaxed);
}

/// The handler installed on every connection. `count` is the number of
/// times it was already called for this same lock wait.
pub(crate) fn handler(count: i32) -> bool {
    let now = Instant::now();
    let started = WAIT_STARTED.with(|cell| {
        let started = match (count, cell.get()) {
            (0, _) | (_, None) => now,
            (_, Some(at)) => at,
        };
        cell.set(Some(started));
        started
    });
    if now.duration_since(started) >= limit() {
        return false;
    }
    // 20 µs doubling up to ~5 ms, then a random point in [50%, 100%].
    let step = 20u64 << count.clamp(0, 8);
    let micros = step / 2 + fastrand::u64(0..=step / 2);
    std::thread::sleep(Duration::from_micros(micros));
    WAITS.fetch_add(1, Ordering::Relaxed);
    // The time actually slept: a loaded machine oversleeps the nap.
    let slept = u64::try_from(now.elapsed().as_nanos()).unwrap_or(u64::MAX);
    WAITED_NANOS.fetch_add(slept, Ordering::Relaxed);
    true
}
