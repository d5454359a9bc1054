//! The metric catalogue (docs/metrics.md) kept true: every process kind runs (`tollgate proxy`
//! with TLS, `tollgate control`, `tollgate dev`), traffic goes through every component (an MCP
//! deploy, metered requests over HTTP and HTTPS, a tool call), every `/metrics` is scraped, and
//! the test fails on a metric exported but not catalogued, catalogued but not exported, a type,
//! label set or exporting process that differs, or a name or label against the conventions.
//! A real Prometheus server scrapes the three processes throughout, and every query of the
//! Grafana dashboard must return data from it at the end (the dashboard is populated).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair};
use tollgate_testkit::{RedisServer, free_addr};

mod common;
use common::*;

/// One catalogue row.
#[derive(Debug)]
struct Entry {
    kind: String,
    labels: BTreeSet<String>,
    exported_by: BTreeSet<String>,
}

fn catalogue() -> BTreeMap<String, Entry> {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md"))
            .unwrap();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | metric | type | labels | exported by | meaning |
        if cells.len() < 6 || !cells[1].starts_with('`') {
            continue;
        }
        let name = cells[1].trim_matches('`').to_owned();
        let labels = if cells[3] == "—" || cells[3] == "-" {
            BTreeSet::new()
        } else {
            cells[3]
                .split(',')
                .map(|l| l.trim().trim_matches('`').to_owned())
                .collect()
        };
        let exported_by = cells[4].split(',').map(|p| p.trim().to_owned()).collect();
        let prev = out.insert(
            name.clone(),
            Entry {
                kind: cells[2].to_owned(),
                labels,
                exported_by,
            },
        );
        assert!(prev.is_none(), "{name} is catalogued twice");
    }
    assert!(out.len() > 40, "the catalogue table was not found");
    out
}

/// What one scrape exports: family → (type, label names).
fn parse(text: &str) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let mut families: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            families.insert(name.to_owned(), (kind.to_owned(), BTreeSet::new()));
        }
    }
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap();
        let sample = &line[..name_end];
        let family = [
            sample,
            sample.trim_end_matches("_bucket"),
            sample.trim_end_matches("_sum"),
            sample.trim_end_matches("_count"),
        ]
        .into_iter()
        .find(|f| families.contains_key(*f))
        .unwrap_or_else(|| panic!("sample {sample} has no # TYPE"))
        .to_owned();
        if line[name_end..].starts_with('{') {
            let inner = &line[name_end + 1..line.find('}').unwrap()];
            for pair in inner.split("\",") {
                let label = pair.split('=').next().unwrap().trim();
                if !label.is_empty() && label != "le" {
                    families
                        .get_mut(&family)
                        .unwrap()
                        .1
                        .insert(label.to_owned());
                }
            }
        }
    }
    families
}

/// Prometheus conventions and ours: prefixes, `_total` on counters only, base units, and no
/// unbounded identifier as a label.
fn check_conventions(name: &str, kind: &str, labels: &BTreeSet<String>) -> Vec<String> {
    let mut bad = Vec::new();
    if !name.starts_with("tollgate_") && !name.starts_with("process_") {
        bad.push(format!("{name}: neither tollgate_ nor process_"));
    }
    if (kind == "counter") != name.ends_with("_total") {
        bad.push(format!(
            "{name}: a {kind} must {}end in _total",
            if kind == "counter" { "" } else { "not " }
        ));
    }
    for unit in [
        "_ms",
        "_milliseconds",
        "_us",
        "_microseconds",
        "_kb",
        "_mb",
        "_percent",
        "_picos",
    ] {
        if name.trim_end_matches("_total").ends_with(unit) {
            bad.push(format!("{name}: not a base unit ({unit})"));
        }
    }
    if kind == "histogram" && !["_seconds", "_bytes"].iter().any(|u| name.ends_with(u)) {
        bad.push(format!(
            "{name}: a histogram names its unit (_seconds, _bytes)"
        ));
    }
    for l in labels {
        if [
            "account",
            "account_id",
            "slug",
            "host",
            "path",
            "project",
            "project_id",
            "deployment",
            "deployment_id",
            "url",
            "ip",
        ]
        .contains(&l.as_str())
        {
            bad.push(format!("{name}: label {l} is unbounded"));
        }
    }
    bad
}

