//! Decoding and stateless checks of raw Tempo (0x76) transactions.

use alloy::eips::Encodable2718;
use alloy::primitives::{Address, B256, TxKind, U256, keccak256};
use tempo_alloy::primitives::transaction::TEMPO_TX_TYPE_ID;
use tempo_alloy::primitives::{AASigned, TempoSignature};

use crate::rpc::RpcError;

/// A decoded, signature-checked transaction, not yet checked against chain state.
pub(crate) struct DecodedTx {
    pub signed: AASigned,
    /// keccak256 of the raw bytes, which is also what clients compute.
    pub hash: B256,
    pub sender: Address,
    /// `Some` iff the nonce key is the expiring key (`U256::MAX`).
    pub expiring_nonce_hash: Option<B256>,
    pub fee_payer: Address,
}

fn invalid(msg: impl Into<String>) -> RpcError {
    RpcError::invalid_params(msg)
}

/// Decodes `raw` and checks everything that does not depend on chain state: type byte,
/// canonical RLP, structure, chain id, the features this chain does not model, and the
/// signatures (sender and optional fee payer).
pub(crate) fn decode(raw: &[u8], chain_id: u64) -> Result<DecodedTx, RpcError> {
    let Some((&ty, body)) = raw.split_first() else {
        return Err(invalid("empty transaction"));
    };
    if ty != TEMPO_TX_TYPE_ID {
        return Err(invalid(format!(
            "unsupported transaction type 0x{ty:02x}: this test chain accepts only Tempo 0x76 transactions"
        )));
    }
    let mut buf = body;
    let signed = AASigned::rlp_decode(&mut buf)
        .map_err(|e| invalid(format!("invalid 0x76 transaction RLP: {e}")))?;
    if !buf.is_empty() {
        return Err(invalid(
            "invalid 0x76 transaction: trailing bytes after the RLP list",
        ));
    }
    // One transaction, one encoding: otherwise the same signed tx could get several hashes.
    if signed.encoded_2718() != raw {
        return Err(invalid("invalid 0x76 transaction: non-canonical encoding"));
    }
    let tx = signed.tx();
    tx.validate()
        .map_err(|e| invalid(format!("invalid 0x76 transaction: {e}")))?;
    if tx.chain_id != chain_id {
        return Err(RpcError::server(format!(
            "invalid chain id {} (this chain is {chain_id})",
            tx.chain_id
        )));
    }
    for call in &tx.calls {
        if let TxKind::Create = call.to {
            return Err(invalid(
                "contract creation is not supported by this test chain",
            ));
        }
        if call.value != U256::ZERO {
            return Err(invalid(
                "calls with a native value are not supported (Tempo has none)",
            ));
        }
    }
    if tx.key_authorization.is_some() {
        return Err(invalid(
            "key authorizations (access keys) are not modelled by this test chain",
        ));
    }
    if !tx.tempo_authorization_list.is_empty() {
        return Err(invalid(
            "authorization lists are not modelled by this test chain",
        ));
    }
    // A keychain signature names its account without proving the key belongs to it; only the
    // keychain precompile (not modelled) could check that, so accepting it would let anyone
    // send as anyone.
    if let TempoSignature::Keychain(_) = signed.signature() {
        return Err(invalid(
            "keychain (access key) signatures are not modelled by this test chain",
        ));
    }
    let (sender, expiring_nonce_hash) = signed
        .recover_signer_with_expiring_nonce_hash()
        .map_err(|e| invalid(format!("invalid transaction signature: {e}")))?;
    let fee_payer = tx
        .recover_fee_payer(sender)
        .map_err(|e| invalid(format!("invalid fee payer signature: {e}")))?;
    let hash = keccak256(raw);
    Ok(DecodedTx {
        signed,
        hash,
        sender,
        expiring_nonce_hash,
        fee_payer,
    })
}
