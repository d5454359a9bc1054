//! A load generator for tollgate that keeps its own books: every request it sends is recorded with
//! its host, status and expected price, so a run can be reconciled against the ledger exactly.
//!
//! Closed loop (N connections, each sending as soon as the previous answer arrived) or open loop
//! (a fixed rate, latency measured from each request's *scheduled* time so a stalled server is not
//! hidden: no coordinated omission). Latencies go into HDR histograms (1 µs to 60 s, 3 digits).

pub mod hosts;
pub mod scenario;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// One hostname under load and the account that pays for it (None: unmetered).
#[derive(Debug, Clone, Serialize)]
pub struct HostSpec {
    pub host: String,
    pub account: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Mode {
    /// `concurrency` connections, each sending as soon as its previous answer arrived.
    Closed { concurrency: usize },
    /// `rate` requests per second spread over `concurrency` connections.
    Open { rate: f64, concurrency: usize },
}

#[derive(Debug, Clone)]
pub struct Plan {
    /// Proxy nodes; requests go round-robin over them.
    pub targets: Vec<SocketAddr>,
    pub hosts: Vec<HostSpec>,
    pub path: String,
    pub mode: Mode,
    pub duration: Duration,
    /// Requests before this are sent but not recorded in the latency histogram (still counted
    /// in the books: money does not have a warm-up).
    pub warmup: Duration,
    /// Price of one admitted request, in pico-dollars.
    pub price_per_request: i64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HostRecord {
    pub account: Option<String>,
    pub sent: u64,
    pub by_status: BTreeMap<u16, u64>,
    /// Answers the proxy gave before or at the money gate (see [`NOT_CHARGED`]): not charged.
    pub refused: u64,
    /// The same, by problem kind (`metering-unavailable`, `not-ready`, …).
    pub refusals: BTreeMap<String, u64>,
    pub transport_errors: u64,
}

/// The proxy's problem types (`urn:tollgate:problem:<kind>`, docs/proxy.md) answered before a
/// request is admitted, hence never charged: the money gate's refusals (402 suspended, 503
/// metering unavailable) and what is refused before the gate. Every other answer — the
/// upstream's, and the proxy's own 502/503/504 for an upstream that failed — is charged: a
/// request is paid once, when it is admitted.
pub const NOT_CHARGED: [&str; 6] = [
    "service-suspended",
    "metering-unavailable",
    "not-ready",
    "unknown-host",
    "bad-host",
    "header-too-large",
];

/// Whether `body` is one of the proxy's uncharged refusals.
pub fn refused_by_proxy(status: u16, body: &[u8]) -> bool {
    refusal(status, body).is_some()
}

/// The kind of the proxy's uncharged refusal `body` is, if it is one.
pub fn refusal(status: u16, body: &[u8]) -> Option<&'static str> {
    const PREFIX: &[u8] = b"urn:tollgate:problem:";
    if status < 400 {
        return None;
    }
    let at = body.windows(PREFIX.len()).position(|w| w == PREFIX)?;
    let rest = &body[at + PREFIX.len()..];
    NOT_CHARGED
        .into_iter()
        .find(|k| rest.starts_with(k.as_bytes()) && rest.get(k.len()).is_some_and(|&c| c == b'"'))
}

impl HostRecord {
    /// Requests the proxy admitted, hence charged: every answer except the proxy's refusals
    /// before or at the money gate ([`NOT_CHARGED`]), and transport errors.
    pub fn admitted(&self) -> u64 {
        self.by_status.values().sum::<u64>() - self.refused
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: Mode,
    pub targets: Vec<SocketAddr>,
    pub duration_s: f64,
    pub requests: u64,
    pub requests_per_s: f64,
    pub latency: Latency,
    pub by_status: BTreeMap<u16, u64>,
    /// Transport-level failures by kind (`connect`, `timeout`, `other`).
    pub errors: BTreeMap<String, u64>,
    pub hosts: BTreeMap<String, HostRecord>,
    /// What each account should have been charged for requests, by the generator's own record.
    pub expected_request_cost_picos: BTreeMap<String, i64>,
}

impl Report {
    pub fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The proxy's uncharged refusals over every host, by kind.
    pub fn refusals(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for h in self.hosts.values() {
            for (k, n) in &h.refusals {
                *out.entry(k.clone()).or_default() += n;
            }
        }
        out
    }
}

struct Worker {
    hist: Histogram<u64>,
    hosts: BTreeMap<String, HostRecord>,
    errors: BTreeMap<String, u64>,
    recorded: u64,
}

/// Runs `plan` and returns the report. Transport errors are counted, never fatal.
pub async fn run(plan: &Plan) -> anyhow::Result<Report> {
    anyhow::ensure!(!plan.targets.is_empty(), "no target");
    anyhow::ensure!(!plan.hosts.is_empty(), "no host");
    let (concurrency, interval) = match plan.mode {
        Mode::Closed { concurrency } => (concurrency.max(1), None),
        Mode::Open { rate, concurrency } => {
            anyhow::ensure!(rate > 0.0, "rate must be positive");
            let c = concurrency.max(1);
            (c, Some(Duration::from_secs_f64(c as f64 / rate)))
        }
    };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .timeout(Duration::from_secs(30))
        .no_proxy()
        .build()?;
    let start = Instant::now();
    let record_from = start + plan.warmup;
    let end = record_from + plan.duration;
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    let plan = Arc::new(plan.clone());
    let proto = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut tasks = Vec::with_capacity(concurrency);
    for w in 0..concurrency {
        let (client, plan, stop, counter) =
            (client.clone(), plan.clone(), stop.clone(), counter.clone());
        let hist = proto.clone();
        tasks.push(tokio::spawn(async move {
            let mut me = Worker {
                hist,
                hosts: BTreeMap::new(),
                errors: BTreeMap::new(),
                recorded: 0,
            };
            // Open loop: this worker's share of the schedule, offset so workers interleave.
            let mut next = interval.map(|i| start + i.mul_f64(w as f64 / concurrency as f64));
            while !stop.load(Ordering::Relaxed) {
                let scheduled = match (&mut next, interval) {
                    (Some(n), Some(i)) => {
                        let at = *n;
                        *n += i;
                        tokio::time::sleep_until(at.into()).await;
                        at
                    }
                    _ => Instant::now(),
                };
                if scheduled >= end {
                    break;
                }
                let i = counter.fetch_add(1, Ordering::Relaxed) as usize;
                let spec = &plan.hosts[i % plan.hosts.len()];
                let target = plan.targets[(i / plan.hosts.len()) % plan.targets.len()];
                let rec = me
                    .hosts
                    .entry(spec.host.clone())
                    .or_insert_with(|| HostRecord {
                        account: spec.account.clone(),
                        ..HostRecord::default()
                    });
                rec.sent += 1;
                let res = client
                    .get(format!("http://{target}{}", plan.path))
                    .header("host", &spec.host)
                    .send()
                    .await;
                match res {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let body = r.bytes().await.unwrap_or_default();
                        *rec.by_status.entry(status).or_default() += 1;
                        if let Some(kind) = refusal(status, &body) {
                            rec.refused += 1;
                            *rec.refusals.entry(kind.to_owned()).or_default() += 1;
                        }
                        if scheduled >= record_from {
                            let us = scheduled.elapsed().as_micros() as u64;
                            let _ = me.hist.record(us.clamp(1, 60_000_000));
                            me.recorded += 1;
                        }
                    }
                    Err(e) => {
                        rec.transport_errors += 1;
                        let kind = if e.is_connect() {
                            "connect"
                        } else if e.is_timeout() {
                            "timeout"
                        } else {
                            "other"
                        };
                        *me.errors.entry(kind.to_owned()).or_default() += 1;
                    }
                }
            }
            me
        }));
    }
    tokio::time::sleep_until(end.into()).await;
    stop.store(true, Ordering::Relaxed);
    let mut hist = proto;
    let mut hosts: BTreeMap<String, HostRecord> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut recorded = 0;
    for t in tasks {
        let w = t.await?;
        hist.add(&w.hist)?;
        recorded += w.recorded;
        for (k, v) in w.errors {
            *errors.entry(k).or_default() += v;
        }
        for (h, r) in w.hosts {
            let e = hosts.entry(h).or_default();
            e.account = r.account;
            e.sent += r.sent;
            e.transport_errors += r.transport_errors;
            e.refused += r.refused;
            for (k, n) in r.refusals {
                *e.refusals.entry(k).or_default() += n;
            }
            for (s, n) in r.by_status {
                *e.by_status.entry(s).or_default() += n;
            }
        }
    }
    let elapsed = plan.duration.as_secs_f64();
    let mut by_status = BTreeMap::new();
    let mut expected = BTreeMap::new();
    for r in hosts.values() {
        for (s, n) in &r.by_status {
            *by_status.entry(*s).or_default() += n;
        }
        if let Some(a) = &r.account {
            *expected.entry(a.clone()).or_default() += r.admitted() as i64 * plan.price_per_request;
        }
    }
    Ok(Report {
        mode: plan.mode,
        targets: plan.targets.clone(),
        duration_s: elapsed,
        requests: recorded,
        requests_per_s: recorded as f64 / elapsed,
        latency: Latency {
            p50_us: hist.value_at_quantile(0.5),
            p90_us: hist.value_at_quantile(0.9),
            p99_us: hist.value_at_quantile(0.99),
            p999_us: hist.value_at_quantile(0.999),
            max_us: hist.max(),
            mean_us: hist.mean(),
        },
        by_status,
        errors,
        hosts,
        expected_request_cost_picos: expected,
    })
}

#[cfg(test)]
mod tests {
    use super::refused_by_proxy;

    #[test]
    fn only_the_proxys_refusals_before_admission_are_uncharged() {
        let problem = |kind: &str| {
            format!(r#"{{"type":"urn:tollgate:problem:{kind}","title":"t","status":503}}"#)
        };
        for kind in [
            "metering-unavailable",
            "service-suspended",
            "not-ready",
            "unknown-host",
        ] {
            assert!(refused_by_proxy(503, problem(kind).as_bytes()), "{kind}");
        }
        // The upstream's failures, seen by the proxy after admission: charged.
        for kind in [
            "service-interrupted",
            "upstream-unavailable",
            "upstream-timeout",
        ] {
            assert!(!refused_by_proxy(503, problem(kind).as_bytes()), "{kind}");
        }
        // A longer kind that starts like a refusal is not one; neither is a success.
        assert!(!refused_by_proxy(503, problem("not-ready-yet").as_bytes()));
        assert!(!refused_by_proxy(
            200,
            problem("service-suspended").as_bytes()
        ));
        // A tenant's own 402 without our problem type is its answer: charged.
        assert!(!refused_by_proxy(402, b"payment required"));
    }
}
