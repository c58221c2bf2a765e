//! The reporting verbs after a run, usage errors, and which database file
//! a command uses.

use std::path::Path;

use crate::util::{open_read_only, Sandbox};

/// Two items that succeed and one that fails for good.
fn run_mixed_batch(sb: &Sandbox) {
    sb.add("lines", "ok-1\nbad\nok-2\n", &["--max-attempts", "1"]);
    let script = r#"case "$1" in
        ok-*) printf 'did %s' "$1" ;;
        *) echo "refusing $1" >&2; exit 5 ;;
    esac"#;
    sb.lw(["worker", "-c", "2", "--", "sh", "-c", script, "sh"])
        .run_expect(1);
}

#[test]
fn status_json_counts_match_the_items() {
    let sb = Sandbox::new();
    run_mixed_batch(&sb);
    let out = sb.lw(["status", "--json"]).run();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for (field, want) in [
        ("pending", 0),
        ("running", 0),
        ("done", 2),
        ("failed", 1),
        ("total", 3),
        ("workers", 0),
    ] {
        assert_eq!(status[field], want, "{field} in {status}");
    }
    for status in ["pending", "running", "done", "failed"] {
        let kept: i64 = sb
            .conn()
            .query_row("SELECT n FROM counts WHERE status = ?1", [status], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(kept, sb.count(status), "maintained count of {status}");
    }
}

#[test]
fn list_of_failed_items_shows_their_errors() {
    let sb = Sandbox::new();
    run_mixed_batch(&sb);
    let out = sb.lw(["list", "--status", "failed"]).run();
    let text = out.stdout_text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "a header and one item:\n{text}");
    assert!(lines[0].contains("LAST ERROR"), "{text}");
    for needle in ["bad", "failed", "1/1", "exit status 5: refusing bad"] {
        assert!(
            lines[1].contains(needle),
            "{needle:?} missing from {:?}",
            lines[1]
        );
    }

    let out = sb.lw(["list", "--status", "failed", "--json"]).run();
    let rows: Vec<serde_json::Value> = out
        .stdout_text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["payload"], "bad");
    assert_eq!(rows[0]["error"], "exit status 5: refusing bad");
}

#[test]
fn export_csv_has_a_header_and_a_row_per_item() {
    let sb = Sandbox::new();
    run_mixed_batch(&sb);
    // One binary payload, to see it land in payload_base64 only.
    sb.add("nul", &b"\xff\xfe"[..], &[]);
    let out = sb.lw(["export", "--format", "csv"]).run();
    let mut reader = csv::Reader::from_reader(&out.stdout[..]);
    let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(
        header,
        [
            "id",
            "key",
            "status",
            "attempts",
            "payload",
            "payload_base64",
            "result",
            "result_base64",
            "error"
        ]
    );
    let rows: Vec<Vec<String>> = reader
        .records()
        .map(|r| r.unwrap().iter().map(String::from).collect())
        .collect();
    let row = |fields: [&str; 9]| fields.map(String::from).to_vec();
    assert_eq!(
        rows,
        [
            row(["1", "", "done", "1", "ok-1", "", "did ok-1", "", ""]),
            row([
                "2",
                "",
                "failed",
                "1",
                "bad",
                "",
                "",
                "",
                "exit status 5: refusing bad"
            ]),
            row(["3", "", "done", "1", "ok-2", "", "did ok-2", "", ""]),
            row(["4", "", "pending", "0", "", "//4=", "", "", ""]),
        ]
    );

    let out = sb.lw(["export", "--status", "done"]).run();
    assert_eq!(out.stdout_text().lines().count(), 2);
}

/// The payloads of a queue file, in id order.
fn payloads(db: &Path) -> Vec<String> {
    let conn = open_read_only(db);
    let mut stmt = conn
        .prepare("SELECT CAST(payload AS TEXT) FROM items ORDER BY id")
        .unwrap();
    let rows = stmt.query_map([], |r| r.get(0)).unwrap();
    rows.collect::<rusqlite::Result<_>>().unwrap()
}

#[test]
fn db_flag_beats_environment_which_beats_the_default_file() {
    let sb = Sandbox::new();
    let env_db = sb.path("from-env.db");
    let flag_db = sb.path("from-flag.db");

    sb.bare().arg("add").stdin("default\n").run();
    sb.bare()
        .env("LITEWORK_DB", &env_db)
        .arg("add")
        .stdin("env\n")
        .run();
    sb.bare()
        .env("LITEWORK_DB", &env_db)
        .arg("--db")
        .arg(&flag_db)
        .arg("add")
        .stdin("flag\n")
        .run();

    assert_eq!(payloads(&sb.path("litework.db")), ["default"]);
    assert_eq!(payloads(&env_db), ["env"]);
    assert_eq!(payloads(&flag_db), ["flag"]);
}

