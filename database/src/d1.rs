//! D1's statements and results, and how we run them on SQLite.
//!
//! The shapes follow what workerd's `cloudflare-internal:d1-api` module sends and expects
//! (docs/database.md has captured examples): a statement is `{sql, params}`; a result is
//! `{success, results, meta}` with `meta.rows_read`, `meta.rows_written`, `meta.changes`,
//! `meta.last_row_id`, `meta.changed_db`, `meta.size_after`, `meta.duration`.

use std::time::Instant;

use rusqlite::fallible_iterator::FallibleIterator;
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{Connection, StatementStatus};
use serde::{Deserialize, Serialize};

use crate::store::{Database, TenantMode};
use crate::{DbError, Limits};

/// A bound parameter as D1 sends it: JSON numbers, strings and null; blobs as arrays of bytes;
/// booleans (sent as 1/0 by current clients) are accepted as integers.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    Blob(Vec<u8>),
}

/// One statement of a request.
#[derive(Debug, Clone, Deserialize)]
pub struct Statement {
    pub sql: String,
    #[serde(default)]
    pub params: Vec<Value>,
}

/// How rows come back (`?resultsFormat=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultsFormat {
    /// `{columns: [...], rows: [[...]]}`: what `all()`, `first()`, `raw()` ask for.
    RowsAndColumns,
    /// `[{col: value}]`.
    ArrayOfObjects,
    /// No rows (`run()`, `exec()`): an empty list.
    None,
}

impl ResultsFormat {
    pub fn parse(s: Option<&str>) -> Result<ResultsFormat, DbError> {
        match s {
            None | Some("ARRAY_OF_OBJECTS") => Ok(ResultsFormat::ArrayOfObjects),
            Some("ROWS_AND_COLUMNS") => Ok(ResultsFormat::RowsAndColumns),
            Some("NONE") => Ok(ResultsFormat::None),
            Some(other) => Err(DbError::BadRequest(format!(
                "resultsFormat '{other}' is not one of ROWS_AND_COLUMNS, ARRAY_OF_OBJECTS, NONE"
            ))),
        }
    }
}

/// D1's `meta`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Meta {
    pub served_by: &'static str,
    pub served_by_region: &'static str,
    pub served_by_primary: bool,
    pub timings: Timings,
    pub duration: f64,
    pub changes: u64,
    pub last_row_id: i64,
    pub changed_db: bool,
    pub size_after: u64,
    pub rows_read: u64,
    pub rows_written: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Timings {
    pub sql_duration_ms: f64,
}

/// One statement's answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatementResult {
    pub success: bool,
    pub results: serde_json::Value,
    pub meta: Meta,
}

/// A request's answers and what it cost, in rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Execution {
    pub results: Vec<StatementResult>,
    pub rows_read: u64,
    pub rows_written: u64,
}

/// A request that failed, and the rows it read before it did: they are charged (a batch that
/// scans a table and then fails, or a query interrupted at the time limit, still used the
/// database). What it wrote was rolled back.
#[derive(Debug)]
pub struct Failed {
    pub error: DbError,
    pub rows_read: u64,
}

