//! Where the book copies from: the ledger stream of one Redis, or one stream per money shard
//! of a Redis Cluster (`{prefix:m<n>}:ledger`, each in its shard's slot), and the payment
//! channel records kept beside them (`<prefix>:mpp:…`, or `{prefix}:mpp:…` on a cluster).
//!
//! Each stream has its own marks (`<stream>:ledger:book`, `<stream>:ledger:booked`), which its
//! shard's reaper honours, and its own cursor in the book: the book's rows of a stream carry
//! the stream's key prefix (the configured prefix on one Redis, the shard's tag on a cluster).

use std::time::Duration;

use tollgate_kv::{Conn, Target, Timeouts};
use tollgate_metering::{LedgerEntry, RedisStore};

use crate::BookError;

/// The cluster's money layout: fixed by its first user, as the money store does (the same
/// configuration sets it, so whichever comes first sets the same number).
const SHARDS: &str = r#"
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"#;

/// The ledger streams of one deployment, and a connection to them. Cheap to clone.
#[derive(Clone)]
pub struct Ledgers {
    conn: Conn,
    prefix: String,
    /// Each stream's key prefix (`<p>:ledger`), in shard order.
    streams: Vec<String>,
    /// The payment channel records' key prefix.
    channels: String,
    cluster: bool,
}

impl Ledgers {
    /// The ledgers at `target` under `prefix`. On a cluster, `shards` is the money layout to
    /// assume when no money was laid out there yet (the one held wins: see `{prefix}:shards`).
    pub async fn connect(target: &Target, prefix: &str, shards: u32) -> Result<Ledgers, BookError> {
        let mut conn = target
            .connect_with(Timeouts::both(Duration::from_secs(10)))
            .await?;
        let streams = match target {
            Target::One(_) => vec![prefix.to_owned()],
            Target::Cluster { .. } => {
                if !(1..=1024).contains(&shards) {
                    return Err(BookError::Unusable(format!(
                        "money shards must be 1..=1024, got {shards}"
                    )));
                }
                let held: String = redis::Script::new(SHARDS)
                    .key(format!("{{{prefix}}}:shards"))
                    .arg(shards)
                    .invoke_async(&mut conn)
                    .await?;
                let n: u32 = held
                    .parse()
                    .ok()
                    .filter(|n| (1..=1024).contains(n))
                    .ok_or_else(|| {
                        BookError::Unusable(format!(
                            "{{{prefix}}}:shards holds {held:?}, not a shard count"
                        ))
                    })?;
                (0..n).map(|s| format!("{{{prefix}:m{s}}}")).collect()
            }
        };
        Ok(Ledgers {
            conn,
            prefix: prefix.to_owned(),
            streams,
            channels: target.family_prefix(prefix),
            cluster: target.is_cluster(),
        })
    }

    /// [`Ledgers::connect`] without writing anything: on a cluster whose layout key is gone
    /// (a data loss), `shards` is assumed and not stored; one held that differs is refused
    /// (`book rebuild` checks everything before it writes).
    pub async fn open(target: &Target, prefix: &str, shards: u32) -> Result<Ledgers, BookError> {
        let mut conn = target
            .connect_with(Timeouts::both(Duration::from_secs(10)))
            .await?;
        if let Target::Cluster { .. } = target {
            if !(1..=1024).contains(&shards) {
                return Err(BookError::Unusable(format!(
                    "money shards must be 1..=1024, got {shards}"
                )));
            }
            let key = format!("{{{prefix}}}:shards");
            let held: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
            if let Some(held) = held.filter(|h| *h != shards.to_string()) {
                return Err(BookError::Unusable(format!(
                    "this cluster's money is laid out in {held} shards ({key}), not the {shards} configured: set redis.money_shards to {held}"
                )));
            }
        }
        let streams = match target {
            Target::One(_) => vec![prefix.to_owned()],
            Target::Cluster { .. } => (0..shards).map(|s| format!("{{{prefix}:m{s}}}")).collect(),
        };
        Ok(Ledgers {
            conn,
            prefix: prefix.to_owned(),
            streams,
            channels: target.family_prefix(prefix),
            cluster: target.is_cluster(),
        })
    }

