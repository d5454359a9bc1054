//! The D1 service workerd's binding calls: `POST /query` and `POST /execute` on a loopback
//! listener, one for every deployment of the host. Which project a request reaches comes only
//! from the token workerd injects for the deployment ([`crate::TOKEN_HEADER`]): tenant code
//! cannot set it, and cannot reach the listener at all (its outbound network denies loopback).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;

use crate::d1::{self, ResultsFormat, Statement};
use crate::{Databases, DbError, TOKEN_HEADER};

/// The session header D1's `withSession()` sends and reads back (a commit "bookmark").
const SESSION_HEADER: &str = "x-cf-d1-session-commit-token";

/// Charges database use to the project's owner. `admit` runs before a query (the cost of a
/// query is known only once it ran: it checks the owner can pay at all, waiting briefly for a
/// lease like the proxy does); `charge` takes the exact rows after.
#[async_trait::async_trait]
pub trait Meter: Send + Sync {
    async fn admit(&self, account: &str) -> Result<(), MeterRefusal>;
    /// Rows read and written, and CPU (µs) used past [`FREE_CPU_US`].
    fn charge(&self, account: &str, rows_read: u64, rows_written: u64, cpu_us: u64);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeterRefusal {
    /// The owner's balance is spent.
    Suspended,
    /// The money store cannot be reached to tell.
    Unavailable,
}

/// Per-project counts for agents' views (rows this hour/day): what was charged, rows and CPU
/// past the allowance. Called after every charged query; keep it cheap and non-blocking.
pub trait Usage: Send + Sync {
    fn record(&self, project: &str, rows_read: u64, rows_written: u64, cpu_us: u64);
}

/// Who a deployment's token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub project: String,
    pub account: String,
}

pub struct Service {
    dbs: Arc<Databases>,
    metrics: crate::DbMetrics,
    meter: Arc<dyn Meter>,
    usage: Option<Arc<dyn Usage>>,
    grants: RwLock<HashMap<String, Grant>>,
    commits: AtomicU64,
    gates: std::sync::Mutex<HashMap<String, Arc<Gate>>>,
    /// Requests on blocking threads at once, over all projects.
    running: Arc<tokio::sync::Semaphore>,
}

