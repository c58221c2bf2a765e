//! Against a real Prometheus (Debian's `prometheus` package): the
//! exposition passes `promtool check metrics`, and a Prometheus that
//! discovers a run through the supervisor's /sd endpoint counts every item
//! and has data for every panel of the Grafana dashboard.
//!
//! These tests are ignored by a plain `cargo test`, which must pass on a
//! machine without Prometheus; `.ci/run` installs it and runs them with
//! `--ignored`, where a missing `prometheus` or `promtool` is a failure.

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::util::{http_get as get, supervisor_addr, wait_until, Cmd, Running, Sandbox, DEADLINE};

const ITEMS: usize = 300;

/// Whether a program can be started at all, with a useful failure if not.
fn require(program: &str) {
    let found = Command::new(program).arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "{program} is needed for this test: apt-get install prometheus"
    );
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A port nobody listens on now (the kernel's pick, released at once).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding port 0");
    listener.local_addr().expect("local address").port()
}

/// Starts `litework run --follow` over ITEMS no-op items and returns it
/// with the supervisor's metrics address, once every item is done.
fn finished_run(sb: &Sandbox) -> (Running, String) {
    let items: String = (1..=ITEMS).map(|i| format!("{i}\n")).collect();
    sb.write("items.txt", items);
    let run = sb
        .lw(["run", "-i", "items.txt", "-w", "2", "-c", "2", "--follow"])
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--progress",
            "none",
            "--",
            "true",
        ])
        .spawn();
    let addr = supervisor_addr(&run);
    wait_until("every item is done", DEADLINE, || {
        sb.count("done") == ITEMS as i64
    });
    (run, addr)
}

