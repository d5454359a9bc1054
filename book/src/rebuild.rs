//! `tollgate book rebuild`: fills an empty Redis, or an empty Redis Cluster, with the money
//! state the book of record adds up to, plus the batches the stopped nodes' journals hold that
//! the book lacks, then the payment channels (docs/book.md, "Rebuild after a Redis data loss").
//! Every refusal comes before the first write.

use std::collections::BTreeMap;
use std::time::Duration;

use tollgate_kv::Target;
use tollgate_metering::{ClusterStore, JournalContent, RedisStore, RestoreReport};

use crate::{Book, BookError, ChannelsRestored, Ledgers};

/// The store a rebuild filled, to call it whole at the end.
enum Restored {
    One(Box<RedisStore>),
    Cluster(ClusterStore),
}

/// What a rebuild restored.
#[derive(Debug, Clone)]
pub struct Rebuilt {
    pub report: RestoreReport,
    pub channels: ChannelsRestored,
    /// `book_conflicts` rows ignored (the book's first rows are used).
    pub conflicts: i64,
    /// Ledger streams read: 1 on one Redis, the money shards on a cluster.
    pub streams: usize,
}

/// Rebuilds the money state and the channels at `target` (prefix `prefix`, `shards` money
/// shards on a cluster) from `book` and the stopped nodes' `journals`. A start charged after
/// the book's last channel state has its reversal held for `start_hold`.
pub async fn rebuild(
    book: &Book,
    target: &Target,
    prefix: &str,
    shards: u32,
    journals: &[JournalContent],
    start_hold: Duration,
) -> Result<Rebuilt, BookError> {
    let refuse = |m: String| Err(BookError::Unusable(m));
    // Every check before the first write (the cluster's layout key included).
    let ledgers = Ledgers::open(target, prefix, shards).await?;
    let shard_streams = book.shard_streams(prefix).await?;
    if ledgers.is_cluster() {
        let missing: Vec<&String> = shard_streams
            .iter()
            .filter(|p| !ledgers.streams().contains(p))
            .collect();
        if !missing.is_empty() {
            return refuse(format!(
                "the book holds shard streams this cluster's layout of {} shards does not have ({missing:?}): set redis.money_shards to the count the book was written with",
                ledgers.streams().len(),
            ));
        }
        // A book of one Redis restored into a cluster would restore nothing, and every spent
        // key would be spendable again.
        if book.holds_stream(prefix).await? {
            return refuse(format!(
                "the book holds the ledger of one Redis under prefix {prefix:?}, not of a cluster: rebuild into one Redis (there is no migration from one Redis to a cluster)"
            ));
        }
    } else if !shard_streams.is_empty() {
        return refuse(format!(
            "the book holds the ledgers of a Redis Cluster's shards under prefix {prefix:?} ({} streams), not of one Redis: rebuild into a cluster with the same money_shards",
            shard_streams.len()
        ));
    }
    let conflicts = book.conflicts_in(&ledgers).await?;
    let keys: Vec<String> = journals
        .iter()
        .flat_map(|j| j.pending.iter().chain(j.kept.iter().map(|k| &k.batch)))
        .map(|b| format!("settle:{}:{}:{}", b.node_id, b.epoch, b.seq))
        .collect();
    let mut sets = book.restore_sets(&ledgers, &keys).await?;
    if ledgers.is_cluster() {
        tollgate_metering::check_restore_layout(&sets, shards)?;
    }
    let credits: BTreeMap<String, (String, i64)> = sets
        .iter()
        .flat_map(|s| s.credits.iter().map(|(k, v)| (k.clone(), v.clone())))
        .collect();
    book.check_channels_empty_at(&ledgers).await?;
    let ttl = Duration::from_secs(10);
    let (mut report, store) = match target {
        Target::One(url) => {
            let [set] = sets.as_mut_slice() else {
                return refuse("one Redis has one ledger stream".into());
            };
            for inc in journals.iter().filter_map(|j| j.incarnation.as_ref()) {
                set.see_epoch(&inc.node_id, inc.epoch);
            }
            let store = RedisStore::connect(url, prefix, ttl).await?;
            (
                store.restore(set, journals).await?,
                Restored::One(Box::new(store)),
            )
        }
        Target::Cluster {
            seeds,
            replica_acks,
        } => {
            let store =
                ClusterStore::connect_with(seeds, prefix, ttl, shards, *replica_acks).await?;
            (
                store.restore(&sets, journals).await?,
                Restored::Cluster(store),
            )
        }
    };
    let channels = book
        .restore_channels_at(&ledgers, &credits, start_hold)
        .await?;
    // Declared before the store is called whole: the reaper must not trim what the writer
    // has not copied yet.
    ledgers.enable_book().await?;
    match store {
        Restored::One(s) => s.finish_restore().await?,
        Restored::Cluster(s) => s.finish_restore().await?,
    }
    report.warnings.extend(channels.warnings.iter().cloned());
    Ok(Rebuilt {
        report,
        channels,
        conflicts,
        streams: ledgers.streams().len(),
    })
}
