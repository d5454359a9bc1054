//! The access log: one line per request (or a sample of them), JSON or text, written by a
//! thread of its own. The request path only fills a small record and hands it over with a
//! non-blocking `try_send`; a full queue drops the line and counts it
//! (`tollgate_access_log_dropped_total`), it never makes a request wait.
//!
//! What a line holds keeps credentials out: no query string (tokens ride there), no header value
//! (credentials, cookies); the path (up to 512 bytes, escaped), the host, the method, what
//! happened and how long it took. A service that puts secrets in its paths gets them logged.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
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
    /// Lines waiting for the writer; past it lines are dropped and counted.
    pub queue_lines: usize,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            mode: AccessLogMode::Off,
            sample_rate: 0.01,
            format: AccessLogFormat::Json,
            path: "stdout".into(),
            queue_lines: 65_536,
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

/// One request, as the request path hands it over (owned, no formatting and no allocation:
/// the method and the URI are reference-counted clones; the writer thread reads the path).
#[derive(Debug)]
pub struct Record {
    pub unix_ms: u64,
    pub request_id: String,
    pub host: Arc<str>,
    pub method: http::Method,
    /// Only its path is ever written (see [`loggable_path`]), never the query.
    pub uri: http::Uri,
    pub protocol: &'static str,
    pub tls: bool,
    pub status: u16,
    pub bytes_sent: u64,
    pub duration: Duration,
    /// Request sent upstream → response headers back.
    pub upstream: Option<Duration>,
    pub account: Option<Arc<str>>,
    pub decision: Decision,
}

impl Record {
    /// One JSON object, written into `out` by hand (no intermediate value: this runs for every
    /// request on the writer thread).
    fn json_into(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = write!(out, "{{\"ts_ms\":{},\"request_id\":", self.unix_ms);
        json_str(out, &self.request_id);
        out.push_str(",\"host\":");
        json_str(out, &self.host);
        out.push_str(",\"method\":");
        json_str(out, self.method.as_str());
        out.push_str(",\"path\":");
        json_str(out, loggable_path(&self.uri));
        let _ = write!(
            out,
            ",\"protocol\":\"{}\",\"tls\":{},\"status\":{},\"bytes\":{},\"duration_ms\":",
            self.protocol, self.tls, self.status, self.bytes_sent,
        );
        write_ms(out, self.duration);
        let _ = write!(out, ",\"decision\":\"{}\"", self.decision.as_str());
        if let Some(u) = self.upstream {
            out.push_str(",\"upstream_ms\":");
            write_ms(out, u);
        }
        if let Some(a) = &self.account {
            out.push_str(",\"account\":");
            json_str(out, a);
        }
        out.push('}');
    }

    #[cfg(test)]
    fn json(&self) -> String {
        let mut s = String::new();
        self.json_into(&mut s);
        s
    }

    fn text(&self) -> String {
        // The path between quotes: escaped like a JSON string (HTTP/2 paths may hold `"`).
        let p = loggable_path(&self.uri);
        let mut path = String::with_capacity(p.len() + 2);
        json_str(&mut path, p);
        let path = &path[1..path.len() - 1];
        format!(
            "{ts} {id} {host} \"{method} {path} {proto}\" {status} {bytes} {dur:.3}ms upstream={up} {decision} account={acct}{tls}",
            ts = self.unix_ms,
            id = self.request_id,
            host = self.host,
            method = self.method,
            path = path,
            proto = self.protocol,
            status = self.status,
            bytes = self.bytes_sent,
            dur = ms(self.duration),
            up = self
                .upstream
                .map_or("-".to_owned(), |u| format!("{:.3}ms", ms(u))),
            decision = self.decision.as_str(),
            acct = self.account.as_deref().unwrap_or("-"),
            tls = if self.tls { " tls" } else { "" },
        )
    }
}

