//! Unit tests of the store against real files in a temporary directory.

use std::time::Duration;

use super::*;

fn fresh() -> (tempfile::TempDir, Queue) {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::create(dir.path().join("q.db")).unwrap();
    (dir, queue)
}

fn add(queue: &Queue, payloads: &[&str]) {
    let items = payloads
        .iter()
        .map(|p| Ok(NewItem::new(p.as_bytes().to_vec())));
    queue.add(items, 3).unwrap();
}

/// Counts by status computed from the items themselves.
fn real_counts(queue: &Queue) -> Vec<(String, i64)> {
    let s = queue.session().unwrap();
    let mut stmt = s
        .connection()
        .prepare("SELECT status, count(*) FROM items GROUP BY status ORDER BY status")
        .unwrap();
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    rows.map(|r| r.unwrap()).collect()
}

/// Counts by status as the maintained `counts` table has them.
fn kept_counts(queue: &Queue) -> Vec<(String, i64)> {
    let s = queue.session().unwrap();
    let mut stmt = s
        .connection()
        .prepare("SELECT status, n FROM counts WHERE n <> 0 ORDER BY status")
        .unwrap();
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    rows.map(|r| r.unwrap()).collect()
}

const LEASE: Duration = Duration::from_secs(30);

/// Registers worker `id` as running on this machine.
fn register(queue: &Queue, id: &str) {
    queue
        .session()
        .unwrap()
        .register_worker(&WorkerInfo {
            id: id.into(),
            pid: std::process::id(),
            host: crate::worker::host_name(),
            metrics_addr: None,
        })
        .unwrap();
}

/// `EXPLAIN QUERY PLAN` of `sql` with `params` zeros bound: one line per
/// step.
fn plan(queue: &Queue, sql: &str, params: usize) -> Vec<String> {
    let s = queue.session().unwrap();
    let mut stmt = s
        .connection()
        .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
        .unwrap();
    let zeros = vec![0i64; params];
    stmt.query_map(rusqlite::params_from_iter(zeros), |r| r.get::<_, String>(3))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

#[test]
fn claim_uses_the_partial_index_and_no_table_scan() {
    let (_dir, queue) = fresh();
    let plan = plan(&queue, sql::READY, 0);
    let text = plan.join("\n");
    // The read walks items_ready in claim order and the caller stops it
    // after the rows it claims; any other scan of items would grow with
    // the queue, and a sort would read every ready item first.
    assert!(
        plan.iter()
            .any(|l| l.contains("SCAN items USING INDEX items_ready")),
        "plan:\n{text}"
    );
    for line in &plan {
        let scan = line.starts_with("SCAN items") && !line.contains("INDEX items_ready");
        assert!(!scan, "table scan in plan:\n{text}");
    }
    assert!(
        !text.contains("TEMP B-TREE"),
        "claim must not sort:\n{text}"
    );
    // The lease then changes those rows by id.
    let lease = self::plan(&queue, sql::LEASE, 4);
    let text = lease.join("\n");
    assert!(
        lease
            .iter()
            .any(|l| l.contains("SEARCH items USING INTEGER PRIMARY KEY")),
        "plan:\n{text}"
    );
    assert!(
        !lease.iter().any(|l| l.starts_with("SCAN items")),
        "table scan in plan:\n{text}"
    );
}

#[test]
fn claim_takes_highest_priority_first_and_bumps_attempt_and_token() {
    let (_dir, queue) = fresh();
    let items = vec![
        Ok(NewItem::new("low")),
        Ok(NewItem {
            priority: 5,
            ..NewItem::new("high")
        }),
        Ok(NewItem::new("low2")),
    ];
    queue.add(items, 3).unwrap();
    let jobs = queue.claim("w1", 2, LEASE).unwrap();
    let payloads: Vec<&[u8]> = jobs.iter().map(|j| j.payload.as_slice()).collect();
    assert_eq!(payloads, vec![&b"high"[..], b"low"]);
    assert!(jobs.iter().all(|j| j.attempt == 1 && j.token == 1));
    // A second claim gets the rest, never the same item.
    let rest = queue.claim("w2", 5, LEASE).unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].payload, b"low2");
}

