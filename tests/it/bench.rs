//! `litework bench`: the load test runs the real worker processes over a
//! real queue and checks what it measured; these tests hold it to that
//! check, on small batches (speed is not asserted here).

use serde_json::Value;

use crate::util::Sandbox;

fn bench(sb: &Sandbox, args: &[&str]) -> Value {
    let out = sb
        .bare()
        .args(["bench", "--json", "--dir"])
        .arg(sb.path("bench"))
        .args(args)
        .run();
    serde_json::from_str(out.stdout_text().trim()).unwrap_or_else(|e| {
        panic!(
            "bench output is not one JSON object ({e}):\n{}",
            out.report("")
        )
    })
}

fn n(v: &Value, path: &str) -> u64 {
    v.pointer(path)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{path} missing in {v}"))
}

#[test]
fn batched_workers_and_the_plain_pattern_each_do_every_item_exactly_once() {
    let sb = Sandbox::new();
    let r = bench(
        &sb,
        &["--items", "6000", "-w", "4", "-c", "4", "--compare-seed"],
    );
    assert_eq!(r["passed"], true, "{r}");
    for run in ["litework", "seed"] {
        assert_eq!(n(&r, &format!("/{run}/check/done")), 6000, "{run}: {r}");
        assert_eq!(n(&r, &format!("/{run}/check/runs")), 6000, "{run}: {r}");
        assert_eq!(
            n(&r, &format!("/{run}/check/attempts_not_one")),
            0,
            "{run}: {r}"
        );
        assert_eq!(r[run]["check"]["counts_agree"], true, "{run}: {r}");
        // Every worker wrote, so every one held the write lock a while.
        let held = r[run]["lock_held_s"].as_f64().unwrap_or(0.0);
        let busy = r[run]["lock_busy"].as_f64().unwrap_or(0.0);
        assert!(held > 0.0 && busy > 0.0, "{run}: {r}");
    }
    // The batching design claims many items per transaction; the plain
    // pattern one (plus one empty claim per worker at the end).
    assert!(n(&r, "/litework/claims") < 6000 / 4, "{r}");
    assert!(n(&r, "/seed/claims") >= 6000, "{r}");
    assert!(r["raw"]["row_updates_per_s"].as_f64().unwrap_or(0.0) > 0.0);
    // The directory holds the queues for a look afterwards.
    assert!(sb.path("bench/litework.db").exists());
}

#[test]
fn several_runs_are_reported_each_and_summed_up_by_their_median() {
    let sb = Sandbox::new();
    let r = bench(
        &sb,
        &[
            "--items",
            "2000",
            "-w",
            "2",
            "--compare-seed",
            "--runs",
            "3",
        ],
    );
    assert_eq!(r["passed"], true, "{r}");
    let runs = r["runs"].as_array().cloned().unwrap_or_default();
    assert_eq!(runs.len(), 3, "{r}");
    let mut rates = Vec::new();
    for run in &runs {
        assert_eq!(n(run, "/litework/check/done"), 2000, "{r}");
        assert_eq!(n(run, "/seed/check/done"), 2000, "{r}");
        rates.push(run["litework"]["items_per_s"].as_f64().unwrap_or(0.0));
    }
    rates.sort_by(f64::total_cmp);
    let figure = |which: &str, name: &str| r[which][name].as_f64().unwrap_or(f64::NAN);
    assert_eq!(figure("median", "items_per_s"), rates[1], "{r}");
    assert_eq!(figure("min", "items_per_s"), rates[0], "{r}");
    assert_eq!(figure("max", "items_per_s"), rates[2], "{r}");
    let (lo, mid, hi) = (
        figure("min", "speedup_vs_seed"),
        figure("median", "speedup_vs_seed"),
        figure("max", "speedup_vs_seed"),
    );
    assert!(lo <= mid && mid <= hi && lo > 0.0, "{r}");
    // Each run has its own queues.
    for run in 1..=3 {
        assert!(sb.path(&format!("bench/run-{run}/litework.db")).exists());
    }
}

#[test]
fn failures_in_a_batch_are_retried_and_every_attempt_runs_once() {
    let sb = Sandbox::new();
    let r = bench(&sb, &["--items", "3000", "-w", "3", "--work", "fail=0.3"]);
    assert_eq!(r["passed"], true, "{r}");
    let c = &r["litework"]["check"];
    assert_eq!(n(c, "/done") + n(c, "/failed"), 3000, "{r}");
    assert_eq!(n(c, "/runs"), n(c, "/attempts"), "{r}");
    assert!(n(&r, "/litework/retried") > 0, "{r}");
    // With 3 attempts at a 30% failure rate, about 2.7% fail for good.
    assert!(n(c, "/failed") > 0 && n(c, "/failed") < 300, "{r}");
}

#[test]
fn a_command_per_item_and_pickup_latency_are_measured() {
    let sb = Sandbox::new();
    let r = bench(
        &sb,
        &[
            "--items", "200", "-w", "2", "-c", "2", "--pickup", "20", "--", "true",
        ],
    );
    assert_eq!(r["passed"], true, "{r}");
    assert_eq!(n(&r, "/litework/check/done"), 200);
    let p99 = r["pickup"]["p99_ms"].as_f64().unwrap_or(-1.0);
    assert!(p99 > 0.0, "{r}");
    assert_eq!(n(&r, "/pickup/items"), 20);
    // Side by side: the default finds items through the commit watch,
    // `--poll-only` workers by polling alone, and their idle CPU is read.
    assert_eq!(r["pickup"]["finds_items_by"], "watch", "{r}");
    assert!(n(&r, "/pickup/commit_wakeups") > 0, "{r}");
    assert_eq!(r["pickup_polling"]["finds_items_by"], "poll", "{r}");
    assert_eq!(n(&r, "/pickup_polling/commit_wakeups"), 0, "{r}");
    assert_eq!(n(&r, "/pickup_polling/items"), 20);
    let idle = r["pickup_polling"]["idle_cores_per_worker"].as_f64();
    assert!(idle.is_some_and(|c| c > 0.0), "{r}");
}

#[test]
fn status_and_scrape_are_timed_on_a_large_queue() {
    let sb = Sandbox::new();
    let r = bench(&sb, &["--items", "100", "--status-at", "50000"]);
    assert_eq!(r["passed"], true, "{r}");
    assert_eq!(n(&r, "/status_at/items"), 50000);
    assert!(
        r["status_at"]["status_ms"].as_f64().unwrap_or(0.0) > 0.0,
        "{r}"
    );
    assert!(
        r["status_at"]["scrape_ms"].as_f64().unwrap_or(0.0) > 0.0,
        "{r}"
    );
}

#[test]
fn bad_bench_options_are_refused_before_anything_runs() {
    let sb = Sandbox::new();
    let out = sb.bare().args(["bench", "--work", "fail=2"]).run_expect(2);
    out.assert_stderr_has("fail=2");
    out.assert_stderr_has("between 0 and 1");
    let out = sb.bare().args(["bench", "--runs", "0"]).run_expect(2);
    out.assert_stderr_has("--runs");
    std::fs::create_dir(sb.path("full")).unwrap();
    sb.write("full/something", "x");
    let out = sb
        .bare()
        .args(["bench", "--dir"])
        .arg(sb.path("full"))
        .run_expect(2);
    out.assert_stderr_has("not empty");
    let left = std::fs::read_dir(sb.path("full")).unwrap().count();
    assert_eq!(left, 1, "bench changed a directory it refused");
}
