//! Restoring the money state into an empty Redis Cluster (`tollgate book rebuild`): the state
//! one Redis gets (see `redis_store::restore` for what and why), laid out in the shards.
//!
//! - The book copies each shard's stream with its own rows, so it hands over one
//!   [`RestoreSet`] per shard: an account's totals, its credit and charge records and each
//!   incarnation's mark in that shard are restored in that shard, exactly as that stream adds
//!   up.
//! - Credit and charge keys are claimed again in their key's own shard (`claims`), so a key
//!   replayed for another account or amount stays refused.
//! - A journal batch is split by shard as the settle path splits it; each part is checked
//!   against its shard's book lines and applied there if the book lacks it.
//! - Every node's epoch counter only ever moves up.
//!
//! Each shard's writes go in pipelines followed by a `WAIT`: the rebuild is whole only once
//! replicas hold it.

use std::collections::{BTreeMap, BTreeSet};

use futures_util::future::join_all;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};

use super::{ClusterStore, REPLICA_WAIT, shard_of};
use crate::journal::JournalContent;
use crate::redis_store::restore::{
    RestoreReport, RestoreSet, account_cmd, acked_tops, incarnation_cmd, journal_batches,
    lost_acked, plan,
};
use crate::redis_store::{entries_json, unavailable};
use crate::store::StoreError;
use crate::types::{SettleError, SettleOutcome};

/// A shard's money key families (after its tag): any of them makes a rebuild refuse. The
/// book's marks (`ledger…`) and replication markers may be there already.
const MONEY_FAMILIES: [&str; 8] = [
    "acct:", "lease:", "leases", "inc:", "incacct:", "credits", "charges", "claims",
];

/// Sets a counter to `ARGV[1]` unless it holds more already.
const RAISE: &str = r#"
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 0
"#;

/// Keys of a slot listed at most (past it the shard counts as not empty).
const MAX_SLOT_KEYS: i64 = 100_000;

fn read<T: redis::FromRedisValue>(v: redis::Value) -> Result<T, StoreError> {
    redis::from_redis_value(v).map_err(|e| StoreError::Unavailable(e.to_string()))
}

/// Refuses restore sets (one per shard stream, in order) that were not laid out in `shards`
/// shards: every account's lines must be in its own shard's stream.
pub fn check_restore_layout(sets: &[RestoreSet], shards: u32) -> Result<(), StoreError> {
    if sets.len() != shards as usize {
        return Err(StoreError::Invalid(format!(
            "the book was read as {} shard streams; this cluster's money is laid out in {shards} shards",
            sets.len()
        )));
    }
    for (s, set) in sets.iter().enumerate() {
        if let Some(id) = set
            .accounts
            .keys()
            .find(|id| shard_of(id, shards) as usize != s)
        {
            return Err(StoreError::Invalid(format!(
                "the book holds lines of account {id} in shard {s}'s stream, but with {shards} shards it lives in shard {}: the book was written under another layout (set redis.money_shards as it was)",
                shard_of(id, shards)
            )));
        }
    }
    Ok(())
}

impl ClusterStore {
    /// One key for the whole cluster's rebuild.
    fn restore_marker(&self) -> String {
        format!("{{{}}}:restore:unfinished", self.prefix)
    }

