//! The reconciliation with real workerd services: its own test binary, so its CPU load does not
//! run beside the timing scenarios of `scenarios.rs` (test binaries run one after another).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use tollgate_loadtest::{Mode, scenario};

/// Real workerd services, each keeping a table in its database: every account's CPU debits
/// equal the runtime's own count of its deployments' CPU, its row debits the database service's
/// own count of rows read and written, and its request debits the generator's record, to the
/// µs, the row and the p$.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosted_run_reconciles_cpu_with_the_runtime_exactly() {
    let r = scenario::reconcile(
        4,
        2,
        Mode::Closed { concurrency: 4 },
        Duration::from_secs(3),
        true,
        false,
    )
    .await
    .unwrap();
    assert_eq!(r.load.errors_total(), 0, "{:?}", r.load.errors);
    assert_eq!(r.load.by_status.keys().collect::<Vec<_>>(), vec![&200]);
    for c in &r.checks {
        // Each request does real work: far more CPU than the sampler's resolution.
        assert!(c.ledger_cpu_us > 10_000, "{c:?}");
        assert_eq!(c.runtime_cpu_us, Some(c.ledger_cpu_us), "{c:?}");
        assert_eq!(c.ledger_request_picos, c.expected_picos, "{c:?}");
        // Every request wrote a row and read some.
        assert!(
            c.ledger_rows.1 > 0 && c.ledger_rows.0 > c.ledger_rows.1,
            "{c:?}"
        );
        assert_eq!(c.database_rows, Some(c.ledger_rows), "{c:?}");
        assert_eq!(
            c.debited_picos,
            c.expected_picos
                + c.ledger_cpu_us as i64 * 12_500
                + c.ledger_rows.0 as i64 * 250_000
                + c.ledger_rows.1 as i64 * 1_000_000,
            "{c:?}"
        );
        assert_eq!(c.leased_picos, 0, "{c:?}");
    }
    assert!(r.all_exact);
}
