//! Restoring the money state into an empty Redis: from the book of record's lines (every
//! account's lifetime totals, every credit and charge key, every incarnation's high-water mark)
//! and the stopped nodes' journals (the batches they never had acknowledged). Used by
//! `tollgate book rebuild` (docs/book.md); nothing here runs on a live store.
//!
//! What it restores, and why each part: the totals (so `available = credited − debited`, with
//! no lease: every node is stopped, its leases are back in `available`); the credit keys (a
//! voucher replayed after the loss must stay a duplicate, never a second credit); the charge
//! keys (a deploy charge retried must not be taken twice); each incarnation's high-water mark,
//! marked released (a batch replayed from a journal is applied at most once and no lease is
//! granted to a dead incarnation); each node's epoch counter (a node's next start must not
//! reuse an epoch the book or a journal knows).

use std::collections::BTreeMap;

use super::{RedisStore, unavailable};
use crate::journal::JournalContent;
use crate::store::{Store, StoreError};
use crate::types::{LeaseGrant, LedgerEntry, SettleBatch, SettleError, SettleOutcome, Status};

/// The state the book's lines add up to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestoreSet {
    /// account → (credited, debited), p$.
    pub accounts: BTreeMap<String, (i64, i64)>,
    /// Credit key (the caller's, without `credit:`) → (account, amount).
    pub credits: BTreeMap<String, (String, i64)>,
    /// Charge key (without its kind) → (account, amount taken).
    pub charges: BTreeMap<String, (String, i64)>,
    /// (node, epoch) → the highest settle seq the book holds for it.
    pub incarnations: BTreeMap<(String, u64), u64>,
    /// node → the highest epoch seen.
    pub epochs: BTreeMap<String, u64>,
    /// For the settle keys of journal batches only (filled by the caller from the book): each
    /// key's (account, amount) lines, sorted, to check a journal batch against what was booked.
    pub settle_lines: BTreeMap<String, Vec<(String, i64)>>,
}

/// `<node>:<epoch>` (node ids never hold `:`).
fn node_epoch(s: &str) -> Option<(String, u64)> {
    let (node, epoch) = s.rsplit_once(':')?;
    (!node.is_empty() && !node.contains(':')).then_some(())?;
    Some((node.to_owned(), epoch.parse().ok()?))
}

impl RestoreSet {
    /// Takes one book line. A line whose key does not have its kind's shape is refused (the
    /// restore would be wrong without it).
    pub fn add(&mut self, l: &LedgerEntry) -> Result<(), String> {
        let bad = || format!("book line {:?} ({}): key not understood", l.key, l.kind);
        let totals = self.accounts.entry(l.account.clone()).or_default();
        match l.kind.as_str() {
            "credit" => {
                let key = l.key.strip_prefix("credit:").ok_or_else(bad)?;
                totals.0 = totals.0.checked_add(l.amount).ok_or_else(bad)?;
                self.credits
                    .insert(key.to_owned(), (l.account.clone(), l.amount));
            }
            "settle" => {
                let rest = l.key.strip_prefix("settle:").ok_or_else(bad)?;
                let (inc, seq) = rest.rsplit_once(':').ok_or_else(bad)?;
                let (node, epoch) = node_epoch(inc).ok_or_else(bad)?;
                let seq: u64 = seq.parse().map_err(|_| bad())?;
                totals.1 = totals.1.checked_add(l.amount).ok_or_else(bad)?;
                self.see_epoch(&node, epoch);
                let hwm = self.incarnations.entry((node, epoch)).or_default();
                *hwm = (*hwm).max(seq);
            }
            "release" | "expire" => {
                let rest = l
                    .key
                    .strip_prefix(l.kind.as_str())
                    .and_then(|r| r.strip_prefix(':'))
                    .ok_or_else(bad)?;
                // The book keys a lease return with `@<stream id>`; the ledger without.
                let inc = rest.split_once('@').map_or(rest, |(i, _)| i);
                let (node, epoch) = node_epoch(inc).ok_or_else(bad)?;
                self.see_epoch(&node, epoch);
                self.incarnations.entry((node, epoch)).or_default();
            }
            // Every other kind is a charge (`charge`, `write_off`, …): `<kind>:<key>`.
            kind => {
                let key = l
                    .key
                    .strip_prefix(kind)
                    .and_then(|r| r.strip_prefix(':'))
                    .ok_or_else(bad)?;
                totals.1 = totals.1.checked_add(l.amount).ok_or_else(bad)?;
                self.charges
                    .insert(key.to_owned(), (l.account.clone(), l.amount));
            }
        }
        Ok(())
    }

