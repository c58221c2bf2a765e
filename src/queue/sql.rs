//! The statements that change item state, one per state change.
//!
//! Every statement that records the result of a lease names the lease it
//! expects (`id`, `lease_token`, `status = 'running'`). Dropping any of
//! those three conditions would still pass a single-worker test, but would
//! let a worker whose lease was taken away overwrite the outcome recorded by
//! the worker that holds the item now.
//!
//! No trigger keeps the `counts` and `throughput` tables: whoever runs one
//! of these statements adds what it moved with [`COUNT`] and [`FINISHED`]
//! in the same transaction (see `Moves` in the module above).
//!
//! `run_after = 0` means ready. Statements that may change many rows say
//! `UPDATE OR FAIL`: a failing constraint then fails the statement without
//! undoing its earlier rows, which spares SQLite a statement journal (a
//! copy of every page it touches), and the caller rolls the whole
//! transaction back on any error anyway.

/// Makes the waiting items whose time has come ready. ?1 now.
pub const PROMOTE: &str = "
UPDATE OR FAIL items
SET run_after = 0
WHERE status = 'pending' AND run_after > 0 AND run_after <= ?1";

/// The ready items, in claim order: highest priority, then oldest. The
/// caller reads as many rows as it claims and stops; the index gives them
/// in order, so nothing past those is read. (A `LIMIT ?` would cost more:
/// SQLite plans with the bound limit and compiles the statement again
/// whenever a different one is bound.) [`LEASE`] then leases exactly
/// these rows in the same transaction: reading them first and changing
/// them by id costs less than one `UPDATE ... RETURNING` (which keeps
/// every returned row in a temporary table until the statement ends).
pub const READY: &str = "
SELECT id, payload, key, priority, attempts, max_attempts, lease_token
FROM items
WHERE status = 'pending' AND run_after = 0
ORDER BY priority DESC, id";

/// Leases the items [`READY`] returned. ?1 their ids (an `rarray`),
/// ?2 worker, ?3 now, ?4 lease length in ms.
pub const LEASE: &str = "
UPDATE OR FAIL items
SET status        = 'running',
    attempts      = attempts + 1,
    lease_token   = lease_token + 1,
    lease_owner   = ?2,
    lease_expires = ?3 + ?4,
    started_at    = ?3
WHERE id IN rarray(?1) AND status = 'pending' AND run_after = 0";

/// ?1 id, ?2 token, ?3 result, ?4 now.
pub const COMPLETE: &str = "
UPDATE items
SET status        = 'done',
    result        = ?3,
    last_error    = NULL,
    lease_owner   = NULL,
    lease_expires = NULL,
    finished_at   = ?4
WHERE id = ?1 AND lease_token = ?2 AND status = 'running'";

/// Records `rows` successes at once: ?1 now, then id, token and result
/// for each. Returns `(id, lease_token)` of each row it changed; a lease
/// not among them was lost. Each row is fenced exactly as [`COMPLETE`].
pub fn complete(rows: usize) -> String {
    let mut sql = String::from(
        "UPDATE OR FAIL items
SET status        = 'done',
    result        = v.column3,
    last_error    = NULL,
    lease_owner   = NULL,
    lease_expires = NULL,
    finished_at   = ?1
FROM (VALUES ",
    );
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push_str("(?, ?, ?)");
    }
    sql.push_str(
        ") AS v
WHERE items.id = v.column1 AND items.lease_token = v.column2 AND items.status = 'running'
RETURNING items.id, items.lease_token",
    );
    sql
}

/// ?1 id, ?2 token, ?3 now, ?4 outcome, ?5 error. Runs before [`FAIL`],
/// while the row still shows the lease it records.
pub const HISTORY: &str = "
INSERT INTO attempts (item_id, attempt, worker, started_at, ended_at, outcome, error)
SELECT id, attempts, lease_owner, started_at, ?3, ?4, ?5
FROM items
WHERE id = ?1 AND lease_token = ?2 AND status = 'running'";

/// ?1 id, ?2 token, ?3 new status, ?4 run_after (0: ready now), ?5 error,
/// ?6 now.
pub const FAIL: &str = "
UPDATE items
SET status        = ?3,
    run_after     = ?4,
    last_error    = ?5,
    lease_owner   = NULL,
    lease_expires = NULL,
    finished_at   = CASE ?3 WHEN 'failed' THEN ?6 END
WHERE id = ?1 AND lease_token = ?2 AND status = 'running'";

/// ?1 id, ?2 token. Gives the attempt back: the item did not fail,
/// the worker chose to stop.
pub const RELEASE: &str = "
UPDATE items
SET status        = 'pending',
    attempts      = attempts - 1,
    run_after     = 0,
    lease_owner   = NULL,
    lease_expires = NULL
