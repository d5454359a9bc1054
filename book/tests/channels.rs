//! Payment channel records in the book of record: copied with the ledger as one cut, and
//! rebuilt after a Redis data loss so that no voucher is credited twice and none goes
//! uncredited. Real PostgreSQL and redis-server (or a Redis Cluster with
//! `TOLLGATE_TEST_REDIS=cluster`), started by the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use mpp::protocol::methods::tempo::session_method::{ChannelState, ChannelStore};
use tollgate_book::{Book, Ledgers};
use tollgate_metering::{DEFAULT_SHARDS, Store};
use tollgate_payments::{ChannelBackend, RedisChannels, SharedChannels};
use tollgate_testkit::TestRedis;

/// $1 in the token's base units (6 decimals) and in p$.
const DOLLAR_BASE: u128 = 1_000_000;
const DOLLAR: i64 = 1_000_000_000_000;
const CHAIN: u64 = 42431;

fn state(id: &str, highest: u128) -> ChannelState {
    serde_json::from_value(serde_json::json!({
        "channel_id": id,
        "chain_id": CHAIN,
        "escrow_contract": "0x00000000000000000000000000000000000000e5",
        "payer": "0x00000000000000000000000000000000000000a1",
        "payee": "0x00000000000000000000000000000000000000b2",
        "token": "0x00000000000000000000000000000000000000c3",
        "authorized_signer": "0x00000000000000000000000000000000000000a1",
        "deposit": 100 * DOLLAR_BASE,
        "settled_on_chain": 0,
        "highest_voucher_amount": highest,
        "highest_voucher_signature": [1, 2, highest as u8],
        "spent": 0,
        "units": 0,
        "finalized": false,
        "created_at": "2026-12-07T00:00:00Z"
    }))
    .unwrap()
}

/// A voucher for `highest` accepted on channel `id` (what the session method does after
/// verifying its signature): the record rises, a pending credit is queued with it.
async fn voucher(shared: &SharedChannels, id: &str, highest: u128) {
    let next = state(id, highest);
    shared
        .update_channel(id, Box::new(move |_| Ok(Some(next))))
        .await
        .unwrap();
}

/// The payments drain: every pending credit into the money core, then forgotten.
async fn drain(backend: &RedisChannels, store: &dyn Store) -> usize {
    let pending = backend.pending_credits().await.unwrap();
    for c in &pending {
        store.credit(&c.account, &c.key, c.picos).await.unwrap();
        backend.credit_done(&c.key).await.unwrap();
    }
    pending.len()
}

async fn copy_all(book: &mut Book, l: &Ledgers) {
    while !book.copy_round(l, 500).await.unwrap().caught_up {}
}

