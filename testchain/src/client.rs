//! Building signed Tempo 0x76 transactions as a wallet would, for tests and tools that play a
//! payer against the test chain (opening, requesting a close, withdrawing). Test money only.

use std::num::NonZeroU64;

use alloy::eips::Encodable2718;
use alloy::primitives::{Address, B256, Bytes, TxKind, U256};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use tempo_alloy::primitives::TempoTransaction;
use tempo_alloy::primitives::transaction::{Call, TEMPO_EXPIRING_NONCE_KEY};

use crate::{ESCROW, PATH_USD};

/// How a transaction is built: like the server's (nonce 0, 25 s) or the mppx client's.
#[derive(Clone, Copy, Debug)]
pub struct TxOpts {
    pub chain_id: u64,
    /// Chain time (Unix seconds) the validity window starts from.
    pub now: u64,
    pub valid_for: u64,
    pub nonce: u64,
    pub valid_after: Option<u64>,
    pub fee_token: Option<Address>,
    /// `U256::MAX` (expiring) unless a test wants sequential nonces.
    pub nonce_key: U256,
}

impl TxOpts {
    pub fn server(chain_id: u64, now: u64) -> Self {
        Self {
            chain_id,
            now,
            valid_for: 25,
            nonce: 0,
            valid_after: None,
            fee_token: None,
            nonce_key: TEMPO_EXPIRING_NONCE_KEY,
        }
    }

    /// mppx: expiring nonce with a random nonce, 270 s window, fee token = session token.
    pub fn client(chain_id: u64, now: u64) -> Self {
        Self {
            chain_id,
            now,
            valid_for: 270,
            nonce: rand_nonce(),
            valid_after: None,
            fee_token: Some(PATH_USD),
            nonce_key: TEMPO_EXPIRING_NONCE_KEY,
        }
    }
}

fn rand_nonce() -> u64 {
    let b = B256::random();
    let mut n = [0u8; 8];
    n.copy_from_slice(&b[..8]);
    u64::from_be_bytes(n) & ((1 << 48) - 1)
}

/// One call to the escrow precompile.
pub fn escrow_call(input: Vec<u8>) -> Call {
    Call {
        to: TxKind::Call(ESCROW),
        value: U256::ZERO,
        input: Bytes::from(input),
    }
}

/// The signed transaction's bytes and its expiring-nonce hash.
pub fn build_tx(
    signer: &PrivateKeySigner,
    calls: Vec<Call>,
    o: TxOpts,
) -> Result<(Vec<u8>, B256), alloy::signers::Error> {
    let tx = TempoTransaction {
        chain_id: o.chain_id,
        nonce: o.nonce,
        nonce_key: o.nonce_key,
        valid_before: NonZeroU64::new(o.now + o.valid_for),
        valid_after: o.valid_after.and_then(NonZeroU64::new),
        gas_limit: 2_000_000,
        max_fee_per_gas: 20_000_000_000,
        max_priority_fee_per_gas: 20_000_000_000,
        fee_token: o.fee_token,
        calls,
        ..Default::default()
    };
    let sig = signer.sign_hash_sync(&tx.signature_hash())?;
    let signed = tx.into_signed(sig.into());
    let nonce_hash = signed.expiring_nonce_hash(signer.address());
    Ok((signed.encoded_2718(), nonce_hash))
}
