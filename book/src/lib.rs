//! The book of record (docs/book.md): every line of the Redis ledger stream — credits, settle
//! batches, deploy charges and refunds, write-offs, lease returns — copied into PostgreSQL.
//!
//! At least once in, exactly once stored: a round reads the entries after the book's cursor,
//! inserts their lines keyed by (idempotency key, account) with `ON CONFLICT DO NOTHING` and
//! moves the cursor in the same transaction; only then does it tell Redis how far the book
//! holds (`mark_booked`), and the ledger's reaper never trims past that point. A crash anywhere
//! repeats at most one round, whose lines are then counted as duplicates.

use std::time::Duration;

mod channels;
mod ledgers;
mod rebuild;

pub use channels::{ChannelRow, ChannelsRestored, SideState};
pub use ledgers::Ledgers;
pub use rebuild::{Rebuilt, rebuild};

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::watch;
use tollgate_metering::{LedgerEntry, RedisStore, RestoreSet, StoreError};

/// The schema, applied in order, each once (`book_migrations`).
const MIGRATIONS: [(i32, &str); 4] = [
    (1, include_str!("../migrations/0001_book.sql")),
    (2, include_str!("../migrations/0002_channels.sql")),
    (
        3,
        include_str!("../migrations/0003_channel_state_bound.sql"),
    ),
    (
        4,
        include_str!("../migrations/0004_side_state_stream_bounds.sql"),
    ),
];

/// Lines one round takes at most (plus the rest of the entry that reaches it).
const MAX_ROUND_LINES: usize = 2000;

/// Serialises concurrent starters' migrations (any constant unique to this schema).
const MIGRATION_LOCK: i64 = 0x746f_6c6c_626f_6f6b;

#[derive(Debug, thiserror::Error)]
pub enum BookError {
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("ledger: {0}")]
    Store(#[from] StoreError),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A stream id that is not `<ms>-<seq>` (never seen).
    #[error("ledger entry {id}: {what} out of range")]
    Range { id: String, what: &'static str },
    #[error("a round took over 30 s (PostgreSQL or Redis not answering)")]
    Timeout,
    /// A book row a rebuild cannot use (never written by the writer).
    #[error("{0}")]
    Unusable(String),
    /// Streams a round could not copy (a cluster's shards), each with why.
    #[error("not copied: {}", .0.join("; "))]
    Failed(Vec<String>),
}

/// What one round copied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Copied {
    /// Lines stored now.
    pub inserted: u64,
    /// Lines the book already held (a round repeated after a crash, or a replayed stream).
    pub duplicates: u64,
    /// Lines whose key the book holds with other content (`book_conflicts`).
    pub conflicts: u64,
    /// Stream entries taken (fewer than asked: caught up, or the round's line limit).
    pub entries: usize,
    /// Whether the round copied every line up to its cut (what is written during a round
    /// waits for the next).
    pub caught_up: bool,
    /// Payment channel record versions stored now.
    pub channels: u64,
    /// The cursor after the round (`0-0` before the first entry); on a cluster, the first
    /// stream's (see `cursors`).
    pub cursor: String,
    /// Each stream's cursor after the round (its key prefix, the id).
    pub cursors: Vec<(String, String)>,
    /// On a cluster, the streams this round could not copy, each with why (the others were
    /// copied; the round is not caught up).
    pub failed: Vec<String>,
    /// Whether every stream but the failed ones reached its cut.
    pub copied_caught_up: bool,
}

impl Copied {
    /// The round, or the streams it could not copy as an error.
    pub fn whole(self) -> Result<Copied, BookError> {
        if self.failed.is_empty() {
            Ok(self)
        } else {
            Err(BookError::Failed(self.failed))
        }
    }
}

/// Where the copy of stream `p` starts: the lower of the book's cursor (`cursor`; none: `0-0`)
/// and the stream's own mark. Declares the book there first if it is not (a Redis or shard
/// that lost its keys, or one not copied yet), before anything can be trimmed by age alone.
async fn start_of(ledgers: &Ledgers, p: &str, cursor: Option<&str>) -> Result<String, BookError> {
    let (declared, mark) = ledgers.booked(p).await?;
    if !declared {
        ledgers.declare(p).await?;
    }
    // From the lower of the book's cursor and the stream's own mark: a Redis that lost its
    // data (or a replica that lags) restarts its stream ids, maybe below the cursor; re-reading
    // what the book holds only yields duplicates, skipping would lose lines. No mark (nothing
    // booked here yet, or a Redis that lost its keys), or an unreadable one: from the start.
    let pg = cursor.unwrap_or("0-0");
    Ok(match mark.filter(|m| stream_id(m).is_ok()) {
        Some(mark) if stream_id(&mark)? < stream_id(pg)? => mark,
        Some(_) => pg.to_owned(),
        None => "0-0".to_owned(),
    })
}

/// One stream's failure: on a cluster it is kept (the other shards go on), on one Redis it
/// ends the round.
fn isolate(cluster: bool, slot: &mut Option<String>, e: BookError) -> Result<(), BookError> {
    if !cluster {
        return Err(e);
    }
    *slot = Some(e.to_string());
    Ok(())
}

/// The writer's metrics (docs/metrics.md).
#[derive(Clone)]
pub struct BookMetrics {
    lines: IntCounterVec,
    errors: IntCounter,
    last_success: IntGauge,
}

impl BookMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<BookMetrics> {
        let lines = IntCounterVec::new(
            Opts::new(
                "tollgate_book_lines_total",
                "Ledger lines the book of record took, by result: inserted, duplicate (already held), conflict (its key held with other content)",
            ),
            &["result"],
        )?;
        for r in ["inserted", "duplicate", "conflict"] {
            lines.with_label_values(&[r]);
        }
        let errors = IntCounter::new(
            "tollgate_book_errors_total",
            "Book rounds that failed (PostgreSQL or Redis unreachable, a row refused); retried",
        )?;
        let last_success = IntGauge::new(
            "tollgate_book_last_success_timestamp_seconds",
            "When the book of record last finished a round that copied every ledger stream (Unix time); stale while it cannot copy",
        )?;
        registry.register(Box::new(lines.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(last_success.clone()))?;
        Ok(BookMetrics {
            lines,
            errors,
            last_success,
        })
    }
}

/// One connection to the book (PostgreSQL), for the ledger of one Redis key prefix.
pub struct Book {
    client: tokio_postgres::Client,
    connection: tokio::task::JoinHandle<()>,
    prefix: String,
}

