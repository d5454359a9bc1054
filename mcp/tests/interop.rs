//! The official MCP TypeScript SDK client (npm, pinned in mcp/tests/js) runs an agent session
//! against the real server: tools with schemas, deploy with progress, read back, tool errors with
//! {code, message, hint}, ownership, delete. Identity here comes from a test header; the payments
//! layer (issue #5) replaces it with MPP credentials.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tollgate_control::{Control, ControlConfig, ControlStore, RedisControlStore};
use tollgate_mcp::{Caller, Identify, McpConfig, Refusal, ToolFailure};
use tollgate_routes::RouteStore;
use tollgate_runtime::{CpuDelta, CpuSink, RuntimeConfig, Supervisor, Toolchain};
use tollgate_testkit::TestRedis;

struct NoMeter;
impl CpuSink for NoMeter {
    fn record(&self, _: &[CpuDelta]) {}
}

/// Test identity: the account named in a header. Never used outside tests.
struct HeaderIdentity;

#[async_trait]
impl Identify for HeaderIdentity {
    async fn account(
        &self,
        parts: Option<&http::request::Parts>,
        _meta: &serde_json::Map<String, Value>,
    ) -> Result<Caller, Refusal> {
        parts
            .and_then(|p| p.headers.get("x-tollgate-test-account"))
            .and_then(|v| v.to_str().ok())
            .map(Caller::unpaid)
            .ok_or(Refusal::Tool(ToolFailure {
                code: "UNAUTHENTICATED",
                message: "no account".into(),
                hint: "test header missing".into(),
            }))
    }

    // This server has no pricing: nothing is ever charged or refunded.
    async fn charge(&self, _: &str, _: &str, _: i64) -> Result<bool, ToolFailure> {
        Err(no_payments())
    }

    async fn refund(&self, _: &str, _: &str, _: i64) -> Result<(), ToolFailure> {
        Err(no_payments())
    }
}

fn no_payments() -> ToolFailure {
    ToolFailure {
        code: "PAYMENT_UNAVAILABLE",
        message: "this test server takes no payments".into(),
        hint: "none".into(),
    }
}

fn js_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js")
}

fn ensure_client() {
    if js_dir()
        .join("node_modules/@modelcontextprotocol/sdk")
        .exists()
    {
        return;
    }
    let ok = Command::new("npm")
        .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund"])
        .current_dir(js_dir())
        .status()
        .unwrap()
        .success();
    assert!(ok, "npm ci in mcp/tests/js failed");
}

