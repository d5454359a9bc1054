//! The book of record against a real PostgreSQL cluster and a real redis-server, both started
//! by the test on free loopback ports.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use tollgate_book::Book;
use tollgate_metering::{LedgerEntry, RedisStore, SettleBatch, SettleEntry, Store, Usage};
use tollgate_testkit::{PostgresServer, RedisServer};

const CENT: i64 = 10_000_000_000;

/// Credits, a deploy charge, and a settle batch with a lease (returned at release): every kind
/// of line the ledger has.
async fn money_moves(store: &RedisStore, tag: &str) {
    store
        .credit("acct-a", &format!("credit-a-{tag}"), 5 * CENT)
        .await
        .unwrap();
    store
        .credit("acct-b", &format!("credit-b-{tag}"), 3 * CENT)
        .await
        .unwrap();
    store
        .charge("acct-a", &format!("deploy-{tag}"), CENT, false)
        .await
        .unwrap();
    let inc = store.begin(&format!("node-{tag}")).await.unwrap();
    let entry = |account: &str, requests: u64, cost: i64| SettleEntry {
        account: account.into(),
        usage: Usage {
            requests,
            cpu_us: 1500,
            ..Default::default()
        },
        cost,
        give_back: 0,
        ask: CENT / 10,
    };
    store
        .settle(&SettleBatch {
            node_id: inc.node_id.clone(),
            epoch: inc.epoch,
            seq: 1,
            entries: vec![
                entry("acct-a", 10, 5_000_000),
                entry("acct-b", 3, 1_500_000),
            ],
        })
        .await
        .unwrap();
    store.release(&inc).await.unwrap();
    // Credit that no money backs any more is written off.
    store
        .write_off("acct-b", &format!("writeoff-{tag}"), CENT / 100)
        .await
        .unwrap();
}

fn sorted(mut v: Vec<LedgerEntry>) -> Vec<LedgerEntry> {
    v.sort_by(|a, b| (&a.key, &a.account, &a.kind).cmp(&(&b.key, &b.account, &b.kind)));
    v
}

async fn copy_all(book: &mut Book, store: &RedisStore) -> (u64, u64) {
    let (mut inserted, mut dups) = (0, 0);
    loop {
        let c = book
            .copy_round(&tollgate_book::Ledgers::of(store), 3)
            .await
            .unwrap();
        inserted += c.inserted;
        dups += c.duplicates;
        if c.entries == 0 {
            return (inserted, dups);
        }
    }
}

