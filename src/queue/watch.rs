//! Waking an idle worker when another process commits.
//!
//! Every commit in WAL mode writes its pages to `<db>-wal` with `pwrite`,
//! and the kernel reports each write to an inotify watch on that file. An
//! idle worker arms a one-shot watch, then reads `PRAGMA data_version`;
//! a commit after the read fires the watch, which a small thread turns
//! into a message on a channel the worker waits on. So an idle worker
//! needs no frequent polling to notice new items, and costs next to
//! nothing while nothing happens.
//!
//! The one-shot watch matters under load: a busy worker is not armed, so
//! the thousands of commits a second of its peers cost it nothing.
//!
//! What this cannot promise, and how the worker covers it:
//!
//! - The write that fires the watch comes before the commit is visible:
//!   SQLite publishes it in the shared-memory index right after the last
//!   page is written, and stores into a memory map make no inotify event.
//!   A worker woken in between sees the old `data_version`. So after a
//!   wake-up the worker checks again 0.1 ms later, backing off from there.
//!   A transaction that writes pages before it commits (a large `add`)
//!   fires the watch again at every re-arm; the worker then spaces its
//!   checks further apart, up to its `idle_poll`.
//! - inotify sees writes made through this kernel only. WAL mode needs
//!   every process to share the `-shm` memory map, so all of a database's
//!   writers are on one machine anyway; a file system that does not report
//!   writes at all (some FUSE file systems do not) is covered by a check
//!   at least every second.
//! - Where a watch cannot be set (not Linux, the per-user limits
//!   `fs.inotify.max_user_instances` or `max_user_watches` reached, no
//!   `-wal` file) the worker polls as it would without one. Each worker
//!   uses one instance and one watch.

use std::io;
use std::path::{Path, PathBuf};

use crossbeam_channel::Receiver;

/// A one-shot watch on a database's write-ahead log. Dropping it stops
/// its thread.
pub struct CommitWatch {
    events: Receiver<()>,
    inner: imp::Watch,
}

impl CommitWatch {
    /// Starts watching for commits to the database at `db` (which must be
    /// open in WAL mode). The watch is not armed yet: see [`arm`].
    ///
    /// [`arm`]: CommitWatch::arm
    pub fn start(db: &Path) -> io::Result<CommitWatch> {
        // SQLite names the log after the database file with symbolic links
        // resolved.
        let mut wal = std::fs::canonicalize(db)?.into_os_string();
        wal.push("-wal");
        let (tx, events) = crossbeam_channel::bounded(1);
        let inner = imp::Watch::start(PathBuf::from(wal), tx)?;
        Ok(CommitWatch { events, inner })
    }

    /// Arms the watch: the next write to the log sends one message on
    /// [`events`]. Arming an armed watch changes nothing. Arm before
    /// reading `data_version`, so a commit between the two is not missed.
    ///
    /// [`events`]: CommitWatch::events
    pub fn arm(&self) -> io::Result<()> {
        self.inner.arm()
    }

    /// A message arrives here when an armed watch fires (several writes
    /// before it is read make one message). The channel disconnects if the
    /// watch fails for good.
    pub fn events(&self) -> &Receiver<()> {
        &self.events
    }
}

