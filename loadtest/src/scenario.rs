//! Scenarios that start their own stack on loopback (a `redis-server`, an upstream, proxy nodes in
//! this process) and prove something with the generator: exact reconciliation with the ledger,
//! metering overhead, and how fast suspension and resumption reach a second node.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tollgate_app::adapters::{ChargeCpu, ChargeRows};
use tollgate_app::metering::{MeteringNode, MeteringSpec, StoreSource};
use tollgate_app::node::{GateSpec, PreparedNode, ProxyNode};
use tollgate_balance_cache::AgentConfig;
use tollgate_metering::{Prices, Store};
use tollgate_proxy::{ProxyOptions, RedisConfig, Stop};
use tollgate_routes::{Route, RouteKey, RouteStore};
use tollgate_runtime::{D1Access, DeploymentSpec, RuntimeConfig, Supervisor, Toolchain};
use tollgate_testkit::{RedisCluster, RedisServer, TestRedis, Upstream, free_addr};

use crate::{HostSpec, Mode, Plan, Report};

pub const PRICE: i64 = 500_000;

/// Redis, one upstream, and proxy nodes sharing them.
pub struct Stack {
    pub redis: TestRedis,
    pub upstream: Upstream,
    pub routes: RouteStore,
    pub store: Arc<dyn Store>,
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
    /// Nodes added from now on hand an unused lease back after this (default: the agent's).
    pub idle_return: Option<Duration>,
}

struct Node {
    addr: SocketAddr,
    node: Option<ProxyNode>,
}

impl Stack {
    pub async fn start() -> anyhow::Result<Stack> {
        Stack::start_on(TestRedis::One(RedisServer::start())).await
    }

    /// [`Stack::start`] on `redis`: one Redis or a Redis Cluster.
    pub async fn start_on(redis: TestRedis) -> anyhow::Result<Stack> {
        let upstream = Upstream::start("ok");
        let routes = RouteStore::connect(redis.target(), "tollgate").await?;
        let store = tollgate_metering::connect_shared(
            &redis.target(),
            "tollgate",
            Duration::from_secs(10),
            tollgate_metering::DEFAULT_SHARDS,
        )
        .await?;
        Ok(Stack {
            redis,
            upstream,
            routes,
            store,
            nodes: Vec::new(),
            dir: tempfile::tempdir()?,
            idle_return: None,
        })
    }

    /// Starts proxy node `name` (metering on, leases of at most `max_lease` p$) and waits until
    /// it has loaded its routes.
    pub async fn add_node(&mut self, name: &str, max_lease: i64) -> anyhow::Result<SocketAddr> {
        let mut o = ProxyOptions::default();
        o.proxy.listen = free_addr();
        o.admin.listen = free_addr();
        o.proxy.threads = 1;
        // Several Pingora servers in one process need the work-stealing runtime (docs/proxy.md).
        o.proxy.work_stealing = true;
        o.shutdown.drain_timeout_seconds = 5;
        o.redis = Some(match &self.redis {
            TestRedis::One(one) => RedisConfig::new(&one.url()),
            TestRedis::Cluster(c) => {
                let mut r = RedisConfig::new("");
                r.set_cluster(c.urls()).map_err(anyhow::Error::msg)?;
                r
            }
        });
        let mut agent = AgentConfig::new(name, self.dir.path().join(format!("{name}.journal")));
        agent.min_lease = PRICE.min(max_lease);
        agent.max_lease = max_lease;
        if let Some(idle) = self.idle_return {
            agent.idle_return = idle;
        }
        let gate = GateSpec {
            metering: MeteringSpec {
                store: StoreSource::Ready(self.store.clone()),
                prices: Prices::default(),
                agent,
            },
            lease_wait: Duration::from_secs(1),
            top_up: "top up".into(),
            hooks: None,
            desk: None,
        };
        let (addr, admin) = (o.proxy.listen, o.admin.listen);
        let rt = tokio::runtime::Handle::current();
        let node = PreparedNode::prepare(o, Some(gate), &rt)?.start(&rt)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ready = TcpStream::connect(addr).is_ok()
                && matches!(reqwest::get(format!("http://{admin}/readyz")).await, Ok(r) if r.status() == 200);
            if ready {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "node {name} did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.nodes.push(Node {
            addr,
            node: Some(node),
        });
        Ok(addr)
    }

    pub async fn publish(&self, slug: &str, account: Option<&str>) -> anyhow::Result<String> {
        let route = Route {
            upstreams: vec![self.upstream.addr],
            account_id: account.map(str::to_owned),
            project_id: None,
            deployment_id: None,
        };
        self.routes.put(&RouteKey::slug(slug)?, &route).await?;
        Ok(format!("{slug}.localhost"))
    }

    /// Graceful stop of every node: each drains, settles what is left and returns its leases.
    pub async fn stop_nodes(&mut self) {
        let stopping: Vec<_> = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.node.take())
            .map(|n| n.shutdown(Stop::Graceful))
            .collect();
        futures_util::future::join_all(stopping).await;
    }

    pub fn node_addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.addr).collect()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(node) = n.node.take() {
                node.abort();
            }
        }
    }
}

