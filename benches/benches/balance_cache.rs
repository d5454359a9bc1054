//! The metering hot path: `try_spend` on an account this node holds a lease for.
//! Compared with the obvious alternative, a `Mutex<HashMap<String, i64>>`.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tollgate_balance_cache::BalanceCache;
use tollgate_metering::Prices;

const ACCOUNTS: usize = 10_000;

fn cache() -> Arc<BalanceCache> {
    let c = BalanceCache::new(Prices::default());
    for i in 0..ACCOUNTS {
        c.bench_preload(&format!("acct-{i}"), i64::MAX / 4);
        c.bench_preload(&did(i), i64::MAX / 4);
    }
    c
}

/// A real account id, as the payments crate derives it from a payer (63 bytes).
fn did(i: usize) -> String {
    format!(
        "did:pkh:eip155:42431:0x{:040x}",
        i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    )
}

/// `threads` threads, each spending `iters` times on its own account; total wall time.
fn spend_parallel(c: &Arc<BalanceCache>, threads: usize, iters: u64) -> Duration {
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let c = c.clone();
            let b = barrier.clone();
            std::thread::spawn(move || {
                let acct = format!("acct-{}", t * 97);
                b.wait();
                for _ in 0..iters {
                    black_box(c.try_spend_request(black_box(&acct)));
                }
            })
        })
        .collect();
    barrier.wait();
    let t = Instant::now();
    for h in handles {
        let _ = h.join();
    }
    t.elapsed()
}

#[repr(align(128))]
struct Padded(std::sync::atomic::AtomicI64);

fn atomic_parallel(threads: usize, iters: u64) -> Duration {
    let cells: Arc<Vec<Padded>> = Arc::new(
        (0..threads)
            .map(|_| Padded(std::sync::atomic::AtomicI64::new(i64::MAX / 4)))
            .collect(),
    );
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let cells = cells.clone();
            let b = barrier.clone();
            std::thread::spawn(move || {
                b.wait();
                for _ in 0..iters {
                    black_box(
                        cells[t]
                            .0
                            .fetch_sub(500_000, std::sync::atomic::Ordering::AcqRel),
                    );
                }
            })
        })
        .collect();
    barrier.wait();
    let t = Instant::now();
    for h in handles {
        let _ = h.join();
    }
    t.elapsed()
}

fn bench(c: &mut Criterion) {
    let cache = cache();
    let names: Vec<String> = (0..1024)
        .map(|i| format!("acct-{}", (i * 7) % ACCOUNTS))
        .collect();
    let mut g = c.benchmark_group("try_spend");
    let mut i = 0usize;
    g.bench_function("balance_cache_1_thread", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            black_box(cache.try_spend_request(black_box(&names[i])))
        })
    });
    let dids: Vec<String> = (0..1024).map(|i| did((i * 7) % ACCOUNTS)).collect();
    let mut i = 0usize;
    g.bench_function("balance_cache_1_thread_did_pkh_ids", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            black_box(cache.try_spend_request(black_box(&dids[i])))
        })
    });
    let naive: Mutex<HashMap<String, i64>> = Mutex::new(
        (0..ACCOUNTS)
            .map(|i| (format!("acct-{i}"), i64::MAX / 4))
            .collect(),
    );
    let mut i = 0usize;
    g.bench_function("mutex_hashmap_1_thread", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let mut m = naive.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(v) = m.get_mut(black_box(names[i].as_str())) {
                *v -= 500_000;
            }
        })
    });
    // Per-operation time with 1 and 2 threads on different accounts: equal times mean the
    // hot path shares no cache line between accounts. The calibration does the same with a
    // plain atomic add on a per-thread, cache-line-padded counter: what two vCPUs of this
    // machine can do at best.
    for threads in [1usize, 2] {
        g.bench_function(
            format!("balance_cache_{threads}_threads_own_accounts"),
            |b| b.iter_custom(|iters| spend_parallel(&cache, threads, iters)),
        );
        g.bench_function(
            format!("calibration_padded_atomic_{threads}_threads"),
            |b| b.iter_custom(|iters| atomic_parallel(threads, iters)),
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