impl std::fmt::Debug for CommitWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitWatch").finish_non_exhaustive()
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use std::ffi::CString;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::PathBuf;
    use std::thread::JoinHandle;

    use crossbeam_channel::{Sender, TrySendError};

    pub struct Watch {
        inotify: OwnedFd,
        /// Written once to stop the thread.
        stop: OwnedFd,
        wal: CString,
        thread: Option<JoinHandle<()>>,
    }

    fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by the kernel, and nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    impl Watch {
        pub fn start(wal: PathBuf, tx: Sender<()>) -> io::Result<Watch> {
            let wal = CString::new(wal.as_os_str().as_bytes())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            // SAFETY: plain system calls that return a new fd or -1.
            let inotify =
                owned(unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) })
                    .map_err(|e| {
                        // EMFILE here is the per-user limit of inotify instances.
                        let hint = if e.raw_os_error() == Some(libc::EMFILE) {
                            " (raise sysctl fs.inotify.max_user_instances)"
                        } else {
                            ""
                        };
                        io::Error::new(e.kind(), format!("inotify: {e}{hint}"))
                    })?;
            // SAFETY: as above.
            let stop = owned(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })
                .map_err(|e| io::Error::new(e.kind(), format!("eventfd: {e}")))?;
            let (fd, stop_fd) = (inotify.as_raw_fd(), stop.as_raw_fd());
            let thread = std::thread::Builder::new()
                .name("litework-watch".into())
                .spawn(move || listen(fd, stop_fd, &tx))?;
            Ok(Watch {
                inotify,
                stop,
                wal,
                thread: Some(thread),
            })
        }

        pub fn arm(&self) -> io::Result<()> {
            // SAFETY: both arguments are valid for the call.
            let wd = unsafe {
                libc::inotify_add_watch(
                    self.inotify.as_raw_fd(),
                    self.wal.as_ptr(),
                    libc::IN_MODIFY | libc::IN_ONESHOT,
                )
            };
            if wd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }
    }

    impl Drop for Watch {
        fn drop(&mut self) {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live buffer to our eventfd.
            unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), one.len()) };
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
            // The fds close after this, once the thread no longer uses them.
        }
    }

    /// Waits for events (or the stop) and passes each burst on as one
    /// message. Which event came does not matter: the worker only looks
    /// at `data_version` again, so a spurious wake-up costs one read.
    fn listen(inotify: RawFd, stop: RawFd, tx: &Sender<()>) {
        let mut fds = [
            libc::pollfd {
                fd: inotify,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Aligned for `inotify_event`, though the events are not parsed.
        let mut buf = [0u64; 512];
        loop {
            // SAFETY: fds is a live array of two pollfd.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if r < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            if fds[1].revents != 0 || fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
                return;
            }
            let mut got = false;
            loop {
                let len = std::mem::size_of_val(&buf);
                // SAFETY: reads at most len bytes into buf.
                let n = unsafe { libc::read(inotify, buf.as_mut_ptr().cast(), len) };
                if n > 0 {
                    got = true;
                    continue;
                }
                let e = io::Error::last_os_error();
                if n < 0 && e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if n < 0 && e.kind() != io::ErrorKind::WouldBlock {
                    return;
                }
                break;
            }
            // Full means a message is already waiting: one is enough.
            if got && matches!(tx.try_send(()), Err(TrySendError::Disconnected(()))) {
                return;
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::io;
    use std::path::PathBuf;

    use crossbeam_channel::Sender;

    pub struct Watch;

    impl Watch {
        pub fn start(_wal: PathBuf, _tx: Sender<()>) -> io::Result<Watch> {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "watching for commits needs inotify (Linux)",
            ))
        }

        pub fn arm(&self) -> io::Result<()> {
            Ok(())
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::time::Duration;

    fn open(path: &Path) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(path).expect("opening a scratch database");
        c.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE IF NOT EXISTS t (x);")
            .expect("setting up a scratch database");
        c
    }

    #[test]
    fn an_armed_watch_fires_for_a_commit_of_another_connection_and_can_be_armed_again() {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let db = dir.path().join("q.db");
        let ours = open(&db);
        let theirs = open(&db);
        let watch = CommitWatch::start(&db).expect("inotify is available here");
        let deadline = Duration::from_secs(20);

        watch.arm().expect("arming");
        let before: i64 = ours
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .expect("data_version");
        theirs
            .execute("INSERT INTO t VALUES (1)", [])
            .expect("a commit");
        watch
            .events()
            .recv_timeout(deadline)
            .expect("the commit fired the watch");
        let after: i64 = ours
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .expect("data_version");
        assert_ne!(before, after);

        // One-shot: it fired and is gone. Armed again, the next commit
        // fires it again.
        while watch.events().try_recv().is_ok() {}
        watch.arm().expect("arming again");
        theirs
            .execute("INSERT INTO t VALUES (2)", [])
            .expect("a commit");
        watch
            .events()
            .recv_timeout(deadline)
            .expect("the re-armed watch fired");
        drop(watch); // Stops and joins its thread; a hang here fails the run.
    }

    #[test]
    fn a_database_that_does_not_exist_is_an_error_not_a_watch() {
        let dir = tempfile::tempdir().expect("a scratch directory");
        assert!(CommitWatch::start(&dir.path().join("nope.db")).is_err());
    }
}
