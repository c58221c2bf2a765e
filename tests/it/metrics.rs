//! The metrics endpoints without Prometheus: what a worker serves, a busy
//! metrics port refused before any work starts, and what the metrics show
//! of how an idle worker learns of new items.

use crate::util::{http_get as get, supervisor_addr, wait_until, Sandbox, DEADLINE};

/// The value of the sample `series` (name and labels, exactly as
/// exposed) in a text exposition.
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn a_worker_serves_its_counts_and_health_at_the_address_it_registered() {
    let sb = Sandbox::new();
    sb.add("lines", "a\nb\nc\n", &[]);
    let worker = sb
        .lw(["worker", "-c", "2", "--follow", "--", "true"])
        .spawn();
    wait_until("all three items are done", DEADLINE, || {
        sb.count("done") == 3
    });
    let addr: String = sb
        .conn()
        .query_row("SELECT metrics_addr FROM workers", [], |r| r.get(0))
        .expect("the worker registered its metrics address");
    assert!(
        addr.starts_with("127.0.0.1:"),
        "loopback by default: {addr}"
    );

    let (status, body) = get(&addr, "/metrics");
    assert_eq!(status, 200);
    let done = "litework_items_finished_total{outcome=\"done\"}";
    assert_eq!(sample(&body, done), Some(3.0), "{body}");
    assert_eq!(sample(&body, "litework_items_claimed_total"), Some(3.0));
    assert_eq!(sample(&body, "litework_items_in_flight"), Some(0.0));
    assert_eq!(get(&addr, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(get(&addr, "/nope").0, 404);

    worker.signal(libc::SIGTERM);
    worker.wait(0);
}

#[test]
fn a_busy_metrics_port_is_refused_before_any_claim() {
    let sb = Sandbox::new();
    sb.add("lines", "a\n", &[]);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a port");
    let addr = taken.local_addr().expect("its address").to_string();
    let out = sb
        .lw(["worker", "--metrics-addr", &addr, "--", "true"])
        .run_expect(2);
    out.assert_stderr_has(&format!("metrics address {addr}"));
    let item = sb.only_item();
    assert_eq!((item.status.as_str(), item.attempts), ("pending", 0));

    let run = sb
        .lw(["run", "--metrics-addr", &addr, "--", "true"])
        .run_expect(2);
    run.assert_stderr_has(&format!("metrics address {addr}"));
    assert_eq!(sb.only_item().attempts, 0);
}

#[test]
fn supervisor_discovery_lists_its_live_workers() {
    let sb = Sandbox::new();
    sb.add("lines", "a\n", &[]);
    let run = sb
        .lw([
            "run",
            "-w",
            "2",
            "--follow",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(["--progress", "none", "--", "true"])
        .spawn();
    let supervisor = supervisor_addr(&run);
    let mut groups = serde_json::Value::Null;
    wait_until("/sd lists two workers", DEADLINE, || {
        let (_, body) = get(&supervisor, "/sd");
        groups = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
        groups.as_array().is_some_and(|g| g.len() == 2)
    });
    let registered: Vec<(String, String)> = {
        let conn = sb.conn();
        let mut stmt = conn
            .prepare("SELECT id, metrics_addr FROM workers WHERE status = 'running' ORDER BY id")
            .unwrap();
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        rows.collect::<rusqlite::Result<_>>().unwrap()
    };
    let listed: Vec<(String, String)> = groups
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| {
            let id = g["labels"]["litework_worker"].as_str().unwrap_or_default();
            let target = g["targets"][0].as_str().unwrap_or_default();
            (id.to_string(), target.to_string())
        })
        .collect();
    assert_eq!(listed, registered);
    for (_, target) in &listed {
        assert_eq!(get(target, "/healthz").0, 200, "{target}");
    }
    run.signal(libc::SIGTERM);
    run.wait(0);
}

/// Where the one running worker serves its metrics, once it registered.
fn worker_metrics_addr(sb: &Sandbox) -> String {
    let mut addr = String::new();
    wait_until("the worker registers", DEADLINE, || {
        addr = sb
            .conn()
            .query_row(
                "SELECT metrics_addr FROM workers WHERE status = 'running'",
                [],
                |r| r.get(0),
            )
            .unwrap_or_default();
        !addr.is_empty()
    });
    addr
}

/// Adds one item at a time, each once the one before is done, until the
/// worker serving `addr` counts two wake-ups by the commit watch that led
/// it to a new commit; returns how many items that took.
fn add_until_woken_twice(sb: &Sandbox, addr: &str) -> i64 {
    let wakeups = "litework_commit_wakeups_total";
    let mut added = 0;
    // An item may land before the worker is idle and be found by its
    // claim; only items added while it waits wake it. Two wake-ups show
    // that it armed the watch again after the first.
    wait_until("commits wake the idle worker twice", DEADLINE, || {
        added += 1;
        sb.add("lines", format!("item-{added}\n"), &[]);
        wait_until("the item is done", DEADLINE, || sb.count("done") == added);
        sample(&get(addr, "/metrics").1, wakeups).unwrap_or(0.0) >= 2.0
    });
    added
}

#[test]
fn an_idle_worker_is_woken_by_another_process_committing() {
    let sb = Sandbox::new();
    sb.lw(["init"]).run_expect(0);
    // Polls so rare they cannot be what finds the items.
    let worker = sb
        .lw(["worker", "--follow", "--idle-poll", "1h", "--lease", "1h"])
        .args(["--sweep-interval", "1h", "--", "true"])
        .spawn();
    let addr = worker_metrics_addr(&sb);
    let added = add_until_woken_twice(&sb, &addr);
    assert_eq!(sb.count("done"), added);
    worker.signal(libc::SIGTERM);
    worker.wait(0);
}

#[test]
fn workers_started_with_poll_only_find_items_by_polling_alone() {
    let sb = Sandbox::new();
    sb.lw(["init"]).run_expect(0);
    // Through the supervisor, which passes the flag on.
    let run = sb
        .lw(["run", "-w", "1", "--follow", "--poll-only"])
        .args(["--progress", "none", "--", "true"])
        .spawn();
    let addr = worker_metrics_addr(&sb);
    for n in 1..=3 {
        sb.add("lines", format!("item-{n}\n"), &[]);
        wait_until("the item is done", DEADLINE, || sb.count("done") == n);
    }
    let body = get(&addr, "/metrics").1;
    assert_eq!(
        sample(&body, "litework_commit_wakeups_total"),
        Some(0.0),
        "{body}"
    );
    run.signal(libc::SIGTERM);
    run.wait(0);
}

/// A client that sends scrape after scrape on one connection and never
/// reads the answers blocks only itself: another client is answered, and
/// the worker still exits when told to. (The answers were written on the
/// one thread that also took new requests, so it hung for good, and so
/// did the process waiting for that thread at exit.)
#[test]
fn a_client_that_never_reads_blocks_neither_other_scrapes_nor_the_exit() {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let sb = Sandbox::new();
    sb.add("lines", "a\n", &[]);
    let worker = sb.lw(["worker", "--follow", "--", "true"]).spawn();
    wait_until("the item is done", DEADLINE, || sb.count("done") == 1);
    let addr = worker_metrics_addr(&sb);
    let one = get(&addr, "/metrics").1.len();

    // Far more answer bytes than the socket buffers of both ends hold, so
    // that the writer of these answers must block.
    let scrapes = (64 << 20) / one.max(1) + 1;
    let mut stuck = std::net::TcpStream::connect(&addr).expect("connecting");
    let requests = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").repeat(scrapes);
    let fd = stuck.as_raw_fd();
    std::thread::spawn(move || {
        // Never joined: it may block on a full buffer until the worker exits.
        let _ = stuck.write_all(requests.as_bytes());
        std::thread::park();
        drop(stuck);
    });
    wait_until("answers pile up unread", DEADLINE, || {
        let mut unread: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int; the stream is open (parked above).
        unsafe { libc::ioctl(fd, libc::FIONREAD, &mut unread) };
        unread as usize > one
    });

    let (status, body) = get(&addr, "/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("litework_items_claimed_total"), "{body}");
    worker.signal(libc::SIGTERM);
    worker.wait(0);
}
