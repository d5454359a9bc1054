//! The access log: one line per request (or a sample of them), JSON or text, written to its
//! destination by a thread of its own. The request path formats its line straight from the
//! request (borrowed, no copy, no allocation) into its worker's buffer (one of 16; a worker has
//! one to itself up to 16 worker threads), under a lock held only to append a line or, by the
//! writer every 25 ms, to swap the buffer out; it never does I/O. A worker's buffer the writer
//! has not emptied past `queue_lines` lines (~256 bytes each) drops lines and counts them
//! (`tollgate_access_log_dropped_total`): a request never waits for the log's I/O.
//!
//! What a line holds keeps credentials out: no query string (tokens ride there), no header value
//! (credentials, cookies); the path (up to 512 bytes, escaped), the host, the method, what
//! happened and how long it took. A service that puts secrets in its paths gets them logged.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{IntCounter, Registry};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogMode {
    #[default]
    Off,
    On,
    /// A random `sample_rate` share of requests; every 5xx is logged whatever the sample.
    Sampled,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    #[default]
    Json,
    Text,
}

/// `[access_log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogConfig {
    pub mode: AccessLogMode,
    /// With `mode = "sampled"`: the share of requests logged (0..=1).
    pub sample_rate: f64,
    pub format: AccessLogFormat,
    /// `stdout`, `stderr`, or a file (appended; reopen it by restarting or upgrading the node).
    pub path: String,
    /// Lines (about 256 bytes each) each worker thread's buffer holds for the writer; past it
    /// lines are dropped and counted.
    pub queue_lines: usize,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            mode: AccessLogMode::Off,
            sample_rate: 0.01,
            format: AccessLogFormat::Json,
            path: "stdout".into(),
            queue_lines: 16_384,
        }
    }
}

impl AccessLogConfig {
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sample_rate) || self.sample_rate.is_nan() {
            return Err(format!(
                "access_log.sample_rate {}: expected 0 to 1",
                self.sample_rate
            ));
        }
        if !(1..=1 << 20).contains(&self.queue_lines) {
            return Err("access_log.queue_lines must be 1 to 1048576".into());
        }
        Ok(())
    }
}

/// What the money gate did with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No owning account: not metered.
    Free,
    /// Paid from the owner's balance.
    Paid,
    /// 402: the owner's balance is gone.
    Suspended,
    /// 503: the money store could not be reached and the lease is spent.
    Unavailable,
    /// Answered by the proxy before any route (bad host, unknown host, limits, not ready).
    Refused,
    /// 308 to HTTPS.
    Redirected,
}

impl Decision {
    fn as_str(self) -> &'static str {
        match self {
            Decision::Free => "free",
            Decision::Paid => "paid",
            Decision::Suspended => "suspended",
            Decision::Unavailable => "unavailable",
            Decision::Refused => "refused",
            Decision::Redirected => "redirected",
        }
    }
}

/// One request's line, borrowed from the request (nothing copied: it is formatted at once).
#[derive(Debug)]
pub struct Record<'a> {
    pub unix_ms: u64,
    pub request_id: &'a str,
    pub host: &'a str,
    pub method: &'a str,
    /// The path only, never the query (see [`loggable_path`]).
    pub path: &'a str,
    pub protocol: &'static str,
    pub tls: bool,
    pub status: u16,
    pub bytes_sent: u64,
    pub duration: Duration,
    /// Request sent upstream → response headers back.
    pub upstream: Option<Duration>,
    pub account: Option<&'a str>,
    pub decision: Decision,
}

impl Record<'_> {
    /// One JSON object, written into `out` by hand (no intermediate value, no `fmt`
    /// machinery: this runs on the request path).
    fn json_into(&self, out: &mut String) {
        out.push_str("{\"ts_ms\":");
        push_int(out, self.unix_ms);
        out.push_str(",\"request_id\":");
        json_str(out, self.request_id);
        out.push_str(",\"host\":");
        json_str(out, self.host);
        out.push_str(",\"method\":");
        json_str(out, self.method);
        out.push_str(",\"path\":");
        json_str(out, self.path);
        out.push_str(",\"protocol\":\"");
        out.push_str(self.protocol);
        out.push_str(if self.tls {
            "\",\"tls\":true,\"status\":"
        } else {
            "\",\"tls\":false,\"status\":"
        });
        push_int(out, u64::from(self.status));
        out.push_str(",\"bytes\":");
        push_int(out, self.bytes_sent);
        out.push_str(",\"duration_ms\":");
        write_ms(out, self.duration);
        out.push_str(",\"decision\":\"");
        out.push_str(self.decision.as_str());
        out.push('"');
        if let Some(u) = self.upstream {
            out.push_str(",\"upstream_ms\":");
            write_ms(out, u);
        }
        if let Some(a) = self.account {
            out.push_str(",\"account\":");
            json_str(out, a);
        }
        out.push('}');
    }

    /// `ts id host "METHOD path PROTO" status bytes 1.234ms upstream=… decision account=…[ tls]`.
    fn text_into(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = write!(
            out,
            "{} {} {} \"{} ",
            self.unix_ms, self.request_id, self.host, self.method
        );
        // The path between quotes: escaped like a JSON string (HTTP/2 paths may hold `"`).
        let start = out.len();
        json_str(out, self.path);
        out.remove(start);
        out.pop();
        let _ = write!(
            out,
            " {}\" {} {} ",
            self.protocol, self.status, self.bytes_sent
        );
        write_ms(out, self.duration);
        out.push_str("ms upstream=");
        match self.upstream {
            Some(u) => {
                write_ms(out, u);
                out.push_str("ms");
            }
            None => out.push('-'),
        }
        out.push(' ');
        out.push_str(self.decision.as_str());
        out.push_str(" account=");
        match self.account {
            // Escaped as the path is (an id never holds a space or a line break, but a route
            // written by hand might).
            Some(a) => {
                let start = out.len();
                json_str(out, a);
                out.remove(start);
                out.pop();
            }
            None => out.push('-'),
        }
        if self.tls {
            out.push_str(" tls");
        }
    }

    #[cfg(test)]
    fn json(&self) -> String {
        let mut s = String::new();
        self.json_into(&mut s);
        s
    }
}

