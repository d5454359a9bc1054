//! The node's settle journal: every batch is appended and fsynced *before* its first send, and
//! acknowledged after the store answered. After a crash, the unacknowledged batches are sent
//! again with the same bytes (same `(node, epoch, seq)`), which the store applies at most once.
//!
//! An acknowledged batch stays in the journal (*kept*) until the book of record holds it
//! (docs/book.md): should the store lose its data before the book copied the batch, `book
//! rebuild` applies it from here. Without a book, kept batches are dropped at the next round.
//!
//! Format: JSON lines, `{"batch":{…}}`, `{"ack":{"node_id":…,"epoch":…,"seq":…}}`,
//! `{"kept":{…}}` (a kept batch, written by compaction), `{"abandon":{…}}` (a batch given up
//! unapplied: its usage went back to be cut again). A torn last line (crash mid-write) is
//! ignored: its batch was never sent.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::types::{Incarnation, LedgerPos, SettleBatch};

/// Kept batches a journal holds at most (the oldest go first, and a rebuild names them if the
/// book never got them): about 200 s of a busy node's rounds while the book cannot copy.
pub const MAX_KEPT: usize = 4096;

#[derive(Serialize, Deserialize)]
struct Ack {
    node_id: String,
    epoch: u64,
    seq: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Line {
    Batch(SettleBatch),
    Ack(Ack),
    /// The incarnation that writes this journal (so the next one can release its leases).
    Incarnation(Incarnation),
    /// An acknowledged batch the book of record may not hold yet.
    Kept(SettleBatch),
    /// A batch that was never applied and is given up.
    Abandon(Ack),
}

/// A journal's content.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JournalContent {
    /// The incarnation that wrote it last (its leases are to be released).
    pub incarnation: Option<Incarnation>,
    /// Batches never acknowledged, oldest first.
    pub pending: Vec<SettleBatch>,
    /// Acknowledged batches kept until the book of record holds them, oldest first (at most
    /// [`MAX_KEPT`]).
    pub kept: Vec<SettleBatch>,
    /// The highest acknowledged seq per incarnation `(node, epoch)` (kept across compaction
    /// for the current and the previous incarnation): what the store had applied, so that
    /// `book rebuild` can say what a book that lagged is missing.
    pub acked: BTreeMap<(String, u64), u64>,
}

fn same(b: &SettleBatch, a: &Ack) -> bool {
    b.node_id == a.node_id && b.epoch == a.epoch && b.seq == a.seq
}

/// Appends `b` to `kept`, dropping the oldest past [`MAX_KEPT`].
fn keep<T>(kept: &mut Vec<T>, b: T) {
    kept.push(b);
    let extra = kept.len().saturating_sub(MAX_KEPT);
    if extra > 0 {
        kept.drain(..extra);
    }
}

/// Reads a journal's whole lines. A line that does not parse is skipped: only a torn final
/// line can (a crash mid-write; its batch was never sent), and `Journal::open` cuts it.
pub fn parse_journal(bytes: &[u8]) -> JournalContent {
    let mut c = JournalContent::default();
    for line in bytes.split(|&b| b == b'\n') {
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Line>(line) {
            Ok(Line::Batch(b)) => c.pending.push(b),
            Ok(Line::Ack(a)) => {
                if let Some(i) = c.pending.iter().position(|b| same(b, &a)) {
                    keep(&mut c.kept, c.pending.remove(i));
                }
                c.pending.retain(|b| !same(b, &a));
                let top = c.acked.entry((a.node_id, a.epoch)).or_default();
                *top = (*top).max(a.seq);
            }
            Ok(Line::Kept(b)) => keep(&mut c.kept, b),
            Ok(Line::Abandon(a)) => c.pending.retain(|b| !same(b, &a)),
            Ok(Line::Incarnation(i)) => c.incarnation = Some(i),
            Err(e) => tracing::warn!(error = %e, "ignoring a journal line that does not parse"),
        }
    }
    c
}

