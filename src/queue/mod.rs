//! The store: one SQLite file in WAL mode shared by every worker process.
//!
//! [`Queue`] owns an r2d2 pool whose connections all get the same pragmas;
//! [`Session`] is one connection taken from it, with the operations on
//! items. A worker's database thread keeps one session for its whole life
//! (its statement cache and its view of `PRAGMA data_version` stay warm);
//! the command-line verbs take one per call.
//!
//! Every write is an immediate transaction, so writers queue on the single
//! WAL write lock instead of failing half-way, and `SQLITE_BUSY` is waited
//! out by [`busy`]'s handler.

pub mod busy;
pub mod running;
pub mod schema;
mod sql;
pub mod watch;

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::types::{Value, ValueRef};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Transaction};

use crate::error::{Error, Result};

/// The size the WAL file is cut back to when SQLite starts it over after
/// a checkpoint. In steady state the WAL stays near the auto-checkpoint
/// size (1000 pages, ~4 MiB) and this never bites; after a long-lived
/// reader held checkpoints back and the WAL grew, it shrinks to this.
pub const JOURNAL_SIZE_LIMIT: i64 = 16 * 1024 * 1024;

/// RETURNING, used by records and requeues, arrived in SQLite 3.35.0.
const MIN_SQLITE: i32 = 3_035_000;

/// Milliseconds since the Unix epoch, the unit of every time in the schema.
pub fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// How a queue file is opened.
#[derive(Debug, Clone)]
pub struct Options {
    /// Create the file (and the schema) if it does not exist.
    pub create: bool,
    /// `synchronous = FULL` instead of `NORMAL`: a commit survives power loss,
    /// at the price of an fsync per transaction.
    pub durable: bool,
    /// How long a statement may wait for the write lock before failing.
    pub busy_timeout: Duration,
    /// Most connections the pool holds.
    pub pool_size: u32,
    /// Open a file on a network filesystem anyway (see [`network_fs`]).
    pub allow_network_fs: bool,
}

/// The least time a pool waits for a free connection.
const POOL_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for Options {
    fn default() -> Options {
        Options {
            create: false,
            durable: false,
            busy_timeout: Duration::from_secs(60),
            pool_size: 4,
            allow_network_fs: false,
        }
    }
}

/// Item states. `done` and `failed` are final until someone retries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Running,
    Done,
    Failed,
}

impl Status {
    pub const ALL: [Status; 4] = [
        Status::Pending,
        Status::Running,
        Status::Done,
        Status::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Done => "done",
            Status::Failed => "failed",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Status {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Status, String> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!("unknown status {s:?} (expected pending, running, done or failed)")
            })
    }
}

/// An item to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewItem {
    /// Opaque bytes, stored and delivered unchanged. Valid UTF-8 is stored
    /// as SQL text (readable in `sqlite3`), anything else as a blob.
    pub payload: Vec<u8>,
    /// Adding an item whose key is already in the queue does nothing.
    pub key: Option<String>,
    /// Without a `key`, use the payload's own bytes as the key. Such keys
    /// are stored as text when the payload is UTF-8 and as a blob
    /// otherwise, and SQLite never finds a blob equal to a text, so a
    /// binary payload cannot collide with a text one.
    pub key_from_payload: bool,
    /// Higher runs first; ties run in the order added.
    pub priority: i64,
    /// Attempts before the item ends `failed`; `None` takes the default.
    pub max_attempts: Option<u32>,
    /// Not before this long after adding.
    pub delay: Option<Duration>,
}

impl NewItem {
    pub fn new(payload: impl Into<Vec<u8>>) -> NewItem {
        NewItem {
            payload: payload.into(),
            key: None,
            key_from_payload: false,
            priority: 0,
            max_attempts: None,
            delay: None,
        }
    }

    pub fn key(mut self, key: impl Into<String>) -> NewItem {
        self.key = Some(key.into());
        self
    }
}

/// What an add did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct AddReport {
    pub added: u64,
    /// Items whose key was already present.
    pub duplicates: u64,
}

/// A claimed item: the lease a worker holds on it, and its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: i64,
    pub payload: Vec<u8>,
    pub key: Option<String>,
    pub priority: i64,
    /// This attempt's number, starting at 1.
    pub attempt: u32,
    pub max_attempts: u32,
    /// Fences every write about this lease; see [`Session::record`].
    pub token: i64,
}

/// Why an attempt failed, as kept in the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The work reported an error (non-zero exit, handler error).
    Error,
    /// The work ran past its time limit.
    Timeout,
    /// The work said retrying cannot help.
    Permanent,
}

impl FailureKind {
    fn as_str(self) -> &'static str {
        match self {
            FailureKind::Error => "error",
            FailureKind::Timeout => "timeout",
            FailureKind::Permanent => "permanent",
        }
    }
}

/// The outcome of a lease, to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// Done, with the result to keep.
    Done { result: Vec<u8> },
    /// Failed; back to `pending` no earlier than `run_after` (ms).
    Retry {
        error: String,
        kind: FailureKind,
        run_after: i64,
    },
    /// Failed for good.
    Failed { error: String, kind: FailureKind },
    /// Not run (or stopped by a shutdown): back to `pending`, attempt given back.
    Release,
}

/// Exponential backoff with jitter between attempts.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Delay after the first failed attempt.
    pub base: Duration,
    /// No delay is longer than this.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// The delay before attempt `failed_attempt + 1`: `base * 2^(n-1)`,
    /// capped at `max`, then a random point in its upper half so that
    /// items failing together do not come back together.
    pub fn delay(&self, failed_attempt: u32) -> Duration {
        let exp = failed_attempt.saturating_sub(1).min(32);
        let full = self.base.saturating_mul(1u32 << exp.min(31)).min(self.max);
        let half = full / 2;
        half + half.mul_f64(fastrand::f64())
    }

    /// What to record for a failed attempt of `job`.
    pub fn completion(&self, job: &Job, error: String, kind: FailureKind) -> Completion {
        if kind == FailureKind::Permanent || job.attempt >= job.max_attempts {
            Completion::Failed { error, kind }
        } else {
            let run_after = now_ms().saturating_add(ms(self.delay(job.attempt)));
            Completion::Retry {
                error,
                kind,
                run_after,
            }
        }
    }
}

/// What happened to a recorded outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The row changed as asked.
    Recorded,
    /// The lease was no longer ours (requeued, expired and taken by another
    /// worker): nothing changed, the outcome is dropped.
    LeaseLost,
}

/// One round trip of a worker's database thread: outcomes to record, leases
/// to extend and a number of items to claim, in a single transaction.
#[derive(Debug, Default)]
pub struct Turn {
    pub finished: Vec<(Job, Completion)>,
    /// `(id, token)` of the leases to extend.
    pub extend: Vec<(i64, i64)>,
    pub claim: usize,
    /// Also refresh the worker's own heartbeat.
    pub heartbeat: bool,
}

/// What a [`Turn`] did.
#[derive(Debug, Default)]
pub struct TurnResult {
    /// For each finished job, in order: `(id, what happened)`.
    pub recorded: Vec<(i64, Recorded)>,
    /// `(id, token)` of the leases that could not be extended: lost.
    pub lost: Vec<(i64, i64)>,
    /// Newly claimed jobs, in claim order.
    pub claimed: Vec<Job>,
    /// When the claim came up short: what it saw, read in its transaction.
    pub short: Option<Seen>,
}