    /// A node's epoch seen in a journal (its incarnation line) or the book.
    pub fn see_epoch(&mut self, node: &str, epoch: u64) {
        let e = self.epochs.entry(node.to_owned()).or_default();
        *e = (*e).max(epoch);
    }
}

/// What a restore did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RestoreReport {
    pub accounts: usize,
    pub credits: usize,
    pub charges: usize,
    pub incarnations: usize,
    /// Journal batches the book did not hold, applied now (their usage debited).
    pub journal_batches_applied: usize,
    /// Journal batches the book already held (recorded so the node's replay is a duplicate).
    pub journal_batches_booked: usize,
    /// What could not be restored exactly, one sentence each (also logged).
    pub warnings: Vec<String>,
}

/// Every journal batch once, pending (never acknowledged) and kept (acknowledged, kept for the
/// book) alike: a batch may be in two journals (a node's own and a stand-in's).
pub(crate) fn journal_batches(journals: &[JournalContent]) -> Vec<&SettleBatch> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for journal in journals {
        for b in journal
            .pending
            .iter()
            .chain(journal.kept.iter().map(|k| &k.batch))
        {
            if seen.insert((b.node_id.as_str(), b.epoch, b.seq)) {
                out.push(b);
            }
        }
    }
    out
}

/// Journal batches (one Redis), or one shard's parts of them (a cluster), against the book's
/// lines of that store.
#[derive(Default)]
pub(crate) struct Plan {
    /// Per incarnation, its top booked batch as the journal holds it: its digest and a
    /// no-lease reply are restored with the mark, so the node's replay answers as a duplicate.
    pub booked_top: BTreeMap<(String, u64), SettleBatch>,
    /// Batches the book lacks, in (node, epoch, seq) order: applied after the restore.
    pub unbooked: Vec<SettleBatch>,
    /// Batches the book holds (a replay is a duplicate).
    pub booked: usize,
    /// (node, epoch, seq) of cluster parts below their shard's mark that the book lacks: the
    /// shard lost them after acknowledging them (named; the mark cannot take them again).
    pub missing: Vec<(String, u64, u64)>,
    pub warnings: Vec<String>,
}

/// Sorts `batches` into booked and unbooked by `set`'s high-water marks; a booked one whose
/// lines differ from the book's is named and left out (the book's lines stand). `shard`: the
/// cluster shard these are parts of (`None`: one Redis), whose parts always have lines there,
/// so one below the mark the book lacks is a part the shard lost.
pub(crate) fn plan(set: &RestoreSet, batches: Vec<SettleBatch>, shard: Option<usize>) -> Plan {
    let place = shard.map_or_else(String::new, |s| format!(" (shard {s})"));
    let mut out = Plan::default();
    for b in batches {
        let inc = (b.node_id.clone(), b.epoch);
        match set.incarnations.get(&inc) {
            Some(&top) if b.seq <= top => {
                let key = format!("settle:{}:{}:{}", b.node_id, b.epoch, b.seq);
                let mut mine: Vec<(String, i64)> = b
                    .entries
                    .iter()
                    .map(|e| (e.account.clone(), e.cost))
                    .collect();
                mine.sort();
                match set.settle_lines.get(&key) {
                    Some(booked) if *booked != mine => out.warnings.push(format!(
                        "journal batch {key}{place} differs from the book's lines (the store held other content): not applied; the book's lines stand"
                    )),
                    None if shard.is_some() && !b.entries.is_empty() => {
                        out.warnings.push(format!(
                            "journal batch {key}{place}: the book lacks its part although the shard's mark is past it (the shard lost it after acknowledging it): its usage is not restored"
                        ));
                        out.missing.push((b.node_id.clone(), b.epoch, b.seq));
                    }
                    _ => {
                        out.booked += 1;
                        if b.seq == top {
                            out.booked_top.insert(inc, b);
                        }
                    }
                }
            }
            _ => out.unbooked.push(b),
        }
    }
    out.unbooked
        .sort_by(|a, b| (&a.node_id, a.epoch, a.seq).cmp(&(&b.node_id, b.epoch, b.seq)));
    out
}

