//! Running one item as a command.
//!
//! The command runs without a shell: the payload is one argv element (or
//! the child's standard input), so no byte of it is ever parsed as shell
//! syntax. Where a shell is asked for, the script text is fixed when the
//! worker starts and the payload reaches it as `"$1"`.
//!
//! Each child leads its own process group. A timeout, a lost lease or a
//! shutdown kills the whole group, and so does the leader's exit: the
//! processes of an item never outlive it (and cannot keep its output pipes
//! open).
//!
//! A process that left the group (GNU `timeout` makes a group of its own,
//! `setsid` a session) is found by the `LITEWORK_ATTEMPT_ID` in its
//! environment (random for each run of an item, so that a worker of
//! another queue with the same worker and item ids is never taken for it)
//! and killed too: when the item is stopped, or when such a process still
//! holds the item's output after the leader exited. One that left the
//! group and let go of the output of an item that ended by itself is left
//! running (a daemon it started), and so is one that cleared its
//! environment.
//!
//! The executor thread waits in `poll(2)` on the child's pipes and
//! on a pidfd, so a finished child is noticed at once without a reaper
//! thread or a sleep loop. On kernels without `pidfd_open` (before 5.3) the
//! wait ends when the pipes close instead, so leftover background
//! processes of an item are not killed there.

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::queue::running::Cells;
use crate::queue::Job;
use crate::worker::{Cancel, CancelReason, Outcome};

/// Linux refuses a single argument or environment string longer than
/// this (`MAX_ARG_STRLEN`, 32 pages).
pub const MAX_ARG_BYTES: usize = 32 * 4096;

/// Payloads up to this size are also passed in `LITEWORK_PAYLOAD`.
const MAX_ENV_PAYLOAD: usize = 32 * 1024;

/// How the payload reaches the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadMode {
    /// In place of `{}` in the arguments, or as a last argument if there is
    /// no `{}`.
    Argument,
    /// On standard input (and in place of any `{}`).
    Stdin,
    /// `sh -c SCRIPT litework PAYLOAD`: the script reads it as `"$1"`.
    Shell,
}

/// A command to run for every item.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    program: OsString,
    /// `program` as found in `PATH` at start: each spawn then executes it
    /// directly instead of trying every `PATH` directory in the child.
    resolved: PathBuf,
    args: Vec<OsString>,
    mode: PayloadMode,
    append_payload: bool,
    /// Most bytes of standard output kept as the item's result.
    pub max_output: usize,
    /// Most bytes of the end of standard error kept as the error.
    pub max_error: usize,
    /// Exit statuses that mean "do not retry".
    pub permanent_exit: Vec<i32>,
    /// Exported to the child as `LITEWORK_WORKER_ID`.
    pub worker_id: String,
    /// Kills the items' process groups if the worker dies; see [`Keeper`].
    pub keeper: Option<Arc<Keeper>>,
    /// Resource limits set in each item's process before it runs.
    pub limits: Limits,
}

/// Resource limits for item commands (`setrlimit(2)` in the child before
/// exec; inherited by everything the command starts). A command that
/// exceeds one is stopped by the kernel (SIGXCPU, SIGXFSZ) or sees its
/// allocations or `open` calls fail, and the item fails like any other.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// CPU time, in seconds (RLIMIT_CPU).
    pub cpu_seconds: Option<u64>,
    /// Address space, in bytes (RLIMIT_AS).
    pub address_space: Option<u64>,
    /// Open file descriptors (RLIMIT_NOFILE).
    pub open_files: Option<u64>,
    /// Largest file the command may write, in bytes (RLIMIT_FSIZE).
    pub file_size: Option<u64>,
}