    /// The ledger of a store already open on one Redis.
    pub fn of(store: &RedisStore) -> Ledgers {
        Ledgers {
            conn: Conn::from(store.connection()),
            prefix: store.prefix().to_owned(),
            streams: vec![store.prefix().to_owned()],
            channels: store.prefix().to_owned(),
            cluster: false,
        }
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The configured key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Each stream's key prefix, which is also its rows' prefix in the book.
    pub fn streams(&self) -> &[String] {
        &self.streams
    }

    /// The payment channel records' key prefix (their rows' prefix in the book).
    pub fn channels_prefix(&self) -> &str {
        &self.channels
    }

    pub(crate) fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// Up to `count` entries of stream `p` after id `after` (`0-0`: from the start), oldest
    /// first: (stream id, its lines: one per account).
    pub async fn page(
        &self,
        p: &str,
        after: &str,
        count: usize,
    ) -> Result<Vec<(String, Vec<LedgerEntry>)>, BookError> {
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(format!("{p}:ledger"))
            .arg(format!("({after}"))
            .arg("+")
            .arg("COUNT")
            .arg(count);
        // On a cluster, answered once a replica holds what it read: a line taken from a master
        // that failed before passing it on would be in the book and not in Redis (its write,
        // unacknowledged, is retried and lands again at another position).
        let reply: redis::streams::StreamRangeReply = self.conn().query_confirmed(&cmd).await?;
        let mut out = Vec::with_capacity(reply.ids.len());
        for id in &reply.ids {
            out.push((id.id.clone(), tollgate_metering::ledger_lines(id)?));
        }
        Ok(out)
    }

    /// Stream `p`'s last entry id (`None`: empty); on a cluster, once a replica holds it, so
    /// that a failover cannot hand out ids at or below it again.
    pub async fn end(&self, p: &str) -> Result<Option<String>, BookError> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(format!("{p}:ledger"))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1);
        let reply: redis::streams::StreamRangeReply = self.conn().query_confirmed(&cmd).await?;
        Ok(reply.ids.first().map(|i| i.id.clone()))
    }

    /// Whether a book is declared on stream `p`, and how far it holds it as recorded there
    /// (`None`: no mark: nothing booked yet, or a Redis or shard that lost its data).
    pub async fn booked(&self, p: &str) -> Result<(bool, Option<String>), BookError> {
        Ok(redis::pipe()
            .cmd("EXISTS")
            .arg(format!("{p}:ledger:book"))
            .cmd("GET")
            .arg(format!("{p}:ledger:booked"))
            .query_async(&mut self.conn())
            .await?)
    }

    /// Records that the book holds stream `p` up to `id`: its reaper trims nothing after it.
    pub async fn mark_booked(&self, p: &str, id: &str) -> Result<(), BookError> {
        redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(format!("{p}:ledger:book"))
            .arg("1")
            .ignore()
            .cmd("SET")
            .arg(format!("{p}:ledger:booked"))
            .arg(id)
            .ignore()
            .query_async::<()>(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Declares the book to stream `p` (before its first copy): entries are no longer trimmed
    /// by age alone.
    pub async fn declare(&self, p: &str) -> Result<(), BookError> {
        redis::cmd("SET")
            .arg(format!("{p}:ledger:book"))
            .arg("1")
            .query_async::<()>(&mut self.conn())
            .await?;
        Ok(())
    }

    /// [`Ledgers::declare`] on every stream.
    pub async fn enable_book(&self) -> Result<(), BookError> {
        for p in &self.streams {
            self.declare(p).await?;
        }
        Ok(())
    }

    /// Undeclares the book on every stream (`tollgate book disable`): trimmed by age alone
    /// again.
    pub async fn disable_book(&self) -> Result<(), BookError> {
        for p in &self.streams {
            redis::cmd("DEL")
                .arg(format!("{p}:ledger:book"))
                .arg(format!("{p}:ledger:booked"))
                .query_async::<()>(&mut self.conn())
                .await?;
        }
        Ok(())
    }
}
