//! Hostile `Authorization: Payment` headers and MCP `_meta` credentials: decoding never panics,
//! and accepting whatever decodes never credits (a forged credential cannot pass the HMAC and
//! signature checks, and nothing is written before they pass).
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tollgate_metering::{EmbeddedStore, Store};
use tollgate_payments::config::Secret;
use tollgate_payments::{EmbeddedChannels, Payments, PaymentsConfig, RpcChain};

struct Rig {
    rt: tokio::runtime::Runtime,
    payments: Payments,
    money: Arc<dyn Store>,
    _dir: tempfile::TempDir,
}

fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // A chain nobody listens on: anything that gets as far as the chain fails there.
        let rpc = "http://127.0.0.1:9";
        let key = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";
        let cfg = PaymentsConfig::new(
            rpc,
            42431,
            Secret::new("fuzz-secret-fuzz-secret-fuzz-secret-01"),
            Secret::new(key),
        );
        let money: Arc<dyn Store> = Arc::new(
            EmbeddedStore::open(
                &dir.path().join("money.redb"),
                std::time::Duration::from_secs(10),
            )
            .unwrap(),
        );
        let backend = Arc::new(EmbeddedChannels::open(&dir.path().join("ch.redb")).unwrap());
        let chain = Arc::new(RpcChain::new(rpc, key.parse().unwrap(), 42431, cfg.escrow).unwrap());
        let payments = {
            let _g = rt.enter();
            Payments::new(
                cfg,
                backend,
                Arc::new(mpp::MemoryStore::new()),
                money.clone(),
                chain,
            )
            .unwrap()
        };
        Rig {
            rt,
            payments,
            money,
            _dir: dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let r = rig();
    let mut creds = Vec::new();
    let mut h = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_bytes(data) {
        h.insert(http::header::AUTHORIZATION, v);
    }
    if let Ok(Some(c)) = tollgate_payments::http::credential(&h) {
        creds.push(c);
    }
    if let Ok(serde_json::Value::Object(m)) = serde_json::from_slice(data) {
        if let Ok(Some(c)) = tollgate_payments::mcp::credential(&m) {
            creds.push(c);
        }
    }
    for c in creds {
        r.rt.block_on(async {
            let _ = r.payments.accept(&c).await;
            let _ = r.payments.identify(&c).await;
        });
    }
    let ledger = r.rt.block_on(r.money.ledger()).unwrap();
    assert!(
        ledger.is_empty(),
        "a hostile credential credited: {ledger:?}"
    );
});
