//! A project's SQL database as an agent meets it, with the real binary, workerd, the official
//! MCP TypeScript SDK client and Redis: a Hono guestbook on `env.DB` (D1's API) keeps its rows
//! through an idle stop, a redeploy and a rollback; `get_project` and `query_database` show them;
//! another project cannot reach them; the owner pays for exactly the rows the database counted;
//! `tollgate db backup` copies it; deleting the project deletes it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tollgate_testkit::{RedisServer, free_addr};

mod common;
use common::*;

const ACCOUNT: &str = "acct-db";

fn guestbook(version: &str) -> String {
    format!(
        r#"import {{ Hono }} from 'hono'
const app = new Hono<{{ Bindings: {{ DB: any }} }}>()
app.post('/setup', async (c) => {{
  const rs = await c.env.DB.batch([
    c.env.DB.prepare('CREATE TABLE IF NOT EXISTS entries (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, message TEXT NOT NULL)'),
  ])
  return c.json({{ metas: rs.map((r: any) => r.meta) }})
}})
app.post('/entries', async (c) => {{
  const {{ name, message }} = await c.req.json()
  const r = await c.env.DB.prepare('INSERT INTO entries (name, message) VALUES (?1, ?2)').bind(name, message).run()
  return c.json({{ id: r.meta.last_row_id, metas: [r.meta] }})
}})
app.get('/entries', async (c) => {{
  const r = await c.env.DB.prepare('SELECT id, name, message FROM entries ORDER BY id').all()
  return c.json({{ version: '{version}', entries: r.results, metas: [r.meta] }})
}})
app.onError((e, c) => c.json({{ error: String(e.message ?? e) }}, 500))
export default app
"#
    )
}