async fn stream_len(redis: &RedisServer) -> usize {
    let mut c = redis.conn();
    redis::cmd("XLEN")
        .arg("tollgate:ledger")
        .query(&mut c)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ledger_line_is_booked_exactly_once_and_the_stream_is_trimmed_only_past_the_book() {
    let pg = PostgresServer::start();
    let redis = RedisServer::start();
    // Everything is "old" at once: only the book's mark holds the ledger back.
    let store = RedisStore::connect(&redis.url(), "tollgate", Duration::from_secs(10))
        .await
        .unwrap()
        .with_ledger_retention(Duration::from_millis(1));
    store.enable_book().await.unwrap();
    money_moves(&store, "1").await;
    let ledger = store.ledger().await.unwrap();
    assert!(ledger.len() >= 7, "{ledger:?}");
    // Nothing booked yet: the reaper keeps every entry, however old.
    tokio::time::sleep(Duration::from_millis(5)).await;
    store.reap_expired().await.unwrap();
    assert_eq!(
        store.ledger().await.unwrap(),
        ledger,
        "trimmed before the book had it"
    );

    let mut book = Book::connect(&pg.url(), "tollgate").await.unwrap();
    let (inserted, dups) = copy_all(&mut book, &store).await;
    assert_eq!((inserted, dups), (ledger.len() as u64, 0));
    assert_eq!(sorted(book.lines().await.unwrap()), sorted(ledger.clone()));

    // A round repeated from the start (a crash between commit and acknowledgement, a cursor
    // restored from a backup): every line is a duplicate, nothing is stored twice.
    let again = Book::connect(&pg.url(), "tollgate").await.unwrap();
    drop(again);
    {
        let client = common::sql(&pg).await;
        client
            .execute("UPDATE book_cursor SET last_id = '0-0'", &[])
            .await
            .unwrap();
    }
    let (inserted, dups) = copy_all(&mut book, &store).await;
    assert_eq!((inserted, dups), (0, ledger.len() as u64));
    assert_eq!(book.lines().await.unwrap().len(), ledger.len());
    // A mark Redis holds that is not a stream id counts as none: read again, nothing stalls.
    let _: () = redis::cmd("SET")
        .arg("tollgate:ledger:booked")
        .arg("garbage")
        .query(&mut redis.conn())
        .unwrap();
    let (inserted, dups) = copy_all(&mut book, &store).await;
    assert_eq!((inserted, dups), (0, ledger.len() as u64));

    // Booked entries go once old; one written after the last round stays until it is booked.
    store.credit("acct-c", "credit-c", CENT).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    store.reap_expired().await.unwrap();
    assert_eq!(
        stream_len(&redis).await,
        1,
        "only the unbooked credit is left"
    );
    copy_all(&mut book, &store).await;
    store.reap_expired().await.unwrap();
    assert_eq!(stream_len(&redis).await, 0);
    let lines = book.lines().await.unwrap();
    assert_eq!(lines.len(), ledger.len() + 1);
    let credited: i64 = lines
        .iter()
        .filter(|l| l.kind == "credit")
        .map(|l| l.amount)
        .sum();
    assert_eq!(credited, 9 * CENT);
}

/// The book's lines once it holds `n` of them (the writer copies in the background).
async fn wait_for(book: &Book, n: usize) -> Vec<LedgerEntry> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(lines) = book.lines().await
            && lines.len() == n
        {
            return lines;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "book never reached {n} lines"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_catches_up_after_postgresql_was_down_and_killed() {
    let pg = PostgresServer::start();
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), "tollgate", Duration::from_secs(10))
        .await
        .unwrap();
    let registry = prometheus::Registry::new();
    let metrics = tollgate_book::BookMetrics::new(&registry).unwrap();
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(tollgate_book::run(
        pg.url(),
        redis.url().into(),
        "tollgate".into(),
        1,
        Duration::from_millis(50),
        metrics,
        stop_rx,
    ));
    money_moves(&store, "1").await;
    let book = Book::connect(&pg.url(), "tollgate").await.unwrap();
    let first = store.ledger().await.unwrap().len();
    wait_for(&book, first).await;
    drop(book);

    // PostgreSQL stopped, then killed mid-way: money keeps moving in Redis meanwhile.
    pg.stop();
    money_moves(&store, "2").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    pg.start_again();
    money_moves(&store, "3").await;
    pg.kill();
    money_moves(&store, "4").await;
    pg.start_again();

    let ledger = store.ledger().await.unwrap();
    let book = Book::connect(&pg.url(), "tollgate").await.unwrap();
    let lines = wait_for(&book, ledger.len()).await;
    assert_eq!(sorted(lines), sorted(ledger));
    let _ = stop.send(true);
    writer.await.unwrap();
    let text = {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut buf)
            .unwrap();
        String::from_utf8(buf).unwrap()
    };
    assert!(
        text.lines()
            .any(|l| l.starts_with("tollgate_book_errors_total ") && !l.ends_with(" 0")),
        "the outage was counted: {text}"
    );
}