#[test]
fn completion_after_requeue_is_fenced_off() {
    let (_dir, queue) = fresh();
    add(&queue, &["a"]);
    let old = queue.claim("dead", 1, LEASE).unwrap().remove(0);
    assert_eq!(queue.requeue_worker("dead").unwrap().pending, 1);
    let new = queue.claim("alive", 1, LEASE).unwrap().remove(0);
    assert_eq!(new.id, old.id);
    assert_eq!(new.token, old.token + 1);

    let late = Completion::Done {
        result: b"stale".to_vec(),
    };
    assert_eq!(queue.record(&old, late).unwrap(), Recorded::LeaseLost);
    let mut s = queue.session().unwrap();
    assert_eq!(s.extend(&old, LEASE).unwrap(), Recorded::LeaseLost);
    let fresh = Completion::Done {
        result: b"fresh".to_vec(),
    };
    assert_eq!(queue.record(&new, fresh).unwrap(), Recorded::Recorded);
    // Recording twice is fenced too: the item is no longer running.
    let again = Completion::Done {
        result: b"again".to_vec(),
    };
    assert_eq!(queue.record(&new, again).unwrap(), Recorded::LeaseLost);

    let row = &s.list(None, None).unwrap()[0];
    assert_eq!(row.result.as_deref(), Some(&b"fresh"[..]));
    assert_eq!(row.status, "done");
    let lost: i64 = s
        .connection()
        .query_row(
            "SELECT count(*) FROM attempts WHERE outcome = 'lost'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(lost, 1);
}

#[test]
fn requeues_never_touch_a_live_lease_of_another_worker() {
    let (_dir, queue) = fresh();
    add(&queue, &["a", "b"]);
    queue.claim("w1", 1, LEASE).unwrap();
    queue.claim("w2", 1, LEASE).unwrap();
    // w2's lease expired a second ago; w1's has 30 s to go.
    let s = queue.session().unwrap();
    let sql = "UPDATE items SET lease_expires = ?1 WHERE lease_owner = 'w2'";
    s.connection()
        .execute(sql, params![now_ms() - 1000])
        .unwrap();
    let moved = queue.requeue_expired().unwrap();
    assert_eq!(
        moved,
        Requeued {
            pending: 1,
            ..Requeued::default()
        }
    );
    assert_eq!(queue.requeue_worker("w3").unwrap().total(), 0);
    let running = queue.status().unwrap().running;
    assert_eq!(running, 1, "w1's live lease must stay");
}

#[test]
fn failures_back_off_then_fail_and_permanent_skips_attempts() {
    let (_dir, queue) = fresh();
    add(&queue, &["a", "b"]);
    let backoff = Backoff {
        base: Duration::from_millis(0),
        max: Duration::from_millis(0),
    };
    for attempt in 1..=3 {
        let job = queue.claim("w", 1, LEASE).unwrap().remove(0);
        assert_eq!((job.payload.as_slice(), job.attempt), (&b"a"[..], attempt));
        let c = backoff.completion(&job, format!("boom {attempt}"), FailureKind::Error);
        assert_eq!(matches!(c, Completion::Failed { .. }), attempt == 3);
        assert_eq!(queue.record(&job, c).unwrap(), Recorded::Recorded);
    }
    let job = queue.claim("w", 1, LEASE).unwrap().remove(0);
    assert_eq!(job.payload, b"b");
    let c = backoff.completion(&job, "no".into(), FailureKind::Permanent);
    queue.record(&job, c).unwrap();

    let mut s = queue.session().unwrap();
    let failed = s.list(Some(Status::Failed), None).unwrap();
    let summary: Vec<(i64, Option<&str>)> = failed
        .iter()
        .map(|r| (r.attempts, r.last_error.as_deref()))
        .collect();
    assert_eq!(summary, vec![(3, Some("boom 3")), (1, Some("no"))]);
    let history: Vec<String> = s
        .connection()
        .prepare("SELECT outcome FROM attempts ORDER BY item_id, attempt")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(history, vec!["error", "error", "error", "permanent"]);
    assert_eq!(real_counts(&queue), kept_counts(&queue));
}

#[test]
fn backoff_grows_exponentially_within_jitter_and_cap() {
    let b = Backoff {
        base: Duration::from_secs(1),
        max: Duration::from_secs(10),
    };
    for (attempt, full) in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 10), (40, 10)] {
        let d = b.delay(attempt);
        let full = Duration::from_secs(full);
        assert!(
            d >= full / 2 && d <= full,
            "attempt {attempt}: {d:?} vs {full:?}"
        );
    }
}