impl From<DbError> for Failed {
    fn from(error: DbError) -> Failed {
        Failed {
            error,
            rows_read: 0,
        }
    }
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

/// Runs `statements` (one `prepare()`d statement or a `batch()`) as one transaction: all of
/// them apply, or none (D1's batch semantics). Blocking.
pub fn run_query(
    db: &Database,
    statements: &[Statement],
    format: ResultsFormat,
) -> Result<Execution, Failed> {
    check_request(statements, &db.limits)?;
    let limits = db.limits.clone();
    with_tenant(db, |conn, mode| {
        run_in_transaction(conn, mode, &limits, |conn, out| {
            for s in statements {
                let r = run_one(conn, &limits, s, format, out.bytes)?;
                out.push(r);
            }
            Ok(())
        })
    })
}

/// Runs `exec()`'s statements (each string may hold several, separated by `;`; no params),
/// as one transaction. Blocking.
pub fn run_exec(db: &Database, statements: &[Statement]) -> Result<Execution, Failed> {
    // exec() sends one entry per line of its text: blank lines are not statements.
    let statements: Vec<Statement> = statements
        .iter()
        .filter(|s| !s.sql.trim().is_empty())
        .cloned()
        .collect();
    let statements = statements.as_slice();
    check_request(statements, &db.limits)?;
    let limits = db.limits.clone();
    with_tenant(db, |conn, mode| {
        run_in_transaction(conn, mode, &limits, |conn, out| {
            for s in statements {
                if !s.params.is_empty() {
                    return Err(DbError::BadRequest(
                        "exec() takes no parameters; use prepare().bind()".into(),
                    )
                    .into());
                }
                let mut batch = rusqlite::Batch::new(conn, &s.sql);
                while let Some(mut stmt) = batch
                    .next()
                    .map_err(|e| Failed::from(classify(e, &limits)))?
                {
                    if out.results.len() >= limits.max_batch {
                        return Err(DbError::BadRequest(format!(
                            "more than {} statements in one exec(); split it",
                            limits.max_batch
                        ))
                        .into());
                    }
                    // Fail closed: a statement whose text cannot be read is not run.
                    let Some(sql) = stmt.expanded_sql() else {
                        return Err(DbError::NotAllowed("unreadable statement".into()).into());
                    };
                    refuse_escapes(&sql)?;
                    let r = step(conn, &limits, &mut stmt, ResultsFormat::None, out.bytes)?;
                    out.push(r);
                }
            }
            Ok(())
        })
    })
}

/// One read-only statement for the agent's own inspection, at most `max_rows` rows (the rest
/// are not read). Writes are refused before anything runs. Blocking.
pub fn run_readonly(db: &Database, sql: &str, max_rows: usize) -> Result<Execution, Failed> {
    let statements = [Statement {
        sql: sql.to_owned(),
        params: Vec::new(),
    }];
    check_request(&statements, &db.limits)?;
    refuse_escapes(sql)?;
    let limits = db.limits.clone();
    with_tenant(db, |conn, mode| {
        mode.on();
        let mut stmt = prepare_single(conn, sql, &limits)?;
        if !stmt.readonly() {
            return Err(DbError::NotAllowed(
                "query_database runs read-only SQL (SELECT, read-only PRAGMAs); \
                 change data from your service's code"
                    .into(),
            )
            .into());
        }
        let (r, _) = step_limited(
            conn,
            &limits,
            &mut stmt,
            ResultsFormat::RowsAndColumns,
            0,
            max_rows,
        )?;
        mode.off();
        Ok(Execution {
            rows_read: r.meta.rows_read,
            rows_written: 0,
            results: vec![r],
        })
    })
}

/// [`Database::with_tenant`] for runs that fail with [`Failed`].
fn with_tenant<T>(
    db: &Database,
    f: impl FnOnce(&mut Connection, &TenantMode<'_>) -> Result<T, Failed>,
) -> Result<T, Failed> {
    let mut inner = None;
    let outer = db.with_tenant(|conn, mode| {
        let r = f(conn, mode);
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                inner = Some(e);
                Err(DbError::BadRequest(String::new()))
            }
        }
    });
    match (outer, inner) {
        (Ok(v), _) => Ok(v),
        (Err(_), Some(failed)) => Err(failed),
        (Err(e), None) => Err(e.into()),
    }
}

struct Collected {
    results: Vec<StatementResult>,
    bytes: usize,
    rows_read: u64,
    rows_written: u64,
}

impl Collected {
    fn push(&mut self, r: (StatementResult, usize)) {
        self.rows_read += r.0.meta.rows_read;
        self.rows_written += r.0.meta.rows_written;
        self.bytes += r.1;
        self.results.push(r.0);
    }
}

fn check_request(statements: &[Statement], limits: &Limits) -> Result<(), DbError> {
    if statements.is_empty() {
        return Err(DbError::BadRequest("no statement to run".into()));
    }
    if statements.len() > limits.max_batch {
        return Err(DbError::BadRequest(format!(
            "{} statements in one batch; the limit is {}",
            statements.len(),
            limits.max_batch
        )));
    }
    for s in statements {
        if s.sql.len() > limits.max_sql_bytes {
            return Err(DbError::BadRequest(format!(
                "SQL of {} bytes; the limit is {}",
                s.sql.len(),
                limits.max_sql_bytes
            )));
        }
        if s.params.len() > limits.max_params {
            return Err(DbError::BadRequest(format!(
                "{} parameters; the limit is {}",
                s.params.len(),
                limits.max_params
            )));
        }
        if s.sql.trim().is_empty() {
            return Err(DbError::BadRequest("empty SQL".into()));
        }
    }
    Ok(())
}

