//! The proxy as an end user and an SRE see it: routing, error answers, headers, limits,
//! WebSockets, keepalive, admin endpoints.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{Node, eventually, metric, options, raw};
use futures_util::{SinkExt, StreamExt};
use tollgate_proxy::Stop;
use tollgate_testkit::{Upstream, free_addr};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_and_normalises_it() {
    let a = Upstream::start("alpha");
    let b = Upstream::start("beta");
    let node = Node::start(options(
        None,
        &[("a.localhost", a.addr), ("b.example.com", b.addr)],
    ));
    let c = node.client(&["a.localhost", "b.example.com", "A.LOCALHOST"]);
    let body = |u: String| {
        let c = c.clone();
        async move { c.get(u).send().await.unwrap().text().await.unwrap() }
    };
    assert_eq!(body(node.url("a.localhost", "/")).await, "alpha");
    assert_eq!(body(node.url("b.example.com", "/x?y=1")).await, "beta");
    assert_eq!(body(node.url("A.LOCALHOST", "/")).await, "alpha");
    // Trailing dot and port in the Host header.
    let r = raw(
        node.addr,
        b"GET / HTTP/1.1\r\nHost: A.localhost.:8080\r\nConnection: close\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.ends_with("alpha"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_host_is_404_page_or_problem() {
    let node = Node::start(options(None, &[]));
    let c = node.client(&["nope.localhost"]);
    let r = c.get(node.url("nope.localhost", "/")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert_eq!(r.headers()["cache-control"], "no-store");
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["type"], "urn:tollgate:problem:unknown-host");
    assert_eq!(v["status"], 404);
    assert!(v["detail"].as_str().unwrap().contains("nope.localhost"));
    assert_eq!(v["request_id"], rid.as_str());

    let r = c
        .get(node.url("nope.localhost", "/"))
        .header("accept", "text/html,application/xhtml+xml")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    let page = r.text().await.unwrap();
    assert!(page.contains("No service at this address"));
    assert!(page.contains("nope.localhost"));
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "self-contained"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_host_is_400() {
    let node = Node::start(options(None, &[]));
    for host in ["bad_host.localhost", "a..b", "x:99999", ""] {
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let r = raw(node.addr, req.as_bytes());
        assert!(r.starts_with("HTTP/1.1 400"), "host {host:?}: {r}");
        assert!(r.contains("urn:tollgate:problem:bad-host"), "{r}");
    }
    let long = "a".repeat(300);
    let r = raw(
        node.addr,
        format!("GET / HTTP/1.1\r\nHost: {long}\r\n\r\n").as_bytes(),
    );
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_502_and_slow_upstream_is_504() {
    let slow = Upstream::start("slow");
    let dead = free_addr(); // nothing listens here
    let mut o = options(
        None,
        &[("dead.localhost", dead), ("slow.localhost", slow.addr)],
    );
    o.proxy.upstream_read_timeout_seconds = 0.3;
    let node = Node::start(o);
    let c = node.client(&["dead.localhost", "slow.localhost"]);

    let r = c.get(node.url("dead.localhost", "/")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["connection"], "close");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["type"], "urn:tollgate:problem:upstream-unavailable");

    let r = c
        .get(node.url("dead.localhost", "/"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert!(r.text().await.unwrap().contains("not responding"));

    let r = c
        .get(node.url("slow.localhost", "/sleep/2000"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["type"], "urn:tollgate:problem:upstream-timeout");

    // Counted in the logging phase, just after the response went out.
    assert!(
        eventually(Duration::from_secs(1), || async {
            let m = node.metrics().await;
            metric(&m, "tollgate_upstream_errors_total{kind=\"connect\"}") >= Some(1.0)
                && metric(&m, "tollgate_upstream_errors_total{kind=\"timeout\"}") >= Some(1.0)
                && metric(&m, "tollgate_http_requests_total{code_class=\"5xx\"}") >= Some(3.0)
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upstream_fails_over_to_the_next() {
    let up = Upstream::start("alive");
    let mut o = options(None, &[]);
    o.routes.push(tollgate_proxy::StaticRoute {
        host: "ha.localhost".into(),
        upstreams: vec![free_addr(), up.addr],
    });
    let node = Node::start(o);
    let c = node.client(&["ha.localhost"]);
    for _ in 0..6 {
        let r = c.get(node.url("ha.localhost", "/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "alive");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_request_id_and_stripping() {
    let up = Upstream::start("h");
    let node = Node::start(options(None, &[("h.localhost", up.addr)]));
    let c = node.client(&["h.localhost"]);
    let r = c
        .get(node.url("h.localhost", "/headers"))
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-tollgate-account", "spoofed")
        .header("x-tollgate-whatever", "spoofed")
        .header("connection", "keep-alive, x-private")
        .header("x-private", "hop")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("te", "trailers")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(rid.len(), 32, "generated id: {rid}");
    let h: serde_json::Value = r.json().await.unwrap();
    let one = |k: &str| h[k][0].as_str().map(str::to_owned);
    assert_eq!(one("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(one("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        one("x-forwarded-host"),
        Some(format!("h.localhost:{}", node.addr.port()))
    );
    assert_eq!(one("x-request-id"), Some(rid));
    for gone in [
        "x-tollgate-account",
        "x-tollgate-whatever",
        "x-private",
        "keep-alive",
        "proxy-authorization",
        "te",
    ] {
        assert!(h.get(gone).is_none(), "{gone} reached the upstream: {h}");
    }

    // A sane client request id is kept end to end; a hostile one is replaced.
    let r = c
        .get(node.url("h.localhost", "/headers"))
        .header("x-request-id", "client-abc.123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "client-abc.123");
    let r = c
        .get(node.url("h.localhost", "/headers"))
        .header("x-request-id", "has space<script>")
        .send()
        .await
        .unwrap();
    assert_ne!(r.headers()["x-request-id"], "has space<script>");
}

/// `Payment <base64url(JSON)>` for a challenge of `realm`, as an MPP client sends it.
fn payment_credential(realm: &str) -> String {
    use base64::Engine;
    let json = serde_json::json!({
        "challenge": {"id": "x", "realm": realm, "method": "tempo", "intent": "charge",
                      "request": "e30", "expires": "2099-01-01T00:00:00Z"},
        "payload": {"type": "proof", "signature": "0x00"},
        "source": "did:pkh:eip155:42431:0x0000000000000000000000000000000000000001",
    });
    format!(
        "Payment {}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json.to_string())
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_platforms_payment_credentials_never_reach_a_hosted_service() {
    let up = Upstream::start("t");
    let mut opts = options(None, &[("t.localhost", up.addr)]);
    opts.proxy.payment_realms = vec!["mcp.example.com".into(), "mcp.example.com/services".into()];
    let node = Node::start(opts);
    let c = node.client(&["t.localhost"]);
    let seen = |h: serde_json::Value, name: &str| -> Vec<String> {
        h[name]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    // A visitor's wallet answered a 402 the tenant served with the platform's identity
    // challenge: the tenant must not get the proof to replay at MCP. Both realms, both headers,
    // any scheme case, standard base64 too.
    for (header, value) in [
        ("authorization", payment_credential("mcp.example.com")),
        (
            "authorization",
            payment_credential("mcp.example.com/services"),
        ),
        (
            "payment-authorization",
            payment_credential("mcp.example.com"),
        ),
        (
            "authorization",
            payment_credential("mcp.example.com").replace("Payment ", "PAYMENT "),
        ),
        (
            "authorization",
            payment_credential("mcp.example.com").replace("Payment ", "Payment\t"),
        ),
        (
            "authorization",
            payment_credential("mcp.example.com")
                .replace('-', "+")
                .replace('_', "/"),
        ),
    ] {
        let r = c
            .get(node.url("t.localhost", "/headers"))
            .header(header, &value)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let h: serde_json::Value = r.json().await.unwrap();
        assert!(
            seen(h, header).is_empty(),
            "{header}: {value} reached the tenant"
        );
    }
    // A tenant that runs MPP itself gets its own credentials, and other authorization too.
    let own = payment_credential("t.localhost");
    let r = c
        .get(node.url("t.localhost", "/headers"))
        .header("authorization", &own)
        .send()
        .await
        .unwrap();
    assert_eq!(seen(r.json().await.unwrap(), "authorization"), vec![own]);
    let r = c
        .get(node.url("t.localhost", "/headers"))
        .header("authorization", "Bearer abc")
        .header("payment-authorization", payment_credential("shop.example"))
        .send()
        .await
        .unwrap();
    let h: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        seen(h.clone(), "authorization"),
        vec!["Bearer abc".to_owned()]
    );
    assert_eq!(seen(h, "payment-authorization").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_and_body_limits() {
    let up = Upstream::start("lim");
    let mut o = options(None, &[("l.localhost", up.addr)]);
    o.proxy.max_request_header_bytes = 4096;
    o.proxy.max_body_bytes = 1000;
    let node = Node::start(o);
    let c = node.client(&["l.localhost"]);

    let r = c
        .get(node.url("l.localhost", "/"))
        .header("cookie", "x".repeat(5000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);

    let r = c
        .post(node.url("l.localhost", "/body"))
        .body(vec![b'a'; 1001])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["type"], "urn:tollgate:problem:body-too-large");

    let r = c
        .post(node.url("l.localhost", "/body"))
        .body(vec![b'a'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "1000");

    // Chunked, no Content-Length: counted as it streams.
    let chunked = format!(
        "POST /body HTTP/1.1\r\nHost: l.localhost\r\nTransfer-Encoding: chunked\r\n\r\n\
         258\r\n{a}\r\n258\r\n{a}\r\n0\r\n\r\n",
        a = "a".repeat(600)
    );
    let r = raw(node.addr, chunked.as_bytes());
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through() {
    let up = Upstream::start("ws");
    let node = Node::start(options(None, &[("ws.localhost", up.addr)]));
    let tcp = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://ws.localhost/ws", tcp)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..3 {
        ws.send(tokio_tungstenite::tungstenite::Message::Text(
            format!("hi{i}").into(),
        ))
        .await
        .unwrap();
        let m = ws.next().await.unwrap().unwrap();
        assert_eq!(m.into_text().unwrap().as_str(), format!("echo:hi{i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused() {
    let up = Upstream::start("ka");
    let node = Node::start(options(None, &[("ka.localhost", up.addr)]));
    let c = node.client(&["ka.localhost"]);
    for _ in 0..50 {
        let r = c.get(node.url("ka.localhost", "/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap();
    }
    assert!(
        up.distinct_peers() <= 2,
        "50 sequential requests used {} upstream connections",
        up.distinct_peers()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_and_metrics() {
    let up = Upstream::start("m");
    let node = Node::start(options(None, &[("m.localhost", up.addr)]));
    let r = reqwest::get(format!("http://{}/livez", node.admin))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (code, v) = node.readyz().await;
    assert_eq!(code, 200);
    assert_eq!(v["routes"], 1);
    let c = node.client(&["m.localhost"]);
    c.get(node.url("m.localhost", "/")).send().await.unwrap();
    assert!(
        eventually(Duration::from_secs(1), || async {
            let m = node.metrics().await;
            metric(&m, "tollgate_http_requests_total{code_class=\"2xx\"}") == Some(1.0)
        })
        .await
    );
    let m = node.metrics().await;
    assert!(m.contains("tollgate_http_request_duration_seconds_bucket"));
    assert_eq!(metric(&m, "tollgate_routes"), Some(1.0));
    // Labels come sorted: revision (a commit id, or "unknown" outside a checkout), version.
    let info = m
        .lines()
        .find(|l| l.starts_with("tollgate_build_info{revision=\""))
        .unwrap_or_else(|| panic!("no build_info in {m}"));
    assert!(
        info.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{info}"
    );
    let rev = info.split('"').nth(1).unwrap();
    assert!(
        rev == "unknown" || (rev.len() == 12 && rev.bytes().all(|b| b.is_ascii_hexdigit())),
        "{info}"
    );
    // Every process exports the standard process metrics.
    assert!(m.contains("\nprocess_cpu_seconds_total "), "{m}");
    assert!(m.contains("\nprocess_resident_memory_bytes "), "{m}");
    assert!(m.contains("tollgate_route_last_sync_timestamp_seconds"));
    assert!(m.contains("tollgate_route_sync_lag_seconds_bucket"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_fails_readyz_and_finishes_in_flight() {
    let up = Upstream::start("slow");
    let mut o = options(None, &[("s.localhost", up.addr)]);
    o.shutdown.drain_delay_seconds = 0.3;
    o.shutdown.drain_timeout_seconds = 2;
    let mut node = Node::start(o);
    let c = node.client(&["s.localhost"]);
    let url = node.url("s.localhost", "/sleep/1000");
    let inflight = tokio::spawn({
        let c = c.clone();
        async move {
            let r = c.get(url).send().await.unwrap();
            let conn = r.headers().get("connection").cloned();
            (r.status().as_u16(), conn, r.text().await.unwrap())
        }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    node.begin_stop(Stop::Graceful);
    assert!(
        eventually(Duration::from_millis(200), || async {
            node.readyz().await.0 == 503
        })
        .await,
        "/readyz must fail as soon as draining starts"
    );
    let (_, v) = node.readyz().await;
    assert_eq!(v["draining"], true);
    let (status, conn, body) = inflight.await.unwrap();
    assert_eq!((status, body.as_str()), (200, "slow"));
    // Answered while draining: the client is told not to reuse the connection.
    assert_eq!(conn.unwrap(), "close");
    // After the drain delay the listener is closed.
    let addr = node.addr;
    assert!(
        eventually(Duration::from_secs(2), || async {
            std::net::TcpStream::connect(addr).is_err()
        })
        .await,
        "listener still open while draining"
    );
    let took = tokio::task::spawn_blocking(move || node.stop(Stop::Graceful))
        .await
        .unwrap();
    assert!(took < Duration::from_secs(6), "stop took {took:?}");
}

/// W3C trace context: a client's `traceparent` and `tracestate` reach the upstream unchanged, so
/// a hosted service joins the caller's trace (the proxy records no span of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_reaches_the_upstream_unchanged() {
    let up = Upstream::start("trace");
    let node = Node::start(options(None, &[("t.localhost", up.addr)]));
    let c = node.client(&["t.localhost"]);
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = c
        .get(node.url("t.localhost", "/headers"))
        .header("traceparent", parent)
        .header("tracestate", "vendor=opaque")
        .send()
        .await
        .unwrap();
    let h: serde_json::Value = r.json().await.unwrap();
    assert_eq!(h["traceparent"][0], parent, "{h}");
    assert_eq!(h["tracestate"][0], "vendor=opaque", "{h}");
}
