//! Database numbers, printed as a table. A point read (by primary key, 10,000 rows) and a
//! single-row insert (its own transaction), each timed sequentially (p50/p99 of 2,000 after 200
//! warm-up) on four paths, so each layer's cost shows as a ratio:
//!   1. rusqlite directly (same bundled SQLite, same pragmas);
//!   2. our executor (`run_query`: authorizer, limits, counters, JSON values);
//!   3. the D1 service over loopback HTTP (what workerd's binding calls), metering off and on;
//!   4. tenant code: a request into workerd whose handler calls `env.DB`, against the same
//!      worker answering without touching the database.
//!
//! Plus inserts with synchronous=FULL against NORMAL, and closed-loop point reads per second
//! through workerd (8 connections, one core for workerd).
//!
//! Run: `cargo bench -p tollgate-benches --bench database`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tollgate_database::{
    Databases, Limits, Meter, MeterRefusal, ResultsFormat, Service, Statement, Synchronous,
    TOKEN_HEADER, run_query,
};
use tollgate_runtime::{D1Access, DeploymentSpec, RuntimeConfig, Supervisor, Toolchain};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const ROWS: i64 = 10_000;
const N: usize = 2_000;
const WARM: usize = 200;

const WORKER: &str = r#"export default {
  async fetch(req, env) {
    const u = new URL(req.url)
    if (u.pathname === '/read') {
      const r = await env.DB.prepare('SELECT id, name FROM t WHERE id = ?1').bind(Number(u.searchParams.get('id'))).first()
      return Response.json(r)
    }
    if (u.pathname === '/write') {
      const r = await env.DB.prepare('INSERT INTO t (name) VALUES (?1)').bind('x').run()
      return Response.json({ id: r.meta.last_row_id })
    }
    return Response.json({ id: 1, name: 'plain' })
  }
}
"#;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// p50 and p99 (µs) of `N` sequential calls of `f`, after `WARM`.
fn time<F: FnMut(usize) -> Res<()>>(mut f: F) -> Res<(f64, f64)> {
    for i in 0..WARM {
        f(i)?;
    }
    let mut t = Vec::with_capacity(N);
    for i in 0..N {
        let t0 = Instant::now();
        f(i)?;
        t.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    Ok((pct(&mut t, 0.5), pct(&mut t, 0.99)))
}

async fn time_async<F, Fut>(mut f: F) -> Res<(f64, f64)>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Res<()>>,
{
    for i in 0..WARM {
        f(i).await?;
    }
    let mut t = Vec::with_capacity(N);
    for i in 0..N {
        let t0 = Instant::now();
        f(i).await?;
        t.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    Ok((pct(&mut t, 0.5), pct(&mut t, 0.99)))
}

fn row(name: &str, (p50, p99): (f64, f64), base: Option<(f64, f64)>) {
    match base {
        Some(b) => println!(
            "| {name} | {p50:.1} | {p99:.1} | {:.2}× |",
            p50 / b.0.max(0.001)
        ),
        None => println!("| {name} | {p50:.1} | {p99:.1} | |"),
    }
}

fn st(sql: &str, params: serde_json::Value) -> Res<Statement> {
    Ok(serde_json::from_value(
        json!({"sql": sql, "params": params}),
    )?)
}

fn seed(dbs: &Databases, project: &str) -> Res<()> {
    let db = dbs.get(project)?;
    run_query(
        &db,
        &[
            st(
                "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL)",
                json!([]),
            )?,
            st(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?1) \
                 INSERT INTO t (name) SELECT 'name-' || x FROM c",
                json!([ROWS]),
            )?,
        ],
        ResultsFormat::None,
    )
    .map_err(|e| e.to_string())?;
    Ok(())
}

struct Free;

#[async_trait::async_trait]
impl Meter for Free {
    async fn admit(&self, _: &str) -> Result<(), MeterRefusal> {
        Ok(())
    }
    fn charge(&self, _: &str, _: u64, _: u64, _: u64) {}
}

fn main() {
    tollgate_benches::run_probe("database", run());
}

async fn run() -> Res<()> {
    let dir = tempfile::tempdir()?;
    println!("| path | p50 µs | p99 µs | p50 vs rusqlite |");
    println!("|---|---:|---:|---:|");

    // 1. rusqlite directly.
    let direct = |sync: &str, name: &str| -> Res<rusqlite::Connection> {
        let c = rusqlite::Connection::open(dir.path().join(name))?;
        c.pragma_update(None, "journal_mode", "WAL")?;
        c.pragma_update(None, "synchronous", sync)?;
        c.execute_batch(&format!(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
             WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {ROWS})
             INSERT INTO t (name) SELECT 'name-' || x FROM c;"
        ))?;
        Ok(c)
    };
    let c = direct("FULL", "direct-full.sqlite")?;
    let read_direct = time(|i| {
        let mut s = c.prepare_cached("SELECT id, name FROM t WHERE id = ?1")?;
        let _: (i64, String) =
            s.query_row([(i as i64 % ROWS) + 1], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(())
    })?;
    row("point read, rusqlite", read_direct, None);
    let insert_full_direct = time(|_| {
        let mut s = c.prepare_cached("INSERT INTO t (name) VALUES (?1)")?;
        s.execute(["x"])?;
        Ok(())
    })?;
    let cn = direct("NORMAL", "direct-normal.sqlite")?;
    let insert_normal_direct = time(|_| {
        let mut s = cn.prepare_cached("INSERT INTO t (name) VALUES (?1)")?;
        s.execute(["x"])?;
        Ok(())
    })?;
    drop((c, cn));

    // 2. Our executor.
    let full = Limits::default();
    let normal = Limits {
        synchronous: Synchronous::Normal,
        ..Limits::default()
    };
    let dbs = Databases::open(dir.path().join("full"), full)?;
    let dbs_normal = Databases::open(dir.path().join("normal"), normal)?;
    seed(&dbs, "bench")?;
    seed(&dbs_normal, "bench")?;
    let db = dbs.get("bench")?;
    let read_exec = time(|i| {
        run_query(
            &db,
            &[st(
                "SELECT id, name FROM t WHERE id = ?1",
                json!([(i as i64 % ROWS) + 1]),
            )?],
            ResultsFormat::RowsAndColumns,
        )
        .map_err(|e| e.to_string())?;
        Ok(())
    })?;
    row("point read, executor", read_exec, Some(read_direct));

    // 3. The D1 service over HTTP, metering off, then on (a balance cache holding a lease).
    let client = reqwest::Client::new();
    let serve = |svc: &Arc<Service>| -> Res<std::net::SocketAddr> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.set_nonblocking(true)?;
        let addr = l.local_addr()?;
        let l = tokio::net::TcpListener::from_std(l)?;
        let app = svc.router();
        tokio::spawn(async move { axum::serve(l, app).await });
        Ok(addr)
    };
    let free = Service::new(
        dbs.clone(),
        Arc::new(Free),
        None,
        tollgate_database::DbMetrics::unregistered()?,
    );
    let token = free.grant("bench", "acct-bench");
    let free_addr = serve(&free)?;
    let cache = tollgate_balance_cache::BalanceCache::new(tollgate_metering::Prices::default());
    cache.bench_preload("acct-bench", i64::MAX / 4);
    let metered = Service::new(
        dbs.clone(),
        Arc::new(tollgate_app::adapters::ChargeRows {
            cache: cache.clone(),
            lease_wait: Duration::from_millis(200),
        }),
        None,
        tollgate_database::DbMetrics::unregistered()?,
    );
    let mtoken = metered.grant("bench", "acct-bench");
    let metered_addr = serve(&metered)?;
    let http_read = |addr: std::net::SocketAddr, token: String| {
        let client = client.clone();
        move |i: usize| {
            let (client, token) = (client.clone(), token.clone());
            async move {
                let r = client
                    .post(format!("http://{addr}/query?resultsFormat=ROWS_AND_COLUMNS"))
                    .header(TOKEN_HEADER, token)
                    .json(&json!({"sql": "SELECT id, name FROM t WHERE id = ?1", "params": [(i as i64 % ROWS) + 1]}))
                    .send()
                    .await?;
                if r.status() != 200 {
                    return Err(format!("status {}", r.status()).into());
                }
                r.bytes().await?;
                Ok(())
            }
        }
    };
    // Interleave off/on three times; keep each side's best p50 (noise only adds).
    let mut off = (f64::MAX, f64::MAX);
    let mut on = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        let a = time_async(http_read(free_addr, token.clone())).await?;
        let b = time_async(http_read(metered_addr, mtoken.clone())).await?;
        if a.0 < off.0 {
            off = a;
        }
        if b.0 < on.0 {
            on = b;
        }
    }
    row(
        "point read, D1 service over HTTP, unmetered",
        off,
        Some(read_direct),
    );
    row(
        "point read, D1 service over HTTP, metered",
        on,
        Some(read_direct),
    );
    println!(
        "\nmetering on the query path: metered/unmetered p50 = {:.3} (best of 3 interleaved runs)\n",
        on.0 / off.0
    );

    // 4. Tenant code through workerd.
    let t = Toolchain::ensure(&Toolchain::source_tree_dir())?;
    let (sup, _events) = Supervisor::new(
        RuntimeConfig {
            data_dir: dir.path().join("runtime"),
            idle_timeout: None,
            ..RuntimeConfig::default()
        },
        t,
        Arc::new(tollgate_runtime::NoCpuSink),
    )?;
    let started = sup
        .start(DeploymentSpec {
            deployment_id: "dbbench".into(),
            project_id: "bench".into(),
            account_id: "acct-bench".into(),
            code: WORKER.into(),
            compatibility_date: "2025-01-01".into(),
            env: BTreeMap::new(),
            databases: vec!["DB".into()],
            d1: Some(D1Access {
                address: free_addr.to_string(),
                token: token.clone(),
            }),
        })
        .await?;
    let base = format!("http://{}", started.addr);
    // The same worker against the same service on a Unix socket (what the control process
    // uses when the data dir's path allows).
    let sock = dir.path().join("d1.sock");
    let unix = tokio::net::UnixListener::bind(&sock)?;
    let app = free.router();
    tokio::spawn(async move { axum::serve(unix, app).await });
    let started_unix = sup
        .start(DeploymentSpec {
            deployment_id: "dbbench-unix".into(),
            project_id: "bench".into(),
            account_id: "acct-bench".into(),
            code: WORKER.into(),
            compatibility_date: "2025-01-01".into(),
            env: BTreeMap::new(),
            databases: vec!["DB".into()],
            d1: Some(D1Access {
                address: format!("unix:{}", sock.display()),
                token: token.clone(),
            }),
        })
        .await?;
    let base_unix = format!("http://{}", started_unix.addr);
    let get = |path: String| {
        let client = client.clone();
        async move {
            let r = client.get(path).send().await?;
            if r.status() != 200 {
                return Err(format!("status {}", r.status()).into());
            }
            r.bytes().await?;
            Res::Ok(())
        }
    };
    let plain = time_async(|_| get(format!("{base}/plain"))).await?;
    // TCP and Unix socket interleaved three times; each side's best p50.
    let mut read_worker = (f64::MAX, f64::MAX);
    let mut read_unix = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        let a = time_async(|i| get(format!("{base}/read?id={}", (i as i64 % ROWS) + 1))).await?;
        let b =
            time_async(|i| get(format!("{base_unix}/read?id={}", (i as i64 % ROWS) + 1))).await?;
        if a.0 < read_worker.0 {
            read_worker = a;
        }
        if b.0 < read_unix.0 {
            read_unix = b;
        }
    }
    row("request into workerd, no database", plain, None);
    row(
        "point read via env.DB (service on loopback TCP), request into workerd",
        read_worker,
        Some(read_direct),
    );
    row(
        "point read via env.DB (service on a Unix socket), request into workerd",
        read_unix,
        Some(read_direct),
    );
    println!(
        "\nenv.DB point read adds {:.0} µs p50 to a request ({:.2}× the plain request)\n",
        read_worker.0 - plain.0,
        read_worker.0 / plain.0
    );

    // Inserts: FULL vs NORMAL, directly, through the executor, through workerd (FULL).
    println!("| single-row insert | p50 µs | p99 µs | p50 vs rusqlite FULL |");
    println!("|---|---:|---:|---:|");
    row("rusqlite, synchronous=FULL", insert_full_direct, None);
    row(
        "rusqlite, synchronous=NORMAL",
        insert_normal_direct,
        Some(insert_full_direct),
    );
    let insert = |d: &Arc<tollgate_database::Database>| -> Res<()> {
        run_query(
            d,
            &[st("INSERT INTO t (name) VALUES (?1)", json!(["x"]))?],
            ResultsFormat::None,
        )
        .map_err(|e| e.to_string())?;
        Ok(())
    };
    let ins_full = time(|_| insert(&db))?;
    let db_normal = dbs_normal.get("bench")?;
    let ins_normal = time(|_| insert(&db_normal))?;
    row("executor, FULL", ins_full, Some(insert_full_direct));
    row("executor, NORMAL", ins_normal, Some(insert_full_direct));
    let write_worker = time_async(|_| get(format!("{base}/write"))).await?;
    row(
        "via env.DB, request into workerd, FULL",
        write_worker,
        Some(insert_full_direct),
    );

    // Closed loop through workerd: point reads per second, 8 connections, 5 s.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for k in 0..8u64 {
        let (client, stop, done, base) = (client.clone(), stop.clone(), done.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = k;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 8;
                let url = format!("{base}/read?id={}", (i % ROWS as u64) + 1);
                if let Ok(r) = client.get(url).send().await
                    && r.status() == 200
                    && r.bytes().await.is_ok()
                {
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = done.load(std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let n = done.load(std::sync::atomic::Ordering::Relaxed) - before;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    println!(
        "\nclosed loop via env.DB (8 connections, 5 s): {:.0} point reads/s",
        n as f64 / 5.0
    );
    sup.shutdown().await;
    Ok(())
}