#[derive(Debug, Serialize)]
pub struct AccountCheck {
    pub account: String,
    /// The generator's own record: requests answered × the request price.
    pub expected_picos: i64,
    /// What the ledger's settle lines charged this account for requests and for CPU.
    pub ledger_request_picos: i64,
    pub ledger_cpu_us: u64,
    /// The runtime's own count of the CPU of this account's deployments (`--runtime` only).
    pub runtime_cpu_us: Option<u64>,
    /// Database rows (read, written) the ledger charged, and the database service's own count
    /// of the rows its queries read and wrote (`--runtime` only: each deployment keeps a table).
    pub ledger_rows: (u64, u64),
    pub database_rows: Option<(u64, u64)>,
    pub debited_picos: i64,
    pub leased_picos: i64,
    /// Request debits equal the generator's record, CPU debits equal the runtime's count, row
    /// debits equal the database's count, and the account's `debited` is exactly their sum at
    /// the prices.
    pub exact: bool,
}

#[derive(Debug, Serialize)]
pub struct Reconciliation {
    pub scenario: &'static str,
    /// Services were real workerd deployments whose CPU was charged (`--runtime`).
    pub runtime: bool,
    pub services: usize,
    pub accounts: usize,
    pub nodes: usize,
    pub load: Report,
    pub checks: Vec<AccountCheck>,
    /// What `tollgate accounts audit` finds in the stores afterwards (must be nothing).
    pub audit_differences: Vec<tollgate_payments::audit::Difference>,
    pub all_exact: bool,
}