impl Limits {
    /// Checks that the limits can be set, by starting `true` under them
    /// once: a limit above this process's hard limit (without the
    /// privilege to raise it), or an open-files limit above the system's
    /// (`nr_open`), would otherwise fail every item's start, each attempt.
    /// Without a `true` in `PATH` nothing is checked.
    pub fn check(&self) -> Result<()> {
        if *self == Limits::default() {
            return Ok(());
        }
        let Ok(program) = resolve_program(OsStr::new("true")) else {
            return Ok(());
        };
        let limits = *self;
        let mut cmd = std::process::Command::new(program);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: between fork and exec only setrlimit, no allocation.
        unsafe {
            cmd.pre_exec(move || limits.apply());
        }
        let refused = |e: std::io::Error| {
            Error::Config(format!(
                "--limit-*: a command cannot be started under these limits: {e} \
                 (a limit above this process's hard limit needs privileges; open files \
                 cannot exceed /proc/sys/fs/nr_open)"
            ))
        };
        let mut child = cmd.spawn().map_err(refused)?;
        // Its exit status does not matter: it started.
        child.wait().map_err(refused)?;
        Ok(())
    }

    /// Applies the limits to the calling process. Runs between fork and
    /// exec: no allocation.
    fn apply(&self) -> std::io::Result<()> {
        let set = |resource, soft: u64, hard: u64| {
            let limit = libc::rlimit {
                rlim_cur: soft as libc::rlim_t,
                rlim_max: hard as libc::rlim_t,
            };
            // SAFETY: setrlimit with a valid rlimit struct.
            if unsafe { libc::setrlimit(resource, &limit) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        };
        if let Some(s) = self.cpu_seconds {
            // SIGXCPU at the soft limit, SIGKILL a second later.
            set(libc::RLIMIT_CPU, s, s.saturating_add(1))?;
        }
        if let Some(b) = self.address_space {
            set(libc::RLIMIT_AS, b, b)?;
        }
        if let Some(n) = self.open_files {
            set(libc::RLIMIT_NOFILE, n, n)?;
        }
        if let Some(b) = self.file_size {
            set(libc::RLIMIT_FSIZE, b, b)?;
        }
        Ok(())
    }
}

impl CommandSpec {
    /// Checks the command line once, before any item is claimed: the
    /// program must exist and be executable, and a shell script must not
    /// contain `{}`, which would paste the payload into the script text.
    pub fn new(argv: Vec<OsString>, mode: PayloadMode) -> Result<CommandSpec> {
        let (program, args) = match mode {
            PayloadMode::Shell => {
                let script = join_words(&argv);
                if script.is_empty() {
                    return Err(Error::Config("--shell needs a script to run".into()));
                }
                if contains(script.as_bytes(), b"{}") {
                    return Err(Error::Config(
                        "--shell: the script contains {}: with --shell the payload is \"$1\"; \
                         {} would paste it into the script text"
                            .into(),
                    ));
                }
                let args = vec!["-c".into(), script, "litework".into()];
                (OsString::from("/bin/sh"), args)
            }
            _ => {
                let mut it = argv.into_iter();
                let program = it
                    .next()
                    .ok_or_else(|| Error::Config("no command given (put it after --)".into()))?;
                (program, it.collect())
            }
        };
        let resolved = resolve_program(&program)?;
        let append_payload =
            mode == PayloadMode::Argument && !args.iter().any(|a| contains(a.as_bytes(), b"{}"));
        Ok(CommandSpec {
            program,
            resolved,
            args,
            mode,
            append_payload,
            max_output: 1024 * 1024,
            max_error: 4096,
            permanent_exit: Vec::new(),
            worker_id: String::new(),
            keeper: None,
            limits: Limits::default(),
        })
    }

    /// The argument vector for `job`, placeholders filled in.
    fn argv(&self, job: &Job) -> Vec<OsString> {
        let id = job.id.to_string();
        let attempt = job.attempt.to_string();
        let mut out: Vec<OsString> = self
            .args
            .iter()
            .map(|a| {
                let payload: &[u8] = if self.mode == PayloadMode::Shell {
                    b"{}"
                } else {
                    &job.payload
                };
                OsString::from_vec(expand(
                    a.as_bytes(),
                    payload,
                    id.as_bytes(),
                    attempt.as_bytes(),
                ))
            })
            .collect();
        if self.append_payload || self.mode == PayloadMode::Shell {
            out.push(OsString::from_vec(job.payload.clone()));
        }
        out
    }

