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

type FeedRx = tokio::sync::broadcast::Receiver<tollgate_metering::FeedEvent>;

/// Waits until a store's change feed is live (its first `Resync`), at most 5 s.
pub async fn feed_live(feed: &mut FeedRx) -> Result<(), Box<dyn std::error::Error>> {
    use tollgate_metering::FeedEvent;
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(5), feed.recv()).await {
            Ok(Ok(FeedEvent::Resync)) => return Ok(()),
            Ok(Ok(_)) => continue,
            _ => return Err("feed never went live".into()),
        }
    }
}

/// Waits until the feed carries `account` at `version` or later, at most 2 s per message.
pub async fn feed_reaches(
    feed: &mut FeedRx,
    account: &str,
    version: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    use tollgate_metering::FeedEvent;
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(2), feed.recv()).await {
            Ok(Ok(FeedEvent::Change(c))) if c.account == account && c.version >= version => {
                return Ok(());
            }
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => return Err(format!("feed: {e}").into()),
            Err(_) => return Err("change never arrived".into()),
        }
    }
}
