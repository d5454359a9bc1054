//! The database service as tenant code and operators meet it: real SQLite files on disk, the
//! D1 wire protocol over HTTP, limits and refusals.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tollgate_database::service::decode;
use tollgate_database::{
    Databases, Grant, Limits, Meter, MeterRefusal, ResultsFormat, Service, Statement, TOKEN_HEADER,
    run_exec, run_query,
};

fn st(sql: &str, params: Value) -> Statement {
    serde_json::from_value(json!({"sql": sql, "params": params})).unwrap()
}

fn dbs(limits: Limits) -> (tempfile::TempDir, Arc<Databases>) {
    let dir = tempfile::tempdir().unwrap();
    let d = Databases::open(dir.path().join("db"), limits).unwrap();
    (dir, d)
}

#[test]
fn batch_applies_together_and_reports_rows() {
    let (_dir, d) = dbs(Limits::default());
    let db = d.get("p1").unwrap();
    run_exec(
        &db,
        &[st(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)",
            json!([]),
        )],
    )
    .unwrap();
    let done = run_query(
        &db,
        &[
            st("INSERT INTO t (name) VALUES (?1), (?2)", json!(["a", "b"])),
            st("SELECT id, name FROM t ORDER BY id", json!([])),
        ],
        ResultsFormat::RowsAndColumns,
    )
    .unwrap();
    assert_eq!(done.results[0].meta.rows_written, 2);
    assert_eq!(done.results[0].meta.changes, 2);
    assert_eq!(done.results[0].meta.last_row_id, 2);
    assert!(done.results[0].meta.changed_db);
    assert_eq!(
        done.results[1].results,
        json!({"columns": ["id", "name"], "rows": [[1, "a"], [2, "b"]]})
    );
    assert_eq!(done.results[1].meta.rows_read, 2);
    assert_eq!(done.rows_written, 2);
    assert_eq!(
        done.rows_read,
        2 + 2,
        "the insert read the rows it wrote, the select both"
    );
    assert!(done.results[1].meta.size_after > 0);

    // A failing statement undoes the whole batch.
    let err = run_query(
        &db,
        &[
            st("INSERT INTO t (name) VALUES ('c')", json!([])),
            st("INSERT INTO missing VALUES (1)", json!([])),
        ],
        ResultsFormat::None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("no such table: missing"), "{err}");
    let n = run_query(
        &db,
        &[st("SELECT count(*) AS n FROM t", json!([]))],
        ResultsFormat::ArrayOfObjects,
    )
    .unwrap();
    assert_eq!(n.results[0].results, json!([{"n": 2}]));
}

#[test]
fn a_full_scan_counts_every_row_it_reads() {
    let (_dir, d) = dbs(Limits::default());
    let db = d.get("scan").unwrap();
    run_exec(
        &db,
        &[st(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER);\n\
             WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000) \
             INSERT INTO t (v) SELECT x FROM c",
            json!([]),
        )],
    )
    .unwrap();
    let point = run_query(
        &db,
        &[st("SELECT v FROM t WHERE id = 500", json!([]))],
        ResultsFormat::RowsAndColumns,
    )
    .unwrap();
    assert_eq!(point.rows_read, 1);
    let scan = run_query(
        &db,
        &[st("SELECT v FROM t WHERE v = 500", json!([]))],
        ResultsFormat::RowsAndColumns,
    )
    .unwrap();
    assert!(
        scan.rows_read >= 999,
        "a scan of 1000 rows read {}",
        scan.rows_read
    );
    let upd = run_query(
        &db,
        &[st("UPDATE t SET v = 0 WHERE id <= 10", json!([]))],
        ResultsFormat::None,
    )
    .unwrap();
    assert_eq!(upd.rows_written, 10);
}

