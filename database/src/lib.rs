//! Per-project SQL databases for hosted services.
//!
//! Each project gets one SQLite file, created on first use, under the data dir. Tenant code
//! reaches it through workerd's D1 binding: workerd wraps a service binding with its own
//! `cloudflare-internal:d1-api` module, which speaks a small JSON-over-HTTP protocol to that
//! service; [`service`] serves the protocol from Rust. Which database a request reaches is
//! decided by a secret token that workerd injects into every request of one deployment, never by
//! anything tenant code sends.
//!
//! Every statement's rows read and written (SQLite's own counters) are reported in D1's `meta`
//! and charged to the owner through [`Meter`]; the crate knows nothing of how.

mod d1;
pub mod metrics;
pub mod service;
mod store;

use std::time::Duration;

pub use d1::{
    Execution, Failed, ResultsFormat, Statement, StatementResult, Value, run_exec, run_query,
};
pub use metrics::DbMetrics;
pub use service::{Grant, Meter, MeterRefusal, Service, Usage};
pub use store::{Database, Databases, DbInfo, TableInfo, valid_project_id};

/// The header workerd adds to every D1 request of a deployment (`injectRequestHeaders`).
pub const TOKEN_HEADER: &str = "x-tollgate-d1-token";

/// How durable a commit is (SQLite's `synchronous`, in WAL mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync the WAL at every commit: a commit the tenant saw survives power loss.
    Full,
    /// fsync only at checkpoints: the last commits may be lost on power loss (not on a crash of
    /// the process).
    Normal,
}

impl Synchronous {
    fn pragma(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        }
    }
}

/// Per-database limits. Defaults follow D1 where it publishes one.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Size cap; writes past it fail, reads keep working (default 500 MB).
    pub max_size_bytes: u64,
    /// A statement (or batch) running longer is interrupted.
    pub query_timeout: Duration,
    /// Results larger than this (JSON bytes of values) fail the query.
    pub max_result_bytes: usize,
    /// Longest SQL text (D1: 100 KB).
    pub max_sql_bytes: usize,
    /// Most bound parameters per statement (D1: 100).
    pub max_params: usize,
    /// Most statements per request (a batch, or all of `exec()`'s).
    pub max_batch: usize,
    /// Largest string or blob, so largest row value (D1: 2 MB).
    pub max_value_bytes: usize,
    /// Largest request body.
    pub max_request_bytes: usize,
    pub synchronous: Synchronous,
    /// Set while the databases' disk is nearly full ([`Databases::check_disk`]): writing
    /// statements fail, reads go on. Shared by every database of a [`Databases`].
    pub writes_paused: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_size_bytes: 500 * 1000 * 1000,
            query_timeout: Duration::from_secs(5),
            max_result_bytes: 16 << 20,
            max_sql_bytes: 100_000,
            max_params: 100,
            max_batch: 1000,
            max_value_bytes: 2_000_000,
            max_request_bytes: 8 << 20,
            synchronous: Synchronous::Full,
            writes_paused: Default::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// SQLite's own message, as tenant code should see it.
    #[error("{0}")]
    Sqlite(String),
    #[error("query interrupted: it ran longer than the {0} ms limit")]
    Timeout(u64),
    #[error("result too large: over the {0}-byte limit; select fewer rows or columns")]
    ResultTooLarge(usize),
    #[error("database is full: the {0}-byte limit is reached; delete rows to write again")]
    Full(u64),
    #[error(
        "the host is low on disk space: writes are paused for a moment (reads work); retry later"
    )]
    HostFull,
    #[error("statement not allowed: {0}")]
    NotAllowed(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("project id '{0}' is not valid")]
    BadProject(String),
    #[error("project '{0}' has no database")]
    NoDatabase(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl DbError {
    pub(crate) fn sqlite(e: rusqlite::Error) -> DbError {
        DbError::Sqlite(sqlite_message(&e))
    }

    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> DbError {
        DbError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// SQLite's message with its code name, the way D1 shows it (`no such table: t: SQLITE_ERROR`).
fn sqlite_message(e: &rusqlite::Error) -> String {
    match e {
        rusqlite::Error::SqliteFailure(f, msg) => {
            let code = code_name(f.extended_code & 0xff);
            match msg {
                Some(m) => format!("{m}: {code}"),
                None => format!("{}: {code}", f),
            }
        }
        other => other.to_string(),
    }
}

fn code_name(primary: i32) -> &'static str {
    use rusqlite::ffi;
    match primary {
        ffi::SQLITE_ERROR => "SQLITE_ERROR",
        ffi::SQLITE_PERM => "SQLITE_PERM",
        ffi::SQLITE_ABORT => "SQLITE_ABORT",
        ffi::SQLITE_BUSY => "SQLITE_BUSY",
        ffi::SQLITE_LOCKED => "SQLITE_LOCKED",
        ffi::SQLITE_NOMEM => "SQLITE_NOMEM",
        ffi::SQLITE_READONLY => "SQLITE_READONLY",
        ffi::SQLITE_INTERRUPT => "SQLITE_INTERRUPT",
        ffi::SQLITE_IOERR => "SQLITE_IOERR",
        ffi::SQLITE_CORRUPT => "SQLITE_CORRUPT",
        ffi::SQLITE_FULL => "SQLITE_FULL",
        ffi::SQLITE_CONSTRAINT => "SQLITE_CONSTRAINT",
        ffi::SQLITE_MISMATCH => "SQLITE_MISMATCH",
        ffi::SQLITE_AUTH => "SQLITE_AUTH",
        ffi::SQLITE_RANGE => "SQLITE_RANGE",
        ffi::SQLITE_TOOBIG => "SQLITE_TOOBIG",
        _ => "SQLITE_ERROR",
    }
}
