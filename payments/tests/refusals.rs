//! Every refusal credits nothing; the same voucher sent to two nodes at once credits once; a
//! replay after a restart credits nothing. The channel is opened by the real mppx client; the
//! later vouchers are signed here with the payer's key, as a hostile or buggy client would.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use alloy::primitives::B256;
use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_vouchers_credit_nothing_and_a_voucher_raced_to_two_nodes_credits_once() {
    let rig = Rig::start(2).await;
    rig.fund(PAYER_KEY);
    let (ch_str, ch) = open_channel(&rig).await;
    let escrow = rig.config().escrow;
    let acct = account(PAYER_KEY);
    assert_eq!(rig.available(&acct).await, USD);
    assert_eq!(credits(&rig).await, 1);
    let (a, b) = (&rig.nodes[0].payments, &rig.nodes[1].payments);
    let record = a.backend().get(&ch_str).await.unwrap().unwrap();
    remember(&ch_str, record.descriptor);

    // Signed by someone else.
    let forged = voucher(
        a,
        &ch_str,
        2_000_000,
        sign(PAYER2_KEY, ch, 2_000_000, escrow),
    );
    refused(a.accept(&forged).await, "session/invalid-signature");
    // Not above the accepted cumulative.
    let same = voucher(
        a,
        &ch_str,
        1_000_000,
        sign(PAYER_KEY, ch, 1_000_000, escrow),
    );
    refused(a.accept(&same).await, "session/delta-too-small");
    // Above the deposit ($5).
    let big = voucher(
        a,
        &ch_str,
        6_000_000,
        sign(PAYER_KEY, ch, 6_000_000, escrow),
    );
    refused(a.accept(&big).await, "session/amount-exceeds-deposit");
    // A tampered challenge (another expiry than we issued): the HMAC no longer matches.
    let mut tampered = voucher(
        a,
        &ch_str,
        2_000_000,
        sign(PAYER_KEY, ch, 2_000_000, escrow),
    );
    tampered.challenge.expires = Some("2099-01-01T00:00:00Z".into());
    refused(a.accept(&tampered).await, "invalid-challenge");
    // A signature with its bytes changed (non-canonical / garbage).
    let mut sig = sign(PAYER_KEY, ch, 2_000_000, escrow);
    // Changed for sure (a byte already `00` stayed valid: a 1-in-256 flake).
    let changed = if &sig[10..12] == "00" { "ff" } else { "00" };
    sig.replace_range(10..12, changed);
    let bad = voucher(a, &ch_str, 2_000_000, sig);
    refused(a.accept(&bad).await, "invalid-signature");
    // The same signature malleated to its high-S twin (s → n − s, v flipped): it recovers the
    // payer too, but the escrow would refuse it at settlement, so it must never be credited
    // (whichever secp256k1 backend recovers it).
    let good = alloy::hex::decode(sign(PAYER_KEY, ch, 2_000_000, escrow)).unwrap();
    let n = alloy::primitives::U256::from_str_radix(
        "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141",
        16,
    )
    .unwrap();
    let s_low = alloy::primitives::U256::from_be_slice(&good[32..64]);
    let mut high = good.clone();
    high[32..64].copy_from_slice(&(n - s_low).to_be_bytes::<32>());
    high[64] = match high[64] {
        27 => 28,
        28 => 27,
        v => v ^ 1,
    };
    // It is a valid signature of the payer (so the refusal below is the low-S rule at work).
    let hash = mpp::protocol::methods::tempo::precompile_voucher::precompile_voucher_signing_hash_with_escrow(
        ch,
        2_000_000,
        escrow,
        tollgate_testchain::DEFAULT_CHAIN_ID,
    )
    .unwrap();
    assert_eq!(
        alloy::primitives::Signature::from_raw(&high)
            .unwrap()
            .recover_address_from_prehash(&hash)
            .unwrap(),
        address(PAYER_KEY)
    );
    let malleated = voucher(a, &ch_str, 2_000_000, alloy::hex::encode_prefixed(&high));
    refused(a.accept(&malleated).await, "invalid-signature");
    // An unknown channel.
    let other = format!("0x{}", "ab".repeat(32));
    let unknown = voucher(
        a,
        &other,
        2_000_000,
        sign(PAYER_KEY, other.parse().unwrap(), 2_000_000, escrow),
    );
    assert!(a.accept(&unknown).await.is_err());
    assert_eq!(credits(&rig).await, 1, "a refusal credited something");
    assert_eq!(rig.available(&acct).await, USD);

    // The same good voucher at both nodes at once: exactly one accepts, one credit.
    let good = voucher(
        a,
        &ch_str,
        2_000_000,
        sign(PAYER_KEY, ch, 2_000_000, escrow),
    );
    let (ra, rb) = tokio::join!(a.accept(&good), b.accept(&good));
    assert_eq!(
        ra.is_ok() as u8 + rb.is_ok() as u8,
        1,
        "{:?} / {:?}",
        ra.as_ref().map(|a| a.accepted_cumulative),
        rb.as_ref().map(|a| a.accepted_cumulative)
    );
    assert_eq!(credits(&rig).await, 2);
    assert_eq!(rig.available(&acct).await, 2 * USD);

    // Retried at either node: nothing more.
    for p in [a, b] {
        assert!(p.accept(&good).await.is_err());
    }
    // A "restarted" node (fresh process state over the same stores): the replay is refused too.
    let restarted = rig.bare_node(&rig.chain.url()).await;
    refused(restarted.accept(&good).await, "session/delta-too-small");
    assert_eq!(credits(&rig).await, 2);
    assert_eq!(rig.available(&acct).await, 2 * USD);
    // Garbage payloads: refused, nothing credited, no panic.
    for payload in [
        json!({}),
        json!({"action": "voucher"}),
        json!({"action": "voucher", "channelId": "zz", "cumulativeAmount": "-1", "signature": "0x"}),
        json!({"action": "close", "channelId": ch_str, "cumulativeAmount": "99999999999999999999999999999", "signature": "0x00"}),
        json!({"action": "open", "type": "transaction", "channelId": ch_str, "transaction": "0x76c0", "cumulativeAmount": "1", "signature": "0x"}),
    ] {
        let mut c = voucher(a, &ch_str, 1, String::new());
        c.payload = payload;
        assert!(a.accept(&c).await.is_err());
    }
    assert_eq!(credits(&rig).await, 2);
    assert_eq!(rig.audit().await, vec![], "every credit backed");
}