pub struct Journal {
    /// Held while open (see `open`).
    _lock: File,
    path: PathBuf,
    file: File,
    /// Appended but not yet acknowledged, in order.
    pending: Vec<SettleBatch>,
    incarnation: Option<Incarnation>,
    /// Acknowledged batches the book of record may not hold yet, oldest first, each with the
    /// ledger's last entry read after its acknowledgement (once read): the batch's own entry
    /// is at or before it, so a book mark at or past it means the book holds the batch.
    kept: Vec<(SettleBatch, Option<LedgerPos>)>,
    /// The highest acknowledged seq per incarnation (see [`JournalContent::acked`]).
    acked: BTreeMap<(String, u64), u64>,
    /// Bytes appended since the last compaction (rewriting the kept batches at every ack
    /// would cost O(kept) each time: compaction waits for a drop, or for this to grow).
    appended: u64,
    max_kept: usize,
    /// Tests: stop a compaction after its n-th durable step (1: the side file written, 2: the
    /// rename), as a crash there would.
    #[cfg(test)]
    crash_after_step: Option<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("journal {path}: {0}", path = .1)]
    Encode(serde_json::Error, String),
    /// Another live process (for example the old one during a zero-downtime upgrade) still
    /// owns this journal; it is free once that process has settled and exited.
    #[error("journal {path} is in use by another process")]
    Locked { path: String },
}