    /// Runs the command for `job` and waits for it, or for `cancel`.
    pub fn run(&self, job: &Job, cancel: &Cancel) -> Outcome {
        let payload_in_argv = self.mode != PayloadMode::Stdin || self.args_have_payload();
        if payload_in_argv {
            // Under --stdin only a `{}` in the command puts it in an argument.
            let hint = if self.mode == PayloadMode::Stdin {
                "take {} out of the command to pass it on standard input only"
            } else {
                "use --stdin to pass it on standard input"
            };
            if job.payload.contains(&0) {
                return Outcome::Fail(format!(
                    "payload contains a NUL byte and cannot be a command argument; {hint}"
                ));
            }
            if job.payload.len() >= MAX_ARG_BYTES {
                return Outcome::Fail(format!(
                    "payload is {} bytes; Linux limits one command argument to {} bytes; {hint}",
                    job.payload.len(),
                    MAX_ARG_BYTES - 1
                ));
            }
        }

        let attempt_id = format!("{:016x}", fastrand::u64(..));
        let mut cmd = std::process::Command::new(&self.resolved);
        // The program sees its name as it was given, not the resolved path.
        cmd.arg0(&self.program)
            .args(self.argv(job))
            .env("LITEWORK_ITEM_ID", job.id.to_string())
            .env("LITEWORK_ATTEMPT", job.attempt.to_string())
            .env("LITEWORK_MAX_ATTEMPTS", job.max_attempts.to_string())
            .env("LITEWORK_WORKER_ID", &self.worker_id)
            .env("LITEWORK_ATTEMPT_ID", &attempt_id)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(if self.mode == PayloadMode::Stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            // Its own process group, so that one kill reaches everything the
            // item started, and a Ctrl-C at the terminal reaches the worker
            // (which drains) rather than every item at once.
            .process_group(0);
        if self.limits != Limits::default() {
            let limits = self.limits;
            // SAFETY: between fork and exec only setrlimit, no allocation.
            // Only with limits: a pre_exec hook makes std fork the worker
            // instead of using posix_spawn, which costs more per item than
            // the rest of its round trip through the queue.
            unsafe {
                cmd.pre_exec(move || limits.apply());
            }
        }
        // Both only where the environment can hold them: a key made from
        // a large payload would make the spawn fail (E2BIG), a NUL fail it
        // outright.
        let fits = |v: &[u8]| v.len() <= MAX_ENV_PAYLOAD && !v.contains(&0);
        match &job.key {
            Some(k) if fits(k.as_bytes()) => cmd.env("LITEWORK_KEY", k),
            _ => cmd.env_remove("LITEWORK_KEY"),
        };
        if fits(&job.payload) {
            cmd.env("LITEWORK_PAYLOAD", OsStr::from_bytes(&job.payload));
        } else {
            cmd.env_remove("LITEWORK_PAYLOAD");
        }

        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) if e.raw_os_error() == Some(libc::E2BIG) => {
                return Outcome::Fail(format!(
                    "cannot start {:?}: the arguments and environment are too long for \
                     the kernel (one argument may have at most {} bytes); use --stdin to \
                     pass the payload on standard input",
                    self.program,
                    MAX_ARG_BYTES - 1
                ))
            }
            Err(e) => return Outcome::Retry(format!("cannot start {:?}: {e}", self.program)),
        };
        let stdin = if self.mode == PayloadMode::Stdin {
            Some(job.payload.as_slice())
        } else {
            None
        };
        let group = child.id();
        if let Some(k) = &self.keeper {
            k.watch(group);
        }
        let mark = format!("LITEWORK_ATTEMPT_ID={attempt_id}");
        let finished = wait_child(
            child,
            stdin,
            (self.max_output, self.max_error),
            cancel,
            &mark,
            self.keeper.as_deref(),
        );
        match finished {
            Ok(finished) => self.outcome(finished),
            Err(e) => Outcome::Retry(format!("waiting for {:?}: {e}", self.program)),
        }
    }

    fn args_have_payload(&self) -> bool {
        self.args.iter().any(|a| contains(a.as_bytes(), b"{}"))
    }