#[test]
fn delayed_items_wait_for_run_after() {
    let (_dir, queue) = fresh();
    let item = NewItem {
        delay: Some(Duration::from_secs(3600)),
        ..NewItem::new("later")
    };
    queue.add([Ok(item)], 3).unwrap();
    assert!(queue.claim("w", 1, LEASE).unwrap().is_empty());
    let next = queue.session().unwrap().next_ready_at().unwrap();
    assert!(next.is_some_and(|at| at > now_ms()));
}

#[test]
fn release_gives_the_attempt_back() {
    let (_dir, queue) = fresh();
    add(&queue, &["a"]);
    let job = queue.claim("w", 1, LEASE).unwrap().remove(0);
    assert_eq!(
        queue.record(&job, Completion::Release).unwrap(),
        Recorded::Recorded
    );
    let again = queue.claim("w", 1, LEASE).unwrap().remove(0);
    assert_eq!(again.attempt, 1);
    assert_eq!(again.token, job.token + 1);
}

#[test]
fn worker_out_of_attempts_ends_failed_on_requeue() {
    let (_dir, queue) = fresh();
    queue
        .add(
            [Ok(NewItem {
                max_attempts: Some(1),
                ..NewItem::new("poison")
            })],
            3,
        )
        .unwrap();
    queue.claim("w", 1, LEASE).unwrap();
    assert_eq!(
        queue.requeue_worker("w").unwrap(),
        Requeued {
            failed: 1,
            ..Requeued::default()
        }
    );
    let row = &queue.session().unwrap().list(None, None).unwrap()[0];
    assert_eq!(row.status, "failed");
    let error = row.last_error.as_deref().unwrap_or_default();
    assert!(
        error.contains("worker w died while running this item"),
        "{error}"
    );
    assert_eq!(real_counts(&queue), kept_counts(&queue));
}

#[test]
fn add_is_all_or_nothing_and_dedupes_keys() {
    let (_dir, queue) = fresh();
    let report = queue
        .add(
            [
                Ok(NewItem::new("a").key("k")),
                Ok(NewItem::new("b").key("k")),
            ],
            3,
        )
        .unwrap();
    assert_eq!(
        report,
        AddReport {
            added: 1,
            duplicates: 1
        }
    );
    let bad = vec![
        Ok(NewItem::new("c")),
        Err(Error::Input {
            input: "x".into(),
            line: 2,
            reason: "bad".into(),
        }),
    ];
    assert!(queue.add(bad, 3).is_err());
    assert_eq!(queue.status().unwrap().total, 1);
}

#[test]
fn payload_bytes_round_trip_as_text_or_blob() {
    let (_dir, queue) = fresh();
    let odd: Vec<u8> = vec![0, 0xff, b'\n', b'x'];
    queue
        .add(
            [Ok(NewItem::new(odd.clone())), Ok(NewItem::new("plain"))],
            3,
        )
        .unwrap();
    let jobs = queue.claim("w", 2, LEASE).unwrap();
    assert_eq!(jobs[0].payload, odd);
    let s = queue.session().unwrap();
    let kinds: Vec<String> = s
        .connection()
        .prepare("SELECT typeof(payload) FROM items ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(kinds, vec!["blob", "text"]);
}

#[test]
fn retry_by_id_refuses_unknown_ids_and_changes_nothing() {
    let (_dir, queue) = fresh();
    add(&queue, &["a", "b"]);
    let job = queue.claim("w", 1, LEASE).unwrap().remove(0);
    let failed = Completion::Failed {
        error: "x".into(),
        kind: FailureKind::Permanent,
    };
    queue.record(&job, failed).unwrap();
    let mut s = queue.session().unwrap();
    let err = s.retry_ids(&[job.id, 999]).unwrap_err();
    assert_eq!(err.to_string(), "no item with id 999");
    assert_eq!(queue.status().unwrap().failed, 1);
    let report = s.retry_ids(&[job.id]).unwrap();
    assert_eq!(report.retried, 1);
    assert_eq!(queue.status().unwrap().failed, 0);
    assert_eq!(real_counts(&queue), kept_counts(&queue));
}

#[test]
fn newer_schema_and_foreign_files_are_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let newer = dir.path().join("newer.db");
    drop(Queue::create(&newer).unwrap());
    {
        let c = Connection::open(&newer).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
    }
    let err = Queue::open(&newer).unwrap_err();
    assert!(matches!(err, Error::NewerSchema { found: 99, .. }), "{err}");

    let foreign = dir.path().join("foreign.db");
    {
        let c = Connection::open(&foreign).unwrap();
        c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
    }
    let before = std::fs::read(&foreign).unwrap();
    let err = Queue::open(&foreign).unwrap_err();
    assert!(matches!(err, Error::NotLitework { .. }), "{err}");
    assert!(err.is_input());
    assert_eq!(std::fs::read(&foreign).unwrap(), before);
    assert!(!dir.path().join("foreign.db-wal").exists());
}

