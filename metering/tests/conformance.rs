//! One suite, two backends: every money rule holds the same against a real redis-server and the
//! embedded store. Each scenario ends by checking the account invariant.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use tollgate_metering::store::grant;
use tollgate_metering::{
    AccountState, ChargeError, ClusterStore, CreditError, EmbeddedStore, FeedEvent, RedisStore,
    SettleBatch, SettleEntry, SettleError, SettleOutcome, Status, Store, Usage,
};
use tollgate_testkit::{RedisCluster, RedisServer};

const USD: i64 = 1_000_000_000_000;
const CENT: i64 = USD / 100;

/// A backend under test.
struct Backend {
    store: Arc<dyn Store>,
    /// A second handle as another node would have it (own connection / same file).
    other: Arc<dyn Store>,
    /// Money split over the shards of a Redis Cluster: a shard sees only the batches with lines
    /// for it, so a skipped seq is not a gap there.
    sharded: bool,
}

/// Whatever keeps a backend alive; held by the test runner, not the scenario, so that a
/// scenario using only some fields cannot drop the server early.
type Guard = (
    Option<RedisServer>,
    Option<tempfile::TempDir>,
    Option<RedisCluster>,
);

async fn redis_backend(ttl: Duration) -> (Backend, Guard) {
    let redis = RedisServer::start();
    let a = RedisStore::connect(&redis.url(), "tollgate", ttl)
        .await
        .unwrap();
    let b = RedisStore::connect(&redis.url(), "tollgate", ttl)
        .await
        .unwrap();
    let backend = Backend {
        store: Arc::new(a),
        other: Arc::new(b),
        sharded: false,
    };
    (backend, (Some(redis), None, None))
}

/// A real 3-master, 3-replica Redis Cluster, money in 8 shards (few, so that the scenarios'
/// accounts share shards too).
async fn cluster_backend(ttl: Duration) -> (Backend, Guard) {
    let cluster = RedisCluster::start();
    let a = ClusterStore::connect(&cluster.urls(), "tollgate", ttl, 8)
        .await
        .unwrap();
    let b = ClusterStore::connect(&cluster.urls()[3..], "tollgate", ttl, 8)
        .await
        .unwrap();
    let backend = Backend {
        store: Arc::new(a),
        other: Arc::new(b),
        sharded: true,
    };
    (backend, (None, None, Some(cluster)))
}

async fn embedded_backend(ttl: Duration) -> (Backend, Guard) {
    let dir = tempfile::tempdir().unwrap();
    let s = EmbeddedStore::open(&dir.path().join("money.redb"), ttl).unwrap();
    let backend = Backend {
        store: Arc::new(s.clone()),
        other: Arc::new(s),
        sharded: false,
    };
    (backend, (None, Some(dir), None))
}

/// Runs a scenario against both backends.
macro_rules! conformance {
    ($name:ident, $ttl:expr, $body:expr) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                let (b, guard) = redis_backend($ttl).await;
                assert!(guard.0.is_some(), "runs against a real redis-server");
                ($body)(b).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cluster() {
                let (b, guard) = cluster_backend($ttl).await;
                assert!(guard.2.is_some(), "runs against a real Redis Cluster");
                ($body)(b).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                let (b, guard) = embedded_backend($ttl).await;
                assert!(guard.1.is_some(), "runs against an embedded store file");
                ($body)(b).await;
            }
        }
    };
}

const TTL: Duration = Duration::from_secs(10);

fn entry(account: &str, requests: u64, cost: i64, give_back: i64, ask: i64) -> SettleEntry {
    SettleEntry {
        account: account.into(),
        usage: Usage {
            requests,
            cpu_us: 0,
            deploys: 0,
            ..Default::default()
        },
        cost,
        give_back,
        ask,
    }
}

fn batch(node: &str, epoch: u64, seq: u64, entries: Vec<SettleEntry>) -> SettleBatch {
    SettleBatch {
        node_id: node.into(),
        epoch,
        seq,
        entries,
    }
}