fn run_in_transaction(
    conn: &mut Connection,
    mode: &TenantMode<'_>,
    limits: &Limits,
    f: impl FnOnce(&Connection, &mut Collected) -> Result<(), Failed>,
) -> Result<Execution, Failed> {
    let mut out = Collected {
        results: Vec::new(),
        bytes: 0,
        rows_read: 0,
        rows_written: 0,
    };
    mode.off();
    let tx = conn.transaction().map_err(DbError::sqlite)?;
    mode.on();
    let ran = f(&tx, &mut out);
    mode.off();
    match ran {
        Ok(()) => {
            if let Err(e) = tx.commit() {
                return Err(Failed {
                    error: classify(e, limits),
                    rows_read: out.rows_read,
                });
            }
        }
        Err(mut e) => {
            // Dropping the transaction rolls it back: nothing of a failed batch stays.
            drop(tx);
            e.rows_read = e.rows_read.saturating_add(out.rows_read);
            return Err(e);
        }
    }
    // `size_after` is the size once everything applied.
    let size = size_now(conn);
    for r in &mut out.results {
        r.meta.size_after = size;
    }
    Ok(Execution {
        results: out.results,
        rows_read: out.rows_read,
        rows_written: out.rows_written,
    })
}

fn size_now(conn: &Connection) -> u64 {
    let q = |p: &str| {
        conn.query_row(p, [], |r| r.get::<_, i64>(0))
            .unwrap_or(0)
            .max(0) as u64
    };
    q("PRAGMA page_count") * q("PRAGMA page_size")
}

fn run_one(
    conn: &Connection,
    limits: &Limits,
    s: &Statement,
    format: ResultsFormat,
    bytes_so_far: usize,
) -> Result<(StatementResult, usize), Failed> {
    refuse_escapes(&s.sql)?;
    let mut stmt = prepare_single(conn, &s.sql, limits)?;
    bind_and_step(conn, limits, &mut stmt, s, format, bytes_so_far)
}

/// Prepares exactly one statement (cached when it can be). rusqlite's `prepare` checks for a
/// second statement by preparing the rest, recursively: a text of thousands of `;`-separated
/// statements would exhaust the stack. Text with a `;` before its end (a second statement, or
/// one inside a string literal) goes through the iterative batch reader instead.
fn prepare_single<'c>(
    conn: &'c Connection,
    sql: &str,
    limits: &Limits,
) -> Result<CachedOrNot<'c>, Failed> {
    let one = || -> Failed {
        DbError::BadRequest(
            "one statement per prepare(); run several with batch() or exec()".into(),
        )
        .into()
    };
    if sql.trim_end().trim_end_matches(';').contains(';') {
        let mut batch = rusqlite::Batch::new(conn, sql);
        let first = batch
            .next()
            .map_err(|e| Failed::from(classify(e, limits)))?;
        let more = batch
            .next()
            .map_err(|e| Failed::from(classify(e, limits)))?
            .is_some();
        return match (first, more) {
            (Some(stmt), false) => Ok(CachedOrNot::Not(stmt)),
            _ => Err(one()),
        };
    }
    match conn.prepare_cached(sql) {
        Ok(stmt) => Ok(CachedOrNot::Cached(stmt)),
        Err(rusqlite::Error::MultipleStatement) => Err(one()),
        Err(e) => Err(classify(e, limits).into()),
    }
}

/// A prepared statement from the connection's cache, or not.
enum CachedOrNot<'c> {
    Cached(rusqlite::CachedStatement<'c>),
    Not(rusqlite::Statement<'c>),
}

impl<'c> std::ops::Deref for CachedOrNot<'c> {
    type Target = rusqlite::Statement<'c>;
    fn deref(&self) -> &Self::Target {
        match self {
            CachedOrNot::Cached(s) => s,
            CachedOrNot::Not(s) => s,
        }
    }
}

impl std::ops::DerefMut for CachedOrNot<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match self {
            CachedOrNot::Cached(s) => s,
            CachedOrNot::Not(s) => s,
        }
    }
}

