//! The binary as an operator runs it: `tollgate proxy` in front of an upstream, SIGTERM drains
//! and exits 0; `tollgate dev --redis` follows routes written with `tollgate routes put`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tollgate_testkit::{RedisServer, TcpCut, Upstream, free_addr};

mod common;
use common::*;

#[test]
fn proxy_fronts_an_upstream_and_exits_0_on_sigterm() {
    let up = Upstream::start("fronted");
    let admin = free_addr();
    let (mut p, listen) = start_listening(|listen| {
        let mut c = bin();
        c.env("TOLLGATE_PUBLIC_MCP_URL", "http://mcp.localhost")
            .args(["proxy", "--listen", &listen.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--threads", "1"])
            .args(["--route", &format!("svc.localhost={}", up.addr)]);
        c
    });
    let c = reqwest::blocking::Client::builder()
        .resolve("svc.localhost", listen)
        .build()
        .unwrap();
    let url = format!("http://svc.localhost:{}/", listen.port());
    assert_eq!(get(&c, &url), (200, "fronted".into()));
    assert_eq!(get(&c, &format!("http://{admin}/readyz")).0, 200);

    let t = Instant::now();
    let status = terminate(&mut p);
    assert_eq!(status.code(), Some(0));
    // Idle: it exits as soon as it drained, not after the whole drain timeout (30 s).
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn a_proxy_that_does_not_know_the_platform_realm_refuses_to_start() {
    // Even on a loopback listener (behind a local load balancer it is just as public).
    let out = bin()
        .stderr(Stdio::piped())
        .args(["proxy", "--listen", &free_addr().to_string()])
        .args(["--admin-listen", &free_addr().to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("public.mcp_url"), "{err}");
}

#[test]
fn operator_commands_read_the_key_prefix_of_the_fleet_config() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fleet.toml");
    std::fs::write(
        &file,
        format!(
            "[redis]\nurl = \"{}\"\nkey_prefix = \"fleet\"\n",
            redis.url()
        ),
    )
    .unwrap();
    let out = bin()
        .stdout(Stdio::piped())
        .args(["accounts", "credit", "--config"])
        .arg(&file)
        .args(["--account", "a1", "--usd", "2", "--key", "k1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // Under the fleet's prefix, not the default one.
    let mut conn = redis.conn();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    assert!(keys.iter().any(|k| k.starts_with("fleet:")), "{keys:?}");
    assert!(!keys.iter().any(|k| k.starts_with("tollgate:")), "{keys:?}");
    let shown = bin()
        .stdout(Stdio::piped())
        .args(["accounts", "show", "--config"])
        .arg(&file)
        .arg("a1")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(v["available"], 2_000_000_000_000i64, "{v}");
    // Routes too: written and listed under the fleet's prefix.
    let put = bin()
        .args(["routes", "put", "--config"])
        .arg(&file)
        .args(["--slug", "fleet-svc", "--upstream", "127.0.0.1:3000"])
        .status()
        .unwrap();
    assert!(put.success());
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    assert!(
        keys.iter()
            .any(|k| k.starts_with("fleet:") && k.contains("route")),
        "{keys:?}"
    );
    assert!(!keys.iter().any(|k| k.starts_with("tollgate:")), "{keys:?}");
    let listed = bin()
        .stdout(Stdio::piped())
        .args(["routes", "list", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains("fleet-svc"), "{text}");
    // The default prefix holds no route.
    let other = bin()
        .stdout(Stdio::piped())
        .args(["routes", "list", "--redis", &redis.url()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&other.stdout);
    assert!(!text.contains("fleet-svc"), "{text}");
}

/// `tollgate control` started before its Redis: it waits (backing off), says which URL and
/// which config key it waits for, and serves once Redis is up.
#[test]
fn control_waits_for_redis_at_start_and_names_the_url_and_its_key() {
    let port = tollgate_testkit::free_port();
    let dir = tempfile::tempdir().unwrap();
    let control = free_addr();
    let url = format!("redis://127.0.0.1:{port}/");
    let cfg = dir.path().join("control.toml");
    std::fs::write(
        &cfg,
        format!(
            "[control]\nlisten = \"{control}\"\nadmin_listen = \"{}\"\ndata_dir = {:?}\n[redis]\nurl = \"{url}\"\n",
            free_addr(),
            dir.path().join("data").display().to_string(),
        ),
    )
    .unwrap();
    let log = dir.path().join("stderr.log");
    let mut p = Proc(
        with_payment_secrets(&mut bin())
            .args(["control", "--config"])
            .arg(&cfg)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(&url) && text.contains("redis.url") {
            break;
        }
        assert!(p.0.try_wait().unwrap().is_none(), "control exited: {text}");
        assert!(Instant::now() < deadline, "no word of the URL: {text}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(p.0.try_wait().unwrap().is_none(), "control gave up at once");
    let _redis = RedisServer::start_on(port);
    wait_for_control(control, &mut p);
    // Ready once its stores answer: the metering agent reconnects on its own schedule.
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = reqwest::blocking::get(format!("http://{control}/readyz")).unwrap();
        if r.status() == 200 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["store"], "ok", "{v}");
    assert_eq!(v["metering"], "ok", "{v}");
    assert!(terminate(&mut p).success());
}

#[test]
fn a_signal_during_start_up_stops_dev_in_order_and_a_taken_port_stops_it_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let dev = |control: SocketAddr| {
        let mut c = bin();
        c.stderr(Stdio::piped())
            .args(["dev", "--chain-listen", &free_addr().to_string()])
            .args(["--proxy-listen", &free_addr().to_string()])
            .args(["--control-listen", &control.to_string()])
            .args(["--admin-listen", &free_addr().to_string()])
            .arg("--data-dir")
            .arg(dir.path().join("data"));
        c
    };
    // SIGTERM while it is still starting: handled (exit 0), not the default action.
    let mut p = dev(free_addr()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    signal(&p, "-TERM");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = p.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "dev did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "{status:?}");
    // The control port is taken: refused at once, nothing started.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = dev(taken.local_addr().unwrap()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("control.listen"), "{err}");
}

#[test]
fn dev_follows_routes_written_to_redis() {
    let redis = RedisServer::start();
    let up = Upstream::start("from-redis");
    let dir = tempfile::tempdir().unwrap();
    let (control, admin) = (free_addr(), free_addr());
    let (_dev, proxy) = start_listening(|proxy| {
        let mut c = bin();
        c.args(["dev", "--redis", &redis.url()])
            .args(["--chain-listen", &free_addr().to_string()])
            .args(["--proxy-listen", &proxy.to_string()])
            .args(["--control-listen", &control.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .arg("--data-dir")
            .arg(dir.path().join("data"));
        c
    });
    assert!(dir.path().join("data").is_dir(), "dev creates its data dir");
    let out = bin()
        .args(["routes", "put", "--redis", &redis.url(), "--slug", "hello"])
        .args(["--upstream", &up.addr.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let c = reqwest::blocking::Client::builder()
        .resolve("hello.localhost", proxy)
        .build()
        .unwrap();
    let url = format!("http://hello.localhost:{}/", proxy.port());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if get(&c, &url) == (200, "from-redis".into()) {
            break;
        }
        assert!(Instant::now() < deadline, "route never served");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = bin()
        .args([
            "routes",
            "delete",
            "--redis",
            &redis.url(),
            "--slug",
            "hello",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&c, &url).0 != 404 {
        assert!(Instant::now() < deadline, "deleted route still served");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Bad input to the route tool: a clear error, non-zero exit, nothing written.
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "routes",
            "put",
            "--redis",
            &redis.url(),
            "--slug",
            "Bad_Slug",
        ])
        .args(["--upstream", &up.addr.to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("slug"));
    let list = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["routes", "list", "--redis", &redis.url()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&list.stdout).trim().is_empty());
}

/// Starts a proxy made by `make(listen, upgrade)`, keeps requests to `host` going, starts its
/// successor with `--upgrade` and SIGQUITs the old one. Asserts that the old one exits 0, no
/// request fails during the hand-over and the new process serves `body` alone; returns the new
/// process, its address and how many requests got 200.
fn upgrade_under_traffic(
    make: impl Fn(SocketAddr, bool) -> Command,
    host: &str,
    body: &str,
) -> (Proc, SocketAddr, u32) {
    let (mut old, listen) = start_listening(|listen| make(listen, false));
    let c = reqwest::blocking::Client::builder()
        .resolve(host, listen)
        .build()
        .unwrap();
    let url = format!("http://{host}:{}/", listen.port());
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&c, &url) != (200, body.into()) {
        assert!(Instant::now() < deadline, "the old process never served");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Traffic throughout the hand-over.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (c, url, stop) = (c.clone(), url.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match c.get(&url).send() {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(r) => {
                        failed.push(format!("{}: {}", r.status(), r.text().unwrap_or_default()))
                    }
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // As deploy/systemd/tollgate-upgrade does: SIGQUIT once the new process opens its upgrade
    // socket, which it does only when it is ready to serve.
    let sock = std::env::temp_dir().join(format!("tollgate-{}.upgrade.sock", listen.port()));
    let _ = std::fs::remove_file(&sock);
    let mut new = Proc(make(listen, true).spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "the new process never opened {sock:?}"
        );
        assert!(
            new.0.try_wait().unwrap().is_none(),
            "the new process exited"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(&old.0, "-QUIT");
    let status = wait_exit(&mut old.0, Duration::from_secs(15), "the old process");
    assert_eq!(status.code(), Some(0));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, failed) = traffic.join().unwrap();
    assert!(
        failed.is_empty(),
        "requests failed during the upgrade: {failed:?}"
    );
    assert!(ok > 100, "too little traffic: {ok}");
    // The new process serves alone now.
    assert_eq!(get(&c, &url), (200, body.into()));
    ok += 2; // the first and the last request above
    (new, listen, ok)
}

#[test]
fn sigquit_hands_the_listener_to_an_upgraded_process_without_dropping_requests() {
    let up = Upstream::start("up");
    let route = format!("u.localhost={}", up.addr);
    // One data dir for both, as one node has: the old process holds its embedded money file
    // until it exits, and the new one takes over without waiting for it.
    let data = tempfile::tempdir().unwrap();
    let (mut new, _, served) = upgrade_under_traffic(
        |listen, upgrade| {
            let mut c = bin();
            c.env("TOLLGATE_DATA_DIR", data.path())
                .env("TOLLGATE_PUBLIC_MCP_URL", "http://mcp.localhost")
                .args(["proxy", "--listen", &listen.to_string()])
                .args(["--admin-listen", &free_addr().to_string()])
                .args(["--route", &route]);
            if upgrade {
                c.arg("--upgrade");
            }
            c
        },
        "u.localhost",
        "up",
    );
    assert!(served > 100, "{served}");
    assert!(
        new.0.try_wait().unwrap().is_none(),
        "the new process keeps serving"
    );
}

/// The same hand-over on a metered route: the new process meters at once as a stand-in node
/// (the old one still holds the journal), so no request gets 503, and every request either
/// process served is debited exactly once.
#[test]
fn a_metered_route_upgrades_without_a_503_and_every_request_is_paid_once() {
    let redis = RedisServer::start();
    let up = Upstream::start("paid");
    let data = tempfile::tempdir().unwrap();
    put_metered_route(&redis.url(), "paid", up.addr, "acct-up");
    assert!(
        credit_account(&redis.url(), "acct-up", "5", "upgrade-test")
            .status
            .success()
    );
    let (mut new, _, served) = upgrade_under_traffic(
        |listen, upgrade| {
            let mut c = bin();
            c.env("TOLLGATE_DATA_DIR", data.path())
                .env("TOLLGATE_PUBLIC_MCP_URL", "http://mcp.localhost")
                .args(["proxy", "--listen", &listen.to_string()])
                .args(["--admin-listen", &free_addr().to_string()])
                .args(["--redis", &redis.url()]);
            if upgrade {
                c.arg("--upgrade");
            }
            c
        },
        "paid.localhost",
        "paid",
    );
    assert!(terminate(&mut new).success());
    let acct = account_json(&redis.url(), "acct-up");
    assert_eq!(
        acct["debited"],
        i64::from(served) * 500_000,
        "{served} requests served across both processes: {acct}"
    );
    assert_eq!(
        acct["leased"], 0,
        "both processes returned their leases: {acct}"
    );
}

/// A new process that cannot load its routes or start metering (Redis away) does not take the
/// listeners: it exits 1 saying why, and the old process keeps serving what it has.
#[test]
fn an_upgrade_that_cannot_reach_redis_leaves_the_old_process_serving() {
    let mut redis = RedisServer::start();
    let up = Upstream::start("kept");
    let data = tempfile::tempdir().unwrap();
    let redis_url = redis.url();
    let out = bin()
        .args(["routes", "put", "--redis", &redis_url, "--slug", "kept"])
        .args(["--upstream", &up.addr.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let make = |listen: SocketAddr| {
        let mut c = bin();
        c.env("TOLLGATE_DATA_DIR", data.path())
            .env("TOLLGATE_PUBLIC_MCP_URL", "http://mcp.localhost")
            .args(["proxy", "--listen", &listen.to_string()])
            .args(["--admin-listen", &free_addr().to_string()])
            .args(["--redis", &redis_url]);
        c
    };
    let (mut old, listen) = start_listening(make);
    let c = reqwest::blocking::Client::builder()
        .resolve("kept.localhost", listen)
        .build()
        .unwrap();
    let url = format!("http://kept.localhost:{}/", listen.port());
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&c, &url) != (200, "kept".into()) {
        assert!(Instant::now() < deadline, "the old process never served");
        std::thread::sleep(Duration::from_millis(20));
    }
    redis.kill();
    let sock = std::env::temp_dir().join(format!("tollgate-{}.upgrade.sock", listen.port()));
    let _ = std::fs::remove_file(&sock);
    let mut new = make(listen);
    let new = new.arg("--upgrade").stderr(Stdio::piped()).spawn().unwrap();
    let out = new.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("not ready to take over") && err.contains("routes"),
        "{err}"
    );
    assert!(!sock.exists(), "the upgrade socket was never opened");
    assert_eq!(
        get(&c, &url),
        (200, "kept".into()),
        "the old process serves on"
    );
    assert!(terminate(&mut old).success());
}

/// An operator's path through metering: a route owned by an account with no credit answers 402;
/// `tollgate accounts credit` (idempotent by key) brings it back.
#[test]
fn metered_route_is_402_until_an_operator_credits_the_account() {
    let redis = RedisServer::start();
    let up = Upstream::start("paid");
    let (mut dev, proxy) = start_listening(|proxy| {
        let mut c = bin();
        c.args(["dev", "--redis", &redis.url()])
            .args(["--chain-listen", &free_addr().to_string()])
            .args(["--proxy-listen", &proxy.to_string()])
            .args(["--control-listen", &free_addr().to_string()])
            .args(["--admin-listen", &free_addr().to_string()]);
        c
    });
    put_metered_route(&redis.url(), "paid", up.addr, "acct-ops");
    let c = reqwest::blocking::Client::builder()
        .resolve("paid.localhost", proxy)
        .build()
        .unwrap();
    let url = format!("http://paid.localhost:{}/", proxy.port());
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&c, &url).0 != 402 {
        assert!(
            Instant::now() < deadline,
            "an account without credit must get 402"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let credit = || credit_account(&redis.url(), "acct-ops", "0.01", "ticket-42");
    let out = credit();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["credited"], 10_000_000_000i64); // $0.01 in pico-dollars
    // The same key again adds nothing.
    let again: serde_json::Value = serde_json::from_slice(&credit().stdout).unwrap();
    assert_eq!(again["credited"], 10_000_000_000i64);
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&c, &url) != (200, "paid".into()) {
        assert!(
            Instant::now() < deadline,
            "credit did not resume the service"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(get(&c, &url), (200, "paid".into()));
    // A graceful stop settles what was served and returns the node's lease before exiting.
    let status = terminate(&mut dev);
    assert!(status.success(), "{status}");
    let acct = account_json(&redis.url(), "acct-ops");
    assert_eq!(
        acct["debited"],
        2 * 500_000i64,
        "two requests served, both settled: {acct}"
    );
    assert_eq!(acct["leased"], 0, "lease returned at exit: {acct}");
}

/// `tollgate dev --redis` runs the control service and the runtime in the same process; its
/// operator API answers with the admin token.
#[test]
fn dev_runs_the_control_service_with_its_operator_api() {
    let redis = RedisServer::start();
    let control = free_addr();
    let (mut dev, _proxy) = start_listening(|proxy| {
        let mut c = bin();
        c.env("TOLLGATE_ADMIN_TOKEN", "t0ken")
            .args(["dev", "--redis", &redis.url()])
            .args(["--chain-listen", &free_addr().to_string()]);
        listen_on(&mut c, proxy, control);
        c
    });
    wait_for_control(control, &mut dev);
    let c = reqwest::blocking::Client::new();
    let r = c
        .get(format!("http://{control}/v1/admin/projects"))
        .bearer_auth("t0ken")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().unwrap(), r#"{"projects":[]}"#);
    let r = c
        .get(format!("http://{control}/v1/admin/projects"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// `tollgate control --config F` serves until SIGTERM, then exits 0.
#[test]
fn control_command_serves_and_stops_on_sigterm() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let control = free_addr();
    let admin = free_addr();
    let cfg = dir.path().join("control.toml");
    std::fs::write(
        &cfg,
        format!(
            "[control]\nlisten = \"{control}\"\nadmin_listen = \"{admin}\"\ndata_dir = {:?}\n[redis]\nurl = \"{}\"\n",
            dir.path().join("data").display().to_string(),
            redis.url()
        ),
    )
    .unwrap();
    // Production takes its payment secrets from the environment (or files), never from dev
    // defaults: without them it does not start.
    let status = bin()
        .args(["control", "--config"])
        .arg(&cfg)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(1), "started without payment secrets");
    // Nor does it take "payments" on the project's test chain (no real money) unless told.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let chain = rt
        .block_on(tollgate_testchain::TestChain::spawn(
            free_addr(),
            tollgate_testchain::ChainConfig::default(),
        ))
        .unwrap();
    let test_cfg = dir.path().join("on-test-chain.toml");
    std::fs::write(
        &test_cfg,
        format!(
            "{}[payments]\nrpc_url = \"{}\"\n",
            std::fs::read_to_string(&cfg).unwrap(),
            chain.url()
        ),
    )
    .unwrap();
    let out = with_payment_secrets(&mut bin())
        .args(["control", "--config"])
        .arg(&test_cfg)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("test chain") && err.contains("no real money"),
        "{err}"
    );
    drop(chain);
    // Under a supervisor: what systemd would receive on NOTIFY_SOCKET, and the PID file.
    let notify = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let pid_file = dir.path().join("control.pid");
    let mut p = Proc(
        with_payment_secrets(&mut bin())
            .env("NOTIFY_SOCKET", &notify)
            .args(["control", "--config"])
            .arg(&cfg)
            .arg("--pid-file")
            .arg(&pid_file)
            .spawn()
            .unwrap(),
    );
    let told = |sock: &std::os::unix::net::UnixDatagram, what: &str| -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = sock.recv(&mut buf)
                && String::from_utf8_lossy(&buf[..n]).contains(what)
            {
                return true;
            }
        }
        false
    };
    assert!(told(&sock, "READY=1"), "no READY=1");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        p.0.id().to_string()
    );
    wait_for_control(control, &mut p);
    let c = reqwest::blocking::Client::new();
    let get = |url: String| c.get(url).send().unwrap();
    // The operator API and the metrics are on the private admin listener only.
    for path in ["/v1/admin/projects", "/metrics"] {
        assert_eq!(
            get(format!("http://{control}{path}")).status(),
            404,
            "{path}"
        );
    }
    // No admin token configured: the operator API is off.
    assert_eq!(
        get(format!("http://{admin}/v1/admin/projects")).status(),
        503
    );
    let metrics = get(format!("http://{admin}/metrics")).text().unwrap();
    assert!(metrics.contains("tollgate_build_info{"), "{metrics}");
    for addr in [control, admin] {
        assert_eq!(get(format!("http://{addr}/livez")).status(), 200);
        assert_eq!(get(format!("http://{addr}/readyz")).status(), 200);
    }
    signal(&p.0, "-TERM");
    assert!(told(&sock, "STOPPING=1"), "no STOPPING=1");
    let status = wait_exit(&mut p.0, Duration::from_secs(30), "control");
    assert!(status.success(), "{status}");
    assert!(!pid_file.exists(), "the PID file outlived the process");
}

/// The path an agent takes on a developer's machine, with the real binary and the official MCP
/// TypeScript SDK client: `tollgate dev --redis --dev-account`, credit, deploy over MCP, fetch the
/// URL through the metered proxy. (Payment over MPP replaces the operator's credit in issue #5.)
#[test]
fn an_agent_deploys_over_mcp_in_dev_and_its_url_answers_through_the_proxy() {
    let redis = RedisServer::start();
    let control = free_addr();
    let (mut dev, proxy) = start_listening(|proxy| {
        let mut c = bin();
        c.args(["dev", "--redis", &redis.url(), "--dev-account", "acct-dev"])
            .args(["--chain-listen", &free_addr().to_string()]);
        listen_on(&mut c, proxy, control);
        c
    });
    wait_for_control(control, &mut dev);
    assert!(
        credit_account(&redis.url(), "acct-dev", "1.00", "dev-credit")
            .status
            .success()
    );

    let deployed = deploy_hello(control);
    assert_eq!(deployed["status"], "live", "{deployed}");
    let url = deployed["url"].as_str().unwrap().to_owned();
    assert_eq!(
        url,
        format!("http://hello-agent.localhost:{}", proxy.port())
    );

    let c = reqwest::blocking::Client::builder()
        .resolve("hello-agent.localhost", proxy)
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if get(&c, &url) == (200, "hello from an agent".into()) {
            break;
        }
        assert!(Instant::now() < deadline, "the deployed URL never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The same path with no Redis at all: `tollgate dev` keeps money, projects and routes on disk
/// in its data dir, and `--dev-credit-usd` gives the dev account its credit.
#[test]
fn without_redis_dev_runs_the_whole_path_on_its_embedded_stores() {
    let control = free_addr();
    let (mut dev, proxy) = start_listening(|proxy| {
        let mut c = bin();
        c.args([
            "dev",
            "--dev-account",
            "acct-solo",
            "--dev-credit-usd",
            "0.50",
        ])
        .args(["--chain-listen", &free_addr().to_string()]);
        listen_on(&mut c, proxy, control);
        c
    });
    wait_for_control(control, &mut dev);
    let deployed = deploy_hello(control);
    let url = deployed["url"].as_str().unwrap_or_default().to_owned();
    let c = reqwest::blocking::Client::builder()
        .resolve("hello-agent.localhost", proxy)
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&c, &url) != (200, "hello from an agent".into()) {
        assert!(Instant::now() < deadline, "not served: {deployed}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The whole path an agent with no human account takes, with real clients only: `tollgate dev`
/// (embedded stores, the local test chain), the pinned mppx client wrapping the official MCP
/// TypeScript SDK client. It tops up (a voucher), reads its balance (a zero-amount proof),
/// deploys paying the price plus prepay in one voucher, and its URL answers through the metered
/// proxy; the HTTP top-up endpoint takes the plain mppx fetch client too.
#[test]
fn an_agent_pays_over_mcp_with_mppx_deploys_and_its_url_answers() {
    const PAYER: &str = "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a";
    let control = free_addr();
    let chain = free_addr();
    let data = tempfile::tempdir().unwrap();
    let (mut dev, proxy) = start_listening(|proxy| {
        let mut c = bin();
        c.env("TOLLGATE_DATA_DIR", data.path());
        c.args(["dev", "--chain-listen", &chain.to_string()]);
        listen_on(&mut c, proxy, control);
        c
    });
    wait_for_control(control, &mut dev);
    let rpc = format!("http://{chain}");
    let c = reqwest::blocking::Client::builder()
        .resolve("paid-agent.localhost", proxy)
        .resolve("thin-agent.localhost", proxy)
        .build()
        .unwrap();
    // The faucet of the test chain (no real money) funds the agent's wallet.
    let payer = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC";
    fund(&c, &rpc, payer);
    let js = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("payments/tests/js");
    let mppx_as = |key: &str, args: &[&str]| -> Vec<serde_json::Value> {
        let out = Command::new("node")
            .arg(js.join("client.mjs"))
            .args(args)
            .env("RPC", &rpc)
            .env("KEY", key)
            .env("RESOLVE", "thin-agent.localhost:127.0.0.1")
            .output()
            .unwrap();
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        assert!(
            out.status.success(),
            "{lines:?} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        lines
    };
    let mppx = |args: &[&str]| mppx_as(PAYER, args);
    let mcp = format!("http://{control}/mcp");
    let account = format!("did:pkh:eip155:42431:{}", payer.to_lowercase());

    let top = mppx(&["mcp", &mcp, "top_up", r#"{"amount_usd":"2"}"#, "1"]);
    assert_eq!(top[0]["structured"]["available_usd"], "2.000000", "{top:?}");
    assert_eq!(top[0]["structured"]["account"], account.as_str());
    assert_eq!(
        top[0]["receipt"]["acceptedCumulative"], "2000000",
        "{top:?}"
    );

    let bal = mppx(&["mcp", &mcp, "get_balance", "{}", "1"]);
    assert_eq!(bal[0]["structured"]["available_usd"], "2.000000", "{bal:?}");
    assert_eq!(bal[0]["structured"]["credited_usd"], "2.000000");

    let deploy_args = serde_json::json!({
        "project_name": "paid-agent",
        "prepay_usd": "1",
        "files": {"src/index.ts": "import { Hono } from 'hono'\nconst app = new Hono()\napp.get('/', (c) => c.text('paid for by an agent'))\nexport default app\n"}
    })
    .to_string();
    let d = mppx(&["mcp", &mcp, "deploy_project", &deploy_args, "1"]);
    let out = &d[0]["structured"];
    assert_eq!(out["status"], "live", "{d:?}");
    assert_eq!(out["charged_usd"], "0.050000");
    // $2 + ($0.05 + $1 paid) − $0.05 deploy = $3, less what the new version's process has used
    // so far: its start-up CPU is the service's CPU, charged from the first sample (a few ms at
    // $12.50 per million CPU-ms; whether a sample settled before this answer is timing).
    let balance: f64 = out["balance_usd"].as_str().unwrap().parse().unwrap();
    assert!((2.99..=3.0).contains(&balance), "{d:?}");
    assert_eq!(d[0]["receipt"]["acceptedCumulative"], "1050000", "{d:?}");
    let url = out["url"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&c, &url) != (200, "paid for by an agent".into()) {
        assert!(Instant::now() < deadline, "not served: {d:?}");
        std::thread::sleep(Duration::from_millis(20));
    }

    assert!(out["expires_at_ms"].as_u64().unwrap_or(0) > 0, "{d:?}");

    // Iterate: a redeploy with `changes` (paid from the balance) while requests keep coming:
    // none fails, and the response changes.
    let project_id = out["project_id"].as_str().unwrap().to_owned();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hammer = {
        let (c, url, stop) = (c.clone(), url.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut ok, mut bad) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match c.get(&url).send() {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(r) => bad.push(format!("{} {}", r.status(), r.text().unwrap_or_default())),
                    Err(e) => bad.push(e.to_string()),
                }
            }
            (ok, bad)
        })
    };
    let v2 = serde_json::json!({
        "project_id": project_id,
        "prepay_usd": "0",
        "changes": {"src/index.ts": "import { Hono } from 'hono'\nconst app = new Hono()\napp.get('/', (c) => { console.log('served v2'); return c.text('v2, still paid for') })\nexport default app\n"}
    })
    .to_string();
    let r2 = mppx(&["mcp", &mcp, "deploy_project", &v2, "1"]);
    assert_eq!(r2[0]["structured"]["status"], "live", "{r2:?}");
    assert_eq!(r2[0]["structured"]["version"], 2);
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&c, &url) != (200, "v2, still paid for".into()) {
        assert!(Instant::now() < deadline, "v2 not served");
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, bad) = hammer.join().unwrap();
    assert!(ok > 0 && bad.is_empty(), "{ok} ok, failures {bad:?}");
    // Observe: the handler's console.log is in the logs.
    let logs = mppx(&[
        "mcp",
        &mcp,
        "get_logs",
        &serde_json::json!({"project_id": project_id}).to_string(),
        "1",
    ]);
    let lines = logs[0]["structured"]["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        lines.iter().any(|l| l["message"] == "served v2"),
        "{logs:?}"
    );
    // Roll back (a new deployment, at the deploy price from the balance): version 1's code
    // answers again.
    let rb = mppx(&[
        "mcp",
        &mcp,
        "rollback_project",
        &serde_json::json!({"project_id": project_id}).to_string(),
        "1",
    ]);
    assert_eq!(rb[0]["structured"]["status"], "live", "{rb:?}");
    assert_eq!(rb[0]["structured"]["charged_usd"], "0.050000", "{rb:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&c, &url) != (200, "paid for by an agent".into()) {
        assert!(Instant::now() < deadline, "rollback not served");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The HTTP binding: the plain mppx fetch client pays the top-up endpoint's 402 by itself.
    let http = mppx(&[
        "http",
        &format!("http://{control}/v1/top-up?amount_usd=0.5"),
        "2",
    ]);
    assert!(http.iter().all(|l| l["status"] == 200), "{http:?}");
    assert_eq!(http[1]["receipt"]["acceptedCumulative"], "1000000");
    assert_eq!(http[1]["body"]["account"], account.as_str());

    // A second agent runs its balance to zero: its URL answers 402 with a Payment challenge,
    // and its own wallet answering that challenge (mppx fetch, on the service URL) tops it up
    // and gets the page, with a receipt.
    const OWNER2: &str = "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6";
    let owner2 = "0x90F79bf6EB2c4f870365E785982E1f101E93b906";
    fund(&c, &rpc, owner2);
    // $0.05 for the deploy and $0.000002: four requests.
    let top = mppx_as(
        OWNER2,
        &["mcp", &mcp, "top_up", r#"{"amount_usd":"0.050002"}"#, "1"],
    );
    assert_eq!(top[0]["structured"]["available_usd"], "0.050002", "{top:?}");
    let thin_args = serde_json::json!({
        "project_name": "thin-agent",
        "prepay_usd": "0",
        "files": {"src/index.ts": "export default { fetch: () => new Response('thin but paid') }\n"}
    })
    .to_string();
    let d = mppx_as(OWNER2, &["mcp", &mcp, "deploy_project", &thin_args, "1"]);
    assert_eq!(d[0]["structured"]["status"], "live", "{d:?}");
    // $0.000002 left, less the new process's start-up CPU if a sample settled before the
    // answer (timing): at most a few ms of CPU.
    let left: f64 = d[0]["structured"]["balance_usd"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((-0.001..=0.000002).contains(&left), "{d:?}");
    let thin = d[0]["structured"]["url"].as_str().unwrap().to_owned();
    let mut served = 0;
    let suspended = loop {
        let r = c.get(&thin).send().unwrap();
        if r.status() == 402 {
            break r;
        }
        assert_eq!(r.status(), 200);
        served += 1;
        assert!(served <= 4, "served past the balance");
    };
    let challenge = suspended
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(challenge.starts_with("Payment "), "{challenge:?}");
    assert!(challenge.contains(r#"intent="session""#), "{challenge}");
    assert_eq!(suspended.headers()["cache-control"], "no-store");
    // The agent sees why: its project is suspended for lack of credit.
    let thin_id = serde_json::json!({"project_id": d[0]["structured"]["project_id"]}).to_string();
    let gp = mppx_as(OWNER2, &["mcp", &mcp, "get_project", &thin_id, "1"]);
    assert_eq!(gp[0]["structured"]["status"], "suspended", "{gp:?}");
    assert_eq!(gp[0]["structured"]["suspended_for"], "no_credit", "{gp:?}");
    let paid = mppx_as(OWNER2, &["http", &thin, "1", "GET"]);
    assert_eq!(paid[0]["status"], 200, "{paid:?}");
    assert_eq!(paid[0]["body"], "thin but paid", "{paid:?}");
    assert_eq!(paid[0]["receipt"]["status"], "success", "{paid:?}");
    assert_eq!(get(&c, &thin), (200, "thin but paid".into()));
    let gp = mppx_as(OWNER2, &["mcp", &mcp, "get_project", &thin_id, "1"]);
    assert_eq!(gp[0]["structured"]["status"], "active", "{gp:?}");

    // A deploy that fails to bundle charges nothing (its price comes back), and the live
    // version keeps serving.
    let before = mppx_as(OWNER2, &["mcp", &mcp, "get_balance", "{}", "1"]);
    let broken = serde_json::json!({
        "project_id": d[0]["structured"]["project_id"],
        "prepay_usd": "0",
        "files": {"src/index.ts": "export default { fetch: () => new Response('oops' }\n"}
    })
    .to_string();
    let failed = mppx_as(OWNER2, &["mcp", &mcp, "deploy_project", &broken, "1"]);
    assert_eq!(failed[0]["isError"], true, "{failed:?}");
    let text = failed[0]["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("BUNDLE_FAILED") && text.contains("refunded"),
        "{text}"
    );
    let after = mppx_as(OWNER2, &["mcp", &mcp, "get_balance", "{}", "1"]);
    // The balance names what each project costs.
    assert_eq!(
        after[0]["structured"]["projects"][0]["slug"], "thin-agent",
        "{after:?}"
    );
    assert!(after[0]["structured"]["projects"][0]["day_request_cost_usd"].is_string());
    // The price was charged and given back: both totals moved by exactly $0.05, nothing else.
    let micros = |v: &[serde_json::Value], k: &str| -> i64 {
        v[0]["structured"][k]
            .as_str()
            .unwrap()
            .replace('.', "")
            .parse()
            .unwrap()
    };
    assert_eq!(
        micros(&after, "credited_usd") - micros(&before, "credited_usd"),
        50_000
    );
    assert_eq!(
        micros(&after, "spent_usd") - micros(&before, "spent_usd"),
        50_000
    );
    assert_eq!(get(&c, &thin), (200, "thin but paid".into()));

    // Two payers never see each other's projects.
    let mine = mppx_as(OWNER2, &["mcp", &mcp, "list_projects", "{}", "1"]);
    let slugs: Vec<&str> = mine[0]["structured"]["projects"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["slug"].as_str())
        .collect();
    assert_eq!(slugs, ["thin-agent"], "{mine:?}");
    let theirs = serde_json::json!({"project_id": out["project_id"]}).to_string();
    let denied = mppx_as(OWNER2, &["mcp", &mcp, "get_project", &theirs, "1"]);
    assert_eq!(denied[0]["isError"], true, "{denied:?}");
    assert!(
        denied[0]["text"]
            .as_str()
            .unwrap_or_default()
            .contains("NOT_FOUND")
    );

    // Clean up: deleting the project takes its URL down.
    let del = mppx(&[
        "mcp",
        &mcp,
        "delete_project",
        &serde_json::json!({"project_id": project_id}).to_string(),
        "1",
    ]);
    assert_eq!(del[0]["structured"]["deleted"], true, "{del:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&c, &url).0 != 404 {
        assert!(Instant::now() < deadline, "still served after delete");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The books: every balance is backed by money captured or still capturable on chain
    // (`tollgate accounts audit`, once dev has settled and let go of its stores; the test
    // chain comes back from its state file).
    assert!(terminate(&mut dev).success());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let chain = rt
        .block_on(tollgate_testchain::TestChain::spawn(
            "127.0.0.1:0".parse().unwrap(),
            tollgate_testchain::ChainConfig {
                state_file: Some(data.path().join("testchain.json")),
                ..Default::default()
            },
        ))
        .unwrap();
    let audit = bin()
        .stdout(Stdio::piped())
        .args(["accounts", "audit", "--rpc", &chain.url()])
        .arg("--data-dir")
        .arg(data.path())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&audit.stdout);
    assert!(audit.status.success(), "{report}");
    assert!(report.contains("no differences"), "{report}");
    assert!(report.contains(&account), "{report}");
}

/// The control process killed (`kill -9`) in the middle of a paid deploy: the deploy was
/// charged and never went live. After the restart, the charge gives itself back at its
/// deadline (`payments.start_refund_hold_seconds`, 5 s here): the customer never pays for a
/// start that did not happen. Real parts: `tollgate dev` on a real Redis, the local test chain
/// (no real money), the real mppx client over MCP, workerd.
#[test]
fn a_deploy_charged_when_the_control_process_dies_is_given_back() {
    const PAYER: &str = "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a";
    let redis = RedisServer::start();
    let control = free_addr();
    let chain = free_addr();
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("tollgate.toml");
    // A 5 s hold (allowed only against a test chain; 240 s at least otherwise).
    std::fs::write(
        &config,
        "[payments]\nallow_test_chain = true\nstart_refund_hold_seconds = 5\n",
    )
    .unwrap();
    let start = |data: &std::path::Path| {
        let (mut dev, _proxy) = start_listening(|proxy| {
            let mut c = bin();
            c.env("TOLLGATE_DATA_DIR", data);
            c.args(["dev", "--config"]).arg(&config);
            c.args([
                "--redis",
                &redis.url(),
                "--chain-listen",
                &chain.to_string(),
            ]);
            listen_on(&mut c, proxy, control);
            c
        });
        wait_for_control(control, &mut dev);
        dev
    };
    let mut dev = start(data.path());
    let rpc = format!("http://{chain}");
    let c = reqwest::blocking::Client::new();
    let payer = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC";
    fund(&c, &rpc, payer);
    let js = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("payments/tests/js");
    let mppx = |args: &[&str]| {
        let mut cmd = Command::new("node");
        cmd.arg(js.join("client.mjs"))
            .args(args)
            .env("RPC", &rpc)
            .env("KEY", PAYER)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    };
    let mcp = format!("http://{control}/mcp");
    let account = format!("did:pkh:eip155:42431:{}", payer.to_lowercase());
    let top = mppx(&["mcp", &mcp, "top_up", r#"{"amount_usd":"1"}"#, "1"])
        .output()
        .unwrap();
    assert!(
        top.status.success(),
        "{}",
        String::from_utf8_lossy(&top.stderr)
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt
        .block_on(tollgate_metering::RedisStore::connect(
            &redis.url(),
            "tollgate",
            Duration::from_secs(10),
        ))
        .unwrap();
    let dollar = 1_000_000_000_000i64;
    let state = || {
        rt.block_on(tollgate_metering::Store::account(&store, &account))
            .unwrap()
            .unwrap()
    };
    assert_eq!(state().credited, dollar);
    // A deploy whose code never gets ready (a loop at start-up): the control service charges
    // it, then waits for the runtime; it is killed in that wait.
    let never_ready = serde_json::json!({
        "project_name": "dies-mid-deploy",
        "prepay_usd": "0",
        "files": {"src/index.js": "while (true) {}\nexport default { fetch() { return new Response('never') } }\n"}
    })
    .to_string();
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let asked = now_ms();
    let mut deploy = mppx(&["mcp", &mcp, "deploy_project", &never_ready, "1"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while state().debited == 0 {
        assert!(Instant::now() < deadline, "the deploy was never charged");
        std::thread::sleep(Duration::from_millis(10));
    }
    let seen = now_ms();
    let _ = dev.0.kill();
    let _ = dev.0.wait();
    let _ = deploy.kill();
    let _ = deploy.wait();
    let charged = state();
    assert_eq!(
        charged.debited,
        dollar / 20,
        "the deploy's price: {charged:?}"
    );
    // The outcome was never recorded: its reversal is held.
    let held = rt
        .block_on(async {
            let b = tollgate_payments::RedisChannels::connect(&redis.url(), "tollgate")
                .await
                .unwrap();
            tollgate_payments::ChannelBackend::held_credits(&b).await
        })
        .unwrap();
    assert_eq!(held.len(), 1, "{held:?}");
    // Held for the configured 5 s from the charge.
    let due = held[0].not_before_ms.unwrap();
    assert!(
        (asked + 5_000..=seen + 5_000).contains(&due),
        "due at {due}, charged between {asked} and {seen}"
    );
    // Restarted: the drain gives the charge back at the deadline, once.
    let mut dev = start(data.path());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = state();
        if s.available == dollar {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the charge was never given back: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    let s = state();
    assert_eq!(
        (s.credited, s.available),
        (dollar + dollar / 20, dollar),
        "{s:?}"
    );
    assert!(terminate(&mut dev).success());
}

/// The local test chain (no real money) reachable by `tollgate dev` only through a TcpCut; the
/// real mppx client pays two $1 vouchers on the HTTP top-up endpoint. (1) The chain is cut (no
/// FIN) while $1.50 of the $2 is spent: settlement rounds fail and are counted, nothing moves;
/// restored, the spent part settles (the largest signed voucher not above what was spent, $1).
/// (2) The chain is cut again and the payer closes: the close is recorded (no more vouchers) and
/// the client is told to retry (503), nothing moves on chain; restored, the server finishes the
/// close by itself: $1.50 captured in all, the rest of the $5 deposit back to the payer, the
/// unused $0.50 withdrawn from the account. Credit was added once per voucher, the balance
/// invariant holds, and `tollgate accounts audit` against the chain finds no difference.
#[test]
fn the_chain_unreachable_during_settlement_and_close_loses_nothing_and_both_finish_after() {
    const PAYER: &str = "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a";
    let payer = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC";
    let account = format!("did:pkh:eip155:42431:{}", payer.to_lowercase());
    let usd = tollgate_metering::PICOS_PER_USD;

    // The chain, in this process; tollgate reaches it only through the cut.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let chain = rt
        .block_on(tollgate_testchain::TestChain::spawn(
            "127.0.0.1:0".parse().unwrap(),
            tollgate_testchain::ChainConfig::default(),
        ))
        .unwrap();
    let tc = chain.chain();
    let cut = TcpCut::start(chain.addr());
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tollgate.toml");
    // Settlement every second, the close watcher every second, challenges good for 5 minutes
    // (the close answers the last payment's challenge, minutes later), a chain call that
    // takes over 2 s failed.
    std::fs::write(
        &config,
        "[payments]\nallow_test_chain = true\nsettle_interval_seconds = 1\nclose_watch_seconds = 1\nchallenge_ttl_seconds = 300\nchain_timeout_seconds = 2\n",
    )
    .unwrap();
    let control = free_addr();
    let admin = free_addr();
    let (mut dev, _proxy) = start_listening(|proxy| {
        let mut c = bin();
        c.args(["dev", "--config"]).arg(&config);
        c.args(["--redis", &redis.url()])
            .args(["--chain-rpc", &format!("http://{}", cut.addr())])
            .args(["--proxy-listen", &proxy.to_string()])
            .args(["--control-listen", &control.to_string()])
            .args(["--admin-listen", &admin.to_string()]);
        c
    });
    wait_for_control(control, &mut dev);
    // tollgate_payment_chain_transactions_total{kind, result}, and the close credentials the
    // node answered "unavailable".
    let chain_tx = |kind: &str, result: &str| {
        scrape(
            admin,
            "tollgate_payment_chain_transactions_total",
            &[("kind", kind), ("result", result)],
        )
    };
    let settle_failed = || chain_tx("settle", "failed");
    let settle_ok = || chain_tx("settle", "ok");
    let close_ok = || chain_tx("close", "ok");
    let close_unavailable = || {
        scrape(
            admin,
            "tollgate_payment_credentials_total",
            &[("action", "close"), ("result", "unavailable")],
        )
    };

    // Stores, read from the test.
    let store = rt
        .block_on(tollgate_metering::RedisStore::connect(
            &redis.url(),
            "tollgate",
            Duration::from_secs(10),
        ))
        .unwrap();
    let state = || {
        rt.block_on(tollgate_metering::Store::account(&store, &account))
            .unwrap()
            .unwrap()
    };
    let channels = rt
        .block_on(tollgate_payments::RedisChannels::connect(
            &redis.url(),
            "tollgate",
        ))
        .unwrap();
    let balanced = |s: &tollgate_metering::AccountState| {
        assert_eq!(s.credited - s.debited, s.available + s.leased, "{s:?}");
    };

    // 1. The payer's wallet, funded by the faucet (directly: only tollgate is cut off).
    let c = reqwest::blocking::Client::new();
    fund(&c, &chain.url(), payer);
    let funded = tc.balance(tollgate_testchain::PATH_USD, payer.parse().unwrap());
    assert!(funded >= 5_000_000, "{funded}");

    // 2. Two $1 payments with the real mppx session manager (open with a $5 deposit, then a
    //    voucher); it then waits for us before closing.
    let js = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("payments/tests/js");
    let url = format!("http://{control}/v1/top-up?amount_usd=1");
    let mut payer_run = Mppx::start(
        &js,
        &chain.url(),
        PAYER,
        &["manager", &url, "2", "wait-close"],
    );
    let paid = payer_run.lines_until(|l| l["waiting"] == true, Duration::from_secs(60));
    assert_eq!(paid.len(), 3, "{paid:?}");
    assert_eq!(paid[0]["status"], 200, "{paid:?}");
    assert_eq!(paid[1]["status"], 200, "{paid:?}");
    assert_eq!(
        paid[1]["receipt"]["acceptedCumulative"], "2000000",
        "{paid:?}"
    );
    let ch = paid[0]["channelId"].as_str().unwrap().to_ascii_lowercase();
    assert_eq!(
        paid[1]["channelId"].as_str().unwrap().to_ascii_lowercase(),
        ch
    );
    let on_chain = || tc.channel(ch.parse().unwrap());
    let record = || {
        rt.block_on(tollgate_payments::ChannelBackend::get(&channels, &ch))
            .unwrap()
            .expect("channel record")
    };
    let opened = on_chain().expect("channel open on chain");
    assert_eq!((opened.deposit, opened.settled), (5_000_000, 0));
    let payee = opened.descriptor.payee;
    let payee_before = tc.balance(tollgate_testchain::PATH_USD, payee);
    let payer_after_open = tc.balance(tollgate_testchain::PATH_USD, payer.parse().unwrap());
    assert_eq!(payer_after_open, funded - 5_000_000);
    // Credited once per voucher; the close has not started.
    let s = eventually(Duration::from_secs(10), "the vouchers' credit", || {
        let s = state();
        if s.credited == 2 * usd {
            Ok(s)
        } else {
            Err(format!("{s:?}"))
        }
    });
    assert_eq!(s.available, 2 * usd, "{s:?}");
    balanced(&s);

    // 3. Settlement while the chain is cut. Cut first, then spend $1.50: no settlement can have
    //    landed before the cut (nothing was spent), and every later one needs the chain.
    let failed_before = settle_failed();
    cut.freeze();
    let spent = rt
        .block_on(tollgate_metering::Store::charge(
            &store,
            &account,
            "test-spend",
            3 * usd / 2,
            false,
        ))
        .unwrap();
    assert_eq!(spent.taken, 3 * usd / 2);
    // A round fails, and is counted, in a bounded time (each chain call is bounded: 2 s here).
    eventually(
        Duration::from_secs(20),
        "a settlement round failing while the chain is cut",
        || {
            let f = settle_failed();
            if f > failed_before {
                Ok(())
            } else {
                Err(format!("settle failed {f} (was {failed_before})"))
            }
        },
    );
    // Nothing moved: not on chain, not in the books, not in the account.
    let v = on_chain().unwrap();
    assert_eq!((v.deposit, v.settled), (5_000_000, 0));
    assert_eq!(
        tc.balance(tollgate_testchain::PATH_USD, payee),
        payee_before
    );
    assert_eq!(record().state.settled_on_chain, 0);
    let s = state();
    assert_eq!((s.credited, s.available), (2 * usd, usd / 2), "{s:?}");
    balanced(&s);

    // 4. The chain is back: the spent part settles, by itself, within a few rounds: the
    //    largest signed voucher not above what was spent ($1 of the $1.50), never the $2 one.
    let ok_before = settle_ok();
    cut.thaw();
    eventually(
        Duration::from_secs(30),
        "the settlement after the chain came back",
        || {
            let v = on_chain().unwrap();
            if v.settled == 1_000_000 {
                Ok(())
            } else {
                Err(format!("{v:?}"))
            }
        },
    );
    assert!(settle_ok() > ok_before);
    eventually(Duration::from_secs(10), "the settlement recorded", || {
        let r = record();
        if r.state.settled_on_chain == 1_000_000 {
            Ok(())
        } else {
            Err(format!("{:?}", r.state))
        }
    });
    // A few more rounds change nothing: the unspent $0.50 is never taken.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(on_chain().unwrap().settled, 1_000_000);
    assert_eq!(
        tc.balance(tollgate_testchain::PATH_USD, payee),
        payee_before + 1_000_000
    );
    assert_eq!(
        tc.balance(tollgate_testchain::PATH_USD, payer.parse().unwrap()),
        payer_after_open
    );
    let s = state();
    assert_eq!((s.credited, s.available), (2 * usd, usd / 2), "{s:?}");

    // 5. The chain is cut again and the payer closes (its final voucher: $2).
    let unavailable_before = close_unavailable();
    let close_ok_before = close_ok();
    cut.freeze();
    payer_run.proceed();
    // The close is recorded at once (Redis only): closing, at the amount the payer signed, no
    // transaction yet.
    eventually(
        Duration::from_secs(10),
        "the close recorded while the chain is cut",
        || {
            let r = record();
            match &r.close {
                Some(cl) if r.state.closing && !r.state.finalized => {
                    assert_eq!(cl.cumulative, 2_000_000, "{r:?}");
                    assert!(cl.tx_hash.is_none(), "{r:?}");
                    Ok(())
                }
                _ => Err(format!("{:?} {:?}", r.state, r.close)),
            }
        },
    );

    // 6. The client is answered "unavailable, retry" (503) in a bounded time, not a refusal
    //    (402) and not a receipt.
    let answer = payer_run.finish_within(Duration::from_secs(20));
    let Some((status, lines)) = answer else {
        panic!(
            "the close request got no answer in 20 s while the chain was unreachable (it hangs)"
        );
    };
    assert_eq!(status.code(), Some(1), "{lines:?} {}", payer_run.stderr());
    let fatal = lines
        .iter()
        .find_map(|l| l["fatal"].as_str())
        .unwrap_or_default()
        .to_owned();
    assert!(fatal.contains("status 503"), "{lines:?}");
    assert!(lines.iter().all(|l| l["close"] != true), "{lines:?}");
    assert!(close_unavailable() > unavailable_before);
    // While the chain stays away, the server's retries (every round) move nothing.
    std::thread::sleep(Duration::from_secs(3));
    let v = on_chain().expect("still open on chain");
    assert_eq!((v.deposit, v.settled), (5_000_000, 1_000_000));
    assert_eq!(
        tc.balance(tollgate_testchain::PATH_USD, payee),
        payee_before + 1_000_000
    );
    assert_eq!(
        tc.balance(tollgate_testchain::PATH_USD, payer.parse().unwrap()),
        payer_after_open
    );
    let r = record();
    assert!(r.state.closing && !r.state.finalized, "{:?}", r.state);
    let s = state();
    assert_eq!(s.credited, 2 * usd, "{s:?}");
    balanced(&s);

    // 7. The chain is back: the server finishes the close by itself. Capture = $2 signed − the
    //    $0.50 unused credit it withdrew = $1.50 ($1 settled before, $0.50 now); the payer gets
    //    $3.50 of the $5 deposit back.
    cut.thaw();
    eventually(
        Duration::from_secs(30),
        "the close on chain after the chain came back",
        || match on_chain() {
            None => Ok(()),
            Some(v) if v.deposit == 0 => Ok(()),
            Some(v) => Err(format!("{v:?}")),
        },
    );
    assert_eq!(
        tc.balance(tollgate_testchain::PATH_USD, payee),
        payee_before + 1_500_000
    );
    assert_eq!(
        tc.balance(tollgate_testchain::PATH_USD, payer.parse().unwrap()),
        funded - 1_500_000,
        "the unspent deposit went back"
    );
    let r = eventually(
        Duration::from_secs(10),
        "the close recorded as finished",
        || {
            let r = record();
            if r.state.finalized {
                Ok(r)
            } else {
                Err(format!("{:?} {:?}", r.state, r.close))
            }
        },
    );
    let cl = r.close.as_ref().unwrap();
    assert_eq!(
        (cl.cumulative, cl.capture),
        (2_000_000, 1_500_000),
        "{cl:?}"
    );
    assert_eq!(cl.refund_picos, usd / 2, "{cl:?}");
    assert!(
        cl.tx_hash.as_deref().is_some_and(|h| h.len() == 66),
        "{cl:?}"
    );
    assert!(close_ok() > close_ok_before);

    // The account: $2 credited once per voucher, $1.50 spent, the unused $0.50 withdrawn once.
    let s = state();
    assert_eq!(
        (s.credited, s.debited, s.available, s.leased),
        (2 * usd, 2 * usd, 0, 0),
        "{s:?}"
    );
    balanced(&s);
    let ledger: Vec<_> = rt
        .block_on(tollgate_metering::Store::ledger(&store))
        .unwrap()
        .into_iter()
        .filter(|e| e.account == account)
        .collect();
    let mut credits: Vec<(String, i64)> = ledger
        .iter()
        .filter(|e| e.kind == "credit")
        .map(|e| (e.key.clone(), e.amount))
        .collect();
    credits.sort();
    assert_eq!(
        credits,
        vec![
            (format!("credit:mpp:{ch}:1000000"), usd),
            (format!("credit:mpp:{ch}:2000000"), usd),
        ],
        "{ledger:?}"
    );
    let mut charges: Vec<(String, i64)> = ledger
        .iter()
        .filter(|e| e.kind == "charge")
        .map(|e| (e.key.clone(), e.amount))
        .collect();
    charges.sort();
    assert_eq!(
        charges,
        vec![
            (format!("charge:mpp-close:{ch}"), usd / 2),
            ("charge:test-spend".to_owned(), 3 * usd / 2),
        ],
        "{ledger:?}"
    );
    assert!(ledger.iter().all(|e| e.kind != "write_off"), "{ledger:?}");

    // 8. The books against the chain, read directly (not through the cut).
    assert!(terminate(&mut dev).success());
    let audit = bin()
        .stdout(Stdio::piped())
        .args([
            "accounts",
            "audit",
            "--redis",
            &redis.url(),
            "--rpc",
            &chain.url(),
        ])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&audit.stdout);
    assert!(audit.status.success(), "{report}");
    assert!(report.contains("no differences"), "{report}");
    assert!(report.contains(&format!("account {account}:")), "{report}");
    assert!(
        report
            .lines()
            .any(|l| l.starts_with(&format!("channel {ch} ")) && l.contains("Closed")),
        "{report}"
    );
    drop(cut);
}

/// A value of `name` with these labels on `/metrics` of the admin listener.
fn scrape(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = reqwest::blocking::get(format!("http://{admin}/metrics"))
        .unwrap()
        .text()
        .unwrap();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (set, value) = if let Some(r) = rest.strip_prefix('{') {
            let Some((set, value)) = r.split_once('}') else {
                continue;
            };
            (set, value)
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue; // another metric whose name starts with `name`
        };
        let pairs: Vec<&str> = set.split(',').collect();
        if labels
            .iter()
            .all(|(k, v)| pairs.contains(&format!("{k}=\"{v}\"").as_str()))
        {
            return value.trim().parse().unwrap();
        }
    }
    panic!("{name} {labels:?} not on /metrics:\n{text}");
}

/// Polls `probe` every 100 ms until it answers `Ok`, failing after `within` with its last `Err`.
fn eventually<T>(within: Duration, what: &str, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + within;
    loop {
        match probe() {
            Ok(v) => return v,
            Err(last) => assert!(Instant::now() < deadline, "{what}: still {last}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// payments/tests/js/client.mjs running in the background (blocking twin of the crate suite's
/// `MppxRun`, payments/tests/common/mod.rs:340-401): its JSON lines as they come, stdin to let a
/// `wait-close` run go on, killed on drop.
struct Mppx {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<serde_json::Value>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Mppx {
    fn start(js: &std::path::Path, rpc: &str, key: &str, args: &[&str]) -> Mppx {
        use std::io::BufRead;
        let mut child = Command::new("node")
            .arg(js.join("client.mjs"))
            .args(args)
            .env("RPC", rpc)
            .env("KEY", key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = std::sync::mpsc::channel::<serde_json::Value>();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str(&line)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (err, sink) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Mppx {
            child,
            lines,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Lines up to and including the first that satisfies `stop`; fails on a `fatal` line, an
    /// early end, or after `within`.
    fn lines_until(
        &mut self,
        stop: impl Fn(&serde_json::Value) -> bool,
        within: Duration,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("mppx: {e:?} after {out:?}: {}", self.stderr()));
            assert!(v.get("fatal").is_none(), "mppx failed: {v}");
            let done = stop(&v);
            out.push(v);
            if done {
                return out;
            }
        }
    }

    /// Lets a `wait-close` run go on to its close.
    fn proceed(&mut self) {
        use std::io::Write;
        let mut stdin = self.child.stdin.take().expect("stdin");
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Its remaining lines and exit status, if it ends within `within`; `None` if it is still
    /// running then.
    fn finish_within(
        &mut self,
        within: Duration,
    ) -> Option<(std::process::ExitStatus, Vec<serde_json::Value>)> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => out.push(v),
                // Stdout closed: the process is ending.
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let status = wait_exit(&mut self.child, Duration::from_secs(5), "mppx");
                    return Some((status, out));
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return None,
            }
        }
    }
}

impl Drop for Mppx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The book commands an operator runs, on a Redis Cluster: `copy` books every shard's stream
/// (one cursor per shard), `reconcile` is clean, `rebuild` is refused saying why, `disable`
/// undeclares the book on every shard.
#[test]
fn book_commands_copy_and_reconcile_a_redis_cluster() {
    let cluster = tollgate_testkit::RedisCluster::start();
    let pg = tollgate_testkit::PostgresServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt
        .block_on(tollgate_metering::ClusterStore::connect(
            &cluster.urls(),
            "tollgate",
            Duration::from_secs(10),
            32,
        ))
        .unwrap();
    for i in 0..10 {
        rt.block_on(tollgate_metering::Store::credit(
            &store,
            &format!("acct-{i}"),
            &format!("top-up-{i}"),
            1_000,
        ))
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tollgate.toml");
    std::fs::write(
        &config,
        format!(
            "[redis]\ncluster = {:?}\n[book]\npostgres_url = {:?}\n",
            cluster.urls(),
            pg.url()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = bin()
            .args(args)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = run(&["book", "copy"]);
    assert_eq!(code, Some(0), "{err}");
    let copied: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(copied["inserted"], 10, "{out}");
    let cursors = copied["cursor"].as_object().unwrap();
    assert_eq!(cursors.len(), 32, "{out}");
    assert!(cursors.contains_key("{tollgate:m0}"), "{out}");

    let (code, out, err) = run(&["book", "reconcile"]);
    assert_eq!(code, Some(0), "{out}{err}");

    // A rebuild only fills an empty cluster.
    let (code, _, err) = run(&["book", "rebuild"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("already holds money keys"), "{err}");
    // Every master loses its data: the rebuild restores each shard from its stream.
    for port in cluster.masters() {
        redis::cmd("FLUSHALL")
            .query::<()>(&mut cluster.conn(port))
            .unwrap();
    }
    // Refused before anything is written: another shard count than the book's, and one
    // Redis for a cluster's book.
    let other = |toml: String| {
        let path = dir.path().join("other.toml");
        std::fs::write(
            &path,
            format!("[redis]\n{toml}\n[book]\npostgres_url = {:?}\n", pg.url()),
        )
        .unwrap();
        let out = bin()
            .args(["book", "rebuild", "--config"])
            .arg(&path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (code, err) = other(format!("cluster = {:?}\nmoney_shards = 8", cluster.urls()));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("money_shards"), "{err}");
    let one = tollgate_testkit::RedisServer::start();
    let (code, err) = other(format!("url = {:?}", one.url()));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not of one Redis"), "{err}");
    let layout: Option<String> = rt.block_on(async {
        let mut c = tollgate_kv::Target::Cluster {
            seeds: cluster.urls(),
            replica_acks: 1,
        }
        .connect()
        .await
        .unwrap();
        redis::cmd("GET")
            .arg("{tollgate}:shards")
            .query_async(&mut c)
            .await
            .unwrap()
    });
    assert_eq!(layout, None, "a refused rebuild wrote the layout");
    let (code, out, err) = run(&["book", "rebuild"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (&report["accounts"], &report["credits"], &report["shards"]),
        (&10.into(), &10.into(), &32.into()),
        "{out}"
    );
    let fresh = rt
        .block_on(tollgate_metering::ClusterStore::connect(
            &cluster.urls(),
            "tollgate",
            Duration::from_secs(10),
            32,
        ))
        .unwrap();
    let ids: Vec<String> = (0..10).map(|i| format!("acct-{i}")).collect();
    for (i, a) in rt
        .block_on(tollgate_metering::Store::accounts(&fresh, &ids))
        .unwrap()
        .into_iter()
        .enumerate()
    {
        let a = a.unwrap();
        assert_eq!((a.credited, a.available), (1_000, 1_000), "acct-{i}");
    }
    let replay = rt
        .block_on(tollgate_metering::Store::credit(
            &fresh, "acct-3", "top-up-3", 1_000,
        ))
        .unwrap();
    assert!(!replay.applied, "a replayed top-up credited twice");
    let (code, out, err) = run(&["book", "reconcile"]);
    assert_eq!(code, Some(0), "{out}{err}");

    let (code, _, err) = run(&["book", "disable"]);
    assert_eq!(code, Some(0), "{err}");
    let marks: i64 = rt.block_on(async {
        let mut c = tollgate_kv::Target::Cluster {
            seeds: cluster.urls(),
            replica_acks: 1,
        }
        .connect()
        .await
        .unwrap();
        let mut n = 0;
        for s in 0..32 {
            n += redis::cmd("EXISTS")
                .arg(format!("{{tollgate:m{s}}}:ledger:book"))
                .query_async::<i64>(&mut c)
                .await
                .unwrap();
        }
        n
    });
    assert_eq!(marks, 0, "the book is still declared on {marks} shards");
}