#[test]
fn statements_that_could_escape_the_database_are_refused() {
    let (dir, d) = dbs(Limits::default());
    let db = d.get("p1").unwrap();
    let outside = dir.path().join("stolen.sqlite");
    let refused = [
        format!("ATTACH DATABASE '{}' AS x", outside.display()),
        format!("VACUUM INTO '{}'", outside.display()),
        format!("/* hide */ vacuum into '{}'", outside.display()),
        "PRAGMA journal_mode = DELETE".into(),
        "PRAGMA writable_schema = ON".into(),
        "PRAGMA max_page_count = 999999999".into(),
        "SELECT load_extension('/tmp/x.so')".into(),
        "BEGIN".into(),
        "CREATE VIRTUAL TABLE f USING fts3tokenize(simple)".into(),
    ];
    for sql in &refused {
        let err = run_query(&db, &[st(sql, json!([]))], ResultsFormat::None).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("not allowed")
                || msg.contains("not authorized")
                || msg.contains("too many attached"),
            "{sql}: {msg}"
        );
    }
    assert!(
        !outside.exists(),
        "nothing was written outside the database"
    );
    // What D1 allows still works.
    run_exec(
        &db,
        &[st(
            "CREATE TABLE t (a); CREATE VIRTUAL TABLE s USING fts5(body)",
            json!([]),
        )],
    )
    .unwrap();
    let info = run_query(
        &db,
        &[st("PRAGMA table_info(t)", json!([]))],
        ResultsFormat::ArrayOfObjects,
    )
    .unwrap();
    assert_eq!(info.results[0].results[0]["name"], "a");
}

#[test]
fn no_statement_can_exhaust_memory_disk_or_the_stack() {
    let (_dir, d) = dbs(Limits::default());
    let db = d.get("p1").unwrap();
    // Values are capped at 2 MB (D1's limit): no 500 MB blob, in a result or a table.
    for sql in [
        "SELECT zeroblob(500000000)",
        "SELECT randomblob(3000000)",
        "SELECT printf('%.*c', 100000000, 'x')",
    ] {
        let err = run_query(&db, &[st(sql, json!([]))], ResultsFormat::RowsAndColumns).unwrap_err();
        assert!(err.to_string().contains("too big"), "{sql}: {err}");
    }
    // Temporary tables sit outside the size cap: refused.
    let err = run_query(
        &db,
        &[st(
            "CREATE TEMP TABLE x AS SELECT zeroblob(1000) AS b",
            json!([]),
        )],
        ResultsFormat::None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("not allowed"), "{err}");
    // Thousands of statements in one prepare() are refused without recursion.
    let many = "SELECT 1;".repeat(11_000);
    let err = run_query(&db, &[st(&many, json!([]))], ResultsFormat::None).unwrap_err();
    assert!(
        err.to_string().contains("one statement per prepare"),
        "{err}"
    );
    // A trailing semicolon is still one statement; exec() skips blank lines.
    run_query(&db, &[st("SELECT 1;", json!([]))], ResultsFormat::None).unwrap();
    let lines: Vec<Statement> = ["CREATE TABLE t (a)", "", "INSERT INTO t VALUES (1);"]
        .iter()
        .map(|l| st(l, json!([])))
        .collect();
    assert_eq!(run_exec(&db, &lines).unwrap().results.len(), 2);
    // Column names count toward the result size, once per row for objects.
    let small = Databases::open(
        _dir.path().join("small"),
        Limits {
            max_result_bytes: 200_000,
            ..Limits::default()
        },
    )
    .unwrap();
    let sdb = small.get("p").unwrap();
    let long = "n".repeat(1000);
    let sql = format!(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000) SELECT NULL AS \"{long}\" FROM c"
    );
    let err = run_query(&sdb, &[st(&sql, json!([]))], ResultsFormat::ArrayOfObjects).unwrap_err();
    assert!(err.to_string().contains("result too large"), "{err}");
}

#[test]
fn writes_past_the_size_cap_fail_and_reads_keep_working() {
    let (_dir, d) = dbs(Limits {
        max_size_bytes: 256 * 1024,
        ..Limits::default()
    });
    let db = d.get("small").unwrap();
    run_exec(&db, &[st("CREATE TABLE t (b BLOB)", json!([]))]).unwrap();
    let blob: Vec<u8> = vec![7; 16 * 1024];
    let mut full = None;
    for i in 0..64 {
        match run_query(
            &db,
            &[st("INSERT INTO t VALUES (?1)", json!([blob]))],
            ResultsFormat::None,
        ) {
            Ok(_) => {}
            Err(e) => {
                full = Some((i, e.to_string()));
                break;
            }
        }
    }
    let (i, msg) = full.expect("the cap stops writes");
    assert!(
        i > 4 && msg.contains("database is full"),
        "after {i}: {msg}"
    );
    let n = run_query(
        &db,
        &[st("SELECT count(*) FROM t", json!([]))],
        ResultsFormat::RowsAndColumns,
    )
    .unwrap();
    assert_eq!(n.results[0].results["rows"][0][0], json!(i));
    // A host low on disk pauses every database's writes; reads go on.
    d.check_disk(u64::MAX).unwrap();
    let err = run_query(&db, &[st("DELETE FROM t", json!([]))], ResultsFormat::None).unwrap_err();
    assert!(err.to_string().contains("low on disk"), "{err}");
    run_query(
        &db,
        &[st("SELECT count(*) FROM t", json!([]))],
        ResultsFormat::None,
    )
    .unwrap();
    assert!(d.check_disk(0).unwrap() > 0);
    // Deleting rows makes room again.
    run_query(&db, &[st("DELETE FROM t", json!([]))], ResultsFormat::None).unwrap();
    run_query(
        &db,
        &[st("INSERT INTO t VALUES (?1)", json!([blob]))],
        ResultsFormat::None,
    )
    .unwrap();
}

