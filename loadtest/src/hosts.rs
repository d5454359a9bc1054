//! `loadtest scenario hosts`: deployments on several `tollgate runtime` host processes, behind a
//! metered proxy node, placed by a control service (this process, on the same Redis). Measures
//! deploy latency, the spread and memory per host, and what the loss of a host costs: SIGKILL
//! of the busiest host while every deployment is probed, then SIGTERM of another (docs/scale-out.md).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tollgate_control::hosts::{HostKeys, HostsRuntime, HostsRuntimeConfig};
use tollgate_control::{Control, ControlConfig, ControlStore, DeployRequest, RedisControlStore};
use tollgate_runtime::Toolchain;
use tollgate_testkit::free_addr;

use crate::scenario::{Stack, Timing, timing};

#[derive(Debug, Serialize)]
pub struct HostsReport {
    pub scenario: &'static str,
    pub hosts: usize,
    pub deployments: usize,
    pub lease_ms: u64,
    /// One deploy through the control service: bundle, place, start on its host, route.
    pub deploy: Timing,
    pub per_host: BTreeMap<String, HostFigures>,
    pub killed: Loss,
    pub stopped: Handover,
}

#[derive(Debug, Serialize)]
pub struct HostFigures {
    pub deployments: usize,
    /// Resident memory of its workerd processes, summed (`tollgate_runtime_memory_bytes`).
    pub workerd_memory_mib: f64,
    /// The host process itself (`process_resident_memory_bytes`).
    pub host_memory_mib: f64,
}

#[derive(Debug, Serialize)]
pub struct Loss {
    pub host: String,
    pub deployments: usize,
    /// Per deployment of the killed host: from the SIGKILL to its first 200 after it.
    pub back_after: Timing,
    /// Probes of the other hosts' deployments that failed meanwhile (should be 0).
    pub others_failed: u64,
}

#[derive(Debug, Serialize)]
pub struct Handover {
    pub host: String,
    pub deployments: usize,
    /// From the SIGTERM to the process's exit.
    pub exit_ms: u64,
    /// Probes of every deployment during the hand-over that did not answer 200.
    pub failed: u64,
    pub probes: u64,
}

struct HostProc {
    id: String,
    child: std::process::Child,
    admin: SocketAddr,
}

impl Drop for HostProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `tollgate` binary: `path`, else the release build, else the debug build.
pub fn find_tollgate(path: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = path {
        return Ok(p);
    }
    for p in ["target/release/tollgate", "target/debug/tollgate"] {
        if Path::new(p).exists() {
            return Ok(PathBuf::from(p));
        }
    }
    anyhow::bail!("no tollgate binary: build it (cargo build --release) or pass --tollgate PATH")
}

