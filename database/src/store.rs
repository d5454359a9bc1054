//! The databases on disk: one SQLite file per project, one connection per database, opened on
//! first use and hardened before tenant SQL ever reaches it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::limits::Limit;
use rusqlite::{Connection, OpenFlags};

use crate::{DbError, Limits};

/// Pragmas tenant SQL may run: they read the schema or set per-connection behaviour D1 also
/// allows. Everything else (journal_mode, synchronous, writable_schema, max_page_count, mmap,
/// temp_store_directory, …) is ours.
const TENANT_PRAGMAS: &[&str] = &[
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
    "foreign_key_check",
    "foreign_keys",
    "defer_foreign_keys",
    "integrity_check",
    "quick_check",
    "optimize",
    "collation_list",
    "function_list",
    "pragma_list",
    "case_sensitive_like",
    "recursive_triggers",
    "ignore_check_constraints",
    "legacy_alter_table",
    "reverse_unordered_selects",
];

/// SQL functions tenant code may never call.
const DENIED_FUNCTIONS: &[&str] = &["load_extension", "fts3_tokenizer", "readfile", "writefile"];

/// Table rows are counted up to this many for views; `COUNT_CAP + 1` means "more".
pub const COUNT_CAP: u64 = 1_000_000;

/// Virtual-table modules tenant SQL may use.
const VTABLE_MODULES: &[&str] = &["fts5", "fts4", "fts3", "rtree"];

/// Where the databases live, and the ones open now.
pub struct Databases {
    root: PathBuf,
    limits: Limits,
    open: Mutex<HashMap<String, Arc<Database>>>,
    /// Deleted in this process's life: never recreated by a request that was already on its
    /// way (ids are never reused).
    deleted: Mutex<std::collections::HashSet<String>>,
}

/// One project's database: its single connection and what guards it.
pub struct Database {
    project: String,
    path: PathBuf,
    conn: Mutex<Option<Connection>>,
    /// Tenant SQL runs only while this is set: the authorizer restricts tenant statements and
    /// lets ours (transactions, pragmas) through.
    tenant: Arc<AtomicBool>,
    /// Nanoseconds since `epoch` of the last request (idle connections are closed).
    last_used: AtomicU64,
    /// Nanoseconds since `epoch` after which the running statement is interrupted; 0 = none.
    deadline: Arc<AtomicU64>,
    epoch: Instant,
    pub(crate) limits: Limits,
}

/// What `get_project` and operators see of a database.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DbInfo {
    pub size_bytes: u64,
    pub tables: Vec<TableInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TableInfo {
    pub name: String,
    pub rows: u64,
}