/// What one snapshot of the queue showed an idle worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// `PRAGMA data_version` of the snapshot. It changes when another
    /// connection commits, so an unchanged value means nothing to claim
    /// has appeared since.
    pub data_version: i64,
    /// When the earliest waiting item (a retry in backoff) is due, in ms.
    pub next_ready_at: Option<i64>,
    /// Whether an item was ready to claim.
    pub ready: bool,
}

/// Counts moved by a requeue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Requeued {
    /// Back to `pending`.
    pub pending: u64,
    /// Out of attempts, now `failed`.
    pub failed: u64,
    /// Of `pending`: claimed ahead and never started, attempt given back.
    pub never_started: u64,
}

impl Requeued {
    pub fn total(&self) -> u64 {
        self.pending + self.failed
    }

    fn add(&mut self, other: Requeued) {
        self.pending += other.pending;
        self.failed += other.failed;
        self.never_started += other.never_started;
    }
}

/// A snapshot of the queue, cheap at any size.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StatusReport {
    pub pending: u64,
    pub running: u64,
    pub done: u64,
    pub failed: u64,
    pub total: u64,
    /// Items finished per second over the last minute.
    pub done_per_s: f64,
    pub failed_per_s: f64,
    /// Age of the item the next claim would take, if one is ready.
    pub oldest_ready_age_s: Option<f64>,
    /// Workers registered as running.
    pub workers: u64,
}

/// An item as `list` and `export` show it.
#[derive(Debug, Clone)]
pub struct ItemRow {
    pub id: i64,
    pub key: Option<String>,
    pub status: String,
    pub priority: i64,
    pub attempts: i64,
    pub max_attempts: i64,
    pub payload: Vec<u8>,
    pub result: Option<Vec<u8>>,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub finished_at: Option<i64>,
}

/// The ids a retry by id moved, and those it left because they are running.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryReport {
    pub retried: u64,
    pub running: Vec<i64>,
}

/// Identity of a worker process, as registered in the `workers` table.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub id: String,
    pub pid: u32,
    pub host: String,
    /// Where its `/metrics` is served, for service discovery.
    pub metrics_addr: Option<String>,
}

/// An open queue file and its connection pool. Cheap to clone.
#[derive(Clone)]
pub struct Queue {
    pool: r2d2::Pool<SqliteConnectionManager>,
    path: PathBuf,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("path", &self.path).finish()
    }
}

impl Queue {
    /// Opens an existing queue file.
    pub fn open(path: impl AsRef<Path>) -> Result<Queue> {
        Queue::open_with(path, &Options::default())
    }

    /// Opens a queue file, creating it if it does not exist.
    pub fn create(path: impl AsRef<Path>) -> Result<Queue> {
        Queue::open_with(
            path,
            &Options {
                create: true,
                ..Options::default()
            },
        )
    }

    /// Opens a queue file with explicit options.
    ///
    /// The file is identified before anything is written to it: a file that
    /// is not SQLite, an SQLite file of another program, or one written by a
    /// newer litework is refused and left exactly as it was.
    pub fn open_with(path: impl AsRef<Path>, opts: &Options) -> Result<Queue> {
        let path = path.as_ref().to_path_buf();
        drop(prepare(&path, opts)?);

        let synchronous = if opts.durable { "FULL" } else { "NORMAL" };
        let manager = SqliteConnectionManager::file(&path)
            .with_flags(OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .with_init(move |c| configure(c, synchronous));
        let pool = r2d2::Pool::builder()
            .max_size(opts.pool_size.max(1))
            .min_idle(Some(1))
            // The pool's own wait for a free connection: a short
            // `busy_timeout` must not fail opening the first one.
            .connection_timeout(opts.busy_timeout.max(POOL_TIMEOUT))
            .error_handler(Box::new(PoolErrors))
            .build(manager)
            .map_err(|source| Error::Pool {
                path: path.clone(),
                source,
            })?;
        Ok(Queue { pool, path })
    }

    /// Writes `items` to a new queue file at `path`, which must not exist,
    /// through one plain connection that checkpoints the WAL into the file
    /// and is closed before this returns (closing the last connection
    /// removes the -wal and -shm files): the file is then whole by itself,
    /// still in WAL mode, and can be linked to another name safely. If any
    /// item is an error, the file is removed and the error returned.
    pub fn stage<I>(
        path: &Path,
        items: I,
        default_max_attempts: u32,
        opts: &Options,
    ) -> Result<AddReport>
    where
        I: IntoIterator<Item = Result<NewItem>>,
    {
        let opts = Options {
            create: true,
            ..opts.clone()
        };
        let result = prepare(path, &opts).and_then(|mut conn| {
            configure(&mut conn, "NORMAL").map_err(|e| Error::sqlite(path, e))?;
            // Nobody else has this file yet: the items go straight into it
            // with an in-memory rollback journal, instead of into the WAL
            // and then a second time into the file. A crash leaves a
            // broken stage file, but no name ever points at it.
            journal_mode(&conn, path, "MEMORY")?;
            let report = add_in(&mut conn, path, items, default_max_attempts)?;
            // Back to WAL: a reader that opens the linked file before any
            // litework does must not find a rollback journal there.
            let mode = journal_mode(&conn, path, "WAL")?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(Error::sqlite(
                    path,
                    rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                        Some(format!("journal mode stayed {mode}, not wal")),
                    ),
                ));
            }
            Ok(report)
        });
        if result.is_err() {
            remove_files(path);
        }
        result
    }
}

fn journal_mode(conn: &Connection, path: &Path, mode: &str) -> Result<String> {
    conn.query_row(&format!("PRAGMA journal_mode = {mode}"), [], |r| r.get(0))
        .map_err(|e| Error::sqlite(path, e))
}

/// Checks and sets up the file at `path` with one plain connection: the
/// SQLite version, the path, the file's identity (before anything is
/// written), WAL mode, and the schema.
fn prepare(path: &Path, opts: &Options) -> Result<Connection> {
    let path = path.to_path_buf();
    if rusqlite::version_number() < MIN_SQLITE {
        return Err(Error::OldSqlite {
            found: rusqlite::version().to_string(),
            needed: "3.35.0",
        });
    }
    busy::set_limit(opts.busy_timeout);
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_dir() => {
            return Err(Error::BadPath {
                path,
                reason: "is a directory, not a database file".into(),
            })
        }
        // SQLite would open a file it cannot write read-only, and create
        // -wal and -shm files that then lock its owner out; refuse first.
        Ok(_) if !writable(&path) => return Err(Error::ReadOnly { path }),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !opts.create => {
            return Err(Error::Missing { path })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_private(&path)?,
        Err(e) => {
            return Err(Error::BadPath {
                path,
                reason: e.to_string(),
            })
        }
    }

    if !opts.allow_network_fs {
        if let Some(kind) = network_fs(&path) {
            return Err(Error::NetworkFs { path, kind });
        }
    }

    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if opts.create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let mut conn = Connection::open_with_flags(&path, flags).map_err(|e| open_error(&path, e))?;
    conn.busy_handler(Some(busy::handler))
        .map_err(|e| Error::sqlite(&path, e))?;

    // Identify first: setting WAL writes the header, so it must not
    // happen to a file that is not ours.
    let identity = schema::identify(&conn).map_err(|e| Error::sqlite(&path, e))?;
    match identity {
        schema::Identity::Empty if !opts.create => {
            return Err(Error::NotLitework {
                path,
                reason: "the file is empty; `litework init` sets it up".into(),
            })
        }
        schema::Identity::Empty => {}
        schema::Identity::Litework(v) if v > schema::latest() => {
            return Err(Error::NewerSchema {
                path,
                found: v,
                known: schema::latest(),
            })
        }
        schema::Identity::Litework(_) => {}
        schema::Identity::Foreign {
            application_id,
            tables,
        } => {
            let reason = if application_id != 0 {
                format!("it belongs to another program: application id {application_id:#x}")
            } else {
                let noun = if tables == 1 { "table" } else { "tables" };
                format!("an SQLite database with {tables} {noun} and no litework id")
            };
            return Err(Error::NotLitework { path, reason });
        }
    }

    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(|e| Error::sqlite(&path, e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::NotWal {
            path,
            mode,
            hint: "WAL needs shared memory: a local filesystem and a writable directory",
        });
    }
    // Read-only verbs must not write: migrate only a file that needs it.
    if identity != schema::Identity::Litework(schema::latest()) {
        schema::migrate(&mut conn).map_err(|e| Error::sqlite(&path, e))?;
    }
    Ok(conn)
}

