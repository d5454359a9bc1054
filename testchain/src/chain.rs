//! The chain's operations: accepting transactions, the faucet, the clock, calls, and mining.

use std::time::{SystemTime, UNIX_EPOCH};

use alloy::consensus::{EMPTY_OMMER_ROOT_HASH, EMPTY_ROOT_HASH, Header, Sealable};
use alloy::primitives::{Address, B64, B256, Bloom, Bytes, Log, U256, address, keccak256};
use alloy::sol_types::SolEvent;
use tempo_alloy::contracts::precompiles::ITIP20;
use tempo_alloy::primitives::TempoHeader;

use crate::exec::{Env, Exec};
use crate::rpc::RpcError;
use crate::state::{BlockRecord, State, TxRecord};
use crate::{BASE_FEE_PER_GAS, ESCROW, MAX_EXPIRING_NONCE_SECS, TestChain, tx};

/// The `from` of faucet mints. No key exists for it; it only labels the mint receipts.
pub(crate) const FAUCET: Address = address!("0x00000000000000000000000000000000000fa0ce");
/// Block gas limit reported in headers (nothing is metered against it).
const BLOCK_GAS_LIMIT: u64 = 500_000_000;
const GENERAL_GAS_LIMIT: u64 = 30_000_000;
const SHARED_GAS_LIMIT: u64 = 50_000_000;
/// What `eth_estimateGas` answers for any call that does not revert.
pub(crate) const GAS_ESTIMATE: u64 = 300_000;
/// Longest `testchain_increaseTime` step, so the clock cannot overflow.
const MAX_TIME_STEP: u64 = 100 * 365 * 24 * 3600;
/// Marks the header as coming from this chain; readable in any block explorer dump.
const EXTRA_DATA: &[u8] = b"tollgate-testchain NO REAL MONEY";

fn system_time() -> (u64, u64) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs(), u64::from(d.subsec_millis()))
}

/// The chain clock: system time plus the `increaseTime` offset.
pub(crate) fn chain_now(state: &State) -> u64 {
    system_time().0.saturating_add(state.time_offset)
}

/// Timestamp (seconds, millisecond part) for the next block: the clock, but never before the
/// previous block.
fn next_block_time(state: &State) -> (u64, u64) {
    let (secs, ms) = system_time();
    let now = (secs.saturating_add(state.time_offset), ms);
    match state.blocks.last() {
        Some(b) if (b.timestamp, b.timestamp_millis_part) > now => {
            (b.timestamp, b.timestamp_millis_part)
        }
        _ => now,
    }
}

/// The Tempo header a block record renders to; its seal hash is the block hash.
pub(crate) fn tempo_header(b: &BlockRecord) -> TempoHeader {
    TempoHeader {
        general_gas_limit: GENERAL_GAS_LIMIT,
        shared_gas_limit: SHARED_GAS_LIMIT,
        timestamp_millis_part: b.timestamp_millis_part,
        inner: Header {
            parent_hash: b.parent_hash,
            ommers_hash: EMPTY_OMMER_ROOT_HASH,
            beneficiary: Address::ZERO,
            state_root: B256::ZERO,
            transactions_root: b.transactions_root,
            receipts_root: b.receipts_root,
            logs_bloom: b.logs_bloom,
            difficulty: U256::ZERO,
            number: b.number,
            gas_limit: BLOCK_GAS_LIMIT,
            gas_used: b.gas_used,
            timestamp: b.timestamp,
            extra_data: Bytes::from_static(EXTRA_DATA),
            mix_hash: B256::ZERO,
            nonce: B64::ZERO,
            base_fee_per_gas: Some(BASE_FEE_PER_GAS),
            ..Header::default()
        },
        consensus_context: None,
    }
}

pub(crate) fn logs_bloom<'a>(logs: impl IntoIterator<Item = &'a Log>) -> Bloom {
    let mut bloom = Bloom::ZERO;
    for log in logs {
        bloom.accrue_log(log);
    }
    bloom
}

