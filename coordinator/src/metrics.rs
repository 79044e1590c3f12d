//! Prometheus metrics of the coordinator (`GET /metrics` on its gRPC port, prefix
//! `rlhf_coordinator_`): jobs by state, pool workers and their free capacity by role, and
//! whether this coordinator is the active one. Refreshed from the state store every two
//! seconds, so a standby shows the same jobs and pool as the active coordinator.

use prometheus::{IntGauge, IntGaugeVec, Opts, Registry};

/// Every metric the coordinator exports, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Jobs by state (`queued`, `running`, …).
    pub jobs: IntGaugeVec,
    /// Registered pool workers by role.
    pub workers: IntGaugeVec,
    /// Free assignment slots on pool workers by role.
    pub free_slots: IntGaugeVec,
    /// 1 on the coordinator holding the election.
    pub active: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let gauge_vec = |name: &str, help: &str, label: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("metric names are unique");
            g
        };
        let jobs = gauge_vec("rlhf_coordinator_jobs", "Jobs by state", "state");
        let workers = gauge_vec(
            "rlhf_coordinator_workers",
            "Registered pool workers by role",
            "role",
        );
        let free_slots = gauge_vec(
            "rlhf_coordinator_free_slots",
            "Free assignment slots on pool workers by role",
            "role",
        );
        let active = IntGauge::new(
            "rlhf_coordinator_active",
            "1 when this coordinator holds the election",
        )
        .expect("valid metric");
        registry
            .register(Box::new(active.clone()))
            .expect("metric names are unique");
        Metrics {
            registry,
            jobs,
            workers,
            free_slots,
            active,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
