//! Configuration as an operator meets it: precedence, and `check-config` errors that point at
//! the line.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;

use clap::Parser;
use tollgate::cli::{Cli, Command as Sub, proxy_config};

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let m: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| m.get(k).cloned()
}

fn proxy_args(args: &[&str]) -> tollgate::cli::ProxyArgs {
    let mut argv = vec!["tollgate", "proxy"];
    argv.extend_from_slice(args);
    match Cli::parse_from(argv).command {
        Sub::Proxy(a) => a,
        other => panic!("parsed as {other:?}"),
    }
}

const FILE: &str = r#"
[proxy]
listen = "127.0.0.1:1001"
threads = 2
base_domain = "Apps.Example.com"

[admin]
listen = "127.0.0.1:2001"

[[route]]
host = "static.example.com"
upstreams = ["127.0.0.1:3000"]
"#;

#[test]
fn file_then_env_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(&dir, "t.toml", FILE);
    let fs = f.to_str().unwrap();
    let a: SocketAddr = "127.0.0.1:1001".parse().unwrap();
    let b: SocketAddr = "127.0.0.1:1002".parse().unwrap();
    let c: SocketAddr = "127.0.0.1:1003".parse().unwrap();

    // File alone.
    let cfg = proxy_config(&proxy_args(&["--config", fs]), &env_of(&[])).unwrap();
    assert_eq!(cfg.proxy.listen, a);
    assert_eq!(cfg.proxy.threads, 2);
    assert_eq!(cfg.proxy.base_domain, "apps.example.com");
    assert_eq!(cfg.routes.len(), 1);
    assert!(cfg.redis.is_none());

    // Environment beats the file.
    let env = env_of(&[
        ("TOLLGATE_PROXY_LISTEN", "127.0.0.1:1002"),
        ("TOLLGATE_PROXY_THREADS", "3"),
        ("TOLLGATE_REDIS_URL", "redis://127.0.0.1:7777/"),
    ]);
    let cfg = proxy_config(&proxy_args(&["--config", fs]), &env).unwrap();
    assert_eq!(cfg.proxy.listen, b);
    assert_eq!(cfg.proxy.threads, 3);
    assert_eq!(cfg.redis.as_ref().unwrap().url, "redis://127.0.0.1:7777/");
    assert_eq!(cfg.admin.listen, "127.0.0.1:2001".parse().unwrap());

    // Flags beat both; --route adds to the file's routes.
    let cfg = proxy_config(
        &proxy_args(&[
            "--config",
            fs,
            "--listen",
            "127.0.0.1:1003",
            "--threads",
            "4",
            "--redis",
            "redis://127.0.0.1:8888/",
            "--route",
            "x.localhost=127.0.0.1:9000,127.0.0.1:9001",
        ]),
        &env,
    )
    .unwrap();
    assert_eq!(cfg.proxy.listen, c);
    assert_eq!(cfg.proxy.threads, 4);
    assert_eq!(cfg.redis.as_ref().unwrap().url, "redis://127.0.0.1:8888/");
    assert_eq!(cfg.routes.len(), 2);
    assert_eq!(cfg.routes[1].upstreams.len(), 2);
}