impl Service {
    pub fn new(
        dbs: Arc<Databases>,
        meter: Arc<dyn Meter>,
        usage: Option<Arc<dyn Usage>>,
        metrics: crate::DbMetrics,
    ) -> Arc<Service> {
        Arc::new(Service {
            dbs,
            metrics,
            meter,
            usage,
            grants: RwLock::new(HashMap::new()),
            commits: AtomicU64::new(0),
            gates: std::sync::Mutex::new(HashMap::new()),
            running: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()) * 4,
            )),
        })
    }

    pub fn databases(&self) -> &Arc<Databases> {
        &self.dbs
    }

    /// A new token for a deployment of `project`, owned by `account`: 128 random bits.
    pub fn grant(&self, project: &str, account: &str) -> String {
        let token = format!("{:032x}", rand::random::<u128>());
        self.grants
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                token.clone(),
                Grant {
                    project: project.to_owned(),
                    account: account.to_owned(),
                },
            );
        token
    }

    /// Withdraws every token of `project` (it is being deleted): a deployment still running
    /// cannot recreate its database.
    pub fn revoke_project(&self, project: &str) {
        self.grants
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, g| g.project != project);
        self.gates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(project);
    }

    fn lookup(&self, headers: &HeaderMap) -> Option<Grant> {
        let token = headers.get(TOKEN_HEADER)?.to_str().ok()?;
        self.grants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .cloned()
    }

    pub fn router(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route(
                "/query",
                post(|State(svc), Query(p), headers, body| handle(svc, p, headers, body, false)),
            )
            .route(
                "/execute",
                post(|State(svc), Query(p), headers, body| handle(svc, p, headers, body, true)),
            )
            .layer(axum::extract::DefaultBodyLimit::max(
                self.dbs.limits().max_request_bytes,
            ))
            .with_state(self.clone())
    }

    /// Runs a request for `grant`: admission, the statements, the charge.
    pub async fn run(
        self: &Arc<Self>,
        grant: &Grant,
        statements: Vec<Statement>,
        format: ResultsFormat,
        exec: bool,
    ) -> Result<d1::Execution, Failure> {
        let t = std::time::Instant::now();
        let r = self.run_inner(grant, statements, format, exec).await;
        self.observe(t, &r);
        r
    }

    fn observe(&self, t: std::time::Instant, r: &Result<d1::Execution, Failure>) {
        self.metrics
            .query_seconds
            .observe(t.elapsed().as_secs_f64());
        match r {
            Ok(done) => {
                self.metrics.result("ok");
                self.metrics.rows_read_total.inc_by(done.rows_read);
                self.metrics.rows_written_total.inc_by(done.rows_written);
            }
            Err(f) => self.metrics.result(f.label()),
        }
    }

    async fn run_inner(
        self: &Arc<Self>,
        grant: &Grant,
        statements: Vec<Statement>,
        format: ResultsFormat,
        exec: bool,
    ) -> Result<d1::Execution, Failure> {
        self.execute(grant, move |db| {
            if exec {
                d1::run_exec(db, &statements)
            } else {
                d1::run_query(db, &statements, format)
            }
        })
        .await
    }

    /// Read-only SQL for the agent's own inspection (`query_database`): one statement, at most
    /// `max_rows` rows, metered like tenant queries.
    pub async fn inspect(
        self: &Arc<Self>,
        grant: &Grant,
        sql: &str,
        max_rows: usize,
    ) -> Result<d1::Execution, Failure> {
        let t = std::time::Instant::now();
        let r = self.inspect_inner(grant, sql, max_rows).await;
        self.observe(t, &r);
        r
    }

    async fn inspect_inner(
        self: &Arc<Self>,
        grant: &Grant,
        sql: &str,
        max_rows: usize,
    ) -> Result<d1::Execution, Failure> {
        if !self.dbs.exists(&grant.project) {
            return Err(Failure::Db(DbError::NoDatabase(grant.project.clone())));
        }
        let sql = sql.to_owned();
        self.execute(grant, move |db| d1::run_readonly(db, &sql, max_rows))
            .await
    }

    /// The one way a request reaches a database: wait its turn (one request per project at a
    /// time, a bounded queue, a bounded number of projects at once), admit the owner, run on a
    /// blocking thread, charge. From admission on it runs in its own task: a caller that goes
    /// away (a tenant aborting its subrequest) neither stops the query nor skips its charge.
    async fn execute(
        self: &Arc<Self>,
        grant: &Grant,
        run: impl FnOnce(&crate::Database) -> Result<d1::Execution, d1::Failed> + Send + 'static,
    ) -> Result<d1::Execution, Failure> {
        // Admission first: a slow meter must not hold a project's turn or a global slot.
        match self.meter.admit(&grant.account).await {
            Ok(()) => {}
            Err(MeterRefusal::Suspended) => return Err(Failure::Suspended),
            Err(MeterRefusal::Unavailable) => return Err(Failure::Unavailable),
        }
        let gate = self.gate(&grant.project);
        let waiting = Waiting::enter(&gate).ok_or(Failure::Busy)?;
        let turn = gate.turn.clone().acquire_owned().await;
        drop(waiting);
        let turn = turn.map_err(|_| Failure::Unavailable)?;
        let slot = self
            .running
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Failure::Unavailable)?;
        let svc = self.clone();
        let grant = grant.clone();
        let task = tokio::spawn(async move {
            let dbs = svc.dbs.clone();
            let project = grant.project.clone();
            let ran = tokio::task::spawn_blocking(move || {
                // Opening the database is ours: the clock starts after it.
                let db = match dbs.get(&project) {
                    Ok(db) => db,
                    Err(e) => return (Err(d1::Failed::from(e)), 0),
                };
                let started = thread_cpu_us();
                let r = run(&db);
                (r, thread_cpu_us().saturating_sub(started))
            })
            .await;
            drop((turn, slot));
            let Ok((ran, cpu_us)) = ran else {
                return Err(Failure::Unavailable);
            };
            // CPU past the allowance every request includes is the service's CPU too.
            let cpu_us = cpu_us.saturating_sub(FREE_CPU_US);
            let (read, written, out) = match ran {
                Ok(done) => (done.rows_read, done.rows_written, Ok(done)),
                // Reads before a failure were real work; its writes were rolled back.
                Err(failed) => (failed.rows_read, 0, Err(Failure::Db(failed.error))),
            };
            if out.is_err() {
                svc.metrics.rows_read_total.inc_by(read);
            }
            if read > 0 || written > 0 || cpu_us > 0 {
                svc.meter.charge(&grant.account, read, written, cpu_us);
            }
            if (read > 0 || written > 0 || cpu_us > 0)
                && let Some(u) = &svc.usage
            {
                u.record(&grant.project, read, written, cpu_us);
            }
            out
        });
        task.await.map_err(|_| Failure::Unavailable)?
    }

    fn gate(&self, project: &str) -> Arc<Gate> {
        let mut gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        gates.entry(project.to_owned()).or_default().clone()
    }
}

/// One request per project at a time; this many more may wait.
const MAX_WAITING: usize = 64;

/// CPU a request may use in the database without a charge beyond its rows (µs): a point read
/// takes ~10 µs, so only heavy queries pay for their CPU.
pub const FREE_CPU_US: u64 = 1_000;

