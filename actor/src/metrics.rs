//! Prometheus metrics of the actor (prefix `rlhf_actor_`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus::{Gauge, IntCounter, IntGauge, Registry};

use crate::engine::Gauges;

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub completions: IntCounter,
    pub generated_tokens: IntCounter,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub occupancy: Gauge,
    pub weight_version: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let completions = IntCounter::new("rlhf_actor_completions_total", "Completions returned")
            .expect("valid metric");
        let generated_tokens = IntCounter::new(
            "rlhf_actor_generated_tokens_total",
            "Tokens generated (rate: tokens/s)",
        )
        .expect("valid metric");
        let running = IntGauge::new(
            "rlhf_actor_running_sequences",
            "Sequences in the decode batch",
        )
        .expect("valid metric");
        let waiting = IntGauge::new(
            "rlhf_actor_waiting_sequences",
            "Sequences queued (queue depth)",
        )
        .expect("valid metric");
        let occupancy = Gauge::new(
            "rlhf_actor_batch_occupancy",
            "Running sequences / max sequences",
        )
        .expect("valid metric");
        let weight_version = IntGauge::new("rlhf_actor_weight_version", "Weight version in use")
            .expect("valid metric");
        for m in [
            Box::new(completions.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(generated_tokens.clone()),
            Box::new(running.clone()),
            Box::new(waiting.clone()),
            Box::new(occupancy.clone()),
            Box::new(weight_version.clone()),
        ] {
            registry.register(m).expect("metric names are unique");
        }
        Metrics {
            registry,
            completions,
            generated_tokens,
            running,
            waiting,
            occupancy,
            weight_version,
        }
    }

    /// Copies the engine's counters into the registry every `period`, until the runtime stops.
    pub fn follow(&self, gauges: Arc<Gauges>, max_sequences: usize, period: Duration) {
        let m = self.clone();
        tokio::spawn(async move {
            let mut seen = 0u64;
            loop {
                let tokens = gauges.generated_tokens.load(Ordering::Relaxed);
                m.generated_tokens.inc_by(tokens - seen);
                seen = tokens;
                let running = gauges.running.load(Ordering::SeqCst);
                m.running.set(running as i64);
                m.waiting.set(gauges.waiting.load(Ordering::SeqCst) as i64);
                m.occupancy
                    .set(running as f64 / max_sequences.max(1) as f64);
                m.weight_version
                    .set(gauges.version.load(Ordering::SeqCst) as i64);
                tokio::time::sleep(period).await;
            }
        });
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
