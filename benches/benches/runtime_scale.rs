//! Runtime numbers, printed as a table: bundle time of a small Hono app (3 files, TSX); process
//! start → first 200; idle memory (PSS) per deployment at 1, 10 and 100 deployments; requests/s
//! straight into one workerd process (closed loop, 32 connections, 5 s); cold start of an
//! idle-stopped deployment on its next request.
//! Run: `cargo bench -p tollgate-benches --bench runtime_scale`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tollgate_runtime::{DeploymentSpec, RuntimeConfig, Supervisor, Toolchain};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const APP: [(&str, &str); 3] = [
    (
        "src/index.tsx",
        "import { Hono } from 'hono'\nimport { greet } from './greet'\nimport info from './info.json'\nconst app = new Hono()\napp.get('/', (c) => c.text(greet('world')))\napp.get('/info', (c) => c.json(info))\napp.get('/page', (c) => c.html(<h1>Hi</h1>))\nexport default app\n",
    ),
    (
        "src/greet.ts",
        "export const greet = (n: string): string => `hello ${n}`\n",
    ),
    ("src/info.json", "{\"service\":\"bench\"}\n"),
];

fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Closed-loop requests/s over 5 s (after 1 s of warm-up) from 32 concurrent connections.
async fn rps(client: &reqwest::Client, url: String, host: Option<&str>) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (client, url, stop, done) = (client.clone(), url.clone(), stop.clone(), done.clone());
        let host = host.map(str::to_owned);
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut req = client.get(&url);
                if let Some(h) = &host {
                    req = req.header("host", h);
                }
                if let Ok(r) = req.send().await
                    && r.status() == 200
                    && r.bytes().await.is_ok()
                {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = done.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let n = done.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    n as f64 / 5.0
}

fn main() {
    tollgate_benches::run_probe("runtime_scale", run());
}