/// The workers' metrics addresses, from the supervisor's /sd document.
fn discovered(supervisor: &str) -> Vec<String> {
    let (status, body) = get(supervisor, "/sd");
    assert_eq!(status, 200, "/sd: {body}");
    let groups: serde_json::Value = serde_json::from_str(&body).expect("/sd is JSON");
    let groups = groups.as_array().expect("/sd is a list").clone();
    groups
        .iter()
        .flat_map(|g| g["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t.as_str().map(String::from))
        .collect()
}

fn promtool_check(what: &str, exposition: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting promtool");
    child
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(exposition.as_bytes())
        .expect("feeding promtool");
    let out = child.wait_with_output().expect("waiting for promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics on {what}: {said}"
    );
}

#[test]
#[ignore = "needs Prometheus; .ci/run runs it"]
fn every_endpoint_passes_promtool_check_metrics() {
    require("promtool");
    let sb = Sandbox::new();
    let (run, supervisor) = finished_run(&sb);
    let workers = discovered(&supervisor);
    assert_eq!(workers.len(), 2, "two workers listed: {workers:?}");
    for addr in std::iter::once(&supervisor).chain(&workers) {
        let (status, body) = get(addr, "/metrics");
        assert_eq!(status, 200, "{addr}/metrics");
        promtool_check(addr, &body);
        assert_eq!(
            get(addr, "/healthz"),
            (200, "ok\n".to_string()),
            "{addr}/healthz"
        );
    }
    run.signal(libc::SIGTERM);
    run.wait(0);
}

/// Writes a Prometheus config that scrapes the supervisor and discovers
/// its workers, every second.
fn prometheus_config(dir: &Path, supervisor: &str) -> std::path::PathBuf {
    let config = format!(
        "global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: litework-supervisor
    static_configs:
      - targets: ['{supervisor}']
  - job_name: litework-workers
    http_sd_configs:
      - url: http://{supervisor}/sd
        refresh_interval: 1s
"
    );
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, config).expect("writing prometheus.yml");
    path
}

/// The `data.result` of an instant query.
fn query(prometheus: &str, promql: &str) -> Vec<serde_json::Value> {
    let (status, body) = get(
        prometheus,
        &format!("/api/v1/query?query={}", url_encode(promql)),
    );
    assert_eq!(status, 200, "{promql}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("Prometheus answers JSON");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn scalar(result: &[serde_json::Value]) -> Option<f64> {
    result.first()?["value"][1].as_str()?.parse().ok()
}

/// Every panel query of the dashboard, with Grafana's variables replaced.
fn panel_queries() -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana/dashboards/litework.json");
    let text = std::fs::read_to_string(&path).expect("reading the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut out = Vec::new();
    let mut panels = dashboard["panels"].as_array().cloned().unwrap_or_default();
    while let Some(panel) = panels.pop() {
        // Rows may nest panels.
        panels.extend(panel["panels"].as_array().cloned().unwrap_or_default());
        let title = panel["title"].as_str().unwrap_or("?").to_string();
        for target in panel["targets"].as_array().cloned().unwrap_or_default() {
            if let Some(expr) = target["expr"].as_str() {
                let expr = expr
                    .replace("$__rate_interval", "15s")
                    .replace("$__range", "5m");
                out.push((title.clone(), expr));
            }
        }
    }
    assert!(!out.is_empty(), "the dashboard has no queries");
    out
}

/// The `data.result` of a range query from `start` (Unix seconds) to now,
/// one point a second: what a dashboard panel draws over that time.
fn query_range(prometheus: &str, promql: &str, start: f64) -> Vec<serde_json::Value> {
    let end = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is past 1970")
        .as_secs_f64();
    let path = format!(
        "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step=1",
        url_encode(promql)
    );
    let (status, body) = get(prometheus, &path);
    assert_eq!(status, 200, "{promql}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("Prometheus answers JSON");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

#[test]
#[ignore = "needs Prometheus; .ci/run runs it"]
fn prometheus_discovers_a_run_counts_every_item_and_fills_every_panel() {
    require("prometheus");
    let sb = Sandbox::new();
    let long = Duration::from_secs(60);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is past 1970")
        .as_secs_f64();

    // An empty queue first, so that Prometheus watches the whole batch.
    sb.lw(["init"]).run();
    let run = sb
        .lw([
            "run",
            "-w",
            "2",
            "-c",
            "2",
            "--follow",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(["--progress", "none", "--idle-poll", "20ms"])
        .args(["--shell", "--", "sleep 0.02"])
        .spawn();
    let supervisor = supervisor_addr(&run);
    let config = prometheus_config(sb.dir(), &supervisor);
    let web = format!("127.0.0.1:{}", free_port());
    let data = sb.path("tsdb");
    let prometheus = Cmd::new("prometheus", sb.dir())
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", data.display()))
        .arg(format!("--web.listen-address={web}"))
        .spawn();
    wait_until("Prometheus is ready", long, || {
        TcpStream::connect(&web).is_ok() && get(&web, "/-/ready").0 == 200
    });
    wait_until(
        "Prometheus scrapes the supervisor and both workers",
        long,
        || scalar(&query(&web, "count(up == 1)")) == Some(3.0),
    );

    // About two seconds of work at four items at a time, scraped every
    // second.
    let items: String = (1..=ITEMS).map(|i| format!("{i}\n")).collect();
    sb.add("lines", items, &[]);
    wait_until("every item is done", long, || {
        sb.count("done") == ITEMS as i64
    });
    // Workers and supervisor are scraped at their own moments: wait until
    // the last scrape of each has the final state, and every count agrees
    // with the number of items.
    for promql in [
        "sum(litework_items_finished_total{outcome=\"done\"})",
        "sum(litework_items_claimed_total)",
        "litework_queue_items{status=\"done\"}",
    ] {
        wait_until(&format!("Prometheus has {promql} = {ITEMS}"), long, || {
            scalar(&query(&web, promql)) == Some(ITEMS as f64)
        });
    }

    // Every panel draws something over the run. Rates need two scrapes
    // after the first sample, so look again until the deadline and name
    // the panels still empty if it passes.
    let panels = panel_queries();
    let waited = std::time::Instant::now();
    loop {
        let empty: Vec<&(String, String)> = panels
            .iter()
            .filter(|(_, expr)| query_range(&web, expr, started).is_empty())
            .collect();
        if empty.is_empty() {
            break;
        }
        assert!(
            waited.elapsed() < long,
            "panels without data over the run: {empty:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    drop(prometheus);
    run.signal(libc::SIGTERM);
    run.wait(0);
}
