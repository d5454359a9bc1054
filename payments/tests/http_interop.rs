//! The real mppx client (npm, pinned) pays tollgate's HTTP top-up endpoint on its own, with the
//! project's test chain as its RPC and a real redis-server as the shared store.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use tollgate_metering::PICOS_PER_USD;

const USD: i64 = PICOS_PER_USD;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mppx_opens_a_channel_pays_vouchers_tops_up_the_deposit_and_credit_lands_once() {
    let rig = Rig::start(1).await;
    rig.fund(PAYER_KEY);
    let before = rig.token_balance(address(PAYER_KEY));
    let url = format!("{}/v1/top-up?amount_usd=2", rig.nodes[0].url);
    // Four paid calls of $2 against the default $5 deposit: open, voucher, then the client
    // must top up the deposit by itself before the third voucher.
    let lines = mppx(&rig.chain.url(), PAYER_KEY, &["http", &url, "4"]).await;
    assert_eq!(lines.len(), 4, "{lines:?}");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["status"], 200, "call {i}: {l}");
        let r = &l["receipt"];
        assert_eq!(r["status"], "success", "{l}");
        assert_eq!(
            r["acceptedCumulative"],
            ((i as u64 + 1) * 2_000_000).to_string(),
            "{l}"
        );
        assert_eq!(l["body"]["account"], account(PAYER_KEY));
    }
    // The same channel every time: no re-open.
    let ch = lines[0]["receipt"]["channelId"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        lines
            .iter()
            .all(|l| l["receipt"]["channelId"] == ch.as_str())
    );
    // Exactly $8 of credit, once per voucher.
    assert_eq!(rig.available(&account(PAYER_KEY)).await, 8 * USD);
    let credits: Vec<_> = rig
        .money
        .ledger()
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "credit")
        .map(|e| (e.key, e.amount))
        .collect();
    assert_eq!(credits.len(), 4, "{credits:?}");
    assert!(
        credits
            .iter()
            .all(|(k, a)| k.starts_with(&format!("credit:mpp:{ch}:")) && *a == 2 * USD)
    );
    // On chain: $5 + the client's $5 top-up locked in the escrow.
    let id: alloy::primitives::B256 = ch.parse().unwrap();
    let view = rig.chain.chain().channel(id).expect("channel on chain");
    assert_eq!(view.deposit, 10_000_000);
    assert_eq!(rig.token_balance(address(PAYER_KEY)), before - 10_000_000);
    assert_eq!(rig.audit().await, vec![], "every credit backed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_captures_only_what_was_spent_and_refunds_the_rest() {
    let rig = Rig::start(1).await;
    rig.fund(PAYER_KEY);
    let payer_before = rig.token_balance(address(PAYER_KEY));
    let payee = address(PAYEE_KEY);
    let payee_before = rig.token_balance(payee);
    let url = format!("{}/v1/top-up?amount_usd=1", rig.nodes[0].url);
    let acct = account(PAYER_KEY);
    // Two $1 payments; then the account spends $1.60 of its $2 (deploys, requests); then the
    // client closes. The payee may capture only the $1.60 spent; $3.40 of the $5 deposit goes
    // back to the payer, and the unused $0.40 leaves the account.
    let mut run = MppxRun::start(
        &rig.chain.url(),
        PAYER_KEY,
        &["manager", &url, "2", "wait-close"],
    );
    let paid = run.lines_until(|l| l["waiting"] == true).await;
    assert_eq!(paid.len(), 3, "{paid:?}");
    assert_eq!(
        paid[1]["receipt"]["acceptedCumulative"], "2000000",
        "{paid:?}"
    );
    assert_eq!(rig.available(&acct).await, 2 * USD);
    rig.money
        .charge(&acct, "test-spend", 16 * USD / 10, false)
        .await
        .unwrap();
    run.proceed().await;
    let rest = run.finish().await;
    let close = rest
        .iter()
        .find(|l| l["close"] == true)
        .expect("close line");
    let r = &close["receipt"];
    assert_eq!(r["acceptedCumulative"], "2000000", "{close}");
    assert_eq!(r["spent"], "1600000", "{close}");
    assert!(
        r["txHash"].as_str().is_some_and(|h| h.len() == 66),
        "{close}"
    );
    assert_eq!(rig.available(&acct).await, 0);
    assert_eq!(rig.token_balance(payee), payee_before + 1_600_000);
    assert_eq!(
        rig.token_balance(address(PAYER_KEY)),
        payer_before - 1_600_000
    );
    // The channel is gone on chain, and a replayed voucher for it credits nothing.
    let ch: alloy::primitives::B256 = paid[0]["channelId"].as_str().unwrap().parse().unwrap();
    assert!(rig.chain.chain().channel(ch).is_none_or(|v| v.deposit == 0));
    let ledger_credits = rig
        .money
        .ledger()
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "credit")
        .count();
    assert_eq!(ledger_credits, 2);
    assert_eq!(rig.audit().await, vec![], "every credit backed");
}