/// Hostile input under load across nodes: every voucher of a payer's stream is replayed eight
/// times at once, half at each node, among forged and malformed credentials sent to both, all
/// as parallel tasks. Each voucher credits once, every replay and forgery is refused, and the
/// books stay backed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_and_malformed_credentials_under_load_across_nodes_credit_each_voucher_once() {
    let rig = Rig::start(2).await;
    rig.fund(PAYER_KEY);
    let (ch_str, ch) = open_channel(&rig).await;
    let escrow = rig.config().escrow;
    let acct = account(PAYER_KEY);
    let nodes = [rig.nodes[0].payments.clone(), rig.nodes[1].payments.clone()];
    let record = nodes[0].backend().get(&ch_str).await.unwrap().unwrap();
    remember(&ch_str, record.descriptor);
    const STEPS: u128 = 20;
    // Which node won each race: both must, sometimes, or "across nodes" tested nothing.
    let mut accepted_by = [0u32; 2];
    for step in 1..=STEPS {
        let cumulative = 1_000_000 + step * 100_000;
        let good = voucher(
            &nodes[0],
            &ch_str,
            cumulative,
            sign(PAYER_KEY, ch, cumulative, escrow),
        );
        let forged = voucher(
            &nodes[1],
            &ch_str,
            cumulative + 50_000,
            sign(PAYER2_KEY, ch, cumulative + 50_000, escrow),
        );
        let mut malformed = voucher(&nodes[1], &ch_str, cumulative, String::new());
        malformed.payload = json!({"action": "voucher", "channelId": ch_str,
            "cumulativeAmount": "1e9", "signature": "0xzz"});
        let mut tasks = Vec::new();
        for i in 0..8 {
            let (p, c) = (nodes[i % 2].clone(), good.clone());
            tasks.push((
                Some(i % 2),
                tokio::spawn(async move { p.accept(&c).await.is_ok() }),
            ));
            let (p, c) = (
                nodes[(i + 1) % 2].clone(),
                if i % 2 == 0 {
                    forged.clone()
                } else {
                    malformed.clone()
                },
            );
            tasks.push((
                None,
                tokio::spawn(async move { p.accept(&c).await.is_ok() }),
            ));
        }
        let (mut good_ok, mut bad_ok) = (0, 0);
        for (good_at, t) in tasks {
            let ok = t.await.unwrap();
            match good_at {
                Some(node) => {
                    good_ok += ok as u32;
                    accepted_by[node] += ok as u32;
                }
                None => bad_ok += ok as u32,
            }
        }
        assert_eq!(
            good_ok, 1,
            "step {step}: the voucher was accepted {good_ok} times"
        );
        assert_eq!(
            bad_ok, 0,
            "step {step}: a forged or malformed credential was accepted"
        );
    }
    assert!(
        accepted_by.iter().all(|&n| n > 0),
        "one node won every race: {accepted_by:?}"
    );
    // The opening dollar and one credit per voucher: $1 + 20 × $0.10.
    assert_eq!(credits(&rig).await, 1 + STEPS as usize);
    for p in &nodes {
        p.drain_credits().await.unwrap();
    }
    assert_eq!(rig.available(&acct).await, 3 * USD);
    assert_eq!(rig.audit().await, vec![], "every credit backed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_moves_only_spent_money_on_chain_and_is_idempotent() {
    let rig = Rig::start_with(1, |c| c.settle_min = 1).await;
    rig.fund(PAYER_KEY);
    let payee = address(PAYEE_KEY);
    let payee_before = rig.token_balance(payee);
    let url = format!("{}/v1/top-up?amount_usd=1", rig.nodes[0].url);
    let lines = mppx(&rig.chain.url(), PAYER_KEY, &["http", &url, "3"]).await;
    let ch: B256 = lines[0]["receipt"]["channelId"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let p = &rig.nodes[0].payments;
    // A node whose chain endpoint is down: its round fails, is counted, and records nothing.
    let cut_off = rig.bare_node("http://127.0.0.1:9").await;
    // Nothing spent yet: nothing to settle.
    assert_eq!(p.settle_now().await.unwrap(), 0);
    assert_eq!(rig.chain.chain().channel(ch).unwrap().settled, 0);
    // $1.50 spent: the largest signed voucher at or below it is $1.
    rig.money
        .charge(&account(PAYER_KEY), "spend-1", 15 * USD / 10, false)
        .await
        .unwrap();
    assert_eq!(cut_off.settle_now().await.unwrap(), 0);
    assert_eq!(
        cut_off
            .metrics
            .chain_ops
            .with_label_values(&["settle", "failed"])
            .get(),
        1
    );
    assert_eq!(rig.chain.chain().channel(ch).unwrap().settled, 0);
    // A deploy charged $1 whose reversal is held (the start is under way): that dollar may
    // come back to the payer, so it still counts as unspent.
    p.hold_reversal(
        &account(PAYER_KEY),
        "deploy:under-way",
        USD,
        std::time::Duration::from_secs(600),
    )
    .await
    .unwrap();
    rig.money
        .charge(&account(PAYER_KEY), "deploy:under-way", USD, false)
        .await
        .unwrap();
    // The next round, with the chain reachable, settles what is surely spent: $1.50, so the
    // $1 voucher (not the $2 one the balance alone would allow).
    assert_eq!(p.settle_now().await.unwrap(), 1);
    assert_eq!(rig.chain.chain().channel(ch).unwrap().settled, 1_000_000);
    assert_eq!(rig.token_balance(payee), payee_before + 1_000_000);
    // Again: nothing new to settle.
    assert_eq!(p.settle_now().await.unwrap(), 0);
    // The start went live: the deploy's charge stands, $2.50 is spent, the $2 voucher settles.
    assert!(p.release_reversal("deploy:under-way").await.unwrap());
    assert_eq!(p.settle_now().await.unwrap(), 1);
    assert_eq!(rig.chain.chain().channel(ch).unwrap().settled, 2_000_000);
    // All $3 spent: settles the rest.
    rig.money
        .charge(&account(PAYER_KEY), "spend-2", USD / 2, false)
        .await
        .unwrap();
    assert_eq!(p.settle_now().await.unwrap(), 1);
    assert_eq!(rig.chain.chain().channel(ch).unwrap().settled, 3_000_000);
    assert_eq!(rig.token_balance(payee), payee_before + 3_000_000);
    let rec = p.backend().get(&format!("{ch:#x}")).await.unwrap().unwrap();
    assert_eq!(rec.state.settled_on_chain, 3_000_000);
    assert_eq!(rec.chain_ops.len(), 3);
    assert!(
        rec.chain_ops
            .iter()
            .all(|o| o.kind == "settle" && o.tx_hash.len() == 66)
    );
    assert_eq!(rig.audit().await, vec![], "every credit backed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_amount_is_fixed_once_and_the_server_finishes_an_interrupted_close() {
    let rig = Rig::start(1).await;
    rig.fund(PAYER_KEY);
    let funded = rig.token_balance(address(PAYER_KEY));
    let (ch_str, ch) = open_channel(&rig).await;
    let escrow = rig.config().escrow;
    let acct = account(PAYER_KEY);
    let healthy = &rig.nodes[0].payments;
    let record = healthy.backend().get(&ch_str).await.unwrap().unwrap();
    remember(&ch_str, record.descriptor);
    // A node whose chain is unreachable records the close (and credits its $1 rise), then
    // cannot send it: a retryable failure.
    let cut_off = rig.bare_node("http://127.0.0.1:9").await;
    let first = close_cred(&cut_off, &ch_str, 2_000_000, ch, escrow);
    let e = cut_off.accept(&first).await.unwrap_err();
    assert!(e.retryable, "{e:?}");
    assert_eq!(rig.available(&acct).await, 2 * USD);
    assert_eq!(credits(&rig).await, 2);
    // While it is in progress: a close at another amount, or a voucher, credits nothing.
    refused(
        healthy
            .accept(&close_cred(healthy, &ch_str, 3_000_000, ch, escrow))
            .await,
        "session/channel-finalized",
    );
    assert!(
        healthy
            .accept(&voucher(
                healthy,
                &ch_str,
                3_000_000,
                sign(PAYER_KEY, ch, 3_000_000, escrow)
            ))
            .await
            .is_err()
    );
    assert_eq!(credits(&rig).await, 2);
    assert_eq!(rig.available(&acct).await, 2 * USD);
    // The server finishes it by itself: nothing of the $2 was spent, so all of the deposit
    // goes back and the unused credit leaves the account.
    healthy.settle_now().await.unwrap();
    assert!(rig.chain.chain().channel(ch).is_none_or(|v| v.deposit == 0));
    assert_eq!(rig.token_balance(address(PAYER_KEY)), funded);
    assert_eq!(rig.available(&acct).await, 0);
    // The client's retry of its close gets the receipt.
    let again = healthy.accept(&first).await.unwrap();
    assert_eq!(again.accepted_cumulative, 2_000_000);
    assert!(
        again.receipt.extensions.get("txHash").is_some(),
        "{:?}",
        again.receipt
    );
    assert_eq!(rig.audit().await, vec![], "every credit backed");
}
