//! The node's settle journal: every batch is appended and fsynced *before* its first send, and
//! acknowledged after the store answered. After a crash, the unacknowledged batches are sent
//! again with the same bytes (same `(node, epoch, seq)`), which the store applies at most once.
//!
//! Format: JSON lines, `{"batch":{…}}` or `{"ack":{"node_id":…,"epoch":…,"seq":…}}`. A torn last
//! line (crash mid-write) is ignored: its batch was never sent.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::types::{Incarnation, SettleBatch};

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
}

/// A journal's content.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JournalContent {
    /// The incarnation that wrote it last (its leases are to be released).
    pub incarnation: Option<Incarnation>,
    /// Batches never acknowledged, oldest first.
    pub pending: Vec<SettleBatch>,
    /// The highest acknowledged seq per incarnation `(node, epoch)` (kept across compaction
    /// for the current and the previous incarnation): what the store had applied, so that
    /// `book rebuild` can say what a book that lagged is missing.
    pub acked: BTreeMap<(String, u64), u64>,
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
                c.pending
                    .retain(|b| !(b.node_id == a.node_id && b.epoch == a.epoch && b.seq == a.seq));
                let top = c.acked.entry((a.node_id, a.epoch)).or_default();
                *top = (*top).max(a.seq);
            }
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
    /// The highest acknowledged seq per incarnation (see [`JournalContent::acked`]).
    acked: BTreeMap<(String, u64), u64>,
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
            acked: content.acked,
            #[cfg(test)]
            crash_after_step: None,
        };
        if j.pending.is_empty() {
            j.compact()?;
        }
        Ok(j)
    }

    /// Reads a stopped node's journal without changing it (`tollgate book rebuild`): its
    /// incarnation and the batches it never had acknowledged. `Locked` while its node runs.
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

    /// Records that the store answered for this batch; compacts when nothing is pending.
    pub fn ack(&mut self, b: &SettleBatch) -> Result<(), JournalError> {
        self.write_line(&Line::Ack(Ack {
            node_id: b.node_id.clone(),
            epoch: b.epoch,
            seq: b.seq,
        }))?;
        self.pending
            .retain(|p| !(p.node_id == b.node_id && p.epoch == b.epoch && p.seq == b.seq));
        let top = self.acked.entry((b.node_id.clone(), b.epoch)).or_default();
        *top = (*top).max(b.seq);
        if self.pending.is_empty() {
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
        self.file.sync_data().map_err(io)
    }

    /// Nothing pending: start the file again with only the incarnation line. Crash-safe: the
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
                j.crash_after_step = Some(step);
                // Nothing pending any more: this compacts, and "crashes" after `step`.
                j.ack(&batch(1)).unwrap();
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