#[test]
fn network_filesystems_are_recognised_by_their_statfs_type() {
    assert_eq!(filesystem_kind(0x6969), Some("NFS"));
    assert_eq!(filesystem_kind(0xFF53_4D42), Some("CIFS"));
    // ext4 and tmpfs are local.
    assert_eq!(filesystem_kind(0xEF53), None);
    assert_eq!(filesystem_kind(0x0102_1994), None);
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(network_fs(&dir.path().join("q.db")), None);
}

#[test]
fn one_turn_records_a_batch_in_which_one_lease_was_lost() {
    let (_dir, queue) = fresh();
    add(&queue, &["a", "b", "c", "d"]);
    let jobs = queue.claim("w", 4, LEASE).unwrap();
    assert_eq!(jobs.len(), 4);
    // Another worker took "b" over (its lease expired and was claimed).
    let mut s = queue.session().unwrap();
    s.connection()
        .execute(
            "UPDATE items SET lease_token = lease_token + 1, lease_owner = 'thief' WHERE id = ?1",
            [jobs[1].id],
        )
        .unwrap();
    let done = |job: &Job| {
        (
            job.clone(),
            Completion::Done {
                result: b"ok".to_vec(),
            },
        )
    };
    let turn = Turn {
        finished: vec![
            done(&jobs[0]),
            done(&jobs[1]),
            (
                jobs[2].clone(),
                Completion::Failed {
                    error: "bad".into(),
                    kind: FailureKind::Permanent,
                },
            ),
            (jobs[3].clone(), Completion::Release),
        ],
        claim: 10,
        ..Turn::default()
    };
    let result = s.turn("w", LEASE, &turn).unwrap();
    let recorded: Vec<Recorded> = result.recorded.iter().map(|&(_, r)| r).collect();
    assert_eq!(
        recorded,
        [
            Recorded::Recorded,
            Recorded::LeaseLost,
            Recorded::Recorded,
            Recorded::Recorded
        ]
    );
    // The released item is claimed again in the same turn.
    assert_eq!(result.claimed.len(), 1);
    assert_eq!(result.claimed[0].id, jobs[3].id);
    // The thief's lease is untouched by the outcome that lost it.
    let (status, owner): (String, String) = s
        .connection()
        .query_row(
            "SELECT status, lease_owner FROM items WHERE id = ?1",
            [jobs[1].id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((status.as_str(), owner.as_str()), ("running", "thief"));
    assert_eq!(real_counts(&queue), kept_counts(&queue));
    let st = queue.status().unwrap();
    assert_eq!((st.done, st.failed, st.running, st.pending), (1, 1, 2, 0));
}

#[test]
fn waiting_items_leave_the_ready_index_and_come_back_when_due() {
    let (_dir, queue) = fresh();
    let delayed = NewItem {
        delay: Some(Duration::from_millis(300)),
        ..NewItem::new("later")
    };
    queue
        .add([Ok(NewItem::new("now")), Ok(delayed)], 3)
        .unwrap();
    let mut s = queue.session().unwrap();
    let now = now_ms();
    let due = s.next_ready_at().unwrap().expect("one item waits");
    assert!(due > now && due <= now + 300, "{due} vs {now}");
    let first = queue.claim("w", 10, LEASE).unwrap();
    assert_eq!(first.len(), 1, "only the ready item");
    wait_for(|| now_ms() >= due);
    let second = queue.claim("w", 10, LEASE).unwrap();
    assert_eq!(second.len(), 1, "the waiting item, once due");
    assert_eq!(s.next_ready_at().unwrap(), None);
    assert_eq!(real_counts(&queue), kept_counts(&queue));
}

/// Spins (with short naps) until `ready` holds, for at most 20 s.
fn wait_for(mut ready: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not met in 20 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn promoting_and_finding_waiting_items_use_their_index() {
    let (_dir, queue) = fresh();
    let waiting = [
        (sql::PROMOTE, 1),
        (sql::NEXT_DUE, 0),
        (sql::HEAD, 0),
        (sql::ANY_READY, 0),
    ];
    for (sql, params) in waiting {
        let plan = plan(&queue, sql, params);
        let text = plan.join("\n");
        assert!(
            plan.iter()
                .all(|l| !l.starts_with("SCAN items") || l.contains("INDEX")),
            "{sql}: table scan:\n{text}"
        );
        assert!(text.contains("INDEX items_"), "{sql}: no index:\n{text}");
    }
}

/// The schema version the file of `queue` says it has.
fn user_version(queue: &Queue) -> i64 {
    queue
        .session()
        .unwrap()
        .connection()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap()
}

/// Makes a litework file at schema `version` with the migrations' own
/// SQL, `edit` run in the same transaction.
fn file_at_version(path: &Path, version: usize, edit: impl FnOnce(&Transaction<'_>)) {
    let mut conn = Connection::open(path).unwrap();
    conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
        .unwrap();
    let tx = conn.transaction().unwrap();
    for n in 0..version {
        tx.execute_batch(schema_sql(n)).unwrap();
    }
    tx.pragma_update(None, "user_version", version as i64)
        .unwrap();
    tx.pragma_update(None, "application_id", schema::APPLICATION_ID)
        .unwrap();
    edit(&tx);
    tx.commit().unwrap();
}

#[test]
fn a_version_1_file_is_migrated_with_its_counts_and_waiting_items() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    file_at_version(&path, 1, |tx| {
        // Version 1 kept counts with triggers, and stored "ready" as a
        // run_after in the past.
        let now = now_ms();
        tx.execute_batch(&format!(
            "INSERT INTO items (payload, created_at, run_after) VALUES ('ready', {now}, {now});
             INSERT INTO items (payload, created_at, run_after) VALUES ('later', {now}, {});
             INSERT INTO items (payload, created_at, status, finished_at)
                 VALUES ('old', {now}, 'done', {now});",
            now + 3_600_000
        ))
        .unwrap();
    });
    let queue = Queue::open(&path).unwrap();
    let mut s = queue.session().unwrap();
    assert_eq!(user_version(&queue), schema::latest());
    assert_eq!(real_counts(&queue), kept_counts(&queue));
    let claimed = queue.claim("w", 10, LEASE).unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].payload, b"ready");
    assert!(s.next_ready_at().unwrap().is_some(), "'later' still waits");
    assert_eq!(real_counts(&queue), kept_counts(&queue));
}

/// The SQL of migration `n`.
fn schema_sql(n: usize) -> &'static str {
    match schema::MIGRATIONS[n] {
        schema::Migration::Sql(sql) => sql,
        schema::Migration::Code(_) => panic!("migration {n} is code"),
    }
}

