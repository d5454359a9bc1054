//! Drives the test chain over HTTP the way mppx, viem and the payments server do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use alloy::primitives::aliases::U96;
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::{SolCall, SolError, SolEvent};
use common::*;
use serde_json::{Value, json};
use tempo_alloy::contracts::precompiles::ITIP20;
use tempo_alloy::contracts::precompiles::ITIP20ChannelReserve as Escrow;
use tollgate_testchain::{ChainConfig, DEFAULT_CHAIN_ID, ESCROW, PATH_USD, TestChain};

const CHAIN: u64 = DEFAULT_CHAIN_ID;
const FAUCET: u128 = 1_000_000_000;

async fn funded(c: &Client) -> PrivateKeySigner {
    let key = PrivateKeySigner::random();
    let hashes = c.ok("tempo_fundAddress", json!([key.address()])).await;
    assert_eq!(hashes.as_array().unwrap().len(), 1);
    key
}

#[tokio::test]
async fn identity_and_fixed_answers() {
    let (chain, c) = spawn(ChainConfig::default()).await;
    assert_eq!(c.ok("eth_chainId", json!([])).await, "0xa5bf");
    assert_eq!(c.ok("net_version", json!([])).await, "42431");
    let version = c.ok("web3_clientVersion", json!([])).await;
    assert!(version.as_str().unwrap().contains("NO REAL MONEY"));
    assert_eq!(c.ok("eth_maxPriorityFeePerGas", json!([])).await, "0x0");
    assert_eq!(c.ok("eth_gasPrice", json!([])).await, "0x4a817c800");
    assert_eq!(
        c.ok("eth_getBalance", json!([Address::random(), "latest"]))
            .await,
        "0x0"
    );
    assert_eq!(
        c.ok(
            "eth_getTransactionCount",
            json!([Address::random(), "latest"])
        )
        .await,
        "0x0"
    );
    let fill = c
        .call("eth_fillTransaction", json!([{}]))
        .await
        .unwrap_err();
    assert_eq!(fill["code"], -32601);
    let unknown = c.call("eth_mining", json!([])).await.unwrap_err();
    assert_eq!(unknown["code"], -32601);

    let block = c.ok("eth_getBlockByNumber", json!(["latest", false])).await;
    for field in [
        "number",
        "hash",
        "timestamp",
        "baseFeePerGas",
        "timestampMillis",
        "timestampMillisPart",
        "mainBlockGeneralGasLimit",
        "sharedGasLimit",
        "transactions",
    ] {
        assert!(!block[field].is_null(), "block lacks {field}: {block}");
    }
    assert_eq!(block["baseFeePerGas"], "0x4a817c800");
    let by_number = c.ok("eth_getBlockByNumber", json!(["0x0", true])).await;
    assert_eq!(by_number["number"], "0x0");
    assert!(
        c.ok("eth_getBlockByNumber", json!(["0x99", false]))
            .await
            .is_null()
    );

    // eth_estimateGas with the mppx request shape answers the constant.
    let est = c
        .ok(
            "eth_estimateGas",
            json!([{"from": Address::random(), "type": "0x76", "chainId": "0xa5bf",
                    "calls": [{"to": PATH_USD, "value": "0x0",
                               "data": Bytes::from(ITIP20::balanceOfCall { account: Address::ZERO }.abi_encode())}],
                    "nonceKey": "0xffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff"}]),
        )
        .await;
    assert_eq!(est, "0x493e0");

    // Token views.
    let dec = c
        .eth_call(PATH_USD, ITIP20::decimalsCall {}.abi_encode())
        .await
        .unwrap();
    assert_eq!(ITIP20::decimalsCall::abi_decode_returns(&dec).unwrap(), 6);
    let sym = c
        .eth_call(PATH_USD, ITIP20::symbolCall {}.abi_encode())
        .await
        .unwrap();
    assert_eq!(
        ITIP20::symbolCall::abi_decode_returns(&sym).unwrap(),
        "pathUSD"
    );

    // Escrow constants.
    let grace = c
        .eth_call(ESCROW, Escrow::CLOSE_GRACE_PERIODCall {}.abi_encode())
        .await
        .unwrap();
    assert_eq!(
        Escrow::CLOSE_GRACE_PERIODCall::abi_decode_returns(&grace).unwrap(),
        900
    );
    chain.shutdown().await;
}