struct Gate {
    turn: Arc<tokio::sync::Semaphore>,
    waiting: std::sync::atomic::AtomicUsize,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            turn: Arc::new(tokio::sync::Semaphore::new(1)),
            waiting: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

/// A place in a project's queue, given back however the waiting ends (a caller that goes
/// away included).
struct Waiting<'a>(&'a Gate);

impl<'a> Waiting<'a> {
    fn enter(gate: &'a Gate) -> Option<Waiting<'a>> {
        if gate.waiting.fetch_add(1, Ordering::AcqRel) >= MAX_WAITING {
            gate.waiting.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Waiting(gate))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// This thread's CPU time (µs).
fn thread_cpu_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0)
}

impl Failure {
    /// The `result` label of `tollgate_database_queries_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Failure::Suspended => "suspended",
            Failure::Unavailable => "unavailable",
            Failure::Busy => "busy",
            Failure::Db(e) => match e {
                DbError::Sqlite(_) => "sql_error",
                DbError::Timeout(_) => "timeout",
                DbError::ResultTooLarge(_) => "too_large",
                DbError::Full(_) | DbError::HostFull => "full",
                DbError::NotAllowed(_) => "refused",
                DbError::BadRequest(_) | DbError::BadProject(_) | DbError::NoDatabase(_) => {
                    "bad_request"
                }
                DbError::Io { .. } => "unavailable",
            },
        }
    }
}

/// Why a request got no result.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("the account that owns this project has no balance left: add funds to resume")]
    Suspended,
    #[error("the database is unavailable for a moment; retry")]
    Unavailable,
    #[error("too many queries are waiting for this database; retry with fewer at once")]
    Busy,
    #[error("{0}")]
    Db(DbError),
}

#[derive(Deserialize)]
struct Params {
    #[serde(rename = "resultsFormat")]
    results_format: Option<String>,
}

/// D1's body: one statement or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum Body {
    One(Statement),
    Many(Vec<Statement>),
}

async fn handle(
    svc: Arc<Service>,
    p: Params,
    headers: HeaderMap,
    body: axum::body::Bytes,
    exec: bool,
) -> Response {
    let Some(grant) = svc.lookup(&headers) else {
        svc.metrics.result("refused");
        return error(
            StatusCode::FORBIDDEN,
            "this deployment has no database binding",
        );
    };
    let format = match ResultsFormat::parse(p.results_format.as_deref()) {
        Ok(f) => f,
        Err(e) => {
            svc.metrics.result("bad_request");
            return error(StatusCode::BAD_REQUEST, &e.to_string());
        }
    };
    // `/execute` carries `run()` (one statement with params, rows not wanted) or `exec()` (a
    // list of lines, each possibly several statements, no params).
    let (statements, exec) = match (decode_body(&body), exec) {
        (Ok(Body::One(s)), false) => (vec![s], false),
        (Ok(Body::Many(v)), false) => (v, false),
        (Ok(Body::One(s)), true) => (vec![s], false),
        (Ok(Body::Many(v)), true) => (v, true),
        (Err(e), _) => {
            svc.metrics.result("bad_request");
            return error(StatusCode::BAD_REQUEST, &e.to_string());
        }
    };
    let format = if exec { ResultsFormat::None } else { format };
    match svc.run(&grant, statements, format, exec).await {
        Ok(done) => {
            let mut resp = axum::Json(done.results).into_response();
            if headers.contains_key(SESSION_HEADER) {
                // One primary, read-your-writes always: any increasing bookmark will do. The
                // binding keeps the larger of two bookmarks by string order, so they are
                // fixed-width and taken from the clock (they keep rising across restarts).
                let now_us = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as u64);
                let n = svc.commits.fetch_max(now_us, Ordering::Relaxed).max(now_us);
                if let Ok(v) = HeaderValue::from_str(&format!("{n:016x}")) {
                    resp.headers_mut().insert(SESSION_HEADER, v);
                }
            }
            resp
        }
        Err(f) => {
            if let Failure::Db(DbError::Io { .. }) = &f {
                tracing::warn!(project = %grant.project, error = %f, "database I/O failed");
            }
            // D1 answers SQL errors with 200 and `success: false`; the binding turns them into
            // `D1_ERROR: <message>` in tenant code.
            error(StatusCode::OK, &f.to_string())
        }
    }
}

/// Decodes a request body into its statements; never panics, whatever the bytes.
pub fn decode(body: &[u8]) -> Result<Vec<Statement>, DbError> {
    match decode_body(body)? {
        Body::One(s) => Ok(vec![s]),
        Body::Many(v) => Ok(v),
    }
}

fn decode_body(body: &[u8]) -> Result<Body, DbError> {
    serde_json::from_slice::<Body>(body).map_err(|e| {
        DbError::BadRequest(format!(
            "the body is not a D1 statement or list of statements: {e}"
        ))
    })
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({ "success": false, "error": message })),
    )
        .into_response()
}