/// A lease that expires, is granted again and expires again on one incarnation and account:
/// two lines under one ledger key, both booked. Then reconcile: clean, and each kind of
/// tampering found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_lease_returns_are_each_booked_and_reconcile_finds_every_difference() {
    let (pg, redis, store) = common::booked_store(Duration::from_millis(300)).await;
    store.credit("acct-l", "credit-l", 5 * CENT).await.unwrap();
    let inc = store.begin("lease-node").await.unwrap();
    for seq in 1..=2 {
        store
            .settle(&SettleBatch {
                node_id: inc.node_id.clone(),
                epoch: inc.epoch,
                seq,
                entries: vec![SettleEntry {
                    account: "acct-l".into(),
                    usage: Usage {
                        requests: 1,
                        ..Default::default()
                    },
                    cost: 500_000,
                    give_back: 0,
                    ask: CENT / 10,
                }],
            })
            .await
            .unwrap();
        // Past the lease's expiry: the reaper returns it.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(store.reap_expired().await.unwrap(), 1);
    }
    let ledger = store.ledger().await.unwrap();
    let expires: Vec<_> = ledger.iter().filter(|l| l.kind == "expire").collect();
    assert_eq!(expires.len(), 2, "{ledger:?}");
    assert_eq!(expires[0].key, expires[1].key, "one key, two returns");

    let mut book = Book::connect(&pg.url(), "tollgate").await.unwrap();
    let (inserted, _) = copy_all(&mut book, &store).await;
    assert_eq!(inserted, ledger.len() as u64);
    assert_eq!(sorted(book.lines().await.unwrap()), sorted(ledger.clone()));
    assert_eq!(
        book.reconcile(&tollgate_book::Ledgers::of(&store))
            .await
            .unwrap(),
        vec![]
    );

    // Tampering, one of each kind, then reconcile names each.
    let client = common::sql(&pg).await;
    client
        .execute(
            "UPDATE book_entries SET amount = amount + 1 WHERE key = 'credit:credit-l'",
            &[],
        )
        .await
        .unwrap();
    client
        .execute(
            "DELETE FROM book_entries WHERE kind = 'settle' AND key LIKE '%:1'",
            &[],
        )
        .await
        .unwrap();
    let diffs = book
        .reconcile(&tollgate_book::Ledgers::of(&store))
        .await
        .unwrap();
    let text: Vec<String> = diffs.iter().map(ToString::to_string).collect();
    assert!(
        diffs.iter().any(|d| matches!(d, tollgate_book::Difference::Differs { key, .. } if key == "credit:credit-l")),
        "{text:?}"
    );
    assert!(
        diffs.iter().any(|d| matches!(d, tollgate_book::Difference::MissingInBook { key, .. } if key.starts_with("settle:") && key.ends_with(":1"))),
        "{text:?}"
    );
    assert!(
        diffs.iter().any(|d| matches!(d, tollgate_book::Difference::Totals { account, .. } if account == "acct-l")),
        "{text:?}"
    );
    // A line Redis lost (a data loss) while the book holds it.
    let mut c = redis.conn();
    let ids: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("tollgate:ledger")
        .arg("-")
        .arg("+")
        .query(&mut c)
        .unwrap();
    let expire_id = ids
        .iter()
        .find(|(_, f)| f.iter().any(|(k, v)| k == "kind" && v == "expire"))
        .map(|(id, _)| id.clone())
        .unwrap();
    let _: i64 = redis::cmd("XDEL")
        .arg("tollgate:ledger")
        .arg(&expire_id)
        .query(&mut c)
        .unwrap();
    let diffs = book
        .reconcile(&tollgate_book::Ledgers::of(&store))
        .await
        .unwrap();
    assert!(
        diffs.iter().any(|d| matches!(d, tollgate_book::Difference::MissingInLedger { key, .. } if key.starts_with("expire:"))),
        "{diffs:?}"
    );
}