/// A project id as a file name: the ids control makes are short and plain; anything else is
/// refused rather than escaped.
pub fn valid_project_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Databases {
    /// Databases under `root` (created if missing).
    pub fn open(root: impl Into<PathBuf>, limits: Limits) -> Result<Arc<Databases>, DbError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|e| DbError::io(&root, e))?;
        Ok(Arc::new(Databases {
            root,
            limits,
            open: Mutex::new(HashMap::new()),
            deleted: Mutex::new(std::collections::HashSet::new()),
        }))
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn path(&self, project: &str) -> PathBuf {
        self.root.join(format!("{project}.sqlite"))
    }

    /// Whether `project` has a database on disk.
    pub fn exists(&self, project: &str) -> bool {
        valid_project_id(project) && self.path(project).exists()
    }

    /// The project's database, created on first use.
    pub fn get(&self, project: &str) -> Result<Arc<Database>, DbError> {
        if !valid_project_id(project) {
            return Err(DbError::BadProject(project.to_owned()));
        }
        // `open` first, then `deleted` (as `delete` does): a delete cannot slip in between the
        // check and the creation.
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if self
            .deleted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(project)
        {
            return Err(DbError::NoDatabase(project.to_owned()));
        }
        if let Some(db) = open.get(project) {
            return Ok(db.clone());
        }
        let db = Arc::new(Database::open(
            project,
            self.path(project),
            self.limits.clone(),
        )?);
        open.insert(project.to_owned(), db.clone());
        Ok(db)
    }

    /// Deletes the project's database and its WAL. Idempotent: `false` when there was none.
    /// A query that holds the database still finishes, then finds it gone.
    pub fn delete(&self, project: &str) -> Result<bool, DbError> {
        if !valid_project_id(project) {
            return Err(DbError::BadProject(project.to_owned()));
        }
        let db = {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            self.deleted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(project.to_owned());
            open.remove(project)
        };
        if let Some(db) = db {
            db.close();
        }
        let path = self.path(project);
        let mut existed = false;
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let p = PathBuf::from(format!("{}{suffix}", path.display()));
            match std::fs::remove_file(&p) {
                Ok(()) => existed |= suffix.is_empty(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(DbError::io(&p, e)),
            }
        }
        Ok(existed)
    }

    /// Size and tables of the project's database; `None` when it has none yet (nothing is
    /// created by looking).
    pub fn info(&self, project: &str) -> Result<Option<DbInfo>, DbError> {
        if !self.exists(project) {
            return Ok(None);
        }
        self.get(project)?.info().map(Some)
    }

    /// Copies the project's database to `dest` with SQLite's online backup, consistent while
    /// tenant code keeps writing.
    pub fn backup(&self, project: &str, dest: &Path) -> Result<(), DbError> {
        if !self.exists(project) {
            return Err(DbError::NoDatabase(project.to_owned()));
        }
        self.get(project)?.backup(dest)
    }

    /// Closes the connections unused for `idle` (each holds three file descriptors); the next
    /// request opens its database again. Returns how many were closed.
    pub fn close_idle(&self, idle: Duration) -> usize {
        let idle_ns = idle.as_nanos() as u64;
        let stale: Vec<Arc<Database>> = {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            let ids: Vec<String> = open
                .iter()
                .filter(|(_, db)| {
                    let now = db.epoch.elapsed().as_nanos() as u64;
                    // Only the map holds it: no request is using it.
                    Arc::strong_count(db) == 1
                        && now.saturating_sub(db.last_used.load(Ordering::Relaxed)) > idle_ns
                })
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| open.remove(id)).collect()
        };
        let n = stale.len();
        for db in stale {
            db.close();
        }
        n
    }

    /// Pauses writes of every database while the filesystem holding them has less than
    /// `min_free` bytes available to us (and resumes them above it): a tenant filling its
    /// database must not fill the host. Returns the bytes available.
    pub fn check_disk(&self, min_free: u64) -> Result<u64, DbError> {
        let st = nix::sys::statvfs::statvfs(&self.root)
            .map_err(|e| DbError::io(&self.root, std::io::Error::from(e)))?;
        let free = (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64);
        let paused = free < min_free;
        let was = self.limits.writes_paused.swap(paused, Ordering::Relaxed);
        if paused != was {
            if paused {
                tracing::error!(
                    free_bytes = free,
                    min_free,
                    "disk nearly full: database writes paused"
                );
            } else {
                tracing::info!(
                    free_bytes = free,
                    "disk space back: database writes resumed"
                );
            }
        }
        Ok(free)
    }

    /// Closes every open connection (checkpointing the WAL into the file).
    pub fn close_all(&self) {
        let all: Vec<_> = self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, db)| db)
            .collect();
        for db in all {
            db.close();
        }
    }

    /// Projects with a database on disk.
    pub fn list(&self) -> Result<Vec<String>, DbError> {
        let mut out = Vec::new();
        let dir = std::fs::read_dir(&self.root).map_err(|e| DbError::io(&self.root, e))?;
        for entry in dir.flatten() {
            let name = entry.file_name();
            if let Some(p) = name.to_str().and_then(|n| n.strip_suffix(".sqlite"))
                && valid_project_id(p)
            {
                out.push(p.to_owned());
            }
        }
        out.sort();
        Ok(out)
    }
}

