//! Runtime hosts (docs/scale-out.md): three `tollgate runtime` processes, a `tollgate proxy`
//! and the control service (as a library, on the same Redis). Deployments spread over the
//! hosts; a host killed with SIGKILL has its deployments moved and their URLs answer again
//! after a short gap (measured); a host stopped with SIGTERM hands its deployments over with no
//! failed request; a control service started again finds every deployment still running.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tollgate_control::hosts::{HostKeys, HostsRuntime, HostsRuntimeConfig};
use tollgate_control::{Control, ControlConfig, ControlStore, DeployRequest, RedisControlStore};
use tollgate_routes::RouteStore;
use tollgate_runtime::Toolchain;
use tollgate_testkit::{RedisServer, free_addr};

mod common;
use common::*;

struct Host {
    proc: Proc,
    id: String,
    log: PathBuf,
}

fn start_host(dir: &Path, redis: &str, id: &str) -> Host {
    let admin = free_addr();
    let cfg = dir.join(format!("{id}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[redis]\nurl = \"{redis}\"\n[host]\nid = \"{id}\"\nadmin_listen = \"{admin}\"\nlease_ms = 1000\nhandover_seconds = 15\n"
        ),
    )
    .unwrap();
    let log = dir.join(format!("{id}.log"));
    let mut c = bin();
    c.env("TOLLGATE_LOG_LEVEL", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .args(["runtime", "--config"])
        .arg(&cfg);
    let mut proc = Proc(c.spawn().unwrap());
    let http = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if matches!(http.get(format!("http://{admin}/readyz")).send(), Ok(r) if r.status() == 200) {
            break;
        }
        assert!(
            proc.0.try_wait().unwrap().is_none(),
            "host {id} exited: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(Instant::now() < deadline, "host {id} never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    Host {
        proc,
        id: id.to_owned(),
        log,
    }
}

fn files(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(
        "src/index.js".to_owned(),
        format!(
            "export default {{ async fetch() {{ console.log('served by {name}'); return new Response('hello from {name}') }} }}\n"
        ),
    )])
}

/// A control service over the suite's Redis, its deployments on runtime hosts.
async fn control(
    redis: &str,
    proxy: SocketAddr,
    dir: &Path,
) -> (
    Arc<Control>,
    Arc<HostsRuntime>,
    tokio::sync::watch::Sender<bool>,
) {
    let t = Toolchain::ensure(&Toolchain::source_tree_dir()).unwrap();
    let bundler = tollgate_control::bundler_for(&t, dir.join("builds")).unwrap();
    let store: Arc<dyn ControlStore> =
        Arc::new(RedisControlStore::connect(redis, "tollgate").await.unwrap());
    let routes = RouteStore::connect(redis, "tollgate").await.unwrap();
    let (hosts, events) = HostsRuntime::connect(
        redis,
        "tollgate",
        HostsRuntimeConfig {
            round: Duration::from_millis(100),
            ..HostsRuntimeConfig::default()
        },
    )
    .await
    .unwrap();
    let control = Control::new(
        store,
        bundler,
        hosts.clone(),
        Arc::new(routes),
        ControlConfig {
            url_template: format!("http://{{slug}}.localhost:{}", proxy.port()),
            ..ControlConfig::default()
        },
    );
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(control.clone().follow_runtime(events));
    tokio::spawn(hosts.clone().run(stop));
    (control, hosts, stop_tx)
}

/// Where each deployment is placed (deployment → host).
fn placed(redis: &RedisServer) -> HashMap<String, String> {
    use redis::Commands;
    redis
        .conn()
        .hgetall(HostKeys::new("tollgate").placed())
        .unwrap()
}

/// GETs `url` every 5 ms until told to stop: (when, status) of each answer (0: no answer).
fn probe(
    proxy: SocketAddr,
    host: &str,
    url: String,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<(Instant, u16)>> {
    let c = reqwest::blocking::Client::builder()
        .resolve(host, proxy)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        while !stop.load(Ordering::Acquire) {
            let status = c.get(&url).send().map_or(0, |r| r.status().as_u16());
            seen.push((Instant::now(), status));
            std::thread::sleep(Duration::from_millis(5));
        }
        seen
    })
}