impl Journal {
    /// Opens (or creates) the journal and loads what was never acknowledged.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        let io = |source| JournalError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        // One owner at a time: two processes appending to (and compacting) one journal would
        // lose batches. The lock lives on a sidecar file because compaction replaces the journal.
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(JournalError::Locked {
                    path: path.display().to_string(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let mut content = JournalContent::default();
        if path.exists() {
            // Cut a torn last line (crash mid-write) so the next append starts on a fresh line.
            let bytes = std::fs::read(path).map_err(io)?;
            let keep = bytes.iter().rposition(|&c| c == b'\n').map_or(0, |i| i + 1);
            if keep < bytes.len() {
                tracing::warn!(path = %path.display(), "cutting a torn journal line");
                let f = OpenOptions::new().write(true).open(path).map_err(io)?;
                f.set_len(keep as u64).map_err(io)?;
                f.sync_all().map_err(io)?;
            }
            let bytes = std::fs::read(path).map_err(io)?;
            content = parse_journal(&bytes);
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        let mut j = Journal {
            _lock: lock,
            path: path.to_owned(),
            file,
            pending: content.pending,
            incarnation: content.incarnation,
            kept: content.kept.into_iter().map(|b| (b, None)).collect(),
            acked: content.acked,
            appended: 0,
            max_kept: MAX_KEPT,
            #[cfg(test)]
            crash_after_step: None,
        };
        if j.pending.is_empty() {
            j.compact()?;
        }
        Ok(j)
    }

    /// Reads a stopped node's journal without changing it (`tollgate book rebuild`): its
    /// incarnation, the batches it never had acknowledged and those it keeps for the book.
    /// `Locked` while its node runs.
    pub fn read_stopped(path: &Path) -> Result<JournalContent, JournalError> {
        let io = |source| JournalError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        if let Ok(lock) = File::open(&lock_path) {
            match lock.try_lock_shared() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(JournalError::Locked {
                        path: path.display().to_string(),
                    });
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
            }
        }
        let bytes = std::fs::read(path).map_err(io)?;
        // Whole lines only, as `open` (which cuts a torn last line) would read it.
        let whole = bytes.iter().rposition(|&c| c == b'\n').map_or(0, |i| i + 1);
        Ok(parse_journal(&bytes[..whole]))
    }

    /// Batches that were journaled but never acknowledged (oldest first).
    pub fn pending(&self) -> &[SettleBatch] {
        &self.pending
    }

    /// The incarnation that last wrote this journal (its leases are to be released).
    pub fn incarnation(&self) -> Option<&Incarnation> {
        self.incarnation.as_ref()
    }

    /// Records the incarnation now writing this journal.
    pub fn set_incarnation(&mut self, inc: &Incarnation) -> Result<(), JournalError> {
        self.write_line(&Line::Incarnation(inc.clone()))?;
        self.incarnation = Some(inc.clone());
        Ok(())
    }

    /// Appends and fsyncs; only then may the batch be sent.
    pub fn append(&mut self, b: &SettleBatch) -> Result<(), JournalError> {
        self.write_line(&Line::Batch(b.clone()))?;
        self.pending.push(b.clone());
        Ok(())
    }

    /// Records that the store applied this batch (now or before). It is kept until the book
    /// of record holds it ([`Journal::release_booked`]); compacts when nothing is left.
    pub fn ack(&mut self, b: &SettleBatch) -> Result<(), JournalError> {
        let a = Ack {
            node_id: b.node_id.clone(),
            epoch: b.epoch,
            seq: b.seq,
        };
        self.write_line(&Line::Ack(a))?;
        if let Some(i) = self
            .pending
            .iter()
            .position(|p| p.node_id == b.node_id && p.epoch == b.epoch && p.seq == b.seq)
        {
            let b = self.pending.remove(i);
            self.kept.push((b, None));
            let extra = self.kept.len().saturating_sub(self.max_kept);
            if extra > 0 {
                self.kept.drain(..extra);
            }
        }
        let top = self.acked.entry((b.node_id.clone(), b.epoch)).or_default();
        *top = (*top).max(b.seq);
        self.compact_if_idle()
    }

    /// Gives up a batch that was never applied (its usage is cut again under a new
    /// incarnation): neither replayed nor kept.
    pub fn abandon(&mut self, b: &SettleBatch) -> Result<(), JournalError> {
        self.write_line(&Line::Abandon(Ack {
            node_id: b.node_id.clone(),
            epoch: b.epoch,
            seq: b.seq,
        }))?;
        self.pending
            .retain(|p| !(p.node_id == b.node_id && p.epoch == b.epoch && p.seq == b.seq));
        self.compact_if_idle()
    }

    /// Acknowledged batches kept for the book of record.
    pub fn kept(&self) -> impl Iterator<Item = &SettleBatch> {
        self.kept.iter().map(|(b, _)| b)
    }

    /// Drops the kept batches the book of record holds: those whose ledger position (the
    /// ledger's `last` entry, recorded for batches seen here for the first time) is at or
    /// before `booked`. `None` marks: no book, every kept batch goes. Compacts when it dropped
    /// any and nothing is pending. Returns how many it dropped.
    pub fn release_booked(
        &mut self,
        marks: Option<crate::types::BookMarks>,
    ) -> Result<usize, JournalError> {
        let before = self.kept.len();
        match marks {
            None => self.kept.clear(),
            Some(m) => {
                for (_, pos) in self.kept.iter_mut().filter(|(_, p)| p.is_none()) {
                    // An empty ledger: the batch's entry was trimmed or lost; any later entry
                    // is past it, so wait for one.
                    *pos = m.last;
                }
                self.kept.retain(|(_, pos)| match (pos, m.booked) {
                    (Some(pos), Some(booked)) => *pos > booked,
                    _ => true,
                });
            }
        }
        let dropped = before - self.kept.len();
        if dropped > 0 && self.pending.is_empty() {
            self.compact()?;
        }
        Ok(dropped)
    }

    /// Rewrites the file when no batch is pending (only then is the live part small: the
    /// incarnation, the last acks, the kept batches) and it is worth it: nothing kept, or
    /// 4 MiB appended since the last rewrite.
    fn compact_if_idle(&mut self) -> Result<(), JournalError> {
        if self.pending.is_empty() && (self.kept.is_empty() || self.appended >= 4 << 20) {
            self.compact()?;
        }
        Ok(())
    }

    fn write_line(&mut self, l: &Line) -> Result<(), JournalError> {
        let mut bytes = serde_json::to_vec(l)
            .map_err(|e| JournalError::Encode(e, self.path.display().to_string()))?;
        bytes.push(b'\n');
        let io = |source| JournalError::Io {
            path: self.path.display().to_string(),
            source,
        };
        self.file.write_all(&bytes).map_err(io)?;
        self.appended += bytes.len() as u64;
        self.file.sync_data().map_err(io)
    }

    /// Nothing pending: start the file again with only the incarnation line, the last acks and
    /// the kept batches. Crash-safe: the
    /// new content is written to a side file and renamed over the journal, so at every instant
    /// the journal on disk is either the old one or the new one, each naming the incarnation
    /// whose leases the next start must release.
    fn compact(&mut self) -> Result<(), JournalError> {
        let io = |source| JournalError::Io {
            path: self.path.display().to_string(),
            source,
        };
        let mut tmp_path = self.path.as_os_str().to_owned();
        tmp_path.push(".compact");
        let tmp_path = PathBuf::from(tmp_path);
        let enc = |e| JournalError::Encode(e, self.path.display().to_string());
        let mut bytes = Vec::new();
        if let Some(inc) = &self.incarnation {
            bytes = serde_json::to_vec(&Line::Incarnation(inc.clone())).map_err(enc)?;
            bytes.push(b'\n');
        }
        // The highest acknowledged batch of the last two incarnations stays on record.
        let newest = self.acked.keys().map(|(_, e)| *e).max().unwrap_or(0);
        self.acked.retain(|(_, e), _| *e + 1 >= newest);
        for ((node_id, epoch), seq) in &self.acked {
            let line = Line::Ack(Ack {
                node_id: node_id.clone(),
                epoch: *epoch,
                seq: *seq,
            });
            bytes.extend(serde_json::to_vec(&line).map_err(enc)?);
            bytes.push(b'\n');
        }
        for (b, _) in &self.kept {
            bytes.extend(serde_json::to_vec(&Line::Kept(b.clone())).map_err(enc)?);
            bytes.push(b'\n');
        }
        let mut tmp = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&tmp_path)
            .map_err(io)?;
        tmp.write_all(&bytes).map_err(io)?;
        tmp.sync_all().map_err(io)?;
        drop(tmp);
        #[cfg(test)]
        if self.crash_after_step == Some(1) {
            return Ok(());
        }
        std::fs::rename(&tmp_path, &self.path).map_err(io)?;
        // From here appends must go to the new file, whatever happens next (an error below
        // must not leave this journal writing into the unlinked old one).
        self.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(io)?;
        self.appended = 0;
        #[cfg(test)]
        if self.crash_after_step == Some(2) {
            return Ok(());
        }
        // The rename itself is durable once the directory is.
        if let Some(dir) = self.path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::SettleEntry;

    fn b(seq: u64) -> SettleBatch {
        SettleBatch {
            node_id: "n".into(),
            epoch: 1,
            seq,
            entries: vec![SettleEntry {
                account: "a".into(),
                usage: Default::default(),
                cost: seq as i64,
                give_back: 0,
                ask: 0,
            }],
        }
    }

    #[test]
    fn unacknowledged_batches_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        {
            let mut j = Journal::open(&p).unwrap();
            j.append(&b(1)).unwrap();
            j.ack(&b(1)).unwrap();
            j.append(&b(2)).unwrap();
            j.append(&b(3)).unwrap();
            j.ack(&b(2)).unwrap();
        }
        let j = Journal::open(&p).unwrap();
        assert_eq!(j.pending(), &[b(3)]);
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_compaction_keeps_only_the_last_ack() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        {
            let mut j = Journal::open(&p).unwrap();
            j.append(&b(1)).unwrap();
        }
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"batch\":{\"node_id\":\"n\",\"ep").unwrap();
        drop(f);
        let mut j = Journal::open(&p).unwrap();
        assert_eq!(j.pending(), &[b(1)]);
        j.append(&b(2)).unwrap();
        drop(j);
        let mut j = Journal::open(&p).unwrap();
        assert_eq!(
            j.pending(),
            &[b(1), b(2)],
            "the append after the cut is readable"
        );
        j.ack(&b(1)).unwrap();
        j.ack(&b(2)).unwrap();
        // No book: the kept batches go.
        assert_eq!(j.release_booked(None).unwrap(), 2);
        // No incarnation here: one line, the highest acknowledged batch.
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        let c = parse_journal(text.as_bytes());
        assert!(c.pending.is_empty());
        assert_eq!(
            c.acked.values().copied().collect::<Vec<_>>(),
            vec![b(2).seq]
        );
    }
}

