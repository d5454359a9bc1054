//! Real workerd processes from the pinned toolchain, bundled by the real esbuild.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tollgate_bundler::{Bundler, BundlerConfig, Limits};
use tollgate_runtime::{
    CpuDelta, CpuSink, DeploymentSpec, Phase, RuntimeConfig, RuntimeError, RuntimeEvent,
    Supervisor, Toolchain,
};

#[derive(Default)]
struct Meter(Mutex<HashMap<String, u64>>);

impl CpuSink for Meter {
    fn record(&self, deltas: &[CpuDelta]) {
        let mut m = self.0.lock().unwrap();
        for d in deltas {
            *m.entry(d.deployment_id.to_string()).or_default() += d.cpu_us;
        }
    }
}

impl Meter {
    fn total(&self, id: &str) -> u64 {
        self.0.lock().unwrap().get(id).copied().unwrap_or(0)
    }
}

struct Rig {
    sup: Supervisor,
    events: tokio::sync::mpsc::UnboundedReceiver<RuntimeEvent>,
    meter: Arc<Meter>,
    bundler: Bundler,
    _dir: tempfile::TempDir,
}

fn rig_with(f: impl FnOnce(&mut RuntimeConfig)) -> Rig {
    let t = Toolchain::ensure(&Toolchain::source_tree_dir()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bundler = Bundler::new(BundlerConfig {
        esbuild: t.esbuild.clone(),
        node_modules: t.node_modules.clone(),
        packages: t.packages.clone(),
        work_dir: dir.path().join("builds"),
        limits: Limits::default(),
    })
    .unwrap();
    let mut cfg = RuntimeConfig {
        data_dir: dir.path().join("runtime"),
        sample_interval: Duration::from_millis(20),
        min_drain: Duration::from_millis(50),
        ..RuntimeConfig::default()
    };
    f(&mut cfg);
    let meter = Arc::new(Meter::default());
    let (sup, events) = Supervisor::new(cfg, t, meter.clone()).unwrap();
    Rig {
        sup,
        events,
        meter,
        bundler,
        _dir: dir,
    }
}

fn rig() -> Rig {
    rig_with(|_| {})
}

const APP: &str = r#"import { Hono } from 'hono'
import { greet } from './greet'
import info from './info.json'
type Env = { Bindings: { NAME: string, VERSION: string } }
const app = new Hono<Env>()
app.get('/', (c) => c.text(greet(c.env.NAME) + ' v' + c.env.VERSION))
app.get('/info', (c) => c.json(info))
app.get('/page', (c) => c.html(<h1>Hi {c.env.NAME}</h1>))
app.get('/log', (c) => { console.log('hello from the handler', c.req.query('n')); return c.text('logged') })
app.get('/throw', () => { throw new Error('handler exploded') })
app.get('/burn', (c) => {
  const ms = Number(c.req.query('ms') ?? '100'); const t = performance.now(); let x = 0
  while (performance.now() - t < ms) { x += Math.sqrt(x + 1) }
  return c.text('burned ' + (x > 0))
})
app.get('/spin', () => { let x = 0; for (;;) { x += 1 } })
app.get('/egress', async (c) => {
  try { const r = await fetch(c.req.query('url')!); return c.text('reached ' + r.status) }
  catch (e) { return c.text('refused: ' + e, 502) }
})
export default app
"#;

async fn deploy(rig: &Rig, id: &str, version: &str) -> Result<SocketAddr, RuntimeError> {
    let bundle = rig
        .bundler
        .bundle_raw([
            ("src/index.tsx", APP),
            (
                "src/greet.ts",
                "export const greet = (n: string) => `hello ${n}`",
            ),
            ("src/info.json", "{\"service\":\"demo\"}"),
        ])
        .await
        .unwrap();
    let started = rig.sup.start(spec(id, bundle.code, version)).await?;
    Ok(started.addr)
}

fn spec(id: &str, code: String, version: &str) -> DeploymentSpec {
    DeploymentSpec {
        deployment_id: id.to_owned(),
        project_id: "proj1".to_owned(),
        account_id: "acct1".into(),
        code,
        compatibility_date: "2025-01-01".to_owned(),
        env: BTreeMap::from([
            ("NAME".to_owned(), "tollgate \"quoted\"".to_owned()),
            ("VERSION".to_owned(), version.to_owned()),
        ]),
        databases: Vec::new(),
        d1: None,
    }
}

async fn get(addr: SocketAddr, path: &str) -> reqwest::Result<(u16, String, String)> {
    let r = reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(20))
        .send()
        .await?;
    let status = r.status().as_u16();
    let ctype = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    Ok((status, ctype, r.text().await?))
}

