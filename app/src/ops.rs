//! Operator commands: routes and accounts by hand, the audit of the books, credits set aside.
//! Each opens what it needs for one call and prints JSON (or lines, for the audit).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tollgate_routes::{Route, RouteKey, RouteStore};

fn one_shot() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// What to do with routes.
pub enum RouteOp {
    Put {
        key: RouteKey,
        upstreams: Vec<SocketAddr>,
        account_id: Option<String>,
    },
    Delete {
        key: RouteKey,
    },
    List,
}

/// Reads or writes routes in Redis, as the control service does.
pub fn routes(redis: tollgate_kv::Target, prefix: &str, op: RouteOp) -> anyhow::Result<()> {
    one_shot()?.block_on(async move {
        let store = RouteStore::connect(redis, prefix).await?;
        match op {
            RouteOp::Put {
                key,
                upstreams,
                account_id,
            } => {
                let route = Route {
                    upstreams,
                    account_id,
                    project_id: None,
                    deployment_id: None,
                };
                let v = store.put(&key, &route).await?;
                println!("{} = {:?} (version {v})", key.field(), route.upstreams);
            }
            RouteOp::Delete { key } => {
                let v = store.delete(&key).await?;
                println!("{} deleted (version {v})", key.field());
            }
            RouteOp::List => {
                for (key, rec) in store.load_all().await? {
                    if let Some(route) = rec.route {
                        println!(
                            "{}",
                            serde_json::json!({"key": key.field(), "version": rec.v, "route": route})
                        );
                    }
                }
            }
        }
        Ok(())
    })
}

/// What to do with one account.
pub enum AccountOp {
    Show,
    /// Adds `usd` once per `key`.
    Credit {
        usd: String,
        key: String,
    },
}

/// Shows (after crediting, for `Credit`) an account as JSON; false when it does not exist.
pub fn account(
    redis: &tollgate_proxy::RedisConfig,
    prefix: &str,
    account: &str,
    op: AccountOp,
) -> anyhow::Result<bool> {
    one_shot()?.block_on(async move {
        let store = crate::paid::open_shared_money(redis, prefix, Duration::from_secs(10)).await?;
        if let AccountOp::Credit { usd, key } = &op {
            let amount = tollgate_metering::units::parse_usd(usd)
                .map_err(|e| anyhow::anyhow!("--usd {usd}: {e}"))?;
            let out = store
                .credit(account, key, amount.0)
                .await
                .map_err(|e| anyhow::anyhow!("credit refused: {e}"))?;
            eprintln!("{out:?}");
        }
        match store.account(account).await? {
            Some(a) => {
                println!("{}", serde_json::to_string(&a)?);
                Ok(true)
            }
            None => {
                eprintln!("no account {account:?}");
                Ok(false)
            }
        }
    })
}

/// Where the books are: the shared Redis, or the embedded stores of a stopped `dev`.
pub struct Books<'a> {
    pub redis: Option<&'a tollgate_proxy::RedisConfig>,
    pub prefix: &'a str,
    pub data_dir: &'a Path,
}

/// The books an operator command opens: from the fleet's config file (and `TOLLGATE_*`),
/// then the flags given, so the command reads the same keys as the nodes.
pub struct BooksAt {
    pub redis: Option<tollgate_proxy::RedisConfig>,
    pub prefix: String,
    pub data_dir: PathBuf,
    pub chain_id: u64,
}