    /// Sends `cmds`, all in the slot of `key`, in pipelines of 1,000, each with a `WAIT` for
    /// the replicas.
    async fn write_all(&self, key: &str, cmds: &[redis::Cmd]) -> Result<(), StoreError> {
        for chunk in cmds.chunks(1000) {
            let mut pipe = redis::pipe();
            for cmd in chunk {
                pipe.add_command(cmd.clone()).ignore();
            }
            if self.replica_acks > 0 {
                pipe.cmd("WAIT")
                    .arg(self.replica_acks)
                    .arg(REPLICA_WAIT.as_millis() as u64);
            }
            let mut c = self.conn.clone();
            let replies: Vec<redis::Value> = pipe.query_async(&mut c).await.map_err(unavailable)?;
            if self.replica_acks > 0 {
                match replies.last() {
                    Some(redis::Value::Int(n)) if *n >= i64::from(self.replica_acks) => {}
                    other => {
                        return Err(StoreError::Unavailable(format!(
                            "restore writes in the slot of {key} reached {other:?} replicas in {REPLICA_WAIT:?}, {} needed",
                            self.replica_acks
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// A money key of shard `s`, if it holds any: the keys of its slot, listed on its master.
    async fn shard_money_key(&self, s: u32) -> Result<Option<String>, StoreError> {
        let tag = self.tag(s);
        let mut c = self.conn.clone();
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(&tag)
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        let at = || {
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::with_key(
                &tag,
                SlotAddr::Master,
            )))
        };
        let mut count = redis::cmd("CLUSTER");
        count.arg("COUNTKEYSINSLOT").arg(slot);
        let n: i64 = read(c.route_command(count, at()).await.map_err(unavailable)?)?;
        if n == 0 {
            return Ok(None);
        }
        let mut list = redis::cmd("CLUSTER");
        list.arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(n.min(MAX_SLOT_KEYS));
        let keys: Vec<String> = read(c.route_command(list, at()).await.map_err(unavailable)?)?;
        let head = format!("{tag}:");
        let money = keys.into_iter().find(|k| {
            k.strip_prefix(&head)
                .is_some_and(|rest| MONEY_FAMILIES.iter().any(|f| rest.starts_with(f)))
        });
        if money.is_none() && n > MAX_SLOT_KEYS {
            return Ok(Some(format!("{n} keys in the slot of {tag}")));
        }
        Ok(money)
    }

    /// Writes `sets` (one per shard, in shard order, as the book's streams add up) into this
    /// empty cluster, then applies the parts of the journals' batches the book lacks. Refused
    /// (nothing written) when a shard holds any money key, the book's layout differs from the
    /// cluster's, or an earlier rebuild did not finish.
    pub async fn restore(
        &self,
        sets: &[RestoreSet],
        journals: &[JournalContent],
    ) -> Result<RestoreReport, StoreError> {
        let shards = self.shards as usize;
        check_restore_layout(sets, self.shards)?;
        let marker = self.restore_marker();
        let mut c = self.conn.clone();
        if redis::cmd("EXISTS")
            .arg(&marker)
            .query_async::<i64>(&mut c)
            .await
            .map_err(unavailable)?
            > 0
        {
            return Err(StoreError::Invalid(format!(
                "a rebuild into this cluster did not finish ({marker} is set): flush its masters (or start an empty cluster) and run it again"
            )));
        }
        for found in join_all((0..self.shards).map(|s| self.shard_money_key(s))).await {
            if let Some(k) = found? {
                return Err(StoreError::Invalid(format!(
                    "the cluster already holds money keys ({k}): a rebuild only fills an empty store"
                )));
            }
        }
        // Claimed, not just set (of two rebuilds run at once, one goes on), and held by a
        // replica before anything else is written.
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(&marker).arg(1).arg("NX");
        if self.replica_acks > 0 {
            pipe.cmd("WAIT")
                .arg(self.replica_acks)
                .arg(REPLICA_WAIT.as_millis() as u64);
        }
        let mut c = self.conn.clone();
        let replies: Vec<redis::Value> = pipe.query_async(&mut c).await.map_err(unavailable)?;
        if matches!(replies.first(), Some(redis::Value::Nil) | None) {
            return Err(StoreError::Invalid(format!(
                "another rebuild into this cluster is running ({marker} is set)"
            )));
        }
        if self.replica_acks > 0
            && !matches!(replies.get(1), Some(redis::Value::Int(n)) if *n >= i64::from(self.replica_acks))
        {
            return Err(StoreError::Unavailable(format!(
                "{marker} was not acknowledged by a replica (nothing else was written): once every master has one, delete it and run the rebuild again"
            )));
        }

        let mut report = RestoreReport::default();
        let warn = |report: &mut RestoreReport, w: String| {
            tracing::warn!("{w}");
            report.warnings.push(w);
        };
        let batches = journal_batches(journals);
        let mut epochs: BTreeMap<String, u64> = BTreeMap::new();
        let mut see = |node: &str, epoch: u64| {
            let e = epochs.entry(node.to_owned()).or_default();
            *e = (*e).max(epoch);
        };
        for set in sets {
            for (node, epoch) in &set.epochs {
                see(node, *epoch);
            }
        }
        // The journals' incarnations are marked released in every shard: a replay of one of
        // their batches is never granted a lease.
        let mut journal_incs: BTreeSet<(String, u64)> = BTreeSet::new();
        for inc in journals.iter().filter_map(|j| j.incarnation.as_ref()) {
            journal_incs.insert((inc.node_id.clone(), inc.epoch));
            see(&inc.node_id, inc.epoch);
        }
        for b in &batches {
            journal_incs.insert((b.node_id.clone(), b.epoch));
            see(&b.node_id, b.epoch);
        }
        let mut parts = vec![Vec::new(); shards];
        for b in &batches {
            for (s, p) in self.parts(b) {
                parts[s as usize].push(p);
            }
        }
        let plans: Vec<_> = sets
            .iter()
            .zip(parts)
            .enumerate()
            .map(|(s, (set, p))| plan(set, p, Some(s)))
            .collect();
        let unbooked: BTreeSet<(&str, u64, u64)> = plans
            .iter()
            .flat_map(|p| {
                p.unbooked
                    .iter()
                    .map(|b| (b.node_id.as_str(), b.epoch, b.seq))
                    .chain(p.missing.iter().map(|(n, e, s)| (n.as_str(), *e, *s)))
            })
            .collect();
        report.journal_batches_booked = batches
            .iter()
            .filter(|b| !unbooked.contains(&(b.node_id.as_str(), b.epoch, b.seq)))
            .count();
        for w in plans.iter().flat_map(|p| p.warnings.iter()) {
            warn(&mut report, w.clone());
        }

        let mut cmds: Vec<Vec<redis::Cmd>> = vec![Vec::new(); shards];
        let mut incarnations: BTreeSet<&(String, u64)> = BTreeSet::new();
        for (s, (set, planned)) in sets.iter().zip(&plans).enumerate() {
            let tag = self.tag(s as u32);
            report.accounts += set.accounts.len();
            report.credits += set.credits.len();
            report.charges += set.charges.len();
            for (id, (credited, debited)) in &set.accounts {
                cmds[s].push(account_cmd(
                    format!("{tag}:acct:{id}"),
                    *credited,
                    *debited,
                )?);
            }
            // Each key's record in the account's shard, and its claim in the key's own. A charge
            // is restored as what was taken (the amount asked is not in the ledger), as on one
            // Redis, in the record and the claim alike.
            let records = set
                .credits
                .iter()
                .map(|(key, (id, amount))| {
                    (
                        "credits",
                        "credit",
                        key,
                        format!("{id}|{amount}"),
                        format!("{id}|{amount}"),
                    )
                })
                .chain(set.charges.iter().map(|(key, (id, taken))| {
                    (
                        "charges",
                        "charge",
                        key,
                        format!("{id}|{taken}|{taken}"),
                        format!("{id}|{taken}"),
                    )
                }));
            for (family, kind, key, record, claim) in records {
                let mut cmd = redis::cmd("HSET");
                cmd.arg(format!("{tag}:{family}")).arg(key).arg(record);
                cmds[s].push(cmd);
                let home = self.shard(key);
                let mut cmd = redis::cmd("HSET");
                cmd.arg(format!("{}:claims", self.tag(home)))
                    .arg(format!("{kind}:{key}"))
                    .arg(claim);
                cmds[home as usize].push(cmd);
            }
            let incs: BTreeSet<&(String, u64)> =
                set.incarnations.keys().chain(&journal_incs).collect();
            for inc in incs {
                incarnations.insert(inc);
                cmds[s].push(incarnation_cmd(
                    format!("{tag}:inc:{}:{}", inc.0, inc.1),
                    set.incarnations.get(inc).copied().unwrap_or(0),
                    planned.booked_top.get(inc),
                    set,
                )?);
            }
        }
        report.incarnations = sets
            .iter()
            .flat_map(|s| s.incarnations.keys())
            .collect::<BTreeSet<_>>()
            .len();
        let writes = cmds
            .iter()
            .enumerate()
            .map(|(s, cmds)| async move { self.write_all(&self.tag(s as u32), cmds).await });
        for w in join_all(writes).await {
            w?;
        }
        for (node, epoch) in &epochs {
            let key = format!("{{{}:n:{node}}}:epoch", self.prefix);
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(RAISE).arg(1).arg(&key).arg(epoch);
            self.write_all(&key, &[cmd]).await?;
        }

        // The parts the book lacks, in order per shard. A shard sees only the batches with
        // lines for it, so no gap between its seqs is a loss by itself (unlike one Redis).
        let mut applied: BTreeSet<(&str, u64, u64)> = BTreeSet::new();
        for (s, planned) in plans.iter().enumerate() {
            for part in &planned.unbooked {
                let json =
                    entries_json(&part.entries).map_err(|e| StoreError::Invalid(e.to_string()))?;
                match self.settle_part(s as u32, part.clone(), json).await {
                    Ok(Ok(SettleOutcome::Applied(_))) => {
                        applied.insert((part.node_id.as_str(), part.epoch, part.seq));
                    }
                    Ok(Ok(SettleOutcome::Duplicate(_))) => {}
                    Err(SettleError::Unavailable(e)) => return Err(StoreError::Unavailable(e)),
                    Ok(Err(e)) | Err(e) => warn(
                        &mut report,
                        format!(
                            "journal batch {}:{}:{} refused in shard {s}: {e}",
                            part.node_id, part.epoch, part.seq
                        ),
                    ),
                }
            }
        }
        report.journal_batches_applied = applied.len();
        // Acknowledged past everything restored: applied by the lost shards, then neither
        // copied by the book nor kept by a journal. (A shard's part of a batch below the
        // highest seq restored cannot be told apart from a batch with no line for it.)
        for ((node, epoch), top) in acked_tops(journals) {
            let inc = (node.clone(), epoch);
            let held = sets
                .iter()
                .filter_map(|s| s.incarnations.get(&inc).copied())
                .chain(
                    batches
                        .iter()
                        .filter(|b| b.node_id == node && b.epoch == epoch)
                        .map(|b| b.seq),
                )
                .max()
                .unwrap_or(0);
            if top > held {
                warn(&mut report, lost_acked(&node, epoch, held + 1, top));
            }
        }
        Ok(report)
    }

    /// After a rebuild's last write (the caller declares the book first): the cluster is
    /// whole.
    pub async fn finish_restore(&self) -> Result<(), StoreError> {
        let marker = self.restore_marker();
        let mut del = redis::cmd("DEL");
        del.arg(&marker);
        self.write_all(&marker, &[del]).await
    }
}
