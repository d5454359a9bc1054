//! The binary at the edge, as an operator runs it: HTTPS + HTTP/2 configured through the
//! environment and checked with curl, certificates reloaded on SIGHUP, and the systemd unit's
//! reload (deploy/systemd/tollgate-upgrade) run under load the way systemd runs it, with its
//! sd_notify messages and PID file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tollgate_testkit::{Upstream, free_addr};

mod common;
use common::*;

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pem: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pem = dir.join(format!("{name}.ca.pem"));
        std::fs::write(&pem, issuer.pem()).unwrap();
        Ca { issuer, pem }
    }

    /// Writes `<stem>.pem` and `<stem>.key` for `names`.
    fn issue(&self, names: &[&str], dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        let (c, k) = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// `curl --http2` over HTTPS to `host` at `tls`, trusting `ca`: (HTTP version, body) or the
/// error curl printed.
fn curl_h2(ca: &Path, tls: SocketAddr, host: &str) -> Result<(String, String), String> {
    let out = Command::new("curl")
        .args(["--http2", "-sS", "--max-time", "5", "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("{host}:{}:127.0.0.1", tls.port())])
        .args(["-w", "\n%{http_version}"])
        .arg(format!("https://{host}:{}/", tls.port()))
        .output()
        .expect("curl");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, version) = text.rsplit_once('\n').unwrap();
    Ok((version.to_owned(), body.to_owned()))
}

fn until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

#[test]
fn https_and_http2_from_the_environment_and_certificates_reloaded_on_sighup() {
    let up = Upstream::start("edge");
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "first");
    let (cert, key) = ca.issue(&["*.apps.test"], dir.path(), "wildcard");
    let tls = free_addr();
    let log = dir.path().join("stderr.log");
    let (mut p, _listen) = start_listening(|listen| {
        let mut c = bin();
        c.env("TOLLGATE_PUBLIC_MCP_URL", "https://mcp.apps.test/mcp")
            .env("TOLLGATE_TLS_LISTEN", tls.to_string())
            .env("TOLLGATE_TLS_CERT", &cert)
            .env("TOLLGATE_TLS_KEY", &key)
            .args(["proxy", "--listen", &listen.to_string()])
            .args(["--admin-listen", &free_addr().to_string()])
            .args(["--base-domain", "apps.test"])
            .args(["--route", &format!("svc.apps.test={}", up.addr)])
            .stderr(std::fs::File::create(&log).unwrap());
        c
    });
    assert!(until(Duration::from_secs(5), || curl_h2(
        &ca.pem,
        tls,
        "svc.apps.test"
    )
    .is_ok()));
    assert_eq!(
        curl_h2(&ca.pem, tls, "svc.apps.test").unwrap(),
        ("2".into(), "edge".into())
    );

    // Clients that trust both CAs keep loading it, each request a new TLS connection, through
    // both reloads below: not one may fail.
    let ca2 = Ca::new(dir.path(), "second");
    let both = dir.path().join("both.pem");
    std::fs::write(
        &both,
        [
            std::fs::read(&ca.pem).unwrap(),
            std::fs::read(&ca2.pem).unwrap(),
        ]
        .concat(),
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let loader = {
        let (stop, both) = (stop.clone(), both.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match curl_h2(&both, tls, "svc.apps.test") {
                    Ok(r) if r == ("2".to_owned(), "edge".to_owned()) => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // Renewed from another CA, then SIGHUP: new handshakes get the new certificate.
    let (c2, k2) = ca2.issue(&["*.apps.test"], dir.path(), "renewed");
    std::fs::copy(&c2, &cert).unwrap();
    std::fs::copy(&k2, &key).unwrap();
    signal(&p.0, "-HUP");
    assert!(
        until(Duration::from_secs(5), || curl_h2(
            &ca2.pem,
            tls,
            "svc.apps.test"
        )
        .is_ok()),
        "the renewed certificate is served after SIGHUP"
    );
    let err = curl_h2(&ca.pem, tls, "svc.apps.test").unwrap_err();
    assert!(err.contains("certificate"), "{err}");

    // A broken key and SIGHUP: logged, the process goes on with the certificate it has.
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nbroken\n").unwrap();
    signal(&p.0, "-HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert!(p.0.try_wait().unwrap().is_none(), "SIGHUP must not kill it");
    assert_eq!(
        curl_h2(&ca2.pem, tls, "svc.apps.test").unwrap(),
        ("2".into(), "edge".into())
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = loader.join().unwrap();
    assert!(
        ok >= 10 && failed.is_empty(),
        "{ok} served, failed: {failed:?}"
    );
    // The reason is in the log, naming the file.
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("TLS certificate reload failed"))
        .unwrap_or_else(|| panic!("not logged:\n{text}"));
    assert!(line.contains(&key.display().to_string()), "{line}");
    assert!(terminate(&mut p).success());
}

#[test]
fn a_tls_listener_without_certificates_is_refused_at_start() {
    let out = bin()
        .env("TOLLGATE_PUBLIC_MCP_URL", "https://mcp.apps.test/mcp")
        .env("TOLLGATE_TLS_LISTEN", free_addr().to_string())
        .args(["proxy", "--listen", &free_addr().to_string()])
        .args(["--admin-listen", &free_addr().to_string()])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tls.certificates"), "{err}");
    // A certificate file that does not exist: named, and nothing starts.
    let out = bin()
        .env("TOLLGATE_PUBLIC_MCP_URL", "https://mcp.apps.test/mcp")
        .env("TOLLGATE_TLS_LISTEN", free_addr().to_string())
        .env("TOLLGATE_TLS_CERT", "/nonexistent/cert.pem")
        .env("TOLLGATE_TLS_KEY", "/nonexistent/key.pem")
        .args(["proxy", "--listen", &free_addr().to_string()])
        .args(["--admin-listen", &free_addr().to_string()])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/cert.pem"), "{err}");
}

/// What systemd would receive on NOTIFY_SOCKET.
struct Notifications {
    path: PathBuf,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Notifications {
    fn listen(dir: &Path) -> Notifications {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                s.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        });
        Notifications { path, seen }
    }

    fn all(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    fn wait_for(&self, what: &str) -> bool {
        until(Duration::from_secs(10), || {
            self.all().iter().any(|m| m.contains(what))
        })
    }
}

struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

fn upgrade_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/tollgate-upgrade")
}

/// `systemctl reload tollgate-proxy`, as the unit does it: ExecReload runs tollgate-upgrade with
/// $MAINPID and ExecStart's command line; load runs over plain HTTP and HTTPS/2 throughout.
#[test]
fn the_units_reload_upgrades_under_load_with_zero_failed_requests() {
    let up = Upstream::start("svc");
    let dir = tempfile::tempdir().unwrap();
    let notify = Notifications::listen(dir.path());
    let ca = Ca::new(dir.path(), "unit");
    let (cert, key) = ca.issue(&["*.apps.test"], dir.path(), "wildcard");
    let (listen, tls, admin) = (free_addr(), free_addr(), free_addr());
    let pid_file = dir.path().join("proxy.pid");
    // ExecStart's command line and the unit's environment.
    let args: Vec<String> = vec![
        "proxy".into(),
        "--listen".into(),
        listen.to_string(),
        "--admin-listen".into(),
        admin.to_string(),
        "--base-domain".into(),
        "apps.test".into(),
        "--route".into(),
        format!("svc.apps.test={}", up.addr),
        "--pid-file".into(),
        pid_file.display().to_string(),
    ];
    let data = dir.path().join("data");
    let unit_env = |c: &mut Command| {
        // A single node without Redis: nothing metered here (the embedded store is one
        // process's at a time; fleets meter through Redis, tests/cli.rs upgrades one).
        c.env("TOLLGATE_METERING_ENABLED", "false")
            .env("TOLLGATE_DATA_DIR", &data)
            .env("NOTIFY_SOCKET", &notify.path)
            .env("TOLLGATE_UPGRADE_SOCK", dir.path().join("upgrade.sock"))
            .env("TOLLGATE_PUBLIC_MCP_URL", "https://mcp.apps.test/mcp")
            .env("TOLLGATE_TLS_LISTEN", tls.to_string())
            .env("TOLLGATE_TLS_CERT", &cert)
            .env("TOLLGATE_TLS_KEY", &key);
    };
    let mut start = bin();
    unit_env(&mut start);
    let mut old = Proc(start.args(&args).spawn().unwrap());
    assert!(notify.wait_for("READY=1"), "{:?}", notify.all());
    let old_pid = old.0.id();
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        old_pid.to_string()
    );

    // Load: plain HTTP/1.1 and HTTPS/2 (curl can't be a tight loop; reqwest on h1 is, plus a
    // curl h2 loop).
    let stop = Arc::new(AtomicBool::new(false));
    let plain = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let c = reqwest::blocking::Client::builder()
                .resolve("svc.apps.test", listen)
                .build()
                .unwrap();
            let url = format!("http://svc.apps.test:{}/", listen.port());
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match c.get(&url).send() {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(r) => failed.push(r.status().to_string()),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        })
    };
    let h2 = {
        let (stop, ca) = (stop.clone(), ca.pem.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match curl_h2(&ca, tls, "svc.apps.test") {
                    Ok((v, body)) if v == "2" && body == "svc" => ok += 1,
                    Ok(other) => failed.push(format!("{other:?}")),
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        })
    };
    std::thread::sleep(Duration::from_millis(300));

    // ExecReload=/usr/lib/tollgate/tollgate-upgrade $MAINPID /usr/bin/tollgate proxy ...
    // The new process inherits the script's output: files, not pipes (a pipe would stay open
    // as long as the new process runs).
    let log = dir.path().join("reload.log");
    let mut reload = Command::new(upgrade_script());
    unit_env(&mut reload);
    reload
        .arg(old_pid.to_string())
        .arg(env!("CARGO_BIN_EXE_tollgate"))
        .args(&args)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.path().join("reload.err")).unwrap());
    let status = reload.status().unwrap();
    assert!(
        status.success(),
        "reload failed: {}{}",
        std::fs::read_to_string(&log).unwrap_or_default(),
        std::fs::read_to_string(dir.path().join("reload.err")).unwrap_or_default()
    );
    let new_pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_ne!(new_pid, old_pid);
    // Not our child: killed if the test fails before it stops it.
    let _new = KillOnDrop(new_pid);
    let status = wait_exit(&mut old.0, Duration::from_secs(20), "the old process");
    assert_eq!(status.code(), Some(0));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (ok_plain, failed_plain) = plain.join().unwrap();
    let (ok_h2, failed_h2) = h2.join().unwrap();

    // What systemd was told: the old one reloading (never STOPPING), the new one taking over.
    let msgs = notify.all();
    assert!(
        failed_plain.is_empty() && failed_h2.is_empty(),
        "requests failed during the reload: plain {failed_plain:?}, h2 {failed_h2:?}"
    );
    assert!(
        ok_plain > 100 && ok_h2 > 5,
        "too little load: {ok_plain} / {ok_h2}"
    );
    assert!(msgs.iter().any(|m| m.contains("RELOADING=1")), "{msgs:?}");
    assert!(
        msgs.iter()
            .any(|m| m.contains(&format!("MAINPID={new_pid}")) && m.contains("READY=1")),
        "{msgs:?}"
    );
    assert!(!msgs.iter().any(|m| m.contains("STOPPING=1")), "{msgs:?}");
    // The admin port is the new process's now (SO_REUSEPORT during the overlap).
    let c = reqwest::blocking::Client::new();
    let r = c.get(format!("http://{admin}/readyz")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        curl_h2(&ca.pem, tls, "svc.apps.test").unwrap(),
        ("2".into(), "svc".into())
    );

    // `systemctl stop`: SIGTERM, STOPPING=1, and the PID file goes.
    let _ = Command::new("kill")
        .args(["-TERM", &new_pid.to_string()])
        .status();
    assert!(notify.wait_for("STOPPING=1"), "{:?}", notify.all());
    assert!(
        until(Duration::from_secs(15), || !pid_file.exists()),
        "the PID file is removed at exit"
    );
}