/// An account's hash as restored: its totals, no lease (every node is stopped).
pub(crate) fn account_cmd(
    key: String,
    credited: i64,
    debited: i64,
) -> Result<redis::Cmd, StoreError> {
    let avail = credited
        .checked_sub(debited)
        .ok_or_else(|| StoreError::Corrupt(format!("{key}: totals out of range")))?;
    let status = if avail > 0 { "active" } else { "suspended" };
    let mut cmd = redis::cmd("HSET");
    cmd.arg(key)
        .arg("credited")
        .arg(credited)
        .arg("debited")
        .arg(debited)
        .arg("avail")
        .arg(avail)
        .arg("leased")
        .arg(0)
        .arg("status")
        .arg(status)
        .arg("ver")
        .arg(1);
    Ok(cmd)
}

/// An incarnation's mark as restored: released (no lease is granted to a dead incarnation),
/// with the reply a replay of its top booked batch gets (no lease).
pub(crate) fn incarnation_cmd(
    key: String,
    hwm: u64,
    top: Option<&SettleBatch>,
    set: &RestoreSet,
) -> Result<redis::Cmd, StoreError> {
    let mut cmd = redis::cmd("HSET");
    cmd.arg(key).arg("hwm").arg(hwm).arg("released").arg(1);
    if let Some(b) = top {
        let reply: Vec<LeaseGrant> = b
            .entries
            .iter()
            .map(|e| {
                let avail = set
                    .accounts
                    .get(&e.account)
                    .map_or(0, |(c, d)| c.saturating_sub(*d));
                LeaseGrant {
                    account: e.account.clone(),
                    lease: 0,
                    prev: 0,
                    available: avail,
                    status: if avail > 0 {
                        Status::Active
                    } else {
                        Status::Suspended
                    },
                    version: 1,
                }
            })
            .collect();
        let reply =
            serde_json::to_string(&reply).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        cmd.arg("digest").arg(b.digest()).arg("reply").arg(reply);
    }
    Ok(cmd)
}

/// The highest acknowledged seq per incarnation over all journals.
pub(crate) fn acked_tops(journals: &[JournalContent]) -> BTreeMap<(String, u64), u64> {
    let mut acked: BTreeMap<(String, u64), u64> = BTreeMap::new();
    for journal in journals {
        for (inc, top) in &journal.acked {
            let a = acked.entry(inc.clone()).or_default();
            *a = (*a).max(*top);
        }
    }
    acked
}

/// The warning for acknowledged batches a rebuild could not restore.
pub(crate) fn lost_acked(node: &str, epoch: u64, from: u64, to: u64) -> String {
    format!(
        "node {node} epoch {epoch}: batches {from} to {to} were applied and acknowledged but neither in the book nor in a journal: their usage is not restored"
    )
}

/// `s` as a literal inside a SCAN pattern.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Money key families that must be absent before a restore (other families under the same
/// prefix, such as routes, may exist).
const MONEY_PATTERNS: [&str; 6] = [
    "acct:*", "lease:*", "inc:*", "epoch:*", "credits", "charges",
];

