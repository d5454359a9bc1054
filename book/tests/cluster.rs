//! The book of record on a Redis Cluster: one ledger stream per money shard, each copied with
//! its own cursor and marks. A real 3 + 3 cluster and a PostgreSQL cluster, both started by
//! the test on free loopback ports.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tollgate_book::{Book, Difference, Ledgers};
use tollgate_kv::Target;
use tollgate_metering::{ClusterStore, LedgerEntry, SettleBatch, SettleEntry, Store, Usage};
use tollgate_testkit::{PostgresServer, RedisCluster};

const CENT: i64 = 10_000_000_000;
const SHARDS: u32 = 8;

fn target(cluster: &RedisCluster) -> Target {
    Target::Cluster {
        seeds: cluster.urls(),
        replica_acks: 1,
    }
}

async fn store(cluster: &RedisCluster, retention: Duration) -> ClusterStore {
    ClusterStore::connect(&cluster.urls(), "tollgate", Duration::from_secs(10), SHARDS)
        .await
        .unwrap()
        .with_ledger_retention(retention)
}

/// Credits on 16 accounts (spread over the shards), a deploy charge, a settle batch across
/// shards with its leases returned at release, and a write-off: every kind of line.
async fn money_moves(store: &ClusterStore, tag: &str) {
    for i in 0..16 {
        store
            .credit(&format!("acct-{i}"), &format!("credit-{i}-{tag}"), CENT)
            .await
            .unwrap();
    }
    store
        .charge("acct-1", &format!("deploy-{tag}"), CENT / 2, false)
        .await
        .unwrap();
    let inc = store.begin(&format!("node-{tag}")).await.unwrap();
    let entries = (0..16)
        .map(|i| SettleEntry {
            account: format!("acct-{i}"),
            usage: Usage {
                requests: 10 + i,
                cpu_us: 1500,
                ..Default::default()
            },
            cost: 1_000_000 * (i as i64 + 1),
            give_back: 0,
            ask: CENT / 10,
        })
        .collect();
    store
        .settle(&SettleBatch {
            node_id: inc.node_id.clone(),
            epoch: inc.epoch,
            seq: 1,
            entries,
        })
        .await
        .unwrap();
    store.release(&inc).await.unwrap();
    store
        .write_off("acct-2", &format!("writeoff-{tag}"), CENT / 100)
        .await
        .unwrap();
}

type Line = (String, String, String, i64);

fn line(l: &LedgerEntry) -> Line {
    (l.kind.clone(), l.key.clone(), l.account.clone(), l.amount)
}

/// Every line the book holds, over all streams, and how many streams hold any.
async fn booked(book: &Book, l: &Ledgers) -> (Vec<Line>, usize) {
    let (mut out, mut streams) = (Vec::new(), 0);
    for p in l.streams() {
        let lines = book.lines_at(p).await.unwrap();
        streams += usize::from(!lines.is_empty());
        out.extend(lines.iter().map(line));
    }
    out.sort();
    (out, streams)
}

async fn ledger(store: &ClusterStore) -> Vec<Line> {
    let mut v: Vec<Line> = store.ledger().await.unwrap().iter().map(line).collect();
    v.sort();
    v
}