WHERE id = ?1 AND lease_token = ?2 AND status = 'running'";

/// ?1 id, ?2 token, ?3 new expiry.
pub const EXTEND: &str = "
UPDATE items
SET lease_expires = ?3
WHERE id = ?1 AND lease_token = ?2 AND status = 'running'";

/// Requeues of leases nobody will complete, with the same parameters for
/// each statement below: ?1 the worker, ?2 the expiry cutoff (only with
/// `expired`: leases that expired before it), ?3 and ?4 the one lease
/// (id, token) to take (only with `one`), ?5 now, ?6 `'died'` (the worker
/// is known dead) or `'expired'`.
fn leases_of(one: bool, expired: bool) -> String {
    let mut cond = String::from("status = 'running' AND lease_owner = ?1");
    if one {
        // By id first: a row lookup, not a walk of the running items.
        cond = format!("id = ?3 AND lease_token = ?4 AND {cond}");
    }
    if expired {
        cond.push_str(" AND lease_expires < ?2");
    }
    cond
}

/// History rows for the leases [`lost`] takes: an item that was running.
pub fn lost_history(one: bool, expired: bool) -> String {
    format!(
        "INSERT INTO attempts (item_id, attempt, worker, started_at, ended_at, outcome, error)
SELECT id, attempts, lease_owner, started_at, ?5, 'lost',
       CASE ?6 WHEN 'died' THEN 'worker ' || lease_owner || ' died while running this item'
               ELSE 'lease of worker ' || lease_owner || ' expired (worker died or stalled)' END
FROM items
WHERE {}",
        leases_of(one, expired)
    )
}

/// Takes leases of items that were running: the attempt is not given
/// back, so an item that kills its worker every time ends `failed`.
pub fn lost(one: bool, expired: bool) -> String {
    format!(
        "UPDATE OR FAIL items
SET status        = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'pending' END,
    last_error    = CASE ?6
                        WHEN 'died' THEN 'worker ' || lease_owner
                            || ' died while running this item (attempt '
                        ELSE 'lease of worker ' || lease_owner
                            || ' expired while running this item (worker died or stalled; attempt '
                    END || attempts || ' of ' || max_attempts || ')',
    run_after     = 0,
    lease_owner   = NULL,
    lease_expires = NULL,
    finished_at   = CASE WHEN attempts >= max_attempts THEN ?5 END
WHERE {}
RETURNING status",
        leases_of(one, expired)
    )
}

/// Takes the leases no executor was running (claimed ahead, never run)
/// and gives their attempt back, `max_attempts` times per item: an item
/// held each time its worker dies, without ever being seen running (it
/// could kill the worker before it starts: a payload too large for its
/// memory), is then charged like a running one.
pub fn never_started(expired: bool) -> String {
    format!(
        "UPDATE OR FAIL items
SET given_back    = given_back + 1,
    attempts      = attempts - (given_back < max_attempts),
    status        = CASE WHEN given_back >= max_attempts AND attempts >= max_attempts
                         THEN 'failed' ELSE 'pending' END,
    last_error    = CASE WHEN given_back >= max_attempts
                         THEN 'held by worker ' || lease_owner || ' each time it died ('
                              || (given_back + 1) || ' times)'
                         ELSE last_error END,
    finished_at   = CASE WHEN given_back >= max_attempts AND attempts >= max_attempts
                         THEN ?5 END,
    run_after     = 0,
    lease_owner   = NULL,
    lease_expires = NULL
WHERE {} AND ?6 IS NOT NULL
RETURNING status",
        leases_of(false, expired)
    )
}

/// History rows for the leases [`never_started`] charges rather than
/// gives back: an item held at every death, past its give-backs.
pub fn never_started_history(expired: bool) -> String {
    format!(
        "INSERT INTO attempts (item_id, attempt, worker, started_at, ended_at, outcome, error)
SELECT id, attempts, lease_owner, started_at, ?5, 'lost',
       'held by worker ' || lease_owner || ' each time it died (' || (given_back + 1) || ' times)'
FROM items
WHERE {} AND ?6 IS NOT NULL AND given_back >= max_attempts",
        leases_of(false, expired)
    )
}

/// Workers holding leases that expired before ?1.
pub const EXPIRED_OWNERS: &str = "
SELECT DISTINCT lease_owner FROM items WHERE status = 'running' AND lease_expires < ?1";

/// Inserts `rows` items, six parameters each: payload, key, priority,
/// max attempts, run_after (0: ready now), now. A key already present
/// skips its row.
pub fn insert(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT OR FAIL INTO items
    (payload, key, priority, max_attempts, run_after, created_at)
VALUES ",
    );
    for row in 0..rows {
        if row > 0 {
            sql.push_str(",\n       ");
        }
        sql.push_str("(?, ?, ?, ?, ?, ?)");
    }
    sql.push_str("\nON CONFLICT (key) DO NOTHING");
    sql
}