async fn state(s: &dyn Store, id: &str) -> AccountState {
    let st = s.account(id).await.unwrap().expect("account exists");
    assert!(st.holds_invariant(), "invariant broken: {st:?}");
    st
}

conformance!(charges_apply_once_per_key, TTL, |b: Backend| async move {
    let s = b.store;
    s.credit("carol", "c1", 3 * USD).await.unwrap();
    // All or nothing: more than available is refused and records nothing.
    let e = s
        .charge("carol", "deploy:d0", 4 * USD, false)
        .await
        .unwrap_err();
    assert_eq!(e, ChargeError::Insufficient { available: 3 * USD });
    if b.sharded {
        // On a cluster the key stays claimed for its account and amount (freeing it could
        // race a retry that applied): the same key for less is refused.
        assert!(matches!(
            s.charge("carol", "deploy:d0", USD, false).await,
            Err(ChargeError::Mismatch { .. })
        ));
        assert_eq!(state(&*s, "carol").await.available, 3 * USD);
    } else {
        // One Redis records nothing: the key is free for another amount.
        let e = s
            .charge("carol", "deploy:d1", 4 * USD, false)
            .await
            .unwrap_err();
        assert_eq!(e, ChargeError::Insufficient { available: 3 * USD });
    }
    let r = s.charge("carol", "deploy:d1", USD, false).await.unwrap();
    assert!(r.applied);
    assert_eq!(r.taken, USD);
    assert_eq!(r.state.available, 2 * USD);
    assert_eq!(r.state.debited, USD);
    // Retried (same key, same amount): the first answer, nothing moves.
    let again = s.charge("carol", "deploy:d1", USD, false).await.unwrap();
    assert!(!again.applied);
    assert_eq!(again.taken, USD);
    assert_eq!(again.state.available, 2 * USD);
    // Same key, other amount or account: refused.
    assert!(matches!(
        s.charge("carol", "deploy:d1", 2 * USD, false).await,
        Err(ChargeError::Mismatch { .. })
    ));
    // Partial takes what there is, once.
    let p = s.charge("carol", "close:ch1", 5 * USD, true).await.unwrap();
    assert_eq!(p.taken, 2 * USD);
    assert_eq!(p.state.available, 0);
    assert_eq!(p.state.status, Status::Suspended);
    let p2 = s.charge("carol", "close:ch1", 5 * USD, true).await.unwrap();
    assert!(!p2.applied);
    assert_eq!(p2.taken, 2 * USD);
    // Nothing left: a partial charge takes 0 and still answers the same on retry.
    let z = s.charge("carol", "close:ch2", USD, true).await.unwrap();
    assert_eq!(z.taken, 0);
    // Bad input changes nothing.
    assert!(matches!(
        s.charge("carol", "k", 0, false).await,
        Err(ChargeError::Invalid(_))
    ));
    assert!(matches!(
        s.charge("bad id!", "k", 5, false).await,
        Err(ChargeError::Invalid(_))
    ));
    let st = state(&*s, "carol").await;
    assert_eq!(st.credited, 3 * USD);
    assert_eq!(st.debited, 3 * USD);
    let charges: Vec<_> = s
        .ledger()
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "charge")
        .map(|e| (e.key, e.amount))
        .collect();
    assert_eq!(
        charges,
        vec![
            ("charge:deploy:d1".to_owned(), USD),
            ("charge:close:ch1".to_owned(), 2 * USD)
        ]
    );
});