async fn run() -> Res<()> {
    let t = Toolchain::ensure(&Toolchain::source_tree_dir())?;
    let dir = tempfile::tempdir()?;
    let bundler = tollgate_control::bundler_for(&t, dir.path().join("builds"))?;

    // 1. Bundle time.
    let mut times = Vec::new();
    let mut code = String::new();
    for _ in 0..20 {
        let t0 = Instant::now();
        let b = bundler.bundle_raw(APP).await?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        code = b.code;
    }
    println!(
        "bundle, Hono + TSX, 3 files ({} KB out): p50 {:.1} ms, max {:.1} ms (20 runs)",
        code.len() / 1024,
        pct(&mut times, 0.5),
        pct(&mut times, 1.0)
    );

    let cfg = RuntimeConfig {
        data_dir: dir.path().join("runtime"),
        ..RuntimeConfig::default()
    };
    let (sup, _events) = Supervisor::new(cfg, t, Arc::new(tollgate_runtime::NoCpuSink))?;
    let spec = |id: String| DeploymentSpec {
        deployment_id: id,
        project_id: "bench".into(),
        account_id: "acct1".into(),
        code: code.clone(),
        compatibility_date: "2025-01-01".into(),
        env: BTreeMap::new(),
        databases: Vec::new(),
        d1: None,
    };
    let client = reqwest::Client::new();

    // 2. Start → first 200.
    let mut starts = Vec::new();
    for i in 0..10 {
        let t0 = Instant::now();
        let s = sup.start(spec(format!("cold{i}"))).await?;
        let r = client.get(format!("http://{}/", s.addr)).send().await?;
        if r.status() != 200 {
            return Err(format!("status {}", r.status()).into());
        }
        starts.push(t0.elapsed().as_secs_f64() * 1e3);
        sup.remove(&format!("cold{i}"), false).await?;
    }
    println!(
        "process start → first 200: p50 {:.0} ms, max {:.0} ms (10 starts, one at a time)",
        pct(&mut starts, 0.5),
        pct(&mut starts, 1.0)
    );

    // 3. Idle PSS per deployment.
    let mut running = 0;
    for target in [1usize, 10, 100] {
        let t0 = Instant::now();
        while running < target {
            sup.start(spec(format!("idle{running}"))).await?;
            running += 1;
        }
        let started = t0.elapsed();
        // Touch each once so every process has served a request, then let them idle.
        for s in sup.list() {
            if let Some(a) = s.addr {
                client.get(format!("http://{a}/")).send().await?;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let pss: Vec<u64> = sup
            .list()
            .iter()
            .filter_map(|s| s.pid)
            .map(pss_kib)
            .collect();
        let total: u64 = pss.iter().sum();
        println!(
            "{target:>3} deployments: PSS {:.1} MiB total, {:.1} MiB each (started in {:.1} s)",
            total as f64 / 1024.0,
            total as f64 / 1024.0 / pss.len() as f64,
            started.as_secs_f64()
        );
    }
    sup.shutdown().await;

    // 4. Requests/s into one process, directly and through the proxy (same run).
    let s = sup.start(spec("rps".into())).await?;
    let mut opts = tollgate_proxy::ProxyOptions::default();
    opts.proxy.listen = tollgate_testkit::free_addr();
    opts.admin.listen = tollgate_testkit::free_addr();
    opts.proxy.threads = 1;
    opts.routes = vec![tollgate_proxy::StaticRoute {
        host: "bench.localhost".into(),
        upstreams: vec![s.addr],
    }];
    let proxy_addr = opts.proxy.listen;
    let proxy = tollgate_proxy::Proxy::prepare(opts, prometheus::Registry::new())
        .and_then(|p| p.start(&tokio::runtime::Handle::current()))
        .map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let direct = rps(&client, format!("http://{}/", s.addr), None).await;
    let via = rps(
        &client,
        format!("http://{proxy_addr}/"),
        Some("bench.localhost"),
    )
    .await;
    let direct2 = rps(&client, format!("http://{}/", s.addr), None).await;
    let via2 = rps(
        &client,
        format!("http://{proxy_addr}/"),
        Some("bench.localhost"),
    )
    .await;
    println!(
        "hello-world req/s, 32 connections from this probe on the same 2 cores: direct to workerd {direct:.0} / {direct2:.0}; through the proxy (1 thread) → workerd {via:.0} / {via2:.0} (ratio {:.2})",
        (via + via2) / (direct + direct2)
    );
    if let Some(st) = sup.status("rps")
        && st.restarts > 0
    {
        return Err(format!(
            "the workerd process restarted during the run: {:?}",
            st.last_exit
        )
        .into());
    }
    proxy.shutdown(tollgate_proxy::Stop::Fast).await;
    sup.shutdown().await;

    // 5. Cold start of an idle-stopped deployment: first request at its activator → 200.
    let cfg = RuntimeConfig {
        data_dir: dir.path().join("runtime-idle"),
        idle_timeout: Some(Duration::from_millis(200)),
        ..RuntimeConfig::default()
    };
    let t = Toolchain::ensure(&Toolchain::source_tree_dir())?;
    let (sup, mut events) = Supervisor::new(cfg, t, Arc::new(tollgate_runtime::NoCpuSink))?;
    sup.start(spec("idle".into())).await?;
    let mut colds = Vec::new();
    for _ in 0..10 {
        let activator = loop {
            match tokio::time::timeout(Duration::from_secs(10), events.recv()).await? {
                Some(tollgate_runtime::RuntimeEvent::Upstream { addr, .. })
                    if sup.status("idle").map(|s| s.phase)
                        == Some(tollgate_runtime::Phase::Idle) =>
                {
                    break addr;
                }
                Some(_) => continue,
                None => return Err("supervisor gone".into()),
            }
        };
        let t0 = Instant::now();
        let r = client.get(format!("http://{activator}/")).send().await?;
        if r.status() != 200 {
            return Err(format!("status {}", r.status()).into());
        }
        colds.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "idle → first request answered (cold start through the activator): p50 {:.0} ms, max {:.0} ms (10 wakes)",
        pct(&mut colds, 0.5),
        pct(&mut colds, 1.0)
    );
    sup.shutdown().await;
    Ok(())
}
