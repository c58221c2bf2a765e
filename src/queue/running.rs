//! Which items a worker's executors are running right now, in a small file
//! beside the database that outlives the worker.
//!
//! A worker claims items ahead of its executors. When it dies, the
//! database alone cannot tell the items that were running (one of them
//! may have killed it, and must be charged an attempt) from the ones still
//! waiting for an executor (which never ran, and get their attempt back).
//! So each executor writes the `(id, lease token)` it is running into its
//! own 16-byte slot of a shared memory map of `<db>-running-<worker id>`:
//! two stores, no system call. The page cache keeps what was written
//! after the process is gone; whoever requeues the dead worker's items
//! reads the file, then removes it. A worker that stops with every lease
//! recorded or released removes it too; one whose last writes the
//! database refused leaves it for whoever requeues those leases.
//!
//! Without the file (it could not be made, or the worker runs on another
//! machine) every held item is charged, as if it had been running.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// A file of `i64` cells mapped into memory, shared with whoever reads the
/// file later: stores are visible to a reader of the file at once, even
/// after this process is gone. Used for the running slots below and for
/// the item process groups a [`crate::exec::Keeper`] must kill.
pub struct Cells {
    path: PathBuf,
    map: *mut AtomicI64,
    len: usize,
    remove_on_drop: std::sync::atomic::AtomicBool,
}

// SAFETY: the map is only accessed through atomics, and stays mapped until
// drop.
unsafe impl Send for Cells {}
unsafe impl Sync for Cells {}

impl std::fmt::Debug for Cells {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cells")
            .field("path", &self.path)
            .field("len", &self.len)
            .finish()
    }
}

impl Cells {
    /// Makes the file (mode 0600) with `len` zero cells and
    /// maps it. With `remove_on_drop`, dropping removes the file.
    /// The file must not exist yet: one that does belongs to someone else
    /// (a worker id used twice), whose record must not be wiped.
    pub fn create(path: PathBuf, len: usize, remove_on_drop: bool) -> std::io::Result<Cells> {
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::AsRawFd;
        let len = len.max(1);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&path)?;
        file.set_len((len * 8) as u64)?;
        // SAFETY: a fresh shared mapping of a file we own, of its length.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len * 8,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(Cells {
            path,
            map: map.cast(),
            len,
            remove_on_drop: remove_on_drop.into(),
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Cell `i` (`i < len`).
    pub fn cell(&self, i: usize) -> &AtomicI64 {
        assert!(i < self.len, "cell {i} of {}", self.len);
        // SAFETY: i < len, inside the mapping, which is page-aligned and
        // so 8-byte aligned; AtomicI64 has i64's layout.
        unsafe { &*self.map.add(i) }
    }
}

impl Drop for Cells {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `create`, unmapped once; `&self`
        // borrows of cells cannot outlive `self`.
        unsafe {
            libc::munmap(self.map.cast(), self.len * 8);
        }
        if self.remove_on_drop.load(Ordering::Acquire) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The cells of the file at `path`, if it can be read.
pub fn read_cells(path: &Path) -> Option<Vec<i64>> {
    let bytes = std::fs::read(path).ok()?;
    Some(
        bytes
            .chunks_exact(8)
            .map(|c| i64::from_ne_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
    )
}

/// The slots of one worker: two cells, `(id, token)`, per executor.
#[derive(Debug)]
pub struct RunningSlots {
    cells: Cells,
    /// Executor slots; the write marks follow them.
    slots: usize,
}

/// The file of worker `worker` of the queue at `db`: the id in hex, so
/// that two ids never share a file.
pub fn slots_path(db: &Path, worker: &str) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-running-");
    let hex: String = worker.bytes().map(|b| format!("{b:02x}")).collect();
    name.push(hex);
    PathBuf::from(name)
}

/// Whether the file at `path` was made (or last had its size set) since
/// this machine booted.
pub fn made_since_boot(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<i64>().ok())
    });
    boot.is_some_and(|b| meta.ctime() >= b)
}

/// Ids of the two pairs after the executors' slots: `(WRITING, since)`
/// and `(WRITE_LIMIT, busy limit)`, both in ms. No item has a negative
/// id, so a reader of the older layout takes them for slots of items that
/// do not exist, and changes nothing with them.
const WRITING: i64 = -1;
const WRITE_LIMIT: i64 = -2;

impl RunningSlots {
    /// Makes the file with `slots` empty slots, for a worker that waits
    /// at most `write_limit` for the write lock; dropping removes it.
    pub fn create(
        db: &Path,
        worker: &str,
        slots: usize,
        write_limit: Duration,
    ) -> std::io::Result<RunningSlots> {
        let slots = slots.max(1);
        let cells = Cells::create(slots_path(db, worker), 2 * slots + 4, true)?;
        let marks = RunningSlots { cells, slots };
        let at = 2 * slots;
        let limit = i64::try_from(write_limit.as_millis()).unwrap_or(i64::MAX);
        marks.cells.cell(at).store(WRITING, Ordering::Release);
        marks
            .cells
            .cell(at + 2)
            .store(WRITE_LIMIT, Ordering::Release);
        marks.cells.cell(at + 3).store(limit, Ordering::Release);
        Ok(marks)
    }

