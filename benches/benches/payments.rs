//! Payments: (1) voucher signature verification per second on one core (the EIP-712 digest and
//! secp256k1 recovery the `mpp` crate runs per voucher); (2) a voucher accepted end to end by
//! one node, one after another: HMAC check, signature, the escrow read from the chain (the
//! local test chain over loopback HTTP), the per-channel Redis lock and fenced commit with its
//! pending credit, and the credit applied to the money core.
//! (3) The added latency of a paid MCP call over an unpaid one, as an agent sees it: the same
//! tool (`list_projects`) on two MCP servers over one control service, one with a fixed
//! identity (no payment) and one with MPP (each call: `-32042`, a zero-amount proof, the call
//! again), plus a paid `top_up` (a voucher), all driven by the real mppx client wrapping the
//! official MCP TypeScript SDK client (`payments/tests/js/latency.mjs`).
//! The channel is opened by the real mppx client (node). Run:
//! `cargo bench -p tollgate-benches --bench payments`

use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use mpp::protocol::methods::tempo::precompile_voucher::{
    precompile_voucher_signing_hash_with_escrow, verify_precompile_voucher_signature,
};
use tollgate_metering::{RedisStore, Store};
use tollgate_payments::config::Secret;
use tollgate_payments::kv::RedisKv;
use tollgate_payments::{Payments, PaymentsConfig, RedisChannels, RpcChain};
use tollgate_testchain::{ChainConfig, TestChain};
use tollgate_testkit::RedisServer;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const PAYER: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
const PAYEE: &str = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    tollgate_benches::run_probe("payments", run());
}

fn sign(
    signer: &PrivateKeySigner,
    ch: B256,
    cum: u128,
    escrow: Address,
    chain: u64,
) -> Res<Vec<u8>> {
    let h = precompile_voucher_signing_hash_with_escrow(ch, cum, escrow, chain)?;
    Ok(signer.sign_hash_sync(&h)?.as_bytes().to_vec())
}

