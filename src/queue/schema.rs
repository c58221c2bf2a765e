//! The schema, its numbered migrations, and recognising a litework file.
//!
//! A litework database carries `PRAGMA application_id` = [`APPLICATION_ID`]
//! and its schema version in `PRAGMA user_version`. Both live in the file
//! header, so they can be checked before anything is written: a file that
//! is not ours, or that a newer litework wrote, is refused untouched.
//!
//! Times are integer milliseconds since the Unix epoch. The views at the
//! end of migration 1 exist for people who debug a run with `sqlite3`.

use rusqlite::{Connection, Transaction};

/// "lwrk" in ASCII: marks a file as a litework database.
pub const APPLICATION_ID: i32 = 0x6C77_726B;

/// One step of the schema: SQL, or code where SQL cannot say it.
pub enum Migration {
    Sql(&'static str),
    Code(fn(&Transaction<'_>) -> rusqlite::Result<()>),
}

/// Migrations in order; `MIGRATIONS[n]` brings version `n` to `n + 1`.
pub const MIGRATIONS: &[Migration] = &[Migration::Sql(V1), Migration::Sql(V2), Migration::Code(v3)];

/// The schema version this build writes and understands.
pub fn latest() -> i64 {
    MIGRATIONS.len() as i64
}

const V1: &str = "
CREATE TABLE items (
    id            INTEGER PRIMARY KEY,
    payload       BLOB    NOT NULL,
    key           TEXT    UNIQUE,
    priority      INTEGER NOT NULL DEFAULT 0,
    status        TEXT    NOT NULL DEFAULT 'pending'
                          CHECK (status IN ('pending', 'running', 'done', 'failed')),
    attempts      INTEGER NOT NULL DEFAULT 0,
    max_attempts  INTEGER NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    run_after     INTEGER NOT NULL DEFAULT 0,
    lease_owner   TEXT,
    lease_expires INTEGER,
    lease_token   INTEGER NOT NULL DEFAULT 0,
    result        BLOB,
    last_error    TEXT,
    created_at    INTEGER NOT NULL,
    started_at    INTEGER,
    finished_at   INTEGER
);

-- The claim walks this index in order and stops after LIMIT rows; run_after
-- is in the key so items waiting out a backoff are skipped without reading
-- the table.
CREATE INDEX items_ready ON items (priority DESC, id, run_after) WHERE status = 'pending';

-- Sweeps and requeues look only at running items, a set as small as the
-- number of executor slots.
CREATE INDEX items_leased ON items (lease_expires) WHERE status = 'running';

CREATE TABLE attempts (
    item_id    INTEGER NOT NULL REFERENCES items (id) ON DELETE CASCADE,
    attempt    INTEGER NOT NULL,
    worker     TEXT,
    started_at INTEGER,
    ended_at   INTEGER NOT NULL,
    outcome    TEXT    NOT NULL CHECK (outcome IN ('error', 'timeout', 'lost', 'permanent')),
    error      TEXT
);
CREATE INDEX attempts_item ON attempts (item_id);

CREATE TABLE workers (
    id           TEXT    PRIMARY KEY,
    pid          INTEGER NOT NULL,
    host         TEXT    NOT NULL,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL,
    stopped_at   INTEGER,
    status       TEXT    NOT NULL DEFAULT 'running'
                         CHECK (status IN ('running', 'stopped', 'dead')),
    -- Outcomes this worker recorded (done, retried, failed): how a
    -- supervisor tells a crash loop from ordinary crashes.
    finished     INTEGER NOT NULL DEFAULT 0,
    metrics_addr TEXT
);

-- Item counts by status, kept by the triggers below in the same
-- transaction as the change, so `status` never scans the items table.
CREATE TABLE counts (
    status TEXT    PRIMARY KEY,
    n      INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO counts (status, n) VALUES ('pending', 0), ('running', 0), ('done', 0), ('failed', 0);

-- Items finished per second, for rates; old rows are pruned by sweeps.
CREATE TABLE throughput (
    second INTEGER PRIMARY KEY,
    done   INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0
);

CREATE TRIGGER items_counted_insert AFTER INSERT ON items
BEGIN
    UPDATE counts SET n = n + 1 WHERE status = NEW.status;
END;

CREATE TRIGGER items_counted_update AFTER UPDATE OF status ON items
WHEN OLD.status <> NEW.status
BEGIN
    UPDATE counts SET n = n - 1 WHERE status = OLD.status;
    UPDATE counts SET n = n + 1 WHERE status = NEW.status;
END;

CREATE TRIGGER items_counted_delete AFTER DELETE ON items
BEGIN
    UPDATE counts SET n = n - 1 WHERE status = OLD.status;
END;

CREATE TRIGGER items_finished AFTER UPDATE OF status ON items
WHEN OLD.status <> NEW.status AND NEW.status IN ('done', 'failed')
BEGIN
    INSERT INTO throughput (second, done, failed)
    VALUES (NEW.finished_at / 1000, NEW.status = 'done', NEW.status = 'failed')
    ON CONFLICT (second) DO UPDATE
    SET done = done + excluded.done,
        failed = failed + excluded.failed;
END;

CREATE VIEW status_counts AS
SELECT status, n AS items
FROM counts
ORDER BY CASE status WHEN 'pending' THEN 0 WHEN 'running' THEN 1 WHEN 'done' THEN 2 ELSE 3 END;

CREATE VIEW failures AS
SELECT id,
       key,
       attempts,
       max_attempts,
       last_error,
       datetime(finished_at / 1000, 'unixepoch') AS failed_at,
       CAST(payload AS TEXT) AS payload
FROM items
WHERE status = 'failed';

CREATE VIEW history AS
SELECT a.item_id,
       a.attempt,
       a.outcome,
       a.worker,
       datetime(a.started_at / 1000, 'unixepoch') AS started,
       datetime(a.ended_at / 1000, 'unixepoch') AS ended,
       a.error
FROM attempts AS a
ORDER BY a.item_id, a.attempt;

CREATE VIEW leases AS
SELECT id,
       lease_owner,
       attempts,
       (lease_expires - CAST(unixepoch('subsec') * 1000 AS INTEGER)) / 1000.0 AS expires_in_s,
       CAST(payload AS TEXT) AS payload
FROM items
WHERE status = 'running';
";

/// Throughput. The counts are kept by the statements that change item
/// state (see `sql.rs`), once per transaction instead of by a trigger per
/// row, which doubled the cost of every claim and completion. Ready items
/// have `run_after = 0` and sit in `items_ready`; items waiting out a delay
/// or backoff sit in `items_waiting` by time, and a claim first moves the
/// ones that are due. A claim no longer walks past waiting items, and
/// finding the next one due is one index lookup.
const V2: &str = "
DROP TRIGGER items_counted_insert;
DROP TRIGGER items_counted_update;
DROP TRIGGER items_counted_delete;
DROP TRIGGER items_finished;

DROP INDEX items_ready;
UPDATE items SET run_after = 0
WHERE run_after <> 0
  AND (status <> 'pending' OR run_after <= CAST(unixepoch('subsec') * 1000 AS INTEGER));
CREATE INDEX items_ready ON items (priority DESC, id) WHERE status = 'pending' AND run_after = 0;
CREATE INDEX items_waiting ON items (run_after) WHERE status = 'pending' AND run_after > 0;

UPDATE counts SET n = (SELECT count(*) FROM items WHERE items.status = counts.status);

-- Times an item was held, claimed ahead and never seen running, by a
-- worker that died; see `never_started` in sql.rs.
ALTER TABLE items ADD COLUMN given_back INTEGER NOT NULL DEFAULT 0;
";

/// Columns that versions 1 and 2 gained after some files had already been
/// made at those versions (a build of litework from the day each was
/// written): `workers.finished` in version 1, `items.given_back` in
/// version 2. Such a file has the version number but not the column, and
/// a worker fails on its first write. Each is added where it is missing.
fn v3(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    for (table, column) in [("workers", "finished"), ("items", "given_back")] {
        let present: bool = tx.query_row(
            "SELECT count(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
            [table, column],
            |r| r.get(0),
        )?;
        if !present {
            tx.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0"
            ))?;
        }
    }
    Ok(())
}

/// What the header of an opened file says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// An SQLite file with no tables and no application id: ours to set up.
    Empty,
    /// A litework database at this schema version.
    Litework(i64),
    /// Something else, with its application id and its number of tables.
    Foreign { application_id: i32, tables: i64 },
}

/// Reads the header fields without writing anything.
pub fn identify(conn: &Connection) -> rusqlite::Result<Identity> {
    let app: i32 = conn.query_row("PRAGMA application_id", [], |r| r.get(0))?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let tables: i64 = conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))?;
    Ok(match app {
        APPLICATION_ID => Identity::Litework(version),
        0 if tables == 0 && version == 0 => Identity::Empty,
        other => Identity::Foreign {
            application_id: other,
            tables,
        },
    })
}

/// Brings the schema to [`latest`] inside one immediate transaction.
///
/// The version is read again under the write lock: two processes opening a
/// fresh file at once must not both run migration 1.
pub fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let current: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (from, step) in MIGRATIONS.iter().enumerate().skip(current.max(0) as usize) {
        match step {
            Migration::Sql(sql) => tx.execute_batch(sql)?,
            Migration::Code(f) => f(&tx)?,
        }
        tx.pragma_update(None, "user_version", from as i64 + 1)?;
    }
    tx.pragma_update(None, "application_id", APPLICATION_ID)?;
    tx.commit()
}
