//! The deploy pipeline with real parts: Redis for state and routes (one, or a Redis Cluster with
//! `TOLLGATE_TEST_REDIS=cluster`), esbuild, workerd.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tollgate_control::{
    Control, ControlConfig, ControlStore, DeployRequest, DeployStatus, RedisControlStore,
};
use tollgate_routes::{RouteKey, RouteStore};
use tollgate_runtime::{CpuDelta, CpuSink, RuntimeConfig, Supervisor, Toolchain};
use tollgate_testkit::TestRedis;

struct NoMeter;
impl CpuSink for NoMeter {
    fn record(&self, _: &[CpuDelta]) {}
}

struct Rig {
    control: Arc<Control>,
    store: Arc<dyn ControlStore>,
    routes: RouteStore,
    registry: prometheus::Registry,
    _dir: tempfile::TempDir,
}

impl Rig {
    /// The value of one exported series, e.g. `tollgate_rollbacks_total{result="live"}`.
    fn metric(&self, series: &str) -> f64 {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .unwrap();
        String::from_utf8(buf)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{series} is not exported"))
    }
}

async fn rig(redis: &TestRedis) -> Rig {
    rig_at(&redis.target()).await
}

async fn rig_at(redis_url: &tollgate_kv::Target) -> Rig {
    rig_with(redis_url, |_| {}).await
}

async fn rig_with(redis_url: &tollgate_kv::Target, tweak: impl FnOnce(&mut ControlConfig)) -> Rig {
    let t = Toolchain::ensure(&Toolchain::source_tree_dir()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bundler = tollgate_control::bundler_for(&t, dir.path().join("builds")).unwrap();
    let (runtime, events) = Supervisor::new(
        RuntimeConfig {
            data_dir: dir.path().join("runtime"),
            min_drain: Duration::from_millis(50),
            ..RuntimeConfig::default()
        },
        t,
        Arc::new(NoMeter),
    )
    .unwrap();
    let store: Arc<dyn ControlStore> = Arc::new(
        RedisControlStore::connect(redis_url, "tollgate")
            .await
            .unwrap(),
    );
    let routes = RouteStore::connect(redis_url, "tollgate").await.unwrap();
    let control = Control::new(store.clone(), bundler, runtime, Arc::new(routes.clone()), {
        let mut cfg = ControlConfig {
            slug_grace: Duration::ZERO,
            ..ControlConfig::default()
        };
        tweak(&mut cfg);
        cfg
    });
    tokio::spawn(control.clone().follow_runtime(events));
    let registry = prometheus::Registry::new();
    control.register_metrics(&registry).unwrap();
    Rig {
        control,
        store,
        routes,
        registry,
        _dir: dir,
    }
}

fn files(greeting: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "src/index.ts".to_owned(),
            format!(
                "import {{ Hono }} from 'hono'\nimport {{ who }} from './who'\nconst app = new Hono<{{ Bindings: {{ MODE?: string }} }}>()\napp.get('/', (c) => c.text('{greeting} ' + who() + (c.env.MODE ? ' ' + c.env.MODE : '')))\nexport default app\n"
            ),
        ),
        (
            "src/who.ts".to_owned(),
            "export const who = () => 'world'\n".to_owned(),
        ),
    ])
}

/// The upstream the route for `slug` points at now.
async fn upstream(routes: &RouteStore, slug: &str) -> Option<SocketAddr> {
    let want = RouteKey::slug(slug).unwrap();
    routes
        .load_all()
        .await
        .unwrap()
        .into_iter()
        .find(|(k, _)| *k == want)
        .and_then(|(_, r)| r.route)
        .map(|r| r.upstreams[0])
}