conformance!(
    write_offs_take_leases_too_once_per_key,
    TTL,
    |b: Backend| async move {
        let s = b.store;
        s.credit("wo", "c1", 10 * USD).await.unwrap();
        // A node holds 4 of the 10 in a lease.
        let g = s
            .settle(&batch("n1", 1, 1, vec![entry("wo", 0, 0, 0, 4 * USD)]))
            .await
            .unwrap();
        assert_eq!(g.grants()[0].lease, 4 * USD);
        // Writing off 7 takes the 6 available and 1 against the lease: available goes to −1.
        let w = s.write_off("wo", "writeoff:ch1", 7 * USD).await.unwrap();
        assert!(w.applied);
        assert_eq!(w.taken, 7 * USD);
        assert_eq!(w.state.available, -USD);
        assert_eq!(w.state.leased, 4 * USD);
        assert_eq!(w.state.status, Status::Suspended);
        // Retried: the first answer, nothing moves.
        let again = s.write_off("wo", "writeoff:ch1", 7 * USD).await.unwrap();
        assert!(!again.applied);
        assert_eq!(again.taken, 7 * USD);
        assert_eq!(again.state.available, -USD);
        // Charges and write-offs share the key space.
        assert!(matches!(
            s.charge("wo", "writeoff:ch1", USD, true).await,
            Err(ChargeError::Mismatch { .. })
        ));
        // The node returns its lease unspent: the account ends at what stays backed (3).
        s.settle(&batch("n1", 1, 2, vec![entry("wo", 0, 0, 4 * USD, 0)]))
            .await
            .unwrap();
        let st = state(&*s, "wo").await;
        assert_eq!(st.available, 3 * USD);
        // More than the whole balance: takes the balance, never pushes it further down.
        let all = s.write_off("wo", "writeoff:ch2", 50 * USD).await.unwrap();
        assert_eq!(all.taken, 3 * USD);
        assert_eq!(all.state.available, 0);
        let none = s.write_off("wo", "writeoff:ch3", USD).await.unwrap();
        assert_eq!(none.taken, 0);
        assert!(matches!(
            s.write_off("wo", "k", -1).await,
            Err(ChargeError::Invalid(_))
        ));
        let st = state(&*s, "wo").await;
        assert_eq!(st.credited, 10 * USD);
        assert_eq!(st.debited, 10 * USD);
        let offs: Vec<_> = s
            .ledger()
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "write_off")
            .map(|e| (e.key, e.amount))
            .collect();
        assert_eq!(
            offs,
            vec![
                ("write_off:writeoff:ch1".to_owned(), 7 * USD),
                ("write_off:writeoff:ch2".to_owned(), 3 * USD)
            ]
        );
    }
);

conformance!(credits_apply_once_per_key, TTL, |b: Backend| async move {
    let s = b.store;
    let r = s.credit("alice", "chan1:100", 5 * USD).await.unwrap();
    assert!(r.applied);
    assert_eq!(r.state.credited, 5 * USD);
    assert_eq!(r.state.available, 5 * USD);
    assert_eq!(r.state.status, Status::Active);
    // Retried: nothing changes.
    let again = s.credit("alice", "chan1:100", 5 * USD).await.unwrap();
    assert!(!again.applied);
    assert_eq!(again.state.credited, 5 * USD);
    // Same key, other amount: refused, nothing changes.
    let e = s.credit("alice", "chan1:100", 6 * USD).await.unwrap_err();
    assert!(
        matches!(e, CreditError::Mismatch { stored, .. } if stored == 5 * USD),
        "{e:?}"
    );
    // Bad input: refused before anything is written.
    assert!(matches!(
        s.credit("alice", "k2", 0).await,
        Err(CreditError::Invalid(_))
    ));
    assert!(matches!(
        s.credit("alice", "k2", -5).await,
        Err(CreditError::Invalid(_))
    ));
    assert!(matches!(
        s.credit("bad id!", "k3", 5).await,
        Err(CreditError::Invalid(_))
    ));
    assert!(matches!(
        s.credit("alice", "", 5).await,
        Err(CreditError::Invalid(_))
    ));
    let st = state(&*s, "alice").await;
    assert_eq!(st.credited, 5 * USD);
    assert!(s.account("bad id!").await.unwrap().is_none());
    // The node-resync view agrees with the full record.
    let view = s
        .account_changes(&["alice".to_owned(), "nobody".to_owned()])
        .await
        .unwrap();
    let a = view[0].as_ref().unwrap();
    assert_eq!(
        (a.version, a.available, a.status),
        (st.version, st.available, st.status)
    );
    assert!(view[1].is_none());
    let credits: Vec<_> = s
        .ledger()
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "credit")
        .collect();
    assert_eq!(credits.len(), 1);
    assert_eq!(credits[0].key, "credit:chan1:100");
});