impl BooksAt {
    pub fn resolve(
        config: Option<&Path>,
        redis: Option<&str>,
        key_prefix: Option<&str>,
        data_dir: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<BooksAt> {
        let mut cfg = crate::config::Config::load(config, env)?;
        if let Some(url) = redis {
            cfg.set_redis_url(url).map_err(anyhow::Error::msg)?;
        }
        if let Some(p) = key_prefix
            && cfg.redis.as_ref().is_some_and(|r| !r.cluster.is_empty())
        {
            tollgate_proxy::config::check_key_prefix(p)
                .map_err(|e| anyhow::anyhow!("--key-prefix: {e}"))?;
        }
        Ok(BooksAt {
            prefix: key_prefix
                .map(str::to_owned)
                .or_else(|| cfg.redis.as_ref().map(|r| r.key_prefix.clone()))
                .unwrap_or_else(|| "tollgate".into()),
            redis: cfg.redis,
            data_dir: data_dir.map_or(cfg.control.data_dir, Path::to_path_buf),
            chain_id: cfg.payments.chain_id,
        })
    }

    pub fn books(&self) -> Books<'_> {
        Books {
            redis: self.redis.as_ref(),
            prefix: &self.prefix,
            data_dir: &self.data_dir,
        }
    }

    /// (where, prefix), for commands that need the shared Redis (one or a cluster).
    pub fn redis_only(self) -> anyhow::Result<(tollgate_proxy::RedisConfig, String)> {
        let redis = self.redis.ok_or_else(|| {
            anyhow::anyhow!(
                "no Redis: give --redis URL, a --config with [redis], or TOLLGATE_REDIS_URL"
            )
        })?;
        Ok((redis, self.prefix))
    }
}

/// `tollgate accounts audit`: prints the report (lines or JSON); true when it is clean.
pub fn audit(
    books: Books<'_>,
    rpc: Option<&str>,
    chain_id: u64,
    json: bool,
) -> anyhow::Result<bool> {
    one_shot()?.block_on(async move {
        let (money, channels) =
            crate::paid::open_money_and_channels(books.redis, books.prefix, books.data_dir).await?;
        let chain = match rpc {
            Some(url) => Some(
                tollgate_payments::RpcChain::read_only(
                    url,
                    chain_id,
                    tollgate_payments::config::ESCROW,
                )
                .map_err(|e| anyhow::anyhow!("--rpc {url}: {e}"))?,
            ),
            None => {
                eprintln!("--offline: channels are NOT compared with the chain (close requests and withdrawals our books missed go unseen)");
                None
            }
        };
        let report = tollgate_payments::audit::audit(
            &*channels,
            &*money,
            chain.as_ref().map(|c| c as &dyn tollgate_payments::Chain),
        )
        .await
        .map_err(anyhow::Error::msg)?;
        if report.accounts.is_empty() && report.channels.is_empty() {
            eprintln!(
                "note: no accounts and no channels in {} (key prefix {:?}): is this the fleet's --config / --key-prefix?",
                books
                    .redis
                    .map_or("the embedded stores".to_owned(), |r| r.describe()),
                books.prefix
            );
        }
        if json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", report.render());
        }
        Ok(report.is_clean())
    })
}

/// `tollgate accounts credits`: lists credits set aside, or resolves one (`retry` puts it back
/// in the drain, otherwise it is dropped). False when the key is not set aside.
pub fn credits(books: Books<'_>, resolve: Option<(&str, bool)>) -> anyhow::Result<bool> {
    one_shot()?.block_on(async move {
        let (_, channels) =
            crate::paid::open_money_and_channels(books.redis, books.prefix, books.data_dir).await?;
        if let Some((key, retry)) = resolve {
            return match channels
                .unpoison(key, retry)
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message))?
            {
                Some(p) => {
                    println!("{}", serde_json::to_string(&p)?);
                    Ok(true)
                }
                None => {
                    eprintln!("no set-aside credit {key:?}");
                    Ok(false)
                }
            };
        }
        for p in channels
            .poisoned()
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message))?
        {
            println!("{}", serde_json::to_string(&p)?);
        }
        Ok(true)
    })
}