impl RedisStore {
    /// Writes `set` into this Redis, then applies the journals' unacknowledged batches.
    /// Refused (nothing written) when any money key exists already under the prefix, or a
    /// rebuild was left unfinished (its marker key is still there: then give it an empty store
    /// again and rerun; the book and the journals are never changed by a rebuild).
    pub async fn restore(
        &self,
        set: &RestoreSet,
        journals: &[JournalContent],
    ) -> Result<RestoreReport, StoreError> {
        let mut c = self.conn.clone();
        let p = &self.prefix;
        let marker = format!("{p}:restore:unfinished");
        if redis::cmd("EXISTS")
            .arg(&marker)
            .query_async::<i64>(&mut c)
            .await
            .map_err(unavailable)?
            > 0
        {
            return Err(StoreError::Invalid(format!(
                "a rebuild into this Redis did not finish ({marker} is set): delete the money keys under {p}: (or start an empty Redis) and run it again"
            )));
        }
        for pat in MONEY_PATTERNS {
            let exists = if pat.contains('*') {
                self.any_key(pat).await?
            } else {
                redis::cmd("EXISTS")
                    .arg(format!("{p}:{pat}"))
                    .query_async::<i64>(&mut c)
                    .await
                    .map_err(unavailable)?
                    > 0
            };
            if exists {
                return Err(StoreError::Invalid(format!(
                    "Redis already holds money keys ({p}:{pat}): a rebuild only fills an empty store"
                )));
            }
        }
        let _: () = redis::cmd("SET")
            .arg(&marker)
            .arg(1)
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        let mut report = RestoreReport {
            accounts: set.accounts.len(),
            credits: set.credits.len(),
            charges: set.charges.len(),
            incarnations: set.incarnations.len(),
            ..RestoreReport::default()
        };
        let warn = |report: &mut RestoreReport, w: String| {
            tracing::warn!("{w}");
            report.warnings.push(w);
        };

        // Journal batches: which the book holds (a replay must get the duplicate answer, so the
        // top one's digest and a no-lease reply are recorded with the high-water mark) and
        // which it does not (applied below, in order).
        let batches = journal_batches(journals);
        let mut hwms = set.incarnations.clone();
        let mut epochs = set.epochs.clone();
        for b in &batches {
            let e = epochs.entry(b.node_id.clone()).or_default();
            *e = (*e).max(b.epoch);
        }
        let planned = plan(set, batches.into_iter().cloned().collect(), None);
        report.journal_batches_booked = planned.booked;
        for w in planned.warnings {
            warn(&mut report, w);
        }

        // Written in chunks (a Redis with millions of keys must not meet one reply timeout).
        let mut cmds: Vec<redis::Cmd> = Vec::new();
        for (id, (credited, debited)) in &set.accounts {
            cmds.push(account_cmd(format!("{p}:acct:{id}"), *credited, *debited)?);
        }
        for (key, (id, amount)) in &set.credits {
            let mut cmd = redis::cmd("HSET");
            cmd.arg(format!("{p}:credits"))
                .arg(key)
                .arg(format!("{id}|{amount}"));
            cmds.push(cmd);
        }
        for (key, (id, taken)) in &set.charges {
            // The amount asked is not in the ledger: restored as what was taken, so a retry
            // with the first amount is a duplicate for an all-or-nothing charge and a refused
            // mismatch (nothing moves) for a partial one.
            let mut cmd = redis::cmd("HSET");
            cmd.arg(format!("{p}:charges"))
                .arg(key)
                .arg(format!("{id}|{taken}|{taken}"));
            cmds.push(cmd);
        }
        for ((node, epoch), hwm) in &hwms {
            cmds.push(incarnation_cmd(
                format!("{p}:inc:{node}:{epoch}"),
                *hwm,
                planned.booked_top.get(&(node.clone(), *epoch)),
                set,
            )?);
        }
        for (node, epoch) in &epochs {
            let mut cmd = redis::cmd("SET");
            cmd.arg(format!("{p}:epoch:{node}")).arg(epoch);
            cmds.push(cmd);
        }
        for chunk in cmds.chunks(1000) {
            let mut pipe = redis::pipe();
            for cmd in chunk {
                pipe.add_command(cmd.clone()).ignore();
            }
            pipe.query_async::<()>(&mut c).await.map_err(unavailable)?;
        }

        // The journals' batches the book lacks, in order per incarnation. A seq past the next
        // one means batches between were applied and acknowledged but not yet booked: named,
        // and the mark moved so this one applies.
        for b in &planned.unbooked {
            let held = hwms.entry((b.node_id.clone(), b.epoch)).or_default();
            if b.seq > *held + 1 {
                warn(
                    &mut report,
                    format!(
                        "node {} epoch {}: batches {} to {} were neither in the book nor in a journal: their usage is not restored",
                        b.node_id,
                        b.epoch,
                        *held + 1,
                        b.seq - 1
                    ),
                );
            }
            if b.seq > *held + 1 {
                let _: () = redis::cmd("HSET")
                    .arg(format!("{p}:inc:{}:{}", b.node_id, b.epoch))
                    .arg("hwm")
                    .arg(b.seq - 1)
                    .arg("released")
                    .arg(1)
                    .query_async(&mut c)
                    .await
                    .map_err(unavailable)?;
            }
            match self.settle(b).await {
                Ok(SettleOutcome::Applied(_)) => report.journal_batches_applied += 1,
                Ok(SettleOutcome::Duplicate(_)) => report.journal_batches_booked += 1,
                Err(SettleError::Unavailable(e)) => return Err(StoreError::Unavailable(e)),
                Err(e) => warn(
                    &mut report,
                    format!(
                        "journal batch {}:{}:{} refused: {e}",
                        b.node_id, b.epoch, b.seq
                    ),
                ),
            }
            *held = (*held).max(b.seq);
        }
        // Acknowledged past everything restored: applied by the lost store, then neither
        // copied by the book nor kept by a journal (a journal that dropped its oldest kept
        // batches, or a node whose journal is missing here).
        for ((node, epoch), top) in acked_tops(journals) {
            let held = hwms.get(&(node.clone(), epoch)).copied().unwrap_or(0);
            if top > held {
                warn(&mut report, lost_acked(&node, epoch, held + 1, top));
            }
        }
        Ok(report)
    }