impl Queue {
    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes a connection from the pool.
    pub fn session(&self) -> Result<Session> {
        let conn = self.pool.get().map_err(|source| Error::Pool {
            path: self.path.clone(),
            source,
        })?;
        Ok(Session {
            conn,
            path: self.path.clone(),
        })
    }

    /// Adds items in one transaction; see [`Session::add`].
    pub fn add<I>(&self, items: I, default_max_attempts: u32) -> Result<AddReport>
    where
        I: IntoIterator<Item = Result<NewItem>>,
    {
        self.session()?.add(items, default_max_attempts)
    }

    /// Claims up to `n` ready items for `worker`; see [`Session::turn`].
    pub fn claim(&self, worker: &str, n: usize, lease: Duration) -> Result<Vec<Job>> {
        let turn = Turn {
            claim: n,
            ..Turn::default()
        };
        Ok(self.session()?.turn(worker, lease, &turn)?.claimed)
    }

    /// Records the outcome of one lease; see [`Session::record`].
    pub fn record(&self, job: &Job, completion: Completion) -> Result<Recorded> {
        self.session()?.record(job, completion)
    }

    /// Requeues the leases held by `worker`; see [`Session::requeue_worker`].
    pub fn requeue_worker(&self, worker: &str) -> Result<Requeued> {
        self.session()?.requeue_worker(worker)
    }

    /// Requeues every expired lease; see [`Session::requeue_expired`].
    pub fn requeue_expired(&self) -> Result<Requeued> {
        self.session()?.requeue_expired()
    }

    /// Counts and rates; see [`Session::status`].
    pub fn status(&self) -> Result<StatusReport> {
        self.session()?.status()
    }

    /// Adds the pending items of another queue file (a staging file written
    /// by this process), keys deduplicated as by [`Session::add`], in one
    /// transaction.
    pub fn take_items_from(&self, other: &Path) -> Result<AddReport> {
        let mut s = self.session()?;
        let path = self.path.clone();
        let other = other.to_string_lossy().into_owned();
        s.conn
            .execute("ATTACH DATABASE ?1 AS incoming", params![other])
            .map_err(|e| Error::sqlite(&path, e))?;
        let moved = s.write(|tx| {
            let total: i64 =
                tx.query_row("SELECT count(*) FROM incoming.items", [], |r| r.get(0))?;
            let added = tx.execute(sql::TAKE_ITEMS, [])?;
            let moves = Moves {
                pending: added as i64,
                ..Moves::default()
            };
            moves.apply(tx, now_ms())?;
            Ok(AddReport {
                added: added as u64,
                duplicates: u64::try_from(total)
                    .unwrap_or(0)
                    .saturating_sub(added as u64),
            })
        });
        let detached = s.conn.execute("DETACH DATABASE incoming", []);
        let moved = moved?;
        detached.map_err(|e| Error::sqlite(&path, e))?;
        Ok(moved)
    }
}

/// The pool's background errors go to the debug log: whoever needs a
/// connection gets the error itself from [`Queue::session`].
#[derive(Debug)]
struct PoolErrors;

impl r2d2::HandleError<rusqlite::Error> for PoolErrors {
    fn handle_error(&self, error: rusqlite::Error) {
        tracing::debug!(%error, "connection pool could not open a connection");
    }
}

/// A connection to any SQLite file (created if missing) in WAL mode with
/// the pragmas and busy handler litework's own connections get: what
/// `litework bench` measures raw SQLite against.
pub fn plain_connection(path: &Path, durable: bool) -> Result<Connection> {
    let fail = |e| Error::sqlite(path, e);
    let mut conn = Connection::open(path).map_err(fail)?;
    conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
        .map_err(fail)?;
    configure(&mut conn, if durable { "FULL" } else { "NORMAL" }).map_err(fail)?;
    Ok(conn)
}

/// Pragmas, the busy handler and the commit hook (see [`busy::install`])
/// every connection that writes the queue gets: the pooled ones, the
/// staging file's and `bench`'s raw one.
fn configure(conn: &mut Connection, synchronous: &str) -> rusqlite::Result<()> {
    conn.busy_handler(Some(busy::handler))?;
    busy::install(conn);
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.pragma_update(None, "foreign_keys", true)?;
    // After a checkpoint the WAL is cut back to this size instead of keeping
    // its high-water mark on disk.
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)?;
    conn.set_prepared_statement_cache_capacity(32);
    // `rarray(?)`: a list of ids bound as one parameter (see sql::LEASE).
    rusqlite::vtab::array::load_module(conn)?;
    // The file was switched to WAL when it was opened; WAL is persistent, so
    // a connection that sees another mode means the file was changed behind
    // our back (or the filesystem cannot do WAL): refuse rather than run
    // with rollback-journal locking.
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!("journal mode is {mode}, not wal")),
        ));
    }
    Ok(())
}

/// The network filesystem `path` (or its directory) is on, if it is on one.
///
/// SQLite's WAL mode keeps its index in shared memory, which processes on
/// different machines do not share, and network filesystems implement the
/// locks it relies on loosely if at all: a queue there can lose or double
/// items. Recognised by `statfs(2)` type: NFS, SMB/CIFS, 9P, Ceph, AFS.
pub fn network_fs(path: &Path) -> Option<&'static str> {
    use std::os::unix::ffi::OsStrExt;
    let probe = if path.exists() {
        path
    } else {
        match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        }
    };
    let c = std::ffi::CString::new(probe.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs fills the zeroed struct for a NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    filesystem_kind(st.f_type as i64)
}

/// Names the network filesystems among `statfs` magic numbers.
fn filesystem_kind(magic: i64) -> Option<&'static str> {
    match magic {
        0x6969 => Some("NFS"),
        0x517B => Some("SMB"),
        0xFF53_4D42 => Some("CIFS"),
        0xFE53_4D42 => Some("SMB2"),
        0x0102_1997 => Some("9P"),
        0x00C3_6400 => Some("Ceph"),
        0x5346_414F => Some("AFS"),
        _ => None,
    }
}