impl Drop for Book {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// A stream id `<ms>-<seq>` as numbers.
fn stream_id(id: &str) -> Result<(i64, i64), BookError> {
    id.split_once('-')
        .and_then(|(ms, seq)| Some((ms.parse().ok()?, seq.parse().ok()?)))
        .ok_or_else(|| BookError::Range {
            id: id.to_owned(),
            what: "stream id",
        })
}

/// One difference between Redis and the book.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// A ledger line (at or before the book's cursor) the book does not hold.
    MissingInBook {
        stream_id: String,
        key: String,
        account: String,
    },
    /// A book line in the span Redis still holds that Redis does not (Redis lost it).
    MissingInLedger { key: String, account: String },
    /// One line, two contents.
    Differs {
        key: String,
        account: String,
        ledger: Box<LedgerEntry>,
        book: Box<LedgerEntry>,
    },
    /// A payment channel record: Redis and the book disagree, or its credits exceed its
    /// accepted vouchers.
    Channel { id: String, what: String },
    /// An account's lifetime (credited, debited) in Redis and as its book lines add up.
    Totals {
        account: String,
        redis: (i64, i64),
        book: (i64, i64),
    },
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Difference::MissingInBook {
                stream_id,
                key,
                account,
            } => write!(
                f,
                "missing in the book: {key} on {account} (ledger entry {stream_id})"
            ),
            Difference::MissingInLedger { key, account } => {
                write!(f, "missing in the Redis ledger: {key} on {account}")
            }
            Difference::Differs {
                key,
                account,
                ledger,
                book,
            } => write!(
                f,
                "differs: {key} on {account}: ledger {ledger:?}, book {book:?}"
            ),
            Difference::Channel { id, what } => write!(f, "channel {id}: {what}"),
            Difference::Totals {
                account,
                redis,
                book,
            } => write!(
                f,
                "totals differ on {account}: Redis credited {} debited {} p$, book credited {} debited {} p$",
                redis.0, redis.1, book.0, book.1
            ),
        }
    }
}

/// The book's key of a line. A lease returned (`release`, `expire`) moves no credited or debited
/// money and its ledger key names the incarnation, which may return a lease on one account
/// more than once: its stream id makes it unique. Every other kind's key is its idempotency key.
fn book_key(id: &str, l: &LedgerEntry) -> String {
    match l.kind.as_str() {
        "release" | "expire" => format!("{}@{id}", l.key),
        _ => l.key.clone(),
    }
}

