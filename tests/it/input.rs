//! `litework add`: dedupe by key, and input that is refused whole.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::util::{wait_until, Sandbox, DEADLINE};

#[test]
fn adding_the_same_file_again_with_keys_from_payloads_adds_nothing() {
    let sb = Sandbox::new();
    let file = sb.write("urls.txt", "a\nb\nc\nb\n");
    let first = sb.lw(["add", "--key-from-payload"]).arg(&file).run();
    first.assert_stderr_has("added 3 items (1 already present)");
    let before = sb.items();

    let again = sb.lw(["add", "--key-from-payload"]).arg(&file).run();
    again.assert_stderr_has("added 0 items (4 already present)");
    assert_eq!(sb.items(), before);
}

#[test]
fn json_lines_keys_dedupe_and_keep_the_first_payload() {
    let sb = Sandbox::new();
    let first = r#"{"payload":"first one","key":"k1"}
{"payload":"first two","key":"k2"}
{"payload":"unkeyed"}
"#;
    sb.add("jsonl", first, &[])
        .assert_stderr_has("added 3 items (0 already present)");
    let second = r#"{"payload":"second one","key":"k1"}
{"payload":"three","key":"k3"}
{"payload":"unkeyed"}
"#;
    sb.add("jsonl", second, &[])
        .assert_stderr_has("added 2 items (1 already present)");

    let items: Vec<_> = sb
        .items()
        .into_iter()
        .map(|i| (i.key, String::from_utf8(i.payload).unwrap()))
        .collect();
    let k = |s: &str| Some(s.as_bytes().to_vec());
    assert_eq!(
        items,
        [
            (k("k1"), "first one".to_string()),
            (k("k2"), "first two".to_string()),
            (None, "unkeyed".to_string()),
            (k("k3"), "three".to_string()),
            (None, "unkeyed".to_string()),
        ]
    );
}

/// Keys made from payloads must differ whenever the payloads differ: a
/// text payload that happens to read like the key of some raw bytes is
/// another item, not a duplicate.
#[test]
fn distinct_payloads_never_share_a_dedupe_key() {
    let sb = Sandbox::new();
    sb.add("nul", &b"\xff"[..], &["--key-from-payload"]);
    let out = sb.add("lines", "base64:/w==\n", &["--key-from-payload"]);
    out.assert_stderr_has("added 1 item (0 already present)");
    let items: Vec<(Vec<u8>, Option<Vec<u8>>)> =
        sb.items().into_iter().map(|i| (i.payload, i.key)).collect();
    let both = |b: &[u8]| (b.to_vec(), Some(b.to_vec()));
    assert_eq!(items, [both(b"\xff"), both(b"base64:/w==")]);
    let kinds: Vec<String> = {
        let conn = sb.conn();
        let mut stmt = conn
            .prepare("SELECT typeof(key) FROM items ORDER BY id")
            .unwrap();
        let rows = stmt.query_map([], |r| r.get(0)).unwrap();
        rows.collect::<rusqlite::Result<_>>().unwrap()
    };
    assert_eq!(kinds, ["blob", "text"]);
}