/// Creates an empty database file readable and writable by its owner only.
/// SQLite gives the -wal and -shm files it creates the mode of the
/// database file, so they are private too; to share a queue with a group,
/// `chmod g+rw` the database file and its directory.
fn create_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Ok(_) => Ok(()),
        // Another process created it first: it is theirs to set up.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::BadPath {
            path: path.to_path_buf(),
            reason: format!("cannot create the database file: {e}"),
        }),
    }
}

/// Returns true if and only if this process may write `path` and create
/// files beside it (WAL needs both).
fn writable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    [path, dir].iter().all(|p| {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
            return false;
        };
        // SAFETY: access(2) on a NUL-terminated path we own.
        unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
    })
}

fn open_error(path: &Path, e: rusqlite::Error) -> Error {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::CannotOpen) => Error::BadPath {
            path: path.to_path_buf(),
            reason: "cannot open the database file (does its directory exist, is it writable?)"
                .into(),
        },
        _ => Error::sqlite(path, e),
    }
}

/// Reads a payload or result column: text and blobs both come back as bytes.
fn bytes(v: ValueRef<'_>) -> Vec<u8> {
    match v {
        ValueRef::Text(t) | ValueRef::Blob(t) => t.to_vec(),
        ValueRef::Null => Vec::new(),
        ValueRef::Integer(i) => i.to_string().into_bytes(),
        ValueRef::Real(r) => r.to_string().into_bytes(),
    }
}

/// Binds a payload: valid UTF-8 as text so `sqlite3` shows it, else a blob.
/// Either way the same bytes come back.
fn payload_value(bytes: &[u8]) -> rusqlite::types::ToSqlOutput<'_> {
    use rusqlite::types::{ToSqlOutput, ValueRef};
    match std::str::from_utf8(bytes) {
        Ok(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        Err(_) => ToSqlOutput::Borrowed(ValueRef::Blob(bytes)),
    }
}

/// The key to store for `item`: its own, its payload's bytes, or none.
fn item_key(item: &NewItem) -> rusqlite::types::ToSqlOutput<'_> {
    use rusqlite::types::{ToSqlOutput, ValueRef};
    match &item.key {
        Some(k) => ToSqlOutput::Borrowed(ValueRef::Text(k.as_bytes())),
        None if item.key_from_payload => payload_value(&item.payload),
        None => ToSqlOutput::Borrowed(ValueRef::Null),
    }
}

/// A key as text: a blob key (made from a binary payload) as `base64:…`.
fn key_text(v: ValueRef<'_>) -> Option<String> {
    use base64::Engine;
    match v {
        ValueRef::Null => None,
        ValueRef::Blob(b) => Some(format!(
            "base64:{}",
            base64::engine::general_purpose::STANDARD.encode(b)
        )),
        other => Some(String::from_utf8_lossy(&bytes(other)).into_owned()),
    }
}

