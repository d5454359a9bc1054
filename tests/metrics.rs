//! The metric catalogue (docs/metrics.md) kept true: every process kind runs (`tollgate proxy`
//! with TLS, `tollgate control` in both runtime modes, `tollgate runtime`, `tollgate dev`), traffic goes through every component (an MCP
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
use tollgate_testkit::{PostgresServer, RedisServer, free_addr};

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
    // The book of record of both control sides (dev's ledger, prefix `tollgate`; control's,
    // prefix `ctl`).
    let pg = PostgresServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = wildcard_cert(dir.path());
    let dev_data = dir.path().join("dev-data");

    // `tollgate dev`: everything in one process, its metrics on the proxy's admin listener.
    let (control, dev_admin, dev_tls) = (free_addr(), free_addr(), free_addr());
    let (proxy_admin, proxy_tls) = (free_addr(), free_addr());
    let (ctl, ctl_admin) = (free_addr(), free_addr());
    // A second fleet: `tollgate control` with its deployments on runtime hosts, and one
    // `tollgate runtime` host.
    let (fleet_ctl, fleet_admin, host_admin) = (free_addr(), free_addr(), free_addr());
    let prometheus =
        Prometheus::start(&[dev_admin, proxy_admin, ctl_admin, fleet_admin, host_admin]);
    let (mut dev, dev_proxy) = start_listening(|proxy| {
        let mut c = bin();
        c.env("TOLLGATE_TLS_LISTEN", dev_tls.to_string())
            .env("TOLLGATE_DATA_DIR", &dev_data)
            .env("TOLLGATE_TLS_CERT", &cert)
            .env("TOLLGATE_TLS_KEY", &key)
            .env("TOLLGATE_BOOK_POSTGRES_URL", pg.url())
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
            "[control]\nlisten = \"{ctl}\"\nadmin_listen = \"{ctl_admin}\"\ndata_dir = {:?}\n[redis]\nurl = \"{}\"\nkey_prefix = \"ctl\"\n[book]\npostgres_url = \"{}\"\n",
            dir.path().join("ctl").display().to_string(),
            redis.url(),
            pg.url(),
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
    let fleet_cfg = dir.path().join("fleet.toml");
    std::fs::write(
        &fleet_cfg,
        format!(
            "[control]\nlisten = \"{fleet_ctl}\"\nadmin_listen = \"{fleet_admin}\"\nruntime = \"hosts\"\n[redis]\nurl = \"{}\"\nkey_prefix = \"fleet\"\n[host]\nid = \"rt-metrics\"\nadmin_listen = \"{host_admin}\"\n",
            redis.url(),
        ),
    )
    .unwrap();
    let mut fleet_proc = Proc(
        with_payment_secrets(&mut bin())
            .args(["control", "--config"])
            .arg(&fleet_cfg)
            .spawn()
            .unwrap(),
    );
    wait_for_control(fleet_ctl, &mut fleet_proc);
    let mut host_proc = Proc(
        bin()
            .args(["runtime", "--config"])
            .arg(&fleet_cfg)
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !reqwest::blocking::get(format!("http://{host_admin}/readyz"))
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(
            host_proc.0.try_wait().unwrap().is_none(),
            "the runtime host exited"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the runtime host never became ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The fleet's control sees it (its rescheduling rounds count live hosts).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !scrape(fleet_admin).contains("tollgate_runtime_hosts 1") {
        assert!(
            std::time::Instant::now() < deadline,
            "control never counted the host"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
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

    // The runtime reads its processes' memory once a second: wait for a reading.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !scrape(dev_admin).lines().any(|l| {
        l.strip_prefix("tollgate_runtime_memory_bytes ")
            .and_then(|v| v.trim().parse::<f64>().ok())
            .is_some_and(|v| v > 1e6)
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "no memory reading of the workerd process"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let scrapes = [
        ("dev", scrape(dev_admin)),
        ("proxy", scrape(proxy_admin)),
        ("control", scrape(ctl_admin)),
        ("control", scrape(fleet_admin)),
        ("runtime", scrape(host_admin)),
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
    assert!(value("tollgate_runtime_cpu_seconds_total") > 0.0);
    // One workerd process holds at least some megabytes resident.
    assert!(value("tollgate_runtime_memory_bytes") > 1e6);
    assert_eq!(value("tollgate_ready"), 1.0);
    assert!(value("tollgate_metered_requests_total") >= 20.0);
    assert_eq!(
        value("tollgate_payment_credentials_total{action=\"unknown\",result=\"rejected\"}"),
        1.0
    );
    assert!(value("tollgate_cached_accounts") >= 1.0);
    assert!(value("tollgate_book_lines_total{result=\"inserted\"}") > 0.0);
    assert_eq!(value("tollgate_suspended_accounts"), 0.0);

    let mut problems = Vec::new();
    // A process kind exports a metric when one of its configurations does (`control` runs its
    // deployments itself or on runtime hosts).
    let mut by_kind: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (process, text) in &scrapes {
        let exported = parse(text);
        by_kind
            .entry(process)
            .or_default()
            .extend(exported.keys().cloned());
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
    }
    for (process, exported) in &by_kind {
        for (name, e) in &cat {
            if e.exported_by.contains(*process) && !exported.contains(name) {
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

    // The book of record holds dev's ledger, line for line (it copies within a second; the
    // ledger keeps growing while settles and lease returns go on, so compare until they meet).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (store, book) = rt.block_on(async {
        let store = tollgate_metering::RedisStore::connect(
            &redis.url(),
            "tollgate",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        let book = tollgate_book::Book::connect(&pg.url(), "tollgate")
            .await
            .unwrap();
        (store, book)
    });
    rt.block_on(async {
        let key = |e: &tollgate_metering::LedgerEntry| {
            (e.key.clone(), e.account.clone(), e.kind.clone(), e.amount)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            use tollgate_metering::Store;
            let mut ledger: Vec<_> = store.ledger().await.unwrap().iter().map(key).collect();
            let mut booked: Vec<_> = book.lines().await.unwrap().iter().map(key).collect();
            ledger.sort();
            booked.sort();
            if !ledger.is_empty() && ledger == booked {
                assert!(ledger.iter().any(|l| l.2 == "credit"), "{ledger:?}");
                assert!(ledger.iter().any(|l| l.2 == "settle"), "{ledger:?}");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the book never matched the ledger: {} lines vs {}",
                booked.len(),
                ledger.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    assert!(terminate(&mut host_proc).success());
    assert!(terminate(&mut fleet_proc).success());
    assert!(terminate(&mut ctl_proc).success());
    assert!(terminate(&mut proxy).success());
    assert!(terminate(&mut dev).success());

    // A Redis data loss after everything stopped, and `book rebuild` from the book and dev's
    // journals: every account comes back as it was.
    let cli = |args: &[&str]| {
        let o = bin()
            .env("TOLLGATE_REDIS_URL", redis.url())
            .env("TOLLGATE_BOOK_POSTGRES_URL", pg.url())
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "tollgate {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    cli(&["book", "copy"]);
    let ids: Vec<String> = rt
        .block_on(book.restore_set())
        .unwrap()
        .accounts
        .into_keys()
        .collect();
    let money = |store: &tollgate_metering::RedisStore| {
        use tollgate_metering::Store;
        rt.block_on(store.accounts(&ids))
            .unwrap()
            .into_iter()
            .map(|a| {
                let a = a.unwrap();
                (a.account, a.credited, a.debited, a.available, a.leased)
            })
            .collect::<Vec<_>>()
    };
    let before = money(&store);
    assert!(
        before.iter().any(|a| a.0 == "acct-m" && a.1 > 0),
        "{before:?}"
    );
    let mut c = redis.conn();
    redis::cmd("FLUSHALL").query::<()>(&mut c).unwrap();
    let out = cli(&["book", "rebuild", "--journal", dev_data.to_str().unwrap()]);
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    // dev's journals were found and their node's epoch restored.
    assert!(report["journals"].as_u64() >= Some(1), "{report}");
    let epochs: Vec<String> = redis::cmd("KEYS")
        .arg("tollgate:epoch:*")
        .query(&mut c)
        .unwrap();
    assert!(!epochs.is_empty(), "{report}");
    assert_eq!(report["warnings"], serde_json::json!([]), "{report}");
    assert_eq!(money(&store), before, "rebuilt balances differ");
    cli(&["book", "reconcile"]);
}

/// An OTLP/HTTP receiver: every request body sent to `/v1/traces`, as JSON.
struct Collector {
    addr: SocketAddr,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl Collector {
    fn start() -> Collector {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let store = bodies.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let store = store.clone();
                std::thread::spawn(move || {
                    let mut w = conn.try_clone().unwrap();
                    let mut r = BufReader::new(conn);
                    // HTTP/1.1 requests, one after another on this connection.
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                        let mut len = 0usize;
                        loop {
                            let mut h = String::new();
                            if r.read_line(&mut h).unwrap_or(0) == 0 {
                                return;
                            }
                            if h.trim().is_empty() {
                                break;
                            }
                            if let Some((k, v)) = h.split_once(':')
                                && k.eq_ignore_ascii_case("content-length")
                            {
                                len = v.trim().parse().unwrap();
                            }
                        }
                        let mut body = vec![0; len];
                        r.read_exact(&mut body).unwrap();
                        if path == "/v1/traces" {
                            store
                                .lock()
                                .unwrap()
                                .push(serde_json::from_slice(&body).unwrap());
                        }
                        let _ = w.write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
                        );
                    }
                });
            }
        });
        Collector { addr, bodies }
    }

    /// Every span received: (service.name, span).
    fn spans(&self) -> Vec<(String, serde_json::Value)> {
        let mut out = Vec::new();
        for b in self.bodies.lock().unwrap().iter() {
            for rs in b["resourceSpans"].as_array().into_iter().flatten() {
                let service = rs["resource"]["attributes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|a| a["key"] == "service.name")
                    .and_then(|a| a["value"]["stringValue"].as_str())
                    .unwrap_or_default()
                    .to_owned();
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    for s in ss["spans"].as_array().into_iter().flatten() {
                        out.push((service.clone(), s.clone()));
                    }
                }
            }
        }
        out
    }
}

/// A span attribute's string value.
fn attr<'a>(span: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)?["value"]["stringValue"]
        .as_str()
}

/// With an OTLP endpoint configured, an agent's deploy is one trace: the caller's
/// `traceparent` is the parent of the control service's HTTP span, under which the MCP tool
/// call, the deploy and its steps are children; the proxy's requests make no spans at all; no
/// secret of the deploy reaches the collector.
#[test]
fn an_agents_traceparent_reaches_the_exported_deploy_spans_and_the_proxy_exports_none() {
    let collector = Collector::start();
    let (control, admin) = (free_addr(), free_addr());
    let (mut dev, proxy) = start_listening(|proxy| {
        let mut c = bin();
        c.env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://{}", collector.addr),
        )
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .args(["dev", "--dev-account", "acct-t"])
        .args(["--chain-listen", &free_addr().to_string()])
        .args(["--proxy-listen", &proxy.to_string()])
        .args(["--control-listen", &control.to_string()])
        .args(["--admin-listen", &admin.to_string()]);
        c
    });
    wait_for_control(control, &mut dev);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let out = Command::new("node")
        .arg(mcp_js().join("call.mjs"))
        .arg(format!("http://{control}/mcp"))
        .arg("deploy_project")
        .arg(r#"{"project_name":"traced","files":{"src/index.ts":"export default { fetch() { return new Response('traced') } }"},"secrets":{"API_KEY":"sk-trace-secret-123"}}"#)
        .env("TRACEPARENT", format!("00-{trace}-{caller}-01"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("\"live\""), "{stdout}");
    // A tool the server does not have, with a name made to forge log lines: its span is named
    // `unknown`, the name itself goes nowhere.
    let evil = "no_such_tool\nlevel=ERROR forged";
    let _ = Command::new("node")
        .arg(mcp_js().join("call.mjs"))
        .arg(format!("http://{control}/mcp"))
        .arg(evil)
        .arg("{}")
        .output()
        .unwrap();
    // A request through the proxy, with a trace context of its own: the money gate answers it
    // (the account has no credit in this dev), on the request path that records no span.
    let proxied_trace = "0af7651916cd43dd8448eb211c80319c";
    let r = reqwest::blocking::Client::builder()
        .resolve("traced.localhost", proxy)
        .build()
        .unwrap()
        .get(format!("http://traced.localhost:{}/", proxy.port()))
        .header(
            "traceparent",
            format!("00-{proxied_trace}-b7ad6b7169203331-01"),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), 402);
    // The exit flushes what the batch has not sent yet.
    assert!(terminate(&mut dev).success());

    let spans = collector.spans();
    let names: Vec<String> = spans
        .iter()
        .map(|(_, s)| s["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    let find = |name: &str| {
        spans
            .iter()
            .map(|(_, s)| s)
            .find(|s| s["name"] == name && s["traceId"] == trace)
            .unwrap_or_else(|| panic!("no {name} span in trace {trace}; spans: {names:?}"))
    };
    assert!(spans.iter().all(|(svc, _)| svc == "tollgate-dev"));
    let call = find("tools/call deploy_project");
    assert_eq!(attr(call, "mcp.result"), Some("ok"));
    let deploy = find("control.deploy");
    assert_eq!(attr(deploy, "deploy.result"), Some("live"));
    assert_eq!(
        deploy["parentSpanId"], call["spanId"],
        "the deploy runs in the call"
    );
    let bundle = find("control.bundle");
    assert_eq!(bundle["parentSpanId"], deploy["spanId"]);
    find("control.go_live");
    // The HTTP span that carried the call is the child of the caller's span.
    let http = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s["spanId"] == call["parentSpanId"])
        .expect("the tool call's parent span was exported");
    assert_eq!(http["name"], "http.request");
    assert_eq!(http["parentSpanId"], caller);
    assert!(
        spans.iter().all(|(_, s)| s["traceId"] != proxied_trace),
        "the proxy's request path exports no span"
    );
    // Only the control side's spans, and HTTP spans only of the control listener's paths.
    for n in &names {
        assert!(
            n == "http.request"
                || n.starts_with("tools/call ")
                || n.starts_with("control.")
                || n.starts_with("payments."),
            "unexpected span {n:?}"
        );
    }
    for (_, s) in spans.iter().filter(|(_, s)| s["name"] == "http.request") {
        assert!(
            matches!(attr(s, "url.path"), Some("/mcp" | "/healthz")),
            "{s}"
        );
    }
    assert!(names.iter().any(|n| n == "tools/call unknown"), "{names:?}");
    let all = serde_json::to_string(&*collector.bodies.lock().unwrap()).unwrap();
    assert!(
        !all.contains("sk-trace-secret-123"),
        "a secret was exported"
    );
    assert!(!all.contains("forged"), "a caller's tool name was exported");
}
