//! The chain's whole state, and its durable JSON file.
//!
//! Everything lives in one serde value so that a restart with the same state file sees the same
//! balances, channels, blocks, receipts and replay memory.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;

use alloy::primitives::{Address, B256, Bloom, Bytes, Log, U256};
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// Bumped when the file layout changes incompatibly; a mismatching file is refused, not rewritten.
pub(crate) const STATE_VERSION: u32 = 1;

/// Token balances, allowances and escrow channels: the part of the state a transaction's calls
/// change. It is cloned per transaction so a revert can drop every call's effect at once.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Ledger {
    /// token → owner → base units.
    pub balances: BTreeMap<Address, BTreeMap<Address, u128>>,
    /// token → owner → spender → base units.
    pub allowances: BTreeMap<Address, BTreeMap<Address, BTreeMap<Address, u128>>>,
    /// token → total minted.
    pub supply: BTreeMap<Address, u128>,
    /// Open escrow channels by id. Closed or withdrawn channels are removed, as on Tempo.
    pub channels: BTreeMap<B256, ChannelRecord>,
}

impl Ledger {
    pub fn balance(&self, token: Address, owner: Address) -> u128 {
        self.balances
            .get(&token)
            .and_then(|m| m.get(&owner))
            .copied()
            .unwrap_or(0)
    }

    pub fn set_balance(&mut self, token: Address, owner: Address, amount: u128) {
        let per_token = self.balances.entry(token).or_default();
        if amount == 0 {
            per_token.remove(&owner);
        } else {
            per_token.insert(owner, amount);
        }
    }

    pub fn allowance(&self, token: Address, owner: Address, spender: Address) -> u128 {
        self.allowances
            .get(&token)
            .and_then(|m| m.get(&owner))
            .and_then(|m| m.get(&spender))
            .copied()
            .unwrap_or(0)
    }

    pub fn set_allowance(&mut self, token: Address, owner: Address, spender: Address, v: u128) {
        let per_owner = self
            .allowances
            .entry(token)
            .or_default()
            .entry(owner)
            .or_default();
        if v == 0 {
            per_owner.remove(&spender);
        } else {
            per_owner.insert(spender, v);
        }
    }
}

/// One open channel: the descriptor it was opened with plus its mutable state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ChannelRecord {
    pub payer: Address,
    pub payee: Address,
    pub operator: Address,
    pub token: Address,
    pub salt: B256,
    pub authorized_signer: Address,
    pub expiring_nonce_hash: B256,
    pub settled: u128,
    pub deposit: u128,
    pub close_requested_at: u32,
}

/// A mined block. The header fields that are constant on this chain are filled in when the
/// block is rendered; `hash` is the real hash of that rendered header.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct BlockRecord {
    pub number: u64,
    pub hash: B256,
    pub parent_hash: B256,
    pub timestamp: u64,
    pub timestamp_millis_part: u64,
    pub gas_used: u64,
    pub logs_bloom: Bloom,
    pub transactions_root: B256,
    pub receipts_root: B256,
    pub transactions: Vec<B256>,
}

/// A mined transaction and its receipt data.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TxRecord {
    pub hash: B256,
    pub block_number: u64,
    pub block_hash: B256,
    pub from: Address,
    pub to: Option<Address>,
    pub fee_payer: Address,
    pub fee_token: Option<Address>,
    pub success: bool,
    pub gas_used: u64,
    pub logs: Vec<Log>,
    /// The signed 0x76 bytes; `None` for faucet mints, which have no real transaction.
    pub raw: Option<Bytes>,
    /// Decoded revert reason (e.g. `AmountNotIncreasing()`), for debugging failed txs.
    pub revert_reason: Option<String>,
    pub revert_data: Option<Bytes>,
}

/// The chain's complete state.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct State {
    pub version: u32,
    pub chain_id: u64,
    /// Seconds added to the system clock by `testchain_increaseTime`.
    pub time_offset: u64,
    pub ledger: Ledger,
    /// Sequential nonces: sender → nonce key → next nonce. Key 0 is the protocol nonce.
    pub nonces: BTreeMap<Address, BTreeMap<U256, u64>>,
    /// Expiring-nonce hashes already used → their validBefore. Entries are dropped once
    /// validBefore has passed, because such a transaction is refused as expired anyway.
    pub seen_expiring: BTreeMap<B256, u64>,
    pub blocks: Vec<BlockRecord>,
    pub txs: BTreeMap<B256, TxRecord>,
}

impl State {
    pub fn new(chain_id: u64) -> Self {
        Self {
            version: STATE_VERSION,
            chain_id,
            time_offset: 0,
            ledger: Ledger::default(),
            nonces: BTreeMap::new(),
            seen_expiring: BTreeMap::new(),
            blocks: Vec::new(),
            txs: BTreeMap::new(),
        }
    }

    pub fn nonce(&self, sender: Address, key: U256) -> u64 {
        self.nonces
            .get(&sender)
            .and_then(|m| m.get(&key))
            .copied()
            .unwrap_or(0)
    }

    /// Reads a state file, refusing one that belongs to another chain id or layout.
    pub fn load(path: &Path, chain_id: u64) -> anyhow::Result<Option<Self>> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let state: State = serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing test chain state {}", path.display()))?;
        if state.version != STATE_VERSION {
            bail!(
                "{}: state version {} is not {STATE_VERSION}; delete the file to start over",
                path.display(),
                state.version
            );
        }
        if state.chain_id != chain_id {
            bail!(
                "{}: state is for chain id {}, configured chain id is {chain_id}",
                path.display(),
                state.chain_id
            );
        }
        if state.blocks.is_empty() {
            bail!("{}: state has no genesis block", path.display());
        }
        Ok(Some(state))
    }

    /// Writes the state atomically: a crash leaves either the old or the new file, never half.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let json = serde_json::to_vec(self).context("serializing test chain state")?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = Path::new(&tmp_name);
        {
            let mut f =
                fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
            f.write_all(&json)
                .with_context(|| format!("writing {}", tmp.display()))?;
            f.sync_all()
                .with_context(|| format!("syncing {}", tmp.display()))?;
        }
        fs::rename(tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(())
    }
}