/// `services` hostnames owned by `accounts` accounts, load over two proxy nodes sharing one
/// Redis; then every account's request debits in the ledger must equal the generator's own
/// record exactly. With `runtime`, each service is a real workerd deployment doing some CPU
/// work per request, its CPU charged as it accrues through a third metering node (as the
/// control service does); then every account's CPU debits must also equal the runtime's own
/// count of its deployments' CPU.
pub async fn reconcile(
    services: usize,
    accounts: usize,
    mode: Mode,
    duration: Duration,
    runtime: bool,
    cluster: bool,
) -> anyhow::Result<Reconciliation> {
    anyhow::ensure!(services > 0 && accounts > 0, "need services and accounts");
    let mut stack = if cluster {
        Stack::start_on(TestRedis::Cluster(RedisCluster::start())).await?
    } else {
        Stack::start().await?
    };
    let mut hosted = if runtime {
        Some(Hosted::start(&stack).await?)
    } else {
        None
    };
    let mut hosts = Vec::new();
    for i in 0..services {
        let account = format!("acct-{}", i % accounts);
        let slug = format!("svc-{i}");
        let host = match &mut hosted {
            Some(h) => h.deploy(&stack, &slug, &account).await?,
            None => stack.publish(&slug, Some(&account)).await?,
        };
        hosts.push(HostSpec {
            host,
            account: Some(account),
        });
    }
    for a in 0..accounts {
        stack
            .store
            .credit(
                &format!("acct-{a}"),
                &format!("deposit-{a}"),
                1_000 * 1_000_000_000_000,
            )
            .await
            .map_err(|e| anyhow::anyhow!("credit: {e}"))?;
    }
    stack.add_node("node-a", 100 * PRICE).await?;
    stack.add_node("node-b", 100 * PRICE).await?;
    let plan = Plan {
        targets: stack.node_addrs(),
        hosts,
        // Some CPU per request for workerd (a stub upstream ignores the query).
        path: "/?work=20000".into(),
        mode,
        duration,
        warmup: Duration::ZERO,
        price_per_request: PRICE,
    };
    let load = crate::run(&plan).await?;
    stack.stop_nodes().await;
    // The runtime's own count, after its last samples are charged and settled.
    let (runtime_cpu, database_rows) = match hosted {
        Some(h) => {
            let (cpu, rows) = h.stop().await?;
            (Some(cpu), Some(rows))
        }
        None => (None, None),
    };
    let ledger = stack.store.ledger().await?;
    let prices = Prices::default();
    let mut checks = Vec::new();
    for a in 0..accounts {
        let account = format!("acct-{a}");
        let state = stack
            .store
            .account(&account)
            .await?
            .ok_or_else(|| anyhow::anyhow!("{account} missing"))?;
        let expected = load
            .expected_request_cost_picos
            .get(&account)
            .copied()
            .unwrap_or(0);
        let mine = ledger
            .iter()
            .filter(|e| e.kind == "settle" && e.account == account);
        let requests: u64 = mine.clone().map(|e| e.requests).sum();
        let ledger_cpu_us: u64 = mine.clone().map(|e| e.cpu_us).sum();
        let ledger_rows = (
            mine.clone().map(|e| e.rows_read).sum::<u64>(),
            mine.map(|e| e.rows_written).sum::<u64>(),
        );
        let ledger_request_picos = requests as i64 * prices.per_request;
        let runtime_cpu_us = runtime_cpu
            .as_ref()
            .map(|m| m.get(&account).copied().unwrap_or(0));
        let database_rows = database_rows
            .as_ref()
            .map(|m| m.get(&account).copied().unwrap_or((0, 0)));
        let rows_picos = ledger_rows.0 as i64 * prices.per_row_read
            + ledger_rows.1 as i64 * prices.per_row_written;
        // Without the runtime nothing uses CPU or a database: the ledger must hold none.
        let exact = ledger_request_picos == expected
            && runtime_cpu_us.unwrap_or(0) == ledger_cpu_us
            && database_rows.unwrap_or((0, 0)) == ledger_rows
            && state.debited == expected + ledger_cpu_us as i64 * prices.per_cpu_us + rows_picos;
        checks.push(AccountCheck {
            exact,
            account,
            expected_picos: expected,
            ledger_request_picos,
            ledger_cpu_us,
            runtime_cpu_us,
            ledger_rows,
            database_rows,
            debited_picos: state.debited,
            leased_picos: state.leased,
        });
    }
    // The operators' audit over the same stores: invariants, ledger totals, backing.
    let channels = tollgate_payments::RedisChannels::connect(stack.redis.target(), "tollgate")
        .await
        .map_err(|e| anyhow::anyhow!("channel store: {}", e.message))?;
    let audit = tollgate_payments::audit::audit(&channels, &*stack.store, None)
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(Reconciliation {
        scenario: "reconcile",
        runtime,
        services,
        accounts,
        nodes: 2,
        all_exact: checks.iter().all(|c| c.exact) && audit.is_clean(),
        audit_differences: audit.differences,
        load,
        checks,
    })
}