/// Files made by the builds that wrote versions 1 and 2 before they were
/// final lack a column (`workers.finished`, `items.given_back`): version 3
/// adds it, and the writes that use it work.
#[test]
fn files_made_before_a_version_was_final_get_its_missing_column() {
    for (version, table, column) in [(1, "workers", "finished"), (2, "items", "given_back")] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("early.db");
        file_at_version(&path, version, |tx| {
            tx.execute_batch(&format!("ALTER TABLE {table} DROP COLUMN {column}"))
                .unwrap();
        });
        let queue = Queue::open(&path).unwrap();
        add(&queue, &["a"]);
        assert_eq!(user_version(&queue), schema::latest());
        // Uses workers.finished (the turn) and items.given_back (the
        // requeue, with a running file, of an item claimed and never
        // started).
        register(&queue, "w");
        let job = queue.claim("w", 1, LEASE).unwrap().remove(0);
        let done = Completion::Done { result: Vec::new() };
        let turn = Turn {
            finished: vec![(job, done)],
            ..Turn::default()
        };
        queue.session().unwrap().turn("w", LEASE, &turn).unwrap();
        add(&queue, &["b"]);
        queue.claim("w", 1, LEASE).unwrap();
        std::mem::forget(running::RunningSlots::create(&path, "w", 1, LIMIT).unwrap());
        let moved = queue.requeue_worker("w").unwrap();
        assert_eq!(moved.never_started, 1);
        assert_eq!(real_counts(&queue), kept_counts(&queue));
    }
}

#[test]
fn recount_repairs_counts_after_a_hand_edit() {
    let (_dir, queue) = fresh();
    add(&queue, &["a", "b", "c"]);
    let mut s = queue.session().unwrap();
    s.connection()
        .execute("UPDATE items SET status = 'done' WHERE id = 1", [])
        .unwrap();
    assert_ne!(real_counts(&queue), kept_counts(&queue));
    s.recount().unwrap();
    assert_eq!(real_counts(&queue), kept_counts(&queue));
}

