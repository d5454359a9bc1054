//! The node's settle journal: every batch is appended and fsynced *before* its first send, and
//! acknowledged after the store answered. After a crash, the unacknowledged batches are sent
//! again with the same bytes (same `(node, epoch, seq)`), which the store applies at most once.
//!
//! An acknowledged batch stays in the journal (*kept*) until the book of record holds it
//! (docs/book.md): should Redis lose its data before the book copied the batch, `book
//! rebuild` applies it from here. A batch is kept only under an incarnation whose ledger
//! generation is known (a `generation` line, written after the incarnation began): the token
//! of the Redis lifetime that applied it, so that marks of another lifetime (a Redis that lost
//! its data) never release it. Without a book, kept batches go once Redis shows it still
//! holds them (their incarnation's high-water mark, same generation).
//!
//! Format: JSON lines, `{"batch":{…}}`, `{"ack":{"node_id":…,"epoch":…,"seq":…}}`,
//! `{"incarnation":{…}}`, `{"generation":{"node_id":…,"epoch":…,"generation":…}}`,
//! `{"kept":{"batch":{…},"generation":…}}` (written by compaction), `{"abandon":{…}}` (a batch given
//! up unapplied: its usage went back to be cut again). A torn last line (crash mid-write) is
//! ignored: its batch was never sent.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cluster_store::shard_of;
use crate::types::{Incarnation, LedgerMarks, LedgerPos, SettleBatch};

/// Kept batches a journal holds at most (the oldest go first, logged; a rebuild names what the
/// book never got): at one batch per 50 ms round, about 200 s of a node's rounds while the
/// book cannot copy (fewer with batches split at `max_batch`).
pub const MAX_KEPT: usize = 4096;

/// Incarnations a release asks Redis about at most (the others' batches wait).
pub const MAX_RELEASE_INCARNATIONS: usize = 16;

#[derive(Serialize, Deserialize)]
struct Ack {
    node_id: String,
    epoch: u64,
    seq: u64,
}

#[derive(Serialize, Deserialize)]
struct Generation {
    node_id: String,
    epoch: u64,
    generation: String,
}

/// A kept batch and the ledger generation that applied it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptBatch {
    pub batch: SettleBatch,
    pub generation: String,
}

/// A kept batch as written: with its generation, or (journals of the first build that kept
/// batches) the bare batch, kept under a generation no Redis has, so never released early.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum KeptLine {
    Tagged(KeptBatch),
    Bare(SettleBatch),
}

