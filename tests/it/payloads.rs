//! Payloads reach the command byte for byte, never as shell syntax or as
//! options, in every way of passing them; results come back out unchanged.

use std::path::Path;

use base64::Engine;

use crate::util::{Item, Sandbox};

/// Saves the payload ("$1") under the item's id and prints it as the result.
const SAVE_ARG: &str = r#"printf %s "$1" > "$DIR/out-$LITEWORK_ITEM_ID"; printf %s "$1""#;

/// The same for a payload on standard input.
const SAVE_STDIN: &str = r#"tee "$DIR/out-$LITEWORK_ITEM_ID""#;

/// Text that would do harm if any of it were read as shell syntax or as
/// an option.
const HOSTILE_TEXT: &[&str] = &[
    r#"; rm -rf "$HOME"/nonexistent-canary"#,
    "; touch CANARY",
    "$(touch CANARY)",
    "`touch CANARY`",
    "'; touch CANARY; '",
    r#""; touch CANARY; ""#,
    r#"it's a "quoted" word"#,
    "line one\nline two\n",
    "-n",
    "--help",
    "-",
    "*",
    "$HOME ${PATH} $1 $@ $$ \\$0",
    "  spaces around  ",
    "{} {id} {attempt}",
    "tab\there, carriage\rreturn, back\\slash",
    "naïve ☃ 🦀",
    "a > b | c & d < e; exit 9",
    // SQL goes through bound parameters only: these are just text.
    "'); DROP TABLE items; --",
    "x' OR '1'='1",
];

/// Bytes that are not UTF-8, added with `--format nul`.
const HOSTILE_BYTES: &[&[u8]] = &[b"\xff\xfe not utf-8 \x80", b"-\xc3\x28 then\na newline"];

/// A payload with NUL bytes: only standard input can carry it.
const WITH_NUL: &[u8] = b"before\0after\0\xff";

/// Adds every hostile payload; returns them in id order.
fn add_hostile(sb: &Sandbox) -> Vec<Vec<u8>> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut jsonl = String::new();
    for text in HOSTILE_TEXT {
        jsonl += &serde_json::json!({ "payload": text }).to_string();
        jsonl.push('\n');
    }
    jsonl += &serde_json::json!({ "payload_base64": b64.encode(WITH_NUL) }).to_string();
    jsonl.push('\n');
    sb.add("jsonl", jsonl, &[]);
    sb.add("nul", HOSTILE_BYTES.join(&0u8), &[]);

    let mut all: Vec<Vec<u8>> = HOSTILE_TEXT.iter().map(|t| t.as_bytes().to_vec()).collect();
    all.push(WITH_NUL.to_vec());
    all.extend(HOSTILE_BYTES.iter().map(|b| b.to_vec()));
    let stored: Vec<Vec<u8>> = sb.items().into_iter().map(|i| i.payload).collect();
    assert_eq!(stored, all, "payloads are stored as added");
    all
}

/// Runs a worker with `worker_args` over the hostile payloads and checks
/// that each arrived (in `$DIR/out-ID`) and came back (as the result)
/// unchanged. Without `stdin`, the NUL payload must fail, pointing at
/// `--stdin`.
fn check_hostile_payloads(worker_args: &[&str], stdin: bool) {
    let sb = Sandbox::new();
    let payloads = add_hostile(&sb);
    let out = sb
        .lw(["worker", "-c", "2"])
        .args(worker_args)
        .run_expect(if stdin { 0 } else { 1 });

    for item in sb.items() {
        if item.payload == WITH_NUL && !stdin {
            assert_eq!(
                (item.status.as_str(), item.attempts),
                ("failed", 1),
                "{item:?}"
            );
            let error = item.last_error.clone().unwrap_or_default();
            assert!(
                error.contains("NUL") && error.contains("--stdin"),
                "{error:?}"
            );
            continue;
        }
        assert_eq!(item.status, "done", "{item:?}\n{}", out.stderr);
        let saved = std::fs::read(sb.path(&format!("out-{}", item.id)))
            .unwrap_or_else(|e| panic!("item {} saved nothing: {e}", item.id));
        assert_eq!(
            saved, item.payload,
            "bytes the command received for item {}",
            item.id
        );
        assert_eq!(
            item.result.as_deref(),
            Some(&item.payload[..]),
            "stored result"
        );
    }
    assert_no_canary(sb.dir());
    assert_export_round_trips(&sb, payloads.len());
}

