//! Control's side of the runtime hosts: placing deployments, reading how they do, and moving the
//! deployments of a host whose lease expired.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::AsyncCommands;
use tokio::sync::{mpsc, watch};
use tollgate_kv::{Conn, Target, Timeouts};
use tollgate_runtime::{
    AppliedLimits, DeploymentSpec, DeploymentStatus, LogEntry, Phase, RuntimeError, RuntimeEvent,
    Started,
};

use super::metrics::PlacerMetrics;
use super::{Assignment, HostEvent, HostInfo, HostKeys, HostLoad, HostedState, place};
use crate::model::{new_id, now_ms};
use crate::runtime::Runtime;

#[derive(Debug, Clone)]
pub struct HostsRuntimeConfig {
    /// How long a start may take on its host (workerd's own readiness wait included).
    pub start_timeout: Duration,
    /// How often lost hosts are looked for.
    pub round: Duration,
}

impl Default for HostsRuntimeConfig {
    fn default() -> Self {
        HostsRuntimeConfig {
            start_timeout: Duration::from_secs(30),
            round: Duration::from_millis(250),
        }
    }
}

/// Places deployment `ARGV[1]` on host `ARGV[2]` (assignment `ARGV[3]`, generation `ARGV[6]`),
/// recording it in `placed` (KEYS[1]) and `project-host` (KEYS[2], field ARGV[4]); takes it off
/// the host it was on before, if another. `ARGV[5]`: the key base.
const PLACE: &str = r#"
local prev = redis.call('HGET', KEYS[1], ARGV[1])
if prev and prev ~= ARGV[2] then
  redis.call('HDEL', ARGV[5] .. 'assign:' .. prev, ARGV[1])
  redis.call('HDEL', ARGV[5] .. 'gens:' .. prev, ARGV[1])
  redis.call('PUBLISH', ARGV[5] .. 'nudge:' .. prev, '1')
end
redis.call('HSET', ARGV[5] .. 'assign:' .. ARGV[2], ARGV[1], ARGV[3])
redis.call('HSET', ARGV[5] .. 'gens:' .. ARGV[2], ARGV[1], ARGV[6])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[4], ARGV[2])
redis.call('PUBLISH', ARGV[5] .. 'nudge:' .. ARGV[2], '1')
return 1
"#;

/// Takes deployment `ARGV[1]` off wherever it is placed (`placed`: KEYS[1]); with `ARGV[3]`,
/// only if its generation there is still that one.
const UNPLACE: &str = r#"
local h = redis.call('HGET', KEYS[1], ARGV[1])
if not h then return 0 end
if ARGV[3] and redis.call('HGET', ARGV[2] .. 'gens:' .. h, ARGV[1]) ~= ARGV[3] then return 0 end
redis.call('HDEL', ARGV[2] .. 'assign:' .. h, ARGV[1])
redis.call('HDEL', ARGV[2] .. 'gens:' .. h, ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2] .. 'nudge:' .. h, '1')
return 1
"#;

/// Moves deployment `ARGV[1]` from lost host `ARGV[2]` to `ARGV[3]` (new assignment `ARGV[4]`,
/// generation `ARGV[7]`), only if it is still placed there under generation `ARGV[5]`: a
/// deploy or a delete that changed it meanwhile wins.
const MOVE: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if redis.call('HGET', ARGV[6] .. 'gens:' .. ARGV[2], ARGV[1]) ~= ARGV[5] then return 0 end
local spec = redis.call('HGET', ARGV[6] .. 'assign:' .. ARGV[2], ARGV[1])
if not spec then return 0 end
redis.call('HDEL', ARGV[6] .. 'assign:' .. ARGV[2], ARGV[1])
redis.call('HDEL', ARGV[6] .. 'gens:' .. ARGV[2], ARGV[1])
redis.call('HSET', ARGV[6] .. 'assign:' .. ARGV[3], ARGV[1], ARGV[4])
redis.call('HSET', ARGV[6] .. 'gens:' .. ARGV[3], ARGV[1], ARGV[7])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('PUBLISH', ARGV[6] .. 'nudge:' .. ARGV[3], '1')
return 1
"#;

