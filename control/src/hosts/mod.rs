//! Runtime hosts: tenant workerd processes on machines other than the control service's, met
//! through Redis only (docs/scale-out.md).
//!
//! - A host (`tollgate runtime`) registers itself in `rt:hosts` with its capacity and keeps a
//!   lease, `rt:alive:<host>` (a token with a TTL), alive with a heartbeat. It runs what
//!   `rt:assign:<host>` lists and writes how each one is doing to `rt:state:<host>`.
//! - Control ([`HostsRuntime`]) places a deployment on a host (`rt:assign:<host>`, indexed by
//!   `rt:placed`), waits for the host to report it running, and publishes the route. When a
//!   host's lease expires it moves the host's deployments to other hosts and republishes their
//!   routes.
//! - Each placement carries a fresh generation (`gen`). A host reports the generation it
//!   started, so a report from a host that lost its lease, or about an earlier placement of the
//!   same deployment, is never taken for the current one.

mod agent;
mod metrics;
mod placer;

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};
use tollgate_runtime::{DeploymentSpec, Phase};

pub use agent::{HostAgent, HostAgentConfig};
pub use placer::{HostsRuntime, HostsRuntimeConfig};

/// Resolves once `stop` is set (its guard is not held: the futures stay `Send`).
pub(crate) async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The Redis keys of the runtime hosts, under the deployment's key prefix.
#[derive(Debug, Clone)]
pub struct HostKeys {
    /// `{prefix:rt}`: one hash tag, so the scripts' keys share a slot in a Redis Cluster.
    p: String,
    prefix: String,
}

impl HostKeys {
    /// On one Redis, under the deployment's `prefix`.
    pub fn new(prefix: &str) -> Self {
        HostKeys {
            p: format!("{{{prefix}:rt}}"),
            prefix: prefix.to_owned(),
        }
    }

    /// Where `target` keeps them: on a cluster under the hash tag every other control key
    /// shares (`{tollgate}:rt:…`).
    pub fn for_target(target: &tollgate_kv::Target, prefix: &str) -> Self {
        match target {
            tollgate_kv::Target::One(_) => HostKeys::new(prefix),
            tollgate_kv::Target::Cluster { .. } => {
                let tagged = target.family_prefix(prefix);
                HostKeys {
                    p: format!("{tagged}:rt"),
                    prefix: tagged,
                }
            }
        }
    }
    /// What the scripts put before `assign:<host>` and `nudge:<host>`.
    pub fn base(&self) -> String {
        format!("{}:", self.p)
    }
    /// Hash: host id → [`HostInfo`].
    pub fn hosts(&self) -> String {
        format!("{}:hosts", self.p)
    }
    /// String with a TTL: the host's lease (its current token).
    pub fn alive(&self, host: &str) -> String {
        format!("{}:alive:{host}", self.p)
    }
    /// Hash: deployment id → [`Assignment`] (what the host must run).
    pub fn assign(&self, host: &str) -> String {
        format!("{}:assign:{host}", self.p)
    }
    /// Hash: deployment id → the generation of its placement on the host (what a host's
    /// reconcile and control's checks read; the spec stays in `assign`).
    pub fn gens(&self, host: &str) -> String {
        format!("{}:gens:{host}", self.p)
    }
    /// String with a TTL: the host gave its lease up to hand over (a SIGTERM), not lost.
    pub fn leaving(&self, host: &str) -> String {
        format!("{}:leaving:{host}", self.p)
    }
    /// Hash: deployment id → [`HostedState`] (what the host runs).
    pub fn state(&self, host: &str) -> String {
        format!("{}:state:{host}", self.p)
    }
    /// Hash: deployment id → host id.
    pub fn placed(&self) -> String {
        format!("{}:placed", self.p)
    }
    /// Hash: project id → the host its latest deployment was placed on.
    pub fn project_host(&self) -> String {
        format!("{}:project-host", self.p)
    }
    /// Channel: "look at your assignments again".
    pub fn nudge(&self, host: &str) -> String {
        format!("{}:nudge:{host}", self.p)
    }
    /// Channel: [`HostEvent`]s (a process restarted elsewhere on its host, or gave up).
    pub fn events(&self) -> String {
        format!("{}:events", self.p)
    }
    /// Stream: the deployment's log entries (field `e`, a JSON `LogEntry`); outside the hash
    /// tag, as no script touches it.
    pub fn logs(&self, deployment: &str) -> String {
        format!("{}:rt-logs:{deployment}", self.prefix)
    }
    /// String with a TTL: which control instance runs the rescheduling rounds.
    pub fn rescheduler(&self) -> String {
        format!("{}:rescheduler", self.p)
    }
}

