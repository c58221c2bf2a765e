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

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

static WAITS: AtomicU64 = AtomicU64::new(0);
static WAITED_NANOS: AtomicU64 = AtomicU64::new(0);
static LIMIT_MILLIS: AtomicU64 = AtomicU64::new(60_000);

thread_local! {
    /// When the current lock wait on this thread began.
    static WAIT_STARTED: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// How many times any connection of this process slept waiting for a lock.
pub fn waits() -> u64 {
    WAITS.load(Ordering::Relaxed)
}

/// Total time this process spent asleep waiting for locks.
pub fn waited() -> Duration {
    Duration::from_nanos(WAITED_NANOS.load(Ordering::Relaxed))
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