async fn body(addr: SocketAddr) -> String {
    reqwest::get(format!("http://{addr}/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_iterate_rollback_delete() {
    let redis = TestRedis::start();
    let rig = rig(&redis).await;
    let c = &rig.control;

    let first = c
        .deploy(
            "acct-a",
            DeployRequest {
                files: Some(files("hello")),
                project_name: Some("My Todo API".into()),
                env: BTreeMap::from([("MODE".into(), "prod".into())]),
                secrets: BTreeMap::from([("API_KEY".into(), "sk-very-secret".into())]),
                ..DeployRequest::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(first.slug, "my-todo-api");
    assert_eq!(first.url, "http://my-todo-api.localhost:8080");
    assert_eq!((first.version, first.status), (1, DeployStatus::Live));
    let addr1 = upstream(&rig.routes, "my-todo-api").await.unwrap();
    assert_eq!(body(addr1).await, "hello world prod");

    // Iterate with changes: edit one file, the rest stays.
    let second = c
        .deploy(
            "acct-a",
            DeployRequest {
                changes: Some(BTreeMap::from([(
                    "src/who.ts".to_owned(),
                    Some("export const who = () => 'agents'\n".to_owned()),
                )])),
                project_id: Some(first.project_id.clone()),
                ..DeployRequest::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(second.version, 2);
    let addr2 = upstream(&rig.routes, "my-todo-api").await.unwrap();
    assert_ne!(addr1, addr2);
    assert_eq!(body(addr2).await, "hello agents prod");
    // The old version drains and stops in the background.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while reqwest::get(format!("http://{addr1}/")).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "v1 never stopped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        c.read_file("acct-a", &first.project_id, "./src/who.ts")
            .await
            .unwrap(),
        "export const who = () => 'agents'\n"
    );
    let view = c.get_project("acct-a", &first.project_id).await.unwrap();
    assert_eq!(view.live.as_ref().unwrap().id, second.deployment_id);
    assert_eq!(view.recent[1].status, DeployStatus::Superseded);
    assert_eq!(view.env["MODE"].as_deref(), Some("prod"));
    assert_eq!(view.env["API_KEY"], None, "secrets are write-only");
    assert!(
        !serde_json::to_string(&view)
            .unwrap()
            .contains("sk-very-secret")
    );
    let env = rig.store.env(&first.project_id).await.unwrap();
    assert!(
        !format!("{env:?}").contains("sk-very-secret"),
        "not in Debug output either"
    );

    // Rollback: v1's code runs again, as deployment 3.
    let third = c.rollback("acct-a", &first.project_id, None).await.unwrap();
    assert_eq!(third.version, 3);
    let addr3 = upstream(&rig.routes, "my-todo-api").await.unwrap();
    assert_eq!(body(addr3).await, "hello world prod");
    let d3 = rig
        .store
        .deployment(&third.deployment_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        d3.rollback_of.as_deref(),
        Some(first.deployment_id.as_str())
    );
    assert_eq!(rig.metric("tollgate_rollbacks_total{result=\"live\"}"), 1.0);
    let e = c
        .rollback("acct-a", &first.project_id, Some("d_nope"))
        .await
        .unwrap_err();
    assert_eq!(e.code, "NOT_FOUND");
    assert_eq!(
        rig.metric("tollgate_rollbacks_total{result=\"refused\"}"),
        1.0
    );
    assert_eq!(
        rig.metric("tollgate_deploys_total{result=\"live\"}"),
        2.0,
        "a rollback is not counted as a deploy"
    );

    // Delete: the route goes, the process stops, the slug is free again (grace 0 here).
    c.delete("acct-a", &first.project_id).await.unwrap();
    assert_eq!(
        rig.metric("tollgate_projects_ended_total{reason=\"deleted\"}"),
        1.0
    );
    let _ = c.delete("acct-a", &first.project_id).await;
    assert_eq!(
        rig.metric("tollgate_projects_ended_total{reason=\"deleted\"}"),
        1.0,
        "a repeated delete counts once"
    );
    assert_eq!(upstream(&rig.routes, "my-todo-api").await, None);
    assert!(reqwest::get(format!("http://{addr3}/")).await.is_err());
    assert!(c.list_projects("acct-a").await.unwrap().is_empty());
    assert_eq!(
        c.get_project("acct-a", &first.project_id)
            .await
            .unwrap_err()
            .code,
        "NOT_FOUND"
    );
    let again = c
        .deploy(
            "acct-b",
            DeployRequest {
                files: Some(files("hi")),
                project_name: Some("my-todo-api".into()),
                ..DeployRequest::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        again.slug, "my-todo-api",
        "a deleted project's slug is free after the grace"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_deploys_leave_the_previous_version_serving() {
    let redis = TestRedis::start();
    let rig = rig(&redis).await;
    let c = &rig.control;
    let ok = c
        .deploy(
            "acct-a",
            DeployRequest {
                files: Some(files("stable")),
                ..DeployRequest::default()
            },
        )
        .await
        .unwrap();
    assert!(ok.slug.starts_with("app-"));
    let addr = upstream(&rig.routes, &ok.slug).await.unwrap();

    // Does not bundle.
    let e = c
        .deploy(
            "acct-a",
            DeployRequest {
                changes: Some(BTreeMap::from([(
                    "src/who.ts".to_owned(),
                    Some("export const who = ( => 1\n".to_owned()),
                )])),
                project_id: Some(ok.project_id.clone()),
                env: BTreeMap::from([("MODE".to_owned(), "broken".to_owned())]),
                ..DeployRequest::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, "BUNDLE_FAILED");
    assert!(e.message.starts_with("src/who.ts:1:"), "{}", e.message);
    // Bundles, but throws while loading.
    let e = c
        .deploy(
            "acct-a",
            DeployRequest {
                changes: Some(BTreeMap::from([(
                    "src/who.ts".to_owned(),
                    Some(
                        "throw new Error('boot failure')\nexport const who = () => 'x'\n"
                            .to_owned(),
                    ),
                )])),
                project_id: Some(ok.project_id.clone()),
                ..DeployRequest::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, "DEPLOY_FAILED");
    assert!(e.message.contains("boot failure"), "{}", e.message);

    assert_eq!(upstream(&rig.routes, &ok.slug).await, Some(addr));
    assert_eq!(body(addr).await, "stable world");
    let view = c.get_project("acct-a", &ok.project_id).await.unwrap();
    assert_eq!(view.live.unwrap().id, ok.deployment_id);
    let failed: Vec<_> = view
        .recent
        .iter()
        .filter(|d| d.status == DeployStatus::Failed)
        .collect();
    assert_eq!(failed.len(), 2);
    assert!(failed.iter().all(|d| d.reason.is_some()));
    // The failed deploy's env change was not kept: the live version's env is what stays.
    assert!(!view.env.contains_key("MODE"), "{:?}", view.env);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_never_sees_or_touches_another_accounts_projects() {
    let redis = TestRedis::start();
    let rig = rig(&redis).await;
    let c = &rig.control;
    let mine = c
        .deploy(
            "acct-a",
            DeployRequest {
                files: Some(files("mine")),
                ..DeployRequest::default()
            },
        )
        .await
        .unwrap();
    let other = "acct-b";
    assert!(c.list_projects(other).await.unwrap().is_empty());
    assert_eq!(
        c.get_project(other, &mine.project_id)
            .await
            .unwrap_err()
            .code,
        "NOT_FOUND"
    );
    assert_eq!(
        c.read_file(other, &mine.project_id, "src/who.ts")
            .await
            .unwrap_err()
            .code,
        "NOT_FOUND"
    );
    assert_eq!(
        c.logs(other, &mine.project_id, 0, 10)
            .await
            .unwrap_err()
            .code,
        "NOT_FOUND"
    );
    assert_eq!(
        c.rollback(other, &mine.project_id, None)
            .await
            .unwrap_err()
            .code,
        "NOT_FOUND"
    );
    assert_eq!(
        c.delete(other, &mine.project_id).await.unwrap_err().code,
        "NOT_FOUND"
    );
    let e = c
        .deploy(
            other,
            DeployRequest {
                changes: Some(BTreeMap::from([("src/who.ts".to_owned(), None)])),
                project_id: Some(mine.project_id.clone()),
                ..DeployRequest::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, "NOT_FOUND");
    // Still mine, still serving.
    assert_eq!(c.list_projects("acct-a").await.unwrap().len(), 1);
    let addr = upstream(&rig.routes, &mine.slug).await.unwrap();
    assert_eq!(body(addr).await, "mine world");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_creates_nothing() {
    let redis = TestRedis::start();
    let rig = rig(&redis).await;
    let c = &rig.control;
    let cases = [
        (DeployRequest::default(), "VALIDATION_ERROR"),
        (
            DeployRequest {
                files: Some(files("x")),
                changes: Some(BTreeMap::new()),
                ..DeployRequest::default()
            },
            "VALIDATION_ERROR",
        ),
        (
            DeployRequest {
                changes: Some(BTreeMap::new()),
                ..DeployRequest::default()
            },
            "VALIDATION_ERROR",
        ),
        (
            DeployRequest {
                files: Some(BTreeMap::from([(
                    "../escape.ts".to_owned(),
                    "x".to_owned(),
                )])),
                ..DeployRequest::default()
            },
            "VALIDATION_ERROR",
        ),
        (
            DeployRequest {
                files: Some(files("x")),
                env: BTreeMap::from([("BAD-NAME".into(), "v".into())]),
                ..DeployRequest::default()
            },
            "VALIDATION_ERROR",
        ),
        (
            DeployRequest {
                files: Some(files("x")),
                project_name: Some("!!!".into()),
                ..DeployRequest::default()
            },
            "VALIDATION_ERROR",
        ),
        (
            DeployRequest {
                files: Some(BTreeMap::from([(
                    "src/index.ts".to_owned(),
                    "x".repeat(600 * 1024),
                )])),
                ..DeployRequest::default()
            },
            "SIZE_LIMIT",
        ),
    ];
    for (req, code) in cases {
        let e = c.deploy("acct-a", req).await.unwrap_err();
        assert_eq!(e.code, code, "{e:?}");
        assert!(!e.hint.is_empty());
    }
    assert!(
        c.list_projects("acct-a").await.unwrap().is_empty(),
        "nothing created"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_control_service_brings_live_deployments_back() {
    let redis = TestRedis::start();
    // The first control service runs on its own runtime; dropping that runtime is its process
    // ending (its workerd children die with it).
    let url = redis.target();
    let slug = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let rig = rig_at(&url).await;
            let d = rig
                .control
                .deploy(
                    "acct-a",
                    DeployRequest {
                        files: Some(files("durable")),
                        ..DeployRequest::default()
                    },
                )
                .await
                .unwrap();
            d.slug
        })
    })
    .join()
    .unwrap();
    let old = upstream(
        &RouteStore::connect(redis.target(), "tollgate")
            .await
            .unwrap(),
        &slug,
    )
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while reqwest::get(format!("http://{old}/")).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "old process still up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rig = rig(&redis).await;
    assert_eq!(rig.control.recover().await.unwrap(), 1);
    let addr = upstream(&rig.routes, &slug).await.unwrap();
    assert_eq!(body(addr).await, "durable world");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_list_inspect_suspend_resume_and_delete_with_the_admin_token() {
    let redis = TestRedis::start();
    let rig = rig(&redis).await;
    let d = rig
        .control
        .deploy(
            "acct-a",
            DeployRequest {
                files: Some(files("ops")),
                ..DeployRequest::default()
            },
        )
        .await
        .unwrap();
    let app = tollgate_control::http::admin_router(rig.control.clone(), Some("s3cret".into()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let c = reqwest::Client::new();
    let auth = |r: reqwest::RequestBuilder| r.header("authorization", "Bearer s3cret");

    // No token, wrong token: refused, with a hint.
    let r = c
        .get(format!("{base}/v1/admin/projects"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .get(format!("{base}/v1/admin/projects"))
        .header("authorization", "Bearer nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["content-type"], "application/problem+json");

    let v: serde_json::Value = auth(c.get(format!("{base}/v1/admin/projects")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["projects"][0]["project"]["id"], d.project_id.as_str());
    assert_eq!(v["projects"][0]["project"]["owner"], "acct-a");

    let r = auth(c.post(format!("{base}/v1/admin/projects/{}/suspend", d.project_id)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["project"]["status"], "suspended");
    assert_eq!(
        upstream(&rig.routes, &d.slug).await,
        None,
        "route taken down"
    );

    // While suspended by an operator, its owner cannot bring it back by deploying.
    let e = rig
        .control
        .deploy(
            "acct-a",
            DeployRequest {
                changes: Some(BTreeMap::new()),
                project_id: Some(d.project_id.clone()),
                ..DeployRequest::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, "PROJECT_SUSPENDED");
    assert_eq!(upstream(&rig.routes, &d.slug).await, None);

    let r = auth(c.post(format!("{base}/v1/admin/projects/{}/resume", d.project_id)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let addr = upstream(&rig.routes, &d.slug).await.unwrap();
    assert_eq!(body(addr).await, "ops world", "serving again after resume");

    let r = auth(c.get(format!("{base}/v1/admin/projects/p_nope")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = auth(c.delete(format!("{base}/v1/admin/projects/{}", d.project_id)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(upstream(&rig.routes, &d.slug).await, None);
    let r = auth(c.delete(format!("{base}/v1/admin/projects/{}", d.project_id)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "already deleted");
}

#[tokio::test]
async fn without_a_token_the_operator_api_is_off() {
    let redis = TestRedis::start();
    let rig = rig(&redis).await;
    let app = tollgate_control::http::admin_router(rig.control.clone(), None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let r = reqwest::Client::new()
        .get(format!("{base}/v1/admin/projects"))
        .header("authorization", "Bearer ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_projects_expire_and_are_collected_used_ones_stay() {
    let redis = TestRedis::start();
    let rig = rig_with(&redis.target(), |c| {
        c.inactivity_ttl = Duration::from_millis(800)
    })
    .await;
    let c = &rig.control;
    let idle = c
        .deploy(
            "acct-a",
            DeployRequest {
                files: Some(files("idle")),
                ..DeployRequest::default()
            },
        )
        .await
        .unwrap();
    let busy = c
        .deploy(
            "acct-a",
            DeployRequest {
                files: Some(files("busy")),
                ..DeployRequest::default()
            },
        )
        .await
        .unwrap();
    let busy_addr = upstream(&rig.routes, &busy.slug).await.unwrap();
    let idle_addr = upstream(&rig.routes, &idle.slug).await.unwrap();
    // Requests keep one of them in use past the TTL.
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_millis(1200) {
        assert_eq!(body(busy_addr).await, "busy world");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.sweep().await.unwrap(), vec![idle.project_id.clone()]);
    assert_eq!(
        rig.metric("tollgate_projects_ended_total{reason=\"expired\"}"),
        1.0
    );
    assert_eq!(rig.metric("tollgate_projects{state=\"active\"}"), 1.0);
    assert_eq!(rig.metric("tollgate_projects{state=\"expired\"}"), 1.0);
    assert_eq!(
        upstream(&rig.routes, &idle.slug).await,
        None,
        "route removed"
    );
    assert!(
        reqwest::get(format!("http://{idle_addr}/")).await.is_err(),
        "process stopped"
    );
    let p = rig.store.project(&idle.project_id).await.unwrap().unwrap();
    assert_eq!(p.status, tollgate_control::ProjectStatus::Expired);
    assert!(
        rig.store
            .bundle(&idle.deployment_id)
            .await
            .unwrap()
            .is_none(),
        "artifacts deleted"
    );
    assert_eq!(body(busy_addr).await, "busy world", "the used one stays");
    assert!(c.sweep().await.unwrap().is_empty(), "idempotent");

    // The expired project cannot be changed; its slug is free (grace 0 here) and taken by
    // another account, whose service the old owner's calls must never touch.
    let e = c
        .deploy(
            "acct-a",
            DeployRequest {
                changes: Some(BTreeMap::new()),
                project_id: Some(idle.project_id.clone()),
                ..DeployRequest::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, "PROJECT_EXPIRED");
    let rollback = c
        .rollback("acct-a", &idle.project_id, None)
        .await
        .unwrap_err();
    assert_eq!(rollback.code, "PROJECT_EXPIRED");
    let taker = c
        .deploy(
            "acct-b",
            DeployRequest {
                files: Some(files("new owner")),
                project_name: Some(idle.slug.clone()),
                ..DeployRequest::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(taker.slug, idle.slug);
    c.delete("acct-a", &idle.project_id).await.unwrap();
    c.sweep().await.unwrap();
    assert_eq!(rig.metric("tollgate_projects{state=\"active\"}"), 2.0);
    assert_eq!(rig.metric("tollgate_projects{state=\"expired\"}"), 0.0);
    assert_eq!(rig.metric("tollgate_projects{state=\"deleted\"}"), 1.0);
    assert_eq!(
        rig.metric("tollgate_projects_ended_total{reason=\"deleted\"}"),
        0.0,
        "it ended once, when it expired"
    );
    let addr = upstream(&rig.routes, &idle.slug).await.unwrap();
    assert_eq!(
        body(addr).await,
        "new owner world",
        "the new owner's route survived"
    );
    assert!(
        !rig.store.claim_slug(&idle.slug, "p_x").await.unwrap(),
        "still held by its new owner"
    );
}

/// `tollgate dev` without Redis: state in one durable file, routes straight into the proxy's
/// table; after a restart the live deployment comes back from the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_and_local_routes_survive_a_restart() {
    use tollgate_control::{EmbeddedControlStore, LocalRoutes};
    use tollgate_routes::RouteTable;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("control.redb");
    let t = Toolchain::ensure(&Toolchain::source_tree_dir()).unwrap();
    let (t2, dir2, file2) = (t.clone(), dir.path().to_owned(), file.clone());
    let start = move |n: u32| {
        let (t, dir, file) = (t2.clone(), dir2.clone(), file2.clone());
        async move {
            let (runtime, events) = Supervisor::new(
                RuntimeConfig {
                    data_dir: dir.join(format!("runtime{n}")),
                    min_drain: Duration::from_millis(50),
                    ..RuntimeConfig::default()
                },
                t.clone(),
                Arc::new(NoMeter),
            )
            .unwrap();
            let table = Arc::new(RouteTable::new("localhost", Vec::new()));
            table.mark_synced();
            let control = Control::new(
                Arc::new(EmbeddedControlStore::open(&file).unwrap()),
                tollgate_control::bundler_for(&t, dir.join("builds")).unwrap(),
                runtime.clone(),
                Arc::new(LocalRoutes::new(table.clone())),
                ControlConfig::default(),
            );
            tokio::spawn(control.clone().follow_runtime(events));
            (control, table, runtime)
        }
    };
    let addr_of = |table: &RouteTable, host: &str| table.lookup(host).map(|r| r.upstreams[0]);

    // The first "process" runs on its own runtime; dropping it ends everything it started.
    let first = {
        let start = start.clone();
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(async move {
                    let (control, table, _runtime) = start(1).await;
                    let d = control
                        .deploy(
                            "acct-a",
                            DeployRequest {
                                files: Some(files("local")),
                                project_name: Some("solo".into()),
                                ..DeployRequest::default()
                            },
                        )
                        .await
                        .unwrap();
                    let addr = table.lookup("solo.localhost").unwrap().upstreams[0];
                    assert_eq!(body(addr).await, "local world");
                    let d2 = control
                        .deploy(
                            "acct-a",
                            DeployRequest {
                                changes: Some(BTreeMap::from([(
                                    "src/who.ts".to_owned(),
                                    Some("export const who = () => 'disk'\n".to_owned()),
                                )])),
                                project_id: Some(d.project_id.clone()),
                                ..DeployRequest::default()
                            },
                        )
                        .await
                        .unwrap();
                    assert_eq!(d2.version, 2);
                    let addr = table.lookup("solo.localhost").unwrap().upstreams[0];
                    assert_eq!(body(addr).await, "local disk");
                    d
                })
        })
        .join()
        .unwrap()
    };
    let d = first;

    // A new process: same file, an empty table.
    let (control, table, _runtime) = start(2).await;
    assert_eq!(addr_of(&table, "solo.localhost"), None);
    assert_eq!(control.recover().await.unwrap(), 1);
    assert_eq!(
        body(addr_of(&table, "solo.localhost").unwrap()).await,
        "local disk"
    );
    let view = control.get_project("acct-a", &d.project_id).await.unwrap();
    assert_eq!(view.live.unwrap().version, 2);
    control.delete("acct-a", &d.project_id).await.unwrap();
    assert_eq!(addr_of(&table, "solo.localhost"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_first_deploy_tells_how_to_keep_its_name() {
    let redis = TestRedis::start();
    let rig = rig(&redis).await;
    let c = &rig.control;
    let e = c
        .deploy(
            "acct-a",
            DeployRequest {
                files: Some(BTreeMap::from([(
                    "src/index.ts".to_owned(),
                    "export default (".to_owned(),
                )])),
                project_name: Some("first-try".into()),
                ..DeployRequest::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, "BUNDLE_FAILED");
    let project_id = e
        .hint
        .split("project_id \"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("no project_id in {:?}", e.hint))
        .to_owned();
    assert!(e.hint.contains("\"first-try\""), "{}", e.hint);
    let ok = c
        .deploy(
            "acct-a",
            DeployRequest {
                files: Some(files("second try")),
                project_id: Some(project_id.clone()),
                ..DeployRequest::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (ok.project_id, ok.slug.as_str(), ok.version),
        (project_id, "first-try", 2)
    );
}

/// A control store whose next `put_deployment` of a deployment in status `fail_on` fails, as a
/// store write that times out would.
struct FailingStore {
    inner: Arc<dyn ControlStore>,
    fail_on: std::sync::Mutex<Option<DeployStatus>>,
}

#[async_trait::async_trait]
impl ControlStore for FailingStore {
    async fn claim_slug(&self, s: &str, p: &str) -> Result<bool, tollgate_control::ControlError> {
        self.inner.claim_slug(s, p).await
    }
    async fn release_slug(
        &self,
        s: &str,
        p: &str,
        g: Duration,
    ) -> Result<(), tollgate_control::ControlError> {
        self.inner.release_slug(s, p, g).await
    }
    async fn put_project(
        &self,
        p: &tollgate_control::model::Project,
    ) -> Result<(), tollgate_control::ControlError> {
        self.inner.put_project(p).await
    }
    async fn project(
        &self,
        id: &str,
    ) -> Result<Option<tollgate_control::model::Project>, tollgate_control::ControlError> {
        self.inner.project(id).await
    }
    async fn projects_of(
        &self,
        o: &str,
    ) -> Result<Vec<tollgate_control::model::Project>, tollgate_control::ControlError> {
        self.inner.projects_of(o).await
    }
    async fn all_projects(
        &self,
    ) -> Result<Vec<tollgate_control::model::Project>, tollgate_control::ControlError> {
        self.inner.all_projects().await
    }
    async fn put_deployment(
        &self,
        d: &tollgate_control::model::Deployment,
    ) -> Result<(), tollgate_control::ControlError> {
        let fail = {
            let mut f = self.fail_on.lock().unwrap();
            let hit = *f == Some(d.status);
            if hit {
                *f = None;
            }
            hit
        };
        if fail {
            return Err(tollgate_control::ControlError::internal(
                "store write timed out (test)",
            ));
        }
        self.inner.put_deployment(d).await
    }
    async fn deployment(
        &self,
        id: &str,
    ) -> Result<Option<tollgate_control::model::Deployment>, tollgate_control::ControlError> {
        self.inner.deployment(id).await
    }
    async fn put_artifacts(
        &self,
        d: &str,
        f: &tollgate_control::model::Files,
        b: &str,
    ) -> Result<(), tollgate_control::ControlError> {
        self.inner.put_artifacts(d, f, b).await
    }
    async fn files(
        &self,
        d: &str,
    ) -> Result<Option<tollgate_control::model::Files>, tollgate_control::ControlError> {
        self.inner.files(d).await
    }
    async fn bundle(&self, d: &str) -> Result<Option<String>, tollgate_control::ControlError> {
        self.inner.bundle(d).await
    }
    async fn delete_artifacts(&self, d: &str) -> Result<(), tollgate_control::ControlError> {
        self.inner.delete_artifacts(d).await
    }
    async fn put_env(
        &self,
        p: &str,
        e: &tollgate_control::model::Env,
    ) -> Result<(), tollgate_control::ControlError> {
        self.inner.put_env(p, e).await
    }
    async fn env(
        &self,
        p: &str,
    ) -> Result<tollgate_control::model::Env, tollgate_control::ControlError> {
        self.inner.env(p).await
    }
    async fn usage(
        &self,
        p: &str,
        b: &[String],
    ) -> Result<tollgate_control::store::Usage, tollgate_control::ControlError> {
        self.inner.usage(p, b).await
    }
    async fn add_rows(
        &self,
        p: &str,
        b: &str,
        r: u64,
        w: u64,
    ) -> Result<(), tollgate_control::ControlError> {
        self.inner.add_rows(p, b, r, w).await
    }
}

/// The rule deploy money follows (the MCP tool refunds exactly the deploys that return an
/// error): an error means the new version does not serve, `Ok` means it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_that_serves_succeeds_and_one_that_does_not_fails() {
    let redis = TestRedis::start();
    let base = rig(&redis).await;
    let failing = Arc::new(FailingStore {
        inner: base.store.clone(),
        fail_on: std::sync::Mutex::new(None),
    });
    let t = Toolchain::ensure(&Toolchain::source_tree_dir()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (runtime, events) = Supervisor::new(
        RuntimeConfig {
            data_dir: dir.path().join("runtime"),
            min_drain: Duration::from_millis(50),
            ..RuntimeConfig::default()
        },
        t.clone(),
        Arc::new(NoMeter),
    )
    .unwrap();
    let c = Control::new(
        failing.clone(),
        tollgate_control::bundler_for(&t, dir.path().join("builds")).unwrap(),
        runtime,
        Arc::new(base.routes.clone()),
        ControlConfig::default(),
    );
    tokio::spawn(c.clone().follow_runtime(events));
    let deploy = |greeting: &'static str, project_id: Option<String>| {
        let c = c.clone();
        async move {
            c.deploy(
                "acct-m",
                DeployRequest {
                    files: Some(files(greeting)),
                    project_id,
                    ..DeployRequest::default()
                },
            )
            .await
        }
    };
    let v1 = deploy("one", None).await.unwrap();
    let pid = Some(v1.project_id.clone());
    // The switch is recorded, then marking the old version superseded fails: the new version
    // serves, so the deploy succeeded (and stays paid for).
    *failing.fail_on.lock().unwrap() = Some(DeployStatus::Superseded);
    let v2 = deploy("two", pid.clone())
        .await
        .expect("a deploy whose version serves is a success");
    let addr = upstream(&base.routes, &v2.slug).await.unwrap();
    assert_eq!(body(addr).await, "two world");
    let view = c.get_project("acct-m", &v2.project_id).await.unwrap();
    assert_eq!(view.live.unwrap().id, v2.deployment_id);
    // Recording the switch fails: the route goes back to the version still running, and the
    // deploy fails (refunded).
    *failing.fail_on.lock().unwrap() = Some(DeployStatus::Live);
    let e = deploy("three", pid).await.unwrap_err();
    assert!(e.message.contains("timed out"), "{}", e.message);
    let addr = upstream(&base.routes, &v2.slug).await.unwrap();
    assert_eq!(body(addr).await, "two world");
    let view = c.get_project("acct-m", &v2.project_id).await.unwrap();
    assert_eq!(view.live.unwrap().id, v2.deployment_id);
}

/// An operator deleting a project that already expired, whose name another account has taken
/// since: the new owner's route stays, the old project is marked deleted, and it is counted as
/// ended once (when it expired).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_deleting_an_expired_project_leaves_the_new_owner_of_its_name_alone() {
    let redis = TestRedis::start();
    let rig = rig_with(&redis.target(), |c| {
        c.inactivity_ttl = Duration::from_millis(300)
    })
    .await;
    let c = &rig.control;
    let old = c
        .deploy(
            "acct-a",
            DeployRequest {
                files: Some(files("old")),
                ..DeployRequest::default()
            },
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(c.sweep().await.unwrap(), vec![old.project_id.clone()]);
    let taker = c
        .deploy(
            "acct-b",
            DeployRequest {
                files: Some(files("new owner")),
                project_name: Some(old.slug.clone()),
                ..DeployRequest::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(taker.slug, old.slug);
    c.admin_delete(&old.project_id).await.unwrap();
    let addr = upstream(&rig.routes, &old.slug).await.unwrap();
    assert_eq!(body(addr).await, "new owner world", "the new owner's route");
    let p = rig.store.project(&old.project_id).await.unwrap().unwrap();
    assert_eq!(p.status, tollgate_control::ProjectStatus::Deleted);
    assert_eq!(
        rig.metric("tollgate_projects_ended_total{reason=\"expired\"}"),
        1.0
    );
    assert_eq!(
        rig.metric("tollgate_projects_ended_total{reason=\"deleted\"}"),
        0.0
    );
}