impl Database {
    fn open(project: &str, path: PathBuf, limits: Limits) -> Result<Database, DbError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = Connection::open_with_flags(&path, flags).map_err(DbError::sqlite)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(DbError::sqlite)?;
        // WAL: readers never wait for the writer. synchronous=FULL: a transaction the tenant
        // saw committed survives power loss (docs/database.md has the measurement).
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(DbError::sqlite)?;
        conn.pragma_update(None, "synchronous", limits.synchronous.pragma())
            .map_err(DbError::sqlite)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(DbError::sqlite)?;
        let page_size: u64 = conn
            .query_row("PRAGMA page_size", [], |r| r.get::<_, i64>(0))
            .map_err(DbError::sqlite)?
            .max(512) as u64;
        // Writes past the cap fail with SQLITE_FULL; reads keep working.
        let max_pages = (limits.max_size_bytes / page_size).max(16);
        conn.pragma_update(None, "max_page_count", max_pages as i64)
            .map_err(DbError::sqlite)?;
        // No second database may be attached, whatever the SQL says.
        conn.set_limit(Limit::SQLITE_LIMIT_ATTACHED, 0)
            .map_err(DbError::sqlite)?;
        // D1's limits, which also bound what one VM operation can do between two progress
        // checks: strings and blobs (so rows) of at most 2 MB, LIKE/GLOB patterns of 50 bytes,
        // 32 function arguments.
        conn.set_limit(
            Limit::SQLITE_LIMIT_LENGTH,
            i32::try_from(limits.max_value_bytes).unwrap_or(i32::MAX),
        )
        .map_err(DbError::sqlite)?;
        conn.set_limit(Limit::SQLITE_LIMIT_LIKE_PATTERN_LENGTH, 50)
            .map_err(DbError::sqlite)?;
        conn.set_limit(Limit::SQLITE_LIMIT_FUNCTION_ARG, 32)
            .map_err(DbError::sqlite)?;
        // A WAL grown by one large transaction shrinks back after the next checkpoint.
        conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)
            .map_err(DbError::sqlite)?;
        conn.set_limit(
            Limit::SQLITE_LIMIT_SQL_LENGTH,
            i32::try_from(limits.max_sql_bytes).unwrap_or(i32::MAX),
        )
        .map_err(DbError::sqlite)?;
        conn.set_limit(
            Limit::SQLITE_LIMIT_VARIABLE_NUMBER,
            i32::try_from(limits.max_params).unwrap_or(i32::MAX),
        )
        .map_err(DbError::sqlite)?;
        // Defensive mode: no writable_schema, no shadow-table writes, no file-corrupting tricks.
        conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)
            .map_err(DbError::sqlite)?;
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA,
            false,
        )
        .map_err(DbError::sqlite)?;

        let tenant = Arc::new(AtomicBool::new(false));
        let gate = tenant.clone();
        conn.authorizer(Some(move |ctx: AuthContext<'_>| {
            if !gate.load(Ordering::Relaxed) {
                return Authorization::Allow;
            }
            authorize_tenant(&ctx)
        }))
        .map_err(DbError::sqlite)?;

        let epoch = Instant::now();
        let deadline = Arc::new(AtomicU64::new(0));
        let d = deadline.clone();
        conn.progress_handler(
            10_000,
            Some(move || {
                let at = d.load(Ordering::Relaxed);
                at != 0 && epoch.elapsed().as_nanos() as u64 > at
            }),
        )
        .map_err(DbError::sqlite)?;

        Ok(Database {
            project: project.to_owned(),
            path,
            conn: Mutex::new(Some(conn)),
            tenant,
            last_used: AtomicU64::new(epoch.elapsed().as_nanos() as u64),
            deadline,
            epoch,
            limits,
        })
    }

    pub fn project(&self) -> &str {
        &self.project
    }

    /// Runs `f` on the connection with the query deadline armed; `f` switches the tenant
    /// restrictions on around tenant statements ([`TenantMode`]). Blocking: call from a
    /// blocking thread.
    pub(crate) fn with_tenant<T>(
        &self,
        f: impl FnOnce(&mut Connection, &TenantMode) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        let mut guard = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let conn = guard
            .as_mut()
            .ok_or_else(|| DbError::NoDatabase(self.project.clone()))?;
        self.last_used
            .store(self.epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let limit = self.epoch.elapsed() + self.limits.query_timeout;
        self.deadline
            .store(limit.as_nanos() as u64, Ordering::Relaxed);
        let mode = TenantMode(&self.tenant);
        let out = f(conn, &mode);
        drop(mode);
        self.deadline.store(0, Ordering::Relaxed);
        // A failed statement inside our transaction leaves it open only if `f` lost track of
        // it; never let a later request run inside a stranger's transaction.
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        out
    }

    /// Runs `f` on the connection with no tenant restrictions (our own reads).
    fn with_conn<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        let guard = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let conn = guard
            .as_ref()
            .ok_or_else(|| DbError::NoDatabase(self.project.clone()))?;
        f(conn)
    }

    /// The database's size on disk: pages in use times the page size, plus the WAL.
    pub fn size_bytes(&self) -> Result<u64, DbError> {
        self.with_conn(|c| size_of(c, &self.path))
    }

    fn info(&self) -> Result<DbInfo, DbError> {
        self.with_conn(|c| {
            let mut names = Vec::new();
            {
                let mut stmt = c
                    .prepare(
                        "SELECT name FROM sqlite_schema WHERE type = 'table' \
                         AND name NOT LIKE 'sqlite_%' AND name NOT LIKE '_cf_%' ORDER BY name",
                    )
                    .map_err(DbError::sqlite)?;
                let rows = stmt
                    .query_map([], |r| r.get::<_, String>(0))
                    .map_err(DbError::sqlite)?;
                for r in rows {
                    names.push(r.map_err(DbError::sqlite)?);
                }
            }
            let mut tables = Vec::with_capacity(names.len());
            for name in names {
                let quoted = format!("\"{}\"", name.replace('"', "\"\""));
                // Counted up to a bound: a view must stay cheap whatever the table holds.
                let rows: i64 = c
                    .query_row(
                        &format!(
                            "SELECT count(*) FROM (SELECT 1 FROM {quoted} LIMIT {})",
                            COUNT_CAP + 1
                        ),
                        [],
                        |r| r.get(0),
                    )
                    .map_err(DbError::sqlite)?;
                tables.push(TableInfo {
                    name,
                    rows: rows.max(0) as u64,
                });
            }
            Ok(DbInfo {
                size_bytes: size_of(c, &self.path)?,
                tables,
            })
        })
    }

    fn backup(&self, dest: &Path) -> Result<(), DbError> {
        self.with_conn(|c| {
            let mut out = Connection::open(dest).map_err(DbError::sqlite)?;
            let backup = rusqlite::backup::Backup::new(c, &mut out).map_err(DbError::sqlite)?;
            // All pages in one step, inside one read transaction: WAL lets the service keep
            // writing, and no write can restart the copy.
            match backup.step(-1).map_err(DbError::sqlite)? {
                rusqlite::backup::StepResult::Done => Ok(()),
                other => Err(DbError::Sqlite(format!(
                    "backup did not finish ({other:?}); retry"
                ))),
            }
        })
    }

    /// Checkpoints and closes the connection; later queries find no database.
    fn close(&self) {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(conn) = conn {
            let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
            if let Err((_, e)) = conn.close() {
                tracing::warn!(project = %self.project, error = %e, "closing a database failed");
            }
        }
    }
}

