//! Per-project usage: the proxy counts requests and response bytes on each route (two relaxed
//! atomic adds in `logging`); a background task swaps the counts out every second and adds them
//! to hourly buckets in Redis, with the time of the last request. The control service reads them
//! (`get_project`, inactivity expiry). Not money: that goes through the balance cache.
//!
//! Keys: `<prefix>:usage:<project>:<YYYYMMDDHH>` (hash: `requests`, `bytes_out`; expires after
//! 8 days) and `<prefix>:usage:<project>` (hash: `last_request_ms`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tollgate_routes::{ResolvedRoute, RouteTable, hour_bucket, usage_key};

const BUCKET_TTL_S: i64 = 8 * 24 * 3600;

fn now() -> (u64, u64) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs(), d.as_millis() as u64)
}

/// Runs until `stop`; flushes once more at the end.
pub async fn flush_loop(
    table: Arc<RouteTable>,
    redis: tollgate_kv::Target,
    prefix: String,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut conn: Option<tollgate_kv::Conn> = None;
    let prefix = redis.family_prefix(&prefix);
    // Routes replaced since the last flush still receive counts from requests in flight: keep
    // them one more round.
    let mut previous: Vec<Arc<ResolvedRoute>> = Vec::new();
    let mut pending: HashMap<String, (u64, u64)> = HashMap::new();
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(every) => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        let current = table.snapshot().routes();
        for r in current.iter().chain(previous.iter()) {
            let Some(project) = r.project_id.as_deref() else {
                continue;
            };
            let req = r.requests.swap(0, Ordering::Relaxed);
            let bytes = r.bytes_out.swap(0, Ordering::Relaxed);
            if req > 0 || bytes > 0 {
                let e = pending.entry(project.to_owned()).or_default();
                e.0 += req;
                e.1 += bytes;
            }
        }
        previous = current;
        if !pending.is_empty() {
            if conn.is_none() {
                // Counts, not money: never waited for a replica (a retry after a write that
                // was not acknowledged would count twice).
                conn = redis.connect().await.ok().map(|c| c.without_acks());
            }
            if let Some(c) = conn.as_mut() {
                let (unix_s, unix_ms) = now();
                let bucket = hour_bucket(unix_s);
                let mut pipe = redis::pipe();
                for (project, (req, bytes)) in &pending {
                    let key = usage_key(&prefix, project, Some(&bucket));
                    pipe.hincr(&key, "requests", *req)
                        .ignore()
                        .hincr(&key, "bytes_out", *bytes)
                        .ignore()
                        .expire(&key, BUCKET_TTL_S)
                        .ignore()
                        .hset(
                            usage_key(&prefix, project, None),
                            "last_request_ms",
                            unix_ms,
                        )
                        .ignore();
                }
                match pipe.query_async::<()>(c).await {
                    // Counts stay pending (and are sent with the next flush) when Redis is away.
                    Ok(()) => pending.clear(),
                    Err(e) => tracing::debug!(error = %e, "usage flush failed; retrying"),
                }
            }
        }
        if stopping {
            return;
        }
    }
}