async fn run() -> Res<()> {
    let payer: PrivateKeySigner = PAYER.parse()?;
    let escrow = tollgate_payments::config::ESCROW;
    let chain_id = tollgate_testchain::DEFAULT_CHAIN_ID;

    // (1) Signature verification, one core.
    let ch = B256::repeat_byte(7);
    let sigs: Vec<Vec<u8>> = (1..=2000u128)
        .map(|c| sign(&payer, ch, c, escrow, chain_id))
        .collect::<Res<_>>()?;
    let mut rates = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        for (i, s) in sigs.iter().enumerate() {
            let ok = verify_precompile_voucher_signature(
                s,
                payer.address(),
                ch,
                i as u128 + 1,
                escrow,
                chain_id,
            )?;
            if !ok {
                return Err("a valid voucher failed to verify".into());
            }
        }
        rates.push(sigs.len() as f64 / t.elapsed().as_secs_f64());
    }
    println!(
        "voucher signature verification, one core: median {:.0}/s ({:.1} µs each), 5 runs of {}",
        pct(&mut rates, 0.5),
        1e6 / pct(&mut rates, 0.5),
        sigs.len()
    );
    // The recovery alone, both backends on the same vouchers in one run, interleaved: the
    // pure-Rust k256 and libsecp256k1 (what `verify_precompile_voucher_signature` uses with
    // alloy's `secp256k1` feature, as this workspace builds it).
    let parsed: Vec<(alloy::primitives::Signature, B256)> = sigs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let sig = alloy::primitives::Signature::from_raw(s)?;
            let h =
                precompile_voucher_signing_hash_with_escrow(ch, i as u128 + 1, escrow, chain_id)?;
            Ok((sig, h))
        })
        .collect::<Res<_>>()?;
    let (mut k256_rates, mut secp_rates) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        for (sig, h) in &parsed {
            let vk = sig.recover_from_prehash(h)?;
            if Address::from_public_key(&vk) != payer.address() {
                return Err("k256 recovered another signer".into());
            }
        }
        k256_rates.push(parsed.len() as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for (sig, h) in &parsed {
            let pk = sig.recover_from_prehash_secp256k1(h)?;
            if Address::from_raw_public_key(&pk.serialize_uncompressed()[1..]) != payer.address() {
                return Err("libsecp256k1 recovered another signer".into());
            }
        }
        secp_rates.push(parsed.len() as f64 / t.elapsed().as_secs_f64());
    }
    let (k, s) = (pct(&mut k256_rates, 0.5), pct(&mut secp_rates, 0.5));
    println!(
        "secp256k1 recovery alone, one core: k256 median {k:.0}/s ({:.1} µs), libsecp256k1 median {s:.0}/s ({:.1} µs): {:.2}x",
        1e6 / k,
        1e6 / s,
        s / k
    );

    // (2) End to end through one node.
    let redis = RedisServer::start();
    let running = TestChain::spawn("127.0.0.1:0".parse()?, ChainConfig::default()).await?;
    running.chain().fund(payer.address());
    let money: Arc<dyn Store> =
        Arc::new(RedisStore::connect(&redis.url(), "tollgate", Duration::from_secs(30)).await?);
    let cfg = PaymentsConfig::new(
        &running.url(),
        chain_id,
        Secret::new("bench-secret-bench-secret-bench-secret-1"),
        Secret::new(PAYEE),
    );
    let payments = Arc::new(Payments::new(
        cfg.clone(),
        Arc::new(
            RedisChannels::connect(&redis.url(), "tollgate")
                .await
                .map_err(|e| e.message)?,
        ),
        Arc::new(RedisKv::connect(&redis.url(), "tollgate", Duration::from_secs(3600)).await?),
        money.clone(),
        Arc::new(RpcChain::new(
            &running.url(),
            PAYEE.parse()?,
            chain_id,
            escrow,
        )?),
    )?);
    let url = serve(payments.clone()).await?;
    // The real client opens the channel ($1 voucher in the default $5 deposit; the 1,000
    // vouchers below add $1).
    let js = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../payments/tests/js");
    let out = tokio::process::Command::new("node")
        .arg(js.join("client.mjs"))
        .args(["http", &format!("{url}/v1/top-up?amount_usd=1"), "1"])
        .env("RPC", running.url())
        .env("KEY", PAYER)
        .output()
        .await?;
    let line: serde_json::Value = serde_json::from_slice(
        out.stdout
            .split(|b| *b == b'\n')
            .next()
            .ok_or("no output from mppx")?,
    )?;
    let ch_str = line["receipt"]["channelId"]
        .as_str()
        .ok_or_else(|| format!("mppx did not open a channel: {line}"))?
        .to_owned();
    let ch: B256 = ch_str.parse()?;
    let desc = payments
        .backend()
        .get(&ch_str)
        .await
        .map_err(|e| e.message)?
        .and_then(|r| r.descriptor)
        .ok_or("no descriptor")?;
    let n = 1000u128;
    let mut creds = Vec::new();
    for i in 1..=n {
        let cum = 1_000_000 + i * 1000;
        let challenge = payments.session_challenge(1000, None)?;
        creds.push(mpp::PaymentCredential {
            challenge: challenge.to_echo(),
            source: None,
            payload: serde_json::json!({
                "action": "voucher",
                "channelId": ch_str,
                "cumulativeAmount": cum.to_string(),
                "signature": alloy::hex::encode_prefixed(sign(&payer, ch, cum, escrow, chain_id)?),
                "descriptor": desc,
            }),
        });
    }
    let mut lat = Vec::new();
    let t = Instant::now();
    for c in &creds {
        let s = Instant::now();
        payments.accept(c).await.map_err(|e| format!("{e:?}"))?;
        lat.push(s.elapsed().as_secs_f64() * 1e3);
    }
    let total = t.elapsed().as_secs_f64();
    let account = tollgate_payments::account_of(chain_id, &payer.address());
    let credited = money
        .account(&account)
        .await?
        .map(|a| a.credited)
        .unwrap_or(0);
    let expected = (1_000_000 + n as i64 * 1000) * 1_000_000;
    if credited != expected {
        return Err(format!("credited {credited} p$, expected {expected}").into());
    }
    println!(
        "voucher accepted end to end (one node, sequential, {n}): {:.0}/s; p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; credit exact ({credited} p$)",
        n as f64 / total,
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99),
        pct(&mut lat, 1.0),
    );

    // (3) Paid versus unpaid MCP calls.
    let dir = tempfile::tempdir()?;
    let t = tollgate_runtime::Toolchain::ensure(&tollgate_runtime::Toolchain::source_tree_dir())?;
    let (sup, events) = tollgate_runtime::Supervisor::new(
        tollgate_runtime::RuntimeConfig {
            data_dir: dir.path().join("runtime"),
            ..Default::default()
        },
        t.clone(),
        Arc::new(tollgate_runtime::NoCpuSink),
    )?;
    let control = tollgate_control::Control::new(
        Arc::new(tollgate_control::RedisControlStore::connect(&redis.url(), "tollgate").await?),
        tollgate_control::bundler_for(&t, dir.path().join("builds"))?,
        sup,
        Arc::new(tollgate_routes::RouteStore::connect(&redis.url(), "tollgate").await?),
        tollgate_control::ControlConfig::default(),
    );
    tokio::spawn(control.clone().follow_runtime(events));
    let cfg = tollgate_mcp::McpConfig::default();
    let free = mount(tollgate_mcp::router(
        control.clone(),
        Arc::new(tollgate_app::adapters::DevIdentity("bench-free".into())),
        &cfg,
    ))
    .await?
        + "/mcp";
    let paid = mount(tollgate_mcp::router(
        control,
        Arc::new(tollgate_app::paid::PaidIdentity {
            payments: payments.clone(),
            start_hold: tollgate_app::paid::START_REVERSAL_HOLD,
        }),
        &cfg,
    ))
    .await?
        + "/mcp";
    let out = tokio::process::Command::new("node")
        .arg(js.join("latency.mjs"))
        .args([&free, &paid, "200"])
        .env("RPC", running.url())
        .env("KEY", PAYER)
        .output()
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "latency.mjs: {e}: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    println!(
        "MCP tools/call over HTTP, mppx-wrapped TS SDK client, {} each: unpaid list_projects p50 {} ms p99 {} ms; with identity proof p50 {} ms p99 {} ms; paid top_up (voucher) p50 {} ms p99 {} ms",
        v["n"],
        v["unpaid"]["p50_ms"],
        v["unpaid"]["p99_ms"],
        v["proof"]["p50_ms"],
        v["proof"]["p99_ms"],
        v["voucher"]["p50_ms"],
        v["voucher"]["p99_ms"],
    );
    Ok(())
}

/// The unpaid side: every call acts as one account.
async fn mount(app: axum::Router) -> Res<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(format!("http://{addr}"))
}

async fn serve(p: Arc<Payments>) -> Res<String> {
    mount(tollgate_payments::http::router(p)).await
}