/// Fails if a payload managed to run `touch CANARY` anywhere in `dir`.
fn assert_no_canary(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !name.contains("CANARY"),
            "a payload ran as code: {}",
            path.display()
        );
        if path.is_dir() {
            assert_no_canary(&path);
        }
    }
}

/// `export` gives back every payload and result as stored, as text or as
/// base64 when they are not UTF-8.
fn assert_export_round_trips(sb: &Sandbox, n: usize) {
    let export = sb.lw(["export"]).run();
    let lines: Vec<serde_json::Value> = export
        .stdout_text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), n, "one line per item");
    for (item, line) in sb.items().iter().zip(&lines) {
        assert_eq!(line["id"], item.id);
        assert_eq!(exported_bytes(line, "payload"), Some(item.payload.clone()));
        assert_eq!(exported_bytes(line, "result"), item.result, "{line}");
    }
}

/// `name` or `name_base64` of an exported item, as bytes.
fn exported_bytes(line: &serde_json::Value, name: &str) -> Option<Vec<u8>> {
    if let Some(text) = line[name].as_str() {
        return Some(text.as_bytes().to_vec());
    }
    let encoded = line[format!("{name}_base64")].as_str()?;
    let b64 = base64::engine::general_purpose::STANDARD;
    Some(b64.decode(encoded).expect("valid base64 in export"))
}

#[test]
fn hostile_payloads_arrive_intact_in_place_of_braces() {
    check_hostile_payloads(&["--", "sh", "-c", SAVE_ARG, "sh", "{}"], false);
}

#[test]
fn hostile_payloads_arrive_intact_as_appended_argument() {
    check_hostile_payloads(&["--", "sh", "-c", SAVE_ARG, "sh"], false);
}

#[test]
fn hostile_payloads_arrive_intact_as_shell_positional_argument() {
    check_hostile_payloads(&["--shell", "--", SAVE_ARG], false);
}

#[test]
fn hostile_payloads_arrive_intact_on_stdin() {
    check_hostile_payloads(&["--stdin", "--", "sh", "-c", SAVE_STDIN], true);
}

#[test]
fn shell_script_with_braces_is_refused_before_claiming() {
    let sb = Sandbox::new();
    sb.add("lines", "x\n", &[]);
    let out = sb
        .lw(["worker", "--shell", "--", "echo", "{}"])
        .run_expect(2);
    out.assert_stderr_has(r#"the payload is "$1""#);
    let item = sb.only_item();
    assert_eq!((item.status.as_str(), item.attempts), ("pending", 0));
}

/// `len` bytes that are neither NUL nor newline, reproducible.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len)
        .map(|_| loop {
            let b = rng.u8(..);
            if b != 0 && b != b'\n' {
                break b;
            }
        })
        .collect()
}

/// `LITEWORK_KEY` is left out where the environment cannot hold it, as
/// `LITEWORK_PAYLOAD` is: a key made from a 200 kB payload made the spawn
/// fail (E2BIG), and a key with a NUL byte failed it every attempt.
#[test]
fn keys_the_environment_cannot_hold_are_left_out_of_it() {
    let sb = Sandbox::new();
    let big = "x".repeat(200_000);
    sb.add("lines", format!("{big}\n"), &["--key-from-payload"]);
    sb.add(
        "jsonl",
        "{\"payload\":\"nul\",\"key\":\"a\\u0000b\"}\n{\"payload\":\"plain\",\"key\":\"k\"}\n",
        &[],
    );
    let script = r#"cat > /dev/null; printf %s "${LITEWORK_KEY-unset}""#;
    sb.lw(["worker", "-c", "1", "--stdin", "--", "sh", "-c", script])
        .run();
    let results: Vec<(String, Option<Vec<u8>>)> = sb
        .items()
        .into_iter()
        .map(|i| (i.status, i.result))
        .collect();
    let want = |r: &[u8]| ("done".to_string(), Some(r.to_vec()));
    assert_eq!(results, [want(b"unset"), want(b"unset"), want(b"k")]);
}