    fn outcome(&self, f: Finished) -> Outcome {
        let tail = String::from_utf8_lossy(&f.stderr_tail);
        let tail = tail.trim();
        let detail = if tail.is_empty() {
            String::new()
        } else {
            format!(": {tail}")
        };
        match (f.status.code(), f.status.signal()) {
            (Some(0), _) => Outcome::Done(f.stdout),
            (Some(code), _) if self.permanent_exit.contains(&code) => {
                Outcome::Fail(format!("exit status {code} (permanent){detail}"))
            }
            (Some(code), _) => Outcome::Retry(format!("exit status {code}{detail}")),
            (None, Some(sig)) => Outcome::Retry(format!("killed by signal {sig}{detail}")),
            (None, None) => Outcome::Retry(format!("ended with {}{detail}", f.status)),
        }
    }
}

/// What a finished child left behind.
struct Finished {
    status: std::process::ExitStatus,
    stdout: Vec<u8>,
    stderr_tail: Vec<u8>,
}

/// Feeds `stdin`, collects output and waits for the child, killing its
/// group when `cancel` fires or when the leader exits, and the processes
/// that left the group when the item was stopped or they still hold its
/// output.
fn wait_child(
    mut child: Child,
    stdin: Option<&[u8]>,
    (max_output, max_error): (usize, usize),
    cancel: &Cancel,
    mark: &str,
    keeper: Option<&Keeper>,
) -> std::io::Result<Finished> {
    let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
    // The hook runs under the cancel lock and is removed (under the same
    // lock) before the child is reaped: a kill can only reach the group
    // while its leader, at worst a zombie, still holds the pid, never a
    // process that reused it.
    cancel.set_hook(Box::new(move || kill_group(pid)));

    // At its deadline the item is cancelled here as well as by the
    // worker's loop, which may then be waiting for the write lock (as long
    // as the busy timeout): the hook above kills the group.
    let on_deadline = || cancel.cancel(CancelReason::Timeout);
    let pumped = pump(
        &mut child,
        stdin,
        (max_output, max_error),
        (cancel.deadline(), &on_deadline),
    );
    if pumped.is_err() {
        kill_group(pid);
    }
    let escaped = pumped.as_ref().is_ok_and(|p| p.held_open);
    if escaped || cancel.is_cancelled() {
        // A /proc walk: only on these rare ends, never per item.
        kill_strays(&[mark]);
    }

    // Wait without reaping, so the pid stays ours while the group is killed
    // and the hook removed; only then reap.
    let waited = wait_exited_no_reap(pid);
    kill_group(pid);
    cancel.clear_hook();
    // Off the keeper's list before the pid is freed: should the worker die
    // right after the reap, its keeper must not kill a group that reused it.
    if let Some(k) = keeper {
        k.forget(child.id());
    }
    let status = child.wait()?;
    waited?;
    let Pumped {
        stdout,
        stderr: stderr_tail,
        ..
    } = pumped?;
    Ok(Finished {
        status,
        stdout,
        stderr_tail,
    })
}

/// What [`pump`] collected.
struct Pumped {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// The output pipes were still open a second after the leader exited
    /// and its group was killed: held by a process outside the group.
    held_open: bool,
}