async fn start_host(
    tollgate: &Path,
    dir: &Path,
    redis: &str,
    id: &str,
    lease_ms: u64,
) -> anyhow::Result<HostProc> {
    let admin = free_addr();
    let cfg = dir.join(format!("{id}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[redis]\nurl = \"{redis}\"\n[host]\nid = \"{id}\"\nadmin_listen = \"{admin}\"\nlease_ms = {lease_ms}\n[control]\nidle_stop_seconds = 0\n"
        ),
    )?;
    let child = std::process::Command::new(tollgate)
        .env("TOLLGATE_DATA_DIR", dir.join(id))
        .env("TOLLGATE_LOG_LEVEL", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{id}.log")))?)
        .args(["runtime", "--config"])
        .arg(&cfg)
        .spawn()?;
    let mut host = HostProc {
        id: id.to_owned(),
        child,
        admin,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if matches!(reqwest::get(format!("http://{admin}/readyz")).await, Ok(r) if r.status() == 200)
        {
            return Ok(host);
        }
        anyhow::ensure!(
            host.child.try_wait()?.is_none(),
            "runtime host {id} exited (log in {})",
            dir.display()
        );
        anyhow::ensure!(
            Instant::now() < deadline,
            "runtime host {id} never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn gauge(admin: SocketAddr, name: &str) -> f64 {
    let Ok(r) = reqwest::get(format!("http://{admin}/metrics")).await else {
        return 0.0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// What one probe of a deployment saw: (when, status; 0 for no answer).
type Seen = Vec<(Instant, u16)>;

fn probe(
    node: SocketAddr,
    host: String,
    stop: Arc<AtomicBool>,
    every: Duration,
) -> tokio::task::JoinHandle<Seen> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        let mut seen = Vec::new();
        while !stop.load(Ordering::Acquire) {
            let status = client
                .get(format!("http://{node}/"))
                .header("host", &host)
                .send()
                .await
                .map_or(0, |r| r.status().as_u16());
            seen.push((Instant::now(), status));
            tokio::time::sleep(every).await;
        }
        seen
    })
}

/// Where each deployment is placed (the hosts scenario runs on one Redis).
fn placed(redis: &tollgate_testkit::TestRedis) -> anyhow::Result<BTreeMap<String, String>> {
    use redis::Commands;
    let mut c = redis::Client::open(redis.url())?.get_connection()?;
    Ok(c.hgetall(HostKeys::new("tollgate").placed())?)
}

pub async fn hosts(
    tollgate: PathBuf,
    n_hosts: usize,
    deployments: usize,
    lease_ms: u64,
) -> anyhow::Result<HostsReport> {
    anyhow::ensure!(
        n_hosts >= 3,
        "--hosts: at least 3 (one is killed, one stopped)"
    );
    let mut stack = Stack::start().await?;
    let url = stack.redis.url();
    // Enough for every request and CPU of the run.
    stack
        .store
        .credit("acct-hosts", "loadtest-hosts", 1_000_000_000_000_000)
        .await?;
    let node = stack.add_node("node-hosts", 10_000_000_000).await?;
    let dir = tempfile::Builder::new()
        .prefix("tollgate-hosts-scenario-")
        .tempdir()?;
    let mut hosts = Vec::new();
    for i in 0..n_hosts {
        hosts.push(start_host(&tollgate, dir.path(), &url, &format!("rt-{i}"), lease_ms).await?);
    }
    let toolchain = Toolchain::ensure(&Toolchain::source_tree_dir())?;
    let bundler = tollgate_control::bundler_for(&toolchain, dir.path().join("builds"))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let store: Arc<dyn ControlStore> = Arc::new(
        RedisControlStore::connect(&url, "tollgate")
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))?,
    );
    let (runtime, events) =
        HostsRuntime::connect(&url, "tollgate", HostsRuntimeConfig::default()).await?;
    let control = Control::new(
        store,
        bundler,
        runtime.clone(),
        Arc::new(stack.routes.clone()),
        ControlConfig::default(),
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(control.clone().follow_runtime(events));
    tokio::spawn(runtime.clone().run(stop_rx));

    let mut deploy_us = Vec::new();
    let mut slugs = BTreeMap::new();
    for i in 0..deployments {
        let name = format!("svc-{i}");
        let t = Instant::now();
        let out = control
            .deploy(
                "acct-hosts",
                DeployRequest {
                    files: Some(BTreeMap::from([(
                        "src/index.js".to_owned(),
                        format!("export default {{ async fetch() {{ return new Response('{name}') }} }}\n"),
                    )])),
                    project_name: Some(name.clone()),
                    ..DeployRequest::default()
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("deploy {name}: {} ({})", e.message, e.hint))?;
        deploy_us.push(t.elapsed().as_micros() as u64);
        slugs.insert(out.deployment_id, out.slug);
    }
    // Let each host's memory reading catch up (once a second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let where_ = placed(&stack.redis)?;
    let mut per_host = BTreeMap::new();
    for h in &hosts {
        per_host.insert(
            h.id.clone(),
            HostFigures {
                deployments: where_.values().filter(|v| **v == h.id).count(),
                workerd_memory_mib: gauge(h.admin, "tollgate_runtime_memory_bytes").await
                    / 1048576.0,
                host_memory_mib: gauge(h.admin, "process_resident_memory_bytes").await / 1048576.0,
            },
        );
    }

    // Every deployment probed every 20 ms through the proxy node.
    let stop = Arc::new(AtomicBool::new(false));
    let mut probes = BTreeMap::new();
    for (dep, slug) in &slugs {
        probes.insert(
            dep.clone(),
            probe(
                node,
                format!("{slug}.localhost"),
                stop.clone(),
                Duration::from_millis(20),
            ),
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // SIGKILL the busiest host.
    let busiest = per_host
        .iter()
        .max_by_key(|(_, f)| f.deployments)
        .map(|(id, _)| id.clone())
        .unwrap_or_default();
    let victims: Vec<String> = where_
        .iter()
        .filter(|(_, h)| **h == busiest)
        .map(|(d, _)| d.clone())
        .collect();
    let k = hosts
        .iter()
        .position(|h| h.id == busiest)
        .ok_or_else(|| anyhow::anyhow!("no busiest host"))?;
    let mut killed = hosts.remove(k);
    let killed_at = Instant::now();
    killed.child.kill()?;
    killed.child.wait()?;
    // Until every victim answers again (bounded).
    let deadline = Instant::now() + Duration::from_secs(120);
    let client = reqwest::Client::builder().no_proxy().build()?;
    for dep in &victims {
        loop {
            let ok = client
                .get(format!("http://{node}/"))
                .header("host", format!("{}.localhost", slugs[dep]))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ok {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "deployment {dep} never came back"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The hand-over: SIGTERM the next host, while the probes go on.
    let leaving = hosts.remove(0);
    let leaving_id = leaving.id.clone();
    let leaving_deps = placed(&stack.redis)?
        .values()
        .filter(|h| **h == leaving_id)
        .count();
    let term_at = Instant::now();
    let pid = leaving.child.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()?;
    let mut leaving = leaving;
    let exit_deadline = Instant::now() + Duration::from_secs(120);
    while leaving.child.try_wait()?.is_none() {
        anyhow::ensure!(
            Instant::now() < exit_deadline,
            "the stopped host never exited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let exit_ms = term_at.elapsed().as_millis() as u64;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Release);

    let mut back_after = Vec::new();
    let mut others_failed = 0;
    let (mut handover_failed, mut handover_probes) = (0, 0);
    for (dep, task) in probes {
        let seen = task.await?;
        if victims.contains(&dep) {
            let back = seen
                .iter()
                .filter(|(t, s)| *t > killed_at && *t < term_at && *s == 200)
                .find(|(t, _)| {
                    // The first 200 after the last failure before the hand-over.
                    !seen
                        .iter()
                        .any(|(u, s)| *u > *t && *u < term_at && *s != 200)
                })
                .map(|(t, _)| t.duration_since(killed_at).as_micros() as u64);
            back_after.push(back.unwrap_or(u64::MAX));
        } else {
            others_failed += seen
                .iter()
                .filter(|(t, s)| *t > killed_at && *t < term_at && *s != 200)
                .count() as u64;
        }
        for (t, s) in &seen {
            if *t >= term_at {
                handover_probes += 1;
                if *s != 200 {
                    handover_failed += 1;
                }
            }
        }
    }
    stop_tx.send_replace(true);
    drop(killed);
    drop(hosts);
    stack.stop_nodes().await;
    Ok(HostsReport {
        scenario: "hosts",
        hosts: n_hosts,
        deployments,
        lease_ms,
        deploy: timing(deploy_us),
        per_host,
        killed: Loss {
            host: busiest,
            deployments: victims.len(),
            back_after: timing(back_after),
            others_failed,
        },
        stopped: Handover {
            host: leaving_id,
            deployments: leaving_deps,
            exit_ms,
            failed: handover_failed,
            probes: handover_probes,
        },
    })
}