/// Redis loses its data under the book: its new stream may start below the book's cursor (a
/// replica with a clock behind), and its keys repeat with other amounts. Nothing new is
/// skipped, and a reused key with other content is kept aside as a conflict, not dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_redis_data_loss_no_line_is_skipped_and_reused_keys_are_conflicts() {
    let (pg, redis, store) = common::booked_store(Duration::from_secs(10)).await;
    store.credit("acct-d", "topup-1", 2 * CENT).await.unwrap();
    let mut book = Book::connect(&pg.url(), "tollgate").await.unwrap();
    copy_all(&mut book, &store).await;
    assert_eq!(book.lines().await.unwrap().len(), 1);

    let mut c = redis.conn();
    let _: () = redis::cmd("FLUSHALL").query(&mut c).unwrap();
    // An entry whose stream id is below the book's cursor.
    let _: String = redis::cmd("XADD")
        .arg("tollgate:ledger")
        .arg("1-1")
        .arg(&[
            ("kind", "credit"),
            ("key", "credit:low-clock"),
            ("account", "acct-d"),
            ("amount", "7"),
            ("requests", "0"),
            ("cpu_us", "0"),
            ("deploys", "0"),
        ])
        .query(&mut c)
        .unwrap();
    // The same idempotency key as before the loss, another amount.
    store.credit("acct-d", "topup-1", 3 * CENT).await.unwrap();
    let mut conflicts = 0;
    loop {
        let r = book
            .copy_round(&tollgate_book::Ledgers::of(&store), 10)
            .await
            .unwrap();
        conflicts += r.conflicts;
        if r.entries == 0 {
            break;
        }
    }
    assert_eq!(conflicts, 1);
    let lines = book.lines().await.unwrap();
    assert!(
        lines.iter().any(|l| l.key == "credit:low-clock"),
        "{lines:?}"
    );
    let held: Vec<_> = lines.iter().filter(|l| l.key == "credit:topup-1").collect();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].amount, 2 * CENT, "the book's first row stays");
    let client = common::sql(&pg).await;
    let row = client
        .query_one(
            "SELECT amount FROM book_conflicts WHERE key = 'credit:topup-1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 3 * CENT);
}

/// Settle batches of many accounts: a round takes whole entries up to ~2000 lines (so a round
/// after an outage stays inside its time limit) and says when it has caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_takes_whole_entries_up_to_its_line_limit() {
    let pg = PostgresServer::start();
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), "tollgate", Duration::from_secs(10))
        .await
        .unwrap();
    let inc = store.begin("wide-node").await.unwrap();
    for seq in 1..=4 {
        let entries = (0..900)
            .map(|i| SettleEntry {
                account: format!("acct-{i}"),
                usage: Usage {
                    requests: 1,
                    ..Default::default()
                },
                cost: 500_000,
                give_back: 0,
                ask: 0,
            })
            .collect();
        store
            .settle(&SettleBatch {
                node_id: inc.node_id.clone(),
                epoch: inc.epoch,
                seq,
                entries,
            })
            .await
            .unwrap();
    }
    let mut book = Book::connect(&pg.url(), "tollgate").await.unwrap();
    let first = book
        .copy_round(&tollgate_book::Ledgers::of(&store), 500)
        .await
        .unwrap();
    assert_eq!((first.entries, first.inserted), (3, 2700));
    assert!(!first.caught_up);
    let second = book
        .copy_round(&tollgate_book::Ledgers::of(&store), 500)
        .await
        .unwrap();
    assert_eq!((second.entries, second.inserted), (1, 900));
    assert!(second.caught_up);
    assert_eq!(book.lines().await.unwrap().len(), 3600);
}

