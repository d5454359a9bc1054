//! alloy's own `TempoNetwork` provider (what the payments server uses, via mpp) must parse the
//! chain's blocks, receipts and transactions: this pins the JSON field shapes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use alloy::consensus::BlockHeader;
use alloy::eips::BlockNumberOrTag;
use alloy::network::{ReceiptResponse, TransactionResponse};
use alloy::primitives::{Address, Bytes};
use alloy::providers::{Provider, ProviderBuilder};
use alloy::signers::local::PrivateKeySigner;
use common::*;
use serde_json::json;
use tempo_alloy::TempoNetwork;
use tollgate_testchain::{ChainConfig, DEFAULT_CHAIN_ID, ESCROW};

alloy::sol! {
    #[sol(rpc)]
    interface IChannelReserveState {
        struct ChannelState {
            uint96 settled;
            uint96 deposit;
            uint32 closeRequestedAt;
        }
        function getChannelState(bytes32 channelId) external view returns (ChannelState memory);
    }
}

#[tokio::test]
async fn mpp_tempo_provider_reads_chain_blocks_and_receipts() {
    let (chain, c) = spawn(ChainConfig::default()).await;
    let provider = mpp::server::tempo_provider(&chain.url()).unwrap();

    assert_eq!(provider.get_chain_id().await.unwrap(), DEFAULT_CHAIN_ID);
    assert_eq!(provider.get_gas_price().await.unwrap(), 20_000_000_000);
    let genesis = provider
        .get_block_by_number(BlockNumberOrTag::Latest)
        .await
        .unwrap()
        .expect("latest block");
    assert_eq!(genesis.header.number(), 0);
    assert!(genesis.header.timestamp() > 0);
    assert_eq!(genesis.header.base_fee_per_gas(), Some(20_000_000_000));
    assert_eq!(
        genesis.header.timestamp_millis / 1000,
        genesis.header.timestamp()
    );

    // A faucet receipt.
    let payer = PrivateKeySigner::random();
    let hashes = c.ok("tempo_fundAddress", json!([payer.address()])).await;
    let fund_hash = hashes[0].as_str().unwrap().parse().unwrap();
    let r = provider
        .get_transaction_receipt(fund_hash)
        .await
        .unwrap()
        .expect("faucet receipt");
    assert!(r.status());
    assert_eq!(r.transaction_hash(), fund_hash);

    // A client open, sent and awaited through the provider the way mpp's close path does.
    let now = c.chain_time().await;
    let payee = PrivateKeySigner::random();
    let open = open_tx(
        &payer,
        payee.address(),
        3_000_000,
        TxOpts::client(DEFAULT_CHAIN_ID, now),
    );
    let pending = provider
        .send_raw_transaction(&open.raw)
        .await
        .expect("accepted");
    let receipt = pending.get_receipt().await.expect("receipt");
    assert!(receipt.status());
    assert_eq!(receipt.from(), payer.address());
    assert_eq!(receipt.fee_payer, payer.address());
    assert_eq!(receipt.fee_token, Some(tollgate_testchain::PATH_USD));
    let block_number = receipt.block_number().unwrap();
    let block = provider
        .get_block_by_number(BlockNumberOrTag::Number(block_number))
        .full()
        .await
        .unwrap()
        .expect("the tx block");
    assert_eq!(block.header.hash, receipt.block_hash().unwrap());
    assert_eq!(block.transactions.len(), 1);
    let tx = provider
        .get_transaction_by_hash(receipt.transaction_hash())
        .await
        .unwrap()
        .expect("tx");
    assert_eq!(tx.from(), payer.address());

    // A view through a generated contract binding.
    let state = IChannelReserveState::new(ESCROW, &provider)
        .getChannelState(open.id)
        .call()
        .await
        .unwrap();
    assert_eq!(state.deposit.to::<u128>(), 3_000_000);

    // A reverted transaction (settle by a stranger) still parses and reads as failed.
    let stranger = PrivateKeySigner::random();
    let sig = voucher(&payer, open.id, 1, DEFAULT_CHAIN_ID).await;
    let (raw, _) = build_tx(
        &stranger,
        vec![settle_call(&open.descriptor, 1, sig)],
        TxOpts::server(DEFAULT_CHAIN_ID, now),
    );
    let receipt = provider
        .send_raw_transaction(&raw)
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    assert!(!receipt.status());

    // An RPC-level refusal reaches the caller as a JSON-RPC error with its code.
    let err = provider
        .send_raw_transaction(&raw)
        .await
        .expect_err("replay");
    assert_eq!(err.as_error_resp().unwrap().code, -32000);
    let err = provider
        .send_raw_transaction(&Bytes::from_static(&[0x02, 0xc0]))
        .await
        .expect_err("wrong type");
    assert_eq!(err.as_error_resp().unwrap().code, -32602);
    chain.shutdown().await;
}

#[tokio::test]
async fn plain_provider_builder_on_tempo_network() {
    let (chain, _c) = spawn(ChainConfig::default()).await;
    let provider = ProviderBuilder::new_with_network::<TempoNetwork>()
        .connect_http(chain.url().parse().unwrap());
    assert_eq!(provider.get_block_number().await.unwrap(), 0);
    let b = provider
        .get_block_by_number(BlockNumberOrTag::Earliest)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.header.parent_hash(), alloy::primitives::B256::ZERO);
    assert_eq!(
        provider.get_balance(Address::random()).await.unwrap(),
        alloy::primitives::U256::ZERO
    );
    let version = provider.get_client_version().await.unwrap();
    assert!(version.contains("NO REAL MONEY"));
    chain.shutdown().await;
}