/// Under `--stdin` a payload is in an argument only through `{}`: the
/// error says so rather than pointing at `--stdin`.
#[test]
fn a_nul_payload_in_an_argument_under_stdin_points_at_the_braces() {
    let sb = Sandbox::new();
    sb.add(
        "jsonl",
        "{\"payload_base64\":\"AGI=\"}\n",
        &["--max-attempts", "1"],
    );
    sb.lw(["worker", "-c", "1", "--stdin", "--", "printf", "%s", "{}"])
        .run_expect(1);
    let error = sb.only_item().last_error.unwrap_or_default();
    assert!(error.contains("take {} out of the command"), "{error}");
}

#[test]
fn megabyte_payload_passes_through_stdin_byte_for_byte() {
    let sb = Sandbox::new();
    let payload = noise(1_000_000, 1);
    sb.add("nul", payload.clone(), &[]);
    let copy = sb.path("copy");
    sb.lw(["worker", "-c", "1", "--stdin", "--", "tee"])
        .arg(&copy)
        .run();

    let item = sb.only_item();
    assert_eq!(item.status, "done", "{:?}", item.last_error);
    assert!(
        std::fs::read(&copy).unwrap() == payload,
        "the command read other bytes"
    );
    assert!(
        item.result.as_deref() == Some(&payload[..]),
        "the stored result differs"
    );
    let export = sb.lw(["export"]).run();
    let line: serde_json::Value = serde_json::from_slice(&export.stdout).unwrap();
    assert!(exported_bytes(&line, "result").as_deref() == Some(&payload[..]));
}

#[test]
fn argument_longer_than_linux_allows_fails_pointing_at_stdin() {
    let sb = Sandbox::new();
    // The largest argument Linux takes (its limit counts the final NUL),
    // one byte more, and a megabyte.
    let sizes = [131_071, 131_072, 1_000_000];
    let records: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![b'x'; n]).collect();
    sb.add("nul", records.join(&0u8), &[]);
    let save = r#"printf %s "$1" > "$DIR/out-$LITEWORK_ITEM_ID""#;
    let out = sb
        .lw(["worker", "-c", "1", "--", "sh", "-c", save, "sh", "{}"])
        .run_expect(1);

    let items = sb.items();
    let fits: &Item = &items[0];
    assert_eq!(fits.status, "done", "{:?}\n{}", fits.last_error, out.stderr);
    assert_eq!(std::fs::read(sb.path("out-1")).unwrap().len(), sizes[0]);
    for item in &items[1..] {
        assert_eq!(
            (item.status.as_str(), item.attempts),
            ("failed", 1),
            "{item:?}"
        );
        let error = item.last_error.clone().unwrap_or_default();
        assert!(
            error.contains("131071 bytes") && error.contains("--stdin"),
            "{error:?} should name the argument limit and --stdin"
        );
        let saved = sb.path(&format!("out-{}", item.id));
        assert!(!saved.exists(), "the command must not have run");
    }
    let outcomes: Vec<_> = sb.attempts().into_iter().map(|a| a.outcome).collect();
    assert_eq!(outcomes, ["permanent", "permanent"]);
}

#[test]
fn the_command_sees_its_name_as_given_though_it_runs_from_path() {
    let sb = Sandbox::new();
    sb.add("lines", "x\n", &[]);
    // The shell's own command line, first word: its argv[0].
    sb.lw([
        "worker",
        "--",
        "sh",
        "-c",
        r#"head -c 3 "/proc/$$/cmdline""#,
        "{}",
    ])
    .run();
    assert_eq!(sb.only_item().result.as_deref(), Some(&b"sh\0"[..]));
}
