//! The book of record (docs/book.md): every line of the Redis ledger stream — credits, settle
//! batches, deploy charges and refunds, write-offs, lease returns — copied into PostgreSQL.
//!
//! At least once in, exactly once stored: a round reads the entries after the book's cursor,
//! inserts their lines keyed by (idempotency key, account) with `ON CONFLICT DO NOTHING` and
//! moves the cursor in the same transaction; only then does it tell Redis how far the book
//! holds (`mark_booked`), and the ledger's reaper never trims past that point. A crash anywhere
//! repeats at most one round, whose lines are then counted as duplicates.

use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::watch;
use tollgate_metering::{LedgerEntry, RedisStore, StoreError};

/// The schema, applied in order, each once (`book_migrations`).
const MIGRATIONS: [(i32, &str); 1] = [(1, include_str!("../migrations/0001_book.sql"))];

/// Serialises concurrent starters' migrations (any constant unique to this schema).
const MIGRATION_LOCK: i64 = 0x746f_6c6c_626f_6f6b;

#[derive(Debug, thiserror::Error)]
pub enum BookError {
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("ledger: {0}")]
    Store(#[from] StoreError),
    /// A value the book cannot hold as it is (never seen: the ledger's values are i64).
    #[error("ledger entry {id}: {what} out of range")]
    Range { id: String, what: &'static str },
}

/// What one round copied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Copied {
    /// Lines stored now.
    pub inserted: u64,
    /// Lines the book already held (a round repeated after a crash, or a replayed stream).
    pub duplicates: u64,
    /// Stream entries read.
    pub entries: usize,
    /// The cursor after the round (`0-0` before the first entry).
    pub cursor: String,
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
                "Ledger lines the book of record took, by result: inserted, duplicate (already held)",
            ),
            &["result"],
        )?;
        for r in ["inserted", "duplicate"] {
            lines.with_label_values(&[r]);
        }
        let errors = IntCounter::new(
            "tollgate_book_errors_total",
            "Book rounds that failed (PostgreSQL or Redis unreachable, a row refused); retried",
        )?;
        let last_success = IntGauge::new(
            "tollgate_book_last_success_timestamp_seconds",
            "When the book of record last finished a round (Unix time); stale while it cannot copy",
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

/// The book's key of a line. A lease returned (`release`, `expire`) moves no credited or debited
/// money and its ledger key names the incarnation, which may return a lease on one account
/// more than once: its stream id makes it unique. Every other kind's key is its idempotency key.
fn book_key(id: &str, l: &LedgerEntry) -> String {
    match l.kind.as_str() {
        "release" | "expire" => format!("{}@{id}", l.key),
        _ => l.key.clone(),
    }
}

/// A u64 counter of the ledger as BIGINT.
fn big(id: &str, what: &'static str, v: u64) -> Result<i64, BookError> {
    i64::try_from(v).map_err(|_| BookError::Range {
        id: id.to_owned(),
        what,
    })
}

impl Book {
    /// Connects and brings the schema up to date (idempotent; concurrent starters wait).
    pub async fn connect(url: &str, prefix: &str) -> Result<Book, BookError> {
        let (mut client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        let connection = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::warn!(error = %e, "book of record: PostgreSQL connection ended");
            }
        });
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS book_migrations (version INT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
            )
            .await?;
        for (version, sql) in MIGRATIONS {
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
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

    /// The last stream id the book holds (`0-0`: none yet).
    pub async fn cursor(&self) -> Result<String, BookError> {
        Ok(self
            .client
            .query_opt(
                "SELECT last_id FROM book_cursor WHERE prefix = $1",
                &[&self.prefix],
            )
            .await?
            .map_or_else(|| "0-0".to_owned(), |r| r.get(0)))
    }

    /// Copies up to `count` stream entries after the cursor, in one transaction.
    pub async fn copy_round(
        &mut self,
        store: &RedisStore,
        count: usize,
    ) -> Result<Copied, BookError> {
        let after = self.cursor().await?;
        let page = store.ledger_page(&after, count).await?;
        let Some((last, _)) = page.last() else {
            // Nothing new; the mark is refreshed (it may have been lost with a Redis restart).
            if after != "0-0" {
                store.mark_booked(&after).await?;
            }
            return Ok(Copied {
                cursor: after,
                ..Copied::default()
            });
        };
        let last = last.clone();
        let tx = self.client.transaction().await?;
        let insert = tx
            .prepare(
                "INSERT INTO book_entries (prefix, key, account, kind, amount, requests, cpu_us, deploys, rows_read, rows_written, stream_id)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                 ON CONFLICT (prefix, key, account) DO NOTHING",
            )
            .await?;
        let mut copied = Copied {
            entries: page.len(),
            cursor: last.clone(),
            ..Copied::default()
        };
        for (id, lines) in &page {
            for l in lines {
                let key = book_key(id, l);
                let n = tx
                    .execute(
                        &insert,
                        &[
                            &self.prefix,
                            &key,
                            &l.account,
                            &l.kind,
                            &l.amount,
                            &big(id, "requests", l.requests)?,
                            &big(id, "cpu_us", l.cpu_us)?,
                            &big(id, "deploys", l.deploys)?,
                            &big(id, "rows_read", l.rows_read)?,
                            &big(id, "rows_written", l.rows_written)?,
                            id,
                        ],
                    )
                    .await?;
                if n == 1 {
                    copied.inserted += 1;
                } else {
                    copied.duplicates += 1;
                }
            }
        }
        tx.execute(
            "INSERT INTO book_cursor (prefix, last_id) VALUES ($1, $2)
             ON CONFLICT (prefix) DO UPDATE SET last_id = EXCLUDED.last_id",
            &[&self.prefix, &last],
        )
        .await?;
        tx.commit().await?;
        // After the commit: a crash before this line only delays trimming.
        store.mark_booked(&last).await?;
        Ok(copied)
    }

    /// Every line the book holds, in the order it was copied (for reconciliation and tests).
    pub async fn lines(&self) -> Result<Vec<LedgerEntry>, BookError> {
        let rows = self
            .client
            .query(
                "SELECT kind, key, account, amount, requests, cpu_us, deploys, rows_read, rows_written, stream_id
                 FROM book_entries WHERE prefix = $1
                 ORDER BY split_part(stream_id, '-', 1)::bigint, split_part(stream_id, '-', 2)::bigint, key, account",
                &[&self.prefix],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| LedgerEntry {
                kind: r.get(0),
                key: {
                    // The ledger's own key (see `book_key`).
                    let key: String = r.get(1);
                    let id: String = r.get(9);
                    key.strip_suffix(&format!("@{id}"))
                        .map_or_else(|| key.clone(), str::to_owned)
                },
                account: r.get(2),
                amount: r.get(3),
                requests: r.get::<_, i64>(4).max(0) as u64,
                cpu_us: r.get::<_, i64>(5).max(0) as u64,
                deploys: r.get::<_, i64>(6).max(0) as u64,
                rows_read: r.get::<_, i64>(7).max(0) as u64,
                rows_written: r.get::<_, i64>(8).max(0) as u64,
            })
            .collect())
    }
}