#[tokio::test]
async fn faucet_funds_every_token_with_receipts() {
    let other = "0x20c0000000000000000000000000000000000001"
        .parse()
        .unwrap();
    let cfg = ChainConfig {
        tokens: vec![PATH_USD, other],
        ..ChainConfig::default()
    };
    let (chain, c) = spawn(cfg).await;
    let who = Address::random();
    let before = c.ok("eth_blockNumber", json!([])).await;
    let hashes = c.ok("tempo_fundAddress", json!([who])).await;
    let hashes = hashes.as_array().unwrap();
    assert_eq!(hashes.len(), 2);
    for h in hashes {
        let r = c.ok("eth_getTransactionReceipt", json!([h])).await;
        assert_eq!(r["status"], "0x1");
        assert_eq!(r["type"], "0x76");
        assert!(!r["feePayer"].is_null());
        assert_eq!(r["logs"].as_array().unwrap().len(), 2);
    }
    let after = c.ok("eth_blockNumber", json!([])).await;
    assert_ne!(before, after);
    assert_eq!(c.balance(who).await, FAUCET);
    assert_eq!(chain.chain().balance(other, who), FAUCET);
    let bal = c
        .eth_call(
            PATH_USD,
            ITIP20::balanceOfCall { account: who }.abi_encode(),
        )
        .await
        .unwrap();
    assert_eq!(
        ITIP20::balanceOfCall::abi_decode_returns(&bal).unwrap(),
        U256::from(FAUCET)
    );
    // The library call does the same.
    assert_eq!(chain.chain().fund(who).len(), 2);
    assert_eq!(c.balance(who).await, 2 * FAUCET);
    assert_eq!(
        c.call("tempo_fundAddress", json!(["0xnotanaddress"]))
            .await
            .unwrap_err()["code"],
        -32602
    );
    chain.shutdown().await;
}