/// The MCP server over a real control service; returns its `/mcp` URL.
async fn server(redis: &TestRedis, dir: &tempfile::TempDir) -> (String, Arc<Control>) {
    let t = Toolchain::ensure(&Toolchain::source_tree_dir()).unwrap();
    let (sup, events) = Supervisor::new(
        RuntimeConfig {
            data_dir: dir.path().join("runtime"),
            min_drain: Duration::from_millis(50),
            ..RuntimeConfig::default()
        },
        t.clone(),
        Arc::new(NoMeter),
    )
    .unwrap();
    let store: Arc<dyn ControlStore> = Arc::new(
        RedisControlStore::connect(redis.target(), "tollgate")
            .await
            .unwrap(),
    );
    let control = Control::new(
        store,
        tollgate_control::bundler_for(&t, dir.path().join("builds")).unwrap(),
        sup,
        Arc::new(
            RouteStore::connect(redis.target(), "tollgate")
                .await
                .unwrap(),
        ),
        ControlConfig::default(),
    );
    tokio::spawn(control.clone().follow_runtime(events));
    let app = tollgate_mcp::router(
        control.clone(),
        Arc::new(HeaderIdentity),
        &McpConfig::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, control)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_session_with_the_typescript_sdk_client() {
    ensure_client();
    let redis = TestRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let (url, control) = server(&redis, &dir).await;

    // Another account's project, which the agent must never see or touch.
    let theirs = control
        .deploy(
            "someone-else",
            tollgate_control::DeployRequest {
                files: Some(
                    [(
                        "index.js".to_owned(),
                        "export default { fetch() { return new Response('theirs') } }".to_owned(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
        )
        .await
        .unwrap();

    let theirs_id = theirs.project_id.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(js_dir().join("agent.mjs"))
            .args([&url, "agent-7", &theirs_id])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "agent failed: {stderr}");
    let steps: HashMap<String, Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["step"].as_str().unwrap().to_owned(), v["value"].clone())
        })
        .collect();

    assert_eq!(steps["server"]["name"], "tollgate");
    let tools = steps["tools"].as_array().unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
    for want in [
        "deploy_project",
        "get_project",
        "list_projects",
        "delete_project",
        "rollback_project",
        "get_logs",
        "read_project_file",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert!(
        tools
            .iter()
            .all(|t| t["hasOutputSchema"] == true && t["description"].as_str().unwrap().len() > 40)
    );

    let deploy = &steps["deploy"];
    assert_eq!(deploy["isError"], false, "{deploy}");
    assert_eq!(deploy["structured"]["status"], "live");
    assert!(
        deploy["structured"]["url"]
            .as_str()
            .unwrap()
            .starts_with("http://mcp-app.localhost")
    );
    let progress: Vec<&str> = steps["progress"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["message"].as_str().unwrap())
        .collect();
    assert_eq!(progress, ["bundling", "starting"]);

    let listed = &steps["list"];
    assert_eq!(listed["slug"], "mcp-app");
    assert_eq!(listed["status"], "active");
    assert_eq!(
        steps["read"]["structured"]["content"],
        "export const msg = 'deployed over MCP'\n"
    );

    // Tool errors: isError with {code, message, hint}, as text and in _meta.
    let bad = &steps["bad_deploy"];
    assert_eq!(bad["isError"], true);
    let err: Value = serde_json::from_str(bad["text"].as_str().unwrap()).unwrap();
    assert_eq!(err["code"], "BUNDLE_FAILED");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .starts_with("src/msg.ts:1:"),
        "{err}"
    );
    assert!(!err["hint"].as_str().unwrap().is_empty());
    assert_eq!(bad["meta"]["dev.tollgate/error"]["code"], "BUNDLE_FAILED");
    let nf: Value = serde_json::from_str(steps["not_found"]["text"].as_str().unwrap()).unwrap();
    assert_eq!(nf["code"], "NOT_FOUND");
    for step in ["others_get", "others_delete", "others_logs"] {
        assert_eq!(steps[step]["isError"], true, "{step}");
        let e: Value = serde_json::from_str(steps[step]["text"].as_str().unwrap()).unwrap();
        assert_eq!(e["code"], "NOT_FOUND", "{step}: {e}");
    }

    // The failed deploy left v1 live; usage is reported.
    let got = &steps["get"]["structured"];
    assert_eq!(got["live"]["version"], 1);
    assert_eq!(got["recent"][0]["status"], "failed");
    assert!(got["usage"]["day"]["requests"].is_number());
    let logs = steps["logs"]["structured"]["entries"].as_array().unwrap();
    assert!(
        logs.iter().any(
            |e| e["level"] == "system" && e["message"].as_str().unwrap().starts_with("started")
        )
    );

    assert_eq!(steps["delete"]["structured"]["deleted"], true);
    assert_eq!(
        steps["after_delete"]["structured"]["projects"],
        serde_json::json!([])
    );
    // The other account's project was never listed and is still there.
    assert_eq!(
        control.list_projects("someone-else").await.unwrap().len(),
        1
    );
}

/// DNS-rebinding protection: an unknown `Host` or a browser `Origin` is refused; a client that
/// sends no `Accept` (some agents) is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_hosts_and_origins_are_refused() {
    let redis = TestRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let (url, _control) = server(&redis, &dir).await;
    let init = serde_json::json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "raw", "version": "1"}}
    });
    let c = reqwest::Client::new();
    let post = || {
        c.post(&url)
            .header("content-type", "application/json")
            .header("x-tollgate-test-account", "a")
            .body(init.to_string())
    };
    let r = post().send().await.unwrap();
    assert_eq!(r.status(), 200, "no Accept header: normalised and served");
    let body = r.text().await.unwrap();
    assert!(body.contains("\"tollgate\""), "{body}");
    let r = post().header("host", "evil.example").send().await.unwrap();
    assert_eq!(r.status(), 403, "unknown Host");
    let r = post()
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "unlisted Origin");
}