/// The writer: copies rounds of `batch` entries until caught up, then waits `interval`;
/// reconnects (backing off up to 5 s) when PostgreSQL or Redis fails. Declares the book to the
/// ledger first, so that nothing is trimmed before it is copied. Runs until `stop`.
pub async fn run(
    url: String,
    store: RedisStore,
    prefix: String,
    interval: Duration,
    metrics: BookMetrics,
    mut stop: watch::Receiver<bool>,
) {
    const BATCH: usize = 500;
    let mut wait = Duration::from_millis(100);
    let mut book: Option<Book> = None;
    let mut declared = false;
    loop {
        if *stop.borrow() {
            return;
        }
        let round = async {
            if !declared {
                store.enable_book().await?;
                declared = true;
            }
            if book.is_none() {
                book = Some(Book::connect(&url, &prefix).await?);
            }
            match book.as_mut() {
                Some(b) => b.copy_round(&store, BATCH).await,
                None => Ok(Copied::default()),
            }
        }
        .await;
        let pause = match round {
            Ok(c) => {
                wait = Duration::from_millis(100);
                metrics
                    .lines
                    .with_label_values(&["inserted"])
                    .inc_by(c.inserted);
                metrics
                    .lines
                    .with_label_values(&["duplicate"])
                    .inc_by(c.duplicates);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                metrics.last_success.set(now);
                if c.entries == BATCH {
                    Duration::ZERO
                } else {
                    interval
                }
            }
            Err(e) => {
                metrics.errors.inc();
                tracing::warn!(error = %e, "book of record: round failed; retrying (the ledger keeps what is not copied)");
                book = None;
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
