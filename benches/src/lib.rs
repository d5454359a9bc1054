//! Benchmarks live in `benches/`; see docs/benchmarks.md. This library holds what the
//! non-criterion probes share.

use std::future::Future;

/// Runs a probe on a 2-worker runtime and exits non-zero, with `name` in the message, if it
/// fails (so a broken probe never prints numbers that look like results).
pub fn run_probe<F>(name: &str, probe: F)
where
    F: Future<Output = Result<(), Box<dyn std::error::Error>>>,
{
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(probe) {
        eprintln!("{name} failed: {e}");
        std::process::exit(1);
    }
}
