//! Per-project locks shared by every control instance (docs/scale-out.md, "Several control
//! instances"): a lease in Redis, renewed while held, and the writes made under it checked
//! against it inside Redis, so an instance that lost its lease (a long pause) cannot overwrite
//! what the next holder wrote.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tollgate_kv::Conn;

use crate::error::ControlError;
use crate::model::new_id;

/// How long a lease lives without renewal by default: an instance killed while holding one
/// blocks the project's next deploy this long at most.
pub const LEASE_TTL: Duration = Duration::from_secs(10);

/// Takes `KEYS[1]` for token `ARGV[1]`, `ARGV[2]` ms, if free.
const TAKE: &str = r#"
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"#;

/// Renews `KEYS[1]` if it holds `ARGV[1]`.
pub(crate) const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#;

/// Frees `KEYS[1]` if it holds `ARGV[1]`.
const FREE: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"#;

/// What a fenced write checks inside Redis: `key` still holds `token`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: String,
    pub token: String,
}

/// A held project lease. Renewed in the background; freed when dropped.
pub struct ProjectLease {
    fence: Option<Fence>,
    lost: Arc<AtomicBool>,
    renew: Option<tokio::task::JoinHandle<()>>,
    conn: Option<Conn>,
}

impl ProjectLease {
    /// No lease: one control instance (the embedded store), its in-process lock is enough.
    pub fn local() -> Self {
        ProjectLease {
            fence: None,
            lost: Arc::new(AtomicBool::new(false)),
            renew: None,
            conn: None,
        }
    }

    /// What writes under this lease are checked against (`None`: nothing to check).
    pub fn fence(&self) -> Option<&Fence> {
        self.fence.as_ref()
    }

    /// Whether a renewal found the lease taken (the next fenced write will be refused).
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// Tries once to take `key`; `None` when another holder has it.
    pub async fn try_take(
        conn: &Conn,
        key: String,
        ttl: Duration,
    ) -> Result<Option<ProjectLease>, ControlError> {
        let token = new_id("l");
        let mut c = conn.clone();
        let took: i64 = redis::Script::new(TAKE)
            .key(&key)
            .arg(&token)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut c)
            .await?;
        if took != 1 {
            return Ok(None);
        }
        let lost = Arc::new(AtomicBool::new(false));
        let renew = tokio::spawn({
            let (conn, key, token, lost) = (conn.clone(), key.clone(), token.clone(), lost.clone());
            async move {
                let mut tick = tokio::time::interval(ttl / 4);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let mut c = conn.clone();
                    match redis::Script::new(RENEW)
                        .key(&key)
                        .arg(&token)
                        .arg(ttl.as_millis() as u64)
                        .invoke_async::<i64>(&mut c)
                        .await
                    {
                        Ok(1) => {}
                        Ok(_) => {
                            tracing::error!(lock = %key, "project lease lost while held; its writes will be refused");
                            lost.store(true, Ordering::Release);
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(lock = %key, error = %e, "project lease not renewed")
                        }
                    }
                }
            }
        });
        Ok(Some(ProjectLease {
            fence: Some(Fence { key, token }),
            lost,
            renew: Some(renew),
            conn: Some(conn.clone()),
        }))
    }
}

impl Drop for ProjectLease {
    fn drop(&mut self) {
        if let Some(r) = self.renew.take() {
            r.abort();
        }
        if let (Some(fence), Some(conn)) = (self.fence.take(), self.conn.take())
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let mut c = conn;
                if let Err(e) = redis::Script::new(FREE)
                    .key(&fence.key)
                    .arg(&fence.token)
                    .invoke_async::<i64>(&mut c)
                    .await
                {
                    // It expires by itself within the lease's lifetime.
                    tracing::warn!(lock = %fence.key, error = %e, "project lease not freed");
                }
            });
        }
    }
}

/// One control instance at a time runs the background rounds (payments' settlement, close
/// watch and credit drain, and the cleanup sweep): the one holding this lease in Redis. The
/// others take it over within a lease lifetime when the holder stops or is lost.
pub struct Leadership {
    base: std::time::Instant,
    /// Held until this many ms after `base`, by this process's clock (0: not held).
    held_until_ms: std::sync::atomic::AtomicU64,
    always: bool,
}

impl Leadership {
    /// For a process that is the only control instance (no shared store): always held.
    pub fn always() -> Arc<Leadership> {
        Arc::new(Leadership {
            base: std::time::Instant::now(),
            held_until_ms: Default::default(),
            always: true,
        })
    }

    /// Not held until [`Leadership::run`] takes the lease.
    pub fn shared() -> Arc<Leadership> {
        Arc::new(Leadership {
            base: std::time::Instant::now(),
            held_until_ms: Default::default(),
            always: false,
        })
    }

    /// Whether this process may run a round now.
    pub fn is_held(&self) -> bool {
        self.always
            || (self.base.elapsed().as_millis() as u64) < self.held_until_ms.load(Ordering::Acquire)
    }

    /// Takes the lease `key` (`ttl`) when it is free and keeps it, until `stop`; then frees it
    /// so another instance takes over at once.
    pub async fn run(
        self: Arc<Self>,
        redis: tollgate_kv::Target,
        key: String,
        ttl: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let token = new_id("r");
        let mut conn: Option<Conn> = None;
        let mut tick = tokio::time::interval(ttl / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = crate::hosts::stopped(&mut stop) => break,
            }
            if conn.is_none() {
                // A liveness lease: the master's word is enough (see `Conn::without_acks`).
                conn = redis.connect().await.ok().map(|c| c.without_acks());
            }
            let Some(c) = conn.as_mut() else {
                continue;
            };
            // Counted from before the call: this process's view of the lease never outlives
            // Redis's, and a quarter of it is left as a margin for the clocks.
            let asked = self.base.elapsed();
            let held = if self.held_until_ms.load(Ordering::Acquire) > 0 {
                redis::Script::new(RENEW)
                    .key(&key)
                    .arg(&token)
                    .arg(ttl.as_millis() as u64)
                    .invoke_async::<i64>(c)
                    .await
            } else {
                redis::Script::new(TAKE)
                    .key(&key)
                    .arg(&token)
                    .arg(ttl.as_millis() as u64)
                    .invoke_async::<i64>(c)
                    .await
            };
            match held {
                Ok(1) => {
                    if self.held_until_ms.load(Ordering::Acquire) == 0 {
                        tracing::info!(lease = %key, "this control instance runs the background rounds");
                    }
                    let until = asked + ttl - ttl / 4;
                    self.held_until_ms
                        .store((until.as_millis() as u64).max(1), Ordering::Release);
                }
                Ok(_) => {
                    if self.held_until_ms.swap(0, Ordering::AcqRel) > 0 {
                        tracing::warn!(lease = %key, "background rounds lease lost to another instance");
                    }
                }
                // Kept until it runs out by itself (the margin covers Redis's view).
                Err(e) => {
                    tracing::warn!(lease = %key, error = %e, "background rounds lease not renewed")
                }
            }
        }
        if self.held_until_ms.swap(0, Ordering::AcqRel) > 0
            && let Some(c) = conn.as_mut()
        {
            let _ = redis::Script::new(FREE)
                .key(&key)
                .arg(&token)
                .invoke_async::<i64>(c)
                .await;
        }
    }
}