#[test]
fn bad_environment_values_name_the_variable() {
    let e = proxy_config(
        &proxy_args(&[]),
        &env_of(&[("TOLLGATE_PROXY_THREADS", "zero")]),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("TOLLGATE_PROXY_THREADS"), "{e}");
    let e = proxy_config(
        &proxy_args(&[]),
        &env_of(&[("TOLLGATE_REDIS_URL", "http://x")]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("TOLLGATE_REDIS_URL") && e.contains("redis://"),
        "{e}"
    );
    for (var, value, words) in [
        ("TOLLGATE_CONTROL_RUNTIME", "cloud", "local or hosts"),
        ("TOLLGATE_HOST_ID", "has space", "host.id"),
        (
            "TOLLGATE_HOST_ADMIN_LISTEN",
            "nope",
            "TOLLGATE_HOST_ADMIN_LISTEN",
        ),
    ] {
        let e = proxy_config(&proxy_args(&[]), &env_of(&[(var, value)]))
            .unwrap_err()
            .to_string();
        assert!(e.contains(var) && e.contains(words), "{var}: {e}");
    }
}

#[test]
fn bad_flags_are_refused_by_the_parser() {
    for bad in [
        vec!["tollgate", "proxy", "--threads", "0"],
        vec!["tollgate", "proxy", "--listen", "nope"],
        vec!["tollgate", "proxy", "--route", "no-equals-sign"],
        vec!["tollgate", "proxy", "--route", "bad_host=127.0.0.1:1"],
        vec!["tollgate", "proxy", "--route", "a.localhost=localhost:1"],
    ] {
        assert!(Cli::try_parse_from(&bad).is_err(), "{bad:?} was accepted");
    }
}

fn check_config(text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let f = write(&dir, "c.toml", text);
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("check-config")
        .arg(&f)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_accepts_a_good_file() {
    let (code, out, _) = check_config(FILE);
    assert_eq!(code, 0);
    assert!(out.contains("ok"), "{out}");
    // The shipped example must stay valid.
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "check-config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/tollgate.example.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_config_points_at_the_first_error() {
    let cases = [
        // (file, expected line, words in the reason)
        (
            "[proxy]\nlisten = \"127.0.0.1:1\"\nlisten_port = 3\n",
            3,
            "unknown field",
        ),
        ("[proxy]\nthreads = 0\n", 2, "threads"),
        ("[proxy]\nbase_domain = \"bad_domain\"\n", 2, "host name"),
        (
            "[proxy]\nupstream_read_timeout_seconds = -1\n",
            2,
            "seconds",
        ),
        ("[admin]\nlisten = \"localhost\"\n", 2, "address"),
        (
            "\n\n[[route]]\nhost = \"a.localhost\"\nupstreams = []\n",
            5,
            "at least one",
        ),
        ("[redis]\nurl = \"http://nope\"\n", 2, "redis://"),
        (
            "[redis]\ncluster = [\"redis://10.0.0.1:7000/\", \"unix:///tmp/r.sock\"]\n",
            2,
            "over TCP",
        ),
        (
            "[redis]\ncluster = [\"redis://a:1/\"]\nmoney_shards = 0\n",
            3,
            "1..=1024",
        ),
        (
            "[redis]\nurl = \"redis://a:1/\"\ncluster = [\"redis://b:1/\"]\n",
            1,
            "not both",
        ),
        ("[redis]\nkey_prefix = \"t\"\n", 1, "`cluster`"),
        (
            "[redis]\ncluster = [\"redis://a:1/\"]\nkey_prefix = \"{t}\"\n",
            1,
            "braces",
        ),
        ("[log]\nformat = \"xml\"\n", 2, "unknown variant"),
        ("[control]\nruntime = \"cloud\"\n", 2, "unknown variant"),
        ("[host]\nprocesses = -1\n", 2, "expected u32"),
        ("[proxy\n", 1, ""),
    ];
    for (text, line, words) in cases {
        let (code, _, err) = check_config(text);
        assert_eq!(code, 1, "accepted: {text}");
        let expect = format!("c.toml:{line}:");
        assert!(
            err.contains(&expect),
            "for {text:?} expected {expect} in: {err}"
        );
        assert!(
            err.contains(words),
            "for {text:?} expected '{words}' in: {err}"
        );
    }
    let (code, _, err) = {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["check-config", "/nonexistent/x.toml"])
            .output()
            .unwrap();
        (
            out.status.code().unwrap(),
            (),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(code, 1);
    assert!(err.contains("cannot read"), "{err}");
}

#[test]
fn prices_and_metering_are_configurable_and_bad_prices_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(
        &dir,
        "good.toml",
        "[prices]\nrequests_per_million_usd = \"1.00\"\n[metering]\nlease_wait_ms = 50\n",
    );
    let cfg = proxy_config(
        &proxy_args(&["--config", good.to_str().unwrap()]),
        &env_of(&[]),
    )
    .unwrap();
    assert_eq!(cfg.prices.prices().unwrap().per_request, 1_000_000);
    assert_eq!(cfg.metering.lease_wait_ms, 50);
    let cfg = proxy_config(
        &proxy_args(&["--config", good.to_str().unwrap()]),
        &env_of(&[
            ("TOLLGATE_METERING_ENABLED", "false"),
            ("TOLLGATE_NODE_ID", "edge-1"),
        ]),
    )
    .unwrap();
    assert!(!cfg.metering.enabled);
    assert_eq!(cfg.metering.node_id.as_deref(), Some("edge-1"));

    let bad = write(
        &dir,
        "bad.toml",
        "[prices]\ncpu_ms_per_million_usd = \"0.0000000000001\"\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check-config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[prices]"), "{err}");
}

#[test]
fn the_payment_realm_is_the_public_mcp_host_never_an_ip() {
    use tollgate::config::Config;
    // Loopback development: localhost and the control port.
    let cfg = Config::default();
    assert_eq!(cfg.payment_realm().unwrap(), "localhost:8790");
    // Public: the host (and port) of public.mcp_url, lowercased.
    let cfg = Config::parse(
        "[public]\nmcp_url = \"https://MCP.Example.com/mcp\"\n[control]\nlisten = \"0.0.0.0:8790\"\n",
        "t.toml",
    )
    .unwrap();
    assert_eq!(cfg.payment_realm().unwrap(), "mcp.example.com");
    assert_eq!(cfg.public_mcp_url().unwrap(), "https://MCP.Example.com/mcp");
    // A public listener with no public name: refused, naming the key to set.
    let cfg = Config::parse("[control]\nlisten = \"0.0.0.0:8790\"\n", "t.toml").unwrap();
    let e = cfg.payment_realm().unwrap_err();
    assert!(e.contains("public.mcp_url"), "{e}");
    // Not a URL: refused where it is read.
    let e = Config::load(
        None,
        &env_of(&[("TOLLGATE_PUBLIC_MCP_URL", "mcp.example.com")]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("TOLLGATE_PUBLIC_MCP_URL"), "{e}");
    // The payments layer refuses a bare IP realm whatever set it.
    for ip in ["127.0.0.1", "10.0.0.7:8790", "[::1]:8790", "::1"] {
        let mut pc = tollgate_payments::PaymentsConfig::new(
            "http://127.0.0.1:8545",
            42431,
            tollgate_payments::config::Secret::new("s".repeat(40)),
            tollgate_payments::config::Secret::new("k".repeat(64)),
        );
        pc.realm = ip.into();
        let e = pc.validate().unwrap_err();
        assert!(e.contains("IP address"), "{ip}: {e}");
    }
}

#[test]
fn a_runtime_host_config_out_of_range_is_refused_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    for (text, words) in [
        ("[host]\nlease_ms = 10\n", "host.lease_ms = 10"),
        ("[host]\nprocesses = 0\n", "host.processes = 0"),
        (
            "[host]\nhandover_seconds = 7200\n",
            "host.handover_seconds = 7200",
        ),
        ("[host]\nid = \"a b\"\n", "host.id"),
    ] {
        let f = write(&dir, "host.toml", text);
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("check-config")
            .arg(&f)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "accepted: {text}");
        assert!(err.contains(words), "for {text:?}: {err}");
    }
}