conformance!(
    two_nodes_crediting_the_same_voucher_credit_once,
    TTL,
    |b: Backend| async move {
        let mut tasks = Vec::new();
        for i in 0..20 {
            let s = if i % 2 == 0 {
                b.store.clone()
            } else {
                b.other.clone()
            };
            tasks.push(tokio::spawn(async move {
                s.credit("bob", "chan9:250", 250 * CENT).await
            }));
        }
        let mut applied = 0;
        for t in tasks {
            if t.await.unwrap().unwrap().applied {
                applied += 1;
            }
        }
        assert_eq!(applied, 1);
        assert_eq!(state(&*b.store, "bob").await.credited, 250 * CENT);
    }
);

conformance!(
    settle_debits_grants_and_is_idempotent,
    TTL,
    |b: Backend| async move {
        let s = b.store;
        s.credit("carol", "k", USD).await.unwrap();
        let inc = s.begin("node-a").await.unwrap();
        // First batch: no usage, ask for a 10-cent lease.
        let o = s
            .settle(&batch(
                "node-a",
                inc.epoch,
                1,
                vec![entry("carol", 0, 0, 0, 10 * CENT)],
            ))
            .await
            .unwrap();
        let g = &o.grants()[0];
        assert_eq!(g.lease, 10 * CENT);
        assert_eq!(g.available, 90 * CENT);
        let st = state(&*s, "carol").await;
        assert_eq!(
            (st.available, st.leased, st.debited),
            (90 * CENT, 10 * CENT, 0)
        );

        // Spend 3 cents out of the lease and ask for 3 more (back to 10).
        let b2 = batch(
            "node-a",
            inc.epoch,
            2,
            vec![entry("carol", 60_000, 3 * CENT, 0, 3 * CENT)],
        );
        let first = s.settle(&b2).await.unwrap();
        assert!(matches!(first, SettleOutcome::Applied(_)));
        let st = state(&*s, "carol").await;
        assert_eq!(
            (st.debited, st.leased, st.available),
            (3 * CENT, 10 * CENT, 87 * CENT)
        );
        // The same batch again (a retry after a lost reply): same answer, nothing moves.
        let dup = s.settle(&b2).await.unwrap();
        assert!(matches!(dup, SettleOutcome::Duplicate(_)));
        assert_eq!(dup.grants(), first.grants());
        assert_eq!(state(&*s, "carol").await, st);
        // Same seq, other content: refused.
        let evil = batch("node-a", inc.epoch, 2, vec![entry("carol", 1, 1, 0, 0)]);
        assert_eq!(
            s.settle(&evil).await.unwrap_err(),
            SettleError::Mismatch { seq: 2 }
        );
        // A gap, and an old batch. (A shard of a cluster cannot tell a gap from batches that
        // had no lines for it; the agent sends one batch at a time, in order.)
        if !b.sharded {
            let gap = batch("node-a", inc.epoch, 4, vec![entry("carol", 1, 1, 0, 0)]);
            assert_eq!(
                s.settle(&gap).await.unwrap_err(),
                SettleError::Gap {
                    expected: 3,
                    got: 4
                }
            );
        }
        let old = batch(
            "node-a",
            inc.epoch,
            1,
            vec![entry("carol", 0, 0, 0, 10 * CENT)],
        );
        assert!(matches!(
            s.settle(&old).await,
            Err(SettleError::Stale { seq: 1, hwm: 2 })
        ));
        // Invalid input changes nothing.
        for bad in [
            batch("node-a", inc.epoch, 3, vec![entry("carol", 1, -1, 0, 0)]),
            batch("node-a", inc.epoch, 3, vec![entry("bad id", 1, 1, 0, 0)]),
            batch("node a", inc.epoch, 3, vec![entry("carol", 1, 1, 0, 0)]),
            batch("node-a", inc.epoch, 0, vec![entry("carol", 1, 1, 0, 0)]),
            batch(
                "node-a",
                inc.epoch,
                3,
                vec![entry("carol", 1, 1, 0, 0), entry("carol", 1, 1, 0, 0)],
            ),
        ] {
            assert!(
                matches!(s.settle(&bad).await, Err(SettleError::Invalid(_))),
                "{bad:?}"
            );
        }
        assert_eq!(state(&*s, "carol").await, st);
        // Give the lease back.
        s.settle(&batch(
            "node-a",
            inc.epoch,
            3,
            vec![entry("carol", 0, 0, 10 * CENT, 0)],
        ))
        .await
        .unwrap();
        let st = state(&*s, "carol").await;
        assert_eq!((st.leased, st.available), (0, 97 * CENT));
        // The ledger has one settle line per applied (batch, account), none for duplicates.
        let settles: Vec<_> = s
            .ledger()
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "settle")
            .collect();
        assert_eq!(settles.len(), 3);
        assert_eq!(settles.iter().map(|e| e.amount).sum::<i64>(), st.debited);
        assert_eq!(settles[1].key, format!("settle:node-a:{}:2", inc.epoch));
        assert_eq!(settles[1].requests, 60_000);
    }
);