/// Forgets host `ARGV[1]` if its lease is gone and nothing is assigned to it (one step: a host
/// that registers again meanwhile stays).
const FORGET: &str = r#"
local lease = redis.call('GET', ARGV[2] .. 'alive:' .. ARGV[1])
if lease and string.sub(lease, 1, 8) ~= 'leaving:' then return 0 end
if redis.call('HLEN', ARGV[2] .. 'gens:' .. ARGV[1]) > 0 then return 0 end
if redis.call('HLEN', ARGV[2] .. 'assign:' .. ARGV[1]) > 0 then return 0 end
redis.call('DEL', ARGV[2] .. 'state:' .. ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"#;

/// Takes (or keeps) the rescheduler's lease `KEYS[1]` for token `ARGV[1]`, `ARGV[2]` ms.
const LEAD: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"#;

/// Deployments on runtime hosts, as one [`Runtime`].
pub struct HostsRuntime {
    conn: Conn,
    /// The rescheduler's lease: its own connection, on the master's word (see
    /// `Conn::without_acks`), so it never queues behind a write waiting for a replica.
    lead: Conn,
    target: Target,
    keys: HostKeys,
    /// `{prefix:rt}:`: what the scripts prefix host ids with.
    base: String,
    cfg: HostsRuntimeConfig,
    /// This control instance, in the rescheduler's lease.
    instance: String,
    events: mpsc::UnboundedSender<RuntimeEvent>,
    metrics: std::sync::OnceLock<PlacerMetrics>,
    /// Lost hosts already counted in `tollgate_runtime_host_losses_total`.
    counted_lost: std::sync::Mutex<std::collections::HashSet<String>>,
    /// This instance holds the rescheduling lease: it alone applies the hosts' events, so
    /// instances never republish one deployment's route in turn.
    leading: std::sync::atomic::AtomicBool,
}

/// A lease value of a host at work (not one marked `leaving:` by a host handing over).
fn holds(lease: &str) -> bool {
    !lease.starts_with("leaving:")
}

fn io(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Io(format!("runtime hosts (redis): {e}"))
}

impl HostsRuntime {
    /// Connects; the runtime's events (a deployment's new address after a restart on its host
    /// or a move to another host, or its failure) arrive on the returned receiver once
    /// [`HostsRuntime::run`] runs.
    pub async fn connect(
        target: impl Into<Target>,
        prefix: &str,
        cfg: HostsRuntimeConfig,
    ) -> Result<(Arc<HostsRuntime>, mpsc::UnboundedReceiver<RuntimeEvent>), RuntimeError> {
        let target = target.into();
        let conn = target.connect().await.map_err(io)?;
        let lead = target.connect().await.map_err(io)?.without_acks();
        let (events, rx) = mpsc::unbounded_channel();
        let keys = HostKeys::for_target(&target, prefix);
        Ok((
            Arc::new(HostsRuntime {
                conn,
                lead,
                target,
                base: keys.base(),
                keys,
                cfg,
                instance: new_id("c"),
                events,
                metrics: std::sync::OnceLock::new(),
                counted_lost: Default::default(),
                leading: Default::default(),
            }),
            rx,
        ))
    }

    /// Exports the placement metrics on `registry` (once).
    pub fn register_metrics(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        let m = PlacerMetrics::register(registry)?;
        let _ = self.metrics.set(m);
        Ok(())
    }

    /// Until `stop`: forwards the hosts' events and runs the rescheduling rounds (one control
    /// instance at a time, by lease).
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let follow = self.clone().follow_events();
        let rounds = async {
            let mut tick = tokio::time::interval(self.cfg.round);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = self.round().await {
                    tracing::warn!(error = %e, "runtime hosts: rescheduling round failed");
                }
            }
        };
        tokio::select! {
            _ = follow => {}
            _ = rounds => {}
            _ = super::stopped(&mut stop) => {}
        }
    }

    /// Live hosts with their load.
    pub async fn live_hosts(&self) -> Result<Vec<HostLoad>, RuntimeError> {
        let mut c = self.conn.clone();
        let all: std::collections::HashMap<String, String> =
            c.hgetall(self.keys.hosts()).await.map_err(io)?;
        let mut out = Vec::new();
        for (id, json) in all {
            let Ok(info) = serde_json::from_str::<HostInfo>(&json) else {
                tracing::warn!(host = %id, "runtime host record that does not parse; skipped");
                continue;
            };
            let (lease, assigned): (Option<String>, u32) = redis::pipe()
                .get(self.keys.alive(&id))
                .hlen(self.keys.assign(&id))
                .query_async(&mut c)
                .await
                .map_err(io)?;
            if lease.as_deref().is_some_and(holds) {
                out.push(HostLoad { info, assigned });
            }
        }
        out.sort_by(|a, b| a.info.id.cmp(&b.info.id));
        Ok(out)
    }

    /// Where `deployment` is placed now, and the generation of that placement.
    async fn placement(&self, deployment: &str) -> Result<Option<(String, String)>, RuntimeError> {
        let mut c = self.conn.clone();
        let Some(host): Option<String> =
            c.hget(self.keys.placed(), deployment).await.map_err(io)?
        else {
            return Ok(None);
        };
        let gen_id: Option<String> = c
            .hget(self.keys.gens(&host), deployment)
            .await
            .map_err(io)?;
        Ok(gen_id.map(|g| (host, g)))
    }

    /// The assignment itself (the spec: large).
    async fn assignment(
        &self,
        host: &str,
        deployment: &str,
    ) -> Result<Option<Assignment>, RuntimeError> {
        let mut c = self.conn.clone();
        let json: Option<String> = c
            .hget(self.keys.assign(host), deployment)
            .await
            .map_err(io)?;
        Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
    }

    async fn hosted(
        &self,
        host: &str,
        deployment: &str,
    ) -> Result<Option<HostedState>, RuntimeError> {
        let mut c = self.conn.clone();
        let json: Option<String> = c
            .hget(self.keys.state(host), deployment)
            .await
            .map_err(io)?;
        Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
    }

    /// Whether `host` holds its lease (one handing over does not: it takes no work and its
    /// deployments move).
    async fn alive(&self, host: &str) -> Result<bool, RuntimeError> {
        let mut c = self.conn.clone();
        let lease: Option<String> = c.get(self.keys.alive(host)).await.map_err(io)?;
        Ok(lease.as_deref().is_some_and(holds))
    }

    /// The current placement's state, if its host reported on this generation.
    async fn current(
        &self,
        deployment: &str,
    ) -> Result<Option<(String, HostedState)>, RuntimeError> {
        let Some((host, gen_id)) = self.placement(deployment).await? else {
            return Ok(None);
        };
        Ok(self
            .hosted(&host, deployment)
            .await?
            .filter(|s| s.gen_id == gen_id)
            .map(|s| (host, s)))
    }

    /// Waits until `deployment` runs under `gen_id` on `host`, polling every `poll`. When that
    /// host goes (lost, or handing over), it follows the placement to where it was moved.
    async fn wait_running(
        &self,
        host: &str,
        deployment: &str,
        gen_id: &str,
        deadline: Instant,
        poll: Duration,
    ) -> Result<HostedState, RuntimeError> {
        let (mut host, mut gen_id) = (host.to_owned(), gen_id.to_owned());
        let mut checked_alive = Instant::now();
        loop {
            if let Some(s) = self.hosted(&host, deployment).await?
                && s.gen_id == gen_id
            {
                match (s.phase, s.addr) {
                    (Phase::Running | Phase::Idle, Some(_)) => return Ok(s),
                    (Phase::Failed, _) => {
                        return Err(RuntimeError::StartFailed(
                            s.failure
                                .unwrap_or_else(|| "failed on its runtime host".into()),
                        ));
                    }
                    _ => {}
                }
            }
            if Instant::now() >= deadline {
                return Err(RuntimeError::StartFailed(format!(
                    "runtime host {host} did not start it within {} s",
                    self.cfg.start_timeout.as_secs()
                )));
            }
            if checked_alive.elapsed() >= Duration::from_millis(500) {
                checked_alive = Instant::now();
                if !self.alive(&host).await? {
                    match self.placement(deployment).await? {
                        Some((h, g)) if h != host => (host, gen_id) = (h, g),
                        _ => {
                            // Not moved yet: the rescheduler moves it within a round.
                        }
                    }
                    if self.placement(deployment).await?.is_none() {
                        return Err(RuntimeError::StartFailed(format!(
                            "runtime host {host} was lost while starting it"
                        )));
                    }
                }
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Places `spec` on a host with room (the project's last host first) under a new generation.
    async fn place_new(&self, spec: DeploymentSpec) -> Result<(String, String), RuntimeError> {
        let mut c = self.conn.clone();
        let prefer: Option<String> = c
            .hget(self.keys.project_host(), &spec.project_id)
            .await
            .map_err(io)?;
        let hosts = self.live_hosts().await?;
        let placed = place(&hosts, prefer.as_deref(), &[]).map(str::to_owned);
        if let Some(m) = self.metrics.get() {
            let result = if placed.is_some() {
                "placed"
            } else {
                "no_room"
            };
            m.placements.with_label_values(&[result]).inc();
        }
        let Some(host) = placed else {
            return Err(RuntimeError::StartFailed(if hosts.is_empty() {
                "no runtime host is up (start `tollgate runtime` on a host)".into()
            } else {
                format!("all {} runtime hosts are full", hosts.len())
            }));
        };
        let gen_id = new_id("g");
        let json = serde_json::to_string(&Assignment {
            gen_id: gen_id.clone(),
            spec: spec.clone(),
        })
        .map_err(io)?;
        let _: i64 = self
            .conn
            .script(PLACE)
            .key(self.keys.placed())
            .key(self.keys.project_host())
            .arg(&spec.deployment_id)
            .arg(&host)
            .arg(json)
            .arg(&spec.project_id)
            .arg(&self.base)
            .arg(&gen_id)
            .invoke_async(&mut c)
            .await
            .map_err(io)?;
        tracing::info!(deployment = %spec.deployment_id, host = %host, "placed on a runtime host");
        Ok((host, gen_id))
    }

    /// Takes `deployment` off its host; with `only_gen`, only that placement of it.
    async fn unplace(&self, deployment: &str, only_gen: Option<&str>) -> Result<(), RuntimeError> {
        let mut c = self.conn.clone();
        let script = self.conn.script(UNPLACE);
        let mut inv = script.key(self.keys.placed());
        inv.arg(deployment).arg(&self.base);
        if let Some(g) = only_gen {
            inv.arg(g);
        }
        let removed: i64 = inv.invoke_async(&mut c).await.map_err(io)?;
        if removed == 1 {
            // Its logs go with it (a host still draining it may add a few lines; they expire).
            if let Err(e) = c.del::<_, ()>(self.keys.logs(deployment)).await {
                tracing::warn!(deployment, error = %e, "logs of a removed deployment not deleted; they expire");
            }
        }
        Ok(())
    }

    /// The hosts' events about current placements, as runtime events. Resubscribes on loss.
    async fn follow_events(self: Arc<Self>) {
        loop {
            let session = async {
                let mut sub = self
                    .target
                    .subscribe(&[self.keys.events()], Timeouts::default())
                    .await
                    .map_err(io)?;
                loop {
                    let payload = sub.next().await.map_err(io)?;
                    let Ok(ev) = serde_json::from_slice::<HostEvent>(&payload) else {
                        tracing::warn!("runtime host event that does not parse");
                        continue;
                    };
                    // One instance applies them (the others would republish in turn).
                    if !self.leading.load(std::sync::atomic::Ordering::Acquire) {
                        continue;
                    }
                    // Only about the current placement: a host that lost its lease may still
                    // report on what it ran. The address is the event's: it leads the state
                    // (an idle stop publishes its activator before the process stops).
                    match self.placement(&ev.deployment).await {
                        Ok(Some((host, g))) if host == ev.host && g == ev.gen_id => {}
                        _ => continue,
                    }
                    let ev = match (ev.addr, ev.failed) {
                        (_, Some(reason)) => RuntimeEvent::Failed {
                            deployment_id: ev.deployment,
                            reason,
                        },
                        (Some(addr), None) => RuntimeEvent::Upstream {
                            deployment_id: ev.deployment,
                            addr,
                        },
                        (None, None) => continue,
                    };
                    if self.events.send(ev).is_err() {
                        return Ok::<(), RuntimeError>(());
                    }
                }
            };
            if let Err(e) = session.await {
                tracing::warn!(error = %e, "runtime host events lost; resubscribing");
            } else {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// One rescheduling round, if this instance holds the lease: every deployment of a host
    /// whose lease expired goes to a live host (its route follows once it runs there, watched
    /// outside the round); once a lost host has none left, its records go.
    pub async fn round(self: &Arc<Self>) -> Result<(), RuntimeError> {
        let mut c = self.conn.clone();
        let lead: i64 = self
            .conn
            .script(LEAD)
            .key(self.keys.rescheduler())
            .arg(&self.instance)
            .arg(self.cfg.round.as_millis().max(1) as u64 * 4)
            .invoke_async(&mut self.lead.clone())
            .await
            .map_err(io)?;
        self.leading
            .store(lead == 1, std::sync::atomic::Ordering::Release);
        if lead != 1 {
            if let Some(m) = self.metrics.get() {
                m.hosts.set(0);
            }
            return Ok(());
        }
        let all: Vec<String> = c.hkeys(self.keys.hosts()).await.map_err(io)?;
        let mut live = 0;
        for host in all {
            if self.alive(&host).await? {
                live += 1;
                self.counted_lost
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&host);
                continue;
            }
            let gens: std::collections::HashMap<String, String> =
                c.hgetall(self.keys.gens(&host)).await.map_err(io)?;
            if gens.is_empty() {
                let forgot: i64 = self
                    .conn
                    .script(FORGET)
                    .key(self.keys.hosts())
                    .arg(&host)
                    .arg(&self.base)
                    .invoke_async(&mut c)
                    .await
                    .map_err(io)?;
                if forgot == 1 {
                    tracing::info!(host = %host, "runtime host gone; deregistered");
                    self.counted_lost
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&host);
                }
                continue;
            }
            let handing_over: bool = c.exists(self.keys.leaving(&host)).await.map_err(io)?;
            let first_seen = self
                .counted_lost
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(host.clone());
            if first_seen {
                if handing_over {
                    tracing::info!(host = %host, deployments = gens.len(), "runtime host stopping: moving its deployments");
                } else {
                    tracing::warn!(host = %host, deployments = gens.len(), "runtime host lost: moving its deployments");
                    if let Some(m) = self.metrics.get() {
                        m.lost.inc();
                    }
                }
            }
            let mut loads = self.live_hosts().await?;
            for (deployment, old_gen) in gens {
                let Some(to) = place(&loads, None, &[host.as_str()]).map(str::to_owned) else {
                    if let Some(m) = self.metrics.get() {
                        m.moves.with_label_values(&["no_room"]).inc();
                    }
                    if first_seen {
                        tracing::error!(host = %host, deployment = %deployment, "no runtime host has room for a lost host's deployments; retrying every round");
                    }
                    break;
                };
                let Some(a) = self.assignment(&host, &deployment).await? else {
                    continue;
                };
                let gen_id = new_id("g");
                let moved = serde_json::to_string(&Assignment {
                    gen_id: gen_id.clone(),
                    spec: a.spec,
                })
                .map_err(io)?;
                let done: i64 = self
                    .conn
                    .script(MOVE)
                    .key(self.keys.placed())
                    .arg(&deployment)
                    .arg(&host)
                    .arg(&to)
                    .arg(moved)
                    .arg(&old_gen)
                    .arg(&self.base)
                    .arg(&gen_id)
                    .invoke_async(&mut c)
                    .await
                    .map_err(io)?;
                if done != 1 {
                    continue;
                }
                if let Some(l) = loads.iter_mut().find(|l| l.info.id == to) {
                    l.assigned += 1;
                }
                tracing::info!(deployment = %deployment, from = %host, to = %to, "deployment moved off a lost runtime host");
                // Its route follows once it runs there; watched apart, so a slow start never
                // holds up the rounds (nor outlives the lease inside one).
                let this = self.clone();
                tokio::spawn(async move {
                    let deadline = Instant::now() + this.cfg.start_timeout;
                    // One watcher per moved deployment: a slow poll, hundreds may run at once.
                    match this
                        .wait_running(
                            &to,
                            &deployment,
                            &gen_id,
                            deadline,
                            Duration::from_millis(250),
                        )
                        .await
                    {
                        Ok(HostedState {
                            addr: Some(addr), ..
                        }) => {
                            if let Some(m) = this.metrics.get() {
                                m.moves.with_label_values(&["running"]).inc();
                            }
                            let _ = this.events.send(RuntimeEvent::Upstream {
                                deployment_id: deployment,
                                addr,
                            });
                        }
                        Ok(_) => {}
                        Err(e) => {
                            if let Some(m) = this.metrics.get() {
                                m.moves.with_label_values(&["failed"]).inc();
                            }
                            tracing::error!(deployment = %deployment, host = %to, error = %e, "moved deployment did not start; the route repair retries it");
                        }
                    }
                });
            }
        }
        if let Some(m) = self.metrics.get() {
            m.hosts.set(live);
        }
        Ok(())
    }
}

fn status_of(deployment: &str, project: &str, s: HostedState) -> DeploymentStatus {
    DeploymentStatus {
        deployment_id: deployment.to_owned(),
        project_id: project.to_owned(),
        phase: s.phase,
        addr: s.addr,
        pid: s.pid,
        restarts: s.restarts,
        cpu_limit_kills: s.cpu_limit_kills,
        last_exit: None,
        failure: s.failure,
        cold_start_ms: s.cold_start_ms,
        cpu_us_total: s.cpu_us_total,
        limits: AppliedLimits::default(),
    }
}

#[async_trait]
impl Runtime for HostsRuntime {
    async fn start(&self, spec: DeploymentSpec) -> Result<Started, RuntimeError> {
        let deployment = spec.deployment_id.clone();
        let deadline = Instant::now() + self.cfg.start_timeout;
        // Placed already on a live host and not failed there: where it runs (recovery after a
        // control restart finds its deployments still serving).
        let existing = match self.placement(&deployment).await? {
            Some((host, gen_id)) if self.alive(&host).await? => {
                let failed = self
                    .hosted(&host, &deployment)
                    .await?
                    .is_some_and(|s| s.gen_id == gen_id && s.phase == Phase::Failed);
                (!failed).then_some((host, gen_id))
            }
            _ => None,
        };
        let placed_now = existing.is_none();
        let (host, gen_id) = match existing {
            Some(p) => p,
            None => self.place_new(spec).await?,
        };
        match self
            .wait_running(
                &host,
                &deployment,
                &gen_id,
                deadline,
                Duration::from_millis(10),
            )
            .await
        {
            Ok(s) => Ok(Started {
                addr: s.addr.ok_or_else(|| io("running without an address"))?,
                pid: s.pid.unwrap_or(0),
                cold_start_ms: s.cold_start_ms.unwrap_or(0),
                limits: AppliedLimits::default(),
            }),
            Err(e) => {
                // A start that failed keeps nothing (as the in-process runtime), but only the
                // placement made here: one found running is left to its host.
                if placed_now && let Err(u) = self.unplace(&deployment, Some(&gen_id)).await {
                    tracing::error!(deployment = %deployment, error = %u, "failed start not taken off its host");
                }
                Err(e)
            }
        }
    }

    async fn stop(&self, deployment_id: &str, _drain: bool) -> Result<(), RuntimeError> {
        // A host always drains what it stops (routes have moved by then, or are gone).
        self.unplace(deployment_id, None).await
    }

    async fn remove(&self, deployment_id: &str, _drain: bool) -> Result<(), RuntimeError> {
        self.unplace(deployment_id, None).await
    }

    async fn status(&self, deployment_id: &str) -> Option<DeploymentStatus> {
        let (_, s) = self.current(deployment_id).await.ok()??;
        let project = s.project_id.clone();
        Some(status_of(deployment_id, &project, s))
    }

    async fn idle_for(&self, deployment_id: &str) -> Option<Duration> {
        let (_, s) = self.current(deployment_id).await.ok()??;
        Some(Duration::from_millis(
            now_ms().saturating_sub(s.last_active_ms),
        ))
    }

    async fn placed(&self) -> Vec<String> {
        let mut c = self.conn.clone();
        match c.hkeys(self.keys.placed()).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "runtime hosts: placements not read");
                Vec::new()
            }
        }
    }

    async fn logs(&self, deployment_id: &str, since: u64, limit: usize) -> Option<Vec<LogEntry>> {
        let mut c = self.conn.clone();
        let reply: redis::streams::StreamRangeReply =
            c.xrange_all(self.keys.logs(deployment_id)).await.ok()?;
        Some(
            reply
                .ids
                .iter()
                .filter_map(|id| id.get::<String>("e"))
                .filter_map(|e| serde_json::from_str::<LogEntry>(&e).ok())
                .filter(|e| e.seq >= since)
                .take(limit)
                .collect(),
        )
    }
}