/// A Redis data loss, then `book rebuild` (the part under the CLI): every balance comes back
/// from the book, every credit, charge and settle key stays spent, a stopped node's
/// unacknowledged batches are applied once (the booked one as a duplicate, the unbooked one
/// now), and its next incarnation gets a fresh epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_redis_data_loss_rebuild_restores_every_balance_and_key_from_book_and_journals() {
    use tollgate_metering::{Journal, SettleOutcome};
    let pg = PostgresServer::start();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let store = RedisStore::connect(&redis.url(), "tollgate", Duration::from_secs(10))
        .await
        .unwrap();
    store.enable_book().await.unwrap();
    money_moves(&store, "1").await;

    // A node that stops with two batches its journal never saw acknowledged: seq 1 reached
    // Redis (and the book) before the loss, seq 2 never did.
    let journal_path = dir.path().join("node-j.journal");
    let inc = store.begin("node-j").await.unwrap();
    let batch = |seq: u64, cost: i64| SettleBatch {
        node_id: "node-j".into(),
        epoch: inc.epoch,
        seq,
        entries: vec![SettleEntry {
            account: "acct-a".into(),
            usage: Usage {
                requests: seq * 10,
                ..Default::default()
            },
            cost,
            give_back: 0,
            ask: CENT / 10,
        }],
    };
    let (b1, b2) = (batch(1, 7_000_000), batch(2, 11_000_000));
    {
        let mut j = Journal::open(&journal_path).unwrap();
        j.set_incarnation(&inc).unwrap();
        j.append(&b1).unwrap();
        store.settle(&b1).await.unwrap();
        j.append(&b2).unwrap();
    }
    let one = |node: &str, epoch: u64, seq: u64, cost: i64| SettleBatch {
        node_id: node.into(),
        epoch,
        seq,
        entries: vec![SettleEntry {
            account: "acct-b".into(),
            usage: Usage {
                requests: 4,
                ..Default::default()
            },
            cost,
            give_back: 0,
            ask: 0,
        }],
    };
    // Node k: its only pending batch reached Redis and the book (its answer was lost).
    let inc_k = store.begin("node-k").await.unwrap();
    let k1 = one("node-k", inc_k.epoch, 1, 2_000_000);
    let path_k = dir.path().join("node-k.journal");
    {
        let mut j = Journal::open(&path_k).unwrap();
        j.set_incarnation(&inc_k).unwrap();
        j.append(&k1).unwrap();
        store.settle(&k1).await.unwrap();
    }
    // Node m: batch 1 booked, batch 2 applied and acknowledged after the book's last round.
    let inc_m = store.begin("node-m").await.unwrap();
    let path_m = dir.path().join("node-m.journal");
    let mut jm = Journal::open(&path_m).unwrap();
    jm.set_incarnation(&inc_m).unwrap();
    let generation = store.ledger_generation().await.unwrap().unwrap();
    jm.set_generation(&inc_m, &generation).unwrap();
    let m1 = one("node-m", inc_m.epoch, 1, 0);
    jm.append(&m1).unwrap();
    store.settle(&m1).await.unwrap();
    jm.ack(&m1).unwrap();
    let mut book = Book::connect(&pg.url(), "tollgate").await.unwrap();
    copy_all(&mut book, &store).await;
    let m2 = one("node-m", inc_m.epoch, 2, 3_000_000);
    jm.append(&m2).unwrap();
    store.settle(&m2).await.unwrap();
    jm.ack(&m2).unwrap();
    drop(jm);
    // Node q: its batch 1 applied and acknowledged after the book's last round, and its
    // journal kept nothing (it ran without a book): that usage is lost, and named.
    let inc_q = store.begin("node-q").await.unwrap();
    let path_q = dir.path().join("node-q.journal");
    {
        let mut jq = Journal::open(&path_q).unwrap();
        jq.set_incarnation(&inc_q).unwrap();
        jq.set_generation(&inc_q, &generation).unwrap();
        let q1 = one("node-q", inc_q.epoch, 1, 5_000_000);
        jq.append(&q1).unwrap();
        store.settle(&q1).await.unwrap();
        jq.ack(&q1).unwrap();
        // Redis holds it (same generation, the incarnation's mark), and no book is declared
        // from this node's point of view: it goes.
        let incs = jq.kept_incarnations();
        let mut marks = store.book_marks(&incs).await.unwrap().unwrap();
        marks.streams[0].declared = false;
        assert_eq!(jq.release_booked(&marks, &incs).unwrap(), 1);
    }
    let ids = ["acct-a".to_owned(), "acct-b".to_owned()];
    let before = store.accounts(&ids).await.unwrap();
    let a = before[0].clone().unwrap();
    let b = before[1].clone().unwrap();
    assert!(a.leased > 0, "node-j holds a lease on acct-a: {a:?}");

    // The loss. Nodes stopped (their leases die with Redis).
    let mut c = redis.conn();
    redis::cmd("FLUSHALL").query::<()>(&mut c).unwrap();

    // A journal whose node still runs is refused before anything is written.
    let running = dir.path().join("running.journal");
    let held = Journal::open(&running).unwrap();
    assert!(matches!(
        Journal::read_stopped(&running),
        Err(tollgate_metering::JournalError::Locked { .. })
    ));
    drop(held);

    let set = book.restore_set().await.unwrap();
    assert_eq!(set.accounts["acct-a"], (a.credited, a.debited));
    let j = Journal::read_stopped(&journal_path).unwrap();
    assert_eq!(j.incarnation.as_ref(), Some(&inc));
    assert_eq!(j.pending, vec![b1.clone(), b2.clone()]);
    let (jk, jm) = (
        Journal::read_stopped(&path_k).unwrap(),
        Journal::read_stopped(&path_m).unwrap(),
    );
    assert!(jm.pending.is_empty() && jm.acked[&("node-m".to_owned(), inc_m.epoch)] == 2);
    // Acknowledged, and kept until the book holds them.
    assert_eq!(
        jm.kept.iter().map(|k| k.batch.clone()).collect::<Vec<_>>(),
        vec![m1.clone(), m2.clone()]
    );
    let jq = Journal::read_stopped(&path_q).unwrap();
    assert!(jq.kept.is_empty() && jq.pending.is_empty());
    let mut set = set;
    let keys: Vec<String> = [&j, &jk]
        .iter()
        .flat_map(|j| &j.pending)
        .map(|b| format!("settle:{}:{}:{}", b.node_id, b.epoch, b.seq))
        .collect();
    set.settle_lines = book.lines_of(&keys).await.unwrap();
    let report = store.restore(&set, &[j, jk, jm, jq]).await.unwrap();
    store.finish_restore().await.unwrap();
    // Booked: b1, k1, m1. Applied now: b2 (never acknowledged), m2 (acknowledged after the
    // book's last round, kept by its journal).
    assert_eq!(
        (
            report.journal_batches_booked,
            report.journal_batches_applied
        ),
        (3, 2),
        "{report:?}"
    );
    // What no store holds any more is named: node q's batch 1.
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    assert!(
        report.warnings[0].contains("node-q") && report.warnings[0].contains("batches 1 to 1"),
        "{:?}",
        report.warnings
    );

    // Balances: the book's totals, plus the one batch only the journal held; no lease.
    let after = store.accounts(&ids).await.unwrap();
    let a2 = after[0].clone().unwrap();
    let b2s = after[1].clone().unwrap();
    assert_eq!(
        (a2.credited, a2.debited, a2.leased),
        (a.credited, a.debited + 11_000_000, 0)
    );
    assert_eq!(a2.available, a2.credited - a2.debited);
    // acct-b: the book's totals and node m's kept batch 2; node q's batch 1 is lost.
    assert_eq!(
        (b2s.credited, b2s.debited),
        (b.credited, b.debited - 5_000_000)
    );
    assert_eq!(b2s.available, b2s.credited - b2s.debited);

    // Every key stays spent: a replayed credit, charge, write-off and settle move nothing.
    let credit = store
        .credit("acct-a", "credit-a-1", 5 * CENT)
        .await
        .unwrap();
    assert!(!credit.applied);
    assert!(
        store
            .credit("acct-a", "credit-a-1", 6 * CENT)
            .await
            .is_err()
    );
    let charge = store
        .charge("acct-a", "deploy-1", CENT, false)
        .await
        .unwrap();
    assert!(!charge.applied && charge.taken == CENT);
    assert!(
        !store
            .write_off("acct-b", "writeoff-1", CENT / 100)
            .await
            .unwrap()
            .applied
    );
    // The node's own replay at its next start: both batches are duplicates now.
    assert!(matches!(
        store.settle(&b2).await.unwrap(),
        SettleOutcome::Duplicate(_)
    ));
    // Node k's replay: a duplicate whose answer grants no lease (the incarnation is gone).
    match store.settle(&k1).await.unwrap() {
        SettleOutcome::Duplicate(g) => assert!(g.iter().all(|g| g.lease == 0), "{g:?}"),
        other => panic!("k1 replayed: {other:?}"),
    }
    match store.settle(&b1).await {
        Err(tollgate_metering::SettleError::Stale { .. }) => {}
        other => panic!("seq 1 replayed: {other:?}"),
    }
    let unchanged = store.accounts(&ids).await.unwrap();
    assert_eq!(unchanged, after, "a replay moved money");
    // The next incarnation is fresh, and nothing is granted to the dead one.
    let next = store.begin("node-j").await.unwrap();
    assert!(next.epoch > inc.epoch, "{next:?} reuses {inc:?}");

    // A second rebuild is refused: Redis holds money now.
    let err = store.restore(&set, &[]).await.unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    // And the book goes on: what the rebuild applied is copied, the two agree.
    let diffs = book
        .reconcile(&tollgate_book::Ledgers::of(&store))
        .await
        .unwrap();
    assert!(diffs.is_empty(), "{diffs:?}");
}