conformance!(
    spending_past_the_lease_is_debt_and_suspends,
    TTL,
    |b: Backend| async move {
        let s = b.store;
        let mut feed = s.subscribe();
        s.credit("dave", "k", 2 * CENT).await.unwrap();
        let inc = s.begin("node-a").await.unwrap();
        s.settle(&batch(
            "node-a",
            inc.epoch,
            1,
            vec![entry("dave", 0, 0, 0, 2 * CENT)],
        ))
        .await
        .unwrap();
        let st = state(&*s, "dave").await;
        assert_eq!(
            (st.available, st.leased, st.status),
            (0, 2 * CENT, Status::Suspended)
        );
        // CPU ran 1 cent past the lease: the excess is debt.
        s.settle(&batch(
            "node-a",
            inc.epoch,
            2,
            vec![entry("dave", 10, 3 * CENT, 0, CENT)],
        ))
        .await
        .unwrap();
        let st = state(&*s, "dave").await;
        assert_eq!((st.debited, st.leased, st.available), (3 * CENT, 0, -CENT));
        assert_eq!(st.status, Status::Suspended);
        // A top-up pays the debt first and resumes the account.
        let r = s.credit("dave", "k2", 5 * CENT).await.unwrap();
        assert_eq!(
            (r.state.available, r.state.status),
            (4 * CENT, Status::Active)
        );
        // The feed carried every change, versions increasing.
        let mut last = 0;
        let mut seen_active = false;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !seen_active && tokio::time::Instant::now() < deadline {
            if let Ok(Ok(FeedEvent::Change(c))) =
                tokio::time::timeout(Duration::from_millis(500), feed.recv()).await
            {
                assert_eq!(c.account, "dave");
                assert!(c.version > last, "versions must increase");
                last = c.version;
                seen_active = c.status == Status::Active && c.available == 4 * CENT;
            }
        }
        assert!(seen_active, "the feed never carried the resumption");
    }
);