/// A Worker that does `work` iterations of arithmetic per request (real, variable CPU) and
/// keeps a count of its hits in its database (a write, and a read of the last ten).
const WORKER: &str = r#"export default {
  async fetch(request, env) {
    const n = Number(new URL(request.url).searchParams.get('work') ?? '0');
    let x = 0;
    for (let i = 0; i < n; i++) { x += Math.sqrt(x + i); }
    await env.DB.batch([
      env.DB.prepare('CREATE TABLE IF NOT EXISTS hits (id INTEGER PRIMARY KEY, n INTEGER)'),
      env.DB.prepare('INSERT INTO hits (n) VALUES (?1)').bind(n),
    ]);
    const last = await env.DB.prepare('SELECT n FROM hits ORDER BY id DESC LIMIT 10').all();
    return new Response('ok ' + (x >= 0) + ' ' + last.results.length);
  },
};
"#;

/// The database service's own count per project: rows its queries read and wrote, and the CPU
/// (µs) it charged for heavy ones.
#[derive(Default)]
struct RowCount(std::sync::Mutex<BTreeMap<String, (u64, u64, u64)>>);

impl tollgate_database::Usage for RowCount {
    fn record(&self, project: &str, r: u64, w: u64, cpu_us: u64) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry(project.to_owned()).or_insert((0, 0, 0));
        e.0 += r;
        e.1 += w;
        e.2 += cpu_us;
    }
}

/// workerd deployments and the metering node that charges their CPU (as the control service
/// wires it, through the same adapter: interrupts of unpaid CPU included).
struct Hosted {
    sup: Supervisor,
    deployments: Vec<(String, String)>,
    metering: MeteringNode,
    db: Arc<tollgate_database::Service>,
    db_addr: SocketAddr,
    rows: Arc<RowCount>,
    /// Project → account.
    owners: BTreeMap<String, String>,
}

impl Hosted {
    async fn start(stack: &Stack) -> anyhow::Result<Hosted> {
        let toolchain = Toolchain::ensure(&Toolchain::source_tree_dir())?;
        let metering = MeteringNode::start(
            MeteringSpec {
                store: StoreSource::Ready(stack.store.clone()),
                prices: Prices::default(),
                agent: AgentConfig::new("runtime", stack.dir.path().join("runtime.journal")),
            },
            &prometheus::Registry::new(),
            &tokio::runtime::Handle::current(),
        )?;
        let rt = RuntimeConfig {
            data_dir: stack.dir.path().join("runtime"),
            ..RuntimeConfig::default()
        };
        let (sup, _events) =
            Supervisor::new(rt, toolchain, Arc::new(ChargeCpu(metering.cache().clone())))?;
        // The databases, charged through the same metering node, as the control service does.
        let dbs = tollgate_database::Databases::open(
            stack.dir.path().join("databases"),
            tollgate_database::Limits::default(),
        )?;
        let rows = Arc::new(RowCount::default());
        let db = tollgate_database::Service::new(
            dbs,
            Arc::new(ChargeRows {
                cache: metering.cache().clone(),
                lease_wait: Duration::from_millis(500),
            }),
            Some(rows.clone() as Arc<dyn tollgate_database::Usage>),
            tollgate_database::DbMetrics::unregistered()?,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let db_addr = listener.local_addr()?;
        let app = db.router();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Hosted {
            sup,
            deployments: Vec::new(),
            metering,
            db,
            db_addr,
            rows,
            owners: BTreeMap::new(),
        })
    }

    async fn deploy(&mut self, stack: &Stack, slug: &str, account: &str) -> anyhow::Result<String> {
        let id = format!("dep-{slug}");
        let started = self
            .sup
            .start(DeploymentSpec {
                deployment_id: id.clone(),
                project_id: format!("proj-{slug}"),
                account_id: account.to_owned(),
                code: WORKER.to_owned(),
                compatibility_date: "2025-01-01".into(),
                env: BTreeMap::new(),
                databases: vec!["DB".into()],
                d1: Some(D1Access {
                    address: self.db_addr.to_string(),
                    token: self.db.grant(&format!("proj-{slug}"), account),
                }),
            })
            .await?;
        self.owners
            .insert(format!("proj-{slug}"), account.to_owned());
        let route = Route {
            upstreams: vec![started.addr],
            account_id: Some(account.to_owned()),
            project_id: Some(format!("proj-{slug}")),
            deployment_id: Some(id.clone()),
        };
        stack.routes.put(&RouteKey::slug(slug)?, &route).await?;
        self.deployments.push((id, account.to_owned()));
        Ok(format!("{slug}.localhost"))
    }