#[tokio::test]
async fn channel_lifecycle_open_topup_settle_close() {
    let (chain, c) = spawn(ChainConfig::default()).await;
    let payer = funded(&c).await;
    let payee = PrivateKeySigner::random();
    let stranger = funded(&c).await;
    let now = c.chain_time().await;

    // Open, as the mppx client does.
    let deposit = 10_000_000u128;
    let open = open_tx(&payer, payee.address(), deposit, TxOpts::client(CHAIN, now));
    let (_, ok, receipt) = c.send_ok(&open.raw).await;
    assert!(ok, "open reverted: {receipt}");
    assert_eq!(receipt["from"], json!(payer.address()));
    assert_eq!(receipt["feeToken"], json!(PATH_USD));
    assert_eq!(receipt["feePayer"], json!(payer.address()));
    assert_eq!(c.balance(payer.address()).await, FAUCET - deposit);
    assert_eq!(c.balance(ESCROW).await, deposit);
    let ch = c.channel(open.id).await;
    assert_eq!(parse_amount(&ch["deposit"]), deposit);
    assert_eq!(parse_amount(&ch["settled"]), 0);
    assert_eq!(
        ch["expiringNonceHash"],
        json!(open.descriptor.expiringNonceHash)
    );
    let view = chain.chain().channel(open.id).unwrap();
    assert_eq!(view.descriptor, open.descriptor);

    // The views agree: getChannelState and computeChannelId.
    let st = c
        .eth_call(
            ESCROW,
            Escrow::getChannelStateCall { channelId: open.id }.abi_encode(),
        )
        .await
        .unwrap();
    let st = Escrow::getChannelStateCall::abi_decode_returns(&st).unwrap();
    assert_eq!(st.deposit, U96::from(deposit));
    let d = &open.descriptor;
    let idv = c
        .eth_call(
            ESCROW,
            Escrow::computeChannelIdCall {
                payer: d.payer,
                payee: d.payee,
                operator: d.operator,
                token: d.token,
                salt: d.salt,
                authorizedSigner: d.authorizedSigner,
                expiringNonceHash: d.expiringNonceHash,
            }
            .abi_encode(),
        )
        .await
        .unwrap();
    assert_eq!(
        Escrow::computeChannelIdCall::abi_decode_returns(&idv).unwrap(),
        open.id
    );

    // The same raw transaction again is refused at the RPC level.
    let replay = c.send(&open.raw).await.unwrap_err();
    assert_eq!(replay["code"], -32000, "{replay}");

    // A deposit above the balance reverts and changes nothing.
    let big = open_tx(&payer, payee.address(), FAUCET, TxOpts::client(CHAIN, now));
    let (_, ok, receipt) = c.send_ok(&big.raw).await;
    assert!(!ok);
    assert!(
        receipt["revertReason"]
            .as_str()
            .unwrap()
            .contains("InsufficientBalance"),
        "{receipt}"
    );
    assert!(receipt["logs"].as_array().unwrap().is_empty());
    assert_eq!(c.balance(payer.address()).await, FAUCET - deposit);
    assert!(c.channel(big.id).await.is_null());

    // topUp, as mppx does (validAfter in the past).
    let mut o = TxOpts::client(CHAIN, now);
    o.valid_after = Some(now - 30);
    let (raw, _) = build_tx(&payer, vec![top_up_call(d, 5_000_000)], o);
    let (_, ok, r) = c.send_ok(&raw).await;
    assert!(ok, "{r}");
    let deposit = deposit + 5_000_000;
    assert_eq!(parse_amount(&c.channel(open.id).await["deposit"]), deposit);
    assert_eq!(c.balance(ESCROW).await, deposit);

    // topUp by someone else: NotPayer.
    let (raw, _) = build_tx(
        &stranger,
        vec![top_up_call(d, 1)],
        TxOpts::client(CHAIN, now),
    );
    let (_, ok, r) = c.send_ok(&raw).await;
    assert!(!ok);
    assert_eq!(r["revertReason"], Escrow::NotPayer::SIGNATURE);

    // Settle by the payee, the way the server will (nonce 0, 25 s, no fee token).
    let sig3 = voucher(&payer, open.id, 3_000_000, CHAIN).await;
    let (raw, _) = build_tx(
        &payee,
        vec![settle_call(d, 3_000_000, sig3.clone())],
        TxOpts::server(CHAIN, now),
    );
    let (_, ok, r) = c.send_ok(&raw).await;
    assert!(ok, "{r}");
    assert_eq!(c.balance(payee.address()).await, 3_000_000);
    assert_eq!(
        parse_amount(&c.channel(open.id).await["settled"]),
        3_000_000
    );

    // Equal and lower cumulative amounts revert.
    for (cum, sig) in [
        (3_000_000u128, sig3.clone()),
        (2_000_000, voucher(&payer, open.id, 2_000_000, CHAIN).await),
    ] {
        // A random nonce: the first of these is byte-identical to the settle above otherwise,
        // and would be refused as a replay.
        let (raw, _) = build_tx(
            &payee,
            vec![settle_call(d, cum, sig)],
            TxOpts::client(CHAIN, now),
        );
        let (_, ok, r) = c.send_ok(&raw).await;
        assert!(!ok);
        assert_eq!(r["revertReason"], Escrow::AmountNotIncreasing::SIGNATURE);
    }

    // A voucher signed by someone other than the payer.
    let forged = voucher(&stranger, open.id, 4_000_000, CHAIN).await;
    let (raw, _) = build_tx(
        &payee,
        vec![settle_call(d, 4_000_000, forged)],
        TxOpts::server(CHAIN, now),
    );
    let (_, ok, r) = c.send_ok(&raw).await;
    assert!(!ok);
    assert_eq!(r["revertReason"], Escrow::InvalidSignature::SIGNATURE);

    // Settle by a stranger with a good voucher.
    let sig4 = voucher(&payer, open.id, 4_000_000, CHAIN).await;
    let (raw, _) = build_tx(
        &stranger,
        vec![settle_call(d, 4_000_000, sig4)],
        TxOpts::server(CHAIN, now),
    );
    let (_, ok, r) = c.send_ok(&raw).await;
    assert!(!ok);
    assert_eq!(r["revertReason"], Escrow::NotPayeeOrOperator::SIGNATURE);

    // Above the deposit.
    let too_much = voucher(&payer, open.id, deposit + 1, CHAIN).await;
    let (raw, _) = build_tx(
        &payee,
        vec![settle_call(d, deposit + 1, too_much)],
        TxOpts::server(CHAIN, now),
    );
    let (_, ok, r) = c.send_ok(&raw).await;
    assert!(!ok);
    assert_eq!(r["revertReason"], Escrow::AmountExceedsDeposit::SIGNATURE);
    assert_eq!(c.balance(payee.address()).await, 3_000_000);

    // Atomicity: a good settle followed by a failing call in one tx changes nothing.
    let sig5 = voucher(&payer, open.id, 5_000_000, CHAIN).await;
    let (raw, _) = build_tx(
        &payee,
        vec![
            settle_call(d, 5_000_000, sig5.clone()),
            settle_call(d, 5_000_000, sig5.clone()),
        ],
        TxOpts::server(CHAIN, now),
    );
    let (_, ok, _) = c.send_ok(&raw).await;
    assert!(!ok);
    assert_eq!(c.balance(payee.address()).await, 3_000_000);
    assert_eq!(
        parse_amount(&c.channel(open.id).await["settled"]),
        3_000_000
    );

    // Close: capture 5M of a 6M voucher. Payee gets 5M − 3M, payer gets deposit − 5M back.
    let sig6 = voucher(&payer, open.id, 6_000_000, CHAIN).await;
    let payer_before = c.balance(payer.address()).await;
    let (raw, _) = build_tx(
        &payee,
        vec![close_call(d, 6_000_000, 5_000_000, sig6)],
        TxOpts::server(CHAIN, now),
    );
    let (_, ok, r) = c.send_ok(&raw).await;
    assert!(ok, "{r}");
    assert_eq!(c.balance(payee.address()).await, 5_000_000);
    assert_eq!(
        c.balance(payer.address()).await,
        payer_before + deposit - 5_000_000
    );
    assert_eq!(c.balance(ESCROW).await, 0);
    assert!(c.channel(open.id).await.is_null());
    assert!(chain.chain().channel(open.id).is_none());
    let st = c
        .eth_call(
            ESCROW,
            Escrow::getChannelStateCall { channelId: open.id }.abi_encode(),
        )
        .await
        .unwrap();
    let st = Escrow::getChannelStateCall::abi_decode_returns(&st).unwrap();
    assert_eq!(
        (st.settled, st.deposit, st.closeRequestedAt),
        (U96::ZERO, U96::ZERO, 0)
    );

    // Anything on the closed channel: ChannelNotFound.
    let (raw, _) = build_tx(
        &payee,
        vec![settle_call(d, 6_000_000, sig5)],
        TxOpts::server(CHAIN, now),
    );
    let (_, ok, r) = c.send_ok(&raw).await;
    assert!(!ok);
    assert_eq!(r["revertReason"], Escrow::ChannelNotFound::SIGNATURE);

    // No money was created or destroyed.
    let total = c.balance(payer.address()).await
        + c.balance(payee.address()).await
        + c.balance(stranger.address()).await
        + c.balance(ESCROW).await;
    assert_eq!(total, 2 * FAUCET);
    chain.shutdown().await;
}