conformance!(release_returns_leases_once, TTL, |b: Backend| async move {
    let s = b.store;
    s.credit("erin", "k", USD).await.unwrap();
    s.credit("frank", "k2", USD).await.unwrap();
    let inc = s.begin("node-b").await.unwrap();
    let inc2 = s.begin("node-b").await.unwrap();
    assert!(inc2.epoch > inc.epoch, "epochs are never reused");
    s.settle(&batch(
        "node-b",
        inc.epoch,
        1,
        vec![
            entry("erin", 0, 0, 0, 20 * CENT),
            entry("frank", 0, 0, 0, 30 * CENT),
        ],
    ))
    .await
    .unwrap();
    assert_eq!(s.release(&inc).await.unwrap(), 2);
    assert_eq!(s.release(&inc).await.unwrap(), 0, "release is idempotent");
    let e = state(&*s, "erin").await;
    assert_eq!((e.leased, e.available), (0, USD));
    // A late batch of the released incarnation still debits (usage is never forgiven) but gets
    // no lease.
    let o = s
        .settle(&batch(
            "node-b",
            inc.epoch,
            2,
            vec![entry("erin", 5, 5 * CENT, 0, 10 * CENT)],
        ))
        .await
        .unwrap();
    assert_eq!(o.grants()[0].lease, 0);
    let e = state(&*s, "erin").await;
    assert_eq!((e.debited, e.leased, e.available), (5 * CENT, 0, 95 * CENT));
});

conformance!(
    expired_leases_are_reaped,
    Duration::from_millis(300),
    |b: Backend| async move {
        let s = b.store;
        s.credit("gina", "k", USD).await.unwrap();
        let inc = s.begin("node-c").await.unwrap();
        s.settle(&batch(
            "node-c",
            inc.epoch,
            1,
            vec![entry("gina", 0, 0, 0, 40 * CENT)],
        ))
        .await
        .unwrap();
        assert_eq!(s.reap_expired().await.unwrap(), 0, "not expired yet");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(s.reap_expired().await.unwrap(), 1);
        let g = state(&*s, "gina").await;
        assert_eq!((g.leased, g.available), (0, USD));
        // The node comes back late and settles what it spent: accepted once, as debt if need be.
        s.settle(&batch(
            "node-c",
            inc.epoch,
            2,
            vec![entry("gina", 1, CENT, 0, 0)],
        ))
        .await
        .unwrap();
        let g = state(&*s, "gina").await;
        assert_eq!((g.debited, g.available, g.leased), (CENT, 99 * CENT, 0));
    }
);

