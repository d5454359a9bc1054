//! A runtime host's side (`tollgate runtime`): register with a lease, run what is assigned,
//! report how it runs, publish its logs, and hand everything over before stopping.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tollgate_kv::{Conn, Target, Timeouts};
use tollgate_runtime::{Phase, RuntimeError, RuntimeEvent, Started, Supervisor};

use super::metrics::HostMetrics;
use super::{Assignment, HostEvent, HostInfo, HostKeys, HostedState};
use crate::locks::RENEW;
use crate::model::{new_id, now_ms};

#[derive(Debug, Clone)]
pub struct HostAgentConfig {
    pub info: HostInfo,
    /// A host whose lease is not renewed for this long is taken for lost; its deployments move.
    pub lease: Duration,
    /// At a graceful stop: how long to wait for control to move the deployments away before
    /// stopping them anyway.
    pub handover: Duration,
    /// Log entries kept per deployment in Redis.
    pub log_entries: usize,
}

/// A deployment's log stream lives this long after its last line.
const LOG_TTL_SECONDS: i64 = 7 * 24 * 3600;

/// Gives the lease `KEYS[1]` up if it holds token `ARGV[1]`: it becomes `leaving:<token>` for
/// `ARGV[2]` ms (control moves the deployments at once, and a successor with the same id waits
/// until the hand-over is over), and the host is marked leaving (`KEYS[2]`, so control counts a
/// hand-over, not a loss).
const RESIGN: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
redis.call('SET', KEYS[1], 'leaving:' .. ARGV[1], 'PX', ARGV[2])
return 1
"#;

/// Frees `KEYS[1]` if it still holds `ARGV[1]` (a host's hand-over mark, at its end).
const UNMARK: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"#;

/// Takes the lease `KEYS[1]` for token `ARGV[1]` (`ARGV[2]` ms) only if nobody holds it (or
/// only this host's previous token `ARGV[5]`, after a short loss of Redis), then registers the
/// host (`KEYS[2]`, field `ARGV[3]`: `ARGV[4]`), clears its leaving mark (`KEYS[3]`) and the
/// states a predecessor left (`KEYS[4]`: their addresses are dead).
const TAKE: &str = r#"
if ARGV[5] and redis.call('GET', KEYS[1]) == ARGV[5] then redis.call('DEL', KEYS[1]) end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
redis.call('DEL', KEYS[3])
redis.call('DEL', KEYS[4])
return 1
"#;

/// The lease as the agent loop sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Lease {
    /// Not taken yet (held by a predecessor, or Redis away).
    Waiting,
    Held(String),
    /// Lost: every process was stopped; taken again when free.
    Lost,
}

/// Keeps the lease, on a task and a connection of its own: nothing the agent loop waits for can
/// delay a renewal, nor the stop of every process once the lease can no longer be vouched for.
struct Keeper {
    beat: Conn,
    keys: HostKeys,
    cfg: HostAgentConfig,
    sup: Supervisor,
    tx: watch::Sender<Lease>,
    ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
    metrics: Option<HostMetrics>,
}

impl Keeper {
    fn id(&self) -> &str {
        &self.cfg.info.id
    }

    fn set_ready(&self, ready: bool) {
        self.ready
            .store(ready, std::sync::atomic::Ordering::Release);
        if let Some(m) = &self.metrics {
            m.lease.set(i64::from(ready));
        }
    }

    async fn take(&self, token: &str, old: Option<&str>) -> Result<bool, String> {
        let info = serde_json::to_string(&self.cfg.info).map_err(io)?;
        let mut c = self.beat.clone();
        let script = redis::Script::new(TAKE);
        let mut inv = script.key(self.keys.alive(self.id()));
        inv.key(self.keys.hosts())
            .key(self.keys.leaving(self.id()))
            .key(self.keys.state(self.id()))
            .arg(token)
            .arg(self.cfg.lease.as_millis() as u64)
            .arg(self.id())
            .arg(info);
        if let Some(o) = old {
            inv.arg(o);
        }
        let took: i64 = inv.invoke_async(&mut c).await.map_err(io)?;
        Ok(took == 1)
    }