    /// After a rebuild's last write (the caller declares the book first): the store is whole.
    pub async fn finish_restore(&self) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::cmd("DEL")
            .arg(format!("{}:restore:unfinished", self.prefix))
            .query_async::<i64>(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Whether any key matches `<prefix>:<pat>` (a full SCAN).
    async fn any_key(&self, pat: &str) -> Result<bool, StoreError> {
        let mut c = self.conn.clone();
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}:{pat}", glob_escape(&self.prefix)))
                .arg("COUNT")
                .arg(10_000)
                .query_async(&mut c)
                .await
                .map_err(unavailable)?;
            if !keys.is_empty() {
                return Ok(true);
            }
            if next == 0 {
                return Ok(false);
            }
            cursor = next;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn line(kind: &str, key: &str, account: &str, amount: i64) -> LedgerEntry {
        LedgerEntry {
            kind: kind.into(),
            key: key.into(),
            account: account.into(),
            amount,
            requests: 0,
            cpu_us: 0,
            deploys: 0,
            rows_read: 0,
            rows_written: 0,
        }
    }

    #[test]
    fn book_lines_add_up_to_totals_keys_and_marks() {
        let mut s = RestoreSet::default();
        s.add(&line("credit", "credit:ch1:100", "a", 100)).unwrap();
        s.add(&line("settle", "settle:n-1:3:7", "a", 10)).unwrap();
        s.add(&line("settle", "settle:n-1:3:5", "a", 5)).unwrap();
        s.add(&line("charge", "charge:deploy:k", "a", 20)).unwrap();
        s.add(&line("write_off", "write_off:w", "a", 1)).unwrap();
        s.add(&line("release", "release:n-1:4@17-0", "a", 0))
            .unwrap();
        s.add(&line("expire", "expire:n-2:9", "b", 0)).unwrap();
        assert_eq!(s.accounts["a"], (100, 36));
        assert_eq!(s.accounts["b"], (0, 0));
        assert_eq!(s.credits["ch1:100"], ("a".into(), 100));
        assert_eq!(s.charges["deploy:k"], ("a".into(), 20));
        assert_eq!(s.charges["w"], ("a".into(), 1));
        assert_eq!(s.incarnations[&("n-1".into(), 3)], 7);
        assert_eq!(s.incarnations[&("n-1".into(), 4)], 0);
        assert_eq!(s.epochs["n-1"], 4);
        assert_eq!(s.epochs["n-2"], 9);
        assert!(s.add(&line("settle", "settle:bad", "a", 1)).is_err());
        assert!(s.add(&line("credit", "nope", "a", 1)).is_err());
    }
}