    /// The worker is in a write (waiting for the lock, or holding it)
    /// since `since` ms; `None`: not writing. A sweeper on this machine
    /// leaves the leases that expired during such a wait alone for as long
    /// as it may last: the worker could not extend them.
    pub fn writing(&self, since: Option<i64>) {
        let at = 2 * self.slots;
        self.cells
            .cell(at + 1)
            .store(since.unwrap_or(0), Ordering::Release);
    }

    /// Executor `slot` now runs the item `(id, token)`.
    pub fn set(&self, slot: usize, id: i64, token: i64) {
        if slot < self.slots {
            self.cells
                .cell(2 * slot + 1)
                .store(token, Ordering::Release);
            self.cells.cell(2 * slot).store(id, Ordering::Release);
        }
    }

    /// Leaves the file in place when dropped: the worker stops with leases
    /// it could not record or release, and whoever requeues them later
    /// needs the file to tell the running items from those claimed ahead.
    pub fn keep(&self) {
        self.cells.remove_on_drop.store(false, Ordering::Release);
    }

    /// Executor `slot` runs nothing.
    pub fn clear(&self, slot: usize) {
        if slot < self.slots {
            self.cells.cell(2 * slot).store(0, Ordering::Release);
        }
    }
}

/// The `(id, lease token)` pairs the worker's executors were running, if
/// its file exists; `None` means "unknown".
pub fn read_slots(db: &Path, worker: &str) -> Option<Vec<(i64, i64)>> {
    let cells = read_cells(&slots_path(db, worker))?;
    Some(
        cells
            .chunks_exact(2)
            .map(|c| (c[0], c[1]))
            .filter(|&(id, _)| id > 0)
            .collect(),
    )
}

/// Since when (ms) the worker has been in a write, and the longest it
/// waits for the lock, if its file says it is in one.
pub fn read_writing(db: &Path, worker: &str) -> Option<(i64, Duration)> {
    let cells = read_cells(&slots_path(db, worker))?;
    let mark = |id: i64| cells.chunks_exact(2).find(|c| c[0] == id).map(|c| c[1]);
    let since = mark(WRITING).filter(|&ms| ms > 0)?;
    let limit = mark(WRITE_LIMIT)?;
    Some((
        since,
        Duration::from_millis(u64::try_from(limit).unwrap_or(0)),
    ))
}

/// Removes the file of a worker whose items were requeued.
pub fn remove_slots(db: &Path, worker: &str) {
    let _ = std::fs::remove_file(slots_path(db, worker));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_executors_run_is_readable_after_the_map_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("q.db");
        let slots = RunningSlots::create(&db, "host-1-abc", 3, Duration::from_secs(60)).unwrap();
        slots.set(0, 7, 2);
        slots.set(2, 9, 1);
        slots.set(1, 8, 5);
        slots.clear(1);
        assert_eq!(read_slots(&db, "host-1-abc"), Some(vec![(7, 2), (9, 1)]));
        // The write mark is not a slot, and says nothing until set.
        assert_eq!(read_writing(&db, "host-1-abc"), None);
        slots.writing(Some(1234));
        let mark = Some((1234, Duration::from_secs(60)));
        assert_eq!(read_writing(&db, "host-1-abc"), mark);
        assert_eq!(read_slots(&db, "host-1-abc"), Some(vec![(7, 2), (9, 1)]));
        slots.writing(None);
        assert_eq!(read_writing(&db, "host-1-abc"), None);
        // A dead worker leaves the file; a clean drop removes it.
        std::mem::forget(slots);
        assert_eq!(read_slots(&db, "host-1-abc"), Some(vec![(7, 2), (9, 1)]));
        remove_slots(&db, "host-1-abc");
        assert_eq!(read_slots(&db, "host-1-abc"), None);
        let slots = RunningSlots::create(&db, "w/2", 1, Duration::from_secs(60)).unwrap();
        assert!(slots_path(&db, "w/2").ends_with("q.db-running-772f32"));
        assert_ne!(slots_path(&db, "w/2"), slots_path(&db, "w_2"));
        assert!(made_since_boot(&slots_path(&db, "w/2")));
        // An id in use keeps its file: a second one is refused.
        assert!(RunningSlots::create(&db, "w/2", 1, Duration::from_secs(60)).is_err());
        drop(slots);
        assert_eq!(read_slots(&db, "w/2"), None);
    }
}