    async fn renew(&self, token: &str) -> Result<bool, String> {
        let mut c = self.beat.clone();
        let n: i64 = redis::Script::new(RENEW)
            .key(self.keys.alive(self.id()))
            .arg(token)
            .arg(self.cfg.lease.as_millis() as u64)
            .invoke_async(&mut c)
            .await
            .map_err(io)?;
        Ok(n == 1)
    }

    /// Stops every process of this host, at once.
    async fn lost(&self, why: &str) {
        tracing::error!(host = %self.id(), why, "runtime host lease lost; stopping its deployments and registering again");
        self.set_ready(false);
        if let Some(m) = &self.metrics {
            m.lease_losses.inc();
        }
        self.tx.send_replace(Lease::Lost);
        let ids: Vec<String> = self
            .sup
            .list()
            .into_iter()
            .map(|d| d.deployment_id)
            .collect();
        let stops = ids.iter().map(|id| self.sup.remove(id, false));
        futures_util::future::join_all(stops).await;
    }

    /// Until `stop` (then the agent hands over with the token it holds).
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut old: Option<String> = None;
        let mut waited: Option<Instant> = None;
        loop {
            // Take it (when free).
            let token = new_id("h");
            let mut last;
            loop {
                let asked = Instant::now();
                match self.take(&token, old.as_deref()).await {
                    Ok(true) => {
                        last = asked;
                        break;
                    }
                    Ok(false) => {
                        // Said again every minute: two machines given the same id (cloned
                        // images share a host name) wait here for good.
                        if waited.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(60)) {
                            waited = Some(Instant::now());
                            tracing::warn!(host = %self.id(), "the lease of this host id is held (a predecessor, or another process with the same host.id); waiting for it to run out");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "runtime host: cannot register yet"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(self.cfg.lease / 4) => {}
                    _ = super::stopped(&mut stop) => return,
                }
            }
            waited = None;
            tracing::info!(host = %self.id(), slots = self.cfg.info.slots(), "runtime host registered");
            self.set_ready(true);
            self.tx.send_replace(Lease::Held(token.clone()));
            // Keep it.
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(self.cfg.lease / 4) => {}
                    _ = super::stopped(&mut stop) => return,
                }
                let asked = Instant::now();
                // Bounded by the moment this host must have stopped (two thirds of the lease
                // after the last renewal), however the call fails.
                let must_stop = tokio::time::Instant::from_std(last + self.cfg.lease * 2 / 3);
                let renewed = match tokio::time::timeout_at(must_stop, self.renew(&token)).await {
                    Ok(r) => r,
                    Err(_) => Err("no answer before the lease ran short".to_owned()),
                };
                match renewed {
                    Ok(true) => last = asked,
                    Ok(false) => {
                        // Taken for lost (a pause or a partition longer than the lease):
                        // control has moved, or is moving, everything.
                        self.lost("its lease was taken").await;
                        old = None;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "runtime host: lease not renewed");
                        // Cut off from Redis: by the time the lease runs out there, control
                        // moves everything; stop first, so no deployment runs (and is charged)
                        // twice.
                        if last.elapsed() >= self.cfg.lease * 2 / 3 {
                            self.lost("it could not renew its lease in time").await;
                            // Back in touch before it ran out there: take it again at once.
                            old = Some(token.clone());
                            break;
                        }
                    }
                }
            }
        }
    }
}

/// One deployment this host runs (or is starting, or stopping).
struct Local {
    /// Empty once the lease was lost: whatever it is doing, it is stopped when done.
    gen_id: String,
    project: String,
    /// A start or a stop is under way: the next one waits for it.
    busy: bool,
    /// Its start finished (well or not).
    started: Option<Result<Started, RuntimeError>>,
    /// The next log entry to publish.
    next_log: u64,
}

enum Done {
    Started(String, String, Result<Started, RuntimeError>),
    Removed(String, String),
}