/// `tollgate db backup`: copies `project`'s database under `dir` to `file` (SQLite's online
/// backup: a consistent copy while the service keeps writing).
pub fn db_backup(dir: &Path, project: &str, file: &Path) -> anyhow::Result<()> {
    if !dir.is_dir() {
        anyhow::bail!(
            "{} is not a directory (database.dir, or <control.data_dir>/databases)",
            dir.display()
        );
    }
    let dbs = tollgate_database::Databases::open(dir, tollgate_database::Limits::default())
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    if !dbs.exists(project) {
        anyhow::bail!(
            "project {project:?} has no database in {} (check the project id and database.dir)",
            dir.display()
        );
    }
    dbs.backup(project, file)
        .map_err(|e| anyhow::anyhow!("backup of {project} to {}: {e}", file.display()))?;
    let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    println!(
        "{}",
        serde_json::json!({"project": project, "file": file, "bytes": size})
    );
    Ok(())
}

/// `tollgate book copy`: copies the ledger into the book of record until it is caught up (the
/// control service does this continuously; this is for a backfill, or a host without one).
/// Prints `{"inserted":…,"duplicates":…,"conflicts":…,"cursor":"…"}` (on a cluster, `cursor`
/// holds one id per money shard's stream).
pub fn book_copy(postgres_url: &str, redis: &LedgersAt, prefix: &str) -> anyhow::Result<()> {
    one_shot()?.block_on(async move {
        let ledgers = ledgers(redis, prefix).await?;
        let mut book = tollgate_book::Book::connect(postgres_url, prefix).await?;
        let (mut inserted, mut duplicates, mut conflicts) = (0u64, 0u64, 0u64);
        let last = loop {
            let c = book.copy_round(&ledgers, 500).await?.whole()?;
            inserted += c.inserted;
            duplicates += c.duplicates;
            conflicts += c.conflicts;
            if c.caught_up {
                break c;
            }
        };
        let mut out = serde_json::json!({"inserted": inserted, "duplicates": duplicates, "conflicts": conflicts});
        // One Redis: its stream's cursor; a cluster: one per money shard's stream.
        out["cursor"] = if ledgers.is_cluster() {
            serde_json::Value::Object(
                last.cursors
                    .into_iter()
                    .map(|(p, id)| (p, serde_json::Value::String(id)))
                    .collect(),
            )
        } else {
            serde_json::Value::String(last.cursor)
        };
        println!("{out}");
        Ok(())
    })
}

/// Where the ledgers are: the shared Redis (one or a cluster), and the money shards a
/// cluster's layout has when none is fixed there yet.
pub type LedgersAt = (tollgate_kv::Target, u32);

/// The ledgers at `at` (each round declares the book on every stream before it copies, so
/// nothing is trimmed before it is copied).
async fn ledgers(at: &LedgersAt, prefix: &str) -> anyhow::Result<tollgate_book::Ledgers> {
    tollgate_book::Ledgers::connect(&at.0, prefix, at.1)
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", at.0.describe()))
}

/// `tollgate book run`: the book writer on its own, until SIGTERM or SIGINT (a round in flight
/// is abandoned: its transaction rolls back and the next run repeats it, as duplicates).
pub fn book_run(
    postgres_url: &str,
    redis: &LedgersAt,
    prefix: &str,
    interval: Duration,
    metrics_listen: Option<SocketAddr>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    one_shot()?.block_on(async move {
        let registry = prometheus::Registry::new();
        tollgate_proxy::metrics::register_build_info(&registry)?;
        let metrics = tollgate_book::BookMetrics::new(&registry)?;
        if let Some(addr) = metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("metrics listener {addr}: {e}"))?;
            let app = axum::Router::new().route(
                "/metrics",
                crate::telemetry::metrics_route(registry.clone()),
            );
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "book metrics listener ended");
                }
            });
        }
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let writer = tokio::spawn(tollgate_book::run(
            postgres_url.to_owned(),
            redis.0.clone(),
            prefix.to_owned(),
            redis.1,
            interval,
            metrics,
            stop,
        ));
        tracing::info!(prefix, "book of record: copying the ledger into PostgreSQL");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = stop_tx.send(true);
        // The writer stops between rounds; a round stuck on a dead peer ends at its 30 s limit.
        let _ = tokio::time::timeout(Duration::from_secs(35), writer).await;
        tracing::info!("book of record: stopped");
        Ok(())
    })
}