#[test]
fn recording_a_batch_looks_rows_up_by_id() {
    let (_dir, queue) = fresh();
    let plan = plan(&queue, &sql::complete(3), 10);
    let text = plan.join("\n");
    assert!(
        plan.iter()
            .any(|l| l.contains("SEARCH items USING INTEGER PRIMARY KEY")),
        "plan:\n{text}"
    );
    assert!(
        !plan.iter().any(|l| l.starts_with("SCAN items")),
        "table scan in plan:\n{text}"
    );
}

#[test]
fn a_batch_with_the_same_item_under_two_leases_records_only_the_live_one() {
    let (_dir, queue) = fresh();
    add(&queue, &["a", "b", "c"]);
    let old = queue.claim("w", 1, LEASE).unwrap().remove(0);
    // The lease expired and the same worker claimed the item again.
    queue.session().unwrap().requeue_worker("w").unwrap();
    let mut others = queue.claim("w", 3, LEASE).unwrap();
    let new = others.remove(0);
    assert_eq!(old.id, new.id);
    let done = |job: &Job, result: &str| {
        (
            job.clone(),
            Completion::Done {
                result: result.as_bytes().to_vec(),
            },
        )
    };
    let turn = Turn {
        // Four successes go in one statement.
        finished: vec![
            done(&old, "stale"),
            done(&new, "fresh"),
            done(&others[0], "b"),
            done(&others[1], "c"),
        ],
        ..Turn::default()
    };
    let result = queue.session().unwrap().turn("w", LEASE, &turn).unwrap();
    let recorded: Vec<Recorded> = result.recorded.iter().map(|&(_, r)| r).collect();
    assert_eq!(
        recorded,
        [
            Recorded::LeaseLost,
            Recorded::Recorded,
            Recorded::Recorded,
            Recorded::Recorded
        ]
    );
    let rows = queue.session().unwrap().list(None, None).unwrap();
    assert_eq!(rows[0].result.as_deref(), Some(&b"fresh"[..]));
    assert_eq!(real_counts(&queue), kept_counts(&queue));
}

#[test]
fn a_dead_worker_is_charged_only_for_the_items_it_was_running() {
    let (dir, queue) = fresh();
    add(&queue, &["a", "b", "c", "d"]);
    register(&queue, "w");
    let held = queue.claim("w", 4, LEASE).unwrap();
    // Its executors ran "b" and "d"; "a" and "c" waited for one.
    let db = dir.path().join("q.db");
    let slots = running::RunningSlots::create(&db, "w", 2, LIMIT).unwrap();
    slots.set(0, held[1].id, held[1].token);
    slots.set(1, held[3].id, held[3].token);
    std::mem::forget(slots); // it died: the file stays
    let moved = queue.requeue_worker("w").unwrap();
    assert_eq!(
        moved,
        Requeued {
            pending: 4,
            failed: 0,
            never_started: 2
        }
    );
    let rows = queue.session().unwrap().list(None, None).unwrap();
    let attempts: Vec<i64> = rows.iter().map(|r| r.attempts).collect();
    assert_eq!(attempts, [0, 1, 0, 1]);
    let s = queue.session().unwrap();
    let mut stmt = s
        .connection()
        .prepare("SELECT item_id FROM attempts WHERE outcome = 'lost' ORDER BY item_id")
        .unwrap();
    let lost: Vec<i64> = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(lost, [held[1].id, held[3].id]);
    assert_eq!(real_counts(&queue), kept_counts(&queue));
    assert_eq!(running::read_slots(&db, "w"), None, "the file is removed");
}