/// Feeds standard input and collects output until both output pipes close.
/// When the leader exits (seen on its pidfd) the rest of its group is
/// killed, so that nothing can hold the pipes open.
fn pump(
    child: &mut Child,
    stdin: Option<&[u8]>,
    (max_output, max_error): (usize, usize),
    (mut deadline, on_deadline): (Option<Instant>, &dyn Fn()),
) -> std::io::Result<Pumped> {
    let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
    let mut out = child.stdout.take().map(Pipe::new);
    let mut err = child.stderr.take().map(Pipe::new);
    let mut input = child.stdin.take();
    let mut fed = 0usize;
    if stdin.is_some_and(|s| s.is_empty()) {
        input = None;
    }
    for fd in [out.as_ref().map(|p| p.fd()), err.as_ref().map(|p| p.fd())]
        .into_iter()
        .flatten()
        .chain(input.as_ref().map(|i| i.as_raw_fd()))
    {
        set_nonblocking(fd)?;
    }
    let pidfd = pidfd_open(pid);
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let mut leader_gone_at: Option<Instant> = None;
    let mut held_open = false;

    // Also while input is still being fed: a child may close its output
    // early and go on reading.
    while out.is_some() || err.is_some() || input.is_some() {
        let mut fds = Vec::with_capacity(4);
        let push = |fds: &mut Vec<libc::pollfd>, fd: RawFd, events: i16| {
            fds.push(libc::pollfd {
                fd,
                events,
                revents: 0,
            });
        };
        let out_fd = out.as_ref().map(|p| p.fd()).unwrap_or(-1);
        let err_fd = err.as_ref().map(|p| p.fd()).unwrap_or(-1);
        push(&mut fds, out_fd, libc::POLLIN);
        push(&mut fds, err_fd, libc::POLLIN);
        let in_fd = input.as_ref().map(|i| i.as_raw_fd()).unwrap_or(-1);
        push(&mut fds, in_fd, libc::POLLOUT);
        let pid_fd = match (&pidfd, leader_gone_at) {
            (Some(fd), None) => fd.as_raw_fd(),
            _ => -1,
        };
        push(&mut fds, pid_fd, libc::POLLIN);
        // Once the leader is gone and its group killed, pipes held by a
        // process that left the group get one second to close.
        let timeout = match leader_gone_at {
            Some(at) => {
                let left = Duration::from_secs(1).saturating_sub(at.elapsed());
                if left.is_zero() {
                    held_open = true;
                    break;
                }
                i32::try_from(left.as_millis()).unwrap_or(1000).max(1)
            }
            None => -1,
        };
        let timeout = match deadline {
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    on_deadline();
                    deadline = None;
                    continue;
                }
                // Rounded up: waking a little late is fine, early spins.
                let ms = i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX);
                if timeout < 0 {
                    ms
                } else {
                    timeout.min(ms)
                }
            }
            None => timeout,
        };
        // SAFETY: `fds` is a valid array of pollfd; negative fds are ignored.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let ready = |i: usize| fds[i].revents != 0;
        if ready(0) && drain(&mut out, &mut stdout, max_output, false)? {
            out = None;
        }
        if ready(1) && drain(&mut err, &mut stderr, max_error, true)? {
            err = None;
        }
        if ready(2) {
            if let (Some(pipe), Some(data)) = (input.as_mut(), stdin) {
                match pipe.write(&data[fed..]) {
                    Ok(k) => fed += k,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                        ) => {}
                    // The child closed its end or exited: it has read all it wants.
                    Err(_) => fed = data.len(),
                }
                if fed >= data.len() {
                    input = None;
                }
            }
        }
        if ready(3) {
            leader_gone_at = Some(Instant::now());
            input = None;
            kill_group(pid);
        }
    }
    drop(input);
    // The tail is cut while reading only once it is twice its size.
    if stderr.len() > max_error {
        stderr.drain(..stderr.len() - max_error);
    }
    Ok(Pumped {
        stdout,
        stderr,
        held_open,
    })
}

/// A child's output pipe.
struct Pipe(std::fs::File);

