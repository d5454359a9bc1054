//! Helpers of the binary-level suites: start `tollgate` processes, wait for them, operator
//! commands.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tollgate_testkit::free_addr;

pub mod hosts;

pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    c.stdout(Stdio::null()).stderr(Stdio::null());
    // Journals and the embedded money store go to a fresh folder, not the checkout.
    let data = tempfile::Builder::new()
        .prefix("tollgate-cli-test-")
        .tempdir()
        .unwrap()
        .keep();
    c.env("TOLLGATE_DATA_DIR", data);
    c
}

/// Starts a server process whose addresses come from `make(listen)`, retrying with fresh ports
/// when one was taken between picking and binding (the process then exits at once).
pub fn start_listening(make: impl Fn(SocketAddr) -> Command) -> (Proc, SocketAddr) {
    for _ in 0..5 {
        let listen = free_addr();
        let mut p = Proc(make(listen).spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect(listen).is_ok() {
                return (p, listen);
            }
            if p.0.try_wait().unwrap().is_some() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("the server never listened");
}

/// Waits until the control service at `control` answers `/healthz`, failing if `p` exits first.
pub fn wait_for_control(control: SocketAddr, p: &mut Proc) {
    let c = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(c.get(format!("http://{control}/healthz")).send(), Ok(r) if r.status() == 200) {
        assert!(
            p.0.try_wait().unwrap().is_none(),
            "the process exited early"
        );
        assert!(Instant::now() < deadline, "control never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn get(client: &reqwest::blocking::Client, url: &str) -> (u16, String) {
    let r = client.get(url).send().unwrap();
    (r.status().as_u16(), r.text().unwrap())
}

/// Test money from the test chain's faucet (`tempo_fundAddress`).
pub fn fund(c: &reqwest::blocking::Client, rpc: &str, address: &str) {
    let r: serde_json::Value = c
        .post(rpc)
        .json(&serde_json::json!({"jsonrpc":"2.0","id":1,"method":"tempo_fundAddress","params":[address]}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(r["result"].is_array(), "{r}");
}

pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// `tollgate routes put`: `slug` served from `upstream`, owned (and paid for) by `account`.
pub fn put_metered_route(redis: &str, slug: &str, upstream: SocketAddr, account: &str) {
    let out = bin()
        .args(["routes", "put", "--redis", redis, "--slug", slug])
        .args(["--upstream", &upstream.to_string(), "--account-id", account])
        .output()
        .unwrap();
    assert!(out.status.success());
}

/// `tollgate accounts credit` (idempotent by `key`); its output, JSON on stdout.
pub fn credit_account(
    redis: &(impl RedisAt + ?Sized),
    account: &str,
    usd: &str,
    key: &str,
) -> std::process::Output {
    let mut c = bin();
    c.stdout(Stdio::piped()).args(["accounts", "credit"]);
    redis.name(&mut c);
    c.args(["--account", account, "--usd", usd, "--key", key])
        .output()
        .unwrap()
}

/// How a command is told which Redis: `--redis URL`, or the environment of a [`TestRedis`]
/// (`TOLLGATE_REDIS_CLUSTER` for a cluster).
pub trait RedisAt {
    fn name(&self, c: &mut Command);
    /// The `[redis]` line of a config file.
    fn toml(&self) -> String;
}
impl RedisAt for str {
    fn name(&self, c: &mut Command) {
        c.args(["--redis", self]);
    }
    fn toml(&self) -> String {
        format!("url = {self:?}")
    }
}
impl RedisAt for String {
    fn name(&self, c: &mut Command) {
        self.as_str().name(c)
    }
    fn toml(&self) -> String {
        self.as_str().toml()
    }
}
/// A [`TestRedis`]'s name, owned (for threads).
#[derive(Clone)]
pub struct RedisName {
    env: (&'static str, String),
    toml: String,
}
impl From<&tollgate_testkit::TestRedis> for RedisName {
    fn from(r: &tollgate_testkit::TestRedis) -> Self {
        RedisName {
            env: r.env(),
            toml: r.toml(),
        }
    }
}
impl RedisAt for RedisName {
    fn name(&self, c: &mut Command) {
        c.env(self.env.0, &self.env.1);
    }
    fn toml(&self) -> String {
        self.toml.clone()
    }
}
impl RedisAt for tollgate_testkit::TestRedis {
    fn name(&self, c: &mut Command) {
        let (k, v) = self.env();
        c.env(k, v);
    }
    fn toml(&self) -> String {
        tollgate_testkit::TestRedis::toml(self)
    }
}

/// `tollgate accounts show`, parsed.
pub fn account_json(redis: &str, account: &str) -> serde_json::Value {
    let shown = bin()
        .stdout(Stdio::piped())
        .args(["accounts", "show", "--redis", redis, account])
        .output()
        .unwrap();
    serde_json::from_slice(&shown.stdout).unwrap()
}

/// SIGTERM, then wait (bounded) for the exit.
pub fn terminate(p: &mut Proc) -> std::process::ExitStatus {
    signal(&p.0, "-TERM");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = p.0.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the process did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The proxy on `proxy`, the control service on `control`, the admin listener on a free port:
/// what every `tollgate dev` of these suites needs.
pub fn listen_on(c: &mut Command, proxy: SocketAddr, control: SocketAddr) {
    c.args(["--proxy-listen", &proxy.to_string()])
        .args(["--control-listen", &control.to_string()])
        .args(["--admin-listen", &free_addr().to_string()]);
}

/// Waits (at most `within`) for `child` to exit on its own; its status.
pub fn wait_exit(child: &mut Child, within: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "{what} did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The payment secrets `tollgate control` takes from its environment (test values).
pub fn with_payment_secrets(c: &mut Command) -> &mut Command {
    c.env(
        "TOLLGATE_PAYMENTS_SECRET",
        "a-32-byte-or-longer-secret-for-hmac!",
    )
    .env(
        "TOLLGATE_PAYEE_KEY",
        "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    )
}

/// The official MCP TypeScript SDK scripts of mcp/tests/js (installed by scripts/deps.sh).
pub fn mcp_js() -> std::path::PathBuf {
    let js = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("mcp/tests/js");
    assert!(
        js.join("node_modules/@modelcontextprotocol/sdk").exists(),
        "run scripts/deps.sh"
    );
    js
}

/// An agent deploys `hello-agent` over MCP (mcp/tests/js/deploy.mjs): its structured result.
pub fn deploy_hello(control: SocketAddr) -> serde_json::Value {
    let out = Command::new("node")
        .arg(mcp_js().join("deploy.mjs"))
        .arg(format!("http://{control}/mcp"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// One MCP tool call through the real mppx client (payments/tests/js/client.mjs), paying as
/// `key` on the test chain at `rpc`: its output lines. Fails the test when the call fails.
pub fn mppx_mcp(rpc: &str, key: &str, mcp: &str, tool: &str, args: &str) -> Vec<serde_json::Value> {
    let js = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("payments/tests/js");
    let out = Command::new("node")
        .arg(js.join("client.mjs"))
        .args(["mcp", mcp, tool, args, "1"])
        .env("RPC", rpc)
        .env("KEY", key)
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
}