#[tokio::test]
async fn hono_tsx_app_serves_its_routes_with_env_bindings() {
    let rig = rig();
    let addr = deploy(&rig, "d1", "1").await.unwrap();
    assert_eq!(
        get(addr, "/").await.unwrap().2,
        "hello tollgate \"quoted\" v1"
    );
    let (s, ct, body) = get(addr, "/info").await.unwrap();
    assert_eq!((s, body.as_str()), (200, "{\"service\":\"demo\"}"));
    assert!(ct.starts_with("application/json"));
    let (_, ct, body) = get(addr, "/page").await.unwrap();
    assert!(ct.starts_with("text/html"));
    assert_eq!(body, "<h1>Hi tollgate &quot;quoted&quot;</h1>");
    let st = rig.sup.status("d1").unwrap();
    assert_eq!(st.phase, Phase::Running);
    assert!(st.cold_start_ms.unwrap() < 10_000);
    rig.sup.remove("d1", false).await.unwrap();
    assert!(get(addr, "/").await.is_err(), "process stopped");
    assert!(rig.sup.status("d1").is_none());
}

#[tokio::test]
async fn console_output_and_uncaught_errors_are_captured() {
    let rig = rig();
    let addr = deploy(&rig, "logs", "1").await.unwrap();
    get(addr, "/log?n=42").await.unwrap();
    assert_eq!(get(addr, "/throw").await.unwrap().0, 500);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (entries, _) = rig.sup.logs("logs", 0, 100).unwrap();
        let log = entries
            .iter()
            .find(|e| e.level == "log" && e.message == "hello from the handler 42");
        let err = entries
            .iter()
            .find(|e| e.level == "error" && e.message.contains("handler exploded"));
        if let (Some(log), Some(_)) = (log, err) {
            assert!(log.ts_ms > 1_700_000_000_000, "timestamped");
            // A cursor skips what was read.
            let after = rig.sup.logs("logs", log.seq + 1, 100).unwrap().0;
            assert!(after.iter().all(|e| e.seq > log.seq));
            break;
        }
        assert!(Instant::now() < deadline, "logs not captured: {entries:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rig.sup.shutdown().await;
}

#[tokio::test]
async fn tenant_cannot_reach_loopback_or_private_addresses() {
    let rig = rig();
    let addr = deploy(&rig, "egress", "1").await.unwrap();
    // A real listener on loopback that the tenant must not reach (as if it were Redis).
    let secret = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = secret.local_addr().unwrap();
    for (url, dest) in [
        (format!("http://{target}/"), target.to_string()),
        (
            format!("http://localhost:{}/", target.port()),
            format!("localhost:{}", target.port()),
        ),
        (
            format!("http://[::1]:{}/", target.port()),
            format!("::1:{}", target.port()),
        ),
        (
            format!("http://0.0.0.0:{}/", target.port()),
            format!("0.0.0.0:{}", target.port()),
        ),
        ("http://10.1.2.3/".to_owned(), "10.1.2.3:80".to_owned()),
        (
            "http://192.168.1.1/".to_owned(),
            "192.168.1.1:80".to_owned(),
        ),
        (
            "http://169.254.169.254/latest/meta-data/".to_owned(),
            "169.254.169.254:80".to_owned(),
        ),
    ] {
        let (status, _, body) = get(addr, &format!("/egress?url={url}")).await.unwrap();
        assert_eq!(status, 502, "{url}: {body}");
        assert!(body.starts_with("refused:"), "{url}: {body}");
        // Refused by the egress rule, not merely unreachable.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let logs = rig.sup.logs("egress", 0, 1000).unwrap().0;
            if logs.iter().any(|e| {
                e.message
                    .contains(&format!("connecting to {dest} is not allowed"))
            }) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{url}: no denial in the logs: {logs:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let accepted = tokio::time::timeout(Duration::from_millis(100), secret.accept()).await;
    assert!(accepted.is_err(), "the tenant connected to a loopback port");
    rig.sup.shutdown().await;
}

#[tokio::test]
async fn cpu_is_measured_within_ten_percent_of_the_kernels_count() {
    let rig = rig();
    let addr = deploy(&rig, "cpu", "1").await.unwrap();
    let st = rig.sup.status("cpu").unwrap();
    let pid = st.pid.unwrap();
    eprintln!("CPU accounting here: {:?}", st.limits);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let base_sink = rig.meter.total("cpu");
    let base_kernel = tollgate_runtime::cpu::proc_cpu_us(pid).unwrap();
    for _ in 0..4 {
        assert_eq!(get(addr, "/burn?ms=250").await.unwrap().0, 200);
    }
    tokio::time::sleep(Duration::from_millis(150)).await; // a few sample intervals
    let sink = rig.meter.total("cpu") - base_sink;
    let kernel = tollgate_runtime::cpu::proc_cpu_us(pid).unwrap() - base_kernel;
    let ratio = sink as f64 / kernel as f64;
    assert!(
        (0.9..=1.1).contains(&ratio),
        "charged {sink} µs, kernel counted {kernel} µs"
    );
    // The handler spun for 1 s of wall time; on a busy machine it gets less CPU, never more.
    assert!(
        (100_000..=1_100_000).contains(&sink),
        "charged {sink} µs for a 1 s burn"
    );
    assert!(rig.sup.status("cpu").unwrap().cpu_us_total >= sink);
    rig.sup.shutdown().await;
}

#[tokio::test]
async fn cpu_is_measured_from_proc_where_no_cgroup_is_used() {
    let rig = rig_with(|c| c.cgroups = tollgate_runtime::CgroupMode::Off);
    let addr = deploy(&rig, "cpu-proc", "1").await.unwrap();
    let st = rig.sup.status("cpu-proc").unwrap();
    assert_eq!(
        st.limits.accounting,
        Some(tollgate_runtime::CpuSourceKind::Proc)
    );
    assert_eq!((st.limits.memory, st.limits.cpu_share), (None, None));
    let pid = st.pid.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let base = rig.meter.total("cpu-proc");
    let base_kernel = tollgate_runtime::cpu::proc_cpu_us(pid).unwrap();
    for _ in 0..4 {
        assert_eq!(get(addr, "/burn?ms=250").await.unwrap().0, 200);
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let sink = rig.meter.total("cpu-proc") - base;
    let kernel = tollgate_runtime::cpu::proc_cpu_us(pid).unwrap() - base_kernel;
    // What is charged is what the kernel counted; how much CPU a 1 s spin gets depends on how
    // busy the machine is (a loaded CI machine gave it 0.45 s), never more than the wall time.
    let ratio = sink as f64 / kernel as f64;
    assert!(
        (0.9..=1.1).contains(&ratio),
        "charged {sink} µs, kernel counted {kernel} µs"
    );
    assert!(
        (100_000..=1_100_000).contains(&sink),
        "charged {sink} µs for a 1 s burn"
    );
    rig.sup.shutdown().await;
}

#[tokio::test]
async fn runaway_loop_is_killed_at_the_cap_and_the_deployment_restarts() {
    let rig = rig_with(|c| c.cpu_limit_per_request = Duration::from_millis(800));
    let addr = deploy(&rig, "spin", "1").await.unwrap();
    let inflight = rig.sup.inflight("spin").unwrap();
    let started = Instant::now();
    let guard = inflight.begin(); // what the proxy does for each request
    let r = get(addr, "/spin").await;
    drop(guard);
    assert!(r.is_err(), "the request was cut off: {r:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
    // It comes back on a new port and serves again.
    let mut rx = rig.events;
    let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    let st = rig.sup.status("spin").unwrap();
    assert_eq!(st.cpu_limit_kills, 1);
    let RuntimeEvent::Upstream {
        deployment_id,
        addr: new_addr,
    } = ev
    else {
        panic!("unexpected {ev:?}")
    };
    assert_eq!(deployment_id, "spin");
    assert_eq!(get(new_addr, "/").await.unwrap().0, 200);
    let logs = rig.sup.logs("spin", 0, 100).unwrap().0;
    assert!(
        logs.iter()
            .any(|e| e.level == "system" && e.message.contains("over the 800 ms limit"))
    );
    rig.sup.shutdown().await;
}

#[tokio::test]
async fn crashed_process_restarts_and_repeated_crashes_mark_it_failed() {
    let mut rig = rig_with(|c| c.max_restarts = 2);
    let addr = deploy(&rig, "crashy", "1").await.unwrap();
    let mut last = addr;
    for round in 1..=2 {
        let pid = rig.sup.status("crashy").unwrap().pid.unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(10), rig.events.recv())
            .await
            .unwrap()
            .unwrap();
        let RuntimeEvent::Upstream { addr, .. } = ev else {
            panic!("{ev:?}")
        };
        assert_ne!(addr, last);
        last = addr;
        assert_eq!(get(addr, "/").await.unwrap().0, 200, "round {round}");
        assert_eq!(rig.sup.status("crashy").unwrap().restarts, round);
    }
    let pid = rig.sup.status("crashy").unwrap().pid.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), rig.events.recv())
        .await
        .unwrap()
        .unwrap();
    let RuntimeEvent::Failed {
        deployment_id,
        reason,
    } = ev
    else {
        panic!("{ev:?}")
    };
    assert_eq!(deployment_id, "crashy");
    assert!(reason.contains("signal: 9"), "{reason}");
    let st = rig.sup.status("crashy").unwrap();
    assert_eq!(st.phase, Phase::Failed);
    assert!(st.failure.unwrap().contains("crashed 3 times"));
}

#[tokio::test]
async fn code_that_fails_at_startup_is_refused_with_the_reason() {
    let rig = rig();
    let err = rig
        .sup
        .start(spec(
            "bad",
            "throw new Error('top-level boom'); export default {}".to_owned(),
            "1",
        ))
        .await
        .unwrap_err();
    let RuntimeError::StartFailed(reason) = err else {
        panic!("{err:?}")
    };
    assert!(reason.contains("top-level boom"), "{reason}");
    assert!(rig.sup.status("bad").is_none(), "nothing half-registered");
}

/// Top-level module code that burns CPU before the worker exists: a fixed amount of work
/// (clocks do not advance while a module loads), about 0.4 s of one core on this machine.
fn burn_at_load(then: &str) -> String {
    format!(
        "let x = 0; for (let i = 0; i < 4e7; i++) {{ x += Math.sqrt(x + i) }}\n\
         {then}\n\
         export default {{ fetch() {{ return new Response('ok ' + (x > 0)) }} }}"
    )
}

#[tokio::test]
async fn module_code_and_start_up_are_billed_from_the_first_instruction() {
    for (mode, id) in [
        (tollgate_runtime::CgroupMode::Auto, "load-cg"),
        (tollgate_runtime::CgroupMode::Off, "load-proc"),
    ] {
        let rig = rig_with(|c| c.cgroups = mode);
        let started = rig
            .sup
            .start(spec(id, burn_at_load(""), "1"))
            .await
            .unwrap();
        // No request yet: whatever is charged is the start itself.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let charged = rig.meter.total(id);
        let kernel = tollgate_runtime::cpu::proc_cpu_us(started.pid).unwrap();
        assert!(kernel >= 50_000, "{id}: the load burned only {kernel} µs");
        // Everything the process used since it was created (the kernel's count) is charged,
        // the module's top-level loop and the readiness probe included.
        assert!(
            charged as f64 >= 0.9 * kernel as f64,
            "{id}: charged {charged} µs of the {kernel} µs the process used starting"
        );
        rig.sup.shutdown().await;
    }
}

#[tokio::test]
async fn a_start_that_fails_after_running_module_code_is_billed() {
    let rig = rig();
    let err = rig
        .sup
        .start(spec(
            "load-fail",
            burn_at_load("throw new Error('boom after burning')"),
            "1",
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("boom after burning"), "{err}");
    let charged = rig.meter.total("load-fail");
    assert!(
        charged >= 50_000,
        "a failed start ran ~0.4 s of module code and was charged {charged} µs"
    );
}

#[tokio::test]
async fn the_memory_limit_holds_for_module_code() {
    let rig = rig_with(|c| c.memory_limit_bytes = Some(96 * 1024 * 1024));
    // Where the host lets us set memory limits (checked on a small service first), a module
    // that allocates far past the limit at load time is stopped during its start.
    let small = rig
        .sup
        .start(spec(
            "mem-ok",
            "export default { fetch() { return new Response('ok') } }".into(),
            "1",
        ))
        .await
        .unwrap();
    let _ = small;
    if rig.sup.status("mem-ok").unwrap().limits.memory.is_none() {
        eprintln!("no writable memory controller here: the limit cannot be tested");
        return;
    }
    let hog = "const keep = []; for (let i = 0; i < 64; i++) { keep.push(new Uint8Array(16 * 1024 * 1024).fill(i + 1)) }\n\
               export default { fetch() { return new Response(String(keep.length)) } }";
    let err = rig.sup.start(spec("mem-hog", hog.into(), "1")).await;
    assert!(
        err.is_err(),
        "a module holding 1 GiB at load started under a 96 MiB limit"
    );
    rig.sup.shutdown().await;
}

#[tokio::test]
async fn invalid_specs_are_refused_before_anything_starts() {
    let rig = rig();
    let mut s = spec("x1", "export default {}".to_owned(), "1");
    s.env.insert("NOT-AN-IDENT".to_owned(), "v".to_owned());
    assert!(
        matches!(rig.sup.start(s).await, Err(RuntimeError::Invalid(m)) if m.contains("NOT-AN-IDENT"))
    );
    let mut s = spec("x1", "export default {}".to_owned(), "1");
    s.compatibility_date = "yesterday".to_owned();
    assert!(matches!(
        rig.sup.start(s).await,
        Err(RuntimeError::Invalid(_))
    ));
    let s = spec("../escape", "export default {}".to_owned(), "1");
    assert!(matches!(
        rig.sup.start(s).await,
        Err(RuntimeError::Invalid(_))
    ));
    assert!(rig.sup.list().is_empty());
}

/// The proxy's view, reduced to its essentials: requests go to the currently published address
/// and hold an in-flight guard. Redeploys under this traffic must not fail a single request.
#[tokio::test]
async fn redeploy_under_continuous_traffic_fails_no_request() {
    let rig = rig();
    let first = deploy(&rig, "v1", "1").await.unwrap();
    let route = Arc::new(Mutex::new((first, rig.sup.inflight("v1").unwrap())));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let route = route.clone();
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let (mut ok, mut failed, mut versions) =
                (0u32, Vec::new(), std::collections::BTreeSet::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (addr, inflight) = route.lock().unwrap().clone();
                let _guard = inflight.begin();
                match client.get(format!("http://{addr}/")).send().await {
                    Ok(r) if r.status() == 200 => {
                        ok += 1;
                        versions.insert(r.text().await.unwrap_or_default());
                    }
                    Ok(r) => failed.push(format!("status {}", r.status())),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed, versions)
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let bundle = rig
        .bundler
        .bundle_raw([
            ("src/index.tsx", APP),
            (
                "src/greet.ts",
                "export const greet = (n: string) => `hi ${n}`",
            ),
            ("src/info.json", "{}"),
        ])
        .await
        .unwrap();
    let mut old = "v1".to_owned();
    for v in 2..=3 {
        let id = format!("v{v}");
        // The control service's switch: start the new version, point the route at it, then
        // drain and stop the old one.
        let started = rig
            .sup
            .start(spec(&id, bundle.code.clone(), &v.to_string()))
            .await
            .unwrap();
        let inflight = rig.sup.inflight(&id).unwrap();
        *route.lock().unwrap() = (started.addr, inflight);
        rig.sup.stop(&old, true).await.unwrap();
        assert_eq!(rig.sup.status(&old).unwrap().phase, Phase::Stopped);
        old = id;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    let mut seen = std::collections::BTreeSet::new();
    for c in clients {
        let (ok, failed, versions) = c.await.unwrap();
        assert!(failed.is_empty(), "failed requests: {failed:?}");
        total += ok;
        seen.extend(versions);
    }
    assert!(total > 50, "only {total} requests");
    assert!(
        seen.contains("hello tollgate \"quoted\" v1") && seen.contains("hi tollgate \"quoted\" v3"),
        "{seen:?}"
    );
    rig.sup.shutdown().await;
}

#[tokio::test]
async fn idle_deployment_stops_and_the_next_request_starts_it_again() {
    let mut rig = rig_with(|c| c.idle_timeout = Some(Duration::from_millis(300)));
    let addr = deploy(&rig, "sleepy", "1").await.unwrap();
    assert_eq!(get(addr, "/").await.unwrap().0, 200);
    // Goes idle: the process stops and an activator takes its place in the route.
    let ev = tokio::time::timeout(Duration::from_secs(10), rig.events.recv())
        .await
        .unwrap()
        .unwrap();
    let RuntimeEvent::Upstream {
        addr: activator, ..
    } = ev
    else {
        panic!("{ev:?}")
    };
    // The route moves first; the process stops once that has propagated.
    let deadline = Instant::now() + Duration::from_secs(5);
    while rig.sup.status("sleepy").unwrap().phase != Phase::Idle {
        assert!(Instant::now() < deadline, "never went idle");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let st = rig.sup.status("sleepy").unwrap();
    assert_eq!(
        (st.phase, st.pid, st.addr),
        (Phase::Idle, None, Some(activator))
    );
    assert!(get(addr, "/").await.is_err(), "the old process is gone");
    let cold_before = st.cold_start_ms;

    // The next request, sent to the activator, is served by a freshly started process.
    let (status, _, body) = get(activator, "/").await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "hello tollgate \"quoted\" v1")
    );
    let ev = tokio::time::timeout(Duration::from_secs(10), rig.events.recv())
        .await
        .unwrap()
        .unwrap();
    let RuntimeEvent::Upstream { addr: fresh, .. } = ev else {
        panic!("{ev:?}")
    };
    assert_ne!(fresh, activator);
    let st = rig.sup.status("sleepy").unwrap();
    assert_eq!(st.phase, Phase::Running);
    assert!(st.cold_start_ms.is_some() && st.pid.is_some());
    assert!(cold_before.is_some());
    assert_eq!(get(fresh, "/").await.unwrap().0, 200);
    assert_eq!(st.restarts, 0, "an idle stop is not a crash");
    let logs = rig.sup.logs("sleepy", 0, 100).unwrap().0;
    assert!(
        logs.iter()
            .any(|e| e.message.starts_with("idle: process stopped"))
    );
    rig.sup.shutdown().await;
}

#[tokio::test]
async fn steady_overlapping_traffic_is_not_mistaken_for_a_runaway_request() {
    let rig = rig_with(|c| c.cpu_limit_per_request = Duration::from_millis(500));
    let addr = deploy(&rig, "busy", "1").await.unwrap();
    let inflight = rig.sup.inflight("busy").unwrap();
    // Four clients keep requests of ~20 ms CPU overlapping for 3 s: far more CPU than the cap
    // in total, while every single request stays far below it.
    let mut clients = Vec::new();
    for _ in 0..4 {
        let inflight = inflight.clone();
        clients.push(tokio::spawn(async move {
            let t = Instant::now();
            let mut n = 0;
            while t.elapsed() < Duration::from_secs(3) {
                let _g = inflight.begin();
                assert_eq!(get(addr, "/burn?ms=20").await.unwrap().0, 200);
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for c in clients {
        total += c.await.unwrap();
    }
    let st = rig.sup.status("busy").unwrap();
    assert!(
        st.cpu_us_total > 1_000_000,
        "only {} µs of CPU",
        st.cpu_us_total
    );
    assert_eq!(
        st.cpu_limit_kills, 0,
        "killed a healthy busy service after {total} requests"
    );
    rig.sup.shutdown().await;
}

#[tokio::test]
async fn an_idle_stop_waits_for_requests_in_flight() {
    let mut rig = rig_with(|c| c.idle_timeout = Some(Duration::from_millis(300)));
    let addr = deploy(&rig, "slowidle", "1").await.unwrap();
    let inflight = rig.sup.inflight("slowidle").unwrap();
    // Requests come and go through the guard, as from the proxy; then silence.
    for _ in 0..3 {
        let _g = inflight.begin();
        assert_eq!(get(addr, "/").await.unwrap().0, 200);
    }
    let ev = tokio::time::timeout(Duration::from_secs(10), rig.events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(ev, RuntimeEvent::Upstream { .. }),
        "went idle after guarded requests: {ev:?}"
    );
    rig.sup.shutdown().await;
}

#[test]
fn deployment_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let rig = rig();
        deploy(&rig, "perms", "1").await.unwrap();
        let dir = rig._dir.path().join("runtime/deployments/perms");
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let cfg = dir.join("config.capnp");
        assert_eq!(
            std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777,
            0o600
        );
        rig.sup.stop("perms", false).await.unwrap();
        assert!(!cfg.exists(), "secrets removed once stopped");
    });
}

/// A CPU sink that takes its time once `slow` is set (a money store answering slowly).
#[derive(Default)]
struct SlowMeter {
    slow: std::sync::atomic::AtomicBool,
    recorded_slowly: std::sync::atomic::AtomicU64,
}

impl CpuSink for SlowMeter {
    fn record(&self, _deltas: &[CpuDelta]) {
        use std::sync::atomic::Ordering;
        if self.slow.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(300));
            self.recorded_slowly.fetch_add(1, Ordering::AcqRel);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_waits_for_a_stop_already_under_way_elsewhere() {
    use std::sync::atomic::Ordering;
    let t = Toolchain::ensure(&Toolchain::source_tree_dir()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bundler = Bundler::new(BundlerConfig {
        esbuild: t.esbuild.clone(),
        node_modules: t.node_modules.clone(),
        packages: t.packages.clone(),
        work_dir: dir.path().join("builds"),
        limits: Limits::default(),
    })
    .unwrap();
    let meter = Arc::new(SlowMeter::default());
    let cfg = RuntimeConfig {
        data_dir: dir.path().join("runtime"),
        sample_interval: Duration::from_millis(20),
        min_drain: Duration::from_millis(50),
        ..RuntimeConfig::default()
    };
    let (sup, _events) = Supervisor::new(cfg, t, meter.clone()).unwrap();
    let bundle = bundler
        .bundle_raw([(
            "src/index.ts",
            "export default { fetch() { return new Response('ok') } }",
        )])
        .await
        .unwrap();
    sup.start(spec("busy", bundle.code, "1")).await.unwrap();
    // The store turns slow, and a redeploy's background removal takes the deployment's task
    // just before the process is told to stop.
    meter.slow.store(true, Ordering::Release);
    let remover = {
        let sup = sup.clone();
        tokio::spawn(async move { sup.remove("busy", false).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    sup.shutdown().await;
    // Returned only once the deployment's last CPU sample was recorded.
    assert!(
        meter.recorded_slowly.load(Ordering::Acquire) >= 1,
        "shutdown returned before the last CPU sample was recorded"
    );
    remover.await.unwrap().unwrap();
}

/// The test re-runs itself in a child process (marked by an env var) that plays the supervisor: it
/// deploys, prints the workerd pid, and waits to be killed with -9.
#[test]
fn workerd_processes_die_with_their_supervisor() {
    use std::io::BufRead;
    if std::env::var_os("TOLLGATE_TEST_SUPERVISOR_CHILD").is_some() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let rig = rig();
            deploy(&rig, "orphan", "1").await.unwrap();
            let pid = rig.sup.status("orphan").unwrap().pid.unwrap();
            println!("WORKERD_PID {pid}");
            use std::io::Write;
            std::io::stdout().flush().unwrap();
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        return;
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .env("TOLLGATE_TEST_SUPERVISOR_CHILD", "1")
        .args([
            "--exact",
            "workerd_processes_die_with_their_supervisor",
            "--nocapture",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut pid = None;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(p) = line.strip_prefix("WORKERD_PID ") {
            pid = Some(p.trim().parse::<u32>().unwrap());
            break;
        }
    }
    let pid = pid.expect("the helper started a deployment");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    child.kill().unwrap(); // SIGKILL: no cleanup code runs in the supervisor
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false);
        if !alive {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "workerd {pid} outlived its supervisor"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