#[test]
fn long_queries_are_interrupted_and_big_results_refused() {
    let (_dir, d) = dbs(Limits {
        query_timeout: Duration::from_millis(200),
        max_result_bytes: 100_000,
        ..Limits::default()
    });
    let db = d.get("p1").unwrap();
    let t = std::time::Instant::now();
    let err = run_query(
        &db,
        &[st("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c", json!([]))],
        ResultsFormat::RowsAndColumns,
    )
    .unwrap_err();
    assert!(err.to_string().contains("interrupted"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5));
    let err = run_query(
        &db,
        &[st("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100000) SELECT x, 'some text' FROM c", json!([]))],
        ResultsFormat::RowsAndColumns,
    )
    .unwrap_err();
    assert!(err.to_string().contains("result too large"), "{err}");
    // The connection is usable afterwards.
    run_query(
        &db,
        &[st("SELECT 1", json!([]))],
        ResultsFormat::RowsAndColumns,
    )
    .unwrap();
}

#[test]
fn data_survives_a_reopen_projects_are_apart_and_delete_removes_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("db");
    {
        let d = Databases::open(&root, Limits::default()).unwrap();
        for (p, v) in [("a", "from a"), ("b", "from b")] {
            let db = d.get(p).unwrap();
            run_exec(&db, &[st("CREATE TABLE t (v TEXT)", json!([]))]).unwrap();
            run_query(
                &db,
                &[st("INSERT INTO t VALUES (?1)", json!([v]))],
                ResultsFormat::None,
            )
            .unwrap();
        }
        d.close_all();
    }
    let d = Databases::open(&root, Limits::default()).unwrap();
    assert_eq!(d.list().unwrap(), vec!["a".to_string(), "b".to_string()]);
    let a = run_query(
        &d.get("a").unwrap(),
        &[st("SELECT v FROM t", json!([]))],
        ResultsFormat::RowsAndColumns,
    )
    .unwrap();
    assert_eq!(a.results[0].results["rows"], json!([["from a"]]));
    let info = d.info("b").unwrap().unwrap();
    assert_eq!(info.tables.len(), 1);
    assert_eq!(
        (info.tables[0].name.as_str(), info.tables[0].rows),
        ("t", 1)
    );

    let backup = dir.path().join("b-backup.sqlite");
    d.backup("b", &backup).unwrap();
    let copy = rusqlite_count(&backup);
    assert_eq!(copy, 1);

    assert!(d.delete("b").unwrap());
    assert!(!d.delete("b").unwrap(), "deleting twice is a no-op");
    assert!(!root.join("b.sqlite").exists() && !root.join("b.sqlite-wal").exists());
    assert!(d.info("b").unwrap().is_none());
    assert!(d.get("../a").is_err(), "a path is not a project");
}

fn rusqlite_count(path: &std::path::Path) -> i64 {
    let d = Databases::open(path.parent().unwrap().join("check"), Limits::default()).unwrap();
    std::fs::copy(path, path.parent().unwrap().join("check/c.sqlite")).unwrap();
    let r = run_query(
        &d.get("c").unwrap(),
        &[st("SELECT count(*) FROM t", json!([]))],
        ResultsFormat::RowsAndColumns,
    )
    .unwrap();
    r.results[0].results["rows"][0][0].as_i64().unwrap()
}

