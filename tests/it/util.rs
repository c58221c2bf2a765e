//! What every test needs: a sandbox of its own, the one place the real
//! binary is started, waiting on a condition, and reading the database.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};

/// The longest any wait in a test may take. It only bounds a failure: a
/// passing test never comes near it.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// How often [`wait_until`] and [`Running::wait`] look again.
const POLL: Duration = Duration::from_millis(10);

/// Waits until `cond` holds, looking every 10 ms; panics naming `what` if
/// it still does not hold after `deadline`.
pub fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() >= deadline {
            panic!("gave up after {deadline:?} waiting until {what}");
        }
        std::thread::sleep(POLL);
    }
}

/// A shell loop that lives as long as the test's directory: items that
/// must block use it, so that nothing outlives a test that failed.
pub const LINGER: &str = r#"while [ -d "$DIR" ]; do sleep 0.05; done"#;

/// An item body that marks itself started, then blocks until the test
/// creates `$DIR/go` (or the test's directory goes away).
pub const BLOCK_UNTIL_GO: &str = r#"touch "$DIR/started-$LITEWORK_ITEM_ID"
while [ ! -e "$DIR/go" ] && [ -d "$DIR" ]; do sleep 0.05; done"#;

/// One test's temporary directory and queue database. Commands run with
/// the directory as working directory and in `$DIR`.
pub struct Sandbox {
    dir: tempfile::TempDir,
    db: PathBuf,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let dir = tempfile::Builder::new()
            .prefix("litework-it-")
            .tempdir()
            .expect("creating a temporary directory");
        let db = dir.path().join("queue.db");
        Sandbox { dir, db }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn db(&self) -> &Path {
        &self.db
    }

    /// Writes `bytes` to `name` in the sandbox and returns its path.
    pub fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        path
    }

    /// `litework` with no `--db`, in the sandbox.
    pub fn bare(&self) -> Cmd {
        Cmd::new(env!("CARGO_BIN_EXE_litework"), self.dir()).env("DIR", self.dir())
    }

    /// `litework --db <the sandbox's database> ARGS`.
    pub fn lw<I>(&self, args: I) -> Cmd
    where
        I: IntoIterator,
        I::Item: AsRef<OsStr>,
    {
        self.bare().arg("--db").arg(&self.db).args(args)
    }

    /// Adds `input` (in `format`) on standard input; expects success.
    pub fn add(&self, format: &str, input: impl Into<Vec<u8>>, extra: &[&str]) -> Output {
        self.lw(["add", "--format", format])
            .args(extra)
            .stdin(input)
            .run()
    }

    /// A read-only connection to the sandbox's database.
    pub fn conn(&self) -> Connection {
        open_read_only(&self.db)
    }

    /// Every item, in id order.
    pub fn items(&self) -> Vec<Item> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, payload, key, status, attempts, max_attempts, run_after,
                        lease_owner, lease_expires, lease_token, result, last_error,
                        started_at, finished_at
                 FROM items
                 ORDER BY id",
            )
            .expect("preparing the items query");
        let rows = stmt
            .query_map([], |r| {
                Ok(Item {
                    id: r.get(0)?,
                    payload: bytes(r.get_ref(1)?).unwrap_or_default(),
                    key: bytes(r.get_ref(2)?),
                    status: r.get(3)?,
                    attempts: r.get(4)?,
                    max_attempts: r.get(5)?,
                    run_after: r.get(6)?,
                    lease_owner: r.get(7)?,
                    lease_expires: r.get(8)?,
                    lease_token: r.get(9)?,
                    result: bytes(r.get_ref(10)?),
                    last_error: r.get(11)?,
                    started_at: r.get(12)?,
                    finished_at: r.get(13)?,
                })
            })
            .expect("querying items");
        rows.collect::<rusqlite::Result<_>>()
            .expect("reading items")
    }

    /// The one item of a queue that holds exactly one.
    pub fn only_item(&self) -> Item {
        let mut items = self.items();
        assert_eq!(items.len(), 1, "expected exactly one item: {items:#?}");
        items.remove(0)
    }

    /// The attempt history, by item and attempt.
    pub fn attempts(&self) -> Vec<Attempt> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT item_id, attempt, worker, outcome, error
                 FROM attempts
                 ORDER BY item_id, attempt, ended_at",
            )
            .expect("preparing the attempts query");
        let rows = stmt
            .query_map([], |r| {
                Ok(Attempt {
                    item_id: r.get(0)?,
                    attempt: r.get(1)?,
                    worker: r.get(2)?,
                    outcome: r.get(3)?,
                    error: r.get(4)?,
                })
            })
            .expect("querying attempts");
        rows.collect::<rusqlite::Result<_>>()
            .expect("reading attempts")
    }

    /// A connection of another program holding the queue's write lock
    /// (an open `BEGIN IMMEDIATE`) until `ROLLBACK` or drop.
    pub fn hold_write_lock(&self) -> Connection {
        let other = Connection::open(&self.db).expect("opening the queue");
        other
            .busy_timeout(DEADLINE)
            .expect("setting a busy timeout");
        other
            .execute_batch("BEGIN IMMEDIATE")
            .expect("taking the write lock");
        other
    }

    /// How many items have `status`, counted in the items table itself.
    pub fn count(&self, status: &str) -> i64 {
        self.conn()
            .query_row(
                "SELECT count(*) FROM items WHERE status = ?1",
                [status],
                |r| r.get(0),
            )
            .expect("counting items")
    }

    /// Names of the files in the sandbox that start with `prefix`.
    pub fn files_starting_with(&self, prefix: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir())
            .expect("listing the sandbox")
            .map(|e| e.expect("reading the sandbox").file_name())
            .filter_map(|n| n.into_string().ok())
            .filter(|n| n.starts_with(prefix))
            .collect();
        names.sort();
        names
    }
}