#[test]
fn an_item_held_at_every_death_is_charged_in_the_end() {
    let (dir, queue) = fresh();
    let items = [Ok(NewItem {
        max_attempts: Some(2),
        ..NewItem::new("huge")
    })];
    queue.add(items, 3).unwrap();
    let db = dir.path().join("q.db");
    let mut after = Vec::new();
    for death in 0..3 {
        let id = format!("w{death}");
        register(&queue, &id);
        queue.claim(&id, 1, LEASE).unwrap();
        // Its executors never got to run it.
        std::mem::forget(running::RunningSlots::create(&db, &id, 1, LIMIT).unwrap());
        queue.requeue_worker(&id).unwrap();
        let row = &queue.session().unwrap().list(None, None).unwrap()[0];
        after.push((row.status.clone(), row.attempts));
    }
    // Given back twice (max_attempts), then charged: attempts 1, then 2 and
    // out of attempts. Only the charged ones are in the history.
    assert_eq!(
        after,
        [
            ("pending".to_string(), 0),
            ("pending".to_string(), 0),
            ("pending".to_string(), 1)
        ]
    );
    register(&queue, "w3");
    queue.claim("w3", 1, LEASE).unwrap();
    std::mem::forget(running::RunningSlots::create(&db, "w3", 1, LIMIT).unwrap());
    queue.requeue_worker("w3").unwrap();
    let row = &queue.session().unwrap().list(None, None).unwrap()[0];
    assert_eq!((row.status.as_str(), row.attempts), ("failed", 2));
    assert!(
        row.last_error
            .as_deref()
            .unwrap_or("")
            .contains("each time it died"),
        "{row:?}"
    );
    let history: Vec<(i64, String, String)> = queue
        .session()
        .unwrap()
        .connection()
        .prepare("SELECT attempt, worker, error FROM attempts ORDER BY rowid")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    let held = |attempt, worker: &str, times| {
        let error = format!("held by worker {worker} each time it died ({times} times)");
        (attempt, worker.to_string(), error)
    };
    assert_eq!(history, [held(1, "w2", 3), held(2, "w3", 4)]);
    assert_eq!(real_counts(&queue), kept_counts(&queue));
}

/// A worker shown waiting for the lock since T keeps the leases that
/// expired during that wait, not those that expired before it began.
/// A worker's wait for the write lock, as written in its running file.
const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn a_sweep_spares_only_the_leases_that_expired_while_their_owner_waited() {
    let (dir, queue) = fresh();
    add(&queue, &["before", "during"]);
    let db = dir.path().join("q.db");
    register(&queue, "w");
    queue.claim("w", 2, LEASE).unwrap();
    let slots = running::RunningSlots::create(&db, "w", 2, LIMIT).unwrap();
    slots.set(0, 1, 1);
    slots.set(1, 2, 1);
    let now = now_ms();
    let since = now - 5_000;
    slots.writing(Some(since));
    let s = queue.session().unwrap();
    s.connection()
        .execute(
            "UPDATE items SET lease_expires = CASE id WHEN 1 THEN ?1 ELSE ?2 END",
            params![since - 1_000, since + 1_000],
        )
        .unwrap();
    let moved = queue.requeue_expired().unwrap();
    assert_eq!(moved.total(), 1);
    let rows = queue.session().unwrap().list(None, None).unwrap();
    let states: Vec<(&[u8], &str)> = rows
        .iter()
        .map(|r| (r.payload.as_slice(), r.status.as_str()))
        .collect();
    assert_eq!(
        states,
        [(&b"before"[..], "pending"), (&b"during"[..], "running")]
    );
    // Once it may no longer be waiting, the other goes too.
    slots.writing(Some(now - 70_000));
    assert_eq!(queue.requeue_expired().unwrap().total(), 1);
}

#[test]
fn a_running_file_of_another_machine_is_not_trusted() {
    let (dir, queue) = fresh();
    add(&queue, &["a", "b"]);
    queue
        .session()
        .unwrap()
        .register_worker(&WorkerInfo {
            id: "far".into(),
            pid: 1,
            host: "another-machine".into(),
            metrics_addr: None,
        })
        .unwrap();
    queue.claim("far", 2, LEASE).unwrap();
    let db = dir.path().join("q.db");
    std::mem::forget(running::RunningSlots::create(&db, "far", 1, LIMIT).unwrap());
    let moved = queue.requeue_worker("far").unwrap();
    assert_eq!(moved.never_started, 0, "both charged: {moved:?}");
    let rows = queue.session().unwrap().list(None, None).unwrap();
    assert!(rows.iter().all(|r| r.attempts == 1), "{rows:?}");
}

