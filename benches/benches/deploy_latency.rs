//! Deploy latency, the control service's path from a tool call to a live URL: validate, bundle
//! (esbuild), start a workerd process, publish the route in Redis (the previous version drains in
//! the background). Redeploys of a small Hono app with `changes`, one after another; and read-only control
//! operations per second (`get_project`, which also reads usage). On one Redis, then on a 3 + 3
//! Redis Cluster (every control write waits for a replica) in the same run.
//! Run: `cargo bench -p tollgate-benches --bench deploy_latency`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate_control::{Control, ControlConfig, ControlStore, DeployRequest, RedisControlStore};
use tollgate_kv::Target;
use tollgate_routes::RouteStore;
use tollgate_runtime::{RuntimeConfig, Supervisor, Toolchain};
use tollgate_testkit::{RedisCluster, RedisServer};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    tollgate_benches::run_probe("deploy_latency", run());
}

async fn run() -> Res<()> {
    let redis = RedisServer::start();
    measure(Target::One(redis.url()), "one Redis").await?;
    drop(redis);
    let cluster = RedisCluster::start();
    let target = Target::Cluster {
        seeds: cluster.urls(),
        replica_acks: 1,
    };
    measure(target, "Redis Cluster 3+3").await
}

async fn measure(redis: Target, what: &str) -> Res<()> {
    let dir = tempfile::tempdir()?;
    let t = Toolchain::ensure(&Toolchain::source_tree_dir())?;
    let (sup, events) = Supervisor::new(
        RuntimeConfig {
            data_dir: dir.path().join("runtime"),
            ..RuntimeConfig::default()
        },
        t.clone(),
        Arc::new(tollgate_runtime::NoCpuSink),
    )?;
    let store: Arc<dyn ControlStore> =
        Arc::new(RedisControlStore::connect(&redis, "tollgate").await?);
    let control = Control::new(
        store,
        tollgate_control::bundler_for(&t, dir.path().join("builds"))?,
        sup.clone(),
        Arc::new(RouteStore::connect(&redis, "tollgate").await?),
        ControlConfig::default(),
    );
    tokio::spawn(control.clone().follow_runtime(events));
    let src = |n: u32| {
        format!(
            "import {{ Hono }} from 'hono'\nconst app = new Hono()\napp.get('/', (c) => c.text('version {n}'))\nexport default app\n"
        )
    };
    let t0 = Instant::now();
    let first = control
        .deploy(
            "bench",
            DeployRequest {
                files: Some(BTreeMap::from([("src/index.ts".to_owned(), src(0))])),
                ..DeployRequest::default()
            },
        )
        .await?;
    let first_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut times = Vec::new();
    for n in 1..=20 {
        let t0 = Instant::now();
        control
            .deploy(
                "bench",
                DeployRequest {
                    changes: Some(BTreeMap::from([("src/index.ts".to_owned(), Some(src(n)))])),
                    project_id: Some(first.project_id.clone()),
                    ..DeployRequest::default()
                },
            )
            .await?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "{what}: deploy (new project, Hono app) → live: {first_ms:.0} ms; redeploy with changes → live (the old version drains in the background): p50 {:.0} ms, max {:.0} ms (20 runs)",
        pct(&mut times, 0.5),
        pct(&mut times, 1.0)
    );
    let t0 = Instant::now();
    let mut n = 0u32;
    while t0.elapsed() < Duration::from_secs(3) {
        control.get_project("bench", &first.project_id).await?;
        n += 1;
    }
    println!(
        "{what}: get_project (project, deployments, env, 24 usage buckets from Redis): {:.0} per second, one caller",
        f64::from(n) / t0.elapsed().as_secs_f64()
    );
    sup.shutdown().await;
    Ok(())
}