fn bind_and_step(
    conn: &Connection,
    limits: &Limits,
    stmt: &mut rusqlite::Statement<'_>,
    s: &Statement,
    format: ResultsFormat,
    bytes_so_far: usize,
) -> Result<(StatementResult, usize), Failed> {
    let wanted = stmt.parameter_count();
    if wanted != s.params.len() {
        return Err(DbError::Sqlite(format!(
            "Wrong number of parameter bindings for SQL query: the statement takes {wanted}, \
             {} were bound: SQLITE_RANGE",
            s.params.len()
        ))
        .into());
    }
    for (i, p) in s.params.iter().enumerate() {
        stmt.raw_bind_parameter(i + 1, to_sql(p))
            .map_err(|e| Failed::from(classify(e, limits)))?;
    }
    step(conn, limits, stmt, format, bytes_so_far)
}

fn to_sql(v: &Value) -> SqlValue {
    match v {
        Value::Null => SqlValue::Null,
        Value::Bool(b) => SqlValue::Integer(i64::from(*b)),
        Value::Int(i) => SqlValue::Integer(*i),
        Value::Float(f) => SqlValue::Real(*f),
        Value::Text(s) => SqlValue::Text(s.clone()),
        Value::Blob(b) => SqlValue::Blob(b.clone()),
    }
}

/// Steps a bound statement to the end, collecting rows and SQLite's counters.
fn step(
    conn: &Connection,
    limits: &Limits,
    stmt: &mut rusqlite::Statement<'_>,
    format: ResultsFormat,
    bytes_so_far: usize,
) -> Result<(StatementResult, usize), Failed> {
    step_limited(conn, limits, stmt, format, bytes_so_far, usize::MAX)
}

/// [`step`], stopping after `max_rows` rows.
fn step_limited(
    conn: &Connection,
    limits: &Limits,
    stmt: &mut rusqlite::Statement<'_>,
    format: ResultsFormat,
    bytes_so_far: usize,
    max_rows: usize,
) -> Result<(StatementResult, usize), Failed> {
    if !stmt.readonly()
        && limits
            .writes_paused
            .load(std::sync::atomic::Ordering::Relaxed)
    {
        return Err(DbError::HostFull.into());
    }
    let started = Instant::now();
    let columns: Vec<String> = stmt.column_names().map(str::to_owned).collect();
    let changes_before = conn.total_changes();
    stmt.reset_status(StatementStatus::FullscanStep);
    let mut rows_out: Vec<Vec<serde_json::Value>> = Vec::new();
    let mut returned = 0u64;
    // Result bytes: each row's brackets and commas, and for objects every column name again.
    let names: usize = columns.iter().map(|c| c.len() + 4).sum();
    let row_overhead = 2
        + columns.len()
        + if format == ResultsFormat::ArrayOfObjects {
            names
        } else {
            0
        };
    // Plus the statement's `meta` (~300 bytes): exec() of many empty statements adds up too.
    let mut bytes = names + 300;
    let stepped: Result<(), DbError> = (|| {
        let mut rows = stmt.raw_query();
        while (returned as usize) < max_rows
            && let Some(row) = rows.next().map_err(|e| classify(e, limits))?
        {
            returned += 1;
            if format == ResultsFormat::None {
                continue;
            }
            // Counted before anything is built: the JSON of a row is what its values, and for
            // objects its column names, will take.
            bytes += row_overhead;
            for i in 0..columns.len() {
                bytes += value_bytes(&row.get_ref(i).map_err(DbError::sqlite)?);
            }
            if bytes_so_far + bytes > limits.max_result_bytes {
                return Err(DbError::ResultTooLarge(limits.max_result_bytes));
            }
            let mut out = Vec::with_capacity(columns.len());
            for i in 0..columns.len() {
                out.push(to_json(row.get_ref(i).map_err(DbError::sqlite)?));
            }
            rows_out.push(out);
        }
        Ok(())
    })();
    if let Err(error) = stepped {
        // What the statement read before it failed (or was interrupted) is charged too.
        let fullscan = stmt.get_status(StatementStatus::FullscanStep).max(0) as u64;
        return Err(Failed {
            error,
            rows_read: fullscan.max(returned),
        });
    }
    let fullscan = stmt.get_status(StatementStatus::FullscanStep).max(0) as u64;
    let changes = conn.total_changes().saturating_sub(changes_before);
    let readonly = stmt.readonly();
    let elapsed = started.elapsed().as_secs_f64() * 1000.0;
    // Rows read: SQLite's full-scan step counter, or the rows the statement returned or
    // changed when that is more (an index lookup reads the rows it finds).
    let rows_read = fullscan.max(returned).max(changes);
    let results = match format {
        ResultsFormat::None => serde_json::Value::Array(Vec::new()),
        ResultsFormat::RowsAndColumns => {
            serde_json::json!({ "columns": columns, "rows": rows_out })
        }
        ResultsFormat::ArrayOfObjects => serde_json::Value::Array(
            rows_out
                .into_iter()
                .map(|r| serde_json::Value::Object(columns.iter().cloned().zip(r).collect()))
                .collect(),
        ),
    };
    Ok((
        StatementResult {
            success: true,
            results,
            meta: Meta {
                served_by: "tollgate",
                served_by_region: "LOCAL",
                served_by_primary: true,
                timings: Timings {
                    sql_duration_ms: elapsed,
                },
                duration: elapsed,
                changes: if readonly || changes == 0 {
                    0
                } else {
                    conn.changes()
                },
                last_row_id: conn.last_insert_rowid(),
                changed_db: changes > 0,
                size_after: 0,
                rows_read,
                rows_written: changes,
            },
        },
        bytes,
    ))
}