#[tokio::test]
async fn close_at_settled_needs_no_voucher_and_refunds() {
    let (chain, c) = spawn(ChainConfig::default()).await;
    let payer = funded(&c).await;
    let payee = PrivateKeySigner::random();
    let now = c.chain_time().await;
    let open = open_tx(
        &payer,
        payee.address(),
        1_000_000,
        TxOpts::client(CHAIN, now),
    );
    assert!(c.send_ok(&open.raw).await.1);
    let (raw, _) = build_tx(
        &payee,
        vec![close_call(&open.descriptor, 0, 0, Bytes::new())],
        TxOpts::server(CHAIN, now),
    );
    let (_, ok, r) = c.send_ok(&raw).await;
    assert!(ok, "{r}");
    assert_eq!(c.balance(payer.address()).await, FAUCET);
    assert!(c.channel(open.id).await.is_null());
    chain.shutdown().await;
}

#[tokio::test]
async fn request_close_then_withdraw_after_grace_period() {
    let (chain, c) = spawn(ChainConfig::default()).await;
    let payer = funded(&c).await;
    let payee = PrivateKeySigner::random();
    let now = c.chain_time().await;
    let open = open_tx(
        &payer,
        payee.address(),
        4_000_000,
        TxOpts::client(CHAIN, now),
    );
    assert!(c.send_ok(&open.raw).await.1);
    let d = open.descriptor.clone();

    // The payee settles 1M first, so the withdrawal refunds deposit − settled.
    let sig = voucher(&payer, open.id, 1_000_000, CHAIN).await;
    let (raw, _) = build_tx(
        &payee,
        vec![settle_call(&d, 1_000_000, sig)],
        TxOpts::server(CHAIN, now),
    );
    assert!(c.send_ok(&raw).await.1);

    let request = escrow_call(
        Escrow::requestCloseCall {
            descriptor: d.clone(),
        }
        .abi_encode(),
    );
    let withdraw = escrow_call(
        Escrow::withdrawCall {
            descriptor: d.clone(),
        }
        .abi_encode(),
    );

    // Only the payer may request the close.
    let (raw, _) = build_tx(&payee, vec![request.clone()], TxOpts::server(CHAIN, now));
    let (_, ok, r) = c.send_ok(&raw).await;
    assert!(!ok);
    assert_eq!(r["revertReason"], Escrow::NotPayer::SIGNATURE);

    let (raw, _) = build_tx(&payer, vec![request.clone()], TxOpts::client(CHAIN, now));
    let (_, ok, r) = c.send_ok(&raw).await;
    assert!(ok, "{r}");
    let requested_at = c.channel(open.id).await["closeRequestedAt"]
        .as_u64()
        .unwrap();
    assert!(requested_at >= now);

    let (raw, _) = build_tx(&payer, vec![withdraw.clone()], TxOpts::client(CHAIN, now));
    let (_, ok, r) = c.send_ok(&raw).await;
    assert!(!ok);
    assert_eq!(r["revertReason"], Escrow::CloseNotReady::SIGNATURE);

    // 600 s later: still inside the 900 s grace period.
    let t = c
        .ok("testchain_increaseTime", json!([600]))
        .await
        .as_u64()
        .unwrap();
    assert!(t >= now + 600);
    assert_eq!(c.chain_time().await, t);
    let (raw, _) = build_tx(&payer, vec![withdraw.clone()], TxOpts::client(CHAIN, t));
    let (_, ok, _) = c.send_ok(&raw).await;
    assert!(!ok);

    // Past it.
    let t = c
        .ok("testchain_increaseTime", json!(["0x12c"]))
        .await
        .as_u64()
        .unwrap();
    let (raw, _) = build_tx(&payer, vec![withdraw], TxOpts::client(CHAIN, t));
    let (_, ok, r) = c.send_ok(&raw).await;
    assert!(ok, "{r}");
    assert_eq!(c.balance(payer.address()).await, FAUCET - 1_000_000);
    assert_eq!(c.balance(payee.address()).await, 1_000_000);
    assert!(c.channel(open.id).await.is_null());

    // Transactions built on the host clock are now in the chain's past: refused as expired.
    let (raw, _) = build_tx(&payer, vec![request], TxOpts::server(CHAIN, now));
    let e = c.send(&raw).await.unwrap_err();
    assert!(e["message"].as_str().unwrap().contains("expired"), "{e}");
    chain.shutdown().await;
}