    /// Stops every deployment (its last CPU charged), then the metering node (settled); returns
    /// the runtime's count of CPU-µs per account, and the database's count of rows (read,
    /// written) per account.
    #[allow(clippy::type_complexity)]
    async fn stop(self) -> anyhow::Result<(BTreeMap<String, u64>, BTreeMap<String, (u64, u64)>)> {
        let mut cpu = BTreeMap::new();
        for (id, account) in &self.deployments {
            self.sup.stop(id, false).await?;
            let used = self.sup.status(id).map_or(0, |s| s.cpu_us_total);
            *cpu.entry(account.clone()).or_insert(0) += used;
        }
        self.sup.shutdown().await;
        self.metering.settle_and_stop().await;
        let mut rows: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for (project, (r, w, db_cpu)) in
            self.rows.0.lock().unwrap_or_else(|e| e.into_inner()).iter()
        {
            if let Some(account) = self.owners.get(project) {
                let e = rows.entry(account.clone()).or_insert((0, 0));
                e.0 += r;
                e.1 += w;
                // Heavy queries' CPU is the service's CPU too, counted by the database service.
                *cpu.entry(account.clone()).or_insert(0) += db_cpu;
            }
        }
        Ok((cpu, rows))
    }
}

#[derive(Debug, Serialize)]
pub struct Overhead {
    pub scenario: &'static str,
    pub reps: usize,
    pub metered_rps: Vec<f64>,
    pub free_rps: Vec<f64>,
    pub metered_p99_us: Vec<u64>,
    pub free_p99_us: Vec<u64>,
    /// Medians over the reps.
    pub rps_ratio: f64,
    pub added_p99_us: i64,
}

fn median<T: Copy + PartialOrd>(v: &[T]) -> T {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    s[s.len() / 2]
}

/// The same proxy node, the same upstream, two hostnames: one owned by an account (every request
/// goes through the money gate), one free. Reps alternate so drift hits both alike.
pub async fn overhead(
    concurrency: usize,
    duration: Duration,
    reps: usize,
) -> anyhow::Result<Overhead> {
    let mut stack = Stack::start().await?;
    let metered = stack.publish("metered", Some("acct-o")).await?;
    let free = stack.publish("free", None).await?;
    stack
        .store
        .credit("acct-o", "deposit", 9_000 * 1_000_000_000_000)
        .await
        .map_err(|e| anyhow::anyhow!("credit: {e}"))?;
    let node = stack.add_node("node-o", 1_000_000_000_000).await?;
    let plan = |host: &str| Plan {
        targets: vec![node],
        hosts: vec![HostSpec {
            host: host.to_owned(),
            account: None,
        }],
        path: "/".into(),
        mode: Mode::Closed { concurrency },
        duration,
        warmup: Duration::from_millis(500),
        price_per_request: PRICE,
    };
    let mut out = Overhead {
        scenario: "overhead",
        reps,
        metered_rps: Vec::new(),
        free_rps: Vec::new(),
        metered_p99_us: Vec::new(),
        free_p99_us: Vec::new(),
        rps_ratio: 0.0,
        added_p99_us: 0,
    };
    for _ in 0..reps.max(1) {
        let m = crate::run(&plan(&metered)).await?;
        anyhow::ensure!(
            m.by_status.keys().all(|s| *s == 200),
            "metered run: {:?}",
            m.by_status
        );
        let f = crate::run(&plan(&free)).await?;
        out.metered_rps.push(m.requests_per_s);
        out.metered_p99_us.push(m.latency.p99_us);
        out.free_rps.push(f.requests_per_s);
        out.free_p99_us.push(f.latency.p99_us);
    }
    out.rps_ratio = median(&out.metered_rps) / median(&out.free_rps);
    out.added_p99_us = median(&out.metered_p99_us) as i64 - median(&out.free_p99_us) as i64;
    stack.stop_nodes().await;
    Ok(out)
}

