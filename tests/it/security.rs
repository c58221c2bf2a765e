//! What keeps a queue and its machine safe: private database files and
//! resource limits on item commands.

use std::os::unix::fs::PermissionsExt;

use crate::util::{http_get, http_get_with, wait_until, Sandbox, DEADLINE};

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

/// Starts a worker serving metrics with `web.yml` from the sandbox and
/// returns it with its registered metrics address.
fn worker_with_web_config(sb: &Sandbox) -> (crate::util::Running, String) {
    sb.add("lines", "a\n", &[]);
    let worker = sb
        .lw([
            "worker",
            "--follow",
            "--web-config",
            "web.yml",
            "--",
            "true",
        ])
        .spawn();
    let mut addr = String::new();
    wait_until("the worker registers its metrics address", DEADLINE, || {
        addr = sb
            .conn()
            .query_row("SELECT metrics_addr FROM workers", [], |r| r.get(0))
            .unwrap_or_default();
        !addr.is_empty()
    });
    (worker, addr)
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Authorization: Basic {token}\r\n")
}

#[test]
fn metrics_need_the_right_basic_auth_password_and_health_does_not() {
    let sb = Sandbox::new();
    let hash = bcrypt::hash("s3cret", 4).expect("hashing a password");
    sb.write("web.yml", format!("basic_auth_users:\n  prom: '{hash}'\n"));
    let (worker, addr) = worker_with_web_config(&sb);

    let (status, body) = http_get(&addr, "/metrics");
    assert_eq!((status, body.as_str()), (401, "unauthorized\n"));
    assert_eq!(
        http_get_with(&addr, "/metrics", &basic("prom", "wrong")).0,
        401
    );
    assert_eq!(
        http_get_with(&addr, "/metrics", &basic("nobody", "s3cret")).0,
        401
    );
    let (status, body) = http_get_with(&addr, "/metrics", &basic("prom", "s3cret"));
    assert_eq!(status, 200);
    assert!(body.contains("litework_items_claimed_total"), "{body}");
    assert_eq!(http_get(&addr, "/healthz"), (200, "ok\n".to_string()));

    worker.signal(libc::SIGTERM);
    worker.wait(0);
}

#[test]
fn a_web_config_with_a_bad_hash_is_refused_at_start() {
    let sb = Sandbox::new();
    sb.add("lines", "a\n", &[]);
    sb.write("web.yml", "basic_auth_users:\n  prom: plaintext\n");
    let out = sb
        .lw(["worker", "--web-config", "web.yml", "--", "true"])
        .run_expect(2);
    out.assert_stderr_has("web.yml: basic_auth_users.prom: not a bcrypt hash");
    assert_eq!(sb.only_item().attempts, 0);
}

/// A real TLS client (curl) that trusts only a certificate made for the
/// test reads the metrics over HTTPS, and is refused without credentials.
#[test]
fn metrics_are_served_over_tls_to_a_client_that_trusts_the_certificate() {
    let sb = Sandbox::new();
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .current_dir(sb.dir())
        .output()
        .expect("running openssl (Debian's openssl package)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let hash = bcrypt::hash("s3cret", 4).expect("hashing a password");
    sb.write(
        "web.yml",
        format!(
            "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n\
             basic_auth_users:\n  prom: '{hash}'\n"
        ),
    );
    let (worker, addr) = worker_with_web_config(&sb);
    let curl = |auth: &[&str]| {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
                "cert.pem",
            ])
            .args(auth)
            .arg(format!("https://{addr}/metrics"))
            .current_dir(sb.dir())
            .output()
            .expect("running curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(curl(&[]), "401");
    assert_eq!(curl(&["-u", "prom:s3cret"]), "200");
    // Plain HTTP to the TLS port gets no metrics.
    let plain = std::net::TcpStream::connect(&addr).map(|mut s| {
        use std::io::{Read, Write};
        let _ = s.set_read_timeout(Some(DEADLINE));
        let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
        let mut got = String::new();
        let _ = s.read_to_string(&mut got);
        got
    });
    assert!(
        !plain.unwrap_or_default().contains("litework_"),
        "served without TLS"
    );

    worker.signal(libc::SIGTERM);
    worker.wait(0);
}