#[test]
fn malformed_json_line_adds_nothing_and_is_named() {
    let sb = Sandbox::new();
    sb.add("lines", "existing-1\nexisting-2\n", &[]);
    let before = sb.items();
    let file = sb.write(
        "batch.jsonl",
        r#"{"payload":"one"}
{"payload":"two"}
{"payload":"three"}
{"payload":"four"
{"payload":"five"}
"#,
    );
    let out = sb.lw(["add", "--format", "jsonl"]).arg(&file).run_expect(2);
    out.assert_stderr_has("batch.jsonl: line 4: invalid JSON");
    assert_eq!(sb.items(), before);
    let pending: i64 = sb
        .conn()
        .query_row("SELECT n FROM counts WHERE status = 'pending'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(pending, 2, "the maintained count is unchanged too");
}

/// A delay past what a duration holds was a panic: exit 101 naming no
/// line, and the staging file of a new database left behind.
#[test]
fn an_overlong_delay_is_refused_by_line_and_leaves_no_file() {
    let sb = Sandbox::new();
    let file = sb.write(
        "batch.jsonl",
        "{\"payload\":\"one\"}\n{\"payload\":\"two\",\"delay\":1e20}\n",
    );
    let out = sb.lw(["add", "--format", "jsonl"]).arg(&file).run_expect(2);
    out.assert_stderr_has("batch.jsonl: line 2: \"delay\" must be seconds");
    assert!(!sb.db().exists());
    assert_eq!(sb.files_starting_with("queue.db"), Vec::<String>::new());
}

#[test]
fn invalid_utf8_in_lines_adds_nothing_and_is_named() {
    let sb = Sandbox::new();
    sb.add("lines", "existing\n", &[]);
    let before = sb.items();
    let file = sb.write("names.txt", b"ok\nfine\n\xff\xfe\nlater\n");
    let out = sb.lw(["add"]).arg(&file).run_expect(2);
    out.assert_stderr_has("line 3: not valid UTF-8");
    out.assert_stderr_has("--format nul");
    assert_eq!(sb.items(), before);
}

#[test]
fn empty_input_is_refused_and_creates_no_database() {
    let sb = Sandbox::new();
    for input in ["", "\n\n\r\n"] {
        let out = sb.lw(["add"]).stdin(input).run_expect(2);
        out.assert_stderr_has("no items");
        assert!(!sb.db().exists(), "nothing to add, so no database");
    }

    sb.add("lines", "existing\n", &[]);
    let before = sb.items();
    let empty = sb.write("empty.txt", "");
    sb.lw(["add"])
        .arg(&empty)
        .run_expect(2)
        .assert_stderr_has("no items");
    assert_eq!(sb.items(), before);
}

#[test]
fn missing_input_file_is_an_input_error() {
    let sb = Sandbox::new();
    let out = sb.lw(["add", "no-such-file.txt"]).run_expect(2);
    out.assert_stderr_has("no-such-file.txt");
    assert!(!sb.db().exists());
}

/// Exit status 2 promises that nothing was changed; a batch refused at its
/// fourth line must not leave a new, empty database behind.
#[test]
fn malformed_input_creates_no_database() {
    let sb = Sandbox::new();
    let input = "{\"payload\":\"one\"}\n{\"payload\":\"two\"}\n{\"payload\":\"three\"}\n{\n";
    let out = sb
        .lw(["add", "--format", "jsonl"])
        .stdin(input)
        .run_expect(2);
    out.assert_stderr_has("line 4");
    assert!(
        !sb.db().exists(),
        "{}",
        out.report("a refused add created the database file")
    );
}

/// `--priority` is for records that do not set one; a record that says 0
/// means 0.
#[test]
fn explicit_zero_priority_in_json_lines_is_kept() {
    let sb = Sandbox::new();
    let jsonl = r#"{"payload":"urgent"}
{"payload":"ordinary","priority":0}
"#;
    sb.add("jsonl", jsonl, &["--priority", "5"]);
    let priorities: Vec<(String, i64)> = {
        let conn = sb.conn();
        let mut stmt = conn
            .prepare("SELECT CAST(payload AS TEXT), priority FROM items ORDER BY id")
            .unwrap();
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        rows.collect::<rusqlite::Result<_>>().unwrap()
    };
    assert_eq!(
        priorities,
        [("urgent".to_string(), 5), ("ordinary".to_string(), 0)]
    );
}

/// Whether process `pid` has `path` open.
fn has_open(pid: i32, path: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .any(|target| target == path)
}

/// Whether process `pid` has a thread whose name starts with `prefix`.
fn has_thread(pid: i32, prefix: &str) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .any(|name| name.starts_with(prefix))
}

/// Whether the main thread of `pid` is blocked in read(2).
fn blocked_in_read(pid: i32) -> bool {
    let syscall = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
    syscall.split(' ').next() == Some(&libc::SYS_read.to_string())
}

/// A named pipe in the sandbox: an input that arrives as slowly as the
/// test writes it.
fn fifo(sb: &Sandbox, name: &str) -> std::path::PathBuf {
    let fifo = sb.path(name);
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: mkfifo(3) with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    fifo
}

/// The write end of `fifo`, once a reader opened it. Opening it without
/// blocking fails until the reader is there, so a reader that never opens
/// its input cannot hang the test.
fn feed(fifo: &Path) -> std::fs::File {
    let mut feed = None;
    wait_until("the reader opened its input", DEADLINE, || {
        feed = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo)
            .ok();
        feed.is_some()
    });
    feed.unwrap()
}