impl KeptLine {
    fn into_kept(self) -> KeptBatch {
        match self {
            KeptLine::Tagged(k) => k,
            KeptLine::Bare(batch) => KeptBatch {
                batch,
                generation: "unknown".to_owned(),
            },
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Line {
    Batch(SettleBatch),
    Ack(Ack),
    /// The incarnation that writes this journal (so the next one can release its leases).
    Incarnation(Incarnation),
    /// The ledger generation an incarnation settles into.
    Generation(Generation),
    /// An acknowledged batch the book of record may not hold yet.
    Kept(KeptLine),
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
    pub kept: Vec<KeptBatch>,
    /// The highest acknowledged seq per incarnation `(node, epoch)` (kept across compaction
    /// for the current and the previous incarnation): what the store had applied, so that
    /// `book rebuild` can say what a book that lagged is missing.
    pub acked: BTreeMap<(String, u64), u64>,
    /// The ledger generation each incarnation settled into (where known).
    pub generations: BTreeMap<(String, u64), String>,
}

fn same(b: &SettleBatch, a: &Ack) -> bool {
    b.node_id == a.node_id && b.epoch == a.epoch && b.seq == a.seq
}

/// Appends `b` to `kept`, dropping the oldest past `max`; returns how many it dropped.
fn keep<T>(kept: &mut Vec<T>, b: T, max: usize) -> usize {
    kept.push(b);
    let extra = kept.len().saturating_sub(max);
    if extra > 0 {
        kept.drain(..extra);
    }
    extra
}

/// Reads a journal's whole lines. A line that does not parse is skipped: only a torn final
/// line can (a crash mid-write; its batch was never sent), and `Journal::open` cuts it.
pub fn parse_journal(bytes: &[u8]) -> JournalContent {
    let mut c = JournalContent::default();
    let mut gens: BTreeMap<(String, u64), String> = BTreeMap::new();
    for line in bytes.split(|&b| b == b'\n') {
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Line>(line) {
            Ok(Line::Batch(b)) => c.pending.push(b),
            Ok(Line::Ack(a)) => {
                if let Some(i) = c.pending.iter().position(|b| same(b, &a)) {
                    let b = c.pending.remove(i);
                    // Kept only where the generation is known (never for a journal written
                    // before generations, whose acks also stood for batches given up).
                    if let Some(generation) = gens.get(&(a.node_id.clone(), a.epoch)) {
                        let generation = generation.clone();
                        keep(
                            &mut c.kept,
                            KeptBatch {
                                batch: b,
                                generation,
                            },
                            MAX_KEPT,
                        );
                    }
                }
                c.pending.retain(|b| !same(b, &a));
                let top = c.acked.entry((a.node_id, a.epoch)).or_default();
                *top = (*top).max(a.seq);
            }
            Ok(Line::Kept(k)) => {
                keep(&mut c.kept, k.into_kept(), MAX_KEPT);
            }
            Ok(Line::Generation(g)) => {
                gens.insert((g.node_id, g.epoch), g.generation);
            }
            Ok(Line::Abandon(a)) => c.pending.retain(|b| !same(b, &a)),
            Ok(Line::Incarnation(i)) => c.incarnation = Some(i),
            Err(e) => tracing::warn!(error = %e, "ignoring a journal line that does not parse"),
        }
    }
    c.generations = gens;
    c
}

/// One kept batch in memory: per ledger stream it has lines in, the position read after it was
/// acknowledged (once read, in its own generation).
struct Kept {
    k: KeptBatch,
    tags: Vec<(usize, LedgerPos)>,
}

pub struct Journal {
    /// Held while open (see `open`).
    _lock: File,
    path: PathBuf,
    file: File,
    /// Appended but not yet acknowledged, in order.
    pending: Vec<SettleBatch>,
    incarnation: Option<Incarnation>,
    /// Acknowledged batches the book of record may not hold yet, oldest first.
    kept: Vec<Kept>,
    /// About how many bytes the kept batches take on disk.
    kept_bytes: u64,
    /// The ledger generation of each incarnation (its batches are kept only when known).
    generations: BTreeMap<(String, u64), String>,
    /// Per ledger stream, the generation in which a book of record was last seen declared
    /// there (this process).
    book_seen_in: BTreeMap<usize, String>,
    /// The highest acknowledged seq per incarnation (see [`JournalContent::acked`]).
    acked: BTreeMap<(String, u64), u64>,
    /// Bytes appended since the last compaction: a rewrite carries the kept batches, so it
    /// waits until the appends outweigh them (its cost stays proportional to what was written).
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
            kept_bytes: content.kept.iter().map(|k| approx_bytes(&k.batch)).sum(),
            kept: content
                .kept
                .into_iter()
                .map(|k| Kept {
                    k,
                    tags: Vec::new(),
                })
                .collect(),
            generations: content.generations,
            book_seen_in: BTreeMap::new(),
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

    /// The highest epoch of `node` this journal knows (its incarnation, acks, generations,
    /// pending and kept batches): the next incarnation begins above it.
    pub fn max_epoch(&self, node: &str) -> u64 {
        let incarnation = self
            .incarnation
            .iter()
            .filter(|i| i.node_id == node)
            .map(|i| i.epoch);
        let acked = self
            .acked
            .keys()
            .chain(self.generations.keys())
            .filter(|(n, _)| n == node)
            .map(|(_, e)| *e);
        let batches = self
            .pending
            .iter()
            .chain(self.kept.iter().map(|k| &k.k.batch))
            .filter(|b| b.node_id == node)
            .map(|b| b.epoch);
        incarnation.chain(acked).chain(batches).max().unwrap_or(0)
    }

    /// The ledger generation recorded for `inc`.
    pub fn generation_of(&self, inc: &Incarnation) -> Option<&str> {
        self.generations
            .get(&(inc.node_id.clone(), inc.epoch))
            .map(String::as_str)
    }

    /// Whether the ledger generation of `inc` is recorded (its batches are kept).
    pub fn has_generation(&self, inc: &Incarnation) -> bool {
        self.generations
            .contains_key(&(inc.node_id.clone(), inc.epoch))
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

    /// Records the ledger generation this incarnation settles into: from now on its
    /// acknowledged batches are kept until the book holds them.
    pub fn set_generation(
        &mut self,
        inc: &Incarnation,
        generation: &str,
    ) -> Result<(), JournalError> {
        self.write_line(&Line::Generation(Generation {
            node_id: inc.node_id.clone(),
            epoch: inc.epoch,
            generation: generation.to_owned(),
        }))?;
        self.generations
            .insert((inc.node_id.clone(), inc.epoch), generation.to_owned());
        Ok(())
    }

    /// Records that the store applied this batch (now or before). Under a known generation
    /// it is kept until the book of record holds it ([`Journal::release_booked`]).
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
            let batch = self.pending.remove(i);
            if let Some(generation) = self.generations.get(&(b.node_id.clone(), b.epoch)) {
                self.kept_bytes += approx_bytes(&batch);
                let k = Kept {
                    k: KeptBatch {
                        batch,
                        generation: generation.clone(),
                    },
                    tags: Vec::new(),
                };
                let evicted = keep(&mut self.kept, k, self.max_kept);
                if evicted > 0 {
                    tracing::warn!(
                        max = self.max_kept,
                        "journal: the oldest kept batch goes before the book holds it (the book has not copied for long); a rebuild would name its usage"
                    );
                    self.kept_bytes = self.kept.iter().map(|k| approx_bytes(&k.k.batch)).sum();
                }
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
        self.kept.iter().map(|k| &k.k.batch)
    }

    /// The incarnations of the kept batches (at most [`MAX_RELEASE_INCARNATIONS`]): what
    /// [`Journal::release_booked`] needs the store's high-water marks of.
    pub fn kept_incarnations(&self) -> Vec<Incarnation> {
        let mut out: Vec<Incarnation> = Vec::new();
        // The current incarnation first: older ones whose batches stay for good (a shard lost
        // them) must not push it out of the asking.
        let current = self.incarnation.as_ref().filter(|i| {
            self.kept
                .iter()
                .any(|k| k.k.batch.node_id == i.node_id && k.k.batch.epoch == i.epoch)
        });
        out.extend(current.cloned());
        for k in &self.kept {
            let b = &k.k.batch;
            if !out
                .iter()
                .any(|i| i.node_id == b.node_id && i.epoch == b.epoch)
            {
                if out.len() == MAX_RELEASE_INCARNATIONS {
                    break;
                }
                out.push(Incarnation {
                    node_id: b.node_id.clone(),
                    epoch: b.epoch,
                });
            }
        }
        out
    }

    /// Drops the kept batches the store shows are safe to forget. `marks` was read for
    /// `incs` (their high-water marks, in order), per ledger stream. A batch goes only when
    /// every stream it has lines in (one Redis: the one; a cluster: its accounts' shards)
    /// still holds it: same generation, and its incarnation's mark at or past its seq (a Redis
    /// that lost its data, or a replica that lost the write, keeps it here). Then, without a
    /// book there, that part is done; with one, it is tagged with the stream's last entry on
    /// first sight and done once the book's mark there reaches that tag. Returns how many went.
    pub fn release_booked(
        &mut self,
        marks: &LedgerMarks,
        incs: &[Incarnation],
    ) -> Result<usize, JournalError> {
        let n = marks.streams.len();
        if n == 0 || (marks.shards > 0 && marks.shards as usize != n) {
            return Ok(0);
        }
        // Per stream: whether its book is known. A book declared in an earlier lifetime of a
        // stream and not (yet) in this one: the stream lost its data and the writer has not
        // declared the book again there. Not "no book": its parts stay until it does.
        let mut known = vec![true; n];
        for (s, m) in marks.streams.iter().enumerate() {
            if m.declared {
                match &m.generation {
                    Some(g) => self.book_seen_in.insert(s, g.clone()),
                    None => self.book_seen_in.remove(&s),
                };
            } else if self
                .book_seen_in
                .get(&s)
                .is_some_and(|g| Some(g) != m.generation.as_ref())
            {
                known[s] = false;
            }
        }
        let before = self.kept.len();
        let inc_of = |b: &SettleBatch| {
            incs.iter()
                .position(|i| i.node_id == b.node_id && i.epoch == b.epoch)
        };
        self.kept.retain_mut(|k| {
            let b = &k.k.batch;
            let streams: Vec<usize> = if marks.shards == 0 {
                vec![0]
            } else {
                let mut v: Vec<usize> = b
                    .entries
                    .iter()
                    .map(|e| shard_of(&e.account, marks.shards) as usize)
                    .collect();
                v.sort_unstable();
                v.dedup();
                v
            };
            let inc = inc_of(b);
            let mut keep = false;
            for s in streams {
                let Some(m) = marks.streams.get(s) else {
                    keep = true;
                    continue;
                };
                if !known[s] {
                    keep = true;
                    continue;
                }
                // The generation this stream had when the batch's incarnation began.
                let generation = if n == 1 {
                    Some(k.k.generation.as_str())
                } else {
                    k.k.generation.split(',').nth(s)
                };
                let held = m.generation.is_some()
                    && m.generation.as_deref() == generation
                    && inc
                        .and_then(|i| m.hwms.get(i).copied())
                        .is_some_and(|h| h >= b.seq)
                    && !inc
                        .and_then(|i| m.lost.get(i).copied().flatten())
                        .is_some_and(|(from, to)| (from..=to).contains(&b.seq));
                if !held {
                    k.tags.retain(|(t, _)| *t != s);
                    keep = true;
                    continue;
                }
                if !m.declared {
                    continue;
                }
                let tag = match k.tags.iter().find(|(t, _)| *t == s) {
                    Some((_, tag)) => Some(*tag),
                    None => {
                        // The part's own entry is at or before the stream's last one (it was
                        // applied before this read); an empty stream: wait for an entry.
                        if let Some(last) = m.last {
                            k.tags.push((s, last));
                        }
                        m.last
                    }
                };
                match (tag, m.booked) {
                    (Some(tag), Some(booked)) if tag <= booked => {}
                    _ => keep = true,
                }
            }
            keep
        });
        let dropped = before - self.kept.len();
        if dropped > 0 {
            self.kept_bytes = self.kept.iter().map(|k| approx_bytes(&k.k.batch)).sum();
            self.compact_if_idle()?;
        }
        Ok(dropped)
    }

    /// Rewrites the file when no batch is pending (only then is the live part small: the
    /// incarnation, the last acks and generations, the kept batches) and it pays: nothing is
    /// kept, or the appends since the last rewrite outweigh the kept batches (and 4 MiB).
    fn compact_if_idle(&mut self) -> Result<(), JournalError> {
        if self.pending.is_empty()
            && (self.kept.is_empty() || self.appended >= self.kept_bytes.max(4 << 20))
        {
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
        // The generations still needed: the current incarnation's (its batches to come).
        if let Some(inc) = &self.incarnation {
            let key = (inc.node_id.clone(), inc.epoch);
            self.generations.retain(|k, _| *k == key);
        } else {
            self.generations.clear();
        }
        for ((node_id, epoch), generation) in &self.generations {
            let line = Line::Generation(Generation {
                node_id: node_id.clone(),
                epoch: *epoch,
                generation: generation.clone(),
            });
            bytes.extend(serde_json::to_vec(&line).map_err(enc)?);
            bytes.push(b'\n');
        }
        for k in &self.kept {
            bytes.extend(
                serde_json::to_vec(&Line::Kept(KeptLine::Tagged(k.k.clone()))).map_err(enc)?,
            );
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

/// About the bytes a batch takes in the journal (for the compaction rule; no serialization).
fn approx_bytes(b: &SettleBatch) -> u64 {
    96 + 160 * b.entries.len() as u64
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
mod kept_tests {
    use super::*;
    use crate::types::{BookMarks, SettleEntry};

    fn inc() -> Incarnation {
        Incarnation {
            node_id: "n".into(),
            epoch: 3,
        }
    }

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

    /// Marks as Redis would answer for `[inc()]`: the book declared up to `booked`, the
    /// ledger's last entry at `last`, generation `generation`, the incarnation's mark `hwm`.
    fn marks(booked: Option<LedgerPos>, last: u64, generation: &str, hwm: u64) -> BookMarks {
        BookMarks {
            declared: true,
            booked,
            last: pos(last),
            generation: Some(generation.into()),
            hwms: vec![hwm],
            lost: Vec::new(),
        }
    }

    /// The current incarnation is always asked about, however many older ones keep batches.
    #[test]
    fn the_current_incarnation_is_asked_about_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(&dir.path().join("n.journal")).unwrap();
        for epoch in 1..=MAX_RELEASE_INCARNATIONS as u64 + 2 {
            let inc = Incarnation {
                node_id: "n".into(),
                epoch,
            };
            j.set_incarnation(&inc).unwrap();
            j.set_generation(&inc, "g").unwrap();
            let batch = SettleBatch { epoch, ..b(1) };
            j.append(&batch).unwrap();
            j.ack(&batch).unwrap();
        }
        let incs = j.kept_incarnations();
        assert_eq!(incs.len(), MAX_RELEASE_INCARNATIONS);
        assert_eq!(incs[0].epoch, MAX_RELEASE_INCARNATIONS as u64 + 2);
        assert_eq!(incs[1].epoch, 1);
    }

    /// On a cluster (two shards here) a batch goes only once every shard it has lines in holds
    /// its part in the generation the incarnation began with, and the book there passed it; a
    /// shard it has no line in does not hold it back, and one that lost its data keeps it.
    #[test]
    fn a_batch_across_shards_goes_once_each_of_its_shards_holds_and_booked_its_part() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(&dir.path().join("n.journal")).unwrap();
        j.set_incarnation(&inc()).unwrap();
        j.set_generation(&inc(), "g0,g1").unwrap();
        // An account of each shard.
        let name = |shard: u32| {
            (0..)
                .map(|i| format!("acct-{i}"))
                .find(|a| shard_of(a, 2) == shard)
                .unwrap()
        };
        let line = |account: String| SettleEntry {
            account,
            usage: Default::default(),
            cost: 5,
            give_back: 0,
            ask: 0,
        };
        let both = SettleBatch {
            entries: vec![line(name(0)), line(name(1))],
            ..b(1)
        };
        let only1 = SettleBatch {
            entries: vec![line(name(1))],
            ..b(2)
        };
        for x in [&both, &only1] {
            j.append(x).unwrap();
            j.ack(x).unwrap();
        }
        let incs = j.kept_incarnations();
        let shard = |booked: Option<LedgerPos>, last: u64, generation: &str, hwm: u64| {
            marks(booked, last, generation, hwm)
        };
        let cluster = |s0: BookMarks, s1: BookMarks| LedgerMarks {
            shards: 2,
            streams: vec![s0, s1],
        };
        // Shard 1 booked past both; shard 0 not yet past batch 1's part.
        let m = cluster(shard(pos(5), 10, "g0", 1), shard(pos(30), 30, "g1", 2));
        assert_eq!(
            j.release_booked(&m, &incs).unwrap(),
            1,
            "batch 2 is only in shard 1"
        );
        assert_eq!(kept(&j), [1]);
        // Shard 0 lost its data (a new generation): the part is not held there, whatever its
        // book says.
        let m = cluster(shard(pos(99), 99, "g0-new", 1), shard(pos(30), 30, "g1", 2));
        assert_eq!(j.release_booked(&m, &incs).unwrap(), 0);
        // Its shard back in the first generation, the book past the position read now.
        let m = cluster(shard(pos(5), 10, "g0", 1), shard(pos(30), 30, "g1", 2));
        assert_eq!(j.release_booked(&m, &incs).unwrap(), 0);
        let m = cluster(shard(pos(10), 12, "g0", 1), shard(pos(30), 30, "g1", 2));
        assert_eq!(j.release_booked(&m, &incs).unwrap(), 1);
        assert!(kept(&j).is_empty());
        // A shard that lost acknowledged parts (its mark moved past them since): a batch in
        // the lost range stays, whatever the mark and the book say.
        let lost = SettleBatch {
            entries: vec![line(name(0))],
            ..b(4)
        };
        j.append(&lost).unwrap();
        j.ack(&lost).unwrap();
        let incs = j.kept_incarnations();
        let mut s0 = shard(pos(99), 99, "g0", 9);
        s0.lost = vec![Some((4, 6))];
        let m = cluster(s0.clone(), shard(pos(99), 99, "g1", 9));
        assert_eq!(j.release_booked(&m, &incs).unwrap(), 0);
        // Out of the lost range: held, tagged at the stream's end (99), the book at 50.
        s0.lost = vec![Some((5, 6))];
        s0.booked = pos(50);
        let m = cluster(s0, shard(pos(99), 99, "g1", 9));
        assert_eq!(j.release_booked(&m, &incs).unwrap(), 0);
        let m = cluster(shard(pos(100), 100, "g0", 9), shard(pos(99), 99, "g1", 9));
        assert_eq!(j.release_booked(&m, &incs).unwrap(), 1);
        // A layout the marks do not describe whole releases nothing.
        j.append(&b(3)).unwrap();
        j.ack(&b(3)).unwrap();
        let short = LedgerMarks {
            shards: 2,
            streams: vec![shard(pos(99), 99, "g0", 3)],
        };
        assert_eq!(j.release_booked(&short, &j.kept_incarnations()).unwrap(), 0);
    }

    /// An acknowledged batch stays (across reopening and compaction) until the book's mark
    /// passes the ledger position read after its acknowledgement, in its own generation; an
    /// abandoned one is neither replayed nor kept.
    #[test]
    fn acknowledged_batches_are_kept_until_the_book_holds_them() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n.journal");
        let mut j = Journal::open(&p).unwrap();
        j.set_incarnation(&inc()).unwrap();
        j.set_generation(&inc(), "g1").unwrap();
        for s in 1..=3 {
            j.append(&b(s)).unwrap();
        }
        j.ack(&b(1)).unwrap();
        j.ack(&b(2)).unwrap();
        j.abandon(&b(3)).unwrap();
        assert!(j.pending().is_empty());
        assert_eq!(kept(&j), [1, 2]);
        let incs = j.kept_incarnations();
        assert_eq!(incs, [inc()]);
        // The ledger's last entry is at 100: both batches are at or before it; the book holds
        // up to 50 only.
        assert_eq!(
            j.release_booked(&LedgerMarks::from(marks(pos(50), 100, "g1", 2)), &incs)
                .unwrap(),
            0
        );
        j.append(&b(4)).unwrap();
        j.ack(&b(4)).unwrap();
        drop(j);
        // Reopened: the positions are forgotten (read again, later: never earlier).
        let c = Journal::read_stopped(&p).unwrap();
        assert_eq!(
            c.kept.iter().map(|k| k.batch.seq).collect::<Vec<_>>(),
            [1, 2, 4]
        );
        assert_eq!(
            c.kept[0],
            KeptBatch {
                batch: b(1),
                generation: "g1".into()
            }
        );
        assert!(c.pending.is_empty());
        let mut j = Journal::open(&p).unwrap();
        assert!(j.pending().is_empty(), "kept batches are not replayed");
        assert_eq!(kept(&j), [1, 2, 4]);
        let incs = j.kept_incarnations();
        // Another generation (Redis lost its data): never released, whatever its marks say.
        assert_eq!(
            j.release_booked(&LedgerMarks::from(marks(pos(9_999), 9_999, "g2", 9)), &incs)
                .unwrap(),
            0
        );
        // Same generation, but Redis lost batch 4 (a replica that missed it): 4 stays.
        assert_eq!(
            j.release_booked(&LedgerMarks::from(marks(pos(100), 200, "g1", 2)), &incs)
                .unwrap(),
            0
        );
        assert_eq!(
            j.release_booked(&LedgerMarks::from(marks(pos(199), 300, "g1", 4)), &incs)
                .unwrap(),
            0
        );
        // Batches 1 and 2 were first seen held at 200, batch 4 at 300.
        assert_eq!(
            j.release_booked(&LedgerMarks::from(marks(pos(200), 300, "g1", 4)), &incs)
                .unwrap(),
            2
        );
        assert_eq!(
            j.release_booked(&LedgerMarks::from(marks(pos(300), 300, "g1", 4)), &incs)
                .unwrap(),
            1
        );
        assert_eq!(kept(&j), Vec::<u64>::new());
        // No book declared: a batch Redis holds goes at once.
        j.append(&b(5)).unwrap();
        j.ack(&b(5)).unwrap();
        let no_book = BookMarks {
            declared: false,
            ..marks(None, 0, "g1", 5)
        };
        assert_eq!(
            j.release_booked(&LedgerMarks::from(no_book.clone()), &j.kept_incarnations())
                .unwrap(),
            1
        );
        drop(j);
        let c = Journal::read_stopped(&p).unwrap();
        assert!(c.kept.is_empty() && c.pending.is_empty(), "{c:?}");
        assert_eq!(c.acked[&("n".to_owned(), 3)], 5);
    }

    /// A book seen declared, then a Redis of another generation where none is declared yet
    /// (it lost its data; the writer has not run there): nothing goes, not even batches of
    /// the new generation; once the book is declared there again, they go by its mark. A book
    /// undeclared in the same generation (`book disable`) lets them go.
    #[test]
    fn a_book_missing_after_a_data_loss_is_not_taken_for_no_book() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n.journal");
        let mut j = Journal::open(&p).unwrap();
        j.set_incarnation(&inc()).unwrap();
        j.set_generation(&inc(), "g1").unwrap();
        j.append(&b(1)).unwrap();
        j.ack(&b(1)).unwrap();
        let incs = j.kept_incarnations();
        assert_eq!(
            j.release_booked(&LedgerMarks::from(marks(None, 10, "g1", 1)), &incs)
                .unwrap(),
            0
        );
        // Redis lost its data: the node's next incarnation settles into generation g2.
        let next = Incarnation {
            node_id: "n".into(),
            epoch: 4,
        };
        j.set_incarnation(&next).unwrap();
        j.set_generation(&next, "g2").unwrap();
        let mut b2 = b(1);
        b2.epoch = 4;
        j.append(&b2).unwrap();
        j.ack(&b2).unwrap();
        let incs = j.kept_incarnations();
        let lost = BookMarks {
            declared: false,
            booked: None,
            last: pos(5),
            generation: Some("g2".into()),
            // Epoch 4's mark 1, epoch 3's none (the current incarnation is asked first).
            hwms: incs.iter().map(|i| u64::from(i.epoch == 4)).collect(),
            lost: Vec::new(),
        };
        assert_eq!(
            j.release_booked(&LedgerMarks::from(lost.clone()), &incs)
                .unwrap(),
            0
        );
        assert_eq!(j.kept().count(), 2);
        // Declared again in g2, its mark past the new batch: that one goes.
        let back = BookMarks {
            declared: true,
            booked: pos(5),
            ..lost.clone()
        };
        assert_eq!(
            j.release_booked(&LedgerMarks::from(back.clone()), &incs)
                .unwrap(),
            1
        );
        assert_eq!(j.kept().count(), 1, "the lost generation's batch stays");
        // `book disable` in the same generation: no book, a batch Redis holds goes.
        let mut b3 = b(2);
        b3.epoch = 4;
        j.append(&b3).unwrap();
        j.ack(&b3).unwrap();
        let incs = j.kept_incarnations();
        let disabled = BookMarks {
            declared: false,
            hwms: incs
                .iter()
                .map(|i| if i.epoch == 4 { 2 } else { 0 })
                .collect(),
            ..lost.clone()
        };
        assert_eq!(
            j.release_booked(&LedgerMarks::from(disabled.clone()), &incs)
                .unwrap(),
            1
        );
    }

    /// Without a generation (an embedded store, or a journal written before generations,
    /// whose acks also stood for batches given up) nothing is kept.
    #[test]
    fn without_a_generation_nothing_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n.journal");
        let mut j = Journal::open(&p).unwrap();
        j.set_incarnation(&inc()).unwrap();
        j.append(&b(1)).unwrap();
        j.ack(&b(1)).unwrap();
        assert_eq!(kept(&j), Vec::<u64>::new());
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 2, "compacted at once: {text}");
    }

    #[test]
    fn a_bare_kept_line_is_kept_and_never_released() {
        let bare = format!("{{\"kept\":{}}}\n", serde_json::to_string(&b(7)).unwrap());
        let c = parse_journal(bare.as_bytes());
        assert_eq!(c.kept.len(), 1);
        assert_eq!(c.kept[0].batch, b(7));
        assert_eq!(c.kept[0].generation, "unknown");
    }

    #[test]
    fn at_most_max_kept_batches_are_kept_oldest_first_out() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n.journal");
        let mut j = Journal::open(&p).unwrap();
        j.set_incarnation(&inc()).unwrap();
        j.set_generation(&inc(), "g").unwrap();
        j.max_kept = 4;
        for s in 1..=9 {
            j.append(&b(s)).unwrap();
            j.ack(&b(s)).unwrap();
        }
        assert_eq!(kept(&j), [6, 7, 8, 9]);
        let mut v: Vec<u32> = Vec::new();
        for s in 0..(MAX_KEPT as u32 + 3) {
            keep(&mut v, s, MAX_KEPT);
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
