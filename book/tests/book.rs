//! The book of record against a real PostgreSQL cluster and a real redis-server, both started
//! by the test on free loopback ports.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

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
}

fn sorted(mut v: Vec<LedgerEntry>) -> Vec<LedgerEntry> {
    v.sort_by(|a, b| (&a.key, &a.account, &a.kind).cmp(&(&b.key, &b.account, &b.kind)));
    v
}

async fn copy_all(book: &mut Book, store: &RedisStore) -> (u64, u64) {
    let (mut inserted, mut dups) = (0, 0);
    loop {
        let c = book.copy_round(store, 3).await.unwrap();
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
        let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .execute("UPDATE book_cursor SET last_id = '0-0'", &[])
            .await
            .unwrap();
    }
    let (inserted, dups) = copy_all(&mut book, &store).await;
    assert_eq!((inserted, dups), (0, ledger.len() as u64));
    assert_eq!(book.lines().await.unwrap().len(), ledger.len());

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
        store.clone(),
        "tollgate".into(),
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