/// Since when (ms) the worker `worker` has been in a write, as its running
/// file beside `db` shows (the pair whose id is -1); 0 when it is not in
/// one or has no file.
pub fn writing_since(db: &Path, worker: &str) -> i64 {
    let hex: String = worker.bytes().map(|b| format!("{b:02x}")).collect();
    let mut name = db.as_os_str().to_owned();
    name.push(format!("-running-{hex}"));
    let cells: Vec<i64> = std::fs::read(&name)
        .unwrap_or_default()
        .chunks_exact(8)
        .map(|c| i64::from_ne_bytes(c.try_into().expect("8 bytes")))
        .collect();
    cells
        .chunks_exact(2)
        .find(|pair| pair[0] == -1)
        .map_or(0, |pair| pair[1])
}

/// Opens a database without any write access, so that looking cannot
/// change what is looked at.
pub fn open_read_only(db: &Path) -> Connection {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(db, flags)
        .unwrap_or_else(|e| panic!("{}: cannot open read-only: {e}", db.display()));
    conn.busy_timeout(DEADLINE).expect("setting a busy timeout");
    conn
}

/// A text or blob column as bytes; `None` for NULL.
fn bytes(v: ValueRef<'_>) -> Option<Vec<u8>> {
    match v {
        ValueRef::Text(b) | ValueRef::Blob(b) => Some(b.to_vec()),
        ValueRef::Null => None,
        other => panic!("expected text or a blob, found {other:?}"),
    }
}

/// A row of the `items` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub id: i64,
    pub payload: Vec<u8>,
    /// Text, or a blob for a key made from a binary payload.
    pub key: Option<Vec<u8>>,
    pub status: String,
    pub attempts: i64,
    pub max_attempts: i64,
    pub run_after: i64,
    pub lease_owner: Option<String>,
    pub lease_expires: Option<i64>,
    pub lease_token: i64,
    pub result: Option<Vec<u8>>,
    pub last_error: Option<String>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

/// A row of the `attempts` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub item_id: i64,
    pub attempt: i64,
    pub worker: Option<String>,
    pub outcome: String,
    pub error: Option<String>,
}

/// A command line to run, built up argument by argument.
pub struct Cmd {
    program: PathBuf,
    args: Vec<OsString>,
    cwd: PathBuf,
    env: Vec<(OsString, OsString)>,
    stdin: Option<Vec<u8>>,
}