/// `tollgate book rebuild` with no journal.
async fn rebuild(
    book: &Book,
    redis: &TestRedis,
    hold: Duration,
) -> Result<tollgate_book::Rebuilt, tollgate_book::BookError> {
    tollgate_book::rebuild(book, &redis.target(), "tollgate", DEFAULT_SHARDS, &[], hold).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_records_survive_a_redis_data_loss_so_no_voucher_credits_twice_or_never() {
    let (pg, redis, store, l) = common::booked_any(Duration::from_secs(10)).await;
    let store = &*store;
    let backend = Arc::new(
        RedisChannels::connect(redis.target(), "tollgate")
            .await
            .unwrap(),
    );
    let shared = SharedChannels::new(backend.clone(), CHAIN);
    let account = tollgate_payments::account_of(
        CHAIN,
        &"0x00000000000000000000000000000000000000a1"
            .parse()
            .unwrap(),
    );
    let (c1, c2, c3) = ("0xc1", "0xc2", "0xc3");

    // Channel 1: $1 then $3 accepted and credited; channel 2: $2 accepted and credited.
    voucher(&shared, c1, DOLLAR_BASE).await;
    assert_eq!(drain(&backend, store).await, 1);
    voucher(&shared, c1, 3 * DOLLAR_BASE).await;
    voucher(&shared, c2, 2 * DOLLAR_BASE).await;
    assert_eq!(drain(&backend, store).await, 2);
    // Channel 3: $5 accepted, its credit refused and set aside, then dropped by an operator
    // (settled by other means): never to be credited again, not even by a rebuild.
    voucher(&shared, c3, 5 * DOLLAR_BASE).await;
    let pending = backend.pending_credits().await.unwrap();
    let c3_credit = pending
        .iter()
        .find(|c| c.key.starts_with("mpp:0xc3:"))
        .unwrap()
        .clone();
    backend
        .poison(&tollgate_payments::PoisonedCredit {
            credit: c3_credit.clone(),
            reason: "test".into(),
            at_ms: 0,
        })
        .await
        .unwrap();
    assert!(
        backend
            .unpoison(&c3_credit.key, false)
            .await
            .unwrap()
            .is_some()
    );
    let mut book = Book::connect(&pg.url(), "tollgate").await.unwrap();
    copy_all(&mut book, &l).await;
    let (rows, side) = book.channels_at(l.channels_prefix()).await.unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| (r.id.as_str(), r.version))
            .collect::<Vec<_>>(),
        [(c1, 2), (c2, 1), (c3, 1)]
    );
    assert!(side.dropped.contains_key(&c3_credit.key), "{side:?}");
    // Channel 1: $4 accepted, its credit still pending when the book copies.
    voucher(&shared, c1, 4 * DOLLAR_BASE).await;
    copy_all(&mut book, &l).await;
    let (_, side) = book.channels_at(l.channels_prefix()).await.unwrap();
    assert_eq!(side.pending.len(), 1, "{side:?}");
    assert!(
        side.pending
            .contains_key(&format!("mpp:{c1}:{}", 4 * DOLLAR_BASE))
    );
    // Copying again stores nothing new (the records are clean).
    assert_eq!(book.copy_round(&l, 500).await.unwrap().channels, 0);
    assert!(book.reconcile(&l).await.unwrap().is_empty());

    // The writer lagged on channel 2's credit line: drop it from the book (what a loss right
    // after the voucher, before the copy, would leave).
    let pg_client = common::sql(&pg).await;
    let n = pg_client
        .execute(
            "DELETE FROM book_entries WHERE key = $1",
            &[&format!("credit:mpp:{c2}:{}", 2 * DOLLAR_BASE)],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);

    // After the book's last copy: channel 1 takes $6 (credited in Redis only). Then Redis
    // loses everything.
    voucher(&shared, c1, 6 * DOLLAR_BASE).await;
    drain(&backend, store).await;
    redis.flush_all();

    let restored = rebuild(&book, &redis, Duration::from_secs(600))
        .await
        .unwrap()
        .channels;
    assert_eq!(
        (
            restored.channels,
            restored.pending_credits,
            restored.gap_credits
        ),
        (3, 1, 1),
        "{restored:?}"
    );
    assert!(
        restored.warnings.len() == 1 && restored.warnings[0].contains(c2),
        "{:?}",
        restored.warnings
    );
    // The records are back at what the book held: channel 1 at $4, not $0.
    let r1 = backend.get(c1).await.unwrap().unwrap();
    assert_eq!(r1.state.highest_voucher_amount, 4 * DOLLAR_BASE);
    assert_eq!(
        r1.vouchers.last().unwrap().cumulative,
        4 * DOLLAR_BASE,
        "the signed voucher a settlement needs"
    );
    // The pending $1 of channel 1 and channel 2's missing $2 are credited by the drain.
    assert_eq!(drain(&backend, store).await, 2);
    let acct = store.account(&account).await.unwrap().unwrap();
    assert_eq!(
        acct.credited,
        6 * DOLLAR,
        "$4 on channel 1, $2 on channel 2"
    );

    // The payer's next voucher on channel 1 ($6 again: the one Redis lost) is credited from
    // $4, once; replayed, it credits nothing.
    voucher(&shared, c1, 6 * DOLLAR_BASE).await;
    voucher(&shared, c1, 6 * DOLLAR_BASE).await;
    assert_eq!(drain(&backend, store).await, 1);
    let acct = store.account(&account).await.unwrap().unwrap();
    assert_eq!(
        acct.credited,
        8 * DOLLAR,
        "every channel's credits add up to its vouchers"
    );

    // The book goes on, and agrees with Redis; a forged credit line is named.
    assert!(book.reconcile(&l).await.unwrap().is_empty());
    pg_client
        .execute(
            "INSERT INTO book_entries (prefix, key, account, kind, amount, requests, cpu_us, deploys, rows_read, rows_written, stream_ms, stream_seq)
             VALUES ($4, $1, $2, 'credit', $3, 0, 0, 0, 0, 0, 1, 0)",
            &[
                &format!("credit:mpp:{c2}:{}", 9 * DOLLAR_BASE),
                &account,
                &(7 * DOLLAR),
                &common::stream_of(&l, &account),
            ],
        )
        .await
        .unwrap();
    let diffs = book.reconcile(&l).await.unwrap();
    assert!(
        diffs
            .iter()
            .any(|d| d.to_string().contains(&format!("channel {c2}: credited"))),
        "{diffs:?}"
    );
    // A second rebuild is refused: Redis holds channels (and money) now.
    let err = rebuild(&book, &redis, Duration::from_secs(600))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("payment channel state"), "{err}");

    // A second loss, after the book copied everything (the forged line removed): the gap
    // credit of the first rebuild counts as channel 2's credit, so nothing is put back twice.
    pg_client
        .execute(
            "DELETE FROM book_entries WHERE key = $1",
            &[&format!("credit:mpp:{c2}:{}", 9 * DOLLAR_BASE)],
        )
        .await
        .unwrap();
    assert!(book.reconcile(&l).await.unwrap().is_empty());
    redis.flush_all();
    let again = rebuild(&book, &redis, Duration::from_secs(600))
        .await
        .unwrap()
        .channels;
    assert_eq!(
        (again.pending_credits, again.gap_credits),
        (0, 0),
        "{again:?}"
    );
    assert!(again.warnings.is_empty(), "{:?}", again.warnings);
    assert_eq!(drain(&backend, store).await, 0);
    let acct = store.account(&account).await.unwrap().unwrap();
    assert_eq!(acct.credited, 8 * DOLLAR, "nothing credited twice");
}

