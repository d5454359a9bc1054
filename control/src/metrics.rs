//! Deploys and projects as SREs see them (docs/metrics.md): deploys and rollbacks by result,
//! deploy duration, projects ended by reason and projects by state; no project in any label.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::model::ProjectStatus;

#[derive(Clone)]
pub(crate) struct ControlMetrics {
    deploys: IntCounterVec,
    duration: Histogram,
    rollbacks: IntCounterVec,
    ended: IntCounterVec,
    projects: IntGaugeVec,
}

/// The label of a project state.
fn state(s: ProjectStatus) -> &'static str {
    match s {
        ProjectStatus::Active => "active",
        ProjectStatus::Suspended => "suspended",
        ProjectStatus::Expired => "expired",
        ProjectStatus::Deleted => "deleted",
    }
}

impl ControlMetrics {
    pub(crate) fn register(registry: &Registry) -> prometheus::Result<ControlMetrics> {
        let deploys = IntCounterVec::new(
            Opts::new(
                "tollgate_deploys_total",
                "Deploys by result: live, failed (went through the pipeline and did not go live: the code crashed at start, or a platform fault), refused (rejected before anything ran: bad input, a bundle error, not the owner)",
            ),
            &["result"],
        )?;
        for r in ["live", "failed", "refused"] {
            deploys.with_label_values(&[r]);
        }
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "tollgate_deploy_duration_seconds",
                "A deploy from the request to live or failed (validate, bundle, start, publish)",
            )
            .buckets(vec![0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0]),
        )?;
        let rollbacks = IntCounterVec::new(
            Opts::new(
                "tollgate_rollbacks_total",
                "Rollbacks (an earlier deployment's code run again as a new deployment) by result: live, failed, refused",
            ),
            &["result"],
        )?;
        let ended = IntCounterVec::new(
            Opts::new(
                "tollgate_projects_ended_total",
                "Projects torn down, by reason: deleted (by their owner or an operator), expired (unused for the inactivity TTL)",
            ),
            &["reason"],
        )?;
        let projects = IntGaugeVec::new(
            Opts::new(
                "tollgate_projects",
                "Projects by state (active, suspended, expired, deleted), as of the last cleanup sweep",
            ),
            &["state"],
        )?;
        for r in ["live", "failed", "refused"] {
            rollbacks.with_label_values(&[r]);
        }
        for r in ["deleted", "expired"] {
            ended.with_label_values(&[r]);
        }
        for s in ["active", "suspended", "expired", "deleted"] {
            projects.with_label_values(&[s]);
        }
        registry.register(Box::new(deploys.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(rollbacks.clone()))?;
        registry.register(Box::new(ended.clone()))?;
        registry.register(Box::new(projects.clone()))?;
        Ok(ControlMetrics {
            deploys,
            duration,
            rollbacks,
            ended,
            projects,
        })
    }

    pub(crate) fn rollback(&self, result: &'static str) {
        self.rollbacks.with_label_values(&[result]).inc();
    }

    pub(crate) fn ended(&self, status: ProjectStatus) {
        if matches!(status, ProjectStatus::Deleted | ProjectStatus::Expired) {
            self.ended.with_label_values(&[state(status)]).inc();
        }
    }

    /// Sets the gauge from a full count of the store's projects.
    pub(crate) fn project_states(&self, all: impl IntoIterator<Item = ProjectStatus>) {
        let (mut active, mut suspended, mut expired, mut deleted) = (0, 0, 0, 0);
        for s in all {
            match s {
                ProjectStatus::Active => active += 1,
                ProjectStatus::Suspended => suspended += 1,
                ProjectStatus::Expired => expired += 1,
                ProjectStatus::Deleted => deleted += 1,
            }
        }
        for (s, n) in [
            (ProjectStatus::Active, active),
            (ProjectStatus::Suspended, suspended),
            (ProjectStatus::Expired, expired),
            (ProjectStatus::Deleted, deleted),
        ] {
            self.projects.with_label_values(&[state(s)]).set(n);
        }
    }

    pub(crate) fn observe(&self, result: &'static str, seconds: f64) {
        self.deploys.with_label_values(&[result]).inc();
        // Refusals take no time worth a histogram (and would drown the deploys that ran).
        if result != "refused" {
            self.duration.observe(seconds);
        }
    }
}