/// A Prometheus server (Debian's `prometheus`, as `scripts/deps.sh` installs it) scraping
/// `targets` every second, on a free port with its own storage.
struct Prometheus {
    _proc: Proc,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[SocketAddr]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let list: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: tollgate\n    static_configs:\n      - targets: [{}]\n",
                list.join(", ")
            ),
        )
        .unwrap();
        let addr = free_addr();
        let _proc = Proc(
            Command::new("prometheus")
                .arg(format!("--config.file={}", cfg.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("prometheus (Debian package `prometheus`; scripts/deps.sh installs it)"),
        );
        Prometheus {
            _proc,
            addr,
            _dir: dir,
        }
    }

    /// Waits until `target` has been scraped (so that what happens next shows in `rate()`).
    fn wait_scraped(&self, target: SocketAddr) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while self
            .query(&format!("up{{instance=\"{target}\"}} == 1"))
            .is_empty()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "Prometheus never scraped {target}: {:?}",
                self.query("up")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// An instant query's result vector (empty on an error).
    fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let r: serde_json::Value = reqwest::blocking::Client::new()
            .get(format!("http://{}/api/v1/query", self.addr))
            .query(&[("query", expr)])
            .send()
            .and_then(|r| r.json())
            .unwrap_or_default();
        r["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

/// Every query of deploy/grafana/tollgate.json, with the dashboard's variables filled in.
fn dashboard_queries() -> Vec<(String, String)> {
    let d: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/tollgate.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$job", ".+")
                .replace("$instance", ".+")
                .replace("$__rate_interval", "2m");
            out.push((p["title"].as_str().unwrap().to_owned(), expr));
        }
    }
    out
}

fn scrape(addr: SocketAddr) -> String {
    reqwest::blocking::get(format!("http://{addr}/metrics"))
        .unwrap()
        .text()
        .unwrap()
}