conformance!(
    grants_never_exceed_what_is_available,
    TTL,
    |b: Backend| async move {
        let s = b.store;
        s.credit("hal", "k", 5 * CENT).await.unwrap();
        let a = s.begin("na").await.unwrap();
        let c = s.begin("nb").await.unwrap();
        let ga = s
            .settle(&batch(
                "na",
                a.epoch,
                1,
                vec![entry("hal", 0, 0, 0, 4 * CENT)],
            ))
            .await
            .unwrap();
        let gb = s
            .settle(&batch(
                "nb",
                c.epoch,
                1,
                vec![entry("hal", 0, 0, 0, 4 * CENT)],
            ))
            .await
            .unwrap();
        // 5 cents left, 4 asked: less than twice the ask is left, so half of it.
        assert_eq!(ga.grants()[0].lease, 5 * CENT / 2);
        // 2.5 left, 4 asked: all that is left.
        assert_eq!(gb.grants()[0].lease, 5 * CENT / 2, "only what was left");
        let h = state(&*s, "hal").await;
        assert_eq!((h.available, h.leased), (0, 5 * CENT));
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("money.redb");
    let epoch;
    {
        let s = EmbeddedStore::open(&path, TTL).unwrap();
        s.credit("ivy", "k", USD).await.unwrap();
        epoch = s.begin("n1").await.unwrap().epoch;
        s.settle(&batch(
            "n1",
            epoch,
            1,
            vec![entry("ivy", 7, 7 * CENT, 0, 10 * CENT)],
        ))
        .await
        .unwrap();
    }
    let s = EmbeddedStore::open(&path, TTL).unwrap();
    let st = state(&s, "ivy").await;
    assert_eq!(
        (st.credited, st.debited, st.leased),
        (USD, 7 * CENT, 10 * CENT)
    );
    // Idempotency keys survived too.
    assert!(!s.credit("ivy", "k", USD).await.unwrap().applied);
    let dup = s
        .settle(&batch(
            "n1",
            epoch,
            1,
            vec![entry("ivy", 7, 7 * CENT, 0, 10 * CENT)],
        ))
        .await
        .unwrap();
    assert!(matches!(dup, SettleOutcome::Duplicate(_)));
    assert!(s.begin("n1").await.unwrap().epoch > epoch);
    assert_eq!(s.ledger().await.unwrap().len(), 2);
}

/// The Redis ledger is trimmed by age on the reaper's rounds; money and idempotency do not
/// depend on it: a credit resubmitted after its ledger entry is gone is still applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_ledger_is_trimmed_by_age_and_idempotency_survives() {
    let redis = RedisServer::start();
    let s = RedisStore::connect(&redis.url(), "tollgate", TTL)
        .await
        .unwrap()
        .with_ledger_retention(Duration::from_millis(200));
    s.credit("lea", "voucher-1", USD).await.unwrap();
    s.reap_expired().await.unwrap();
    assert_eq!(s.ledger().await.unwrap().len(), 1, "young entries stay");
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.credit("lea", "voucher-2", USD).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.reap_expired().await.unwrap();
    let ledger = s.ledger().await.unwrap();
    assert_eq!(ledger.len(), 1, "{ledger:?}");
    assert_eq!(ledger[0].key, "credit:voucher-2");
    // The trimmed credit's key still guards it.
    assert!(!s.credit("lea", "voucher-1", USD).await.unwrap().applied);
    let st = state(&s, "lea").await;
    assert_eq!(st.credited, 2 * USD);
    assert!(st.holds_invariant());
    // Retention zero keeps everything.
    let all = RedisStore::connect(&redis.url(), "tollgate", TTL)
        .await
        .unwrap()
        .with_ledger_retention(Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(300)).await;
    all.reap_expired().await.unwrap();
    assert_eq!(all.ledger().await.unwrap().len(), 1);
}

#[test]
fn the_grant_rule() {
    assert_eq!(grant(10, 100), 10, "plenty: all of the ask");
    assert_eq!(grant(10, 20), 10);
    assert_eq!(
        grant(10, 19),
        9,
        "less than twice the ask: half of what is left"
    );
    assert_eq!(grant(10, 10), 10, "no more than the ask: all of it");
    assert_eq!(grant(10, 3), 3);
    assert_eq!(grant(10, 0), 0);
    assert_eq!(grant(10, -5), 0, "debt: nothing");
    assert_eq!(grant(0, 100), 0);
}

/// A shard that lost acknowledged settle parts (both copies failed, a forced takeover) cannot
/// get them back; the next part is applied, and the loss is reported instead of passing
/// silently. Simulated by deleting the shard's mark of the incarnation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_a_shard_that_lost_acknowledged_parts_reports_it_and_applies_the_next() {
    let cluster = RedisCluster::start();
    let s = ClusterStore::connect(&cluster.urls(), "tollgate", TTL, 8)
        .await
        .unwrap();
    s.credit("ivy", "k", USD).await.unwrap();
    let inc = s.begin("node-l").await.unwrap();
    s.settle(&batch(
        "node-l",
        inc.epoch,
        1,
        vec![entry("ivy", 2, CENT, 0, 10 * CENT)],
    ))
    .await
    .unwrap();
    assert_eq!(s.lost_parts(), 0);
    let mark = format!(
        "{{tollgate:m{}}}:inc:node-l:{}",
        tollgate_metering::shard_of("ivy", 8),
        inc.epoch
    );
    let mut c = redis::cluster::ClusterClient::new(cluster.urls())
        .unwrap()
        .get_connection()
        .unwrap();
    let n: i64 = redis::cmd("DEL").arg(&mark).query(&mut c).unwrap();
    assert_eq!(n, 1, "{mark}");
    let out = s
        .settle(&batch(
            "node-l",
            inc.epoch,
            2,
            vec![entry("ivy", 1, CENT, 0, 0)],
        ))
        .await
        .unwrap();
    assert!(matches!(out, SettleOutcome::Applied(_)));
    assert_eq!(s.lost_parts(), 1, "the loss is reported");
    let st = state(&s, "ivy").await;
    assert_eq!(st.debited, 2 * CENT);
    // The loss stays with the mark: a journal must not take the mark (now 2) as proof the
    // shard holds batch 1.
    let marks = s
        .book_marks(std::slice::from_ref(&inc))
        .await
        .unwrap()
        .unwrap();
    let shard = &marks.streams[tollgate_metering::shard_of("ivy", 8) as usize];
    assert_eq!(
        (shard.hwms.clone(), shard.lost.clone()),
        (vec![2], vec![Some((1, 1))])
    );
    // Another shard of the same incarnation lost nothing.
    let other = (0..8)
        .find(|&i| i != tollgate_metering::shard_of("ivy", 8) as usize)
        .unwrap();
    assert_eq!(marks.streams[other].lost, vec![None]);
}

