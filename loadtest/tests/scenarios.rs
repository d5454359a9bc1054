//! Short runs of the loadtest scenarios, as part of the test suite: the numbers are for
//! `docs/benchmarks.md`; what is asserted here is the money.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use tollgate_loadtest::{Mode, scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_node_run_reconciles_exactly_with_the_ledger() {
    multi_node_run(false).await;
}

/// The same run with every store on a 3 + 3 Redis Cluster (the money in 32 shards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_node_run_on_a_redis_cluster_reconciles_exactly() {
    multi_node_run(true).await;
}

async fn multi_node_run(cluster: bool) {
    let r = scenario::reconcile(
        12,
        4,
        Mode::Closed { concurrency: 8 },
        Duration::from_secs(2),
        false,
        cluster,
    )
    .await
    .unwrap();
    assert!(
        r.load.requests > 100,
        "too little load: {}",
        r.load.requests
    );
    assert_eq!(r.load.errors_total(), 0, "{:?}", r.load.errors);
    assert_eq!(r.load.by_status.keys().collect::<Vec<_>>(), vec![&200]);
    for c in &r.checks {
        assert!(c.expected_picos > 0, "{c:?}");
        assert_eq!(c.debited_picos, c.expected_picos, "{c:?}");
        assert_eq!(c.leased_picos, 0, "leases returned: {c:?}");
    }
    assert_eq!(r.audit_differences, vec![], "tollgate accounts audit");
    assert!(r.all_exact);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_run_also_reconciles() {
    let r = scenario::reconcile(
        3,
        2,
        Mode::Open {
            rate: 300.0,
            concurrency: 8,
        },
        Duration::from_secs(2),
        false,
        false,
    )
    .await
    .unwrap();
    let sent: u64 = r.load.hosts.values().map(|h| h.sent).sum();
    assert!(
        (450..=650).contains(&sent),
        "open loop at 300/s for 2 s sent {sent}"
    );
    assert!(r.all_exact, "{:?}", r.checks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_up_resumes_and_spent_credit_suspends_on_the_other_node() {
    let r = scenario::drain_top_up(10).await.unwrap();
    assert_eq!(r.resume.samples, 10);
    assert_eq!(r.suspension_on_other_node.samples, 10);
}