pub struct HostAgent {
    conn: Conn,
    /// The lease's keeper, until `run` starts it.
    keeper: Option<Keeper>,
    lease: watch::Receiver<Lease>,
    /// Where control publishes routes: a hand-over waits until none points here any more.
    routes: tollgate_routes::RouteStore,
    target: Target,
    keys: HostKeys,
    cfg: HostAgentConfig,
    sup: Supervisor,
    local: HashMap<String, Local>,
    work: JoinSet<Done>,
    /// Deployments whose state record changed since the last write.
    dirty: HashSet<String>,
    /// Holds its lease (its `/readyz`).
    ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
    metrics: Option<HostMetrics>,
}

fn io(e: impl std::fmt::Display) -> String {
    format!("runtime host (redis): {e}")
}

impl HostAgent {
    pub async fn connect(
        target: impl Into<Target>,
        prefix: &str,
        cfg: HostAgentConfig,
        sup: Supervisor,
    ) -> Result<HostAgent, String> {
        let target = target.into();
        // Every call bounded well inside the lease: a Redis that stops answering must not hold
        // up the loop past the moment this host has to stop (see `heartbeat`).
        let conn = target
            .connect_with(Timeouts::both(cfg.lease / 2))
            .await
            .map_err(io)?;
        // The lease itself: the master's word is enough (see `Conn::without_acks`): waiting for
        // a replica would stop every host whenever the master has none, and a renewal lost in
        // a failover costs at most this lease, which the host then finds gone and stops.
        let beat = target
            .connect_with(Timeouts::both(cfg.lease / 6))
            .await
            .map_err(io)?
            .without_acks();
        let routes = tollgate_routes::RouteStore::connect(&target, prefix)
            .await
            .map_err(io)?;
        let keys = HostKeys::for_target(&target, prefix);
        let (tx, lease) = watch::channel(Lease::Waiting);
        let ready: std::sync::Arc<std::sync::atomic::AtomicBool> = Default::default();
        let keeper = Keeper {
            beat,
            keys: keys.clone(),
            cfg: cfg.clone(),
            sup: sup.clone(),
            tx,
            ready: ready.clone(),
            metrics: None,
        };
        Ok(HostAgent {
            conn,
            keeper: Some(keeper),
            lease,
            routes,
            target,
            keys: keys.clone(),
            cfg,
            sup,
            local: HashMap::new(),
            work: JoinSet::new(),
            dirty: HashSet::new(),
            ready,
            metrics: None,
        })
    }

    /// Exports the host's lease and assignment metrics on `registry`.
    pub fn register_metrics(&mut self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        let m = HostMetrics::register(registry)?;
        if let Some(k) = &mut self.keeper {
            k.metrics = Some(m.clone());
        }
        self.metrics = Some(m);
        Ok(())
    }

    fn held(&self) -> bool {
        matches!(*self.lease.borrow(), Lease::Held(_))
    }

    fn id(&self) -> &str {
        &self.cfg.info.id
    }

    /// True while the host holds its lease: placed deployments can run here.
    pub fn ready_flag(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        self.ready.clone()
    }

