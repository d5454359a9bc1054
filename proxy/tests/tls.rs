//! HTTPS and HTTP/2 at the edge, with certificates from a CA made for each test: the certificate
//! chosen by SNI (wildcard and exact names), HTTP/2 by ALPN, HSTS, the HTTP→HTTPS redirect,
//! reload (kept on a bad file), the money gate and WebSocket over TLS.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{Node, eventually, gate, metric, options};
use futures_util::{SinkExt, StreamExt};
use pingora::tls::{ClientConfig, RootCertStore, ServerName, TlsConnector};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tollgate_proxy::{CertificateFiles, ProxyOptions, TlsConfig, UnknownSni};
use tollgate_testkit::{RedisServer, Upstream, free_addr};

/// A certificate authority of the test's own.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// A leaf for `names`, written as `<stem>.pem` (chain) and `<stem>.key`.
    fn issue(&self, names: &[&str], dir: &Path, stem: &str) -> CertificateFiles {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let files = CertificateFiles {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        };
        // Written whole, then renamed: what an ACME client does.
        write_atomically(&files.cert, &cert.pem());
        write_atomically(&files.key, &key.serialize_pem());
        files
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        roots
    }
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A rustls client config trusting `ca`, offering `alpn`.
fn client_tls(ca: &Ca, alpn: &[&[u8]]) -> ClientConfig {
    pingora::tls::install_default_crypto_provider();
    let mut c = ClientConfig::builder()
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    c
}

/// reqwest over TLS to the node's HTTPS listener for `hosts`, trusting `ca` (HTTP/2 offered).
fn https_client(ca: &Ca, tls: SocketAddr, hosts: &[&str]) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .use_preconfigured_tls(client_tls(ca, &[b"h2", b"http/1.1"]));
    for h in hosts {
        b = b.resolve(h, tls);
    }
    b.build().unwrap()
}

/// The outcome of a bare handshake with SNI `name`: the ALPN protocol chosen, or the error.
async fn handshake(ca: &Ca, tls: SocketAddr, name: &str) -> Result<Option<Vec<u8>>, String> {
    let connector = TlsConnector::from(Arc::new(client_tls(ca, &[b"h2", b"http/1.1"])));
    let tcp = tokio::net::TcpStream::connect(tls).await.unwrap();
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    match connector.connect(server_name, tcp).await {
        Ok(s) => Ok(s.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)),
        Err(e) => Err(e.to_string()),
    }
}

struct Edge {
    node: Node,
    tls: SocketAddr,
    ca: Ca,
    dir: tempfile::TempDir,
    /// The second certificate (an exact name), reissued by some tests.
    shop: CertificateFiles,
}