#[test]
fn request_decoding_never_panics() {
    // A cheap deterministic fuzz of the body decoder (the cargo-fuzz target runs longer).
    let seeds: [&[u8]; 6] = [
        br#"{"sql":"select 1","params":[1,"a",null,[1,2]]}"#,
        br#"[{"sql":"a"},{"sql":"b","params":[]}]"#,
        b"[",
        b"{}",
        b"\xff\xfe",
        br#"{"sql":1}"#,
    ];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for seed in seeds {
        assert!(decode(seed).is_ok() || !seed.is_empty());
        for _ in 0..2000 {
            let mut b = seed.to_vec();
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if b.is_empty() {
                    break;
                }
                let i = (x as usize) % b.len();
                match x % 3 {
                    0 => b[i] = (x >> 8) as u8,
                    1 => {
                        b.remove(i);
                    }
                    _ => b.insert(i, (x >> 16) as u8),
                }
            }
            let _ = decode(&b);
        }
    }
    assert_eq!(decode(br#"{"sql":"x"}"#).unwrap().len(), 1);
    assert!(decode(br#"{"sql":1}"#).is_err());
}

/// Records charges; refuses accounts listed as suspended.
#[derive(Default)]
struct TestMeter {
    charged: Mutex<Vec<(String, u64, u64)>>,
    /// CPU charged with each charge, in the same order.
    cpu: Mutex<Vec<u64>>,
    suspended: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Meter for TestMeter {
    async fn admit(&self, account: &str) -> Result<(), MeterRefusal> {
        if self.suspended.lock().unwrap().iter().any(|a| a == account) {
            Err(MeterRefusal::Suspended)
        } else {
            Ok(())
        }
    }
    fn charge(&self, account: &str, r: u64, w: u64, cpu_us: u64) {
        self.charged.lock().unwrap().push((account.into(), r, w));
        self.cpu.lock().unwrap().push(cpu_us);
    }
}

fn service(d: &Arc<Databases>, meter: &Arc<TestMeter>) -> Arc<Service> {
    Service::new(
        d.clone(),
        meter.clone(),
        None,
        tollgate_database::DbMetrics::unregistered().unwrap(),
    )
}

#[tokio::test]
async fn the_http_service_runs_only_granted_projects_and_charges_what_it_reports() {
    let (_dir, d) = dbs(Limits::default());
    let meter = Arc::new(TestMeter::default());
    let registry = prometheus::Registry::new();
    let metrics = tollgate_database::DbMetrics::new(&registry).unwrap();
    let svc = Service::new(d.clone(), meter.clone(), None, metrics.clone());
    let token_a = svc.grant("pa", "acct-a");
    let token_b = svc.grant("pb", "acct-b");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = svc.router();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let http = reqwest::Client::new();
    let post = |path: &str, token: Option<&str>, body: Value| {
        let mut r = http.post(format!("http://{addr}{path}")).json(&body);
        if let Some(t) = token {
            r = r.header(TOKEN_HEADER, t);
        }
        r.send()
    };

    let r = post(
        "/execute?resultsFormat=NONE",
        Some(&token_a),
        json!([{"sql": "CREATE TABLE t (v)"}, {"sql": "INSERT INTO t VALUES (1), (2)"}]),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body[1]["meta"]["rows_written"], 2);
    let r: Value = post(
        "/query?resultsFormat=ROWS_AND_COLUMNS",
        Some(&token_a),
        json!({"sql": "SELECT v FROM t WHERE v = ?1", "params": [2]}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(r[0]["success"], true);
    assert_eq!(r[0]["results"]["rows"], json!([[2]]));

    // Project B's token reaches B's database, where no table `t` exists.
    let r: Value = post("/query", Some(&token_b), json!({"sql": "SELECT v FROM t"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["success"], false);
    assert!(
        r["error"].as_str().unwrap().contains("no such table: t"),
        "{r}"
    );
    // No token, or a made-up one: refused, nothing created.
    for t in [None, Some("0123456789abcdef0123456789abcdef")] {
        let r = post("/query", t, json!({"sql": "CREATE TABLE x (a)"}))
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
    }
    assert_eq!(d.list().unwrap(), vec!["pa".to_string(), "pb".to_string()]);
    // Bad bodies get a clear error.
    let r = http
        .post(format!("http://{addr}/query"))
        .header(TOKEN_HEADER, &token_a)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // What was charged is exactly what the meta reported.
    let charged = meter.charged.lock().unwrap().clone();
    let a: (u64, u64) = charged
        .iter()
        .filter(|c| c.0 == "acct-a")
        .fold((0, 0), |s, c| (s.0 + c.1, s.1 + c.2));
    assert_eq!(a, (2 + 1, 2), "insert: 2 read, 2 written; point read: 1");

    // A suspended owner's queries fail with a clear error and nothing runs.
    meter.suspended.lock().unwrap().push("acct-a".into());
    let r: Value = post("/query", Some(&token_a), json!({"sql": "DELETE FROM t"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["success"], false);
    assert!(
        r["error"].as_str().unwrap().contains("no balance left"),
        "{r}"
    );
    meter.suspended.lock().unwrap().clear();
    let r: Value = post(
        "/query?resultsFormat=ROWS_AND_COLUMNS",
        Some(&token_a),
        json!({"sql": "SELECT count(*) FROM t"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(r[0]["results"]["rows"], json!([[2]]));

    // The metrics count the same: results by label, rows as charged.
    let by = |r: &str| metrics.queries_total.with_label_values(&[r]).get();
    assert_eq!(by("suspended"), 1);
    assert_eq!(by("sql_error"), 1, "project B's missing table");
    assert_eq!(by("refused"), 2, "no token and a made-up one");
    assert_eq!(by("bad_request"), 1);
    assert_eq!(by("ok"), 3);
    let charged = meter.charged.lock().unwrap().clone();
    assert_eq!(
        metrics.rows_read_total.get(),
        charged.iter().map(|c| c.1).sum::<u64>()
    );
    assert_eq!(
        metrics.rows_written_total.get(),
        charged.iter().map(|c| c.2).sum::<u64>()
    );
    let names: Vec<String> = registry
        .gather()
        .iter()
        .map(|f| f.name().to_owned())
        .collect();
    assert!(
        names.contains(&"tollgate_database_queries_total".to_owned()),
        "{names:?}"
    );

    // Revoking a project's grants (it is being deleted) shuts its deployments out.
    svc.revoke_project("pa");
    let r = post("/query", Some(&token_a), json!({"sql": "SELECT 1"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let _ = Grant {
        project: String::new(),
        account: String::new(),
    };
}

/// Heavy queries pay for their CPU past the allowance; a caller that gives up does not stop
/// the charge (the query ran).
#[tokio::test]
async fn heavy_queries_pay_their_cpu_and_abandoned_ones_are_still_charged() {
    let (_dir, d) = dbs(Limits::default());
    let meter = Arc::new(TestMeter::default());
    let svc = service(&d, &meter);
    let g = Grant {
        project: "p".into(),
        account: "acct".into(),
    };
    // count(*) over a recursive CTE: one row returned, millions of VM steps.
    let heavy = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000000) SELECT count(*) FROM c";
    svc.run(
        &g,
        vec![st(heavy, json!([])).clone()],
        ResultsFormat::RowsAndColumns,
        false,
    )
    .await
    .unwrap();
    let cpu = meter.cpu.lock().unwrap()[0];
    assert!(
        cpu > 10_000,
        "a query of well over 10 ms of CPU charged {cpu} µs"
    );
    // A point-sized query pays rows only.
    svc.run(
        &g,
        vec![st("SELECT 1", json!([]))],
        ResultsFormat::RowsAndColumns,
        false,
    )
    .await
    .unwrap();
    assert_eq!(meter.cpu.lock().unwrap()[1], 0);
    // The caller goes away mid-query: the query finishes and is charged anyway.
    let svc2 = svc.clone();
    let g2 = g.clone();
    let call = tokio::spawn(async move {
        svc2.run(
            &g2,
            vec![st(heavy, json!([]))],
            ResultsFormat::RowsAndColumns,
            false,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    call.abort();
    let t = std::time::Instant::now();
    while meter.cpu.lock().unwrap().len() < 3 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the abandoned query was not charged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn inspection_is_read_only_and_row_limited() {
    let (_dir, d) = dbs(Limits::default());
    let meter = Arc::new(TestMeter::default());
    let svc = service(&d, &meter);
    let g = Grant {
        project: "p".into(),
        account: "acct".into(),
    };
    let missing = svc.inspect(&g, "SELECT 1", 10).await.unwrap_err();
    assert!(missing.to_string().contains("has no database"), "{missing}");
    assert!(d.list().unwrap().is_empty(), "looking creates nothing");
    svc.run(&g, vec![st("CREATE TABLE t (v)", json!([])), st("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 50) INSERT INTO t SELECT x FROM c", json!([]))], ResultsFormat::None, false).await.unwrap();
    let r = svc
        .inspect(&g, "SELECT v FROM t ORDER BY v", 10)
        .await
        .unwrap();
    assert_eq!(r.results[0].results["rows"].as_array().unwrap().len(), 10);
    let err = svc.inspect(&g, "DELETE FROM t", 10).await.unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
    // A `;` inside a string literal is still one statement.
    let r = svc
        .inspect(&g, "SELECT count(*) FROM t WHERE 'a;b' <> ''", 10)
        .await
        .unwrap();
    assert_eq!(r.results[0].results["rows"], json!([[50]]));
}