impl Pipe {
    fn new<T: Into<OwnedFd>>(p: T) -> Pipe {
        Pipe(std::fs::File::from(p.into()))
    }

    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Reads what is available. Keeps the first `cap` bytes, or with `tail`
/// the last `cap` bytes. Returns true at end of file.
fn drain(
    pipe: &mut Option<Pipe>,
    buf: &mut Vec<u8>,
    cap: usize,
    tail: bool,
) -> std::io::Result<bool> {
    let Some(p) = pipe.as_mut() else {
        return Ok(true);
    };
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match p.0.read(&mut chunk) {
            Ok(0) => {
                if tail && buf.len() > cap {
                    buf.drain(..buf.len() - cap);
                }
                return Ok(true);
            }
            Ok(n) => {
                if tail {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.len() > 2 * cap.max(1) {
                        buf.drain(..buf.len() - cap);
                    }
                } else if buf.len() < cap {
                    let keep = n.min(cap - buf.len());
                    buf.extend_from_slice(&chunk[..keep]);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if tail && buf.len() > cap {
                    buf.drain(..buf.len() - cap);
                }
                return Ok(false);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Returns true if and only if a process `pid` exists and is not a zombie
/// (dead, waiting to be reaped).
pub fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 sends nothing; it only asks whether the pid exists.
    let exists = unsafe { libc::kill(pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    exists
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            // The state follows the command name, which is in parentheses.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X")
        })
}

fn kill_group(pgid: i32) {
    // SAFETY: plain syscall; a group that no longer exists gives ESRCH.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a file descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open returns a new fd that we own, or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the fd was just created for us.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Blocks until child `pid` has exited, leaving it to be reaped (its pid
/// stays taken until then).
pub(crate) fn wait_exited_no_reap(pid: i32) -> std::io::Result<()> {
    loop {
        // SAFETY: siginfo_t is plain data; waitid fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Replaces `{}`, `{id}` and `{attempt}` in one argument.
fn expand(arg: &[u8], payload: &[u8], id: &[u8], attempt: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(arg.len() + payload.len());
    let mut rest = arg;
    while let Some(at) = rest.iter().position(|&b| b == b'{') {
        out.extend_from_slice(&rest[..at]);
        let tail = &rest[at..];
        let (value, len): (&[u8], usize) = if tail.starts_with(b"{}") {
            (payload, 2)
        } else if tail.starts_with(b"{id}") {
            (id, 4)
        } else if tail.starts_with(b"{attempt}") {
            (attempt, 9)
        } else {
            (b"{", 1)
        };
        out.extend_from_slice(value);
        rest = &tail[len..];
    }
    out.extend_from_slice(rest);
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn join_words(words: &[OsString]) -> OsString {
    let mut script = Vec::new();
    for (i, w) in words.iter().enumerate() {
        if i > 0 {
            script.push(b' ');
        }
        script.extend_from_slice(w.as_bytes());
    }
    OsString::from_vec(script)
}

/// A small process that kills the process groups of running items if the
/// worker dies without doing it (kill -9, OOM).
///
/// Without it, an item of a worker killed outright would run on unseen
/// while another worker redoes it. The keeper is `litework keep-groups`,
/// started by the worker with a pipe on its standard input. The worker
/// lists the group of each item it starts in a small memory-mapped file
/// (a store, no system call, no wake-up of the keeper) and clears it once
/// it has reaped the item; if the file is full it writes `+PGID` and
/// `-PGID` lines on the pipe instead. When the pipe closes, however the
/// worker ended, the keeper kills every group still listed in either, and
/// every process whose environment carries this worker's
/// `LITEWORK_WORKER_ID` (which covers an item the worker started but died
/// before listing), removes the file and exits.
pub struct Keeper {
    pipe: Mutex<std::process::ChildStdin>,
    groups: Option<Cells>,
    _child: std::process::Child,
}

/// Groups listed in the keeper's file; more go over the pipe.
const KEEPER_CELLS: usize = 1024;

impl std::fmt::Debug for Keeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keeper").finish_non_exhaustive()
    }
}

impl Keeper {
    /// Starts `exe keep-groups`, in a process group of its own so that a
    /// Ctrl-C at the terminal does not end it before it is needed.
    pub fn start(exe: &Path, worker_id: &str) -> Result<Keeper> {
        let path = std::env::temp_dir().join(format!(
            "litework-keeper-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        // Without the file every group goes over the pipe.
        let groups = Cells::create(path, KEEPER_CELLS, false).ok();
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["keep-groups", "--worker-id", worker_id]);
        if let Some(g) = &groups {
            cmd.arg("--groups-file").arg(g.path());
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| {
                Error::Start(format!("cannot start {} keep-groups: {e}", exe.display()))
            })?;
        let pipe = child
            .stdin
            .take()
            .ok_or_else(|| Error::Config("keep-groups: no pipe to its standard input".into()))?;
        Ok(Keeper {
            pipe: Mutex::new(pipe),
            groups,
            _child: child,
        })
    }

    fn send(&self, line: String) {
        let mut pipe = self.pipe.lock().unwrap_or_else(|p| p.into_inner());
        // A keeper that is gone cannot be helped; the items still run.
        let _ = pipe.write_all(line.as_bytes());
    }

    fn watch(&self, pgid: u32) {
        let g = i64::from(pgid);
        if let Some(cells) = &self.groups {
            let free = (0..cells.len()).find(|&i| {
                cells
                    .cell(i)
                    .compare_exchange(0, g, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            });
            if free.is_some() {
                return;
            }
        }
        self.send(format!("+{pgid}\n"));
    }

    fn forget(&self, pgid: u32) {
        let g = i64::from(pgid);
        if let Some(cells) = &self.groups {
            let listed = (0..cells.len()).find(|&i| {
                cells
                    .cell(i)
                    .compare_exchange(g, 0, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            });
            if listed.is_some() {
                return;
            }
        }
        self.send(format!("-{pgid}\n"));
    }

    /// Tells the keeper the worker is stopping cleanly with no item left
    /// running, so it need not look for strays: worker ids given with
    /// `--worker-id` need not be unique across unrelated workers.
    pub fn finish(&self) {
        self.send("=\n".to_string());
    }
}

/// The keeper's side: reads `+PGID` / `-PGID` lines until end of input,
/// then kills every group still listed there or in `groups_file` (which
/// it then removes) and, unless the worker said `=` (a clean stop), every
/// process (with its group) whose environment says it belongs to
/// `worker_id`. Returns how many groups it killed.
pub fn keep_groups(
    input: impl std::io::BufRead,
    worker_id: Option<&str>,
    groups_file: Option<&Path>,
) -> usize {
    let mut groups = std::collections::HashSet::new();
    let mut clean = false;
    for line in input.lines() {
        let Ok(line) = line else { break };
        if line == "=" {
            clean = true;
            continue;
        }
        let (sign, number) = line.split_at(line.len().min(1));
        match (sign, number.parse::<i32>()) {
            ("+", Ok(g)) if g > 1 => {
                groups.insert(g);
            }
            ("-", Ok(g)) => {
                groups.remove(&g);
            }
            _ => {}
        }
    }
    if let Some(path) = groups_file {
        let listed = crate::queue::running::read_cells(path).unwrap_or_default();
        groups.extend(
            listed
                .into_iter()
                .filter_map(|g| i32::try_from(g).ok())
                .filter(|&g| g > 1),
        );
        let _ = std::fs::remove_file(path);
    }
    if let (Some(id), false) = (worker_id, clean) {
        let mark = format!("LITEWORK_WORKER_ID={id}");
        groups.extend(processes_with(&[&mark]).into_iter().map(|(_, group)| group));
    }
    for &g in &groups {
        kill_group(g);
    }
    groups.len()
}

/// `(pid, process group)` of the processes whose environment has every
/// one of `marks` (`NAME=value`), read from /proc. A process caught in the
/// instant between its exec and the setup of its new stack shows an empty
/// environment and is missed; together with the list the worker keeps,
/// that leaves only an item spawned in that same instant before a kill.
fn processes_with(marks: &[&str]) -> Vec<(i32, i32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid as u32 != me)
        .filter(|pid| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            marks
                .iter()
                .all(|mark| environ.split(|&b| b == 0).any(|var| var == mark.as_bytes()))
        })
        // SAFETY: getpgid on any pid; -1 if it is gone.
        .map(|pid| (pid, unsafe { libc::getpgid(pid) }))
        .filter(|&(_, g)| g > 1)
        .collect()
}

/// Kills the processes marked with all of `marks`: with their group where
/// they lead it (a group they made when they left the item's), else alone,
/// as the group they joined may hold other programs.
fn kill_strays(marks: &[&str]) {
    for (pid, group) in processes_with(marks) {
        if group == pid {
            kill_group(group);
        } else {
            // SAFETY: plain syscall; a process that is gone gives ESRCH.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// Finds `program` the way `execvp` will, so that a typo is an error at
/// start-up rather than a failure of every item.
pub fn resolve_program(program: &OsStr) -> Result<PathBuf> {
    let executable = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let shown = Path::new(program).display().to_string();
    if program.as_bytes().contains(&b'/') {
        let p = PathBuf::from(program);
        return if executable(&p) {
            Ok(p)
        } else {
            Err(Error::Config(format!("{shown}: no such executable file")))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
        .ok_or_else(|| Error::Config(format!("{shown}: command not found in PATH")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expand_fills_placeholders_and_leaves_other_braces() {
        let got = expand(b"a{}b{id}c{attempt}{x}{", b"P", b"7", b"2");
        assert_eq!(got, b"aPb7c2{x}{");
    }

    #[test]
    fn shell_script_with_braces_is_refused() {
        let err = CommandSpec::new(vec!["echo {}".into()], PayloadMode::Shell).unwrap_err();
        assert!(err.to_string().contains("\"$1\""), "{err}");
    }

    /// A long sleep in a process group of its own.
    fn sleeper() -> std::process::Child {
        std::process::Command::new("sleep")
            .arg("1000")
            .process_group(0)
            .spawn()
            .unwrap()
    }

    #[test]
    fn keeper_kills_the_groups_listed_in_its_file_and_removes_it() {
        let (mut listed, mut forgotten) = (sleeper(), sleeper());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("groups");
        let cells = Cells::create(path.clone(), 4, false).unwrap();
        cells
            .cell(0)
            .store(i64::from(listed.id()), Ordering::Release);
        cells.cell(2).store(1, Ordering::Release); // never a group to kill
        drop(cells);
        assert_eq!(keep_groups(&b""[..], None, Some(&path)), 1);
        assert_eq!(listed.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert_eq!(forgotten.try_wait().unwrap(), None);
        assert!(!path.exists(), "the keeper removes its file");
        forgotten.kill().unwrap();
        forgotten.wait().unwrap();
    }

    #[test]
    fn keeper_kills_the_groups_still_listed_at_end_of_input() {
        let (mut listed, mut forgotten) = (sleeper(), sleeper());
        let input = format!(
            "+{a}\n+{b}\n-{b}\nnoise\n+1\n",
            a = listed.id(),
            b = forgotten.id()
        );
        assert_eq!(keep_groups(input.as_bytes(), None, None), 1);
        let status = listed.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert_eq!(
            forgotten.try_wait().unwrap(),
            None,
            "a forgotten group is left alone"
        );
        forgotten.kill().unwrap();
        forgotten.wait().unwrap();
    }

    #[test]
    fn keeper_finds_unlisted_processes_of_its_worker_unless_told_all_is_clean() {
        let id = format!("keeper-test-{}-{:x}", std::process::id(), fastrand::u64(..));
        let spawn = || {
            std::process::Command::new("sleep")
                .arg("1000")
                .env("LITEWORK_WORKER_ID", &id)
                .process_group(0)
                .spawn()
                .unwrap()
        };
        let mut spared = spawn();
        // Until the new program has set up its stack, /proc shows an empty
        // environment for a moment after spawn returns; wait for it.
        let marker = format!("LITEWORK_WORKER_ID={id}");
        let environ = format!("/proc/{}/environ", spared.id());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !std::fs::read(&environ)
            .unwrap_or_default()
            .split(|&b| b == 0)
            .any(|var| var == marker.as_bytes())
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{environ} never showed {marker}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(keep_groups(&b"=\n"[..], Some(&id), None), 0);
        assert_eq!(
            spared.try_wait().unwrap(),
            None,
            "a clean stop kills nothing"
        );
        assert_eq!(keep_groups(&b""[..], Some(&id), None), 1);
        assert_eq!(spared.wait().unwrap().signal(), Some(libc::SIGKILL));
    }

    /// All of a child's stderr already in the pipe and the pipe closed:
    /// read to the end in one go, with no pause to cut the tail at.
    #[test]
    fn a_stderr_tail_read_to_its_end_at_once_is_cut_to_its_size() {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) fills two fds that we own from here on.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both fds are fresh and owned by nothing else.
        let (read, mut write) = unsafe {
            (
                OwnedFd::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        };
        let mut text = vec![b'a'; 6000];
        text.extend_from_slice(b"END");
        write.write_all(&text).unwrap();
        drop(write);
        let mut pipe = Some(Pipe::new(read));
        set_nonblocking(pipe.as_ref().unwrap().fd()).unwrap();
        let mut tail = Vec::new();
        assert!(
            drain(&mut pipe, &mut tail, 4096, true).unwrap(),
            "at its end"
        );
        assert_eq!(tail.len(), 4096);
        assert!(tail.ends_with(b"aaaEND"));
    }

    #[test]
    fn missing_program_is_refused() {
        let err = CommandSpec::new(
            vec!["no-such-program-litework".into()],
            PayloadMode::Argument,
        )
        .unwrap_err();
        assert!(err.to_string().contains("command not found"), "{err}");
    }
}