fn value_bytes(v: &ValueRef<'_>) -> usize {
    match v {
        ValueRef::Null => 4,
        ValueRef::Integer(_) | ValueRef::Real(_) => 24,
        ValueRef::Text(t) => t.len() + 2,
        ValueRef::Blob(b) => b.len() * 4 + 2,
    }
}

fn to_json(v: ValueRef<'_>) -> serde_json::Value {
    match v {
        ValueRef::Null => serde_json::Value::Null,
        ValueRef::Integer(i) => serde_json::Value::from(i),
        // Non-finite reals have no JSON form; D1 sends null too.
        ValueRef::Real(f) => serde_json::Number::from_f64(f)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        ValueRef::Text(t) => serde_json::Value::String(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => {
            serde_json::Value::Array(b.iter().map(|x| serde_json::Value::from(*x)).collect())
        }
    }
}

/// Statements the authorizer cannot see: `VACUUM` (its `INTO` form writes a file anywhere).
fn refuse_escapes(sql: &str) -> Result<(), DbError> {
    let word = first_keyword(sql);
    if word.eq_ignore_ascii_case("vacuum") {
        return Err(DbError::NotAllowed(
            "VACUUM is not available; the platform compacts databases itself".into(),
        ));
    }
    Ok(())
}

/// The first keyword of `sql`, past whitespace and comments.
fn first_keyword(sql: &str) -> &str {
    let mut s = sql;
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix("--") {
            s = rest.split_once('\n').map_or("", |(_, r)| r);
        } else if let Some(rest) = s.strip_prefix("/*") {
            s = rest.split_once("*/").map_or("", |(_, r)| r);
        } else {
            break;
        }
    }
    let end = s
        .find(|c: char| !c.is_ascii_alphabetic())
        .unwrap_or(s.len());
    &s[..end]
}

/// Maps SQLite's interrupt and full errors to ours; the rest keep SQLite's message.
fn classify(e: rusqlite::Error, limits: &Limits) -> DbError {
    if let rusqlite::Error::SqliteFailure(f, _) = &e {
        match f.code {
            rusqlite::ErrorCode::OperationInterrupted => {
                return DbError::Timeout(limits.query_timeout.as_millis() as u64);
            }
            rusqlite::ErrorCode::DiskFull => return DbError::Full(limits.max_size_bytes),
            rusqlite::ErrorCode::AuthorizationForStatementDenied => {
                return DbError::NotAllowed(format!(
                    "{}; ATTACH, transaction control, file pragmas and extensions are not \
                     available (batch() runs statements as one transaction)",
                    crate::sqlite_message(&e)
                ));
            }
            _ => {}
        }
    }
    DbError::sqlite(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_keyword_skips_comments() {
        assert_eq!(first_keyword("  -- x\n /* y */ VACUUM INTO 'f'"), "VACUUM");
        assert_eq!(first_keyword("select 1"), "select");
        assert_eq!(first_keyword("/* unterminated"), "");
    }

    #[test]
    fn params_decode_like_d1_sends_them() {
        let s: Statement =
            serde_json::from_str(r#"{"sql":"x","params":[1,2.5,"s",null,[1,2],true]}"#).unwrap();
        assert_eq!(
            s.params,
            vec![
                Value::Int(1),
                Value::Float(2.5),
                Value::Text("s".into()),
                Value::Null,
                Value::Blob(vec![1, 2]),
                Value::Bool(true)
            ]
        );
    }
}