/// A new binary that cannot start (here: a bad flag) leaves the running one serving: the old
/// process is sent nothing, and the reload reports the failure.
#[test]
fn a_reload_whose_new_process_fails_leaves_the_old_one_serving() {
    let up = Upstream::start("keep");
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("proxy.pid");
    let sock = dir.path().join("upgrade.sock");
    let (mut old, listen) = start_listening(|listen| {
        let mut c = bin();
        c.env("TOLLGATE_PUBLIC_MCP_URL", "https://mcp.apps.test/mcp")
            .env("TOLLGATE_UPGRADE_SOCK", &sock)
            .args(["proxy", "--listen", &listen.to_string()])
            .args(["--admin-listen", &free_addr().to_string()])
            .args(["--route", &format!("k.localhost={}", up.addr)])
            .arg("--pid-file")
            .arg(&pid_file);
        c
    });
    let out = Command::new(upgrade_script())
        .env("TOLLGATE_UPGRADE_SOCK", &sock)
        .arg(old.0.id().to_string())
        .arg(env!("CARGO_BIN_EXE_tollgate"))
        .args(["proxy", "--listen", &listen.to_string(), "--threads", "0"])
        .arg("--pid-file")
        .arg(&pid_file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("keeps serving"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        old.0.try_wait().unwrap().is_none(),
        "the old process still runs"
    );
    let c = reqwest::blocking::Client::builder()
        .resolve("k.localhost", listen)
        .build()
        .unwrap();
    assert_eq!(
        get(&c, &format!("http://k.localhost:{}/", listen.port())),
        (200, "keep".into())
    );
    assert!(terminate(&mut old).success());
}

/// The operator's whole path at a public name: `[public] base_domain` and `[tls]`, an agent
/// deploys with the official MCP SDK client, gets `https://{slug}.<domain>` back, and that URL
/// answers over HTTP/2 (curl, trusting the operator's CA).
#[test]
fn an_agent_deploys_over_mcp_and_its_https_url_answers_over_http2() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "operator");
    let (cert, key) = ca.issue(&["*.apps.test"], dir.path(), "wildcard");
    let tls = free_addr();
    let cfg = dir.path().join("tollgate.toml");
    std::fs::write(&cfg, "[public]\nbase_domain = \"apps.test\"\n").unwrap();
    let control = free_addr();
    let (mut dev, _proxy) = start_listening(|proxy| {
        let mut c = bin();
        c.env("TOLLGATE_TLS_LISTEN", tls.to_string())
            .env("TOLLGATE_TLS_CERT", &cert)
            .env("TOLLGATE_TLS_KEY", &key)
            .args(["dev", "--config"])
            .arg(&cfg)
            .args(["--dev-account", "acct-edge", "--dev-credit-usd", "0.50"])
            .args(["--chain-listen", &free_addr().to_string()]);
        listen_on(&mut c, proxy, control);
        c
    });
    wait_for_control(control, &mut dev);
    let deployed = deploy_hello(control);
    assert_eq!(deployed["status"], "live", "{deployed}");
    assert_eq!(
        deployed["url"], "https://hello-agent.apps.test",
        "{deployed}"
    );
    // DNS would send hello-agent.apps.test:443 to the proxy; curl's --connect-to does here.
    let fetch = || {
        let out = Command::new("curl")
            .args(["--http2", "-sS", "--max-time", "5", "--cacert"])
            .arg(&ca.pem)
            .args([
                "--connect-to",
                &format!("hello-agent.apps.test:443:127.0.0.1:{}", tls.port()),
            ])
            .args(["-w", "\n%{http_version}", "https://hello-agent.apps.test/"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        until(Duration::from_secs(5), || fetch()
            == "hello from an agent\n2"),
        "{}",
        fetch()
    );
    assert!(terminate(&mut dev).success());
}

/// The access log and every other log of a proxy at `debug`: requests carrying credentials
/// (Authorization, an MPP Payment credential, a cookie, a token in the query) are logged by
/// what happened, and none of those values appears anywhere.
#[test]
fn access_log_lines_and_no_secret_in_any_log() {
    let up = Upstream::start("logged");
    let dir = tempfile::tempdir().unwrap();
    let access = dir.path().join("access.log");
    let stderr = dir.path().join("stderr.log");
    let (mut p, listen) = start_listening(|listen| {
        let mut c = bin();
        c.env("TOLLGATE_PUBLIC_MCP_URL", "https://mcp.apps.test/mcp")
            .env("TOLLGATE_ACCESS_LOG", "on")
            .env("TOLLGATE_LOG", "debug")
            .args(["proxy", "--listen", &listen.to_string()])
            .args(["--admin-listen", &free_addr().to_string()])
            .args(["--route", &format!("svc.localhost={}", up.addr)])
            .stdout(std::fs::File::create(&access).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap());
        c
    });
    let c = reqwest::blocking::Client::builder()
        .resolve("svc.localhost", listen)
        .resolve("nope.localhost", listen)
        .build()
        .unwrap();
    let secrets = [
        "Bearer sekr1t-bearer-token",
        "Payment eyJzZWtyMXQtcGF5bWVudCI6dHJ1ZX0",
        "session=sekr1t-cookie",
        "sekr1t-query-token",
    ];
    for host in ["svc.localhost", "nope.localhost"] {
        let r = c
            .post(format!(
                "http://{host}:{}/path/x?token={}",
                listen.port(),
                secrets[3]
            ))
            .header("authorization", secrets[0])
            .header("payment-authorization", secrets[1])
            .header("cookie", secrets[2])
            .body("body")
            .send()
            .unwrap();
        assert!(r.status() == 200 || r.status() == 404);
    }
    assert!(terminate(&mut p).success());
    let access_text = std::fs::read_to_string(&access).unwrap();
    let lines: Vec<serde_json::Value> = access_text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{access_text}");
    assert_eq!(lines[0]["host"], "svc.localhost");
    assert_eq!(lines[0]["method"], "POST");
    assert_eq!(lines[0]["path"], "/path/x");
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(lines[0]["decision"], "free");
    assert!(lines[0]["upstream_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(lines[1]["status"], 404);
    assert_eq!(lines[1]["decision"], "refused");
    let all = format!("{access_text}{}", std::fs::read_to_string(&stderr).unwrap());
    for s in secrets {
        let needle = s.split_whitespace().last().unwrap();
        assert!(!all.contains(needle), "{needle} reached a log:\n{all}");
    }
}

/// A successor that takes the listeners and then dies: the old process, once drained, finds
/// nobody serving its address and exits 1, so that systemd (Restart=on-failure) starts the node
/// again instead of recording a clean stop.
#[test]
fn an_old_process_whose_successor_died_exits_1() {
    let up = Upstream::start("gone");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("upgrade.sock");
    let pid_file = dir.path().join("proxy.pid");
    let admin = free_addr();
    let env = |c: &mut Command| {
        c.env("TOLLGATE_PUBLIC_MCP_URL", "https://mcp.apps.test/mcp")
            .env("TOLLGATE_METERING_ENABLED", "false")
            .env("TOLLGATE_UPGRADE_SOCK", &sock);
    };
    let (mut old, listen) = start_listening(|listen| {
        let mut c = bin();
        env(&mut c);
        c.args(["proxy", "--listen", &listen.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--route", &format!("g.localhost={}", up.addr)])
            .arg("--pid-file")
            .arg(&pid_file);
        c
    });
    let mut reload = Command::new(upgrade_script());
    env(&mut reload);
    let status = reload
        .arg(old.0.id().to_string())
        .arg(env!("CARGO_BIN_EXE_tollgate"))
        .args(["proxy", "--listen", &listen.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .args(["--route", &format!("g.localhost={}", up.addr)])
        .arg("--pid-file")
        .arg(&pid_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let new_pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_owned();
    // The successor dies at once, holding the only listening socket.
    let _ = Command::new("kill").args(["-KILL", &new_pid]).status();
    let status = wait_exit(&mut old.0, Duration::from_secs(20), "the old process");
    assert_eq!(status.code(), Some(1), "nobody serves: not a clean stop");
}

/// One `curl --http2` exchange: status, HTTP version, the response header block, the body.
struct Curled {
    status: u16,
    version: String,
    headers: String,
    body: String,
}

fn curl_h2_get(ca: &Path, tls: SocketAddr, host: &str, accept: &str) -> Curled {
    let out = Command::new("curl")
        .args(["--http2", "-sS", "--max-time", "5", "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("{host}:{}:127.0.0.1", tls.port())])
        .args(["-H", &format!("accept: {accept}"), "-D", "-"])
        .args(["-w", "\n%{http_code} %{http_version}"])
        .arg(format!("https://{host}:{}/", tls.port()))
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (rest, tail) = text.rsplit_once('\n').unwrap();
    let (status, version) = tail.split_once(' ').unwrap();
    let (headers, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    Curled {
        status: status.parse().unwrap(),
        version: version.to_owned(),
        headers: headers.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

/// The platform at its public names, as `curl --http2` and an MCP client see it: a metered
/// service whose owner has no credit answers 402 over HTTP/2 with the MPP `Payment` challenge
/// of the platform's realm (the public MCP host, not a listen address), browsers get the
/// suspension page, a credit resumes it on the next request; MCP answers its public host and
/// the configured browser origin, and refuses any other host or origin.
#[test]
fn the_money_gate_over_http2_and_mcp_at_its_public_names() {
    let redis = tollgate_testkit::RedisServer::start();
    let up = Upstream::start("paid over h2");
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "operator");
    let (cert, key) = ca.issue(&["*.apps.test"], dir.path(), "wildcard");
    let tls = free_addr();
    let control = free_addr();
    let (mut dev, _proxy) = start_listening(|proxy| {
        let mut c = bin();
        c.env("TOLLGATE_TLS_LISTEN", tls.to_string())
            .env("TOLLGATE_TLS_CERT", &cert)
            .env("TOLLGATE_TLS_KEY", &key)
            .env(
                "TOLLGATE_PUBLIC_ALLOWED_ORIGINS",
                "https://console.apps.test:443",
            )
            .args(["dev", "--redis", &redis.url()])
            .args(["--public-mcp-url", "https://mcp.apps.test/mcp"])
            .args(["--public-base-domain", "apps.test"])
            .args(["--chain-listen", &free_addr().to_string()]);
        listen_on(&mut c, proxy, control);
        c
    });
    wait_for_control(control, &mut dev);
    put_metered_route(&redis.url(), "paid", up.addr, "acct-h2");
    let host = "paid.apps.test";
    assert!(
        until(Duration::from_secs(5), || curl_h2_get(
            &ca.pem,
            tls,
            host,
            "application/json"
        )
        .status
            == 402),
        "the route never reached the proxy"
    );
    let api = curl_h2_get(&ca.pem, tls, host, "application/json");
    assert_eq!((api.status, api.version.as_str()), (402, "2"));
    let challenge = api
        .headers
        .lines()
        .find(|l| l.starts_with("www-authenticate:"))
        .unwrap_or_else(|| panic!("no challenge: {}", api.headers));
    assert!(challenge.contains("payment "), "{challenge}");
    // The services' realm under the platform's public host (a credential for a service's
    // top-up is not one for MCP).
    assert!(
        challenge.contains(r#"realm="mcp.apps.test/services""#),
        "{challenge}"
    );
    assert!(
        api.body.contains("urn:tollgate:problem:service-suspended"),
        "{}",
        api.body
    );
    let page = curl_h2_get(&ca.pem, tls, host, "text/html");
    assert_eq!((page.status, page.version.as_str()), (402, "2"));
    assert!(
        page.body.contains("This service is paused"),
        "{}",
        page.body
    );
    assert!(
        credit_account(&redis.url(), "acct-h2", "1", "h2-deposit")
            .status
            .success()
    );
    assert!(until(Duration::from_secs(5), || curl_h2_get(
        &ca.pem,
        tls,
        host,
        "application/json"
    )
    .status
        == 200));
    let ok = curl_h2_get(&ca.pem, tls, host, "text/html");
    assert_eq!(
        (ok.status, ok.version.as_str(), ok.body.as_str()),
        (200, "2", "paid over h2")
    );

    // MCP at its public name (a load balancer in front forwards it to control.listen).
    let c = reqwest::blocking::Client::new();
    let init = serde_json::json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "edge-test", "version": "1"}}
    });
    let mcp = |host: &str, origin: Option<&str>| -> u16 {
        let mut r = c
            .post(format!("http://{control}/mcp"))
            .header("host", host)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .json(&init);
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.send().unwrap().status().as_u16()
    };
    assert_eq!(mcp("mcp.apps.test", None), 200);
    assert_eq!(mcp("mcp.apps.test", Some("https://console.apps.test")), 200);
    assert_eq!(mcp("mcp.apps.test", Some("https://evil.example")), 403);
    assert_eq!(mcp("evil.example", None), 403);
    // A top-up's challenge names the public realm too.
    let r = c
        .post(format!("http://{control}/v1/top-up?amount_usd=1"))
        .header("host", "mcp.apps.test")
        .send()
        .unwrap();
    assert_eq!(r.status(), 402);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(
        challenge.contains(r#"realm="mcp.apps.test""#),
        "{challenge}"
    );
    assert!(terminate(&mut dev).success());
}