#[test]
fn deployments_spread_over_hosts_and_survive_a_host_killed_or_stopped() {
    let redis = RedisServer::start();
    let url = redis.url();
    let dir = tempfile::Builder::new()
        .prefix("tollgate-hosts-test-")
        .tempdir()
        .unwrap()
        .keep();
    let mut hosts: Vec<Host> = ["rt-a", "rt-b", "rt-c"]
        .iter()
        .map(|id| start_host(&dir, &url, id))
        .collect();
    let (proxy_proc, proxy) = start_listening(|listen| {
        let mut c = bin();
        c.env("TOLLGATE_PUBLIC_MCP_URL", "http://mcp.localhost")
            .args(["proxy", "--listen", &listen.to_string()])
            .args(["--admin-listen", &free_addr().to_string()])
            .args(["--redis", &url]);
        c
    });
    assert!(
        credit_account(&url, "acct-h", "5.00", "hosts-test")
            .status
            .success()
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (control, runtime1, stop_control) = rt.block_on(control(&url, proxy, &dir));

    // Six projects over three hosts: two each.
    let mut projects = Vec::new();
    for i in 0..6 {
        let name = format!("svc-{i}");
        let out = rt
            .block_on(control.deploy(
                "acct-h",
                DeployRequest {
                    files: Some(files(&name)),
                    project_name: Some(name.clone()),
                    ..DeployRequest::default()
                },
            ))
            .unwrap_or_else(|e| panic!("deploy {name}: {e:?}; logs in {}", dir.display()));
        projects.push((name, out));
    }
    let where_ = placed(&redis);
    let mut per_host: HashMap<&str, usize> = HashMap::new();
    for (_, out) in &projects {
        *per_host
            .entry(where_[&out.deployment_id].as_str())
            .or_default() += 1;
    }
    assert_eq!(per_host.len(), 3, "{per_host:?}");
    assert!(per_host.values().all(|&n| n == 2), "{per_host:?}");
    let answers = |name: &str| -> (u16, String) {
        let host = format!("{name}.localhost");
        let c = reqwest::blocking::Client::builder()
            .resolve(&host, proxy)
            .build()
            .unwrap();
        get(&c, &format!("http://{host}:{}/", proxy.port()))
    };
    for (name, _) in &projects {
        assert_eq!(answers(name), (200, format!("hello from {name}")));
    }

    // Each host charges its processes' CPU through its own metering node (`settle:<host>:…`
    // batches in the ledger with CPU time on them), and the logs reach the agent's view.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        use redis::Commands;
        let entries: redis::streams::StreamRangeReply =
            redis.conn().xrange_all("tollgate:ledger").unwrap();
        let cpu_by_host = entries.ids.iter().any(|e| {
            e.get::<String>("key")
                .is_some_and(|k| k.starts_with("settle:rt-"))
                && e.get::<String>("lines").is_some_and(|l| {
                    serde_json::from_str::<Vec<serde_json::Value>>(&l)
                        .unwrap()
                        .iter()
                        .any(|l| l["account"] == "acct-h" && l["cpu_us"].as_u64() > Some(0))
                })
        });
        if cpu_by_host {
            break;
        }
        assert!(Instant::now() < deadline, "no host charged CPU to acct-h");
        assert_eq!(answers("svc-2").0, 200);
        std::thread::sleep(Duration::from_millis(100));
    }
    let logs = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let logs = control
                .logs("acct-h", &projects[2].1.project_id, 0, 100)
                .await
                .unwrap();
            if logs.iter().any(|l| l.message.contains("served by svc-2"))
                || Instant::now() > deadline
            {
                return logs;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert!(
        logs.iter().any(|l| l.message.contains("served by svc-2")),
        "{logs:?}"
    );

    // 1. A host killed under load: its deployments move; the URL answers again.
    let (victim_name, victim) = projects[0].clone();
    let victim_host = where_[&victim.deployment_id].clone();
    let stop = Arc::new(AtomicBool::new(false));
    let load = probe(
        proxy,
        &format!("{victim_name}.localhost"),
        format!("http://{victim_name}.localhost:{}/", proxy.port()),
        stop.clone(),
    );
    std::thread::sleep(Duration::from_millis(300));
    let h = hosts.iter().position(|h| h.id == victim_host).unwrap();
    let mut killed = hosts.remove(h);
    let killed_at = Instant::now();
    signal(&killed.proc.0, "-KILL");
    let _ = killed.proc.0.wait();
    let deadline = Instant::now() + Duration::from_secs(20);
    while answers(&victim_name).0 != 200 || placed(&redis)[&victim.deployment_id] == victim_host {
        assert!(
            Instant::now() < deadline,
            "the URL never answered again after its host was killed; logs in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Release);
    let seen = load.join().unwrap();
    let failed: Vec<_> = seen.iter().filter(|(_, s)| *s != 200).collect();
    let first_fail = failed.first().map(|(t, _)| *t);
    let last_fail = failed.last().map(|(t, _)| *t);
    let gap = match (first_fail, last_fail) {
        (Some(a), Some(b)) => b.duration_since(a),
        _ => Duration::ZERO,
    };
    eprintln!(
        "host killed: {} requests, {} failed, gap {:?} (from the kill to the last failure {:?})",
        seen.len(),
        failed.len(),
        gap,
        last_fail.map(|t| t.duration_since(killed_at))
    );
    // Every answer after the gap is the service's.
    let after = seen
        .iter()
        .skip_while(|(t, _)| Some(*t) <= last_fail)
        .count();
    assert!(after > 10, "too few answers after the gap: {after}");
    // Everything the lost host ran now runs elsewhere and answers.
    let where_ = placed(&redis);
    for (name, out) in &projects {
        assert_ne!(where_[&out.deployment_id], victim_host, "{name}");
        assert_eq!(answers(name), (200, format!("hello from {name}")));
    }

    // 2. The control service restarted (as after an upgrade): nothing restarts, nothing fails.
    let before = rt.block_on(async {
        let mut pids = Vec::new();
        for (_, out) in &projects {
            let s = tollgate_control::Runtime::status(&runtime1, &out.deployment_id)
                .await
                .unwrap();
            pids.push(s.pid);
        }
        pids
    });
    let stop_probe = Arc::new(AtomicBool::new(false));
    let load = probe(
        proxy,
        "svc-1.localhost",
        format!("http://svc-1.localhost:{}/", proxy.port()),
        stop_probe.clone(),
    );
    stop_control.send_replace(true);
    drop(control);
    let (control, runtime2, _stop2) = rt.block_on(self::control(&url, proxy, &dir));
    let recovered = rt.block_on(control.recover()).unwrap();
    assert_eq!(recovered, 6);
    let after: Vec<_> = rt.block_on(async {
        let mut pids = Vec::new();
        for (_, out) in &projects {
            let s = tollgate_control::Runtime::status(&runtime2, &out.deployment_id)
                .await
                .unwrap();
            pids.push(s.pid);
        }
        pids
    });
    assert_eq!(before, after, "a deployment was restarted by recovery");

    // 3. A host stopped with SIGTERM under load: it hands over, no request fails.
    let svc1 = &projects[1].1;
    let svc1_host = placed(&redis)[&svc1.deployment_id].clone();
    let h = hosts.iter().position(|h| h.id == svc1_host).unwrap();
    let mut leaving = hosts.remove(h);
    std::thread::sleep(Duration::from_millis(300));
    signal(&leaving.proc.0, "-TERM");
    let status = wait_exit(&mut leaving.proc.0, Duration::from_secs(60), "host");
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(&leaving.log).unwrap_or_default()
    );
    std::thread::sleep(Duration::from_millis(300));
    stop_probe.store(true, Ordering::Release);
    let seen = load.join().unwrap();
    let failed = seen.iter().filter(|(_, s)| *s != 200).count();
    eprintln!(
        "control restarted and a host stopped: {} requests, {failed} failed",
        seen.len()
    );
    assert_eq!(failed, 0, "requests failed while a host handed over");
    let where_ = placed(&redis);
    assert!(
        where_.values().all(|h| *h == hosts[0].id),
        "everything runs on the last host: {where_:?}"
    );
    for (name, _) in &projects {
        assert_eq!(answers(name), (200, format!("hello from {name}")));
    }

    // 4. The killed host comes back (same id): it runs nothing it lost, and takes new work.
    let back = start_host(&dir, &url, &killed.id);
    hosts.push(back);
    let out = rt
        .block_on(control.deploy(
            "acct-h",
            DeployRequest {
                files: Some(files("svc-new")),
                project_name: Some("svc-new".into()),
                ..DeployRequest::default()
            },
        ))
        .unwrap();
    assert_eq!(placed(&redis)[&out.deployment_id], killed.id);
    assert_eq!(answers("svc-new"), (200, "hello from svc-new".into()));
    drop(proxy_proc);
}