/// `add` to a queue that exists reads its whole input before it takes the
/// write lock, so a producer that stops half-way does not keep the other
/// writers (workers' heartbeats, records and claims) out until their
/// leases expire.
#[test]
fn a_slow_producer_does_not_keep_other_writers_out() {
    let sb = Sandbox::new();
    sb.add("lines", "existing\n", &[]);
    let fifo = fifo(&sb, "slow.txt");
    let slow = sb.lw(["add"]).arg(&fifo).spawn();
    let mut feed = feed(&fifo);
    feed.write_all(b"first\n").unwrap();
    wait_until("the slow add waits for its second line", DEADLINE, || {
        unread(&feed) == 0 && blocked_in_read(slow.pid())
    });
    // Nobody else writes: with the lock free this add needs no wait at
    // all, and if the slow add held the lock it would give up (exit 3).
    sb.lw(["--busy-timeout", "300ms", "add"])
        .stdin("other\n")
        .run()
        .assert_stderr_has("added 1 item");
    feed.write_all(b"second\n").unwrap();
    drop(feed);
    slow.wait(0).assert_stderr_has("added 2 items");
    let payloads: Vec<Vec<u8>> = sb.items().into_iter().map(|i| i.payload).collect();
    let want: [&[u8]; 4] = [b"existing", b"other", b"first", b"second"];
    assert_eq!(payloads, want.map(<[u8]>::to_vec));
}

/// Two adds race for a new file: the one that finds the file made by the
/// other moves its items in, and still counts the duplicates its own
/// input held.
#[test]
fn an_add_that_loses_the_race_for_a_new_file_counts_its_duplicates() {
    let sb = Sandbox::new();
    let fifo = fifo(&sb, "slow.txt");
    let slow = sb.lw(["add", "--key-from-payload"]).arg(&fifo).spawn();
    let mut feed = feed(&fifo);
    feed.write_all(b"a\na\nb\n").unwrap();
    wait_until("the slow add waits for more input", DEADLINE, || {
        unread(&feed) == 0 && blocked_in_read(slow.pid())
    });
    sb.add("lines", "c\n", &[]);
    drop(feed);
    slow.wait(0)
        .assert_stderr_has("added 2 items (1 already present)");
    assert_eq!(sb.items().len(), 3);
}

/// Bytes written to a pipe and not read yet.
fn unread(pipe: &std::fs::File) -> libc::c_int {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD stores one int through the pointer.
    let r = unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(r, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    n
}

/// An add that fails must not remove a database another process uses: a
/// second `add` that opened the queue while the failing one was still
/// reading its input must find its items there afterwards.
#[test]
fn refused_add_leaves_a_database_another_add_is_using() {
    let sb = Sandbox::new();
    let fifo = fifo(&sb, "slow.jsonl");
    let good = sb.write(
        "good.jsonl",
        "{\"payload\":\"kept-1\"}\n{\"payload\":\"kept-2\"}\n",
    );

    let slow = sb.lw(["add", "--format", "jsonl"]).arg(&fifo).spawn();
    let mut feed = feed(&fifo);
    feed.write_all(b"{\"payload\":\"first\"}\n").unwrap();
    // Having taken the first line, the slow add does what it does before
    // reading on (today: creates the database and opens its transaction).
    wait_until("the slow add waits for its second line", DEADLINE, || {
        unread(&feed) == 0 && blocked_in_read(slow.pid())
    });

    let mut other = sb.lw(["add", "--format", "jsonl"]).arg(&good).spawn();
    // Once its connection pool is up, the second add holds the file open
    // whatever the first one does with the name afterwards.
    wait_until(
        "the second add has the queue open or is done",
        DEADLINE,
        || other.exited() || (has_open(other.pid(), sb.db()) && has_thread(other.pid(), "r2d2")),
    );
    feed.write_all(b"{\"payload\":\n").unwrap();
    drop(feed);
    slow.wait(2).assert_stderr_has("line 2");
    let out = other.wait(0);
    out.assert_stderr_has("added 2 items");

    assert!(
        sb.db().exists(),
        "{}",
        out.report("the refused add deleted the database the other add wrote to")
    );
    let payloads: Vec<Vec<u8>> = sb.items().into_iter().map(|i| i.payload).collect();
    assert_eq!(payloads, [b"kept-1".to_vec(), b"kept-2".to_vec()]);
}
