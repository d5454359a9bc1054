//! The database meter over a real metering node and Redis: a query of an owner without credit
//! is refused before it runs; a credited owner's query is admitted, and its rows (and heavy CPU)
//! settle into the ledger exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use tollgate_app::adapters::ChargeRows;
use tollgate_app::metering::{MeteringNode, MeteringSpec, StoreSource};
use tollgate_balance_cache::AgentConfig;
use tollgate_database::{Meter, MeterRefusal};
use tollgate_metering::{Prices, RedisStore, Store};
use tollgate_testkit::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_are_admitted_only_when_the_owner_can_pay_and_their_rows_settle_once() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        RedisStore::connect(&redis.url(), "tollgate", Duration::from_secs(10))
            .await
            .unwrap(),
    );
    let node = MeteringNode::start(
        MeteringSpec {
            store: StoreSource::Ready(store.clone()),
            prices: Prices::default(),
            agent: AgentConfig::new("control-test", dir.path().join("j.journal")),
        },
        &prometheus::Registry::new(),
        &tokio::runtime::Handle::current(),
    )
    .unwrap();
    let meter = ChargeRows {
        cache: node.cache().clone(),
        lease_wait: Duration::from_millis(500),
    };
    // Never credited: suspended, and the query never runs.
    assert_eq!(meter.admit("broke").await, Err(MeterRefusal::Suspended));

    store
        .credit("paying", "deposit-1", 1_000_000_000_000)
        .await
        .unwrap();
    assert_eq!(meter.admit("paying").await, Ok(()));
    meter.charge("paying", 1_000, 10, 0);
    meter.charge("paying", 5, 1, 2_000);
    node.settle_and_stop().await;

    let p = Prices::default();
    let st = store.account("paying").await.unwrap().unwrap();
    assert!(st.holds_invariant(), "{st:?}");
    assert_eq!(st.leased, 0);
    assert_eq!(
        st.debited,
        1_005 * p.per_row_read + 11 * p.per_row_written + 2_000 * p.per_cpu_us
    );
    let ledger = store.ledger().await.unwrap();
    let mine = ledger
        .iter()
        .filter(|e| e.account == "paying" && e.kind == "settle");
    assert_eq!(mine.clone().map(|e| e.rows_read).sum::<u64>(), 1_005);
    assert_eq!(mine.clone().map(|e| e.rows_written).sum::<u64>(), 11);
    assert_eq!(mine.map(|e| e.cpu_us).sum::<u64>(), 2_000);
}