#[derive(Debug, Serialize)]
pub struct Timing {
    pub samples: usize,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

pub(crate) fn timing(mut v: Vec<u64>) -> Timing {
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Timing {
        samples: v.len(),
        p50_us: at(0.5),
        p99_us: at(0.99),
        max_us: at(1.0),
    }
}

#[derive(Debug, Serialize)]
pub struct DrainTopUp {
    pub scenario: &'static str,
    /// From a credit's return to the first 200 on node B (the credit was made at the store, as
    /// the payments service does).
    pub resume: Timing,
    /// From the request on node B that spent the account's last credit to node A's first 402.
    pub suspension_on_other_node: Timing,
}

/// Drain-to-zero and top-up timing across two nodes; leases are one request, so each node's view
/// follows the store closely.
pub async fn drain_top_up(rounds: usize) -> anyhow::Result<DrainTopUp> {
    let mut stack = Stack::start().await?;
    // Either node may take the credit's lease (both asked for one while the account was empty);
    // when A does, B resumes once A hands the unused lease back: 1 s here, so a round fits the
    // 5 s deadline (the default, 5 s, made this scenario fail whenever A won).
    stack.idle_return = Some(Duration::from_secs(1));
    let host = stack.publish("drain", Some("acct-d")).await?;
    let a = stack.add_node("node-a", PRICE).await?;
    let b = stack.add_node("node-b", PRICE).await?;
    let client = reqwest::Client::builder().no_proxy().build()?;
    let get = |node: SocketAddr| {
        let client = client.clone();
        let host = host.clone();
        async move {
            client
                .get(format!("http://{node}/"))
                .header("host", host)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    // Both nodes first see the account empty.
    for n in [a, b] {
        let deadline = Instant::now() + Duration::from_secs(5);
        while get(n).await != 402 {
            anyhow::ensure!(
                Instant::now() < deadline,
                "an empty account must answer 402"
            );
        }
    }
    let (mut resume, mut suspend) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        stack
            .store
            .credit("acct-d", &format!("top-up-{round}"), PRICE)
            .await
            .map_err(|e| anyhow::anyhow!("credit: {e}"))?;
        let t0 = Instant::now();
        loop {
            match get(b).await {
                200 => break,
                402 | 503 => {}
                s => anyhow::bail!("unexpected status {s}"),
            }
            if t0.elapsed() > Duration::from_secs(5) {
                let st = stack.store.account("acct-d").await?;
                anyhow::bail!("never resumed (round {round}); account: {st:?}");
            }
        }
        resume.push(t0.elapsed().as_micros() as u64);
        // That 200 spent the one request credited: node A must now refuse.
        let t1 = Instant::now();
        loop {
            match get(a).await {
                402 => break,
                503 => {}
                200 => anyhow::bail!("node A served a request nobody paid for"),
                s => anyhow::bail!("unexpected status {s}"),
            }
            anyhow::ensure!(t1.elapsed() < Duration::from_secs(5), "never suspended");
        }
        suspend.push(t1.elapsed().as_micros() as u64);
    }
    stack.stop_nodes().await;
    let state = stack.store.account("acct-d").await?;
    if let Some(s) = state {
        anyhow::ensure!(
            s.debited == rounds as i64 * PRICE,
            "debited {} for {rounds} paid requests",
            s.debited
        );
    }
    Ok(DrainTopUp {
        scenario: "drain_top_up",
        resume: timing(resume),
        suspension_on_other_node: timing(suspend),
    })
}

/// Per-scenario JSON, for `docs/benchmarks.md` and CI artefacts.
pub fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

pub type Statuses = BTreeMap<u16, u64>;