/// A JSON string: quotes, backslashes and control characters escaped. Plain printable ASCII
/// (nearly every id, host and path) is copied whole.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    if s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.push_str(s);
    } else {
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                // Control characters, and the ones some readers take for line breaks.
                c if (c as u32) < 0x20
                    || matches!(c, '\u{7f}'..='\u{9f}' | '\u{2028}' | '\u{2029}') =>
                {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    let v = c as u32;
                    out.push_str("\\u");
                    for shift in [12, 8, 4, 0] {
                        out.push(char::from(HEX[((v >> shift) & 0xf) as usize]));
                    }
                }
                c => out.push(c),
            }
        }
    }
    out.push('"');
}

/// An integer in decimal, without `fmt`.
fn push_int(out: &mut String, v: u64) {
    let mut buf = itoa::Buffer::new();
    out.push_str(buf.format(v));
}

/// The path without its query, bounded (a query can carry tokens; a path is the service's).
pub fn loggable_path(uri: &http::Uri) -> &str {
    let p = uri.path();
    let mut end = p.len().min(512);
    while !p.is_char_boundary(end) {
        end -= 1;
    }
    &p[..end]
}

/// Milliseconds with three decimals, from whole microseconds (integers only: this runs once
/// or twice per request).
fn write_ms(out: &mut String, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    push_int(out, us / 1000);
    out.push('.');
    let frac = us % 1000;
    if frac < 100 {
        out.push('0');
    }
    if frac < 10 {
        out.push('0');
    }
    push_int(out, frac);
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Worker buffers: a request thread takes one for life (Pingora's workers are long-lived).
const SHARDS: usize = 16;
/// Bytes per line, for `queue_lines`.
const LINE_BYTES: usize = 256;

fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    INDEX.with(|i| *i)
}

/// The request path's handle.
pub struct AccessLog {
    shards: Arc<[Mutex<String>]>,
    /// Bytes a buffer may hold before lines are dropped.
    cap: usize,
    format: AccessLogFormat,
    mode: AccessLogMode,
    /// `sample_rate` scaled to u32 (a request is logged when a random u32 is below it).
    threshold: u32,
    dropped: IntCounter,
    /// Tells the writer to write what is left and stop; its thread, joined by `finish`.
    stop: Arc<AtomicBool>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl AccessLog {
    /// Starts the writer thread; `None` when the log is off.
    pub fn start(
        cfg: &AccessLogConfig,
        registry: &Registry,
    ) -> anyhow::Result<Option<Arc<AccessLog>>> {
        cfg.check().map_err(anyhow::Error::msg)?;
        let dropped = IntCounter::new(
            "tollgate_access_log_dropped_total",
            "Access log lines dropped because the writer fell behind (the request was not slowed)",
        )?;
        registry.register(Box::new(dropped.clone()))?;
        if cfg.mode == AccessLogMode::Off {
            return Ok(None);
        }
        let out: Box<dyn Write + Send> = match cfg.path.as_str() {
            "stdout" => Box::new(std::io::stdout()),
            "stderr" => Box::new(std::io::stderr()),
            p => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(PathBuf::from(p))
                    .map_err(|e| anyhow::anyhow!("access_log.path {p}: {e}"))?,
            ),
        };
        let shards: Arc<[Mutex<String>]> = (0..SHARDS).map(|_| Mutex::new(String::new())).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let (shards_w, stop_w) = (shards.clone(), stop.clone());
        let writer = std::thread::Builder::new()
            .name("tollgate-access-log".into())
            .spawn(move || write_loop(&shards_w, out, &stop_w))?;
        Ok(Some(Arc::new(AccessLog {
            shards,
            cap: cfg.queue_lines.saturating_mul(LINE_BYTES),
            format: cfg.format,
            mode: cfg.mode,
            threshold: (cfg.sample_rate * f64::from(u32::MAX)) as u32,
            dropped,
            stop,
            writer: Mutex::new(Some(writer)),
        })))
    }

    /// Whether this request's line is wanted (decided before anything is read).
    pub fn wants(&self, status: u16) -> bool {
        match self.mode {
            AccessLogMode::Off => false,
            AccessLogMode::On => true,
            AccessLogMode::Sampled => {
                status >= 500
                    || self.threshold == u32::MAX
                    || rand::random::<u32>() < self.threshold
            }
        }
    }

    /// At shutdown, after the drain: the lines still buffered are written and flushed.
    pub fn finish(&self) {
        self.stop.store(true, Ordering::Release);
        let writer = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(w) = writer {
            let _ = w.join();
        }
    }

    /// Formats the line into this worker's buffer; never waits on I/O.
    pub fn log(&self, r: &Record<'_>) {
        // After `finish` the writer is gone: a late line (a drain that timed out) is counted.
        if self.stop.load(Ordering::Acquire) {
            self.dropped.inc();
            return;
        }
        let Some(shard) = self.shards.get(shard_index()) else {
            return;
        };
        let mut buf = shard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buf.len() >= self.cap {
            drop(buf);
            self.dropped.inc();
            return;
        }
        match self.format {
            AccessLogFormat::Json => r.json_into(&mut buf),
            AccessLogFormat::Text => r.text_into(&mut buf),
        }
        buf.push('\n');
    }
}

/// Wakes every `TICK`, swaps each worker's buffer out and writes it, flushing once. The
/// request threads never wake it (no context switch per request).
const TICK: Duration = Duration::from_millis(25);

fn write_loop(shards: &Arc<[Mutex<String>]>, out: Box<dyn Write + Send>, stop: &AtomicBool) {
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, out);
    let mut spare = String::new();
    loop {
        // Last round when told to stop, or when the log itself is gone.
        let last = stop.load(Ordering::Acquire) || Arc::strong_count(shards) == 1;
        if !last {
            std::thread::sleep(TICK);
        }
        let mut wrote = false;
        for shard in shards.iter() {
            {
                let mut buf = shard
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if buf.is_empty() {
                    continue;
                }
                // The worker keeps the spare's capacity: no allocation in the steady state.
                std::mem::swap(&mut *buf, &mut spare);
            }
            let _ = out.write_all(spare.as_bytes());
            spare.clear();
            // A burst's buffer is not kept for ever (it would pass from worker to worker).
            if spare.capacity() > 1 << 20 {
                spare.shrink_to(64 * 1024);
            }
            wrote = true;
        }
        if wrote {
            let _ = out.flush();
        }
        if last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn record() -> Record<'static> {
        Record {
            unix_ms: 1,
            request_id: "rid",
            host: "a.localhost",
            method: "GET",
            path: "/x/y",
            protocol: "HTTP/2",
            tls: true,
            status: 402,
            bytes_sent: 10,
            duration: Duration::from_micros(1500),
            upstream: None,
            account: Some("acct"),
            decision: Decision::Suspended,
        }
    }

    fn text(r: &Record<'_>) -> String {
        let mut s = String::new();
        r.text_into(&mut s);
        s
    }

    #[test]
    fn a_line_names_what_happened_and_never_the_query() {
        let j: serde_json::Value = serde_json::from_str(&record().json()).unwrap();
        assert_eq!(j["path"], "/x/y");
        assert_eq!(j["decision"], "suspended");
        assert_eq!(j["account"], "acct");
        assert_eq!(j["duration_ms"], 1.5);
        assert!(j.get("upstream_ms").is_none());
        let t = text(&record());
        assert!(
            t.contains("\"GET /x/y HTTP/2\" 402 10 1.500ms upstream=- suspended account=acct tls"),
            "{t}"
        );
        let uri: http::Uri = "/x/y?token=s3cret".parse().unwrap();
        assert_eq!(loggable_path(&uri), "/x/y");
        let mut r = record();
        r.upstream = Some(Duration::from_micros(2));
        assert!(text(&r).contains(" upstream=0.002ms "), "{}", text(&r));
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut r = record();
        r.request_id = "a\"b\\c\n";
        let j: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(j["request_id"], "a\"b\\c\n");
    }

    #[test]
    fn durations_and_unusual_strings_format_exactly() {
        for (us, want) in [
            (0, "0.000"),
            (2, "0.002"),
            (1500, "1.500"),
            (1_234_567, "1234.567"),
        ] {
            let mut s = String::new();
            write_ms(&mut s, Duration::from_micros(us));
            assert_eq!(s, want);
        }
        let mut s = String::new();
        json_str(&mut s, "é\u{2028}\u{1}x");
        assert_eq!(s, "\"é\\u2028\\u0001x\"");
        let v: String = serde_json::from_str(&s).unwrap();
        assert_eq!(v, "é\u{2028}\u{1}x");
    }

    #[test]
    fn bad_settings_are_refused() {
        let c = AccessLogConfig {
            sample_rate: 1.5,
            ..AccessLogConfig::default()
        };
        assert!(c.check().unwrap_err().contains("sample_rate"));
    }
}