/// A JSON string: quotes, backslashes and control characters escaped.
fn json_str(out: &mut String, s: &str) {
    use std::fmt::Write as _;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            // Control characters, and the ones some readers take for line breaks.
            c if (c as u32) < 0x20
                || matches!(c, '\u{7f}'..='\u{9f}' | '\u{2028}' | '\u{2029}') =>
            {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
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

/// Milliseconds with three decimals, from whole microseconds (integer formatting: a float's
/// costs several times more, once per request on the writer thread).
fn write_ms(out: &mut String, d: Duration) {
    use std::fmt::Write as _;
    let us = d.as_micros();
    let _ = write!(out, "{}.{:03}", us / 1000, us % 1000);
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The request path's handle.
pub struct AccessLog {
    tx: SyncSender<Record>,
    mode: AccessLogMode,
    /// `sample_rate` scaled to u32 (a request is logged when a random u32 is below it).
    threshold: u32,
    dropped: IntCounter,
    /// Tells the writer to write what is left and stop; its thread, joined by `finish`.
    stop: Arc<std::sync::atomic::AtomicBool>,
    writer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
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
        let (tx, rx) = std::sync::mpsc::sync_channel(cfg.queue_lines);
        let format = cfg.format;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop_writer = stop.clone();
        let writer = std::thread::Builder::new()
            .name("tollgate-access-log".into())
            .spawn(move || write_loop(rx, out, format, &stop_writer))?;
        Ok(Some(Arc::new(AccessLog {
            tx,
            mode: cfg.mode,
            threshold: (cfg.sample_rate * f64::from(u32::MAX)) as u32,
            dropped,
            stop,
            writer: std::sync::Mutex::new(Some(writer)),
        })))
    }

    /// Whether this request's line is wanted (decided before anything is copied).
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

    /// At shutdown, after the drain: the lines still queued are written and flushed.
    pub fn finish(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let writer = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(w) = writer {
            let _ = w.join();
        }
    }

    /// Hands the record to the writer, never waiting.
    pub fn log(&self, r: Record) {
        match self.tx.try_send(r) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

/// Wakes every `TICK`, writes what is queued and flushes once. It never blocks in `recv`, so a
/// request's `try_send` never has a sleeping writer to wake (no context switch per request).
const TICK: Duration = Duration::from_millis(25);

fn write_loop(
    rx: Receiver<Record>,
    out: Box<dyn Write + Send>,
    format: AccessLogFormat,
    stop: &std::sync::atomic::AtomicBool,
) {
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, out);
    let mut line = String::with_capacity(512);
    loop {
        let last = stop.load(std::sync::atomic::Ordering::Acquire);
        if !last {
            std::thread::sleep(TICK);
        }
        let mut wrote = false;
        loop {
            match rx.try_recv() {
                Ok(r) => {
                    line.clear();
                    match format {
                        AccessLogFormat::Json => r.json_into(&mut line),
                        AccessLogFormat::Text => line.push_str(&r.text()),
                    }
                    line.push('\n');
                    let _ = out.write_all(line.as_bytes());
                    wrote = true;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
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

    fn record() -> Record {
        Record {
            unix_ms: 1,
            request_id: "rid".into(),
            host: Arc::from("a.localhost"),
            method: http::Method::GET,
            uri: "/x/y?token=s3cret".parse().unwrap(),
            protocol: "HTTP/2",
            tls: true,
            status: 402,
            bytes_sent: 10,
            duration: Duration::from_micros(1500),
            upstream: None,
            account: Some(Arc::from("acct")),
            decision: Decision::Suspended,
        }
    }

    #[test]
    fn a_line_names_what_happened_and_never_the_query() {
        let j: serde_json::Value = serde_json::from_str(&record().json()).unwrap();
        assert_eq!(j["path"], "/x/y");
        assert_eq!(j["decision"], "suspended");
        assert_eq!(j["account"], "acct");
        assert_eq!(j["duration_ms"], 1.5);
        assert!(j.get("upstream_ms").is_none());
        let t = record().text();
        assert!(
            t.contains("\"GET /x/y HTTP/2\" 402 10 1.500ms upstream=- suspended account=acct tls"),
            "{t}"
        );
        assert!(!t.contains("s3cret") && !record().json().contains("s3cret"));
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut r = record();
        r.request_id = "a\"b\\c\n".into();
        let j: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(j["request_id"], "a\"b\\c\n");
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