/// A deploy charged after the book's last stored channel state (the book lagging): its held
/// reversal may be lost with Redis, so the rebuild holds it again, and the customer gets the
/// charge back at the deadline unless the start is kept; a deploy whose refund the book holds
/// is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_charged_after_the_last_channel_state_is_held_again_by_the_rebuild() {
    let (pg, redis, store, l) = common::booked_any(Duration::from_secs(10)).await;
    let store = &*store;
    let backend = Arc::new(
        RedisChannels::connect(redis.target(), "tollgate")
            .await
            .unwrap(),
    );
    let acct = "acct-deploy";
    store.credit(acct, "topup-d", DOLLAR).await.unwrap();
    let price = DOLLAR / 20;
    // Two deploys charged; the first failed and was refunded.
    store
        .charge(acct, "deploy:failed", price, false)
        .await
        .unwrap();
    store
        .credit(acct, "refund:deploy:failed", price)
        .await
        .unwrap();
    store
        .charge(acct, "deploy:late", price, false)
        .await
        .unwrap();
    let mut book = Book::connect(&pg.url(), "tollgate").await.unwrap();
    copy_all(&mut book, &l).await;
    // The stored channel state is older than both charges (a book that lagged).
    let pg_client = common::sql(&pg).await;
    let n = pg_client
        .execute(
            "UPDATE book_channel_state SET bound_ms = 0, bound_seq = 0, stream_bounds = NULL",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(n, 1, "the side state the copy stored");
    redis.flush_all();
    let restored = rebuild(&book, &redis, Duration::ZERO)
        .await
        .unwrap()
        .channels;
    assert!(
        restored.warnings.len() == 1 && restored.warnings[0].contains("deploy:late"),
        "{:?}",
        restored.warnings
    );
    let held = backend.held_credits().await.unwrap();
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0].reverses.as_deref(), Some("deploy:late"));
    assert_eq!(
        store.account(acct).await.unwrap().unwrap().available,
        DOLLAR - price
    );
    // Nobody keeps it: at its deadline the drain gives the charge back, once.
    let due = tollgate_payments::PendingCredit {
        not_before_ms: None,
        ..held[0].clone()
    };
    assert!(backend.unhold(&held[0].key, Some(&due)).await.unwrap());
    let pending = backend.pending_credits().await.unwrap();
    assert_eq!(pending.len(), 1);
    // The reversal as the payments drain applies it: take hold of the charge key, credit back.
    let taken = store
        .charge(acct, "deploy:late", price, true)
        .await
        .unwrap()
        .taken;
    store.credit(acct, &pending[0].key, taken).await.unwrap();
    assert_eq!(
        store.account(acct).await.unwrap().unwrap().available,
        DOLLAR
    );
}