/// Switches the authorizer's tenant restrictions: on while tenant SQL is prepared and stepped,
/// off for our own BEGIN/COMMIT.
pub(crate) struct TenantMode<'a>(&'a AtomicBool);

impl TenantMode<'_> {
    pub(crate) fn on(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub(crate) fn off(&self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Off when dropped, even by a panic: our own BEGIN/COMMIT must never meet the tenant's rules.
impl Drop for TenantMode<'_> {
    fn drop(&mut self) {
        self.off();
    }
}

fn size_of(c: &Connection, path: &Path) -> Result<u64, DbError> {
    let pages: i64 = c
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .map_err(DbError::sqlite)?;
    let page_size: i64 = c
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .map_err(DbError::sqlite)?;
    let wal = std::fs::metadata(format!("{}-wal", path.display()))
        .map(|m| m.len())
        .unwrap_or(0);
    Ok((pages.max(0) as u64) * (page_size.max(0) as u64) + wal)
}

/// What tenant SQL may do: everything on its own `main` database except attaching files,
/// file-touching pragmas, extension loading and transaction control (D1 runs each batch as one
/// transaction; a tenant `BEGIN` would let a request leave the database locked).
fn authorize_tenant(ctx: &AuthContext<'_>) -> Authorization {
    match ctx.action {
        AuthAction::Attach { .. } | AuthAction::Detach { .. } => Authorization::Deny,
        AuthAction::Transaction { .. } | AuthAction::Savepoint { .. } => Authorization::Deny,
        AuthAction::Pragma { pragma_name, .. } => {
            if TENANT_PRAGMAS
                .iter()
                .any(|p| p.eq_ignore_ascii_case(pragma_name))
            {
                Authorization::Allow
            } else {
                Authorization::Deny
            }
        }
        AuthAction::Function { function_name } => {
            if DENIED_FUNCTIONS
                .iter()
                .any(|f| f.eq_ignore_ascii_case(function_name))
            {
                Authorization::Deny
            } else {
                Authorization::Allow
            }
        }
        // Full-text search and R-trees, as D1 offers; no other module (some touch files).
        AuthAction::CreateVtable { module_name, .. }
        | AuthAction::DropVtable { module_name, .. } => {
            if VTABLE_MODULES
                .iter()
                .any(|m| m.eq_ignore_ascii_case(module_name))
            {
                Authorization::Allow
            } else {
                Authorization::Deny
            }
        }
        // Temporary tables live outside the size cap (and in unlinked files): not offered.
        AuthAction::CreateTempTable { .. }
        | AuthAction::CreateTempIndex { .. }
        | AuthAction::CreateTempTrigger { .. }
        | AuthAction::CreateTempView { .. } => Authorization::Deny,
        _ => match ctx.database_name {
            Some("main") | None => Authorization::Allow,
            Some(_) => Authorization::Deny,
        },
    }
}