/// Seals a block holding `txs` (zero or one transaction; several for nothing today) at `time`.
fn mine(state: &mut State, mut txs: Vec<TxRecord>, time: (u64, u64)) -> B256 {
    let number = state.blocks.len() as u64;
    let parent_hash = state.blocks.last().map(|b| b.hash).unwrap_or_default();
    // Not Merkle-Patricia roots: nothing on this chain verifies them, they only need to differ.
    let (transactions_root, receipts_root) = if txs.is_empty() {
        (EMPTY_ROOT_HASH, EMPTY_ROOT_HASH)
    } else {
        let mut t = Vec::new();
        let mut r = Vec::new();
        for rec in &txs {
            t.extend_from_slice(rec.hash.as_slice());
            r.extend_from_slice(rec.hash.as_slice());
            r.push(u8::from(rec.success));
        }
        (keccak256(t), keccak256(r))
    };
    let mut block = BlockRecord {
        number,
        hash: B256::ZERO,
        parent_hash,
        timestamp: time.0,
        timestamp_millis_part: time.1,
        gas_used: txs.iter().map(|t| t.gas_used).sum(),
        logs_bloom: logs_bloom(txs.iter().flat_map(|t| t.logs.iter())),
        transactions_root,
        receipts_root,
        transactions: txs.iter().map(|t| t.hash).collect(),
    };
    block.hash = tempo_header(&block).hash_slow();
    for rec in &mut txs {
        rec.block_number = number;
        rec.block_hash = block.hash;
        state.txs.insert(rec.hash, rec.clone());
    }
    let hash = block.hash;
    state.blocks.push(block);
    hash
}

/// A fresh chain: one empty genesis block, no balances.
pub(crate) fn genesis(chain_id: u64) -> State {
    let mut state = State::new(chain_id);
    let time = next_block_time(&state);
    mine(&mut state, Vec::new(), time);
    state
}

/// Gas reported for a transaction (nothing is charged; this only fills receipts).
fn gas_used(calls: usize, limit: u64) -> u64 {
    let used = 21_000u64.saturating_add(30_000u64.saturating_mul(calls as u64));
    used.min(limit.max(21_000))
}

impl TestChain {
    /// Applies `f` to a copy of the state, persists the copy, then makes it current. A failed
    /// `f` or a failed write leaves the chain unchanged.
    pub(crate) fn mutate<R>(
        &self,
        f: impl FnOnce(&mut State) -> Result<R, RpcError>,
    ) -> Result<R, RpcError> {
        let mut guard = self.lock();
        let mut next = guard.clone();
        let out = f(&mut next)?;
        if let Some(path) = &self.inner.state_file {
            next.save(path).map_err(|e| {
                tracing::error!(error = %e, "tollgate-testchain: cannot write the state file");
                RpcError::internal(format!("test chain state not persisted: {e:#}"))
            })?;
        }
        *guard = next;
        Ok(out)
    }