#[test]
fn commits_keep_checkpointing_and_count_the_time_they_held_the_lock() {
    // litework's commit hook stands in for SQLite's automatic checkpoint:
    // if it stopped checkpointing, the WAL would grow by every commit.
    let (dir, queue) = fresh();
    let mut session = queue.session().unwrap();
    let held_before = busy::held();
    let commits = 1500;
    for i in 0..commits {
        let item = NewItem::new(format!("{i:0>200}").into_bytes());
        session.add([Ok(item)], 3).unwrap();
    }
    let frames = session
        .connection()
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1))
        .unwrap();
    // Each commit writes at least two pages (the items and the counts);
    // without checkpoints the log would hold them all.
    let wal = std::fs::metadata(dir.path().join("q.db-wal"))
        .unwrap()
        .len();
    assert!(
        frames < 1200 && wal < 1200 * 4200,
        "{frames} frames, {wal} bytes of WAL after {commits} commits"
    );
    assert!(busy::held() > held_before);

    // The hook, not SQLite's own, ran: it marked when the lock was let go.
    let taken = busy::taken();
    session
        .connection()
        .execute_batch("INSERT INTO throughput (second) VALUES (0)")
        .unwrap();
    assert!(busy::released_since_taken());
    busy::let_go(taken);
}

#[test]
fn claims_of_different_sizes_reuse_the_compiled_statements() {
    // Each turn claims as many items as the worker has room for, a number
    // that changes from turn to turn; a statement compiled again for each
    // new number costs more than the claim itself on small turns.
    let (_dir, queue) = fresh();
    let payloads: Vec<String> = (0..20).map(|i| format!("item {i}")).collect();
    add(
        &queue,
        &payloads.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut session = queue.session().unwrap();
    let mut held: Vec<Job> = Vec::new();
    for n in [1, 3, 2, 5, 4] {
        let finished = held
            .drain(..)
            .map(|job| {
                let result = format!("result of {}", job.id).into_bytes();
                (job, Completion::Done { result })
            })
            .collect();
        let turn = Turn {
            finished,
            claim: n,
            ..Turn::default()
        };
        held = session.turn("w1", LEASE, &turn).unwrap().claimed;
        assert_eq!(held.len(), n);
    }
    let status = queue.status().unwrap();
    assert_eq!((status.done, status.running), (11, 4));
    for sql in [sql::READY, sql::LEASE, &sql::complete(4), &sql::complete(1)] {
        let stmt = session.connection().prepare_cached(sql).unwrap();
        let again = stmt.get_status(rusqlite::StatementStatus::RePrepare);
        assert_eq!(again, 0, "compiled {again} more times:{sql}");
    }
}

#[test]
fn a_short_claim_and_a_look_say_what_they_saw_and_another_commit_moves_it() {
    let (dir, queue) = fresh();
    add(&queue, &["a"]);
    let mut session = queue.session().unwrap();
    let turn = Turn {
        claim: 5,
        ..Turn::default()
    };
    let result = session.turn("w1", LEASE, &turn).unwrap();
    assert_eq!(result.claimed.len(), 1);
    let seen = result.short.expect("a short claim says what it saw");
    assert!(!seen.ready);
    assert_eq!(seen.next_ready_at, None);
    // Our own commit left it where the claim read it.
    assert_eq!(session.data_version().unwrap(), seen.data_version);
    let full = session.turn("w1", LEASE, &Turn::default()).unwrap();
    assert_eq!(full.short, None, "no claim, nothing to say");

    // Another connection adds: the version moves, and a look (no write
    // lock) finds the item ready, at the version it read it.
    let other = Queue::open(dir.path().join("q.db")).unwrap();
    add(&other, &["b"]);
    let now = session.data_version().unwrap();
    assert_ne!(now, seen.data_version);
    let look = session.look().unwrap();
    assert!(look.ready);
    assert_eq!(look.data_version, now);
    assert_eq!(session.turn("w1", LEASE, &turn).unwrap().claimed.len(), 1);
    assert!(!session.look().unwrap().ready);

    // A retry recorded in a short claim's turn is what comes due next, in
    // what the claim saw and in what a look sees.
    let later = now_ms() + 3_600_000;
    let a = result.claimed[0].clone();
    let retry = Turn {
        finished: vec![(
            a,
            Completion::Retry {
                error: "again".into(),
                kind: FailureKind::Error,
                run_after: later,
            },
        )],
        claim: 5,
        ..Turn::default()
    };
    let retried = session.turn("w1", LEASE, &retry).unwrap();
    assert_eq!(
        retried.recorded,
        [(result.claimed[0].id, Recorded::Recorded)]
    );
    assert!(retried.claimed.is_empty());
    let seen = retried.short.expect("a short claim says what it saw");
    assert!(!seen.ready);
    assert_eq!(seen.next_ready_at, Some(later));
    let look = session.look().unwrap();
    assert!(!look.ready);
    assert_eq!(look.next_ready_at, Some(later));
}