fn wildcard_cert(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["*.localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

#[test]
fn every_exported_metric_is_catalogued_and_every_catalogued_metric_is_exported() {
    let cat = catalogue();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = wildcard_cert(dir.path());

    // `tollgate dev`: everything in one process, its metrics on the proxy's admin listener.
    let (control, dev_admin, dev_tls) = (free_addr(), free_addr(), free_addr());
    let (proxy_admin, proxy_tls) = (free_addr(), free_addr());
    let (ctl, ctl_admin) = (free_addr(), free_addr());
    let prometheus = Prometheus::start(&[dev_admin, proxy_admin, ctl_admin]);
    let (mut dev, dev_proxy) = start_listening(|proxy| {
        let mut c = bin();
        c.env("TOLLGATE_TLS_LISTEN", dev_tls.to_string())
            .env("TOLLGATE_TLS_CERT", &cert)
            .env("TOLLGATE_TLS_KEY", &key)
            .args(["dev", "--redis", &redis.url(), "--dev-account", "acct-m"])
            .args(["--chain-listen", &free_addr().to_string()])
            .args(["--proxy-listen", &proxy.to_string()])
            .args(["--control-listen", &control.to_string()])
            .args(["--admin-listen", &dev_admin.to_string()]);
        c
    });
    wait_for_control(control, &mut dev);
    prometheus.wait_scraped(dev_admin);
    assert!(
        credit_account(&redis.url(), "acct-m", "1.00", "metrics-credit")
            .status
            .success()
    );
    // An MCP deploy (runtime, control, MCP), then requests to it (proxy, metering).
    let js = mcp_js();
    assert_eq!(deploy_hello(control)["status"], "live");
    // A deploy whose code throws at start: it goes through the pipeline and fails.
    let out = Command::new("node")
        .arg(js.join("call.mjs"))
        .arg(format!("http://{control}/mcp"))
        .arg("deploy_project")
        .arg(r#"{"project_name":"boom","files":{"src/index.ts":"throw new Error('boom at start'); export default { fetch() { return new Response('no') } }"}}"#)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("error"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // `tollgate proxy` with TLS on the same Redis: it serves the same route.
    let (mut proxy, proxy_addr) = start_listening(|listen| {
        let mut c = bin();
        c.env(
            "TOLLGATE_PUBLIC_MCP_URL",
            format!("http://localhost:{}/mcp", control.port()),
        )
        .env("TOLLGATE_TLS_LISTEN", proxy_tls.to_string())
        .env("TOLLGATE_TLS_CERT", &cert)
        .env("TOLLGATE_TLS_KEY", &key)
        .args(["proxy", "--listen", &listen.to_string()])
        .args(["--admin-listen", &proxy_admin.to_string()])
        .args(["--redis", &redis.url()]);
        c
    });
    prometheus.wait_scraped(proxy_admin);
    let http = reqwest::blocking::Client::builder()
        .resolve("hello-agent.localhost", dev_proxy)
        .build()
        .unwrap();
    let via_proxy = reqwest::blocking::Client::builder()
        .resolve("hello-agent.localhost", proxy_addr)
        .build()
        .unwrap();
    let ok = |c: &reqwest::blocking::Client, port: u16| {
        c.get(format!("http://hello-agent.localhost:{port}/"))
            .send()
            .is_ok_and(|r| r.status() == 200)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(ok(&http, dev_proxy.port()) && ok(&via_proxy, proxy_addr.port())) {
        assert!(
            std::time::Instant::now() < deadline,
            "the deployed service never answered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..20 {
        ok(&http, dev_proxy.port());
        ok(&via_proxy, proxy_addr.port());
    }
    let _ = http
        .get(format!("http://nowhere.localhost:{}/", dev_proxy.port()))
        .send();

    // `tollgate control` on its own keys (its chain RPC is not needed to start or to ask for a
    // payment).
    let cfg = dir.path().join("control.toml");
    std::fs::write(
        &cfg,
        format!(
            "[control]\nlisten = \"{ctl}\"\nadmin_listen = \"{ctl_admin}\"\ndata_dir = {:?}\n[redis]\nurl = \"{}\"\nkey_prefix = \"ctl\"\n",
            dir.path().join("ctl").display().to_string(),
            redis.url(),
        ),
    )
    .unwrap();
    let mut ctl_proc = Proc(
        with_payment_secrets(&mut bin())
            .args(["control", "--config"])
            .arg(&cfg)
            .spawn()
            .unwrap(),
    );
    wait_for_control(ctl, &mut ctl_proc);
    // A tool call without payment: the 402 of MCP (payment_required).
    let _ = Command::new("node")
        .arg(js.join("call.mjs"))
        .arg(format!("http://{ctl}/mcp"))
        .arg("get_balance")
        .output();

    // A credential that does not decode, on dev's top-up endpoint: refused, counted as
    // `unknown`.
    let garbage = reqwest::blocking::Client::new()
        .post(format!("http://{control}/v1/top-up?amount_usd=1"))
        .header("Authorization", "Payment not-base64-json!")
        .send()
        .unwrap();
    assert_eq!(garbage.status(), 402);

    let scrapes = [
        ("dev", scrape(dev_admin)),
        ("proxy", scrape(proxy_admin)),
        ("control", scrape(ctl_admin)),
    ];
    // The values behind the names: what happened above is what the dev process counted.
    let dev_text = &scrapes[0].1;
    let value = |series: &str| -> f64 {
        dev_text
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {series} in the dev scrape"))
    };
    assert_eq!(value("tollgate_deploys_total{result=\"live\"}"), 1.0);
    assert_eq!(value("tollgate_deploys_total{result=\"failed\"}"), 1.0);
    assert_eq!(
        value("tollgate_mcp_tool_calls_total{result=\"ok\",tool=\"deploy_project\"}"),
        1.0
    );
    assert!(value("tollgate_runtime_starts_total{result=\"ok\"}") >= 1.0);
    assert_eq!(value("tollgate_runtime_processes"), 1.0);
    assert_eq!(value("tollgate_ready"), 1.0);
    assert!(value("tollgate_metered_requests_total") >= 20.0);
    assert_eq!(
        value("tollgate_payment_credentials_total{action=\"unknown\",result=\"rejected\"}"),
        1.0
    );
    assert!(value("tollgate_cached_accounts") >= 1.0);
    assert_eq!(value("tollgate_suspended_accounts"), 0.0);

    let mut problems = Vec::new();
    for (process, text) in &scrapes {
        let exported = parse(text);
        for (name, (kind, labels)) in &exported {
            problems.extend(check_conventions(name, kind, labels));
            match cat.get(name) {
                None => problems.push(format!("{process} exports {name}, not in docs/metrics.md")),
                Some(e) => {
                    if &e.kind != kind {
                        problems.push(format!(
                            "{name}: catalogued as {}, exported as {kind}",
                            e.kind
                        ));
                    }
                    if &e.labels != labels {
                        problems.push(format!(
                            "{name}: catalogued labels {:?}, exported {:?} (by {process})",
                            e.labels, labels
                        ));
                    }
                    if !e.exported_by.contains(*process) {
                        problems.push(format!(
                            "{name}: exported by {process}, which the catalogue does not list"
                        ));
                    }
                }
            }
        }
        for (name, e) in &cat {
            if e.exported_by.contains(*process) && !exported.contains_key(name) {
                problems.push(format!(
                    "{name}: catalogued for {process}, not exported there"
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );

    // The dashboard, populated: Prometheus scraped all three processes through the traffic
    // above, and every panel query returns data.
    prometheus.wait_scraped(ctl_admin);
    // One more scrape of each after the last traffic.
    std::thread::sleep(Duration::from_secs(2));
    let empty: Vec<String> = dashboard_queries()
        .into_iter()
        .filter(|(_, expr)| prometheus.query(expr).is_empty())
        .map(|(title, expr)| format!("{title}: {expr}"))
        .collect();
    assert!(
        empty.is_empty(),
        "{} dashboard queries return nothing:\n{}",
        empty.len(),
        empty.join("\n")
    );
    drop(prometheus);
    assert!(terminate(&mut ctl_proc).success());
    assert!(terminate(&mut proxy).success());
    assert!(terminate(&mut dev).success());
}