#[tokio::test]
async fn top_up_cancels_a_close_request() {
    let (chain, c) = spawn(ChainConfig::default()).await;
    let payer = funded(&c).await;
    let now = c.chain_time().await;
    let open = open_tx(
        &payer,
        Address::random(),
        1_000_000,
        TxOpts::client(CHAIN, now),
    );
    assert!(c.send_ok(&open.raw).await.1);
    let request = escrow_call(
        Escrow::requestCloseCall {
            descriptor: open.descriptor.clone(),
        }
        .abi_encode(),
    );
    let (raw, _) = build_tx(&payer, vec![request], TxOpts::client(CHAIN, now));
    assert!(c.send_ok(&raw).await.1);
    assert_ne!(c.channel(open.id).await["closeRequestedAt"], 0);
    let (raw, _) = build_tx(
        &payer,
        vec![top_up_call(&open.descriptor, 0)],
        TxOpts::client(CHAIN, now),
    );
    let (_, ok, r) = c.send_ok(&raw).await;
    assert!(ok);
    assert_eq!(
        r["logs"].as_array().unwrap().len(),
        2,
        "CloseRequestCancelled + TopUp"
    );
    assert_eq!(c.channel(open.id).await["closeRequestedAt"], 0);

    // eth_getLogs: the escrow's CloseRequested and CloseRequestCancelled for this payee,
    // selected by address, by topic position (with alternatives), and by block range.
    let payee_topic = B256::left_padding_from(open.descriptor.payee.as_slice());
    let filter = |from: u64, topics: Value| json!([{"fromBlock": format!("{from:#x}"), "toBlock": "latest", "address": ESCROW, "topics": topics}]);
    let wanted = json!([
        [
            Escrow::CloseRequested::SIGNATURE_HASH,
            Escrow::CloseRequestCancelled::SIGNATURE_HASH
        ],
        null,
        null,
        payee_topic
    ]);
    let logs = c.ok("eth_getLogs", filter(0, wanted.clone())).await;
    let logs = logs.as_array().unwrap();
    assert_eq!(logs.len(), 2, "{logs:?}");
    assert_eq!(
        logs[0]["topics"][0],
        json!(Escrow::CloseRequested::SIGNATURE_HASH)
    );
    assert_eq!(logs[0]["topics"][1], json!(open.id));
    assert_eq!(
        logs[1]["topics"][0],
        json!(Escrow::CloseRequestCancelled::SIGNATURE_HASH)
    );
    let grace_end = U256::from_str_radix(
        logs[0]["data"].as_str().unwrap().trim_start_matches("0x"),
        16,
    )
    .unwrap();
    assert!(grace_end >= U256::from(now + 900));
    // Another payee's logs, a later range: none.
    let other = json!([null, null, null, B256::repeat_byte(7)]);
    assert_eq!(c.ok("eth_getLogs", filter(0, other)).await, json!([]));
    let last = u64::from_str_radix(
        logs[1]["blockNumber"]
            .as_str()
            .unwrap()
            .trim_start_matches("0x"),
        16,
    )
    .unwrap();
    let requested_only = json!([Escrow::CloseRequested::SIGNATURE_HASH]);
    assert_eq!(
        c.ok("eth_getLogs", filter(last, requested_only)).await,
        json!([])
    );
    assert_eq!(
        c.ok("eth_getLogs", filter(last, wanted))
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Bad ranges: refused with a clear error, nothing else changes.
    let e = c
        .call(
            "eth_getLogs",
            json!([{"fromBlock": "0x5", "toBlock": "0x1"}]),
        )
        .await
        .unwrap_err();
    assert!(e["message"].as_str().unwrap().contains("fromBlock"), "{e}");
    let e = c
        .call(
            "eth_getLogs",
            json!([{"fromBlock": "0x0", "toBlock": "0xfffff"}]),
        )
        .await
        .unwrap_err();
    assert!(e["message"].as_str().unwrap().contains("range"), "{e}");
    chain.shutdown().await;
}

#[tokio::test]
async fn refuses_invalid_transactions_at_rpc_level() {
    let (chain, c) = spawn(ChainConfig::default()).await;
    let payer = funded(&c).await;
    let now = c.chain_time().await;
    let payee = Address::random();
    let code = |e: serde_json::Value| e["code"].as_i64().unwrap();

    // Wrong chain id.
    let o = TxOpts::client(1, now);
    let e = c.send(&open_tx(&payer, payee, 1, o).raw).await.unwrap_err();
    assert_eq!(code(e.clone()), -32000, "{e}");
    assert!(e["message"].as_str().unwrap().contains("chain id"));

    // validBefore in the past, too far ahead, missing.
    let mut o = TxOpts::client(CHAIN, now);
    o.now = now - 100;
    o.valid_for = 50;
    assert!(c.send(&open_tx(&payer, payee, 1, o).raw).await.is_err());
    let mut o = TxOpts::client(CHAIN, now);
    o.valid_for = 400;
    assert_eq!(
        code(c.send(&open_tx(&payer, payee, 1, o).raw).await.unwrap_err()),
        -32602
    );
    let mut o = TxOpts::client(CHAIN, now);
    o.valid_for = 0;
    o.now = 0;
    assert!(c.send(&open_tx(&payer, payee, 1, o).raw).await.is_err());

    // validAfter in the future.
    let mut o = TxOpts::client(CHAIN, now);
    o.valid_after = Some(now + 60);
    let e = c.send(&open_tx(&payer, payee, 1, o).raw).await.unwrap_err();
    assert!(e["message"].as_str().unwrap().contains("validAfter"), "{e}");

    // Unknown fee token.
    let mut o = TxOpts::client(CHAIN, now);
    o.fee_token = Some(Address::random());
    assert!(c.send(&open_tx(&payer, payee, 1, o).raw).await.is_err());

    // A legacy / EIP-1559 type byte.
    let mut raw = open_tx(&payer, payee, 1, TxOpts::client(CHAIN, now)).raw;
    raw[0] = 0x02;
    assert_eq!(code(c.send(&raw).await.unwrap_err()), -32602);

    // Nothing above reached the chain.
    assert_eq!(c.balance(payer.address()).await, FAUCET);
    chain.shutdown().await;
}

#[tokio::test]
async fn hostile_raw_transactions_never_break_the_chain() {
    let (chain, c) = spawn(ChainConfig::default()).await;
    let payer = funded(&c).await;
    let now = c.chain_time().await;
    let good = open_tx(&payer, Address::random(), 1, TxOpts::client(CHAIN, now)).raw;

    let mut inputs: Vec<Vec<u8>> = vec![
        vec![],
        vec![0x76],
        vec![0x76, 0xc0],
        vec![0x76, 0xff, 0xff, 0xff],
        vec![0x76; 300],
        good[..good.len() / 2].to_vec(),
        [good.clone(), vec![0x00]].concat(),
        B256::random().to_vec(),
    ];
    // Every single-byte corruption of a valid transaction.
    for i in 0..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0x5a;
        inputs.push(bad);
    }
    let mut accepted = 0;
    for raw in &inputs {
        match c.send(raw).await {
            // A flipped byte in e.g. the gas limit still makes a valid (different) transaction.
            Ok(h) => {
                accepted += 1;
                assert!(!c.receipt(h).await.is_null());
            }
            Err(e) => assert!(e["code"].is_i64(), "{e}"),
        }
    }
    assert!(accepted < inputs.len(), "corruptions must be refused");
    // The signature covers every field: no corruption could spend the payer's money.
    assert_eq!(c.balance(payer.address()).await, FAUCET);

    // Malformed JSON-RPC.
    let http = reqwest::Client::new();
    let r: serde_json::Value = http
        .post(&c.url)
        .body("{not json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], -32700);
    for body in [
        json!([]),
        json!(42),
        json!({"jsonrpc": "2.0", "id": 1}),
        json!({"jsonrpc": "2.0", "id": 1, "method": "eth_sendRawTransaction", "params": ["zz"]}),
        json!({"jsonrpc": "2.0", "id": 1, "method": "eth_sendRawTransaction", "params": []}),
        json!({"jsonrpc": "2.0", "id": 1, "method": "eth_call", "params": [{"data": "0x"}]}),
        json!({"jsonrpc": "2.0", "id": 1, "method": "eth_call", "params": [{"to": ESCROW, "data": "0xdeadbeef"}]}),
        json!({"jsonrpc": "2.0", "id": 1, "method": "testchain_increaseTime", "params": [-1]}),
        json!({"jsonrpc": "2.0", "id": 1, "method": "eth_getBlockByNumber", "params": [{"x": 1}]}),
    ] {
        let r = c.raw(body.clone()).await;
        assert!(r["error"]["code"].is_i64(), "{body} -> {r}");
    }

    // The chain still works.
    let fresh = open_tx(
        &payer,
        Address::random(),
        1,
        TxOpts::client(CHAIN, c.chain_time().await),
    );
    assert!(c.send_ok(&fresh.raw).await.1);
    chain.shutdown().await;
}

#[tokio::test]
async fn batch_requests() {
    let (chain, c) = spawn(ChainConfig::default()).await;
    let r = c
        .raw(json!([
            {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId"},
            {"jsonrpc": "2.0", "id": "two", "method": "eth_blockNumber", "params": []},
            {"jsonrpc": "2.0", "method": "eth_chainId"},
            {"jsonrpc": "2.0", "id": 3, "method": "nope"}
        ]))
        .await;
    let r = r.as_array().unwrap();
    assert_eq!(r.len(), 3, "the notification gets no answer");
    assert_eq!(r[0]["result"], "0xa5bf");
    assert_eq!(r[1]["id"], "two");
    assert_eq!(r[2]["error"]["code"], -32601);
    chain.shutdown().await;
}

#[tokio::test]
async fn eth_call_reverts_carry_the_custom_error() {
    let (chain, c) = spawn(ChainConfig::default()).await;
    let d = Escrow::ChannelDescriptor {
        payer: Address::random(),
        payee: Address::random(),
        operator: Address::ZERO,
        token: PATH_USD,
        salt: B256::ZERO,
        authorizedSigner: Address::ZERO,
        expiringNonceHash: B256::ZERO,
    };
    let e = c
        .eth_call(ESCROW, Escrow::withdrawCall { descriptor: d }.abi_encode())
        .await
        .unwrap_err();
    assert_eq!(e["code"], 3);
    let data: Bytes = e["data"].as_str().unwrap().parse().unwrap();
    assert_eq!(data[..4], Escrow::ChannelNotFound::SELECTOR);
    chain.shutdown().await;
}

#[tokio::test]
async fn state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("chain").join("state.json");
    let cfg = ChainConfig {
        state_file: Some(file.clone()),
        ..ChainConfig::default()
    };
    let (chain, c) = spawn(cfg.clone()).await;
    let payer = funded(&c).await;
    let payee = PrivateKeySigner::random();
    let now = c.chain_time().await;
    let open = open_tx(
        &payer,
        payee.address(),
        2_000_000,
        TxOpts::client(CHAIN, now),
    );
    let (hash, ok, _) = c.send_ok(&open.raw).await;
    assert!(ok);
    c.ok("testchain_increaseTime", json!([5])).await;
    let head = c.ok("eth_getBlockByNumber", json!(["latest", false])).await;
    chain.shutdown().await;
    assert!(file.exists());

    let (chain, c) = spawn(cfg.clone()).await;
    assert_eq!(
        c.ok("eth_getBlockByNumber", json!(["latest", false])).await,
        head
    );
    assert_eq!(c.balance(payer.address()).await, FAUCET - 2_000_000);
    assert_eq!(
        parse_amount(&c.channel(open.id).await["deposit"]),
        2_000_000
    );
    assert_eq!(c.receipt(hash).await["status"], "0x1");
    // The replay memory survived too.
    assert_eq!(c.send(&open.raw).await.unwrap_err()["code"], -32000);
    // And the chain goes on from there.
    let sig = voucher(&payer, open.id, 500_000, CHAIN).await;
    let (raw, _) = build_tx(
        &payee,
        vec![settle_call(&open.descriptor, 500_000, sig)],
        TxOpts::server(CHAIN, c.chain_time().await),
    );
    assert!(c.send_ok(&raw).await.1);

    // Sequential nonces (key 0 and a user key) persist too.
    let sequential = |key: u64, nonce: u64| {
        let mut o = TxOpts::server(CHAIN, now);
        o.nonce_key = U256::from(key);
        o.nonce = nonce;
        o.valid_for = 3600;
        let call = escrow_call(Escrow::getChannelStateCall { channelId: open.id }.abi_encode());
        build_tx(&payee, vec![call], o).0
    };
    assert!(c.send_ok(&sequential(0, 0)).await.1);
    assert!(c.send_ok(&sequential(7, 0)).await.1);
    assert_eq!(
        c.ok(
            "eth_getTransactionCount",
            json!([payee.address(), "latest"])
        )
        .await,
        "0x1"
    );
    chain.shutdown().await;
    let (chain, c) = spawn(cfg.clone()).await;
    for (key, nonce, expect_ok) in [
        (0, 0, false),
        (0, 2, false),
        (7, 0, false),
        (0, 1, true),
        (7, 1, true),
    ] {
        let res = c.send(&sequential(key, nonce)).await;
        assert_eq!(res.is_ok(), expect_ok, "key {key} nonce {nonce}: {res:?}");
    }
    assert_eq!(
        c.ok(
            "eth_getTransactionCount",
            json!([payee.address(), "latest"])
        )
        .await,
        "0x2"
    );
    chain.shutdown().await;

    let again = TestChain::new(cfg.clone()).unwrap();
    assert_eq!(again.balance(PATH_USD, payee.address()), 500_000);
    assert_eq!(again.channel(open.id).unwrap().settled, 500_000);

    // A state file from another chain id is refused rather than overwritten.
    let other = ChainConfig {
        chain_id: 1337,
        ..cfg
    };
    assert!(TestChain::new(other).is_err());
}

#[tokio::test]
async fn dropping_the_running_chain_stops_it() {
    let (chain, c) = spawn(ChainConfig::default()).await;
    c.ok("eth_chainId", json!([])).await;
    let url = chain.url();
    drop(chain);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let r = reqwest::Client::new()
        .post(&url)
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId"}))
        .send()
        .await;
    assert!(r.is_err());
}

#[tokio::test]
async fn tip20_transfer_approve_transfer_from() {
    let (chain, c) = spawn(ChainConfig::default()).await;
    let alice = funded(&c).await;
    let bob = PrivateKeySigner::random();
    let carol = Address::random();
    let now = c.chain_time().await;
    let token_call = |input: Vec<u8>| tempo_alloy::primitives::transaction::Call {
        to: alloy::primitives::TxKind::Call(PATH_USD),
        value: U256::ZERO,
        input: Bytes::from(input),
    };

    let transfer = ITIP20::transferCall {
        to: bob.address(),
        amount: U256::from(7),
    };
    let (raw, _) = build_tx(
        &alice,
        vec![token_call(transfer.abi_encode())],
        TxOpts::client(CHAIN, now),
    );
    assert!(c.send_ok(&raw).await.1);
    assert_eq!(c.balance(bob.address()).await, 7);

    // Bob cannot move Alice's tokens until she approves him.
    let pull = ITIP20::transferFromCall {
        from: alice.address(),
        to: carol,
        amount: U256::from(5),
    };
    let (raw, _) = build_tx(
        &bob,
        vec![token_call(pull.abi_encode())],
        TxOpts::client(CHAIN, now),
    );
    let (_, ok, r) = c.send_ok(&raw).await;
    assert!(!ok);
    assert_eq!(r["revertReason"], ITIP20::InsufficientAllowance::SIGNATURE);
    let approve = ITIP20::approveCall {
        spender: bob.address(),
        amount: U256::from(5),
    };
    let (raw, _) = build_tx(
        &alice,
        vec![token_call(approve.abi_encode())],
        TxOpts::client(CHAIN, now),
    );
    assert!(c.send_ok(&raw).await.1);
    let (raw, _) = build_tx(
        &bob,
        vec![token_call(pull.abi_encode())],
        TxOpts::client(CHAIN, now),
    );
    assert!(c.send_ok(&raw).await.1);
    assert_eq!(c.balance(carol).await, 5);
    assert_eq!(c.balance(alice.address()).await, FAUCET - 12);
    let left = c
        .eth_call(
            PATH_USD,
            ITIP20::allowanceCall {
                owner: alice.address(),
                spender: bob.address(),
            }
            .abi_encode(),
        )
        .await
        .unwrap();
    assert_eq!(
        ITIP20::allowanceCall::abi_decode_returns(&left).unwrap(),
        U256::ZERO
    );

    // More than the balance.
    let (raw, _) = build_tx(
        &bob,
        vec![token_call(
            ITIP20::transferCall {
                to: carol,
                amount: U256::from(8),
            }
            .abi_encode(),
        )],
        TxOpts::client(CHAIN, now),
    );
    let (_, ok, _) = c.send_ok(&raw).await;
    assert!(!ok);
    assert_eq!(c.balance(bob.address()).await, 7);
    chain.shutdown().await;
}