/// A 2026-07-28 (modern era) client: no `initialize`, the version and capabilities in every
/// request's `_meta`, the `Mcp-Method`/`Mcp-Name` headers. The same server answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2026_07_28_client_calls_tools_without_initialize() {
    let redis = TestRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let (url, _control) = server(&redis, &dir).await;
    let http = reqwest::Client::new();
    let meta = serde_json::json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "modern-agent", "version": "1.0.0"}
    });
    let post = |method: &'static str, name: Option<&'static str>, params: Value| {
        let mut r = http
            .post(&url)
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", method)
            .header("x-tollgate-test-account", "modern-7");
        if let Some(n) = name {
            r = r.header("mcp-name", n);
        }
        r.json(&serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}))
            .send()
    };
    let r = post("tools/list", None, serde_json::json!({"_meta": meta}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let tools: Vec<&str> = v["result"]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    for t in ["deploy_project", "list_projects", "top_up", "get_balance"] {
        assert!(tools.contains(&t), "{t} missing: {tools:?}");
    }
    let r = post(
        "tools/call",
        Some("list_projects"),
        serde_json::json!({"name": "list_projects", "arguments": {}, "_meta": meta}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["result"]["structuredContent"],
        serde_json::json!({"projects": []}),
        "{v}"
    );
    assert_eq!(v["result"]["resultType"], "complete", "{v}");
    // The era's header rule: a tools/call whose Mcp-Name does not match is refused.
    let r = post(
        "tools/call",
        Some("get_logs"),
        serde_json::json!({"name": "list_projects", "arguments": {}, "_meta": meta}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
}

/// Hostile requests to `/mcp` get a clean 4xx (or a JSON-RPC error), change nothing, and the
/// server answers the next good request: a body over the limit, bytes that are not JSON, JSON
/// that is not a JSON-RPC message, an unknown protocol version, a wrong content type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_a_clean_error_and_change_nothing() {
    let redis = TestRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let (url, control) = server(&redis, &dir).await;
    // A fresh connection per request: the server closes one whose body it refused unread.
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let post = |body: Vec<u8>| {
        c.post(&url)
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .header("x-tollgate-test-account", "hostile")
            .body(body)
    };
    let mut seen = Vec::new();
    // 5 MiB of a deploy's files: over the 4 MiB limit.
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"deploy_project","arguments":{{"files":{{"index.js":"{}"}}}}}}}}"#,
        "x".repeat(5 << 20)
    );
    // The server answers 413 from the headers and closes; a client still writing may see the
    // close (a broken pipe) before the answer, on a loaded machine: sent again then.
    let mut tries = 0;
    let r = loop {
        match post(big.clone().into_bytes()).send().await {
            Ok(r) => break r,
            Err(e) if tries < 5 && e.is_request() => tries += 1,
            Err(e) => panic!("no answer to an over-limit body: {e}"),
        }
    };
    seen.push((
        "over the body limit",
        r.status().as_u16(),
        r.text().await.unwrap(),
    ));
    let r = post(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":".to_vec())
        .send()
        .await
        .unwrap();
    seen.push(("not JSON", r.status().as_u16(), r.text().await.unwrap()));
    let r = post(b"[1,2,3]".to_vec()).send().await.unwrap();
    seen.push(("not JSON-RPC", r.status().as_u16(), r.text().await.unwrap()));
    let r = post(br#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}"#.to_vec())
        .header("mcp-protocol-version", "1999-01-01")
        .send()
        .await
        .unwrap();
    seen.push((
        "unknown protocol version",
        r.status().as_u16(),
        r.text().await.unwrap(),
    ));
    let r = c
        .post(&url)
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "text/plain")
        .header("x-tollgate-test-account", "hostile")
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}"#)
        .send()
        .await
        .unwrap();
    seen.push((
        "wrong content type",
        r.status().as_u16(),
        r.text().await.unwrap(),
    ));
    // Two Content-Types (JSON and another): ambiguous, refused.
    let r = post(br#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}"#.to_vec())
        .header("content-type", "text/plain")
        .send()
        .await
        .unwrap();
    seen.push((
        "two content types",
        r.status().as_u16(),
        r.text().await.unwrap(),
    ));
    let want = [413, 400, 400, 400, 415, 415];
    for ((what, status, body), want) in seen.iter().zip(want) {
        assert_eq!(*status, want, "{what}: {body}");
        // A JSON-RPC error with a hint, or (the protocol version, refused by the transport)
        // a message that names the problem.
        if *what != "unknown protocol version" {
            let v: Value =
                serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
            assert!(v["error"]["code"].as_i64().is_some(), "{what}: {body}");
            assert!(
                v["error"]["data"]["hint"].as_str().is_some(),
                "{what}: {body}"
            );
        } else {
            assert!(body.contains("1999-01-01"), "{body}");
        }
    }
    // Nothing was created, and the server still serves.
    assert!(control.list_projects("hostile").await.unwrap().is_empty());
    let init = serde_json::json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "raw", "version": "1"}}
    });
    let r = post(init.to_string().into_bytes()).send().await.unwrap();
    assert_eq!(r.status(), 200);
}