#[cfg(test)]
mod compaction_tests {
    use super::*;

    fn inc(epoch: u64) -> Incarnation {
        Incarnation {
            node_id: "n".into(),
            epoch,
        }
    }

    fn batch(seq: u64) -> SettleBatch {
        SettleBatch {
            node_id: "n".into(),
            epoch: 7,
            seq,
            entries: Vec::new(),
        }
    }

    /// Reading the journal after a crash at any point of a compaction still names the
    /// incarnation (whose leases the next start releases) and loses no pending batch. The old
    /// compaction truncated the file first: a crash right after left no incarnation line.
    #[test]
    fn a_crash_during_compaction_keeps_the_incarnation() {
        for step in [1, 2] {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("n.journal");
            {
                let mut j = Journal::open(&p).unwrap();
                j.set_incarnation(&inc(7)).unwrap();
                j.append(&batch(1)).unwrap();
                j.ack(&batch(1)).unwrap();
                j.crash_after_step = Some(step);
                // Nothing pending or kept any more: this compacts, and "crashes" after `step`.
                j.release_booked(None).unwrap();
                // A process that goes on (the rename done, the directory not yet synced)
                // appends to the new file.
                if step == 2 {
                    j.append(&batch(2)).unwrap();
                }
            }
            let mut j = Journal::open(&p).unwrap();
            assert_eq!(j.incarnation(), Some(&inc(7)), "crash after step {step}");
            let want: &[SettleBatch] = if step == 2 { &[batch(2)] } else { &[] };
            assert_eq!(j.pending(), want, "crash after step {step}");
            if step == 2 {
                j.ack(&batch(2)).unwrap();
            }
            // A finished compaction leaves the incarnation line and the highest acknowledged
            // batch per incarnation, no batch.
            j.set_incarnation(&inc(8)).unwrap();
            j.append(&batch(1)).unwrap();
            j.ack(&batch(1)).unwrap();
            j.release_booked(None).unwrap();
            drop(j);
            let text = std::fs::read_to_string(&p).unwrap();
            let mut lines = text.lines();
            assert!(
                lines.next().unwrap().starts_with("{\"incarnation\""),
                "{text}"
            );
            assert!(lines.all(|l| l.starts_with("{\"ack\"")), "{text}");
            let c = parse_journal(text.as_bytes());
            assert!(c.pending.is_empty());
            assert!(c.acked[&("n".to_owned(), 7)] >= 1, "{text}");
            let j = Journal::open(&p).unwrap();
            assert_eq!(j.incarnation(), Some(&inc(8)));
            drop(j);
            let mut j = Journal::open(&p).unwrap();
            j.append(&batch(3)).unwrap();
            drop(j);
            assert_eq!(Journal::open(&p).unwrap().pending(), &[batch(3)]);
        }
    }
}