#[test]
fn a_redis_cluster_is_configured_by_file_or_environment_and_carries_the_book() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        &dir,
        "c.toml",
        "[redis]\ncluster = [\"redis://10.0.0.1:7000/\", \"redis://10.0.0.2:7000/\"]\nreplica_acks = 2\nmoney_shards = 64\n",
    );
    let cfg = proxy_config(
        &proxy_args(&["--config", f.to_str().unwrap()]),
        &env_of(&[]),
    )
    .unwrap();
    let r = cfg.redis.as_ref().unwrap();
    assert_eq!(r.cluster.len(), 2);
    assert!(r.url.is_empty());
    assert_eq!((r.replica_acks, r.money_shards), (2, 64));
    assert!(r.target().is_cluster());

    // The environment: members comma-separated; a URL there replaces a file's cluster.
    let cfg = proxy_config(
        &proxy_args(&[]),
        &env_of(&[(
            "TOLLGATE_REDIS_CLUSTER",
            "redis://10.0.0.1:7000/, redis://10.0.0.2:7000/",
        )]),
    )
    .unwrap();
    let r = cfg.redis.as_ref().unwrap();
    assert_eq!(
        r.cluster,
        ["redis://10.0.0.1:7000/", "redis://10.0.0.2:7000/"]
    );
    assert_eq!((r.replica_acks, r.money_shards), (1, 32));
    let cfg = proxy_config(
        &proxy_args(&["--config", f.to_str().unwrap()]),
        &env_of(&[("TOLLGATE_REDIS_URL", "redis://127.0.0.1:9/")]),
    )
    .unwrap();
    let r = cfg.redis.as_ref().unwrap();
    assert!(r.cluster.is_empty() && r.url == "redis://127.0.0.1:9/");
    let e = proxy_config(
        &proxy_args(&[]),
        &env_of(&[
            ("TOLLGATE_REDIS_URL", "redis://127.0.0.1:9/"),
            ("TOLLGATE_REDIS_CLUSTER", "redis://10.0.0.1:7000/"),
        ]),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not both"), "{e}");

    // The book of record copies a cluster's ledgers (one stream per money shard).
    let (code, _, err) = check_config(
        "[redis]\ncluster = [\"redis://10.0.0.1:7000/\"]\n[book]\npostgres_url = \"postgres://x@127.0.0.1/db\"\n",
    );
    assert_eq!(code, 0, "{err}");
}