/// On a cluster nothing is acknowledged that no replica holds: with every replica frozen, a
/// new credit (stopped at its key's claim), a batch applied before and sent again through a
/// handle whose connection never wrote (a duplicate answer), and a new batch all answer
/// `Unavailable`; once the replicas are back, the retries are applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_acknowledges_nothing_no_replica_holds_and_the_retries_apply_once() {
    let cluster = RedisCluster::start();
    let s = ClusterStore::connect(&cluster.urls(), "tollgate", TTL, 8)
        .await
        .unwrap();
    s.credit("jay", "v1", USD).await.unwrap();
    let inc = s.begin("node-r").await.unwrap();
    let b1 = batch(
        "node-r",
        inc.epoch,
        1,
        vec![entry("jay", 1, CENT, 0, 10 * CENT)],
    );
    assert!(matches!(
        s.settle(&b1).await.unwrap(),
        SettleOutcome::Applied(_)
    ));
    let other = ClusterStore::connect(&cluster.urls()[3..], "tollgate", TTL, 8)
        .await
        .unwrap();
    cluster.pause_replicas();
    assert!(matches!(
        s.credit("jay", "v2", USD).await,
        Err(CreditError::Unavailable(_))
    ));
    // The settle script's duplicate branch, on a connection that never wrote.
    assert!(matches!(
        other.settle(&b1).await,
        Err(SettleError::Unavailable(_))
    ));
    let b2 = batch(
        "node-r",
        inc.epoch,
        2,
        vec![entry("jay", 3, 3 * CENT, 0, 0)],
    );
    assert!(matches!(
        s.settle(&b2).await,
        Err(SettleError::Unavailable(_))
    ));
    cluster.resume_replicas();
    let t = std::time::Instant::now();
    let again = loop {
        match other.credit("jay", "v2", USD).await {
            Ok(r) => break r,
            Err(CreditError::Unavailable(_)) if t.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    // The frozen attempt stopped at the key's claim, before any money moved: the retry
    // applies it, and a third try is a duplicate.
    assert!(again.applied);
    assert!(!other.credit("jay", "v2", USD).await.unwrap().applied);
    // The batch applied while the replicas were frozen stood on the master: a duplicate now.
    assert!(matches!(
        s.settle(&b2).await.unwrap(),
        SettleOutcome::Duplicate(_)
    ));
    // Batch 1, sent again now that 2 is applied, is older than the shard's mark.
    assert_eq!(
        other.settle(&b1).await.unwrap_err(),
        SettleError::Stale { seq: 1, hwm: 2 }
    );
    let st = state(&s, "jay").await;
    assert_eq!((st.credited, st.debited), (2 * USD, 4 * CENT));
    assert_eq!(s.lost_parts(), 0);
}
