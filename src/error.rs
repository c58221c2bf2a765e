//! The library's error type.
//!
//! Errors name the thing they are about (a database path, an input line,
//! an item id) so that the binary can print them as they are. The binary
//! maps [`Error::is_input`] to exit status 2: the caller gave something
//! litework refuses, and nothing was changed.

use std::path::PathBuf;
use std::time::Duration;

/// Everything the queue, the worker and the input parsers can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database file does not exist and the operation does not create it.
    #[error("{path}: no such database (create it with `litework init` or `litework add`)")]
    Missing { path: PathBuf },

    /// The path exists but is not a file SQLite can use.
    #[error("{path}: {reason}")]
    BadPath { path: PathBuf, reason: String },

    /// The file is not SQLite, or is SQLite but belongs to something else.
    #[error("{path}: not a litework database ({reason})")]
    NotLitework { path: PathBuf, reason: String },

    /// The file was written by a newer litework.
    #[error(
        "{path}: schema version {found} is newer than this build of litework knows \
         (up to {known}); use a newer litework"
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        known: i64,
    },

    /// WAL could not be enabled (a network filesystem, a read-only file...).
    #[error("{path}: journal mode is {mode:?}, litework needs \"wal\" ({hint})")]
    NotWal {
        path: PathBuf,
        mode: String,
        hint: &'static str,
    },

    /// The file is on a network filesystem, where WAL mode is not safe.
    #[error(
        "{path}: on a network filesystem ({kind}); SQLite's WAL mode needs a local one \
         (its shared memory and locks do not work across machines); move the queue, or \
         pass --allow-network-fs if every process runs on one machine"
    )]
    NetworkFs { path: PathBuf, kind: &'static str },

    /// The linked SQLite lacks a feature litework relies on.
    #[error("SQLite {found} is too old: litework needs {needed} or newer")]
    OldSqlite { found: String, needed: &'static str },

    /// Another process held the write lock for longer than the busy timeout.
    #[error(
        "{path}: another process held the write lock for more than {waited:?}; \
         gave up waiting"
    )]
    Busy { path: PathBuf, waited: Duration },

    /// The disk, or a `max_page_count` limit, is full.
    #[error("{path}: database or disk is full; nothing of this operation was recorded")]
    Full { path: PathBuf },

    /// The file is read-only for this process.
    #[error(
        "{path}: database is read-only for this user (litework needs to write the file \
         and create its -wal and -shm files beside it)"
    )]
    ReadOnly { path: PathBuf },

    /// Any other SQLite failure, with the database it happened on.
    #[error("{path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },

    /// The connection pool could not hand out a connection.
    #[error("{path}: cannot get a database connection: {source}")]
    Pool {
        path: PathBuf,
        #[source]
        source: r2d2::Error,
    },

    /// A malformed input record; nothing of the input was added.
    #[error("{input}: line {line}: {reason}")]
    Input {
        input: String,
        line: u64,
        reason: String,
    },

    /// An input that could not be read at all.
    #[error("{input}: {source}")]
    InputIo {
        input: String,
        #[source]
        source: std::io::Error,
    },

    /// The file an input is read into before it is added (see
    /// `input::Spool`) could not be written or read back.
    #[error("{path}: cannot keep the input aside before adding it: {source}")]
    Spool {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Writing an export or listing failed.
    #[error("writing output: {source}")]
    Output {
        #[source]
        source: std::io::Error,
    },

    /// The input held no items.
    #[error("{input}: no items in input")]
    EmptyInput { input: String },

    /// Item ids given by the caller that the queue does not hold.
    #[error("no item with id {}", join_ids(.ids))]
    NoSuchItems { ids: Vec<i64> },

    /// A worker id the queue has never seen: no worker row, no lease.
    #[error("{path}: no worker {id:?} has registered in this queue or holds a lease in it")]
    NoSuchWorker { path: PathBuf, id: String },

    /// A worker told to stop twice while the database refused writes.
    #[error(
        "stopped while the database refused writes ({cause}); {outcomes} outcomes were \
         not recorded: those items go back to pending when their leases are taken back \
         (at once under `litework run`, else once they expire)"
    )]
    Unrecorded { outcomes: usize, cause: String },

    /// Every worker of a run keeps dying without finishing an item.
    #[error(
        "every worker crashed {crashes} times in a row without finishing an item; \
         see the worker errors above"
    )]
    CrashLoop { crashes: u32 },

    /// The system refused a process or a thread (no memory, a process or
    /// file limit reached, the executable gone): not the caller's input.
    #[error("{0}")]
    Start(String),

    /// A worker or command setting that cannot work.
    #[error("{0}")]
    Config(String),
}

fn join_ids(ids: &[i64]) -> String {
    let parts: Vec<String> = ids.iter().map(i64::to_string).collect();
    parts.join(", ")
}

impl Error {
    /// Returns true if and only if the error is about something the caller
    /// gave (a path, an input, an id, a setting) rather than a failure while
    /// working. The binary exits with status 2 for these.
    pub fn is_input(&self) -> bool {
        matches!(
            self,
            Error::Missing { .. }
                | Error::BadPath { .. }
                | Error::NotLitework { .. }
                | Error::NewerSchema { .. }
                | Error::NotWal { .. }
                | Error::NetworkFs { .. }
                | Error::ReadOnly { .. }
                | Error::Input { .. }
                | Error::InputIo { .. }
                | Error::EmptyInput { .. }
                | Error::NoSuchItems { .. }
                | Error::NoSuchWorker { .. }
                | Error::Config(_)
        )
    }

    /// Returns true if and only if retrying the same operation later can
    /// succeed without anyone changing anything (lock held, disk full).
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Busy { .. } | Error::Full { .. })
    }

    /// Wraps a SQLite error with the database path, turning the codes a
    /// person can act on into their own variants.
    pub(crate) fn sqlite(path: &std::path::Path, source: rusqlite::Error) -> Error {
        use rusqlite::ErrorCode as C;
        let path = path.to_path_buf();
        match source.sqlite_error_code() {
            Some(C::DatabaseBusy) | Some(C::DatabaseLocked) => Error::Busy {
                path,
                waited: crate::queue::busy::limit(),
            },
            Some(C::DiskFull) => Error::Full { path },
            Some(C::ReadOnly) => Error::ReadOnly { path },
            Some(C::NotADatabase) => Error::NotLitework {
                path,
                reason: "the file is not an SQLite database".into(),
            },
            _ => Error::Sqlite { path, source },
        }
    }
}

/// Shorthand for results carrying [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