#[cfg(test)]
mod kept_tests {
    use super::*;
    use crate::types::{BookMarks, SettleEntry};

    fn b(seq: u64) -> SettleBatch {
        SettleBatch {
            node_id: "n".into(),
            epoch: 3,
            seq,
            entries: vec![SettleEntry {
                account: "a".into(),
                usage: Default::default(),
                cost: 10 * seq as i64,
                give_back: 0,
                ask: 0,
            }],
        }
    }

    fn pos(ms: u64) -> Option<LedgerPos> {
        Some(LedgerPos { ms, seq: 0 })
    }

    fn kept(j: &Journal) -> Vec<u64> {
        j.kept().map(|b| b.seq).collect()
    }

    /// An acknowledged batch stays (across reopening and compaction) until the book's mark
    /// passes the ledger position read after its acknowledgement; an abandoned one is neither
    /// replayed nor kept; without a book every kept batch goes.
    #[test]
    fn acknowledged_batches_are_kept_until_the_book_holds_them() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n.journal");
        let mut j = Journal::open(&p).unwrap();
        for s in 1..=3 {
            j.append(&b(s)).unwrap();
        }
        j.ack(&b(1)).unwrap();
        j.ack(&b(2)).unwrap();
        j.abandon(&b(3)).unwrap();
        assert!(j.pending().is_empty());
        assert_eq!(kept(&j), [1, 2]);
        // The ledger's last entry is at 100 now: both batches are at or before it; the book
        // holds up to 50, so neither is known to be booked.
        let at = |booked, last| {
            Some(BookMarks {
                booked,
                last: pos(last),
            })
        };
        assert_eq!(j.release_booked(at(pos(50), 100)).unwrap(), 0);
        j.append(&b(4)).unwrap();
        j.ack(&b(4)).unwrap();
        drop(j);
        // Reopened: the positions are forgotten (read again, later: never earlier).
        let c = Journal::read_stopped(&p).unwrap();
        assert_eq!(c.kept.iter().map(|b| b.seq).collect::<Vec<_>>(), [1, 2, 4]);
        assert_eq!(c.kept[0], b(1), "kept with its whole content");
        assert!(c.pending.is_empty());
        let mut j = Journal::open(&p).unwrap();
        assert!(j.pending().is_empty(), "kept batches are not replayed");
        assert_eq!(kept(&j), [1, 2, 4]);
        // First sight after the reopen: position 200 for all three; the book at 199 is short.
        assert_eq!(j.release_booked(at(pos(100), 200)).unwrap(), 0);
        assert_eq!(j.release_booked(at(pos(199), 300)).unwrap(), 0);
        assert_eq!(j.release_booked(at(pos(200), 300)).unwrap(), 3);
        assert_eq!(kept(&j), Vec::<u64>::new());
        j.append(&b(5)).unwrap();
        j.ack(&b(5)).unwrap();
        // An empty ledger (trimmed, or a store that lost it): kept until an entry shows.
        assert_eq!(
            j.release_booked(at(None, 0).map(|m| BookMarks { last: None, ..m }))
                .unwrap(),
            0
        );
        assert_eq!(j.release_booked(None).unwrap(), 1, "no book: dropped");
        drop(j);
        let c = Journal::read_stopped(&p).unwrap();
        assert!(c.kept.is_empty() && c.pending.is_empty(), "{c:?}");
        assert_eq!(c.acked[&("n".to_owned(), 3)], 5);
    }

    #[test]
    fn at_most_max_kept_batches_are_kept_oldest_first_out() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n.journal");
        let mut j = Journal::open(&p).unwrap();
        j.max_kept = 4;
        for s in 1..=9 {
            j.append(&b(s)).unwrap();
            j.ack(&b(s)).unwrap();
        }
        assert_eq!(kept(&j), [6, 7, 8, 9]);
        let mut v: Vec<u32> = Vec::new();
        for s in 0..(MAX_KEPT as u32 + 3) {
            keep(&mut v, s);
        }
        assert_eq!(v.len(), MAX_KEPT);
        assert_eq!(v[0], 3);
    }
}

#[cfg(test)]
mod lock_tests {
    use super::*;

    #[test]
    fn a_journal_has_one_owner_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n1.journal");
        let first = Journal::open(&path).unwrap();
        assert!(matches!(
            Journal::open(&path),
            Err(JournalError::Locked { .. })
        ));
        drop(first);
        Journal::open(&path).unwrap();
    }
}