impl Cmd {
    pub fn new(program: impl Into<PathBuf>, cwd: &Path) -> Cmd {
        Cmd {
            program: program.into(),
            args: Vec::new(),
            cwd: cwd.to_path_buf(),
            env: Vec::new(),
            stdin: None,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Cmd {
        self.args.push(arg.as_ref().to_os_string());
        self
    }

    pub fn args<I>(mut self, args: I) -> Cmd
    where
        I: IntoIterator,
        I::Item: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Cmd {
        let pair = (key.as_ref().to_os_string(), value.as_ref().to_os_string());
        self.env.push(pair);
        self
    }

    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Cmd {
        self.stdin = Some(bytes.into());
        self
    }

    /// The command line as a person would type it, and where it runs.
    fn describe(&self) -> String {
        let mut line = quote(self.program.as_os_str());
        for a in &self.args {
            line.push(' ');
            line.push_str(&quote(a));
        }
        let mut env = String::new();
        for (k, v) in &self.env {
            env.push_str(&format!("{}={} ", quote(k), quote(v)));
        }
        format!("command: {env}{line}\n  cwd:     {}", self.cwd.display())
    }

    /// Starts the command. Every process a test starts goes through here:
    /// standard output and error go to anonymous files, so a chatty child
    /// never blocks on a full pipe and a failure can show both.
    pub fn spawn(&self) -> Running {
        let capture = || tempfile::tempfile().expect("creating an output capture file");
        let (stdout, stderr) = (capture(), capture());
        let mut cmd = std::process::Command::new(&self.program);
        cmd.args(&self.args)
            .current_dir(&self.cwd)
            // The caller's environment must not pick the database or the
            // log level for the test; colour codes would only garble a
            // failure report.
            .env_remove("LITEWORK_DB")
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(stdout.try_clone().expect("duplicating a capture file"))
            .stderr(stderr.try_clone().expect("duplicating a capture file"));
        match &self.stdin {
            Some(bytes) => {
                let mut input = tempfile::tempfile().expect("creating a stdin file");
                input.write_all(bytes).expect("writing the stdin file");
                input.rewind().expect("rewinding the stdin file");
                cmd.stdin(input);
            }
            None => {
                cmd.stdin(std::process::Stdio::null());
            }
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the process: {e}\n  {}", self.describe()));
        Running {
            child,
            what: self.describe(),
            stdout,
            stderr,
            status: None,
        }
    }

    /// Runs to the end and expects exit status 0.
    pub fn run(&self) -> Output {
        self.spawn().wait(0)
    }

    /// Runs to the end and expects exit status `code`.
    pub fn run_expect(&self, code: i32) -> Output {
        self.spawn().wait(code)
    }
}

/// Quotes a word for display when it would not read back as one word.
fn quote(word: &OsStr) -> String {
    let s = word.to_string_lossy();
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A started process. Dropping it kills the process if it still runs, so a
/// failing test leaves no worker behind.
pub struct Running {
    child: Child,
    what: String,
    stdout: File,
    stderr: File,
    status: Option<ExitStatus>,
}

impl Running {
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits in i32")
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) with the pid of a child this handle has not reaped
        // yet, so the pid cannot belong to anyone else.
        let r = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(
            r,
            0,
            "kill({}, {signal}): {}\n  {}",
            self.pid(),
            std::io::Error::last_os_error(),
            self.what
        );
    }

    /// Standard error written so far.
    pub fn stderr_so_far(&self) -> String {
        String::from_utf8_lossy(&read_all(&self.stderr)).into_owned()
    }

    /// Returns true if and only if the process has exited.
    pub fn exited(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("polling a child");
        }
        self.status.is_some()
    }

    /// Waits for the process to exit (at most [`DEADLINE`]) and expects
    /// exit status `code`; panics with everything known about it otherwise.
    pub fn wait(mut self, code: i32) -> Output {
        let start = Instant::now();
        while !self.exited() {
            if start.elapsed() >= DEADLINE {
                let _ = self.child.kill();
                self.status = self.child.wait().ok();
                let output = self.output();
                panic!(
                    "{}",
                    output.report(&format!("did not exit within {DEADLINE:?}; killed"))
                );
            }
            std::thread::sleep(POLL);
        }
        let output = self.output();
        if output.status.code() != Some(code) {
            panic!("{}", output.report(&format!("expected exit status {code}")));
        }
        output
    }

    fn output(&self) -> Output {
        Output {
            what: self.what.clone(),
            status: self.status.expect("the process has exited"),
            stdout: read_all(&self.stdout),
            stderr: String::from_utf8_lossy(&read_all(&self.stderr)).into_owned(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Everything in a capture file, read from its start.
fn read_all(file: &File) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = file
            .read_at(&mut chunk, out.len() as u64)
            .expect("reading a capture file");
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&chunk[..n]);
    }
}

/// What a finished process left.
pub struct Output {
    what: String,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Output {
    pub fn stdout_text(&self) -> String {
        String::from_utf8(self.stdout.clone())
            .unwrap_or_else(|_| panic!("{}", self.report("standard output is not UTF-8")))
    }

    /// Asserts that standard error contains `needle`.
    pub fn assert_stderr_has(&self, needle: &str) {
        if !self.stderr.contains(needle) {
            panic!("{}", self.report(&format!("stderr lacks {needle:?}")));
        }
    }

    /// The command, its working directory, exit status and output, for a
    /// failure message.
    pub fn report(&self, problem: &str) -> String {
        format!(
            "{problem}\n  {}\n  status:  {}\n  --- stdout ---\n{}\n  --- stderr ---\n{}",
            self.what,
            self.status,
            String::from_utf8_lossy(&self.stdout),
            self.stderr
        )
    }
}

/// Returns true if and only if no process has `pid` any more, or it is a
/// zombie: dead, waiting for a parent (init here) to reap it.
pub fn process_gone(pid: i32) -> bool {
    // SAFETY: signal 0 sends nothing; it only asks whether the pid exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
    if !alive {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and
        // may itself contain spaces or parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

/// Waits until `path` holds a whole line (a pid written by an item) and
/// returns it parsed.
pub fn read_pid(path: &Path) -> i32 {
    let mut text = String::new();
    wait_until(&format!("{} holds a pid", path.display()), DEADLINE, || {
        text = std::fs::read_to_string(path).unwrap_or_default();
        text.ends_with('\n')
    });
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {text:?} is not a pid: {e}", path.display()))
}

/// Parses the worker's final line, `worker ID: N done, N retried, N
/// failed, N lost leases, N released`, into the six fields.
pub fn summary(stderr: &str) -> Summary {
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("worker ") && l.ends_with(" released"))
        .unwrap_or_else(|| panic!("no worker summary line in stderr:\n{stderr}"));
    let (head, counts) = line
        .split_once(": ")
        .unwrap_or_else(|| panic!("malformed summary line {line:?}"));
    let n: Vec<u64> = counts
        .split(", ")
        .map(|part| {
            let number = part.split(' ').next().unwrap_or_default();
            number
                .parse()
                .unwrap_or_else(|e| panic!("summary line {line:?}: {part:?}: {e}"))
        })
        .collect();
    assert_eq!(n.len(), 5, "summary line {line:?} should have five counts");
    Summary {
        worker: head.trim_start_matches("worker ").to_string(),
        done: n[0],
        retried: n[1],
        failed: n[2],
        lost: n[3],
        released: n[4],
    }
}

/// A worker's final counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub worker: String,
    pub done: u64,
    pub retried: u64,
    pub failed: u64,
    pub lost: u64,
    pub released: u64,
}

impl Summary {
    /// `(done, retried, failed, lost, released)`, to compare in one go.
    pub fn counts(&self) -> (u64, u64, u64, u64, u64) {
        (
            self.done,
            self.retried,
            self.failed,
            self.lost,
            self.released,
        )
    }
}

/// GET `path` from `addr` over plain HTTP/1.0; returns the status code and
/// the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    http_get_with(addr, path, "")
}

/// [`http_get`] with extra header lines (each ending in `\r\n`).
pub fn http_get_with(addr: &str, path: &str, headers: &str) -> (u16, String) {
    use std::io::Read;
    let mut stream =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("setting a read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{headers}\r\n"
    )
    .expect("sending a request");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("reading a response");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("GET http://{addr}{path}: malformed response {head:?}"));
    (status, body.to_string())
}

/// Waits until a running `litework run` logs where its supervisor serves
/// metrics, and returns that `host:port`.
pub fn supervisor_addr(run: &Running) -> String {
    let mut addr = String::new();
    wait_until("the supervisor logs its metrics address", DEADLINE, || {
        let log = run.stderr_so_far();
        addr = log
            .split("metrics=http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_default()
            .to_string();
        !addr.is_empty()
    });
    addr
}

/// `(id, pid)` of the workers the database lists as running, oldest first.
pub fn live_workers(sb: &Sandbox) -> Vec<(String, i32)> {
    let conn = sb.conn();
    let mut stmt = conn
        .prepare("SELECT id, pid FROM workers WHERE status = 'running' ORDER BY started_at")
        .expect("preparing the workers query");
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("querying workers");
    rows.collect::<rusqlite::Result<_>>()
        .expect("reading workers")
}

/// Asserts the history holds exactly one attempt: the first, by `worker`,
/// lost (its lease was taken and its outcome dropped).
pub fn assert_one_lost_attempt(sb: &Sandbox, worker: &str) {
    let history = sb.attempts();
    assert_eq!(history.len(), 1, "{history:#?}");
    let lost = &history[0];
    assert_eq!(
        (lost.attempt, lost.worker.as_deref(), lost.outcome.as_str()),
        (1, Some(worker), "lost"),
        "{lost:?}"
    );
}