/// `reconcile` on a busy ledger names nothing that is not wrong (each chunk of accounts' totals
/// is read with the ledger's last id at one instant and compared with the book's sums up to
/// it), and names the lines of a tail Redis lost (book lines after its last entry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_is_clean_under_traffic_and_names_a_lost_tail() {
    let (pg, redis, store) = common::booked_store(Duration::from_secs(10)).await;
    money_moves(&store, "busy").await;
    let mut book = Book::connect(&pg.url(), "tollgate").await.unwrap();
    copy_all(&mut book, &store).await;
    // Money keeps moving on the same accounts while reconcile runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mover = {
        let (stop, url) = (stop.clone(), redis.url());
        tokio::spawn(async move {
            let s = RedisStore::connect(&url, "tollgate", Duration::from_secs(10))
                .await
                .unwrap();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                s.credit("acct-a", &format!("busy-{n}"), 1_000)
                    .await
                    .unwrap();
                s.charge("acct-b", &format!("busy-charge-{n}"), 1_000, false)
                    .await
                    .unwrap();
            }
            n
        })
    };
    for _ in 0..5 {
        let diffs = book
            .reconcile(&tollgate_book::Ledgers::of(&store))
            .await
            .unwrap();
        assert!(diffs.is_empty(), "under traffic: {diffs:?}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(mover.await.unwrap() > 10, "too little traffic");
    copy_all(&mut book, &store).await;
    assert!(
        book.reconcile(&tollgate_book::Ledgers::of(&store))
            .await
            .unwrap()
            .is_empty()
    );
    // Redis loses its last entry (a failover to a replica that never got it).
    let mut c = redis.conn();
    let last: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
        .arg("tollgate:ledger")
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query(&mut c)
        .unwrap();
    let _: i64 = redis::cmd("XDEL")
        .arg("tollgate:ledger")
        .arg(&last[0].0)
        .query(&mut c)
        .unwrap();
    let diffs = book
        .reconcile(&tollgate_book::Ledgers::of(&store))
        .await
        .unwrap();
    assert!(
        diffs
            .iter()
            .any(|d| matches!(d, tollgate_book::Difference::MissingInLedger { .. })),
        "{diffs:?}"
    );
}
