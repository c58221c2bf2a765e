//! Files that are not a litework database, or one from a newer litework,
//! are refused by name and left exactly as they were.

use std::path::{Path, PathBuf};

use rusqlite::Connection;

use crate::util::{open_read_only, Sandbox};

fn sidecar(db: &Path, suffix: &str) -> PathBuf {
    let mut name = db.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// Runs `status` and `add` on `db`; each must exit 2 with a message that
/// names the file and says `why`, and leave the file's bytes unchanged
/// and no WAL beside it.
fn assert_refused(sb: &Sandbox, db: &Path, why: &str) {
    let before = std::fs::read(db).unwrap();
    let verbs: [&[&str]; 3] = [&["status"], &["add"], &["worker", "--", "true"]];
    for verb in verbs {
        let out = sb
            .bare()
            .arg("--db")
            .arg(db)
            .args(verb)
            .stdin("x\n")
            .run_expect(2);
        out.assert_stderr_has(&format!("{}: ", db.display()));
        out.assert_stderr_has(why);
        assert!(
            std::fs::read(db).unwrap() == before,
            "{verb:?} changed {}",
            db.display()
        );
        for suffix in ["-wal", "-journal"] {
            let path = sidecar(db, suffix);
            assert!(!path.exists(), "{verb:?} left {}", path.display());
        }
    }
}

fn journal_mode(db: &Path) -> String {
    open_read_only(db)
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn text_file_is_not_a_litework_database() {
    let sb = Sandbox::new();
    let db = sb.write(
        "notes.txt",
        "shopping: eggs, flour, a very long list of things\n",
    );
    assert_refused(&sb, &db, "not a litework database");
}

#[test]
fn sqlite_database_of_another_program_is_refused() {
    let sb = Sandbox::new();
    let db = sb.path("recipes.db");
    {
        let conn = Connection::open(&db).unwrap();
        conn.execute_batch(
            "CREATE TABLE recipes (name TEXT NOT NULL);
             INSERT INTO recipes (name) VALUES ('bread');",
        )
        .unwrap();
    }
    assert_eq!(journal_mode(&db), "delete");
    assert_refused(&sb, &db, "not a litework database");
    assert_eq!(
        journal_mode(&db),
        "delete",
        "refusing must not switch to WAL"
    );
}

#[test]
fn sqlite_database_with_another_application_id_is_refused() {
    let sb = Sandbox::new();
    let db = sb.path("other.db");
    Connection::open(&db)
        .unwrap()
        .execute_batch("PRAGMA application_id = 305419896;")
        .unwrap();
    assert_refused(&sb, &db, "another program");
}

#[test]
fn database_from_a_newer_litework_is_refused() {
    let sb = Sandbox::new();
    sb.lw(["init"]).run();
    Connection::open(sb.db())
        .unwrap()
        .execute_batch("PRAGMA user_version = 99;")
        .unwrap();
    assert_eq!(journal_mode(sb.db()), "wal");
    assert_refused(&sb, sb.db(), "schema version 99 is newer");
    assert_eq!(journal_mode(sb.db()), "wal");
}

#[test]
fn directory_as_database_is_refused() {
    let sb = Sandbox::new();
    let dir = sb.path("a-directory");
    std::fs::create_dir(&dir).unwrap();
    for verb in ["status", "add"] {
        let out = sb
            .bare()
            .arg("--db")
            .arg(&dir)
            .arg(verb)
            .stdin("x\n")
            .run_expect(2);
        out.assert_stderr_has("is a directory");
    }
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}

/// The error names the database given, not the staging file `add` would
/// have written beside it.
#[test]
fn a_database_in_a_missing_directory_is_refused_by_its_own_name() {
    let sb = Sandbox::new();
    let db = sb.path("no-such-dir").join("q.db");
    let out = sb
        .bare()
        .arg("--db")
        .arg(&db)
        .arg("add")
        .stdin("x\n")
        .run_expect(2);
    out.assert_stderr_has(&format!("{}: no such directory", db.display()));
    assert!(!sb.path("no-such-dir").exists());
}

#[test]
fn missing_database_is_not_created_by_reading_verbs() {
    let sb = Sandbox::new();
    let verbs: [&[&str]; 5] = [
        &["status"],
        &["list"],
        &["export"],
        &["retry"],
        &["worker", "--", "true"],
    ];
    for verb in verbs {
        let out = sb.lw(verb).run_expect(2);
        out.assert_stderr_has("no such database");
        out.assert_stderr_has("litework init");
        assert!(!sb.db().exists(), "{verb:?} created the database");
    }
}