/// A usage counter of the ledger (never money: amounts are i64 already) as BIGINT, saturated:
/// a counter past 9.2e18 cannot happen, and must not stall the book if it did.
fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Book {
    /// Connects and brings the schema up to date (idempotent; concurrent starters wait).
    pub async fn connect(url: &str, prefix: &str) -> Result<Book, BookError> {
        let mut cfg: tokio_postgres::Config = url.parse()?;
        // A half-open connection must not hang the writer for the OS's hours.
        cfg.connect_timeout(Duration::from_secs(10))
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30));
        let (mut client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
        let connection = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::warn!(error = %e, "book of record: PostgreSQL connection ended");
            }
        });
        // A round abandoned at its timeout must not leave a backend holding its locks.
        client
            .batch_execute(
                "SET statement_timeout = '25s'; SET idle_in_transaction_session_timeout = '60s'",
            )
            .await?;
        for (version, sql) in MIGRATIONS {
            // The lock first: two starters at once must not race even on the bookkeeping table.
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS book_migrations (version INT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
            )
            .await?;
            let done = tx
                .query_opt(
                    "SELECT 1 FROM book_migrations WHERE version = $1",
                    &[&version],
                )
                .await?
                .is_some();
            if !done {
                tx.batch_execute(sql).await?;
                tx.execute(
                    "INSERT INTO book_migrations (version) VALUES ($1)",
                    &[&version],
                )
                .await?;
            }
            tx.commit().await?;
        }
        Ok(Book {
            client,
            connection,
            prefix: prefix.to_owned(),
        })
    }

    /// The last stream id the book holds (`0-0`: none yet), of the ledger of one Redis.
    pub async fn cursor(&self) -> Result<String, BookError> {
        self.cursor_at(&self.prefix).await
    }

    /// The last id of stream `p` the book holds (`0-0`: none yet).
    pub async fn cursor_at(&self, p: &str) -> Result<String, BookError> {
        Ok(self
            .client
            .query_opt("SELECT last_id FROM book_cursor WHERE prefix = $1", &[&p])
            .await?
            .map_or_else(|| "0-0".to_owned(), |r| r.get(0)))
    }

    /// Copies up to `count` entries of each stream after its cursor (one transaction per
    /// stream), with the payment channel records changed since the last round. On one Redis any
    /// failure ends the round; on a cluster a shard that fails (a master without its replica,
    /// say) is named in [`Copied::failed`] and the others are copied.
    pub async fn copy_round(&mut self, l: &Ledgers, count: usize) -> Result<Copied, BookError> {
        let mut conn = l.conn();
        let streams = l.streams();
        let cluster = l.is_cluster();
        let mut failed: Vec<Option<String>> = vec![None; streams.len()];
        // Where each stream's copy starts, read before the cut: the less time between the cut
        // and the pages, the fewer entries land after it.
        // Each shard at once: one that does not answer (or waits for a missing replica) must
        // not hold the others past the round's time limit.
        let cursors = self.cursors(streams).await?;
        let starts = futures_util::future::join_all(
            streams
                .iter()
                .map(|p| start_of(l, p, cursors.get(p).map(String::as_str))),
        )
        .await;
        let mut afters = vec![String::new(); streams.len()];
        for (i, start) in starts.into_iter().enumerate() {
            match start {
                Ok(a) => afters[i] = a,
                Err(e) => isolate(cluster, &mut failed[i], e)?,
            }
        }
        let starts_at = afters.clone();
        // The cut (channels::snapshot). One Redis: one Lua call reads the channel side state,
        // the changed records' ids and the ledger's last entry id at one instant. A cluster's
        // streams are in other slots than the channel records: the side state is read first,
        // then every stream's end, then the changed records. A credit line up to an end was
        // written after its voucher's record was committed, so before the records' read; a
        // credit pending at the side state's read and applied before an end is in both (the
        // rebuild counts it once), one applied after the end in the side state.
        let cp = l.channels_prefix().to_owned();
        let (side, ends) = if cluster {
            let side = channels::snapshot(&mut conn, &cp).await?;
            let read = futures_util::future::join_all(streams.iter().zip(&failed).map(
                |(p, f)| async move {
                    match f {
                        Some(_) => Ok(None),
                        None => l.end(p).await,
                    }
                },
            ))
            .await;
            let mut ends = vec![None; streams.len()];
            for (i, end) in read.into_iter().enumerate() {
                match end {
                    Ok(e) => ends[i] = e,
                    Err(e) => isolate(cluster, &mut failed[i], e)?,
                }
            }
            (Some(side), Some(ends))
        } else {
            (None, None)
        };
        // The changed channel records are stored first (each chunk in its own transaction: a
        // record ahead of the lines is always safe), then the ledger up to the cut and no
        // further, with the side state: every credit line in the book then has its voucher in a
        // stored record.
        let adopted = channels::adopt_if_needed(&mut conn, &cp).await?;
        if adopted > 0 {
            tracing::info!(
                channels = adopted,
                "book of record: copying channel records that had no version (written by an older node)"
            );
        }
        let snap = channels::snapshot(&mut conn, &cp).await?;
        let (mut stored, mut channel_conflicts) = (0u64, 0u64);
        for ids in snap.changed.chunks(500) {
            let rows = channels::records(&mut conn, &cp, ids).await?;
            let tx = self.client.transaction().await?;
            let (n, c) = store_records(&tx, &cp, &rows).await?;
            tx.commit().await?;
            channels::clean(&mut conn, &cp, &rows).await?;
            stored += n;
            channel_conflicts += c;
        }
        let ends = ends.unwrap_or_else(|| vec![snap.last.clone()]);
        let mut out = Copied {
            caught_up: true,
            channels: stored,
            conflicts: channel_conflicts,
            ..Copied::default()
        };
        // One Redis: the side state goes in its stream's transaction. A cluster's streams each
        // have their own; the side state follows once every one reached its end.
        let max_lines = (MAX_ROUND_LINES / streams.len().max(1)).max(50);
        for (i, ((p, end), after)) in streams.iter().zip(ends).zip(afters).enumerate() {
            if failed[i].is_some() {
                continue;
            }
            let bound = end.as_deref().map(stream_id).transpose()?;
            let c = match self
                .copy_stream(
                    l,
                    p,
                    after,
                    bound,
                    count,
                    max_lines,
                    (!cluster).then_some(&snap),
                )
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    isolate(cluster, &mut failed[i], e)?;
                    continue;
                }
            };
            out.inserted += c.inserted;
            out.duplicates += c.duplicates;
            out.conflicts += c.conflicts;
            out.entries += c.entries;
            out.caught_up &= c.caught_up;
            if out.cursors.is_empty() {
                out.cursor = c.cursor.clone();
            }
            out.cursors.push((p.clone(), c.cursor));
        }
        out.failed = streams
            .iter()
            .zip(failed)
            .filter_map(|(p, f)| f.map(|e| format!("{p}: {e}")))
            .collect();
        out.copied_caught_up = out.caught_up;
        out.caught_up &= out.failed.is_empty();
        if let Some(side) = side
            && out.caught_up
        {
            // Each stream's bound: its cursor before the side state was read, so every entry
            // written after the cut is past it.
            let bounds: std::collections::BTreeMap<&str, &str> = streams
                .iter()
                .map(String::as_str)
                .zip(starts_at.iter().map(String::as_str))
                .collect();
            let bounds =
                serde_json::to_string(&bounds).map_err(|e| BookError::Unusable(e.to_string()))?;
            let tx = self.client.transaction().await?;
            // Ordered by the side state's clock alone (the streams' positions are not
            // comparable).
            store_side(&tx, &cp, &side, (0, 0), Some(&bounds)).await?;
            tx.commit().await?;
        }
        Ok(out)
    }

    /// The book's cursor of each of `streams` that has one.
    async fn cursors(
        &self,
        streams: &[String],
    ) -> Result<std::collections::HashMap<String, String>, BookError> {
        let rows = self
            .client
            .query(
                "SELECT prefix, last_id FROM book_cursor WHERE prefix = ANY($1)",
                &[&streams],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Copies up to `count` entries of stream `p` after `after`, none after `bound` (the
    /// cut; `None`: the stream was empty then), in one transaction, with the side state of
    /// `side` when every line up to the cut is copied.
    #[allow(clippy::too_many_arguments)]
    async fn copy_stream(
        &mut self,
        ledgers: &Ledgers,
        p: &str,
        after: String,
        bound: Option<(i64, i64)>,
        count: usize,
        max_lines: usize,
        side: Option<&channels::Snapshot>,
    ) -> Result<Copied, BookError> {
        // Entries are at least a line each: more than `max_lines` would only be read again.
        let count = count.min(max_lines).max(1);
        // Nothing new up to the cut (most of a cluster's shards, most rounds): no page read.
        if side.is_none() && bound.is_none_or(|b| stream_id(&after).is_ok_and(|a| b <= a)) {
            return Ok(Copied {
                caught_up: true,
                cursor: after,
                ..Copied::default()
            });
        }
        let mut page = ledgers.page(p, &after, count).await?;
        let count_read = page.len();
        // Entries written after the cut wait for the next round.
        let beyond = match bound {
            Some(bound) => {
                let before = page.len();
                page.retain(|(id, _)| stream_id(id).is_ok_and(|i| i <= bound));
                page.len() < before
            }
            None => {
                let any = !page.is_empty();
                page.clear();
                any
            }
        };
        // A settle entry holds a line per account (up to 1000): a round takes whole entries
        // until it has ~max_lines lines, so that it stays well inside its time limit.
        let mut lines = 0;
        let keep = page
            .iter()
            .position(|(_, l)| {
                lines += l.len();
                lines >= max_lines
            })
            .map_or(page.len(), |i| i + 1);
        // The side state is a cut with the lines only when this round copies every line up to
        // the snapshot's last entry (a credit pending at the snapshot and applied just after it
        // is then in one or the other); a round cut short stores none.
        let reached = keep == page.len() && (beyond || count_read < count || bound.is_none());
        page.truncate(keep);
        let tx = self.client.transaction().await?;
        if reached && let Some(snap) = side {
            // An empty ledger (trimmed, or a Redis that lost it): the cut is where the book is.
            let at = match bound {
                Some(b) => b,
                None => stream_id(&after)?,
            };
            store_side(&tx, ledgers.channels_prefix(), snap, at, None).await?;
        }
        let Some((last, _)) = page.last() else {
            tx.commit().await?;
            return Ok(Copied {
                cursor: after,
                caught_up: reached,
                ..Copied::default()
            });
        };
        let last = last.clone();
        let insert = tx
            .prepare(
                "INSERT INTO book_entries (prefix, key, account, kind, amount, requests, cpu_us, deploys, rows_read, rows_written, stream_ms, stream_seq)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                 ON CONFLICT (prefix, key, account) DO NOTHING",
            )
            .await?;
        let same = tx
            .prepare(
                "SELECT kind, amount, requests, cpu_us, deploys, rows_read, rows_written
                 FROM book_entries WHERE prefix = $1 AND key = $2 AND account = $3",
            )
            .await?;
        let mut copied = Copied {
            caught_up: reached,
            entries: page.len(),
            cursor: last.clone(),
            ..Copied::default()
        };
        for (id, lines) in &page {
            let (ms, seq) = stream_id(id)?;
            for l in lines {
                let key = book_key(id, l);
                let n = tx
                    .execute(
                        &insert,
                        &[
                            &p,
                            &key,
                            &l.account,
                            &l.kind,
                            &l.amount,
                            &big(l.requests),
                            &big(l.cpu_us),
                            &big(l.deploys),
                            &big(l.rows_read),
                            &big(l.rows_written),
                            &ms,
                            &seq,
                        ],
                    )
                    .await?;
                if n == 1 {
                    copied.inserted += 1;
                    continue;
                }
                let held = tx.query_one(&same, &[&p, &key, &l.account]).await?;
                let same_content = held.get::<_, String>(0) == l.kind
                    && held.get::<_, i64>(1) == l.amount
                    && held.get::<_, i64>(2) == big(l.requests)
                    && held.get::<_, i64>(3) == big(l.cpu_us)
                    && held.get::<_, i64>(4) == big(l.deploys)
                    && held.get::<_, i64>(5) == big(l.rows_read)
                    && held.get::<_, i64>(6) == big(l.rows_written);
                if same_content {
                    copied.duplicates += 1;
                } else {
                    copied.conflicts += 1;
                    tracing::error!(key = %key, account = %l.account, stream_id = %id, stream = %p, "book of record: a ledger line reuses a key the book holds with other content (was the Redis ledger reset?); kept in book_conflicts");
                    tx.execute(
                        "INSERT INTO book_conflicts (prefix, stream_ms, stream_seq, key, account, kind, amount)
                         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                        &[&p, &ms, &seq, &key, &l.account, &l.kind, &l.amount],
                    )
                    .await?;
                }
            }
        }
        tx.execute(
            "INSERT INTO book_cursor (prefix, last_id) VALUES ($1, $2)
             ON CONFLICT (prefix) DO UPDATE SET last_id = EXCLUDED.last_id",
            &[&p, &last],
        )
        .await?;
        tx.commit().await?;
        // After the commit: a crash before this line only delays trimming.
        ledgers.mark_booked(p, &last).await?;
        Ok(copied)
    }

    /// The ledger position the stored side state was cut at (`(0, 0)`: none stored).
    pub async fn side_state_bound(&self) -> Result<(i64, i64), BookError> {
        Ok(self
            .client
            .query_opt(
                "SELECT bound_ms, bound_seq FROM book_channel_state WHERE prefix = $1",
                &[&self.prefix],
            )
            .await?
            .map_or((0, 0), |r| (r.get(0), r.get(1))))
    }

    /// Per stream of `l`, a position every entry written after the stored side state's cut is
    /// past: the cut itself on one Redis, each stream's cursor when the cut's round began on a
    /// cluster (`(0, 0)`: none stored).
    pub async fn side_state_bounds(&self, l: &Ledgers) -> Result<Vec<(i64, i64)>, BookError> {
        let row = self
            .client
            .query_opt(
                "SELECT bound_ms, bound_seq, stream_bounds FROM book_channel_state WHERE prefix = $1",
                &[&l.channels_prefix()],
            )
            .await?;
        let Some(row) = row else {
            return Ok(vec![(0, 0); l.streams().len()]);
        };
        if !l.is_cluster() {
            return Ok(vec![(row.get(0), row.get(1))]);
        }
        let bounds: std::collections::BTreeMap<String, String> =
            match row.get::<_, Option<String>>(2) {
                Some(j) => serde_json::from_str(&j).map_err(|e| {
                    BookError::Unusable(format!("book_channel_state.stream_bounds: {e}"))
                })?,
                None => Default::default(),
            };
        l.streams()
            .iter()
            .map(|p| bounds.get(p).map_or(Ok((0, 0)), |b| stream_id(b)))
            .collect()
    }

    /// Deploy and rollback charges (`deploy:<ref>`, with account and amount) booked after
    /// `after` whose refund the book does not hold: their held reversals, if any, were made
    /// after the stored side state.
    pub async fn start_charges_after(
        &self,
        after: (i64, i64),
    ) -> Result<Vec<(String, String, i64)>, BookError> {
        self.start_charges_after_at(&self.prefix, after).await
    }

    /// [`Book::start_charges_after`] in stream `p`.
    async fn start_charges_after_at(
        &self,
        p: &str,
        after: (i64, i64),
    ) -> Result<Vec<(String, String, i64)>, BookError> {
        let rows = self
            .client
            .query(
                "SELECT c.key, c.account, c.amount FROM book_entries c
                 WHERE c.prefix = $1 AND c.kind = 'charge' AND c.key LIKE 'charge:deploy:%'
                   AND (c.stream_ms, c.stream_seq) > ($2, $3)
                   AND NOT EXISTS (SELECT 1 FROM book_entries r
                                   WHERE r.prefix = c.prefix AND r.kind = 'credit'
                                     AND r.key = 'credit:refund:' || substr(c.key, 8))",
                &[&p, &after.0, &after.1],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let key: String = r.get(0);
                (
                    key.strip_prefix("charge:").unwrap_or(&key).to_owned(),
                    r.get(1),
                    r.get(2),
                )
            })
            .collect())
    }

    /// Every channel record the book holds, and the last side state stored (one Redis).
    pub async fn channels(&self) -> Result<(Vec<ChannelRow>, SideState), BookError> {
        self.channels_at(&self.prefix).await
    }

    /// Every channel record the book holds under channel key prefix `p`, and the last side
    /// state stored there.
    pub async fn channels_at(&self, p: &str) -> Result<(Vec<ChannelRow>, SideState), BookError> {
        let rows = self
            .client
            .query(
                "SELECT id, version, record FROM book_channels WHERE prefix = $1 ORDER BY id",
                &[&p],
            )
            .await?;
        let rows = rows
            .iter()
            .map(|r| ChannelRow {
                id: r.get(0),
                version: r.get(1),
                record: r.get(2),
            })
            .collect();
        let side = match self
            .client
            .query_opt(
                "SELECT state FROM book_channel_state WHERE prefix = $1",
                &[&p],
            )
            .await?
        {
            Some(r) => serde_json::from_str(&r.get::<_, String>(0))
                .map_err(|e| BookError::Unusable(format!("book_channel_state: {e}")))?,
            None => SideState::default(),
        };
        Ok((rows, side))
    }

    /// `book rebuild`: refuses (before anything is written) a Redis that holds payment channel
    /// state already.
    pub async fn check_channels_empty(&self, store: &RedisStore) -> Result<(), BookError> {
        self.check_channels_empty_at(&Ledgers::of(store)).await
    }

    /// [`Book::check_channels_empty`] where `l` keeps its channel records.
    pub async fn check_channels_empty_at(&self, l: &Ledgers) -> Result<(), BookError> {
        channels::check_empty(&mut l.conn(), l.channels_prefix())
            .await
            .map_err(BookError::Unusable)
    }

    /// `book rebuild`: writes the book's channel records and side state into the empty Redis
    /// behind `store` (after the money state, whose credit keys `set` holds).
    pub async fn restore_channels(
        &self,
        store: &RedisStore,
        set: &RestoreSet,
        start_hold: Duration,
    ) -> Result<ChannelsRestored, BookError> {
        self.restore_channels_at(&Ledgers::of(store), &set.credits, start_hold)
            .await
    }

    /// [`Book::restore_channels`] where `l` keeps its channel records; `credits`: every credit
    /// key the restored money state holds (all shards').
    pub async fn restore_channels_at(
        &self,
        l: &Ledgers,
        credits: &std::collections::BTreeMap<String, (String, i64)>,
        start_hold: Duration,
    ) -> Result<ChannelsRestored, BookError> {
        let (rows, mut side) = self.channels_at(l.channels_prefix()).await?;
        // A start charged after the side state's cut has its reversal held again (unless the
        // book holds its refund): whether it went live is not known, and a customer must not
        // pay for a start that did not. One that did is then given for free (named).
        let due = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
            .saturating_add(start_hold.as_millis() as u64);
        let mut rehold = Vec::new();
        let bounds = self.side_state_bounds(l).await?;
        for (p, bound) in l.streams().iter().zip(bounds) {
            for (charge, account, amount) in self.start_charges_after_at(p, bound).await? {
                let key = format!("refund:{charge}");
                if side.held.contains_key(&key) || side.pending.contains_key(&key) {
                    continue;
                }
                let credit = serde_json::json!({
                    "key": key, "account": account, "picos": amount,
                    "reverses": charge, "not_before_ms": due,
                });
                side.held.insert(key, credit.to_string());
                rehold.push(charge);
            }
        }
        let mut conn = l.conn();
        let mut out = channels::restore(&mut conn, l.channels_prefix(), &rows, &side, credits)
            .await
            .map_err(BookError::Unusable)?;
        for charge in rehold {
            out.warnings.push(format!(
                "start charge {charge} was booked after the last channel state: its reversal is held again and gives it back at the deadline unless the start is kept (a start that went live is then free)"
            ));
        }
        Ok(out)
    }

    /// Every line the book holds, in stream order (for reconciliation and tests).
    pub async fn lines(&self) -> Result<Vec<LedgerEntry>, BookError> {
        self.lines_at(&self.prefix).await
    }

    /// Every line the book holds of stream `p`, in stream order.
    pub async fn lines_at(&self, p: &str) -> Result<Vec<LedgerEntry>, BookError> {
        Ok(self
            .lines_between(p, (0, 0), (i64::MAX, i64::MAX))
            .await?
            .into_iter()
            .map(|(_, l)| l)
            .collect())
    }

    /// The lines whose stream id is in `(after, upto]`, with their stream ids, in stream order.
    async fn lines_between(
        &self,
        p: &str,
        after: (i64, i64),
        upto: (i64, i64),
    ) -> Result<Vec<(String, LedgerEntry)>, BookError> {
        let rows = self
            .client
            .query(
                "SELECT kind, key, account, amount, requests, cpu_us, deploys, rows_read, rows_written, stream_ms, stream_seq
                 FROM book_entries
                 WHERE prefix = $1 AND (stream_ms, stream_seq) > ($2, $3) AND (stream_ms, stream_seq) <= ($4, $5)
                 ORDER BY stream_ms, stream_seq, key, account",
                &[&p, &after.0, &after.1, &upto.0, &upto.1],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let id = format!("{}-{}", r.get::<_, i64>(9), r.get::<_, i64>(10));
                // The ledger's own key (see `book_key`).
                let key: String = r.get(1);
                let key = key
                    .strip_suffix(&format!("@{id}"))
                    .map_or_else(|| key.clone(), str::to_owned);
                let line = LedgerEntry {
                    kind: r.get(0),
                    key,
                    account: r.get(2),
                    amount: r.get(3),
                    requests: r.get::<_, i64>(4).max(0) as u64,
                    cpu_us: r.get::<_, i64>(5).max(0) as u64,
                    deploys: r.get::<_, i64>(6).max(0) as u64,
                    rows_read: r.get::<_, i64>(7).max(0) as u64,
                    rows_written: r.get::<_, i64>(8).max(0) as u64,
                };
                (id, line)
            })
            .collect())
    }

    /// One [`RestoreSet`] per stream of `l`, in its order (one Redis: one), each with the
    /// book's lines under `settle_keys` in that stream (a journal batch is checked against
    /// them).
    pub async fn restore_sets(
        &self,
        l: &Ledgers,
        settle_keys: &[String],
    ) -> Result<Vec<RestoreSet>, BookError> {
        let mut out = Vec::with_capacity(l.streams().len());
        for p in l.streams() {
            let mut set = self.restore_set_at(p).await?;
            set.settle_lines = self.lines_of_at(p, settle_keys).await?;
            out.push(set);
        }
        Ok(out)
    }

    /// Everything the book's lines add up to, for `tollgate book rebuild`: every account's
    /// lifetime totals, every credit and charge key, every incarnation's high-water mark and
    /// every node's highest epoch. Read page by page (keyset on the primary key).
    pub async fn restore_set(&self) -> Result<RestoreSet, BookError> {
        self.restore_set_at(&self.prefix).await
    }

    /// [`Book::restore_set`] of stream `p`.
    async fn restore_set_at(&self, p: &str) -> Result<RestoreSet, BookError> {
        let mut set = RestoreSet::default();
        let (mut key, mut account) = (String::new(), String::new());
        loop {
            let rows = self
                .client
                .query(
                    "SELECT kind, key, account, amount FROM book_entries
                     WHERE prefix = $1 AND (key, account) > ($2, $3)
                     ORDER BY key, account LIMIT 10000",
                    &[&p, &key, &account],
                )
                .await?;
            let Some(last) = rows.last() else { break };
            key = last.get(1);
            account = last.get(2);
            for r in &rows {
                let line = LedgerEntry {
                    kind: r.get(0),
                    key: r.get(1),
                    account: r.get(2),
                    amount: r.get(3),
                    requests: 0,
                    cpu_us: 0,
                    deploys: 0,
                    rows_read: 0,
                    rows_written: 0,
                };
                set.add(&line).map_err(BookError::Unusable)?;
            }
        }
        Ok(set)
    }

    /// The (account, amount) lines the book holds under each of `keys`, sorted (for
    /// `rebuild` to check a journal's batch against what was booked under its key).
    pub async fn lines_of(
        &self,
        keys: &[String],
    ) -> Result<std::collections::BTreeMap<String, Vec<(String, i64)>>, BookError> {
        self.lines_of_at(&self.prefix, keys).await
    }

    /// [`Book::lines_of`] in stream `p`.
    async fn lines_of_at(
        &self,
        p: &str,
        keys: &[String],
    ) -> Result<std::collections::BTreeMap<String, Vec<(String, i64)>>, BookError> {
        let mut out: std::collections::BTreeMap<String, Vec<(String, i64)>> =
            std::collections::BTreeMap::new();
        for chunk in keys.chunks(1000) {
            let rows = self
                .client
                .query(
                    "SELECT key, account, amount FROM book_entries
                     WHERE prefix = $1 AND key = ANY($2) ORDER BY key, account",
                    &[&p, &chunk],
                )
                .await?;
            for r in &rows {
                out.entry(r.get(0)).or_default().push((r.get(1), r.get(2)));
            }
        }
        for v in out.values_mut() {
            v.sort();
        }
        Ok(out)
    }

    /// Lines set aside as conflicts (`book_conflicts`): a rebuild uses the book's first rows.
    pub async fn conflict_count(&self) -> Result<i64, BookError> {
        let row = self
            .client
            .query_one(
                "SELECT count(*) FROM book_conflicts WHERE prefix = $1",
                &[&self.prefix],
            )
            .await?;
        Ok(row.get(0))
    }

    /// The shard streams (`{prefix:m<n>}`) the book holds lines or a cursor of under
    /// `prefix`: a rebuild must read every one.
    pub async fn shard_streams(&self, prefix: &str) -> Result<Vec<String>, BookError> {
        let head = format!("{{{prefix}:m");
        let rows = self
            .client
            .query(
                "SELECT prefix FROM book_cursor WHERE left(prefix, length($1)) = $1
                 UNION SELECT DISTINCT prefix FROM book_entries WHERE left(prefix, length($1)) = $1",
                &[&head],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Whether the book holds lines or a cursor of stream `p`.
    pub async fn holds_stream(&self, p: &str) -> Result<bool, BookError> {
        let row = self
            .client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM book_cursor WHERE prefix = $1)
                     OR EXISTS (SELECT 1 FROM book_entries WHERE prefix = $1)",
                &[&p],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Lines of `l`'s streams set aside as conflicts.
    pub async fn conflicts_in(&self, l: &Ledgers) -> Result<i64, BookError> {
        let row = self
            .client
            .query_one(
                "SELECT count(*) FROM book_conflicts WHERE prefix = ANY($1)",
                &[&l.streams()],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Every account the book has lines of in stream `p`.
    async fn accounts(&self, p: &str) -> Result<Vec<String>, BookError> {
        let rows = self
            .client
            .query(
                "SELECT DISTINCT account FROM book_entries WHERE prefix = $1 ORDER BY account",
                &[&p],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Per account of `accounts`: (credited, debited) as the book's lines up to stream id
    /// `upto` add up (p$).
    async fn totals_upto(
        &self,
        p: &str,
        accounts: &[String],
        upto: (i64, i64),
    ) -> Result<std::collections::HashMap<String, (i64, i64)>, BookError> {
        let rows = self
            .client
            .query(
                "SELECT account,
                        COALESCE(SUM(amount) FILTER (WHERE kind = 'credit'), 0)::bigint,
                        COALESCE(SUM(amount) FILTER (WHERE kind NOT IN ('credit', 'release', 'expire')), 0)::bigint
                 FROM book_entries
                 WHERE prefix = $1 AND account = ANY($2) AND (stream_ms, stream_seq) <= ($3, $4)
                 GROUP BY account",
                &[&p, &accounts, &upto.0, &upto.1],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect())
    }

    /// Compares the book with the Redis ledger and the accounts' lifetime totals, after
    /// copying what is new (idempotent). Every difference is returned; none means: every line
    /// Redis still holds up to the book's cursor is in the book with the same content, every
    /// book line in that span is still in Redis, and each account's `credited` and `debited`
    /// in Redis equal its book lines' sums (which needs a book kept since the ledger began).
    pub async fn reconcile(&mut self, l: &Ledgers) -> Result<Vec<Difference>, BookError> {
        while !self.copy_round(l, 500).await?.whole()?.caught_up {}
        let mut out = Vec::new();
        for p in l.streams() {
            out.extend(self.reconcile_stream(l, p).await?);
        }
        out.extend(self.reconcile_channels(l).await?);
        for p in l.streams() {
            out.extend(self.reconcile_totals(l, p).await?);
        }
        Ok(out)
    }

    /// The lines of stream `p` (see [`Book::reconcile`]).
    async fn reconcile_stream(
        &mut self,
        l: &Ledgers,
        p: &str,
    ) -> Result<Vec<Difference>, BookError> {
        let cursor = stream_id(&self.cursor_at(p).await?)?;
        let mut out = Vec::new();
        let mut after = "0-0".to_owned();
        let mut book_after = (0i64, 0i64);
        let mut first = true;
        // (stream id, key, account) → amount of the ledger lines missing in the book.
        let mut ledger_amounts: std::collections::HashMap<(String, String, String), i64> =
            std::collections::HashMap::new();
        loop {
            let page = l.page(p, &after, 500).await?;
            let Some((last, _)) = page.last() else { break };
            after = last.clone();
            // Only up to the cursor: what lies beyond is not the book's yet.
            let page: Vec<_> = page
                .into_iter()
                .filter(|(id, _)| stream_id(id).is_ok_and(|i| i <= cursor))
                .collect();
            let Some((page_last, _)) = page.last() else {
                break;
            };
            let upto = stream_id(page_last)?;
            if first {
                // Book lines older than what Redis still holds were trimmed there: not compared.
                let (ms, seq) = stream_id(&page[0].0)?;
                book_after = if seq > 0 {
                    (ms, seq - 1)
                } else {
                    (ms - 1, i64::MAX)
                };
                first = false;
            }
            let booked = self.lines_between(p, book_after, upto).await?;
            book_after = upto;
            type Line = (String, String, String);
            let mut in_book: std::collections::BTreeMap<Line, LedgerEntry> = booked
                .into_iter()
                .map(|(id, l)| ((id, l.key.clone(), l.account.clone()), l))
                .collect();
            for (id, lines) in page {
                for l in lines {
                    match in_book.remove(&(id.clone(), l.key.clone(), l.account.clone())) {
                        None => {
                            ledger_amounts
                                .insert((id.clone(), l.key.clone(), l.account.clone()), l.amount);
                            out.push(Difference::MissingInBook {
                                stream_id: id.clone(),
                                key: l.key,
                                account: l.account,
                            })
                        }
                        Some(b) if b != l => out.push(Difference::Differs {
                            key: l.key.clone(),
                            account: l.account.clone(),
                            ledger: Box::new(l),
                            book: Box::new(b),
                        }),
                        Some(_) => {}
                    }
                }
            }
            out.extend(in_book.into_values().map(|b| Difference::MissingInLedger {
                key: b.key,
                account: b.account,
            }));
        }
        // A ledger line the book holds under its key at another position (a batch replayed
        // into a new Redis by `rebuild`, booked at its first position) is not missing.
        let missing: Vec<String> = out
            .iter()
            .filter_map(|d| match d {
                Difference::MissingInBook { key, .. } => Some(key.clone()),
                _ => None,
            })
            .collect();
        if !missing.is_empty() {
            let held = self.lines_of_at(p, &missing).await?;
            let mut amounts: std::collections::HashMap<(String, String), i64> =
                std::collections::HashMap::new();
            for (k, lines) in &held {
                for (account, amount) in lines {
                    amounts.insert((k.clone(), account.clone()), *amount);
                }
            }
            let ledger_amounts = &ledger_amounts;
            out.retain(|d| match d {
                Difference::MissingInBook {
                    stream_id,
                    key,
                    account,
                } => {
                    let here =
                        ledger_amounts.get(&(stream_id.clone(), key.clone(), account.clone()));
                    let there = amounts.get(&(key.clone(), account.clone()));
                    !(here.is_some() && here == there)
                }
                _ => true,
            });
        }
        // Book lines after Redis's last entry: Redis lost its tail (a failover to a replica
        // that had not received it).
        let last = channels::ledger_end_and_totals(&mut l.conn(), p, &[])
            .await?
            .0;
        if let Some(last) = last {
            let last = stream_id(&last)?;
            out.extend(
                self.lines_between(p, last, (i64::MAX, i64::MAX))
                    .await?
                    .into_iter()
                    .map(|(_, b)| Difference::MissingInLedger {
                        key: b.key,
                        account: b.account,
                    }),
            );
        }
        Ok(out)
    }

    /// The accounts' totals of stream `p` (see [`Book::reconcile`]).
    async fn reconcile_totals(
        &mut self,
        l: &Ledgers,
        p: &str,
    ) -> Result<Vec<Difference>, BookError> {
        let mut out = Vec::new();
        // Totals, consistently: per chunk of accounts, Redis's totals and its ledger's last id
        // read at one instant, the book brought up to that id, and its sums up to that id.
        let accounts = self.accounts(p).await?;
        for chunk in accounts.chunks(500) {
            let (end, redis_totals) =
                channels::ledger_end_and_totals(&mut l.conn(), p, chunk).await?;
            let upto = match &end {
                Some(e) => stream_id(e)?,
                None => (i64::MAX, i64::MAX),
            };
            // The book up to that id (each round copies up to a later snapshot).
            for _ in 0..100 {
                if stream_id(&self.cursor_at(p).await?)? >= upto || end.is_none() {
                    break;
                }
                if self.copy_round(l, 500).await?.whole()?.entries == 0 {
                    break;
                }
            }
            let book = self.totals_upto(p, chunk, upto).await?;
            for (account, redis) in chunk.iter().zip(redis_totals) {
                let book = book.get(account).copied().unwrap_or((0, 0));
                if redis != book {
                    out.push(Difference::Totals {
                        account: account.clone(),
                        redis,
                        book,
                    });
                }
            }
        }
        Ok(out)
    }
}

impl Book {
    /// The channel part of `reconcile`: every record in Redis is in the book at its version
    /// (or newer in Redis and marked changed), none is older in Redis than in the book, and
    /// no channel's voucher credits in the book exceed its accepted cumulative.
    async fn reconcile_channels(&self, l: &Ledgers) -> Result<Vec<Difference>, BookError> {
        let mut out = Vec::new();
        let mut conn = l.conn();
        let p = l.channels_prefix();
        // Redis first, then the book: a commit in between shows as a newer version in the
        // book, never as a Redis record the book lacks.
        let (ver, dirty, ids): (
            std::collections::HashMap<String, i64>,
            std::collections::HashMap<String, i64>,
            Vec<String>,
        ) = redis::pipe()
            .atomic()
            .cmd("HGETALL")
            .arg(channels::key(p, "ver"))
            .cmd("HGETALL")
            .arg(channels::key(p, "dirty"))
            .cmd("SMEMBERS")
            .arg(channels::key(p, "channels"))
            .query_async(&mut conn)
            .await?;
        let (rows, _) = self.channels_at(p).await?;
        for id in ids.iter().filter(|id| !ver.contains_key(*id)) {
            out.push(Difference::Channel {
                id: id.clone(),
                what: "has no version in Redis (written by a node older than the book's copy of channels): the book may not hold it".to_owned(),
            });
        }
        let mut in_book = std::collections::HashSet::new();
        for r in &rows {
            in_book.insert(r.id.as_str());
            let diff = |what: String| Difference::Channel {
                id: r.id.clone(),
                what,
            };
            match ver.get(&r.id) {
                None => out.push(diff(format!(
                    "in the book (version {}) but not in Redis (Redis lost it)",
                    r.version
                ))),
                Some(v) if *v < r.version && !dirty.contains_key(&r.id) => out.push(diff(format!(
                    "Redis holds version {v}, older than the book's {} (Redis lost writes)",
                    r.version
                ))),
                Some(v) if *v < r.version => {}
                Some(v) if *v == r.version => {
                    let held: Option<String> = redis::cmd("GET")
                        .arg(channels::key(p, &format!("ch:{}", r.id)))
                        .query_async(&mut conn)
                        .await?;
                    if held.as_deref() != Some(r.record.as_str()) {
                        out.push(diff(format!(
                            "version {v} differs between Redis and the book"
                        )));
                    }
                }
                Some(v) if !dirty.contains_key(&r.id) => out.push(diff(format!(
                    "Redis holds version {v}, the book {}, and it is not marked changed",
                    r.version
                ))),
                Some(_) => {}
            }
        }
        for (id, v) in &ver {
            if !in_book.contains(id.as_str()) && !dirty.contains_key(id) {
                out.push(Difference::Channel {
                    id: id.clone(),
                    what: format!("version {v} in Redis is missing in the book"),
                });
            }
        }
        // The book's voucher credits per channel against the record's accepted cumulative.
        let credits = self
            .client
            .query(
                "SELECT key, amount FROM book_entries
                 WHERE prefix = ANY($1) AND kind = 'credit' AND key LIKE 'credit:mpp:%'",
                &[&l.streams()],
            )
            .await?;
        let mut credited: std::collections::BTreeMap<String, i128> =
            std::collections::BTreeMap::new();
        for c in &credits {
            let key: String = c.get(0);
            if let Some((id, _)) = key
                .strip_prefix("credit:")
                .and_then(channels::voucher_credit)
            {
                *credited.entry(id.to_owned()).or_default() += i128::from(c.get::<_, i64>(1));
            }
        }
        for r in &rows {
            let total = credited.get(&r.id).copied().unwrap_or(0);
            let owed = channels::highest(&r.record)
                .and_then(|h| i128::try_from(h).ok())
                .and_then(|h| {
                    h.checked_mul(i128::from(tollgate_metering::units::PICOS_PER_BASE_UNIT))
                });
            match owed {
                Some(owed) if total > owed => out.push(Difference::Channel {
                    id: r.id.clone(),
                    what: format!(
                        "credited {total} p$ in the book, more than its accepted vouchers ({owed} p$)"
                    ),
                }),
                Some(_) => {}
                None => out.push(Difference::Channel {
                    id: r.id.clone(),
                    what: "the book's record does not read".to_owned(),
                }),
            }
        }
        Ok(out)
    }
}

/// Stores channel records, each only over a lower version. Returns (stored, conflicts): a
/// record the book holds at the same version with other content, or at a higher version (a
/// Redis that lost writes), is a conflict (logged; `reconcile` names it); one held the same is
/// a duplicate.
async fn store_records(
    tx: &tokio_postgres::Transaction<'_>,
    prefix: &str,
    rows: &[ChannelRow],
) -> Result<(u64, u64), BookError> {
    if rows.is_empty() {
        return Ok((0, 0));
    }
    let upsert = tx
        .prepare(
            "INSERT INTO book_channels (prefix, id, version, record) VALUES ($1, $2, $3, $4)
             ON CONFLICT (prefix, id) DO UPDATE
             SET version = EXCLUDED.version, record = EXCLUDED.record, booked_at = now()
             WHERE book_channels.version < EXCLUDED.version",
        )
        .await?;
    let held = tx
        .prepare("SELECT version, record FROM book_channels WHERE prefix = $1 AND id = $2")
        .await?;
    let (mut stored, mut conflicts) = (0, 0);
    for r in rows {
        if tx
            .execute(&upsert, &[&prefix, &r.id, &r.version, &r.record])
            .await?
            == 1
        {
            stored += 1;
            continue;
        }
        let row = tx.query_one(&held, &[&prefix, &r.id]).await?;
        let (version, record): (i64, String) = (row.get(0), row.get(1));
        if version == r.version && record == r.record {
            continue;
        }
        conflicts += 1;
        tracing::error!(channel = %r.id, redis_version = r.version, book_version = version, "book of record: a channel record in Redis is older than, or differs from, the book's at its version (did Redis lose writes?); the book's stays");
    }
    Ok((stored, conflicts))
}

/// Stores the snapshot's side state (pending, poisoned, dropped, held credits, forced set,
/// cursor), replacing one cut at an earlier (or the same) ledger entry, in the round's
/// transaction.
async fn store_side(
    tx: &tokio_postgres::Transaction<'_>,
    prefix: &str,
    snap: &channels::Snapshot,
    bound: (i64, i64),
    stream_bounds: Option<&str>,
) -> Result<(), BookError> {
    let state =
        serde_json::to_string(&snap.side).map_err(|e| BookError::Unusable(e.to_string()))?;
    // Never over a snapshot cut at a later ledger entry (two writers racing).
    tx.execute(
        "INSERT INTO book_channel_state (prefix, taken_us, bound_ms, bound_seq, state, stream_bounds)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (prefix) DO UPDATE
         SET taken_us = EXCLUDED.taken_us, bound_ms = EXCLUDED.bound_ms,
             bound_seq = EXCLUDED.bound_seq, state = EXCLUDED.state,
             stream_bounds = EXCLUDED.stream_bounds, booked_at = now()
         WHERE (book_channel_state.bound_ms, book_channel_state.bound_seq, book_channel_state.taken_us)
               <= (EXCLUDED.bound_ms, EXCLUDED.bound_seq, EXCLUDED.taken_us)",
        &[&prefix, &snap.taken_us, &bound.0, &bound.1, &state, &stream_bounds],
    )
    .await?;
    Ok(())
}

/// The writer: copies rounds of 500 entries until caught up, then waits `interval`; reconnects
/// to Redis and PostgreSQL (backing off up to 5 s) when either fails, and gives a round at most
/// 30 s. Declares the book to the ledger first, so that nothing is trimmed before it is copied.
/// Runs until `stop`.
pub async fn run(
    postgres_url: String,
    redis: tollgate_kv::Target,
    prefix: String,
    shards: u32,
    interval: Duration,
    metrics: BookMetrics,
    mut stop: watch::Receiver<bool>,
) {
    const BATCH: usize = 500;
    let mut wait = Duration::from_millis(100);
    let mut store: Option<Ledgers> = None;
    let mut book: Option<Book> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        let round = async {
            if store.is_none() {
                // Each round declares the book on every stream it reads before copying (a
                // shard that cannot be written to must not stop the others).
                store = Some(Ledgers::connect(&redis, &prefix, shards).await?);
            }
            if book.is_none() {
                book = Some(Book::connect(&postgres_url, &prefix).await?);
            }
            match (book.as_mut(), store.as_ref()) {
                (Some(b), Some(s)) => b.copy_round(s, BATCH).await,
                _ => Ok(Copied::default()),
            }
        };
        let round = match tokio::time::timeout(Duration::from_secs(30), round).await {
            Ok(r) => r,
            Err(_) => Err(BookError::Timeout),
        };
        let pause = match round {
            Ok(c) => {
                metrics
                    .lines
                    .with_label_values(&["inserted"])
                    .inc_by(c.inserted);
                metrics
                    .lines
                    .with_label_values(&["duplicate"])
                    .inc_by(c.duplicates);
                metrics
                    .lines
                    .with_label_values(&["conflict"])
                    .inc_by(c.conflicts);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                if c.failed.is_empty() {
                    metrics.last_success.set(now);
                    wait = Duration::from_millis(100);
                    if c.caught_up {
                        interval
                    } else {
                        Duration::ZERO
                    }
                } else {
                    // Some shards could not be copied (the others were): retried, backing off
                    // once the others are caught up.
                    metrics.errors.inc();
                    for f in &c.failed {
                        tracing::warn!(stream = %f, "book of record: a ledger stream could not be copied this round; retrying (it keeps what is not copied)");
                    }
                    if c.copied_caught_up {
                        let w = wait;
                        wait = (wait * 2).min(Duration::from_secs(5));
                        w
                    } else {
                        Duration::ZERO
                    }
                }
            }
            Err(e) => {
                metrics.errors.inc();
                tracing::warn!(error = %e, "book of record: round failed; retrying (the ledger keeps what is not copied)");
                book = None;
                if matches!(e, BookError::Store(_) | BookError::Redis(_)) {
                    store = None;
                }
                let w = wait;
                wait = (wait * 2).min(Duration::from_secs(5));
                w
            }
        };
        if !pause.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}