/// One MCP tool call through the official SDK client.
fn call(mcp: &str, tool: &str, args: Value) -> Value {
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("mcp/tests/js");
    let out = Command::new("node")
        .arg(js.join("call.mjs"))
        .args([mcp, tool, &args.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{tool}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What the tenant was told its queries read and wrote, summed over `metas`.
#[derive(Default, Debug, PartialEq, Eq, Clone, Copy)]
struct Rows {
    read: u64,
    written: u64,
}

impl Rows {
    fn add_metas(&mut self, body: &Value) {
        for m in body["metas"].as_array().unwrap() {
            self.read += m["rows_read"].as_u64().unwrap();
            self.written += m["rows_written"].as_u64().unwrap();
        }
    }
}

struct Site {
    client: reqwest::blocking::Client,
    url: String,
}

impl Site {
    fn new(url: &str, proxy: SocketAddr) -> Site {
        let host = url
            .trim_start_matches("http://")
            .split(':')
            .next()
            .unwrap()
            .to_owned();
        Site {
            client: reqwest::blocking::Client::builder()
                .resolve(&host, proxy)
                .build()
                .unwrap(),
            url: url.to_owned(),
        }
    }

    fn send(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.url);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let mut req = match method {
                "POST" => self.client.post(&url),
                _ => self.client.get(&url),
            };
            if let Some(b) = &body {
                req = req.json(b);
            }
            match req.send() {
                // 404 while the route propagates; 502/503 while a stopped process starts.
                Ok(r) if ![404, 502, 503].contains(&r.status().as_u16()) => {
                    let status = r.status().as_u16();
                    let text = r.text().unwrap();
                    let v = serde_json::from_str(&text)
                        .unwrap_or_else(|_| panic!("{method} {path}: {status} {text}"));
                    return (status, v);
                }
                _ => {}
            }
            assert!(Instant::now() < deadline, "{method} {url} never answered");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Rows the settled ledger charged `account` (settle lines in the Redis ledger stream).
fn charged_rows(redis: &str, account: &str) -> Rows {
    let client = redis::Client::open(redis).unwrap();
    let mut c = client.get_connection().unwrap();
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("tollgate:ledger")
        .arg("-")
        .arg("+")
        .query(&mut c)
        .unwrap();
    let mut rows = Rows::default();
    for (_, fields) in entries {
        let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.clone());
        if get("kind").as_deref() != Some("settle") {
            continue;
        }
        let lines: Vec<Value> = serde_json::from_str(&get("lines").unwrap()).unwrap();
        for l in lines.iter().filter(|l| l["account"] == account) {
            rows.read += l["rows_read"].as_u64().unwrap_or(0);
            rows.written += l["rows_written"].as_u64().unwrap_or(0);
        }
    }
    rows
}

fn workerd_running(deployment: &str) -> bool {
    let out = Command::new("pgrep")
        .args(["-f", deployment])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    out.status.success()
}

#[test]
fn an_agent_keeps_a_guestbook_in_its_database_and_pays_for_exactly_its_rows() {
    let redis = RedisServer::start();
    let data = tempfile::tempdir().unwrap();
    let cfg = data.path().join("tollgate.toml");
    std::fs::write(&cfg, "[control]\nidle_stop_seconds = 2\n").unwrap();
    let control = free_addr();
    let (mut dev, proxy) = start_listening(|proxy| {
        let mut c = bin();
        c.env("TOLLGATE_DATA_DIR", data.path().join("state"))
            .args(["dev", "--config"])
            .arg(&cfg)
            .args(["--redis", &redis.url(), "--dev-account", ACCOUNT])
            .args(["--chain-listen", &free_addr().to_string()]);
        listen_on(&mut c, proxy, control);
        c
    });
    wait_for_control(control, &mut dev);
    assert!(
        credit_account(&redis.url(), ACCOUNT, "1.00", "db-credit")
            .status
            .success()
    );
    let mcp = format!("http://{control}/mcp");
    let mut told = Rows::default();

    // Deploy with a database bound as DB; write three entries, read them back.
    let deployed = call(
        &mcp,
        "deploy_project",
        json!({"project_name": "guestbook", "databases": ["DB"],
               "files": {"src/index.ts": guestbook("v1")}}),
    );
    assert_eq!(deployed["status"], "live", "{deployed}");
    let project = deployed["project_id"].as_str().unwrap().to_owned();
    let first_deployment = deployed["deployment_id"].as_str().unwrap().to_owned();
    let site = Site::new(deployed["url"].as_str().unwrap(), proxy);
    let (status, body) = site.send("POST", "/setup", None);
    assert_eq!(status, 200, "{body}");
    told.add_metas(&body);
    for (name, message) in [("ann", "hello"), ("bob", "hi there"), ("cy", "third")] {
        let (status, body) = site.send(
            "POST",
            "/entries",
            Some(json!({"name": name, "message": message})),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["metas"][0]["rows_written"], 1, "{body}");
        told.add_metas(&body);
    }
    let names = |body: &Value| -> Vec<String> {
        body["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, body) = site.send("GET", "/entries", None);
    assert_eq!(names(&body), ["ann", "bob", "cy"]);
    assert_eq!(body["metas"][0]["rows_read"], 3, "{body}");
    told.add_metas(&body);

    // An idle stop: the process goes, the data stays; the next request starts it again.
    let deadline = Instant::now() + Duration::from_secs(20);
    while workerd_running(&first_deployment) {
        assert!(
            Instant::now() < deadline,
            "the idle deployment never stopped"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, body) = site.send("GET", "/entries", None);
    assert_eq!(names(&body), ["ann", "bob", "cy"], "after the idle stop");
    told.add_metas(&body);

    // A redeploy keeps the binding (not repeated) and the data.
    let v2 = call(
        &mcp,
        "deploy_project",
        json!({"project_id": project, "changes": {"src/index.ts": guestbook("v2")}}),
    );
    assert_eq!(v2["status"], "live", "{v2}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (_, body) = site.send("GET", "/entries", None);
        told.add_metas(&body);
        if body["version"] == "v2" {
            break body;
        }
        assert!(Instant::now() < deadline, "v2 never served");
    };
    assert_eq!(names(&body), ["ann", "bob", "cy"], "after the redeploy");

    // A rollback runs v1's code again on the same data.
    let back = call(&mcp, "rollback_project", json!({"project_id": project}));
    assert_eq!(back["status"], "live", "{back}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (_, body) = site.send("GET", "/entries", None);
        told.add_metas(&body);
        if body["version"] == "v1" {
            break body;
        }
        assert!(Instant::now() < deadline, "the rollback never served");
    };
    assert_eq!(names(&body), ["ann", "bob", "cy"], "after the rollback");

    // The agent reads its data: query_database (read-only) and get_project.
    let q = call(
        &mcp,
        "query_database",
        json!({"project_id": project, "sql": "SELECT name, message FROM entries ORDER BY id", "max_rows": 2}),
    );
    assert_eq!(q["columns"], json!(["name", "message"]), "{q}");
    assert_eq!(q["rows"], json!([["ann", "hello"], ["bob", "hi there"]]));
    assert_eq!(q["truncated"], true);
    let inspected = q["rows_read"].as_u64().unwrap();
    assert!(inspected >= 2, "{q}");
    let refused = call(
        &mcp,
        "query_database",
        json!({"project_id": project, "sql": "DELETE FROM entries"}),
    );
    assert!(
        refused["error"].as_str().unwrap().contains("read-only"),
        "{refused}"
    );

    // Another project of the same owner has its own, empty database.
    let other = call(
        &mcp,
        "deploy_project",
        json!({"project_name": "other", "databases": ["DB"],
               "files": {"src/index.ts": guestbook("other")}}),
    );
    assert_eq!(other["status"], "live", "{other}");
    let other_site = Site::new(other["url"].as_str().unwrap(), proxy);
    let (status, body) = other_site.send("GET", "/entries", None);
    assert_eq!(status, 500, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("D1_ERROR: no such table: entries"),
        "{body}"
    );

    // The owner paid for exactly the rows the database reported: to the service, and to the
    // agent's query. (Settlement runs every 50 ms; give it a moment.)
    let expected = Rows {
        read: told.read + inspected,
        written: told.written,
    };
    assert!(expected.written >= 3 && expected.read >= 3, "{expected:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let charged = charged_rows(&redis.url(), ACCOUNT);
        if charged == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "charged {charged:?}, the database reported {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let shown = call(&mcp, "get_project", json!({"project_id": project}));
    let db = &shown["database"];
    assert_eq!(db["bindings"], json!(["DB"]), "{shown}");
    assert_eq!(
        db["tables"],
        json!([{"name": "entries", "rows": 3}]),
        "{shown}"
    );
    assert!(db["size_bytes"].as_u64().unwrap() > 0);
    // Rows reach the per-hour counts within a second of the query.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let shown = call(&mcp, "get_project", json!({"project_id": project}));
        let day = &shown["database"]["day"];
        if day["rows_written"].as_u64() == Some(expected.written) {
            assert!(day["cost_usd"].as_str().unwrap() != "0", "{day}");
            break;
        }
        assert!(Instant::now() < deadline, "{shown}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // An operator's backup is a consistent copy.
    let backup = data.path().join("guestbook.sqlite");
    let out = bin()
        .stdout(Stdio::piped())
        .args(["db", "backup", "--dir"])
        .arg(data.path().join("state/databases"))
        .arg(&project)
        .arg(&backup)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let copy = std::fs::read(&backup).unwrap();
    assert!(copy.starts_with(b"SQLite format 3\0") && copy.len() >= 4096);
    let missing = bin()
        .args(["db", "backup", "--dir"])
        .arg(data.path().join("state/databases"))
        .args(["p_nope", "/tmp/never.sqlite"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));

    // Deleting the project deletes its data.
    let file = data
        .path()
        .join(format!("state/databases/{project}.sqlite"));
    assert!(file.exists());
    let deleted = call(&mcp, "delete_project", json!({"project_id": project}));
    assert_eq!(deleted["deleted"], true, "{deleted}");
    assert!(!file.exists(), "the database outlived its project");

    // Readiness follows the control store: a stalled Redis makes /readyz 503, then 200 again.
    let c = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let readyz = || {
        let r = c.get(format!("http://{control}/readyz")).send().unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    assert_eq!(readyz().0, 200);
    redis.pause();
    let (code, body) = readyz();
    redis.resume();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not ready"), "{body}");
    assert_eq!(readyz().0, 200);
    let status = terminate(&mut dev);
    assert!(status.success(), "{status}");
}