async fn copy_all(book: &mut Book, l: &Ledgers) -> (u64, u64) {
    let (mut inserted, mut dups) = (0, 0);
    loop {
        let c = book.copy_round(l, 500).await.unwrap().whole().unwrap();
        inserted += c.inserted;
        dups += c.duplicates;
        assert_eq!(c.conflicts, 0);
        if c.caught_up {
            return (inserted, dups);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shard_is_booked_exactly_once_and_trimmed_only_past_the_book() {
    let pg = PostgresServer::start();
    let cluster = RedisCluster::start();
    // Everything is "old" at once: only each shard's book mark holds its ledger back.
    let store = store(&cluster, Duration::from_millis(1)).await;
    let l = Ledgers::connect(&target(&cluster), "tollgate", 32)
        .await
        .unwrap();
    assert_eq!(l.streams().len(), SHARDS as usize, "the layout held wins");
    l.enable_book().await.unwrap();
    money_moves(&store, "1").await;
    let before = ledger(&store).await;
    assert_eq!(before.len(), 16 * 3 + 2, "{before:?}");
    tokio::time::sleep(Duration::from_millis(5)).await;
    store.reap_expired().await.unwrap();
    assert_eq!(
        ledger(&store).await,
        before,
        "trimmed before the book had it"
    );

    let mut book = Book::connect(&pg.url(), "tollgate").await.unwrap();
    let (inserted, dups) = copy_all(&mut book, &l).await;
    let (lines, streams) = booked(&book, &l).await;
    assert_eq!(lines, before, "the book holds the ledger of every shard");
    assert_eq!(inserted as usize, before.len());
    assert_eq!(dups, 0);
    assert!(streams >= 4, "lines in {streams} shards only");
    assert_eq!(copy_all(&mut book, &l).await, (0, 0), "nothing twice");

    // A round repeated from the start (cursors and marks gone) stores nothing twice.
    let sql = common::sql(&pg).await;
    sql.execute("UPDATE book_cursor SET last_id = '0-0'", &[])
        .await
        .unwrap();
    let mut conn = target(&cluster).connect().await.unwrap();
    for p in l.streams() {
        redis::cmd("DEL")
            .arg(format!("{p}:ledger:booked"))
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }
    let (inserted, dups) = copy_all(&mut book, &l).await;
    assert_eq!((inserted, dups as usize), (0, before.len()));

    // Booked and old: each shard's reaper trims it; a new line (not booked) stays.
    store.reap_expired().await.unwrap();
    assert_eq!(ledger(&store).await, Vec::<Line>::new());
    store.credit("acct-3", "late", CENT).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    store.reap_expired().await.unwrap();
    assert_eq!(ledger(&store).await.len(), 1, "a line the book lacks stays");
    copy_all(&mut book, &l).await;
    assert_eq!(booked(&book, &l).await.0.len(), before.len() + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_is_clean_then_names_a_changed_line_in_its_shard() {
    let pg = PostgresServer::start();
    let cluster = RedisCluster::start();
    let store = store(&cluster, Duration::ZERO).await;
    let l = Ledgers::connect(&target(&cluster), "tollgate", SHARDS)
        .await
        .unwrap();
    l.enable_book().await.unwrap();
    money_moves(&store, "1").await;
    money_moves(&store, "2").await;
    let mut book = Book::connect(&pg.url(), "tollgate").await.unwrap();
    assert_eq!(book.reconcile(&l).await.unwrap(), vec![]);

    let sql = common::sql(&pg).await;
    let n = sql
        .execute(
            "UPDATE book_entries SET amount = amount + 7 WHERE key = 'credit:credit-5-2'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    let diffs = book.reconcile(&l).await.unwrap();
    assert!(
        diffs
            .iter()
            .any(|d| matches!(d, Difference::Differs { key, account, .. }
            if key == "credit:credit-5-2" && account == "acct-5")),
        "{diffs:?}"
    );
    assert!(
        diffs
            .iter()
            .any(|d| matches!(d, Difference::Totals { account, redis, book }
            if account == "acct-5" && book.0 == redis.0 + 7)),
        "{diffs:?}"
    );
    assert_eq!(diffs.len(), 2, "{diffs:?}");
}

/// Credits keep coming while the writer copies and a master is killed (`kill -9`) and comes
/// back: every acknowledged credit is in the book once, with its amount, and the book and the
/// ledger agree line for line afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_under_load_loses_no_acknowledged_line() {
    let pg = PostgresServer::start();
    let mut cluster = RedisCluster::start();
    let store = Arc::new(store(&cluster, Duration::ZERO).await);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(tollgate_book::run(
        pg.url(),
        target(&cluster),
        "tollgate".into(),
        SHARDS,
        Duration::from_millis(50),
        tollgate_book::BookMetrics::new(&prometheus::Registry::new()).unwrap(),
        stop,
    ));
    let running = Arc::new(AtomicBool::new(true));
    let made = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let load = {
        let (store, running, made) = (store.clone(), running.clone(), made.clone());
        tokio::spawn(async move {
            let mut acked: BTreeMap<String, (String, i64)> = BTreeMap::new();
            let mut i = 0i64;
            while running.load(Ordering::Relaxed) {
                let (account, key, amount) =
                    (format!("acct-{}", i % 24), format!("load-{i}"), CENT + i);
                // Retried until acknowledged (a failover answers errors for a while); the
                // retries are applied once.
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                loop {
                    match store.credit(&account, &key, amount).await {
                        Ok(_) => break,
                        Err(e) if std::time::Instant::now() > deadline => {
                            panic!("credit {key} not acknowledged within 30 s: {e}")
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                acked.insert(format!("credit:{key}"), (account, amount));
                i += 1;
                made.store(i, Ordering::Relaxed);
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let master = cluster.masters()[0];
    // Killed; once its replica took over, it comes back (empty) as that one's replica: until
    // then writes in its slots are not acknowledged (no replica holds them) and are retried.
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.kill(master);
        cluster.start_again(master);
        cluster
    })
    .await
    .unwrap();
    // The writer goes on after the failover: a credit made after it reaches the book while
    // the load runs.
    let after = format!("credit:load-{}", made.load(Ordering::Relaxed));
    let sql = common::sql(&pg).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sql
        .query_opt("SELECT 1 FROM book_entries WHERE key = $1", &[&after])
        .await
        .unwrap()
        .is_none()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer did not copy {after} within 20 s of the failover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.store(false, Ordering::Relaxed);
    let acked = load.await.unwrap();
    assert!(acked.len() > 50, "only {} credits", acked.len());
    let _ = stop_tx.send(true);
    writer.await.unwrap();

    let l = Ledgers::connect(&target(&cluster), "tollgate", SHARDS)
        .await
        .unwrap();
    let mut book = Book::connect(&pg.url(), "tollgate").await.unwrap();
    copy_all(&mut book, &l).await;
    let (lines, _) = booked(&book, &l).await;
    let mut credits: BTreeMap<String, Vec<(String, i64)>> = BTreeMap::new();
    for (kind, key, account, amount) in &lines {
        if kind == "credit" {
            credits
                .entry(key.clone())
                .or_default()
                .push((account.clone(), *amount));
        }
    }
    for (key, (account, amount)) in &acked {
        assert_eq!(
            credits.get(key),
            Some(&vec![(account.clone(), *amount)]),
            "{key}: booked once with its amount"
        );
    }
    assert_eq!(
        credits.len(),
        acked.len(),
        "no credit the load did not make"
    );
    assert_eq!(lines, ledger(&store).await, "the book and the ledger agree");
    assert_eq!(book.reconcile(&l).await.unwrap(), vec![]);
}

/// Payment channel records (in the control family's slot) are copied with the shards' lines:
/// every voucher credit line in the book has its record there, `reconcile` is clean, and a
/// forged credit line that no voucher backs is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_records_are_copied_with_every_shards_lines() {
    use mpp::protocol::methods::tempo::session_method::{ChannelState, ChannelStore};
    use tollgate_payments::{ChannelBackend, RedisChannels, SharedChannels};
    const CHAIN: u64 = 42431;
    const DOLLAR_BASE: u128 = 1_000_000;
    let state = |id: &str, highest: u128| -> ChannelState {
        serde_json::from_value(serde_json::json!({
            "channel_id": id, "chain_id": CHAIN,
            "escrow_contract": "0x00000000000000000000000000000000000000e5",
            "payer": "0x00000000000000000000000000000000000000a1",
            "payee": "0x00000000000000000000000000000000000000b2",
            "token": "0x00000000000000000000000000000000000000c3",
            "authorized_signer": "0x00000000000000000000000000000000000000a1",
            "deposit": 100 * DOLLAR_BASE, "settled_on_chain": 0,
            "highest_voucher_amount": highest,
            "highest_voucher_signature": [1, 2, highest as u8],
            "spent": 0, "units": 0, "finalized": false,
            "created_at": "2026-12-07T00:00:00Z"
        }))
        .unwrap()
    };
    let pg = PostgresServer::start();
    let cluster = RedisCluster::start();
    let store = store(&cluster, Duration::ZERO).await;
    let backend = Arc::new(
        RedisChannels::connect(target(&cluster), "tollgate")
            .await
            .unwrap(),
    );
    let shared = SharedChannels::new(backend.clone(), CHAIN);
    let l = Ledgers::connect(&target(&cluster), "tollgate", SHARDS)
        .await
        .unwrap();
    l.enable_book().await.unwrap();
    // Vouchers on 6 channels of 6 payers (their accounts in several shards), each credited.
    for i in 1..=6u8 {
        let id = format!("0xc{i}");
        let mut next = state(&id, u128::from(i) * DOLLAR_BASE);
        next.payer = format!("0x00000000000000000000000000000000000000{:02x}", 0xa0 + i)
            .parse()
            .unwrap();
        next.authorized_signer = next.payer;
        shared
            .update_channel(&id, Box::new(move |_| Ok(Some(next))))
            .await
            .unwrap();
    }
    let pending = backend.pending_credits().await.unwrap();
    assert_eq!(pending.len(), 6);
    // Five credited; channel 0xc6's stays pending.
    let left = pending
        .iter()
        .find(|c| c.key.starts_with("mpp:0xc6:"))
        .unwrap();
    for c in pending.iter().filter(|c| c.key != left.key) {
        store.credit(&c.account, &c.key, c.picos).await.unwrap();
        backend.credit_done(&c.key).await.unwrap();
    }
    let mut book = Book::connect(&pg.url(), "tollgate").await.unwrap();
    let (inserted, _) = copy_all(&mut book, &l).await;
    assert_eq!(inserted, 5);
    let (rows, side) = book.channels_at(l.channels_prefix()).await.unwrap();
    assert_eq!(l.channels_prefix(), "{tollgate}");
    assert_eq!(rows.len(), 6, "{rows:?}");
    assert_eq!(
        side.pending.keys().collect::<Vec<_>>(),
        vec![&left.key],
        "the side state is stored on a cluster"
    );
    let (_, streams) = booked(&book, &l).await;
    assert!(streams >= 2, "credits in {streams} shards only");
    assert_eq!(book.reconcile(&l).await.unwrap(), vec![]);

    // A credit line no voucher backs (the book's copy of channel 0xc3 credited twice).
    let sql = common::sql(&pg).await;
    let n = sql
        .execute(
            "INSERT INTO book_entries (prefix, key, account, kind, amount, requests, cpu_us, deploys, rows_read, rows_written, stream_ms, stream_seq)
             SELECT prefix, 'credit:mpp:0xc3:9', account, kind, amount, 0, 0, 0, 0, 0, stream_ms, stream_seq + 1
             FROM book_entries WHERE key LIKE 'credit:mpp:0xc3:%'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    let diffs = book.reconcile(&l).await.unwrap();
    assert!(
        diffs
            .iter()
            .any(|d| matches!(d, Difference::Channel { id, what } if id == "0xc3" && what.contains("more than its accepted vouchers"))),
        "{diffs:?}"
    );
}

/// A shard whose master lost its replica cannot be copied (its reads and marks are not
/// acknowledged): the round names it and copies every other shard; once the replica is back,
/// the book catches up and equals the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_cannot_be_copied_does_not_stop_the_others() {
    let pg = PostgresServer::start();
    let mut cluster = RedisCluster::start();
    let store = store(&cluster, Duration::ZERO).await;
    let l = Ledgers::connect(&target(&cluster), "tollgate", SHARDS)
        .await
        .unwrap();
    l.enable_book().await.unwrap();
    let mut book = Book::connect(&pg.url(), "tollgate").await.unwrap();
    copy_all(&mut book, &l).await;
    // The master's replica takes over and has no replica of its own until the killed member
    // is back: writes and confirmed reads in its slots are not acknowledged.
    // Not the master of the channel records' slot (`{tollgate}`), without which no round runs.
    let master = cluster
        .masters()
        .into_iter()
        .find(|m| {
            redis::cmd("GET")
                .arg("{tollgate}:shards")
                .query::<Option<String>>(&mut cluster.conn(*m))
                .is_err()
        })
        .unwrap();
    let mut cluster = tokio::task::spawn_blocking(move || {
        cluster.kill(master);
        cluster
    })
    .await
    .unwrap();
    let mut acked = Vec::new();
    for i in 0..12 {
        if store
            .credit(&format!("acct-{i}"), &format!("top-up-{i}"), CENT)
            .await
            .is_ok()
        {
            acked.push(format!("credit:top-up-{i}"));
        }
    }
    assert!(
        !acked.is_empty() && acked.len() < 12,
        "{} of 12 credits acknowledged",
        acked.len()
    );
    // A credit on an account of a dead shard, claimed in a live one: its line is written in the
    // dead shard, not acknowledged.
    let mut dead = Vec::new();
    for (n, p) in l.streams().iter().enumerate() {
        if l.end(p).await.is_err() {
            dead.push(n as u32);
        }
    }
    assert!(!dead.is_empty());
    let in_dead = |s: &String| dead.contains(&tollgate_metering::shard_of(s, SHARDS));
    let account = (0..).map(|i| format!("stuck-{i}")).find(in_dead).unwrap();
    let key = (0..)
        .map(|i| format!("stuck-key-{i}"))
        .find(|k| !in_dead(k))
        .unwrap();
    assert!(store.credit(&account, &key, CENT).await.is_err());
    let c = book.copy_round(&l, 500).await.unwrap();
    assert!(!c.failed.is_empty() && !c.caught_up, "{c:?}");
    assert!(c.failed.len() < SHARDS as usize, "{c:?}");
    assert!(c.copied_caught_up, "{c:?}");
    let (lines, _) = booked(&book, &l).await;
    let keys: std::collections::BTreeSet<String> =
        lines.into_iter().map(|(_, key, _, _)| key).collect();
    for k in &acked {
        assert!(
            keys.contains(k),
            "{k} acknowledged, not copied from its shard"
        );
    }
    // Lines of the failed shards (written, not acknowledged) wait for their replica.
    assert!(
        ledger(&store).await.len() > keys.len(),
        "nothing was left to copy in the failed shards"
    );
    assert!(matches!(c.whole(), Err(tollgate_book::BookError::Failed(f)) if !f.is_empty()));

    let cluster = tokio::task::spawn_blocking(move || {
        cluster.start_again(master);
        cluster
    })
    .await
    .unwrap();
    copy_all(&mut book, &l).await;
    assert_eq!(booked(&book, &l).await.0, ledger(&store).await);
    assert_eq!(book.reconcile(&l).await.unwrap(), vec![]);
    drop(cluster);
}

/// Every master flushed (the whole cluster lost its data): `book rebuild`'s steps fill it
/// again from the book's streams and the stopped nodes' journals. Each shard gets the totals,
/// keys and marks its stream adds up to; every key stays spent (in its own shard's claims
/// too); a start charged after the stored side state has its reversal held again; the channel
/// records and the pending credit come back; usage no copy holds is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_fills_a_flushed_cluster_from_the_book_and_the_journals() {
    use mpp::protocol::methods::tempo::session_method::{ChannelState, ChannelStore};
    use tollgate_metering::{Journal, SettleOutcome};
    use tollgate_payments::{ChannelBackend, RedisChannels, SharedChannels};
    const CHAIN: u64 = 42431;
    let pg = PostgresServer::start();
    let cluster = RedisCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let store = store(&cluster, Duration::ZERO).await;
    let backend = Arc::new(
        RedisChannels::connect(target(&cluster), "tollgate")
            .await
            .unwrap(),
    );
    let shared = SharedChannels::new(backend.clone(), CHAIN);
    let l = Ledgers::connect(&target(&cluster), "tollgate", SHARDS)
        .await
        .unwrap();
    l.enable_book().await.unwrap();
    money_moves(&store, "1").await;
    // Three payers' channels: two credited, one left pending.
    for i in 1..=3u8 {
        let id = format!("0xd{i}");
        let payer = format!("0x00000000000000000000000000000000000000{:02x}", 0xa0 + i);
        let next: ChannelState = serde_json::from_value(serde_json::json!({
            "channel_id": id, "chain_id": CHAIN,
            "escrow_contract": "0x00000000000000000000000000000000000000e5",
            "payer": payer, "payee": "0x00000000000000000000000000000000000000b2",
            "token": "0x00000000000000000000000000000000000000c3",
            "authorized_signer": payer,
            "deposit": 100_000_000u64, "settled_on_chain": 0,
            "highest_voucher_amount": u64::from(i) * 1_000_000,
            "highest_voucher_signature": [1, 2, i],
            "spent": 0, "units": 0, "finalized": false,
            "created_at": "2026-12-08T00:00:00Z"
        }))
        .unwrap();
        shared
            .update_channel(&id, Box::new(move |_| Ok(Some(next))))
            .await
            .unwrap();
    }
    let pending = backend.pending_credits().await.unwrap();
    let left = pending
        .iter()
        .find(|c| c.key.starts_with("mpp:0xd3:"))
        .unwrap()
        .clone();
    for c in pending.iter().filter(|c| c.key != left.key) {
        store.credit(&c.account, &c.key, c.picos).await.unwrap();
        backend.credit_done(&c.key).await.unwrap();
    }

    // Node j stops with two batches over many shards its journal never saw acknowledged:
    // seq 1 reached the cluster (and the book), seq 2 never did.
    let inc_j = store.begin("node-j").await.unwrap();
    let batch = |seq: u64, accounts: std::ops::Range<usize>, cost: i64| SettleBatch {
        node_id: "node-j".into(),
        epoch: inc_j.epoch,
        seq,
        entries: accounts
            .map(|i| SettleEntry {
                account: format!("acct-{i}"),
                usage: Usage {
                    requests: seq * 10,
                    ..Default::default()
                },
                cost,
                give_back: 0,
                ask: CENT / 10,
            })
            .collect(),
    };
    let (b1, b2) = (batch(1, 0..8, 7_000_000), batch(2, 3..11, 11_000_000));
    let path_j = dir.path().join("node-j.journal");
    {
        let mut j = Journal::open(&path_j).unwrap();
        j.set_incarnation(&inc_j).unwrap();
        j.append(&b1).unwrap();
        store.settle(&b1).await.unwrap();
        j.append(&b2).unwrap();
    }
    // A start charged before the side state's cut (its reversal gone: the start was kept).
    store
        .charge("acct-5", "deploy:early", CENT / 4, false)
        .await
        .unwrap();
    // Node m keeps its acknowledged batches for the book (its incarnation's generation is
    // every shard's): batch 1 goes once the book holds it, batch 2 (acknowledged after the
    // book's last round) stays and comes back in the rebuild.
    let inc_m = store.begin("node-m").await.unwrap();
    let path_m = dir.path().join("node-m.journal");
    let mut jm = Journal::open(&path_m).unwrap();
    jm.set_incarnation(&inc_m).unwrap();
    let generation = store.ledger_generation().await.unwrap().unwrap();
    assert_eq!(
        generation.split(',').count(),
        SHARDS as usize,
        "{generation}"
    );
    jm.set_generation(&inc_m, &generation).unwrap();
    let m_batch = |seq: u64, account: &str, cost: i64| SettleBatch {
        node_id: "node-m".into(),
        epoch: inc_m.epoch,
        seq,
        entries: vec![SettleEntry {
            account: account.into(),
            usage: Usage {
                requests: 3,
                ..Default::default()
            },
            cost,
            give_back: 0,
            ask: 0,
        }],
    };
    let (m1, m2) = (
        m_batch(1, "acct-13", 2_000_000),
        m_batch(2, "acct-14", 3_000_000),
    );
    jm.append(&m1).unwrap();
    store.settle(&m1).await.unwrap();
    jm.ack(&m1).unwrap();
    let incs = jm.kept_incarnations();
    let marks = store.book_marks(&incs).await.unwrap().unwrap();
    assert_eq!(marks.streams.len(), SHARDS as usize);
    assert_eq!(
        jm.release_booked(&marks, &incs).unwrap(),
        0,
        "not booked yet"
    );
    let mut book = Book::connect(&pg.url(), "tollgate").await.unwrap();
    copy_all(&mut book, &l).await;
    let marks = store.book_marks(&incs).await.unwrap().unwrap();
    assert_eq!(
        jm.release_booked(&marks, &incs).unwrap(),
        1,
        "booked: released"
    );
    // One charged in the round that stores the next side state: past its stream's bound.
    store
        .charge("acct-6", "deploy:late", CENT / 4, false)
        .await
        .unwrap();
    copy_all(&mut book, &l).await;
    jm.append(&m2).unwrap();
    store.settle(&m2).await.unwrap();
    jm.ack(&m2).unwrap();
    let marks = store.book_marks(&incs).await.unwrap().unwrap();
    assert_eq!(jm.release_booked(&marks, &incs).unwrap(), 0);
    drop(jm);
    // Node q: its batch applied and acknowledged after the book's last round, and its journal
    // kept nothing (it never learned the generation): that usage is lost, and named.
    let inc_q = store.begin("node-q").await.unwrap();
    let q1 = SettleBatch {
        node_id: "node-q".into(),
        epoch: inc_q.epoch,
        seq: 1,
        entries: vec![SettleEntry {
            account: "acct-12".into(),
            usage: Usage {
                requests: 4,
                ..Default::default()
            },
            cost: 5_000_000,
            give_back: 0,
            ask: 0,
        }],
    };
    let path_q = dir.path().join("node-q.journal");
    {
        let mut jq = Journal::open(&path_q).unwrap();
        jq.set_incarnation(&inc_q).unwrap();
        jq.append(&q1).unwrap();
        store.settle(&q1).await.unwrap();
        jq.ack(&q1).unwrap();
    }
    let ids: Vec<String> = (0..16).map(|i| format!("acct-{i}")).collect();
    let before = store.accounts(&ids).await.unwrap();

    // The loss: every master flushed (the replicas follow).
    for port in cluster.masters() {
        redis::cmd("FLUSHALL")
            .query::<()>(&mut cluster.conn(port))
            .unwrap();
    }

    // `tollgate book rebuild` (the CLI test runs the command itself).
    let (jj, jq, jm) = (
        Journal::read_stopped(&path_j).unwrap(),
        Journal::read_stopped(&path_q).unwrap(),
        Journal::read_stopped(&path_m).unwrap(),
    );
    assert_eq!(jj.pending, vec![b1.clone(), b2.clone()]);
    assert!(jq.kept.is_empty() && jq.pending.is_empty());
    assert_eq!(
        jm.kept.iter().map(|k| k.batch.clone()).collect::<Vec<_>>(),
        vec![m2.clone()]
    );
    let done = tollgate_book::rebuild(
        &book,
        &target(&cluster),
        "tollgate",
        SHARDS,
        &[jj, jq, jm],
        Duration::from_secs(600),
    )
    .await
    .unwrap();
    assert_eq!(done.streams, SHARDS as usize);
    let (report, channels) = (done.report.clone(), done.channels.clone());
    let fresh = ClusterStore::connect(&cluster.urls(), "tollgate", Duration::from_secs(10), SHARDS)
        .await
        .unwrap();

    assert_eq!(
        (
            report.journal_batches_booked,
            report.journal_batches_applied
        ),
        (1, 2),
        "{report:?}"
    );
    assert_eq!(report.accounts, 16 + 2, "and the two payers credited");
    let journal_warnings: Vec<&String> = report
        .warnings
        .iter()
        .filter(|w| w.contains("node-"))
        .collect();
    assert_eq!(journal_warnings.len(), 1, "{:?}", report.warnings);
    assert_eq!(
        report.warnings.len(),
        1 + channels.warnings.len(),
        "{:?}",
        report.warnings
    );
    assert!(
        journal_warnings[0].contains("node-q") && journal_warnings[0].contains("batches 1 to 1"),
        "{:?}",
        report.warnings
    );
    assert_eq!((channels.channels, channels.pending_credits), (3, 1));
    let reheld: Vec<&String> = channels
        .warnings
        .iter()
        .filter(|w| w.contains("is held again"))
        .collect();
    assert_eq!(reheld.len(), 1, "{:?}", channels.warnings);
    assert!(reheld[0].contains("deploy:late"), "{reheld:?}");
    let back = backend.pending_credits().await.unwrap();
    assert_eq!(
        back.iter().map(|c| c.key.clone()).collect::<Vec<_>>(),
        vec![left.key.clone()],
        "the pending credit is put back"
    );

    // Balances as before the loss (node m's batch 2, not in the book, came from its journal),
    // plus node j's batch 2 (never applied before), minus node q's lost batch; no lease.
    let after = fresh.accounts(&ids).await.unwrap();
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        let (a, b) = (a.clone().unwrap(), b.clone().unwrap());
        let plus = if (3..11).contains(&i) { 11_000_000 } else { 0 };
        let minus = if i == 12 { 5_000_000 } else { 0 };
        assert_eq!(
            (b.credited, b.debited, b.leased),
            (a.credited, a.debited + plus - minus, 0),
            "acct-{i}"
        );
        assert_eq!(b.available, b.credited - b.debited, "acct-{i}");
    }

    // Every key stays spent, in the account's shard and in the key's own.
    let again = fresh.credit("acct-0", "credit-0-1", CENT).await.unwrap();
    assert!(!again.applied);
    assert!(fresh.credit("acct-9", "credit-0-1", CENT).await.is_err());
    assert!(
        fresh
            .credit("acct-0", "credit-0-1", 2 * CENT)
            .await
            .is_err()
    );
    let charge = fresh
        .charge("acct-1", "deploy-1", CENT / 2, false)
        .await
        .unwrap();
    assert!(!charge.applied && charge.taken == CENT / 2);
    assert!(
        fresh
            .charge("acct-9", "deploy-1", CENT / 2, false)
            .await
            .is_err()
    );
    assert!(
        !fresh
            .write_off("acct-2", "writeoff-1", CENT / 100)
            .await
            .unwrap()
            .applied
    );
    // The node's replays at its next start: duplicates granting no lease, one grant per
    // entry (batch 1's parts in the shards batch 2 reached are past there: applied before).
    for b in [&b1, &b2] {
        match fresh.settle(b).await.unwrap() {
            SettleOutcome::Duplicate(g) => {
                let accounts: Vec<&str> = g.iter().map(|g| g.account.as_str()).collect();
                let entries: Vec<&str> = b.entries.iter().map(|e| e.account.as_str()).collect();
                assert_eq!(accounts, entries, "seq {}", b.seq);
                assert!(g.iter().all(|g| g.lease == 0), "{g:?}");
            }
            other => panic!("seq {} replayed: {other:?}", b.seq),
        }
    }
    assert_eq!(
        fresh.accounts(&ids).await.unwrap(),
        after,
        "a replay moved money"
    );
    let next = fresh.begin("node-j").await.unwrap();
    assert!(next.epoch > inc_j.epoch, "{next:?} reuses {inc_j:?}");

    // A second rebuild is refused: the cluster holds channel state (and money) now; the CLI
    // test sees the money refusal itself.
    let err = tollgate_book::rebuild(
        &book,
        &target(&cluster),
        "tollgate",
        SHARDS,
        &[],
        Duration::from_secs(600),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("payment channel state"), "{err}");
    // And the book goes on: what the rebuild applied is copied, the two agree.
    copy_all(&mut book, &l).await;
    assert_eq!(book.reconcile(&l).await.unwrap(), vec![]);
}
