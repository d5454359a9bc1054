//! The runtime hosts as SREs see them (docs/metrics.md): from the control service, the live
//! hosts, hosts lost, deployments moved off them and placements by result; from a host, its
//! lease and its assignments. No host or deployment id in any label.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Exported by `tollgate control` with `control.runtime = "hosts"`.
#[derive(Clone)]
pub(crate) struct PlacerMetrics {
    pub(crate) hosts: IntGauge,
    pub(crate) lost: IntCounter,
    pub(crate) moves: IntCounterVec,
    pub(crate) placements: IntCounterVec,
}

impl PlacerMetrics {
    pub(crate) fn register(registry: &Registry) -> prometheus::Result<PlacerMetrics> {
        let hosts = IntGauge::new(
            "tollgate_runtime_hosts",
            "Runtime hosts holding their lease (seen by the control instance running the rescheduling rounds; 0 on the others)",
        )?;
        let lost = IntCounter::new(
            "tollgate_runtime_host_losses_total",
            "Runtime hosts whose lease expired with deployments on them (killed, crashed, cut off): their deployments were moved",
        )?;
        let moves = IntCounterVec::new(
            Opts::new(
                "tollgate_runtime_moves_total",
                "Deployments moved off a lost runtime host, by result: running (on its new host, route republished), failed (did not start there), no_room (no live host had room; retried every round)",
            ),
            &["result"],
        )?;
        for r in ["running", "failed", "no_room"] {
            moves.with_label_values(&[r]);
        }
        let placements = IntCounterVec::new(
            Opts::new(
                "tollgate_runtime_placements_total",
                "Deployments placed on a runtime host for a deploy, rollback, resume or recovery, by result: placed, no_room (every live host full, or none up: the start fails)",
            ),
            &["result"],
        )?;
        for r in ["placed", "no_room"] {
            placements.with_label_values(&[r]);
        }
        registry.register(Box::new(hosts.clone()))?;
        registry.register(Box::new(lost.clone()))?;
        registry.register(Box::new(moves.clone()))?;
        registry.register(Box::new(placements.clone()))?;
        Ok(PlacerMetrics {
            hosts,
            lost,
            moves,
            placements,
        })
    }
}

/// Exported by `tollgate runtime`.
#[derive(Clone)]
pub(crate) struct HostMetrics {
    pub(crate) lease: IntGauge,
    pub(crate) assigned: IntGauge,
    pub(crate) lease_losses: IntCounter,
}

impl HostMetrics {
    pub(crate) fn register(registry: &Registry) -> prometheus::Result<HostMetrics> {
        let lease = IntGauge::new(
            "tollgate_runtime_host_lease",
            "1 while this runtime host holds its lease (control may place deployments on it), else 0",
        )?;
        let assigned = IntGauge::new(
            "tollgate_runtime_host_deployments",
            "Deployments placed on this runtime host (running, starting or stopping)",
        )?;
        let lease_losses = IntCounter::new(
            "tollgate_runtime_host_lease_losses_total",
            "Times this host found its lease taken (a pause or partition longer than host.lease_ms) and stopped everything it ran",
        )?;
        registry.register(Box::new(lease.clone()))?;
        registry.register(Box::new(assigned.clone()))?;
        registry.register(Box::new(lease_losses.clone()))?;
        Ok(HostMetrics {
            lease,
            assigned,
            lease_losses,
        })
    }
}