#[test]
fn usage_errors_exit_2_and_change_nothing() {
    let sb = Sandbox::new();
    sb.add("lines", "x\n", &[]);
    let before = sb.items();
    let cases: [(&[&str], &str); 9] = [
        (&["frobnicate"], "unrecognized subcommand"),
        (
            &["worker", "--no-such-flag", "--", "true"],
            "unexpected argument",
        ),
        (
            &["worker", "-c", "0", "--", "true"],
            "'--concurrency <CONCURRENCY>': must be at least 1",
        ),
        (
            &["worker", "--lease", "100ms", "--", "true"],
            "'--lease <LEASE>': must be at least 300ms",
        ),
        (
            &["worker", "--", "no-such-program-here"],
            "command not found",
        ),
        (&["retry", "42"], "no item with id 42"),
        (
            // Past /proc/sys/fs/nr_open, which binds root too.
            &["worker", "--limit-files", "2000000000", "--", "true"],
            "a command cannot be started under these limits",
        ),
        (
            &["requeue-stale", "--worker", "nope"],
            "no worker \"nope\" has registered",
        ),
        (
            &["--busy-timeout", "0s", "worker", "--", "true"],
            "--busy-timeout <BUSY_TIMEOUT>': must be more than zero",
        ),
    ];
    for (args, needle) in cases {
        sb.lw(args).run_expect(2).assert_stderr_has(needle);
    }
    assert_eq!(sb.items(), before);
}

/// `run --input` adds its input only once every other option passed: a
/// refused option must not leave the items queued (a second attempt with
/// `--no-dedupe` would then queue them twice).
#[test]
fn run_refuses_its_options_before_adding_its_input() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a port");
    let busy_addr = busy.local_addr().expect("its address").to_string();
    let cases: [(&[&str], &str); 5] = [
        (&["-w", "0"], "'--workers <WORKERS>': must be at least 1"),
        (
            &["-c", "0"],
            "'--concurrency <CONCURRENCY>': must be at least 1",
        ),
        (
            &["--lease", "1ms"],
            "'--lease <LEASE>': must be at least 300ms",
        ),
        (&["--web-config", "no-such-web.yml"], "no-such-web.yml"),
        (&["--metrics-addr", &busy_addr], &busy_addr),
    ];
    for (options, needle) in cases {
        let sb = Sandbox::new();
        let list = sb.write("list.txt", "a\nb\nc\n");
        let out = sb
            .lw(["run", "--input"])
            .arg(&list)
            .args(options)
            .args(["--", "true"])
            .run_expect(2);
        out.assert_stderr_has(needle);
        assert!(
            !sb.db().exists(),
            "{options:?} was refused, yet the database was made:\n{}",
            out.report("")
        );
        assert_eq!(sb.files_starting_with("queue.db"), Vec::<String>::new());
    }
}

#[test]
fn reading_verbs_commit_nothing() {
    let sb = Sandbox::new();
    run_mixed_batch(&sb);
    // data_version changes for this connection whenever another one
    // commits.
    let watcher = sb.conn();
    let version = || -> i64 {
        watcher
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .unwrap()
    };
    let before = version();
    let verbs: [&[&str]; 5] = [
        &["status"],
        &["status", "--json"],
        &["list"],
        &["export"],
        &["export", "--format", "csv"],
    ];
    for verb in verbs {
        sb.lw(verb).run();
        assert_eq!(version(), before, "{verb:?} wrote to the database");
    }
}

#[test]
fn status_recount_repairs_counts_after_a_hand_edit() {
    let sb = Sandbox::new();
    sb.add("lines", "a\nb\nc\n", &[]);
    rusqlite::Connection::open(sb.db())
        .unwrap()
        .execute("UPDATE items SET status = 'failed' WHERE id = 2", [])
        .unwrap();
    let before = sb.lw(["status", "--json"]).run();
    assert!(
        before.stdout_text().contains("\"failed\":0"),
        "{}",
        before.stdout_text()
    );
    let after = sb.lw(["status", "--json", "--recount"]).run();
    let text = after.stdout_text();
    assert!(
        text.contains("\"failed\":1") && text.contains("\"pending\":2"),
        "{text}"
    );
}
