//! Per-deployment console output and uncaught errors, kept in a bounded ring.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Sequence number within the deployment; `since` cursors use it.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// `log`, `info`, `warn`, `error`, `debug`, or `system` for the platform's own notes.
    pub level: String,
    pub message: String,
}

/// A bounded log buffer: the oldest lines go first when it is full.
#[derive(Debug)]
pub struct LogBuffer {
    inner: Mutex<Ring>,
    max_entries: usize,
    max_line: usize,
}

#[derive(Debug, Default)]
struct Ring {
    next_seq: u64,
    entries: VecDeque<LogEntry>,
    dropped: u64,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl LogBuffer {
    pub fn new(max_entries: usize, max_line: usize) -> Self {
        LogBuffer {
            inner: Mutex::new(Ring::default()),
            max_entries: max_entries.max(1),
            max_line: max_line.max(64),
        }
    }

    pub fn push(&self, ts_ms: u64, level: &str, message: &str) {
        let mut message = message.to_owned();
        if message.len() > self.max_line {
            let mut cut = self.max_line;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str(" …[truncated]");
        }
        let Ok(mut ring) = self.inner.lock() else {
            return;
        };
        let seq = ring.next_seq;
        ring.next_seq += 1;
        if ring.entries.len() == self.max_entries {
            ring.entries.pop_front();
            ring.dropped += 1;
        }
        ring.entries.push_back(LogEntry {
            seq,
            ts_ms,
            level: level.to_owned(),
            message,
        });
    }

    pub fn system(&self, message: &str) {
        self.push(now_ms(), "system", message);
    }

    /// One line of workerd's structured stderr: `{"timestamp":…,"level":…,"message":…}`.
    /// Anything else is kept as-is at level `error` (workerd writes crashes there).
    pub fn push_workerd_line(&self, line: &str) {
        #[derive(Deserialize)]
        struct Line {
            #[serde(default)]
            timestamp: Option<serde_json::Value>,
            #[serde(default)]
            level: Option<String>,
            #[serde(default)]
            message: Option<String>,
        }
        match serde_json::from_str::<Line>(line) {
            Ok(Line {
                timestamp,
                level,
                message: Some(message),
            }) => {
                let ts = match timestamp {
                    Some(serde_json::Value::Number(n)) => n.as_u64(),
                    Some(serde_json::Value::String(s)) => s.parse().ok(),
                    _ => None,
                }
                .unwrap_or_else(now_ms);
                // workerd appends its own native stack (host paths) to internal errors: that is
                // ours, not the tenant's.
                let message = match message.split_once("\nstack: ") {
                    Some((head, tail)) if tail.contains("workerd") => head,
                    _ => message.as_str(),
                };
                self.push(ts, level.as_deref().unwrap_or("log"), message);
            }
            _ if line.trim().is_empty() => {}
            _ => self.push(now_ms(), "error", line),
        }
    }

    /// Entries with `seq >= since`, at most `limit`, oldest first; plus how many were dropped
    /// since the buffer started.
    pub fn read(&self, since: u64, limit: usize) -> (Vec<LogEntry>, u64) {
        let Ok(ring) = self.inner.lock() else {
            return (Vec::new(), 0);
        };
        let entries = ring
            .entries
            .iter()
            .filter(|e| e.seq >= since)
            .take(limit)
            .cloned()
            .collect();
        (entries, ring.dropped)
    }

    pub fn tail_text(&self, n: usize) -> String {
        let Ok(ring) = self.inner.lock() else {
            return String::new();
        };
        let skip = ring.entries.len().saturating_sub(n);
        ring.entries
            .iter()
            .skip(skip)
            .filter(|e| e.level != "log" && e.level != "info" && e.level != "debug")
            .map(|e| e.message.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_and_counts_drops() {
        let b = LogBuffer::new(3, 100);
        for i in 0..5 {
            b.push(i, "log", &format!("m{i}"));
        }
        let (e, dropped) = b.read(0, 10);
        assert_eq!(dropped, 2);
        assert_eq!(
            e.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(),
            ["m2", "m3", "m4"]
        );
        assert_eq!(b.read(4, 10).0.len(), 1);
    }

    #[test]
    fn parses_workerd_structured_lines() {
        let b = LogBuffer::new(10, 100);
        b.push_workerd_line(r#"{"timestamp":1795713341051,"level":"log","message":"burned 200"}"#);
        b.push_workerd_line(r#"{"timestamp":"1795713340792","level":"error","message":"x"}"#);
        b.push_workerd_line("plain crash text");
        b.push_workerd_line(r#"{"level":"error","message":"failed: connecting to 10.0.0.1:80 is not allowed\nstack: /opt/x/workerd@2b5edc0 /opt/x/workerd@3f"}"#);
        let (e, _) = b.read(0, 10);
        assert_eq!((e[0].ts_ms, e[0].level.as_str()), (1795713341051, "log"));
        assert_eq!(e[1].ts_ms, 1795713340792);
        assert_eq!(
            (e[2].level.as_str(), e[2].message.as_str()),
            ("error", "plain crash text")
        );
        assert_eq!(
            e[3].message,
            "failed: connecting to 10.0.0.1:80 is not allowed"
        );
    }

    #[test]
    fn long_lines_are_truncated_on_a_char_boundary() {
        let b = LogBuffer::new(2, 64);
        b.push(0, "log", &"é".repeat(100));
        let (e, _) = b.read(0, 1);
        assert!(e[0].message.ends_with("…[truncated]"));
    }
}
