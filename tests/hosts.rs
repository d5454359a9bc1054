//! Runtime hosts (docs/scale-out.md): three `tollgate runtime` processes, a `tollgate proxy`
//! and the control service (as a library, on the same Redis). Deployments spread over the
//! hosts; a host killed with SIGKILL has its deployments moved and their URLs answer again
//! after a short gap (measured); a host stopped with SIGTERM hands its deployments over with no
//! failed request; a control service started again finds every deployment still running.
//! The first two run on one Redis, or a Redis Cluster with `TOLLGATE_TEST_REDIS=cluster`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tollgate_control::DeployRequest;
use tollgate_control::hosts::HostKeys;
use tollgate_routes::RouteStore;
use tollgate_testkit::{RedisServer, TcpCut, TestRedis, free_addr};

mod common;
use common::hosts::*;
use common::*;

/// The workerd processes whose parent is `pid` (a runtime host's), as `pgrep` lists them.
fn workerd_of(pid: &str) -> String {
    let out = std::process::Command::new("pgrep")
        .args(["-P", pid, "workerd"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
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
    let redis = TestRedis::start();
    let url = &redis;
    let dir = tempfile::Builder::new()
        .prefix("tollgate-hosts-test-")
        .tempdir()
        .unwrap()
        .keep();
    let mut hosts: Vec<Host> = ["rt-a", "rt-b", "rt-c"]
        .iter()
        .map(|id| start_host(&dir, url, id))
        .collect();
    let (proxy_proc, proxy) = start_proxy(url);
    let credited = credit_account(url, "acct-h", "5.00", "hosts-test");
    assert!(credited.status.success(), "{credited:?}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (control, runtime1, stop_control, registry) =
        rt.block_on(control(redis.target(), proxy, &dir));

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
        let cpu_by_host = rt
            .block_on(ledger(&redis))
            .iter()
            .any(|e| e.key.starts_with("settle:rt-") && e.account == "acct-h" && e.cpu_us > 0);
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
    // What SREs see: one host lost, its two deployments running elsewhere, two hosts live.
    assert_eq!(
        sample(&registry, "tollgate_runtime_host_losses_total "),
        1.0
    );
    assert_eq!(
        sample(
            &registry,
            "tollgate_runtime_moves_total{result=\"running\"} "
        ),
        2.0
    );
    assert_eq!(sample(&registry, "tollgate_runtime_hosts "), 2.0);
    assert_eq!(
        sample(
            &registry,
            "tollgate_runtime_placements_total{result=\"placed\"} "
        ),
        6.0
    );
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
    let (control, runtime2, _stop2, _) = rt.block_on(self::control(redis.target(), proxy, &dir));
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

    // A route that lost track of its deployment (a lost event): the repair puts it back.
    rt.block_on(async {
        let routes = RouteStore::connect(redis.target(), "tollgate")
            .await
            .unwrap();
        let key = tollgate_routes::RouteKey::slug("svc-2").unwrap();
        let mut wrong = routes.get(&key).await.unwrap().unwrap();
        wrong.upstreams = vec![free_addr()];
        routes.put(&key, &wrong).await.unwrap();
    });
    // The proxy follows the broken route within milliseconds (the repair needs two rounds).
    let deadline = Instant::now() + Duration::from_secs(2);
    while answers("svc-2").0 != 502 {
        assert!(
            Instant::now() < deadline,
            "the broken route never reached the proxy"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The repair (every 500 ms here) puts it back after seeing it in two rounds.
    let deadline = Instant::now() + Duration::from_secs(10);
    while answers("svc-2") != (200, "hello from svc-2".into()) {
        assert!(Instant::now() < deadline, "the route was never repaired");
        std::thread::sleep(Duration::from_millis(50));
    }

    // 3. A host stopped with SIGTERM under load: it hands over, no request fails.
    let svc1 = &projects[1].1;
    let svc1_host = placed(&redis)[&svc1.deployment_id].clone();
    let h = hosts.iter().position(|h| h.id == svc1_host).unwrap();
    let mut leaving = hosts.remove(h);
    std::thread::sleep(Duration::from_millis(300));
    // (What the check below looks for is there now: the leaving host's workerd processes.)
    assert!(
        !workerd_of(&leaving.proc.0.id().to_string())
            .trim()
            .is_empty()
    );
    signal(&leaving.proc.0, "-TERM");
    // A successor started with the same id at once (a rolling restart that overlaps) holds no
    // lease, so runs nothing, until the leaving one is done: by the time it is ready, its
    // predecessor runs no workerd process any more.
    let predecessor = leaving.proc.0.id().to_string();
    let successor = std::thread::spawn({
        let (dir, url, id) = (dir.clone(), RedisName::from(&redis), leaving.id.clone());
        move || {
            let host = start_host(&dir, &url, &id);
            (host, workerd_of(&predecessor))
        }
    });
    let status = wait_exit(&mut leaving.proc.0, Duration::from_secs(60), "host");
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(&leaving.log).unwrap_or_default()
    );
    let (mut successor, still_running) = successor.join().unwrap();
    assert!(
        still_running.trim().is_empty(),
        "the successor took the lease while its predecessor still ran workerd: {still_running}"
    );
    signal(&successor.proc.0, "-TERM");
    assert!(wait_exit(&mut successor.proc.0, Duration::from_secs(60), "successor").success());
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

    // An orphan (a control process that died mid-deploy left it placed; nothing serves it) is
    // collected; the live deployments are not.
    let orphan = rt
        .block_on(tollgate_control::Runtime::start(
            &runtime2,
            tollgate_runtime::DeploymentSpec {
                deployment_id: "d_orphan".into(),
                project_id: projects[0].1.project_id.clone(),
                account_id: "acct-h".into(),
                code: "export default { async fetch() { return new Response('orphan') } }\n".into(),
                compatibility_date: "2025-09-01".into(),
                env: BTreeMap::new(),
                databases: Vec::new(),
                d1: None,
            },
        ))
        .unwrap();
    assert!(orphan.addr.port() > 0);
    assert!(placed(&redis).contains_key("d_orphan"));
    assert_eq!(rt.block_on(control.collect_orphans()).unwrap(), 1);
    assert!(!placed(&redis).contains_key("d_orphan"));
    assert_eq!(placed(&redis).len(), 6);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(orphan.addr).is_ok() {
        assert!(Instant::now() < deadline, "the orphan's process still runs");
        std::thread::sleep(Duration::from_millis(50));
    }

    // 4. The killed host comes back (same id): it runs nothing it lost, and takes new work.
    let back = start_host(&dir, url, &killed.id);
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

/// The test payer of the local test chain (no real money).
const PAYER_KEY: &str = "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a";

/// A deploy through the real mppx client, as the test payer: its structured result.
fn mppx_deploy(rpc: &str, mcp: &str, args: &serde_json::Value) -> serde_json::Value {
    mppx_mcp(rpc, PAYER_KEY, mcp, "deploy_project", &args.to_string())
        .into_iter()
        .next()
        .map(|l| l["structured"].clone())
        .unwrap()
}

fn mppx_top_up(rpc: &str, mcp: &str, usd: &str) {
    mppx_mcp(
        rpc,
        PAYER_KEY,
        mcp,
        "top_up",
        &format!(r#"{{"amount_usd":"{usd}"}}"#),
    );
}

fn version_files(v: u32) -> serde_json::Value {
    serde_json::json!({
        "src/index.js": format!("export default {{ async fetch() {{ return new Response('twin v{v}') }} }}\n")
    })
}

/// `tollgate control` twice on one Redis, deployments on runtime hosts: deploys of one project
/// through both at once are taken one after the other (the project lease), one instance stopped
/// with SIGTERM in the middle of a deploy finishes it and exits 0, the other goes on deploying,
/// and the service never fails a request.
#[test]
fn two_control_instances_share_the_fleet_and_one_stops_mid_deploy_without_a_failure() {
    let redis = TestRedis::start();
    let url = &redis;
    let redis_line = url.toml();
    let dir = tempfile::Builder::new()
        .prefix("tollgate-controls-test-")
        .tempdir()
        .unwrap()
        .keep();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let chain = rt
        .block_on(tollgate_testchain::TestChain::spawn(
            free_addr(),
            tollgate_testchain::ChainConfig::default(),
        ))
        .unwrap();
    let rpc = chain.url();
    let _hosts: Vec<Host> = ["rt-x", "rt-y"]
        .iter()
        .map(|id| start_host(&dir, url, id))
        .collect();
    let (_proxy_proc, proxy) = start_proxy(url);
    let start_control = |name: &str| -> (Proc, SocketAddr, PathBuf) {
        let (listen, admin) = (free_addr(), free_addr());
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[control]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\nruntime = \"hosts\"\npublic_url = \"http://{{slug}}.localhost:{}\"\n[redis]\n{redis_line}\n[payments]\nrpc_url = \"{rpc}\"\nallow_test_chain = true\n",
                proxy.port()
            ),
        )
        .unwrap();
        let log = dir.join(format!("{name}.log"));
        let mut c = bin();
        with_payment_secrets(&mut c)
            .env("TOLLGATE_PUBLIC_MCP_URL", "http://mcp.localhost")
            .env("TOLLGATE_LOG_LEVEL", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .args(["control", "--config"])
            .arg(&cfg);
        let mut p = Proc(c.spawn().unwrap());
        wait_for_control(listen, &mut p);
        (p, listen, log)
    };
    let (mut a, a_listen, a_log) = start_control("control-a");
    let (_b, b_listen, _) = start_control("control-b");
    let (mcp_a, mcp_b) = (
        format!("http://{a_listen}/mcp"),
        format!("http://{b_listen}/mcp"),
    );
    let http = reqwest::blocking::Client::new();
    fund(&http, &rpc, "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC");
    mppx_top_up(&rpc, &mcp_a, "3");

    let first = mppx_deploy(
        &rpc,
        &mcp_a,
        &serde_json::json!({"project_name": "twin", "prepay_usd": "0", "files": version_files(1)}),
    );
    assert_eq!(first["status"], "live", "{first}");
    let project_id = first["project_id"].as_str().unwrap().to_owned();
    let c = reqwest::blocking::Client::builder()
        .resolve("twin.localhost", proxy)
        .build()
        .unwrap();
    let service = format!("http://twin.localhost:{}/", proxy.port());
    assert_eq!(get(&c, &service), (200, "twin v1".into()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = probe(proxy, "twin.localhost", service.clone(), stop.clone());

    // Two deploys of the project at once, one through each instance: both go live, one after
    // the other (distinct versions), and the route serves the later one.
    let redeploy = |mcp: String, v: u32| {
        let (rpc, project_id) = (rpc.clone(), project_id.clone());
        std::thread::spawn(move || {
            mppx_deploy(
                &rpc,
                &mcp,
                &serde_json::json!({"project_id": project_id, "prepay_usd": "0", "files": version_files(v)}),
            )
        })
    };
    let (via_a, via_b) = (redeploy(mcp_a.clone(), 2), redeploy(mcp_b.clone(), 3));
    let (via_a, via_b) = (via_a.join().unwrap(), via_b.join().unwrap());
    assert_eq!(via_a["status"], "live", "{via_a}");
    assert_eq!(via_b["status"], "live", "{via_b}");
    let mut versions = [via_a["version"].as_u64(), via_b["version"].as_u64()];
    versions.sort();
    assert_eq!(versions, [Some(2), Some(3)]);
    let last = if via_a["version"] == 3 { 2 } else { 3 };
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&c, &service) != (200, format!("twin v{last}")) {
        assert!(
            Instant::now() < deadline,
            "the later deploy is not what serves"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Instance A stopped with SIGTERM while a deploy through it is under way: it finishes it.
    let in_flight = redeploy(mcp_a.clone(), 4);
    let record = format!("{}:ctl:project:{project_id}", redis.prefix("tollgate"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let json = redis.get(&record).unwrap();
        let p: serde_json::Value = serde_json::from_str(&json).unwrap();
        if p["deployments"].as_array().unwrap().len() == 4 {
            break;
        }
        assert!(Instant::now() < deadline, "the fourth deploy never began");
        std::thread::sleep(Duration::from_millis(5));
    }
    signal(&a.0, "-TERM");
    let v4 = in_flight.join().unwrap();
    assert_eq!(v4["status"], "live", "{v4}");
    let status = wait_exit(&mut a.0, Duration::from_secs(60), "control A");
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(&a_log).unwrap_or_default()
    );
    assert_eq!(get(&c, &service), (200, "twin v4".into()));

    // B goes on: a deploy through it, and the background rounds are its now.
    let v5 = mppx_deploy(
        &rpc,
        &mcp_b,
        &serde_json::json!({"project_id": project_id, "prepay_usd": "0", "files": version_files(5)}),
    );
    assert_eq!(v5["status"], "live", "{v5}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&c, &service) != (200, "twin v5".into()) {
        assert!(Instant::now() < deadline, "v5 is not what serves");
        std::thread::sleep(Duration::from_millis(20));
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let holder = redis.get(&format!("{}:ctl:rounds", redis.prefix("tollgate")));
        if holder.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no instance took the background rounds over"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Release);
    let seen = load.join().unwrap();
    let failed: Vec<_> = seen.iter().filter(|(_, s)| *s != 200).collect();
    eprintln!(
        "two control instances, one stopped: {} requests, {} failed",
        seen.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{} requests failed", failed.len());
    drop(chain);
}

/// A host cut off from Redis (no FIN: its calls just hang) stops its processes within about a
/// lease, before its deployments start on another host, so no deployment runs, and is
/// charged, twice; the URL answers from the other host. Back in touch, the
/// host registers again and runs nothing it lost.
#[test]
fn a_host_cut_off_from_redis_stops_its_processes_and_its_deployments_move() {
    let redis = TestRedis::One(RedisServer::start());
    let url = redis.url();
    let cut = TcpCut::start(
        redis
            .url()
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .parse()
            .unwrap(),
    );
    let dir = tempfile::Builder::new()
        .prefix("tollgate-partition-test-")
        .tempdir()
        .unwrap()
        .keep();
    // rt-a reaches Redis through the cut; rt-b directly.
    let mut a = start_host(&dir, &format!("redis://{}", cut.addr()), "rt-a");
    let _b = start_host(&dir, &url, "rt-b");
    let (_proxy_proc, proxy) = start_proxy(&url);
    assert!(
        credit_account(&url, "acct-h", "5.00", "partition-test")
            .status
            .success()
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (control, runtime, _stop, registry) = rt.block_on(control(&url, proxy, &dir));
    let out = rt
        .block_on(control.deploy(
            "acct-h",
            DeployRequest {
                files: Some(files("cut")),
                project_name: Some("cut".into()),
                ..DeployRequest::default()
            },
        ))
        .unwrap();
    // The first placement goes to rt-a (equal room: the first id).
    assert_eq!(placed(&redis)[&out.deployment_id], "rt-a");
    let old_addr = rt
        .block_on(tollgate_control::Runtime::status(
            &runtime,
            &out.deployment_id,
        ))
        .unwrap()
        .addr
        .unwrap();
    let c = reqwest::blocking::Client::builder()
        .resolve("cut.localhost", proxy)
        .build()
        .unwrap();
    let service = format!("http://cut.localhost:{}/", proxy.port());
    assert_eq!(get(&c, &service), (200, "hello from cut".into()));

    let cut_at = Instant::now();
    cut.freeze();
    // Its process stops (nothing listens on its port any more)...
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(old_addr).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the cut-off host still runs its process: {}",
            std::fs::read_to_string(a.log.clone()).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let stopped_after = cut_at.elapsed();
    // ...and the service answers from rt-b.
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(&c, &service) != (200, "hello from cut".into()) {
        assert!(
            Instant::now() < deadline,
            "the service never came back on rt-b"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let back_after = cut_at.elapsed();
    eprintln!(
        "host cut off: its process stopped after {stopped_after:?}, the service answered again after {back_after:?}"
    );
    assert_eq!(placed(&redis)[&out.deployment_id], "rt-b");
    // It stopped before the service answered from the other host (no deployment ran on two
    // hosts), and within about the lease (2 s), not after Redis's client gave up for good.
    assert!(
        stopped_after <= back_after,
        "{stopped_after:?} vs {back_after:?}"
    );
    assert!(stopped_after < Duration::from_secs(5), "{stopped_after:?}");
    assert_eq!(
        sample(&registry, "tollgate_runtime_host_losses_total "),
        1.0
    );

    // Back in touch: rt-a holds a lease again and runs nothing.
    cut.thaw();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let lease = redis.get(&HostKeys::new("tollgate").alive("rt-a"));
        // A token, not a hand-over's `leaving:` mark.
        if lease.is_some_and(|l| !l.starts_with("leaving:")) {
            break;
        }
        assert!(a.proc.0.try_wait().unwrap().is_none(), "rt-a exited");
        assert!(Instant::now() < deadline, "rt-a never registered again");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(placed(&redis).values().all(|h| h == "rt-b"));
    signal(&a.proc.0, "-TERM");
    assert!(wait_exit(&mut a.proc.0, Duration::from_secs(30), "rt-a").success());
}