/// A node serving `hello.apps.test` (under a wildcard certificate) and `shop.example.com` (a
/// certificate of its own) from one upstream.
fn edge(up: &Upstream, tune: impl FnOnce(&mut ProxyOptions)) -> Edge {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("tollgate test CA");
    let wildcard = ca.issue(&["*.apps.test"], dir.path(), "wildcard");
    let shop = ca.issue(&["shop.example.com"], dir.path(), "shop");
    let mut o = options(
        None,
        &[("hello.apps.test", up.addr), ("shop.example.com", up.addr)],
    );
    o.proxy.base_domain = "apps.test".into();
    let tls = free_addr();
    o.tls = TlsConfig {
        listen: Some(tls),
        certificates: vec![wildcard, shop.clone()],
        hsts_max_age_seconds: 31_536_000,
        ..TlsConfig::default()
    };
    tune(&mut o);
    let node = Node::start(o);
    Edge {
        node,
        tls,
        ca,
        dir,
        shop,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_http2_with_the_certificate_for_each_name_and_hsts() {
    let up = Upstream::start("tls");
    let e = edge(&up, |_| {});
    let c = https_client(
        &e.ca,
        e.tls,
        &["hello.apps.test", "shop.example.com", "missing.apps.test"],
    );
    let port = e.tls.port();

    // The wildcard covers the platform's services; HTTP/2 is negotiated by ALPN.
    let r = c
        .get(format!("https://hello.apps.test:{port}/headers"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.headers()["strict-transport-security"], "max-age=31536000");
    assert!(r.headers().contains_key("x-request-id"));
    let seen: serde_json::Value = r.json().await.unwrap();
    // The upstream (HTTP/1.1) gets a Host made from :authority, and learns it was HTTPS.
    assert_eq!(seen["x-forwarded-proto"][0], "https", "{seen}");
    let authority = format!("hello.apps.test:{port}");
    assert_eq!(seen["host"][0], authority.as_str(), "{seen}");
    assert_eq!(seen["x-forwarded-host"][0], authority.as_str(), "{seen}");

    // An exact name gets its own certificate (the client trusts it only if it names the host).
    let r = c
        .get(format!("https://shop.example.com:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "tls");

    // The proxy's own answers carry HSTS too.
    let r = c
        .get(format!("https://missing.apps.test:{port}/"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert!(r.headers().contains_key("strict-transport-security"));

    // An HTTP/1.1-only client is served too.
    let h1 = reqwest::Client::builder()
        .no_proxy()
        .use_preconfigured_tls(client_tls(&e.ca, &[b"http/1.1"]))
        .resolve("hello.apps.test", e.tls)
        .build()
        .unwrap();
    let r = h1
        .get(format!("https://hello.apps.test:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.text().await.unwrap(), "tls");

    // Plain HTTP keeps working and never gets HSTS (it would be ignored, and is wrong there).
    let plain = e.node.client(&["hello.apps.test"]);
    let r = plain
        .get(e.node.url("hello.apps.test", "/headers"))
        .send()
        .await
        .unwrap();
    assert!(!r.headers().contains_key("strict-transport-security"));
    let seen: serde_json::Value = r.json().await.unwrap();
    assert_eq!(seen["x-forwarded-proto"][0], "http");

    // A name no certificate covers gets the default one (unknown_sni = "default"), which the
    // client rightly refuses for it.
    let err = handshake(&e.ca, e.tls, "other.example.org")
        .await
        .unwrap_err();
    assert!(err.contains("not valid for name"), "{err}");
    assert_eq!(
        handshake(&e.ca, e.tls, "hello.apps.test").await.unwrap(),
        Some(b"h2".to_vec())
    );
    let m = e.node.metrics().await;
    assert_eq!(metric(&m, "tollgate_tls_certificates"), Some(2.0));
    assert!(metric(&m, "tollgate_tls_certificate_expiry_timestamp_seconds").unwrap() > 1.7e9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_can_be_refused_at_the_handshake() {
    let up = Upstream::start("strict");
    let e = edge(&up, |o| o.tls.unknown_sni = UnknownSni::Reject);
    // A wildcard covers one label, no more, no less: with "reject", the names it does not
    // cover fail at the handshake (a wrong match would serve the wildcard instead).
    for name in ["other.example.org", "a.b.apps.test", "apps.test"] {
        let err = handshake(&e.ca, e.tls, name).await.unwrap_err();
        assert!(
            err.contains("AlertReceived") || err.contains("alert"),
            "{name}: a clean handshake failure, not a wrong certificate: {err}"
        );
    }
    assert!(handshake(&e.ca, e.tls, "hello.apps.test").await.is_ok());
    assert!(handshake(&e.ca, e.tls, "HELLO.apps.test").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_certificates_and_a_bad_file_keeps_the_old_ones() {
    let up = Upstream::start("reload");
    let e = edge(&up, |o| o.tls.reload_check_seconds = 0.0);
    let certs = e.node.certificates().unwrap();
    assert!(handshake(&e.ca, e.tls, "shop.example.com").await.is_ok());

    // A new certificate for shop.example.com from another CA (a renewal, a CA change).
    let ca2 = Ca::new("second test CA");
    ca2.issue(&["shop.example.com"], e.dir.path(), "shop");
    // Not read until told (reload_check_seconds = 0).
    assert!(handshake(&e.ca, e.tls, "shop.example.com").await.is_ok());
    assert_eq!(certs.reload(), Ok(2));
    assert!(handshake(&ca2, e.tls, "shop.example.com").await.is_ok());
    assert!(handshake(&e.ca, e.tls, "shop.example.com").await.is_err());

    // A broken file: the reload fails, says why, and the certificates in use stay.
    std::fs::write(&e.shop.key, "not a key").unwrap();
    let err = certs.reload().unwrap_err();
    assert!(err.contains("shop"), "{err}");
    assert!(handshake(&ca2, e.tls, "shop.example.com").await.is_ok());
    // A key of another certificate: refused the same way.
    let other = ca2.issue(&["x.example.com"], e.dir.path(), "other");
    std::fs::copy(&other.key, &e.shop.key).unwrap();
    let err = certs.reload().unwrap_err();
    assert!(err.contains("does not fit"), "{err}");
    assert!(handshake(&ca2, e.tls, "shop.example.com").await.is_ok());
    let m = e.node.metrics().await;
    assert_eq!(
        metric(&m, "tollgate_tls_reloads_total{result=\"error\"}"),
        Some(2.0)
    );
    assert_eq!(
        metric(&m, "tollgate_tls_reloads_total{result=\"ok\"}"),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_certificate_files_are_picked_up_without_a_signal() {
    let up = Upstream::start("watch");
    let e = edge(&up, |o| o.tls.reload_check_seconds = 0.1);
    let ca2 = Ca::new("renewed CA");
    ca2.issue(&["shop.example.com"], e.dir.path(), "shop");
    assert!(
        eventually(Duration::from_secs(5), || async {
            handshake(&ca2, e.tls, "shop.example.com").await.is_ok()
        })
        .await,
        "the renewed certificate is served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_redirected_to_https_before_reaching_the_upstream() {
    let up = Upstream::start("redir");
    let e = edge(&up, |o| o.tls.redirect_http = true);
    let plain = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .resolve("hello.apps.test", e.node.addr)
        .build()
        .unwrap();
    let r = plain
        .post(e.node.url("hello.apps.test", "/a/b?x=1&y=2"))
        .body("kept by a 308")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(
        r.headers()["location"],
        format!("https://hello.apps.test:{}/a/b?x=1&y=2", e.tls.port()).as_str()
    );
    assert_eq!(
        *up.seen.requests.lock().unwrap(),
        0,
        "the upstream saw nothing"
    );
    // Following it lands on HTTPS.
    let https = https_client(&e.ca, e.tls, &["hello.apps.test"]);
    let r = https
        .get(format!(
            "https://hello.apps.test:{}/a/b?x=1&y=2",
            e.tls.port()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_over_tls() {
    let up = Upstream::start("ws");
    let e = edge(&up, |_| {});
    // WebSocket clients offer HTTP/1.1 (RFC 6455 upgrade); HTTP/2 is not offered to them.
    let connector = TlsConnector::from(Arc::new(client_tls(&e.ca, &[b"http/1.1"])));
    let tcp = tokio::net::TcpStream::connect(e.tls).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("hello.apps.test").unwrap(), tcp)
        .await
        .unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("wss://hello.apps.test/ws", tls)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        "over tls".into(),
    ))
    .await
    .unwrap();
    let m = ws.next().await.unwrap().unwrap();
    assert_eq!(m.into_text().unwrap().as_str(), "echo:over tls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_money_gate_answers_the_same_over_http2() {
    use tollgate_metering::{RedisStore, Store};
    use tollgate_routes::{Route, RouteKey, RouteStore};
    const PRICE: i64 = 500_000;
    let redis = RedisServer::start();
    let up = Upstream::start("paid");
    let routes = RouteStore::connect(&redis.url(), "tollgate").await.unwrap();
    routes
        .put(
            &RouteKey::slug("paid").unwrap(),
            &Route {
                upstreams: vec![up.addr],
                account_id: Some("acct-tls".into()),
                project_id: Some("proj".into()),
                deployment_id: Some("dep".into()),
            },
        )
        .await
        .unwrap();
    let st: Arc<dyn Store> = Arc::new(
        RedisStore::connect(&redis.url(), "tollgate", Duration::from_secs(10))
            .await
            .unwrap(),
    );
    st.credit("acct-tls", "deposit-1", 2 * PRICE).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new("gate CA");
    let wildcard = ca.issue(&["*.apps.test"], pki.path(), "wildcard");
    let mut o = options(Some(&redis.url()), &[]);
    o.proxy.base_domain = "apps.test".into();
    let tls = free_addr();
    o.tls = TlsConfig {
        listen: Some(tls),
        certificates: vec![wildcard],
        ..TlsConfig::default()
    };
    let mut agent = tollgate_balance_cache::AgentConfig::new("tls-node", dir.path().join("j"));
    agent.min_lease = PRICE;
    agent.max_lease = 10 * PRICE;
    let node = Node::start_metered(o, gate(st.clone(), agent, "call the top_up tool"));
    assert!(
        eventually(Duration::from_secs(5), || async {
            node.readyz().await.0 == 200
        })
        .await
    );
    let c = https_client(&ca, tls, &["paid.apps.test"]);
    let url = format!("https://paid.apps.test:{}/", tls.port());
    for _ in 0..2 {
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
    }
    let r = c
        .get(&url)
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 402);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["type"], "urn:tollgate:problem:service-suspended");
    let r = c
        .get(&url)
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 402);
    assert!(r.text().await.unwrap().contains("This service is paused"));
    // A top-up, and the same HTTP/2 connection goes on.
    st.credit("acct-tls", "deposit-2", PRICE).await.unwrap();
    assert!(
        eventually(Duration::from_secs(3), || async {
            c.get(&url).send().await.unwrap().status() == 200
        })
        .await
    );
    node.stop(tollgate_proxy::Stop::Graceful);
    let a = st.account("acct-tls").await.unwrap().unwrap();
    assert_eq!(a.debited, 3 * PRICE, "every paid request debited once");
    assert_eq!(a.credited - a.debited, a.available + a.leased);
}
