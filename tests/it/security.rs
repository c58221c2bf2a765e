//! What keeps a queue and its machine safe: private database files and
//! resource limits on item commands.

use std::os::unix::fs::PermissionsExt;

use crate::util::{wait_until, Sandbox, DEADLINE};

fn mode(path: &std::path::Path) -> u32 {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    meta.permissions().mode() & 0o777
}

#[test]
fn database_wal_and_shm_are_readable_by_their_owner_only() {
    let sb = Sandbox::new();
    sb.add("lines", "a\n", &[]);
    // The -wal and -shm files exist while a connection is open.
    let worker = sb.lw(["worker", "--follow", "--", "true"]).spawn();
    wait_until("the item is done", DEADLINE, || sb.count("done") == 1);
    for suffix in ["", "-wal", "-shm"] {
        let mut name = sb.db().as_os_str().to_owned();
        name.push(suffix);
        let path = std::path::PathBuf::from(name);
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
    worker.signal(libc::SIGTERM);
    worker.wait(0);

    // `init` makes the file private too, whatever the umask.
    let other = sb.path("other.db");
    sb.bare().arg("--db").arg(&other).arg("init").run();
    assert_eq!(mode(&other), 0o600);
}

#[test]
fn an_item_writing_past_its_file_size_limit_fails_and_others_do_not() {
    let sb = Sandbox::new();
    sb.add("lines", "100\n100000\n", &["--max-attempts", "1"]);
    let script = r#"head -c "$1" /dev/zero > "$DIR/out-$LITEWORK_ITEM_ID""#;
    sb.lw(["worker", "--limit-file-size", "10K"])
        .args(["--shell", "--", script])
        .run_expect(1);
    let items = sb.items();
    assert_eq!(items[0].status, "done", "{:?}", items[0]);
    assert_eq!(items[1].status, "failed", "{:?}", items[1]);
    let error = items[1].last_error.as_deref().unwrap_or_default();
    // `head` is stopped by SIGXFSZ (25); the shell reports that as
    // status 153 with the signal's description on standard error.
    assert!(
        error.contains("File size limit exceeded") || error.contains("signal 25"),
        "{error}"
    );
    let written = std::fs::metadata(sb.path("out-2"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(written <= 10 * 1024, "wrote {written} bytes past the limit");
}

#[test]
fn an_item_spinning_past_its_cpu_limit_is_stopped() {
    let sb = Sandbox::new();
    sb.add("lines", "spin\n", &["--max-attempts", "1"]);
    sb.lw(["worker", "--limit-cpu", "1"])
        .args(["--shell", "--", "while :; do :; done"])
        .run_expect(1);
    let item = sb.only_item();
    assert_eq!(item.status, "failed");
    let error = item.last_error.unwrap_or_default();
    // SIGXCPU (24) at the soft limit, SIGKILL (9) at the hard one.
    assert!(
        error.contains("signal 24") || error.contains("signal 9"),
        "{error}"
    );
}