fn to_u32(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

/// One pooled connection and the operations on items.
pub struct Session {
    conn: r2d2::PooledConnection<SqliteConnectionManager>,
    path: PathBuf,
}

impl Session {
    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in an immediate transaction and commits it.
    fn write<T>(&mut self, f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T>) -> Result<T> {
        let path = &self.path;
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| Error::sqlite(path, e))?;
        let locked = busy::taken();
        let value = f(&tx).and_then(|value| tx.commit().map(|()| value));
        busy::let_go(locked);
        value.map_err(|e| Error::sqlite(path, e))
    }

    /// Adds items, all in one transaction: if any element of `items` is an
    /// error, nothing is added and that error is returned. Items whose key is
    /// already present are counted as duplicates and left alone.
    ///
    /// The write lock is held while `items` is drained, so it should yield
    /// quickly: read a slow source into an [`crate::input::Spool`] first,
    /// as `litework add` does, or every worker waits for it.
    pub fn add<I>(&mut self, items: I, default_max_attempts: u32) -> Result<AddReport>
    where
        I: IntoIterator<Item = Result<NewItem>>,
    {
        add_in(&mut self.conn, &self.path, items, default_max_attempts)
    }

    /// Records finished leases, extends live ones and claims new items, all
    /// in one immediate transaction: the worker's group commit.
    ///
    /// A claim takes the ready items (pending, `run_after` passed) with the
    /// highest priority, oldest first, and for each bumps the attempt count
    /// and the lease token.
    pub fn turn(&mut self, worker: &str, lease: Duration, turn: &Turn) -> Result<TurnResult> {
        let lease_ms = ms(lease);
        self.write(|tx| {
            let now = now_ms();
            let mut out = TurnResult::default();
            let mut moves = Moves::default();
            let mut finished = 0i64;
            let recorded = record_all(tx, &turn.finished, now, &mut moves)?;
            for ((job, completion), recorded) in turn.finished.iter().zip(recorded) {
                let counts = !matches!(completion, Completion::Release);
                if recorded == Recorded::Recorded && counts {
                    finished += 1;
                }
                out.recorded.push((job.id, recorded));
            }
            if finished > 0 {
                tx.prepare_cached(sql::WORKER_FINISHED)?
                    .execute(params![worker, finished])?;
            }
            if !turn.extend.is_empty() {
                let mut extend = tx.prepare_cached(sql::EXTEND)?;
                for &(id, token) in &turn.extend {
                    if extend.execute(params![id, token, now + lease_ms])? == 0 {
                        out.lost.push((id, token));
                    }
                }
            }
            if turn.heartbeat {
                tx.prepare_cached(sql::WORKER_HEARTBEAT)?
                    .execute(params![worker, now])?;
            }
            if turn.claim > 0 {
                tx.prepare_cached(sql::PROMOTE)?.execute(params![now])?;
                let mut ready = tx.prepare_cached(sql::READY)?;
                let rows = ready.query_map([], |r| {
                    // As they will be once LEASE below has run.
                    Ok(Job {
                        id: r.get(0)?,
                        payload: bytes(r.get_ref(1)?),
                        key: key_text(r.get_ref(2)?),
                        priority: r.get(3)?,
                        attempt: to_u32(r.get::<_, i64>(4)? + 1),
                        max_attempts: to_u32(r.get(5)?),
                        token: r.get::<_, i64>(6)? + 1,
                    })
                })?;
                for job in rows.take(turn.claim) {
                    out.claimed.push(job?);
                }
                if !out.claimed.is_empty() {
                    let ids: Vec<Value> =
                        out.claimed.iter().map(|j| Value::Integer(j.id)).collect();
                    let leased = tx.prepare_cached(sql::LEASE)?.execute(params![
                        Rc::new(ids),
                        worker,
                        now,
                        lease_ms
                    ])?;
                    // Nothing else writes between the two statements: the
                    // write lock is held since BEGIN IMMEDIATE.
                    if leased != out.claimed.len() {
                        return Err(rusqlite::Error::SqliteFailure(
                            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_INTERNAL),
                            Some(format!(
                                "a claim read {} ready items but leased {leased}",
                                out.claimed.len()
                            )),
                        ));
                    }
                }
                moves.pending -= out.claimed.len() as i64;
                moves.running += out.claimed.len() as i64;
                if out.claimed.len() < turn.claim {
                    // Read under the write lock, this is exactly what the
                    // claim saw: whatever commits after it moves
                    // `data_version` (our own commits do not).
                    out.short = Some(Seen {
                        data_version: tx.query_row("PRAGMA data_version", [], |r| r.get(0))?,
                        next_ready_at: tx
                            .prepare_cached(sql::NEXT_DUE)?
                            .query_row([], |r| r.get(0))?,
                        ready: false,
                    });
                }
            }
            moves.apply(tx, now)?;
            Ok(out)
        })
    }

    /// Records the outcome of one lease. Returns [`Recorded::LeaseLost`]
    /// (not an error) when the lease is no longer held by `job`.
    pub fn record(&mut self, job: &Job, completion: Completion) -> Result<Recorded> {
        self.write(|tx| {
            let now = now_ms();
            let mut moves = Moves::default();
            let recorded = record_in(tx, job, &completion, now, &mut moves)?;
            moves.apply(tx, now)?;
            Ok(recorded)
        })
    }

    /// Extends one lease to `lease` from now.
    pub fn extend(&mut self, job: &Job, lease: Duration) -> Result<Recorded> {
        let expires = now_ms().saturating_add(ms(lease));
        self.write(|tx| {
            let n = tx
                .prepare_cached(sql::EXTEND)?
                .execute(params![job.id, job.token, expires])?;
            Ok(if n == 1 {
                Recorded::Recorded
            } else {
                Recorded::LeaseLost
            })
        })
    }

    /// Requeues the leases held by `worker`, known to be dead, and marks it
    /// dead. Items out of attempts end `failed`. Items leased by any other
    /// worker are not touched.
    ///
    /// Only the items its executors were running are charged an attempt
    /// (see [`running`]); the ones it had claimed ahead get it back.
    pub fn requeue_worker(&mut self, worker: &str) -> Result<Requeued> {
        let db = self.path.clone();
        let moved = self.write(|tx| {
            let now = now_ms();
            let moved = requeue_owner(tx, &db, worker, None, now, "died")?;
            tx.prepare_cached(sql::WORKER_GONE)?
                .execute(params![worker, now, "dead"])?;
            Ok(moved)
        })?;
        running::remove_slots(&db, worker);
        Ok(moved)
    }

    /// Requeues every lease whose expiry has passed: the safety net for
    /// workers that died unseen or stopped heartbeating. A live worker
    /// extends its leases long before they expire, so it loses none here.
    ///
    /// A lease is judged against the time this call had to wait for the
    /// write lock: while another process held it (a large `add`), the
    /// holders of those leases could not extend them either.
    pub fn requeue_expired(&mut self) -> Result<Requeued> {
        let asked = std::time::Instant::now();
        let db = self.path.clone();
        let (moved, owners) = self.write(|tx| {
            let now = now_ms();
            let cutoff = now - ms(asked.elapsed());
            let owners: Vec<String> = tx
                .prepare_cached(sql::EXPIRED_OWNERS)?
                .query_map(params![cutoff], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let mut moved = Requeued::default();
            let mut done_with = Vec::new();
            for owner in owners {
                // An owner shown in a write on this machine has been waiting
                // for the lock since then (it cannot hold it while we do):
                // the leases that expired during that wait it could not
                // extend, and they are left alone for as long as it may
                // wait. Those that expired before it began are taken.
                let mut owner_cutoff = cutoff;
                if let Some((since, limit)) = writing_mark(tx, &db, &owner)? {
                    let wait = ms(limit.min(MAX_WRITE_WAIT)).saturating_add(WRITE_GRACE_MS);
                    if now.saturating_sub(since) <= wait {
                        owner_cutoff = owner_cutoff.min(since);
                    }
                }
                moved.add(requeue_owner(
                    tx,
                    &db,
                    &owner,
                    Some(owner_cutoff),
                    now,
                    "expired",
                )?);
                // Its file is needed until its last lease is taken.
                let left: i64 = tx
                    .prepare_cached(
                        "SELECT count(*) FROM items WHERE status = 'running' AND lease_owner = ?1",
                    )?
                    .query_row([&owner], |r| r.get(0))?;
                if left == 0 {
                    done_with.push(owner);
                }
            }
            // Rate buckets older than a day are of no use to `status`.
            tx.prepare_cached("DELETE FROM throughput WHERE second < ?1")?
                .execute(params![now / 1000 - 86_400])?;
            Ok((moved, done_with))
        })?;
        // The running file of an owner that is gone from this machine is
        // of no further use; one that is only stalled keeps it.
        let host = crate::worker::host_name();
        for owner in owners {
            let row: Option<(i64, String)> = self
                .conn
                .prepare_cached("SELECT pid, host FROM workers WHERE id = ?1")
                .and_then(|mut st| st.query_row([&owner], |r| Ok((r.get(0)?, r.get(1)?))))
                .optional()
                .map_err(|e| Error::sqlite(&db, e))?;
            if let Some((pid, on)) = row {
                let pid = libc::pid_t::try_from(pid).unwrap_or(0);
                let gone = pid > 0 && !crate::exec::process_alive(pid);
                if on == host && gone {
                    running::remove_slots(&db, &owner);
                }
            }
        }
        Ok(moved)
    }

    /// Registers a worker process under its per-start identity.
    pub fn register_worker(&mut self, info: &WorkerInfo) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                sql::REGISTER_WORKER,
                params![info.id, info.pid, info.host, now_ms(), info.metrics_addr],
            )?;
            Ok(())
        })
    }

    /// Marks a worker as cleanly stopped.
    pub fn worker_stopped(&mut self, id: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute(sql::WORKER_GONE, params![id, now_ms(), "stopped"])?;
            Ok(())
        })
    }

    /// Outcomes `worker` recorded (done, retried, failed) over its life;
    /// 0 for an unknown worker.
    pub fn worker_finished(&mut self, worker: &str) -> Result<u64> {
        let path = self.path.clone();
        let n: Option<i64> = self
            .conn
            .prepare_cached("SELECT finished FROM workers WHERE id = ?1")
            .and_then(|mut s| s.query_row(params![worker], |r| r.get(0)).optional())
            .map_err(|e| Error::sqlite(&path, e))?;
        Ok(u64::try_from(n.unwrap_or(0)).unwrap_or(0))
    }

    /// Returns true if and only if `id` registered as a worker of this
    /// queue or holds a lease in it.
    pub fn knows_worker(&mut self, id: &str) -> Result<bool> {
        self.conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM workers WHERE id = ?1)
                     OR EXISTS (SELECT 1 FROM items WHERE status = 'running' AND lease_owner = ?1)",
                [id],
                |r| r.get(0),
            )
            .map_err(|e| Error::sqlite(&self.path, e))
    }

    /// `(worker id, metrics address)` of the running workers that serve
    /// metrics: what service discovery lists.
    pub fn metrics_targets(&mut self) -> Result<Vec<(String, String)>> {
        let path = self.path.clone();
        let run = |conn: &Connection| -> rusqlite::Result<Vec<(String, String)>> {
            let mut stmt = conn.prepare_cached(
                "SELECT id, metrics_addr FROM workers
                 WHERE status = 'running' AND metrics_addr IS NOT NULL
                 ORDER BY id",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        };
        run(&self.conn).map_err(|e| Error::sqlite(&path, e))
    }

    /// Failed or lost attempts that ended at or after `since` (ms).
    pub fn attempts_since(&mut self, since: i64) -> Result<u64> {
        let path = self.path.clone();
        let n: i64 = self
            .conn
            .prepare_cached("SELECT count(*) FROM attempts WHERE ended_at >= ?1")
            .and_then(|mut s| s.query_row(params![since], |r| r.get(0)))
            .map_err(|e| Error::sqlite(&path, e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Counts by status, rates over the last minute, the age of the head of
    /// the queue. Reads only small tables and one index entry.
    pub fn status(&mut self) -> Result<StatusReport> {
        let path = self.path.clone();
        let mut run = || -> rusqlite::Result<StatusReport> {
            let tx = self.conn.transaction()?;
            let mut report = StatusReport::default();
            {
                let mut stmt = tx.prepare_cached("SELECT status, n FROM counts")?;
                let mut rows = stmt.query([])?;
                while let Some(row) = rows.next()? {
                    let status: String = row.get(0)?;
                    let n = u64::try_from(row.get::<_, i64>(1)?).unwrap_or(0);
                    match status.as_str() {
                        "pending" => report.pending = n,
                        "running" => report.running = n,
                        "done" => report.done = n,
                        "failed" => report.failed = n,
                        _ => {}
                    }
                }
            }
            report.total = report.pending + report.running + report.done + report.failed;
            let now = now_ms();
            let (done, failed): (i64, i64) =
                tx.query_row(sql::RATES, params![now / 1000 - 60, now / 1000], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
            report.done_per_s = done as f64 / 60.0;
            report.failed_per_s = failed as f64 / 60.0;
            let head: Option<i64> = tx.query_row(sql::HEAD, [], |r| r.get(0)).optional()?;
            report.oldest_ready_age_s = head.map(|at| (now - at).max(0) as f64 / 1000.0);
            report.workers = tx.query_row(
                "SELECT count(*) FROM workers WHERE status = 'running'",
                [],
                |r| r.get::<_, i64>(0),
            )? as u64;
            tx.finish()?;
            Ok(report)
        };
        run().map_err(|e| Error::sqlite(&path, e))
    }

    /// Returns `(pending, running)` from the maintained counts: whether a
    /// worker still has anything to wait for.
    pub fn open_counts(&mut self) -> Result<(u64, u64)> {
        let path = self.path.clone();
        self.conn
            .prepare_cached(sql::OPEN_COUNTS)
            .and_then(|mut s| {
                s.query_row([], |r| {
                    Ok((
                        u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                        u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                    ))
                })
            })
            .map_err(|e| Error::sqlite(&path, e))
    }

    /// The earliest `run_after` among pending items, if any: when the next
    /// item waiting out a backoff or delay becomes ready.
    pub fn next_ready_at(&mut self) -> Result<Option<i64>> {
        let path = self.path.clone();
        self.conn
            .prepare_cached(sql::NEXT_DUE)
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(|e| Error::sqlite(&path, e))
    }

    /// One read transaction's view of what there is to claim: cheaper than
    /// claiming (no write lock), for an idle worker that saw `data_version`
    /// move.
    pub fn look(&mut self) -> Result<Seen> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction()
            .map_err(|e| Error::sqlite(&path, e))?;
        let seen = (|| {
            // The first read fixes the snapshot the other two see.
            let ready = tx
                .prepare_cached(sql::ANY_READY)?
                .query_row([], |r| r.get(0))?;
            Ok(Seen {
                ready,
                next_ready_at: tx
                    .prepare_cached(sql::NEXT_DUE)?
                    .query_row([], |r| r.get(0))?,
                data_version: tx.query_row("PRAGMA data_version", [], |r| r.get(0))?,
            })
        })()
        .map_err(|e: rusqlite::Error| Error::sqlite(&path, e))?;
        tx.commit().map_err(|e| Error::sqlite(&path, e))?;
        Ok(seen)
    }

    /// SQLite's `data_version`: changes whenever another connection commits.
    /// Polling it costs no lock, so idle workers poll it instead of claiming.
    pub fn data_version(&mut self) -> Result<i64> {
        let path = self.path.clone();
        self.conn
            .prepare_cached("PRAGMA data_version")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(|e| Error::sqlite(&path, e))
    }

    /// Items, optionally of one status, in id order, at most `limit`.
    pub fn list(&mut self, status: Option<Status>, limit: Option<u64>) -> Result<Vec<ItemRow>> {
        let mut rows = Vec::new();
        self.each_item(status, limit, |row| {
            rows.push(row);
            Ok(())
        })?;
        Ok(rows)
    }

    /// Calls `f` for each item (optionally of one status) in id order,
    /// streaming: memory does not grow with the queue.
    pub fn each_item(
        &mut self,
        status: Option<Status>,
        limit: Option<u64>,
        mut f: impl FnMut(ItemRow) -> std::io::Result<()>,
    ) -> Result<()> {
        let path = self.path.clone();
        let limit = limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
        let mut stmt = self
            .conn
            .prepare_cached(sql::ITEMS)
            .map_err(|e| Error::sqlite(&path, e))?;
        let mut rows = stmt
            .query(params![status.map(Status::as_str), limit])
            .map_err(|e| Error::sqlite(&path, e))?;
        loop {
            let row = match rows.next() {
                Ok(Some(row)) => row,
                Ok(None) => return Ok(()),
                Err(e) => return Err(Error::sqlite(&path, e)),
            };
            let item = (|| -> rusqlite::Result<ItemRow> {
                Ok(ItemRow {
                    id: row.get(0)?,
                    key: key_text(row.get_ref(1)?),
                    status: row.get(2)?,
                    priority: row.get(3)?,
                    attempts: row.get(4)?,
                    max_attempts: row.get(5)?,
                    payload: bytes(row.get_ref(6)?),
                    result: match row.get_ref(7)? {
                        ValueRef::Null => None,
                        v => Some(bytes(v)),
                    },
                    last_error: row.get(8)?,
                    created_at: row.get(9)?,
                    finished_at: row.get(10)?,
                })
            })()
            .map_err(|e| Error::sqlite(&path, e))?;
            f(item).map_err(|source| Error::Output { source })?;
        }
    }

    /// Sends every failed item back to `pending` with fresh attempts.
    pub fn retry_failed(&mut self) -> Result<u64> {
        self.write(|tx| {
            let n = tx.execute(sql::RETRY_FAILED, [])? as i64;
            let moves = Moves {
                failed: -n,
                pending: n,
                ..Moves::default()
            };
            moves.apply(tx, now_ms())?;
            Ok(n as u64)
        })
    }

    /// Sets the kept counts from the items themselves. Only needed after
    /// the `items` table was changed by hand (with `sqlite3`): litework's
    /// own statements keep the counts.
    pub fn recount(&mut self) -> Result<()> {
        self.write(|tx| {
            tx.execute(sql::RECOUNT, [])?;
            Ok(())
        })
    }

    /// Sends the given items back to `pending` with fresh attempts. If any id
    /// is unknown, nothing changes and the error names the unknown ids.
    /// Running items are left to their worker and reported.
    pub fn retry_ids(&mut self, ids: &[i64]) -> Result<RetryReport> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| Error::sqlite(&path, e))?;
        let mut report = RetryReport::default();
        let mut missing = Vec::new();
        {
            let mut status_of = tx
                .prepare_cached("SELECT status FROM items WHERE id = ?1")
                .map_err(|e| Error::sqlite(&path, e))?;
            let mut retry = tx
                .prepare_cached(sql::RETRY)
                .map_err(|e| Error::sqlite(&path, e))?;
            let mut moves = Moves::default();
            let mut seen = std::collections::HashSet::new();
            // Each id once: `retry 5 5` retries one item.
            for &id in ids.iter().filter(|&&id| seen.insert(id)) {
                let status: Option<String> = status_of
                    .query_row(params![id], |r| r.get(0))
                    .optional()
                    .map_err(|e| Error::sqlite(&path, e))?;
                match status.as_deref() {
                    None => missing.push(id),
                    Some("running") => report.running.push(id),
                    Some(status) => {
                        retry
                            .execute(params![id])
                            .map_err(|e| Error::sqlite(&path, e))?;
                        moves.shift(status, "pending");
                        report.retried += 1;
                    }
                }
            }
            moves
                .apply(&tx, now_ms())
                .map_err(|e| Error::sqlite(&path, e))?;
        }
        if !missing.is_empty() {
            // Dropping `tx` rolls back whatever was already retried.
            return Err(Error::NoSuchItems { ids: missing });
        }
        tx.commit().map_err(|e| Error::sqlite(&path, e))?;
        Ok(report)
    }

    /// The underlying connection, for queries of one's own.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

/// Adds `items` on `conn` in one immediate transaction; see
/// [`Session::add`].
fn add_in<I>(
    conn: &mut Connection,
    path: &Path,
    items: I,
    default_max_attempts: u32,
) -> Result<AddReport>
where
    I: IntoIterator<Item = Result<NewItem>>,
{
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(|e| Error::sqlite(path, e))?;
    let locked = busy::taken();
    // An input error returns before the commit; dropping `tx` rolls back.
    let report = add_rows(&tx, path, items, default_max_attempts).and_then(|report| {
        tx.commit()
            .map(|()| report)
            .map_err(|e| Error::sqlite(path, e))
    });
    busy::let_go(locked);
    report
}

/// The inserts of [`add_in`].
fn add_rows<I>(
    tx: &Transaction<'_>,
    path: &Path,
    items: I,
    default_max_attempts: u32,
) -> Result<AddReport>
where
    I: IntoIterator<Item = Result<NewItem>>,
{
    let mut report = AddReport::default();
    // Rows go in ADD_BATCH at a time, one statement each: the cost of
    // running a statement is paid per batch instead of per row, while
    // memory stays at one batch whatever the input's size.
    let now = now_ms();
    let mut batch: Vec<NewItem> = Vec::with_capacity(ADD_BATCH);
    let mut items = items.into_iter();
    loop {
        batch.clear();
        for item in items.by_ref() {
            batch.push(item?);
            if batch.len() == ADD_BATCH {
                break;
            }
        }
        if batch.is_empty() {
            break;
        }
        let added = insert_batch(tx, &batch, default_max_attempts, now)
            .map_err(|e| Error::sqlite(path, e))?;
        report.added += added as u64;
        report.duplicates += (batch.len() - added) as u64;
    }
    let moves = Moves {
        pending: report.added as i64,
        ..Moves::default()
    };
    moves
        .apply(tx, now_ms())
        .map_err(|e| Error::sqlite(path, e))?;
    Ok(report)
}

/// Rows per `INSERT` statement in [`add_in`].
const ADD_BATCH: usize = 256;

/// Inserts `batch` with one statement; returns how many rows were new.
fn insert_batch(
    tx: &Transaction<'_>,
    batch: &[NewItem],
    default_max_attempts: u32,
    now: i64,
) -> rusqlite::Result<usize> {
    let mut insert = tx.prepare_cached(&sql::insert(batch.len()))?;
    let mut at = 1;
    for item in batch {
        let max = item.max_attempts.unwrap_or(default_max_attempts).max(1);
        // 0 is "ready now"; a delay puts the item among the waiting.
        let run_after = match item.delay.map(ms) {
            Some(d) if d > 0 => now.saturating_add(d),
            _ => 0,
        };
        insert.raw_bind_parameter(at, payload_value(&item.payload))?;
        insert.raw_bind_parameter(at + 1, item_key(item))?;
        insert.raw_bind_parameter(at + 2, item.priority)?;
        insert.raw_bind_parameter(at + 3, max)?;
        insert.raw_bind_parameter(at + 4, run_after)?;
        insert.raw_bind_parameter(at + 5, now)?;
        at += 6;
    }
    insert.raw_execute()
}

/// Removes a database file and the -wal and -shm files beside it.
pub fn remove_files(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        let _ = std::fs::remove_file(name);
    }
}

/// Records many outcomes; what happened to each, in order. Successes go
/// in multi-row statements ([`sql::complete`]), the rest one by one.
fn record_all(
    tx: &Transaction<'_>,
    finished: &[(Job, Completion)],
    now: i64,
    moves: &mut Moves,
) -> rusqlite::Result<Vec<Recorded>> {
    let mut out = vec![Recorded::LeaseLost; finished.len()];
    let mut done: Vec<usize> = Vec::new();
    for (i, (job, completion)) in finished.iter().enumerate() {
        match completion {
            Completion::Done { .. } => done.push(i),
            other => out[i] = record_in(tx, job, other, now, moves)?,
        }
    }
    let mut rest = &done[..];
    while !rest.is_empty() {
        // A few fixed sizes, so the statement cache holds them all.
        let size = COMPLETE_SIZES
            .iter()
            .copied()
            .find(|&n| n <= rest.len())
            .unwrap_or(1);
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        let mut stmt = tx.prepare_cached(&sql::complete(size))?;
        stmt.raw_bind_parameter(1, now)?;
        for (k, &i) in chunk.iter().enumerate() {
            let (job, completion) = &finished[i];
            let result: &[u8] = match completion {
                Completion::Done { result } => result,
                _ => &[],
            };
            let at = 2 + 3 * k;
            stmt.raw_bind_parameter(at, job.id)?;
            stmt.raw_bind_parameter(at + 1, job.token)?;
            stmt.raw_bind_parameter(at + 2, payload_value(result))?;
        }
        let mut changed = std::collections::HashSet::with_capacity(size);
        let mut rows = stmt.raw_query();
        while let Some(row) = rows.next()? {
            changed.insert((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?));
        }
        for &i in chunk {
            let job = &finished[i].0;
            // Removed as it is matched: the same lease twice in one batch
            // is recorded once.
            if changed.remove(&(job.id, job.token)) {
                out[i] = Recorded::Recorded;
                moves.shift("running", "done");
            }
        }
    }
    Ok(out)
}

/// Rows per statement when recording successes, largest first.
const COMPLETE_SIZES: [usize; 4] = [64, 16, 4, 1];

fn record_in(
    tx: &Transaction<'_>,
    job: &Job,
    c: &Completion,
    now: i64,
    moves: &mut Moves,
) -> rusqlite::Result<Recorded> {
    let changed = match c {
        Completion::Done { result } => tx.prepare_cached(sql::COMPLETE)?.execute(params![
            job.id,
            job.token,
            payload_value(result),
            now
        ])?,
        Completion::Retry {
            error,
            kind,
            run_after,
        } => {
            tx.prepare_cached(sql::HISTORY)?.execute(params![
                job.id,
                job.token,
                now,
                kind.as_str(),
                error
            ])?;
            // Due already (no backoff): ready at once, not waiting.
            let run_after = if *run_after <= now { 0 } else { *run_after };
            tx.prepare_cached(sql::FAIL)?
                .execute(params![job.id, job.token, "pending", run_after, error, now])?
        }
        Completion::Failed { error, kind } => {
            tx.prepare_cached(sql::HISTORY)?.execute(params![
                job.id,
                job.token,
                now,
                kind.as_str(),
                error
            ])?;
            tx.prepare_cached(sql::FAIL)?
                .execute(params![job.id, job.token, "failed", 0, error, now])?
        }
        Completion::Release => tx
            .prepare_cached(sql::RELEASE)?
            .execute(params![job.id, job.token])?,
    };
    if changed != 1 {
        return Ok(Recorded::LeaseLost);
    }
    moves.shift(
        "running",
        match c {
            Completion::Done { .. } => "done",
            Completion::Failed { .. } => "failed",
            Completion::Retry { .. } | Completion::Release => "pending",
        },
    );
    Ok(Recorded::Recorded)
}

/// Items moved between statuses by one transaction, added to the kept
/// counts (and, for items that finished, to the per-second rates) before
/// it commits: one statement per transaction instead of a trigger per row.
#[derive(Debug, Default)]
struct Moves {
    pending: i64,
    running: i64,
    done: i64,
    failed: i64,
    /// Items that became done or failed (`done`/`failed` may also fall).
    became_done: i64,
    became_failed: i64,
}

impl Moves {
    fn requeued(r: &Requeued) -> Moves {
        let (pending, failed) = (r.pending as i64, r.failed as i64);
        Moves {
            running: -(pending + failed),
            pending,
            failed,
            became_failed: failed,
            ..Moves::default()
        }
    }

    fn slot(&mut self, status: &str) -> Option<&mut i64> {
        match status {
            "pending" => Some(&mut self.pending),
            "running" => Some(&mut self.running),
            "done" => Some(&mut self.done),
            "failed" => Some(&mut self.failed),
            _ => None,
        }
    }

    /// One item went from `from` to `to`.
    fn shift(&mut self, from: &str, to: &str) {
        if from == to {
            return;
        }
        if let Some(n) = self.slot(from) {
            *n -= 1;
        }
        if let Some(n) = self.slot(to) {
            *n += 1;
        }
        match to {
            "done" => self.became_done += 1,
            "failed" => self.became_failed += 1,
            _ => {}
        }
    }

    fn apply(&self, tx: &Transaction<'_>, now: i64) -> rusqlite::Result<()> {
        if [self.pending, self.running, self.done, self.failed] != [0; 4] {
            tx.prepare_cached(sql::COUNT)?.execute(params![
                self.pending,
                self.running,
                self.done,
                self.failed
            ])?;
        }
        if self.became_done > 0 || self.became_failed > 0 {
            tx.prepare_cached(sql::FINISHED)?.execute(params![
                now / 1000,
                self.became_done,
                self.became_failed
            ])?;
        }
        Ok(())
    }
}

/// Requeues the leases of `owner` (those expired before `cutoff`, if
/// given): the items its executors were running are charged an attempt,
/// the ones it claimed ahead and never started get theirs back (see
/// [`sql::never_started`]). Without a running file to trust, every lease
/// is charged.
fn requeue_owner(
    tx: &Transaction<'_>,
    db: &Path,
    owner: &str,
    cutoff: Option<i64>,
    now: i64,
    kind: &str,
) -> rusqlite::Result<Requeued> {
    let expired = cutoff.is_some();
    let charge = |lease: Option<(i64, i64)>| -> rusqlite::Result<Requeued> {
        let one = lease.is_some();
        let (id, token) = (lease.map(|l| l.0), lease.map(|l| l.1));
        let p = params![owner, cutoff, id, token, now, kind];
        tx.prepare_cached(&sql::lost_history(one, expired))?
            .execute(p)?;
        count_statuses(tx, &sql::lost(one, expired), p)
    };
    let mut moved = Requeued::default();
    match trusted_slots(tx, db, owner)? {
        None => moved = charge(None)?,
        Some(running) => {
            for lease in running {
                moved.add(charge(Some(lease))?);
            }
            let p = params![owner, cutoff, None::<i64>, None::<i64>, now, kind];
            tx.prepare_cached(&sql::never_started_history(expired))?
                .execute(p)?;
            let m = count_statuses(tx, &sql::never_started(expired), p)?;
            moved.add(Requeued {
                never_started: m.total(),
                ..m
            });
        }
    }
    Moves::requeued(&moved).apply(tx, now)?;
    Ok(moved)
}

/// The running slots of `owner`, if its file can be trusted (see
/// [`file_trusted`]).
fn trusted_slots(
    tx: &Transaction<'_>,
    db: &Path,
    owner: &str,
) -> rusqlite::Result<Option<Vec<(i64, i64)>>> {
    Ok(file_trusted(tx, db, owner)?
        .then(|| running::read_slots(db, owner))
        .flatten())
}

/// Past its busy limit and this, a worker shown in a write is taken for
/// stalled (frozen while it waited), and its leases are swept.
const WRITE_GRACE_MS: i64 = 1000;

/// The longest wait of a worker in a write that a sweep honours, whatever
/// `--busy-timeout` it was given: a worker frozen in a wait must not keep
/// its items for hours.
const MAX_WRITE_WAIT: Duration = Duration::from_secs(300);

/// Since when `owner` has been in a write and how long it may wait for
/// the lock, if its file can be trusted and says so and its process is
/// still there (a worker killed in a write leaves the mark behind).
fn writing_mark(
    tx: &Transaction<'_>,
    db: &Path,
    owner: &str,
) -> rusqlite::Result<Option<(i64, Duration)>> {
    if !file_trusted(tx, db, owner)? {
        return Ok(None);
    }
    let Some(mark) = running::read_writing(db, owner) else {
        return Ok(None);
    };
    let pid: Option<i64> = tx
        .prepare_cached("SELECT pid FROM workers WHERE id = ?1")?
        .query_row([owner], |r| r.get(0))
        .optional()?;
    let alive = pid
        .and_then(|p| i32::try_from(p).ok())
        .is_some_and(|p| p > 0 && crate::exec::process_alive(p));
    Ok(alive.then_some(mark))
}

/// Whether the running file of `owner` can be trusted: the worker ran on
/// this machine and the file was made since it last booted (a file from
/// before a crash of the machine may have lost what was written).
fn file_trusted(tx: &Transaction<'_>, db: &Path, owner: &str) -> rusqlite::Result<bool> {
    let host: Option<String> = tx
        .prepare_cached("SELECT host FROM workers WHERE id = ?1")?
        .query_row([owner], |r| r.get(0))
        .optional()?;
    Ok(host.as_deref() == Some(crate::worker::host_name().as_str())
        && running::made_since_boot(&running::slots_path(db, owner)))
}

fn count_statuses(
    tx: &Transaction<'_>,
    sql: &str,
    p: impl rusqlite::Params,
) -> rusqlite::Result<Requeued> {
    let mut moved = Requeued::default();
    let mut stmt = tx.prepare_cached(sql)?;
    let mut rows = stmt.query(p)?;
    while let Some(row) = rows.next()? {
        if row.get_ref(0)?.as_str()? == "failed" {
            moved.failed += 1;
        } else {
            moved.pending += 1;
        }
    }
    Ok(moved)
}

#[cfg(test)]
mod tests;