/// ?1 id. Fresh attempts for a failed, done or waiting item; a running
/// item is left to its worker.
pub const RETRY: &str = "
UPDATE items
SET status      = 'pending',
    attempts    = 0,
    given_back  = 0,
    run_after   = 0,
    result      = NULL,
    finished_at = NULL
WHERE id = ?1 AND status IN ('failed', 'done', 'pending')";

pub const RETRY_FAILED: &str = "
UPDATE OR FAIL items
SET status      = 'pending',
    attempts    = 0,
    given_back  = 0,
    run_after   = 0,
    finished_at = NULL
WHERE status = 'failed'";

/// ?1 id, ?2 pid, ?3 host, ?4 now, ?5 metrics address or NULL.
pub const REGISTER_WORKER: &str = "
INSERT INTO workers (id, pid, host, started_at, heartbeat_at, metrics_addr)
VALUES (?1, ?2, ?3, ?4, ?4, ?5)";

/// ?1 id, ?2 now.
pub const WORKER_HEARTBEAT: &str = "
UPDATE workers SET heartbeat_at = ?2 WHERE id = ?1 AND status = 'running'";

/// ?1 id, ?2 outcomes recorded.
pub const WORKER_FINISHED: &str = "
UPDATE workers SET finished = finished + ?2 WHERE id = ?1";

/// ?1 id, ?2 now, ?3 'stopped' or 'dead'.
pub const WORKER_GONE: &str = "
UPDATE workers SET status = ?3, stopped_at = ?2 WHERE id = ?1 AND status = 'running'";

/// The next item a claim would take, for the age of the queue's head.
/// (Items whose delay passed since the last claim are not ready until the
/// next claim moves them.)
pub const HEAD: &str = "
SELECT created_at
FROM items
WHERE status = 'pending' AND run_after = 0
ORDER BY priority DESC, id
LIMIT 1";

/// When the next waiting item is due.
pub const NEXT_DUE: &str = "
SELECT min(run_after) FROM items WHERE status = 'pending' AND run_after > 0";

/// Whether any item is ready to claim: one step into `items_ready`.
pub const ANY_READY: &str = "
SELECT EXISTS (SELECT 1 FROM items WHERE status = 'pending' AND run_after = 0)";

/// Adds to the kept counts. ?1 pending, ?2 running, ?3 done, ?4 failed.
pub const COUNT: &str = "
UPDATE counts
SET n = n + CASE status WHEN 'pending' THEN ?1 WHEN 'running' THEN ?2
                        WHEN 'done' THEN ?3 WHEN 'failed' THEN ?4 ELSE 0 END";

/// Adds to the per-second finish counts. ?1 second, ?2 done, ?3 failed.
pub const FINISHED: &str = "
INSERT INTO throughput (second, done, failed)
VALUES (?1, ?2, ?3)
ON CONFLICT (second) DO UPDATE
SET done = done + excluded.done,
    failed = failed + excluded.failed";

/// Counts taken afresh from the items: `status --recount`.
pub const RECOUNT: &str = "
UPDATE counts SET n = (SELECT count(*) FROM items WHERE items.status = counts.status)";

/// Items finished in a window of seconds. ?1 from, ?2 to (exclusive).
pub const RATES: &str = "
SELECT coalesce(sum(done), 0), coalesce(sum(failed), 0)
FROM throughput
WHERE second >= ?1 AND second < ?2";

/// `(pending, running)` from the maintained counts.
pub const OPEN_COUNTS: &str = "
SELECT coalesce(sum(n) FILTER (WHERE status = 'pending'), 0),
       coalesce(sum(n) FILTER (WHERE status = 'running'), 0)
FROM counts";

/// Items for `list` and `export`. ?1 status or NULL for all, ?2 limit
/// (-1 for none).
pub const ITEMS: &str = "
SELECT id, key, status, priority, attempts, max_attempts, payload, result,
       last_error, created_at, finished_at
FROM items
WHERE ?1 IS NULL OR status = ?1
ORDER BY id
LIMIT ?2";

/// Moves the items of an attached staging file `incoming` in. The `WHERE
/// true` keeps SQLite from reading `ON CONFLICT` as part of the SELECT.
pub const TAKE_ITEMS: &str = "
INSERT INTO items (payload, key, priority, max_attempts, run_after, created_at)
SELECT payload, key, priority, max_attempts, run_after, created_at
FROM incoming.items
WHERE true
ORDER BY id
ON CONFLICT (key) DO NOTHING";