/// What a host offers, registered at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub id: String,
    /// Where its processes listen (routes point proxies here).
    pub ip: IpAddr,
    /// Most deployments it runs at once.
    pub processes: u32,
    /// Memory it gives deployments, in bytes.
    pub memory_bytes: u64,
    /// Memory reserved per deployment when placing, in bytes.
    pub per_deployment_bytes: u64,
    pub cpus: u32,
    pub started_ms: u64,
    pub version: String,
}

impl HostInfo {
    /// How many deployments fit.
    pub fn slots(&self) -> u32 {
        let by_memory = self
            .memory_bytes
            .checked_div(self.per_deployment_bytes)
            .unwrap_or(u64::MAX);
        self.processes
            .min(by_memory.min(u64::from(u32::MAX)) as u32)
    }
}

/// One placement: what to run and its generation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Assignment {
    pub gen_id: String,
    pub spec: DeploymentSpec,
}

/// How a placed deployment is doing on its host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostedState {
    pub gen_id: String,
    /// The deployment's project (so a status needs no spec read).
    #[serde(default)]
    pub project_id: String,
    pub phase: Phase,
    pub addr: Option<SocketAddr>,
    pub pid: Option<u32>,
    pub restarts: u32,
    pub cpu_limit_kills: u32,
    pub failure: Option<String>,
    pub cold_start_ms: Option<u64>,
    pub cpu_us_total: u64,
    /// Wall clock (ms since the epoch) of its last request or CPU use, on the host's clock.
    pub last_active_ms: u64,
}

/// A host's news about one placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostEvent {
    pub host: String,
    pub deployment: String,
    pub gen_id: String,
    /// Its new address (restart, idle stop, wake-up).
    pub addr: Option<SocketAddr>,
    /// It gave up restarting.
    pub failed: Option<String>,
}

/// A live host with its current load, as placement sees it.
#[derive(Debug, Clone)]
pub struct HostLoad {
    pub info: HostInfo,
    pub assigned: u32,
}

/// Where a new deployment goes: the `prefer`red host (the one running the project's previous
/// version: its redeploy overlaps there, and a project stays on one host) when it has room,
/// else the host with the most room left in proportion to its size (ties: the first id), never
/// one in `exclude`. `None`: no host has room.
pub fn place<'a>(hosts: &'a [HostLoad], prefer: Option<&str>, exclude: &[&str]) -> Option<&'a str> {
    let fits =
        |h: &&HostLoad| h.assigned < h.info.slots() && !exclude.contains(&h.info.id.as_str());
    if let Some(p) = prefer
        && let Some(h) = hosts.iter().filter(fits).find(|h| h.info.id == p)
    {
        return Some(&h.info.id);
    }
    hosts
        .iter()
        .filter(fits)
        .min_by(|a, b| {
            // a.assigned / a.slots < b.assigned / b.slots, without division.
            let l = u64::from(a.assigned) * u64::from(b.info.slots());
            let r = u64::from(b.assigned) * u64::from(a.info.slots());
            l.cmp(&r).then_with(|| a.info.id.cmp(&b.info.id))
        })
        .map(|h| h.info.id.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, processes: u32, assigned: u32) -> HostLoad {
        HostLoad {
            info: HostInfo {
                id: id.into(),
                ip: IpAddr::from([127, 0, 0, 1]),
                processes,
                memory_bytes: 1 << 40,
                per_deployment_bytes: 64 << 20,
                cpus: 2,
                started_ms: 0,
                version: "t".into(),
            },
            assigned,
        }
    }

    #[test]
    fn placement_spreads_keeps_a_project_together_and_respects_capacity() {
        let hosts = [host("a", 10, 5), host("b", 10, 2), host("c", 100, 30)];
        // The most room in proportion: b (20 % used) over c (30 %) and a (50 %).
        assert_eq!(place(&hosts, None, &[]), Some("b"));
        // The previous version's host wins while it has room...
        assert_eq!(place(&hosts, Some("a"), &[]), Some("a"));
        // ...not once it is full, nor when it is excluded (lost).
        let full = [host("a", 5, 5), host("b", 10, 9)];
        assert_eq!(place(&full, Some("a"), &[]), Some("b"));
        assert_eq!(place(&hosts, Some("b"), &["b"]), Some("c"));
        // Nowhere to go.
        assert_eq!(place(&[host("a", 1, 1)], None, &[]), None);
        assert_eq!(place(&[], None, &[]), None);
    }

    #[test]
    fn memory_caps_the_slots() {
        let mut h = host("a", 1000, 0);
        h.info.memory_bytes = 640 << 20;
        assert_eq!(h.info.slots(), 10);
        h.info.per_deployment_bytes = 0;
        assert_eq!(h.info.slots(), 1000);
    }
}