/// `tollgate book reconcile`: copies what is new, then compares the book with the Redis ledger
/// and the accounts' totals; prints every difference, one per line. True when there is none.
pub fn book_reconcile(postgres_url: &str, redis: &LedgersAt, prefix: &str) -> anyhow::Result<bool> {
    one_shot()?.block_on(async move {
        let ledgers = ledgers(redis, prefix).await?;
        let mut book = tollgate_book::Book::connect(postgres_url, prefix).await?;
        let diffs = book.reconcile(&ledgers).await?;
        for d in &diffs {
            println!("{d}");
        }
        eprintln!(
            "book reconcile: {} difference(s) (ledger prefix {prefix:?})",
            diffs.len()
        );
        Ok(diffs.is_empty())
    })
}

/// `tollgate book rebuild`: fills an empty Redis (or Redis Cluster) with the money state the
/// book of record adds up to, plus the batches the stopped nodes' journals never had acknowledged (docs/book.md,
/// "Rebuild after a Redis data loss"). Refuses a Redis that holds money keys, and a journal
/// whose node still runs. Prints what it restored as JSON; warnings (usage that neither the
/// book nor a journal holds) go with it and to the log.
pub fn book_rebuild(
    postgres_url: &str,
    redis: &LedgersAt,
    prefix: &str,
    journals: &[std::path::PathBuf],
    start_hold: Duration,
) -> anyhow::Result<()> {
    // A folder stands for every `*.journal` in it (a node's own and its stand-ins').
    let mut files = Vec::new();
    for j in journals {
        if j.is_dir() {
            let mut found: Vec<_> = std::fs::read_dir(j)
                .map_err(|e| anyhow::anyhow!("{}: {e}", j.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "journal"))
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(j.clone());
        }
    }
    let mut journals = Vec::new();
    for j in &files {
        let content = tollgate_metering::Journal::read_stopped(j)
            .map_err(|e| anyhow::anyhow!("{e} (stop its node before a rebuild)"))?;
        journals.push(content);
    }
    one_shot()?.block_on(async move {
        let book = tollgate_book::Book::connect(postgres_url, prefix).await?;
        let done = tollgate_book::rebuild(&book, &redis.0, prefix, redis.1, &journals, start_hold)
            .await
            .map_err(|e| anyhow::anyhow!("book rebuild into {}: {e}", redis.0.describe()))?;
        let (report, channels) = (&done.report, &done.channels);
        println!(
            "{}",
            serde_json::json!({
                "accounts": report.accounts,
                "credits": report.credits,
                "charges": report.charges,
                "incarnations": report.incarnations,
                "journal_batches_applied": report.journal_batches_applied,
                "journal_batches_booked": report.journal_batches_booked,
                "journals": files.len(),
                "shards": done.streams,
                "channels": channels.channels,
                "pending_credits": channels.pending_credits,
                "poisoned_credits": channels.poisoned_credits,
                "gap_credits": channels.gap_credits,
                "book_conflicts_ignored": done.conflicts,
                "warnings": report.warnings,
            })
        );
        Ok(())
    })
}

/// `tollgate book disable`: the ledger is trimmed by age alone again (after `[book]` is
/// removed: otherwise nothing past the last booked entry would ever be trimmed).
pub fn book_disable(redis: &LedgersAt, prefix: &str) -> anyhow::Result<()> {
    one_shot()?.block_on(async move {
        let ledgers = tollgate_book::Ledgers::connect(&redis.0, prefix, redis.1)
            .await
            .map_err(|e| anyhow::anyhow!("{}: {e}", redis.0.describe()))?;
        ledgers.disable_book().await?;
        println!(
            "{}",
            serde_json::json!({"book": "disabled", "prefix": prefix})
        );
        Ok(())
    })
}