    pub(crate) fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.lock())
    }

    fn env(&self, now: u64) -> Env<'_> {
        Env {
            chain_id: self.inner.chain_id,
            tokens: &self.inner.tokens,
            now,
        }
    }

    /// `eth_sendRawTransaction`: check, execute and mine `raw` in a block of its own.
    pub(crate) fn send_raw(&self, raw: &[u8]) -> Result<B256, RpcError> {
        let d = tx::decode(raw, self.inner.chain_id)?;
        self.mutate(|state| {
            let t = d.signed.tx();
            let time = next_block_time(state);
            let now = time.0;
            if state.txs.contains_key(&d.hash) {
                return Err(RpcError::server(format!("already known: transaction {} was already included", d.hash)));
            }
            if let Some(vb) = t.valid_before.map(|v| v.get())
                && vb <= now
            {
                return Err(RpcError::server(format!(
                    "transaction expired: validBefore {vb} is not after the chain time {now}"
                )));
            }
            if let Some(va) = t.valid_after.map(|v| v.get())
                && va > now
            {
                return Err(RpcError::server(format!(
                    "transaction not yet valid: validAfter {va} is after the chain time {now}"
                )));
            }
            // Forget replay hashes that can no longer be replayed (their window has passed).
            state.seen_expiring.retain(|_, vb| *vb > now);
            let expiring = match d.expiring_nonce_hash {
                Some(h) => {
                    let Some(vb) = t.valid_before.map(|v| v.get()) else {
                        return Err(RpcError::invalid_params(
                            "expiring nonce transaction (nonceKey = 2^256-1) without validBefore",
                        ));
                    };
                    if vb > now.saturating_add(MAX_EXPIRING_NONCE_SECS) {
                        return Err(RpcError::invalid_params(format!(
                            "expiring nonce validBefore {vb} is more than {MAX_EXPIRING_NONCE_SECS} s after the chain time {now}"
                        )));
                    }
                    if state.seen_expiring.contains_key(&h) {
                        return Err(RpcError::server(format!(
                            "replayed transaction: expiring nonce hash {h} was already used"
                        )));
                    }
                    Some((h, vb))
                }
                None => {
                    let expected = state.nonce(d.sender, t.nonce_key);
                    if t.nonce != expected {
                        let which = if t.nonce < expected { "too low" } else { "too high (this chain has no mempool)" };
                        return Err(RpcError::server(format!(
                            "nonce {which}: got {}, next nonce of {} for key {} is {expected}",
                            t.nonce, d.sender, t.nonce_key
                        )));
                    }
                    None
                }
            };
            if let Some(ft) = t.fee_token
                && !self.inner.tokens.contains(&ft)
            {
                return Err(RpcError::invalid_params(format!(
                    "fee token {ft} is not a TIP-20 token on this test chain"
                )));
            }

            // Tempo seeds every transaction with keccak256(encode_for_signing ‖ sender), which
            // `open` binds into the channel id.
            let open_hash = d.signed.expiring_nonce_hash(d.sender);
            let mut ex = Exec::new(self.env(now), state.ledger.clone(), d.sender, Some(open_hash));
            let mut failure = None;
            for call in &t.calls {
                let Some(to) = call.to.to().copied() else {
                    failure = Some(crate::exec::Revert { data: Bytes::new(), reason: "contract creation".into() });
                    break;
                };
                if let Err(r) = ex.call(to, &call.input) {
                    failure = Some(r);
                    break;
                }
            }
            let (ledger, logs) = ex.finish();
            let logs = if failure.is_none() {
                state.ledger = ledger;
                logs
            } else {
                Vec::new()
            };

            // Included even when reverted: the nonce is spent either way.
            match expiring {
                Some((h, vb)) => {
                    state.seen_expiring.insert(h, vb);
                }
                None => {
                    let next = t.nonce.saturating_add(1);
                    state.nonces.entry(d.sender).or_default().insert(t.nonce_key, next);
                }
            }

            let first_to = t.calls.first().and_then(|c| c.to.to().copied());
            match &failure {
                None => tracing::info!(tx = %d.hash, from = %d.sender, to = ?first_to, calls = t.calls.len(), "testchain: tx mined"),
                Some(r) => tracing::info!(tx = %d.hash, from = %d.sender, to = ?first_to, reason = %r.reason, "testchain: tx reverted"),
            }
            let rec = TxRecord {
                hash: d.hash,
                block_number: 0,
                block_hash: B256::ZERO,
                from: d.sender,
                to: first_to,
                fee_payer: d.fee_payer,
                fee_token: t.fee_token.or_else(|| self.inner.tokens.first().copied()),
                success: failure.is_none(),
                gas_used: gas_used(t.calls.len(), t.gas_limit),
                logs,
                raw: Some(Bytes::copy_from_slice(raw)),
                revert_reason: failure.as_ref().map(|r| r.reason.clone()),
                revert_data: failure.map(|r| r.data),
            };
            mine(state, vec![rec], time);
            Ok(d.hash)
        })
    }

    /// `tempo_fundAddress`: mint the faucet amount of each token, one block per token.
    pub(crate) fn fund_address(&self, owner: Address) -> Result<Vec<B256>, RpcError> {
        if owner.is_zero() {
            return Err(RpcError::invalid_params("cannot fund the zero address"));
        }
        let amount = self.inner.faucet_amount;
        let chain_id = self.inner.chain_id;
        self.mutate(|state| {
            let mut hashes = Vec::new();
            for &token in &self.inner.tokens {
                let balance = state.ledger.balance(token, owner);
                let supply = state.ledger.supply.get(&token).copied().unwrap_or(0);
                let (Some(next), Some(next_supply)) =
                    (balance.checked_add(amount), supply.checked_add(amount))
                else {
                    return Err(RpcError::server("faucet: balance would overflow"));
                };
                state.ledger.set_balance(token, owner, next);
                state.ledger.supply.insert(token, next_supply);
                let logs = vec![
                    Log {
                        address: token,
                        data: ITIP20::Transfer { from: Address::ZERO, to: owner, amount: U256::from(amount) }
                            .encode_log_data(),
                    },
                    Log {
                        address: token,
                        data: ITIP20::Mint { to: owner, amount: U256::from(amount) }.encode_log_data(),
                    },
                ];
                let number = state.blocks.len() as u64;
                let mut preimage = b"tollgate-testchain faucet".to_vec();
                preimage.extend_from_slice(&chain_id.to_be_bytes());
                preimage.extend_from_slice(&number.to_be_bytes());
                preimage.extend_from_slice(token.as_slice());
                preimage.extend_from_slice(owner.as_slice());
                let hash = keccak256(preimage);
                let rec = TxRecord {
                    hash,
                    block_number: 0,
                    block_hash: B256::ZERO,
                    from: FAUCET,
                    to: Some(token),
                    fee_payer: FAUCET,
                    fee_token: None,
                    success: true,
                    gas_used: 51_000,
                    logs,
                    raw: None,
                    revert_reason: None,
                    revert_data: None,
                };
                let time = next_block_time(state);
                mine(state, vec![rec], time);
                hashes.push(hash);
            }
            tracing::info!(%owner, amount, tokens = hashes.len(), "testchain: faucet funded (NO REAL MONEY)");
            Ok(hashes)
        })
    }

    /// `testchain_increaseTime`: move the clock forward and mine an empty block at the new time,
    /// so `latest` shows it. Returns the new chain time.
    pub(crate) fn increase_time(&self, secs: u64) -> Result<u64, RpcError> {
        if secs > MAX_TIME_STEP {
            return Err(RpcError::invalid_params(format!(
                "increaseTime step too large (max {MAX_TIME_STEP} s)"
            )));
        }
        self.mutate(|state| {
            state.time_offset = state.time_offset.saturating_add(secs);
            let time = next_block_time(state);
            mine(state, Vec::new(), time);
            Ok(time.0)
        })
    }

    /// `eth_call`/`eth_estimateGas`: run `calls` from `from` against a throwaway copy of the
    /// ledger. Returns the last call's output.
    pub(crate) fn simulate(
        &self,
        from: Address,
        calls: &[(Address, Bytes)],
        for_estimate: bool,
    ) -> Result<Bytes, RpcError> {
        let state = self.lock();
        let now = chain_now(&state);
        // A real transaction would seed `open`'s nonce hash; eth_call has none (and reverts
        // like Tempo), while an estimate stands in for a transaction, so it gets a placeholder.
        let open_hash = for_estimate.then(|| keccak256(b"tollgate-testchain estimate"));
        let mut ex = Exec::new(self.env(now), state.ledger.clone(), from, open_hash);
        let mut out = Bytes::new();
        for (to, input) in calls {
            if *to != ESCROW && !self.inner.tokens.contains(to) && !for_estimate {
                // No code at that address: an EVM call succeeds and returns nothing.
                out = Bytes::new();
                continue;
            }
            out = ex.call(*to, input).map_err(RpcError::reverted)?;
        }
        Ok(out)
    }
}