    /// Runs until `stop`; then hands the deployments over (see [`HostAgent::handover`]).
    pub async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<RuntimeEvent>,
        mut stop: watch::Receiver<bool>,
    ) {
        let Some(keeper) = self.keeper.take() else {
            return;
        };
        let (keeper_stop_tx, keeper_stop) = watch::channel(false);
        let keeper = tokio::spawn(keeper.run(keeper_stop));
        let mut held_token: Option<String> = None;
        let nudged = std::sync::Arc::new(tokio::sync::Notify::new());
        let listener = tokio::spawn(listen(
            self.target.clone(),
            self.keys.nudge(self.id()),
            nudged.clone(),
        ));
        let mut beat = tokio::time::interval(self.cfg.lease / 4);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(Duration::from_millis(500));
        let mut logs = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = super::stopped(&mut stop) => break,
                changed = self.lease.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let now = self.lease.borrow_and_update().clone();
                    match now {
                        Lease::Held(token) => {
                            // A lease taken again while this loop was busy (the `Lost` in
                            // between was overwritten): the keeper stopped every process then.
                            if held_token.as_ref().is_some_and(|t| *t != token) {
                                self.forget_all().await;
                            }
                            held_token = Some(token);
                            self.reconcile().await;
                        }
                        Lease::Lost => {
                            held_token = None;
                            self.forget_all().await;
                        }
                        Lease::Waiting => {}
                    }
                }
                _ = beat.tick() => self.heartbeat().await,
                _ = sweep.tick() => self.reconcile().await,
                _ = nudged.notified() => self.reconcile().await,
                _ = logs.tick() => self.publish_logs().await,
                Some(ev) = events.recv() => self.runtime_event(ev).await,
                Some(done) = self.work.join_next() => {
                    if let Ok(done) = done {
                        self.finished(done).await;
                    }
                    self.reconcile().await;
                }
            }
        }
        listener.abort();
        // The keeper stops renewing first: the hand-over gives the lease up itself.
        keeper_stop_tx.send_replace(true);
        let _ = keeper.await;
        self.handover().await;
    }

    /// Every state now and then (idle times, CPU), not only the ones that changed.
    async fn heartbeat(&mut self) {
        if !self.held() {
            return;
        }
        let ids: Vec<String> = self.local.keys().cloned().collect();
        self.dirty.extend(ids);
        self.write_states().await;
    }

    /// The lease was lost and the keeper stopped every process: what ran here belongs to
    /// other hosts now. One still starting or stopping is stopped when that is done.
    async fn forget_all(&mut self) {
        let idle: Vec<String> = self
            .local
            .iter_mut()
            .filter_map(|(id, l)| {
                l.gen_id.clear();
                (!l.busy).then(|| id.clone())
            })
            .collect();
        // Started after the keeper looked: stopped here.
        let stops = idle.iter().map(|id| self.sup.remove(id, false));
        futures_util::future::join_all(stops).await;
        for id in idle {
            self.local.remove(&id);
        }
        self.dirty.clear();
    }

    /// Brings what runs here in line with the assignments: the generations are read every
    /// time (small), a spec only when its deployment is new here.
    async fn reconcile(&mut self) {
        if !self.held() {
            return;
        }
        let mut c = self.conn.clone();
        let want: HashMap<String, String> = match c.hgetall(self.keys.gens(self.id())).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "runtime host: assignments not read");
                return;
            }
        };
        // Started here, and no longer in the runtime (stopped when the lease was lost, say):
        // forgotten, so it is started again below.
        let vanished: Vec<String> = self
            .local
            .iter()
            .filter(|(id, l)| {
                !l.busy && matches!(l.started, Some(Ok(_))) && self.sup.status(id).is_none()
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in vanished {
            self.local.remove(&id);
        }
        // Gone, or placed again (a new generation): stop it, drained.
        for (id, l) in self.local.iter_mut() {
            if l.busy || want.get(id) == Some(&l.gen_id) {
                continue;
            }
            l.busy = true;
            let sup = self.sup.clone();
            let (id, gen_id) = (id.clone(), l.gen_id.clone());
            self.work.spawn(async move {
                let _ = sup.remove(&id, true).await;
                Done::Removed(id, gen_id)
            });
        }
        for (id, gen_id) in want {
            if self.local.contains_key(&id) {
                continue;
            }
            let json: Option<String> = match c.hget(self.keys.assign(self.id()), &id).await {
                Ok(j) => j,
                Err(e) => {
                    tracing::warn!(error = %e, "runtime host: an assignment not read");
                    continue;
                }
            };
            let a = match json.map(|j| serde_json::from_str::<Assignment>(&j)) {
                Some(Ok(a)) if a.gen_id == gen_id => a,
                // Changing under us: the next look sees it whole.
                Some(Ok(_)) | None => continue,
                Some(Err(e)) => {
                    // Written by a newer control service? Left alone, said loudly.
                    tracing::error!(deployment = %id, error = %e, "runtime host: an assignment that does not parse; not started");
                    continue;
                }
            };
            // A fresh process has fresh logs.
            let _ = c.del::<_, ()>(self.keys.logs(&id)).await;
            self.local.insert(
                id.clone(),
                Local {
                    gen_id: a.gen_id.clone(),
                    project: a.spec.project_id.clone(),
                    busy: true,
                    started: None,
                    next_log: 0,
                },
            );
            self.dirty.insert(id.clone());
            let sup = self.sup.clone();
            self.work.spawn(async move {
                let r = sup.start(a.spec).await;
                Done::Started(id, a.gen_id, r)
            });
        }
        if let Some(m) = &self.metrics {
            m.assigned.set(self.local.len() as i64);
        }
        self.write_states().await;
    }

    async fn finished(&mut self, done: Done) {
        match done {
            Done::Started(id, gen_id, r) => {
                if let Err(e) = &r {
                    tracing::warn!(deployment = %id, error = %e, "assigned deployment did not start");
                }
                match self.local.get_mut(&id) {
                    Some(l) if l.gen_id == gen_id => {
                        // Control learns of every start here, the first one included: a host
                        // that started its deployments again (a restart, a lost lease) has
                        // them on new ports, and their routes must follow.
                        // A start that failed is only recorded (the deploy waiting for it reads
                        // the state; a move's watcher and the route repair too): a failure event
                        // means "gave up after crashes".
                        let addr = r.as_ref().ok().map(|started| started.addr);
                        l.busy = false;
                        l.started = Some(r);
                        self.dirty.insert(id.clone());
                        self.write_states().await;
                        if addr.is_some() {
                            self.publish(&id, &gen_id, addr, None).await;
                        }
                        return;
                    }
                    // The lease was lost meanwhile: not ours to run any more.
                    _ => {
                        let sup = self.sup.clone();
                        let gen_id = self
                            .local
                            .get(&id)
                            .map(|l| l.gen_id.clone())
                            .unwrap_or_default();
                        self.work.spawn(async move {
                            let _ = sup.remove(&id, false).await;
                            Done::Removed(id, gen_id)
                        });
                    }
                }
                self.write_states().await;
            }
            Done::Removed(id, gen_id) => {
                if self
                    .local
                    .get(&id)
                    .is_some_and(|l| l.gen_id == gen_id || l.gen_id.is_empty())
                {
                    self.local.remove(&id);
                    let mut c = self.conn.clone();
                    let _ = c.hdel::<_, _, ()>(self.keys.state(self.id()), &id).await;
                }
            }
        }
    }

    fn state_of(&self, id: &str, l: &Local) -> HostedState {
        let status = self.sup.status(id);
        let last_active_ms = self.sup.idle_for(id).map_or(now_ms(), |idle| {
            now_ms().saturating_sub(idle.as_millis() as u64)
        });
        let (phase, failure) = match &l.started {
            None => (Phase::Starting, None),
            Some(Err(e)) => (Phase::Failed, Some(e.to_string())),
            Some(Ok(_)) => match &status {
                Some(s) => (s.phase, s.failure.clone()),
                None => (Phase::Stopped, None),
            },
        };
        HostedState {
            gen_id: l.gen_id.clone(),
            project_id: l.project.clone(),
            phase,
            addr: status.as_ref().and_then(|s| s.addr),
            pid: status.as_ref().and_then(|s| s.pid),
            restarts: status.as_ref().map_or(0, |s| s.restarts),
            cpu_limit_kills: status.as_ref().map_or(0, |s| s.cpu_limit_kills),
            failure,
            cold_start_ms: status.as_ref().and_then(|s| s.cold_start_ms),
            cpu_us_total: status.as_ref().map_or(0, |s| s.cpu_us_total),
            last_active_ms,
        }
    }

    async fn write_states(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        let ids: Vec<String> = self.dirty.drain().collect();
        let mut pipe = redis::pipe();
        for id in ids {
            let Some(l) = self.local.get(&id).filter(|l| !l.gen_id.is_empty()) else {
                continue;
            };
            let Ok(json) = serde_json::to_string(&self.state_of(&id, l)) else {
                continue;
            };
            pipe.hset(self.keys.state(&self.cfg.info.id), &id, json)
                .ignore();
        }
        let mut c = self.conn.clone();
        if let Err(e) = pipe.query_async::<()>(&mut c).await {
            tracing::warn!(error = %e, "runtime host: states not written");
        }
    }

    /// The supervisor's news (a restart, an idle stop, a wake-up, a give-up), for control.
    async fn runtime_event(&mut self, ev: RuntimeEvent) {
        let (id, addr, failed) = match ev {
            RuntimeEvent::Upstream {
                deployment_id,
                addr,
            } => (deployment_id, Some(addr), None),
            RuntimeEvent::Failed {
                deployment_id,
                reason,
            } => (deployment_id, None, Some(reason)),
        };
        let Some(l) = self.local.get(&id).filter(|l| !l.gen_id.is_empty()) else {
            return;
        };
        let gen_id = l.gen_id.clone();
        self.dirty.insert(id.clone());
        // The state first: control reads it when the event arrives.
        self.write_states().await;
        self.publish(&id, &gen_id, addr, failed).await;
    }

    /// Tells control (the instance applying host events) about `id`'s placement `gen_id`.
    async fn publish(
        &self,
        id: &str,
        gen_id: &str,
        addr: Option<std::net::SocketAddr>,
        failed: Option<String>,
    ) {
        let ev = HostEvent {
            host: self.id().to_owned(),
            deployment: id.to_owned(),
            gen_id: gen_id.to_owned(),
            addr,
            failed,
        };
        let Ok(json) = serde_json::to_string(&ev) else {
            return;
        };
        let mut c = self.conn.clone();
        if let Err(e) = tollgate_kv::publish(&mut c, &self.keys.events(), &json).await {
            tracing::warn!(error = %e, "runtime host: event not published");
        }
    }

    async fn publish_logs(&mut self) {
        let mut pipe = redis::pipe();
        let mut any = false;
        for (id, l) in self.local.iter_mut() {
            let Some((entries, _)) = self.sup.logs(id, l.next_log, 200) else {
                continue;
            };
            let wrote = !entries.is_empty();
            for e in entries {
                l.next_log = e.seq + 1;
                let Ok(json) = serde_json::to_string(&e) else {
                    continue;
                };
                pipe.cmd("XADD")
                    .arg(self.keys.logs(id))
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(self.cfg.log_entries)
                    .arg("*")
                    .arg("e")
                    .arg(json)
                    .ignore();
                any = true;
            }
            if wrote {
                // A removed deployment's stream does not stay forever.
                pipe.expire(self.keys.logs(id), LOG_TTL_SECONDS).ignore();
            }
        }
        if any {
            let mut c = self.conn.clone();
            if let Err(e) = pipe.query_async::<()>(&mut c).await {
                tracing::warn!(error = %e, "runtime host: logs not published");
            }
        }
    }

    /// A graceful stop: give up the lease so control moves every deployment now, keep serving
    /// until each runs elsewhere and no route points here (or `handover` passes), then stop
    /// them, drained.
    async fn handover(mut self) {
        self.ready
            .store(false, std::sync::atomic::Ordering::Release);
        if let Some(m) = &self.metrics {
            m.lease.set(0);
        }
        let mut c = self.conn.clone();
        let held = self.lease.borrow().clone();
        let mut leaving = None;
        if let Lease::Held(token) = held {
            // Kept (as `leaving:`, renewed below for a lease at a time) while this process
            // hands over and stops: a successor started with the same id meanwhile runs nothing
            // until this one is done, or gone (the mark then runs out within a lease).
            let counted = self.cfg.handover + Duration::from_secs(60);
            let resigned = redis::Script::new(RESIGN)
                .key(self.keys.alive(self.id()))
                .key(self.keys.leaving(self.id()))
                .arg(&token)
                .arg(self.cfg.lease.as_millis() as u64)
                .arg(counted.as_millis() as u64)
                .invoke_async::<i64>(&mut c)
                .await;
            leaving = Some(format!("leaving:{token}"));
            if let Err(e) = resigned {
                tracing::warn!(error = %e, "runtime host: lease not given up; its deployments move when it expires");
            }
        }
        let until = Instant::now() + self.cfg.handover;
        let ids: Vec<String> = self.local.keys().cloned().collect();
        let mine: HashSet<std::net::SocketAddr> = ids
            .iter()
            .filter_map(|id| self.sup.status(id).and_then(|s| s.addr))
            .collect();
        tracing::info!(host = %self.id(), deployments = ids.len(), "runtime host stopping: handing its deployments over");
        let wait = async {
            while !ids.is_empty() && Instant::now() < until {
                let deadline = tokio::time::Instant::from_std(until);
                match tokio::time::timeout_at(deadline, self.handed_over(&ids, &mine)).await {
                    Ok(Ok(true)) => break,
                    Ok(Ok(false)) | Err(_) => {}
                    // Asked again until the deadline: stopping early would drop requests.
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "runtime host: hand-over not observed yet");
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        self.while_marked(&leaving, wait).await;
        self.publish_logs().await;
        // Drained: the routes have moved, requests in flight finish.
        let stops = futures_util::future::join_all(ids.iter().map(|id| self.sup.remove(id, true)));
        self.while_marked(&leaving, stops).await;
        let _ = self
            .conn
            .clone()
            .del::<_, ()>(self.keys.state(self.id()))
            .await;
        if let Some(mark) = leaving {
            let _ = redis::Script::new(UNMARK)
                .key(self.keys.alive(self.id()))
                .arg(mark)
                .invoke_async::<i64>(&mut self.conn.clone())
                .await;
        }
        tracing::info!(host = %self.id(), "runtime host stopped");
    }

    /// Runs `work` with this host's `leaving:` mark (if any) renewed meanwhile.
    async fn while_marked<T>(
        &self,
        mark: &Option<String>,
        work: impl std::future::Future<Output = T>,
    ) {
        match mark {
            Some(mark) => {
                tokio::select! {
                    _ = work => {}
                    _ = self.keep_mark(mark) => {}
                }
            }
            None => {
                work.await;
            }
        }
    }

    /// Renews this host's `leaving:` mark (`mark`) every quarter lease while it is still ours;
    /// never returns while it is.
    async fn keep_mark(&self, mark: &str) {
        let mut c = self.conn.clone();
        loop {
            tokio::time::sleep(self.cfg.lease / 4).await;
            let renewed = redis::Script::new(RENEW)
                .key(self.keys.alive(self.id()))
                .arg(mark)
                .arg(self.cfg.lease.as_millis() as u64)
                .invoke_async::<i64>(&mut c)
                .await;
            if let Ok(0) = renewed {
                // Gone (expired while Redis was away): a successor may hold the id now.
                tracing::warn!(host = %self.id(), "runtime host: its hand-over mark ran out");
                std::future::pending::<()>().await;
            }
        }
    }

    /// Whether each of `ids` runs on another host (or was removed) and no route points at one
    /// of this host's addresses (`mine`) any more.
    async fn handed_over(
        &self,
        ids: &[String],
        mine: &HashSet<std::net::SocketAddr>,
    ) -> Result<bool, String> {
        let mut c = self.conn.clone();
        for id in ids {
            let Some(host): Option<String> = c.hget(self.keys.placed(), id).await.map_err(io)?
            else {
                continue;
            };
            if host == self.id() {
                return Ok(false);
            }
            let g: Option<String> = c.hget(self.keys.gens(&host), id).await.map_err(io)?;
            let s: Option<String> = c.hget(self.keys.state(&host), id).await.map_err(io)?;
            let (Some(g), Some(s)) = (
                g,
                s.and_then(|s| serde_json::from_str::<HostedState>(&s).ok()),
            ) else {
                return Ok(false);
            };
            if g != s.gen_id || !matches!(s.phase, Phase::Running | Phase::Idle) {
                return Ok(false);
            }
        }
        let routes = self.routes.load_all().await.map_err(io)?;
        Ok(!routes.iter().any(|(_, r)| {
            r.route
                .as_ref()
                .is_some_and(|r| r.upstreams.iter().any(|a| mine.contains(a)))
        }))
    }
}

/// Wakes the agent on each nudge; resubscribes on loss (the agent also looks every 500 ms).
async fn listen(target: Target, channel: String, nudged: std::sync::Arc<tokio::sync::Notify>) {
    loop {
        let session = async {
            let mut sub = target
                .subscribe(std::slice::from_ref(&channel), Timeouts::default())
                .await
                .map_err(io)?;
            nudged.notify_one();
            loop {
                if let Err(e) = sub.next().await {
                    return Err::<(), String>(io(e));
                }
                nudged.notify_one();
            }
        };
        if let Err(e) = session.await {
            tracing::warn!(error = %e, "runtime host: nudges lost; resubscribing");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
