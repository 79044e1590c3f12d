//! Prometheus metrics of the reward service (prefix `rlhf_reward_`, low-cardinality labels).

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    exponential_buckets,
};

/// Every metric the service records, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Finished Score requests by gRPC status code name.
    pub requests: IntCounterVec,
    pub samples: IntCounter,
    pub request_seconds: Histogram,
    /// Sequences per reward-model forward pass.
    pub batch_size: Histogram,
    pub batch_seconds: Histogram,
    /// Requests waiting per reward model.
    pub queue_depth: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("rlhf_reward_requests_total", "Score requests by result"),
            &["code"],
        )
        .expect("valid metric");
        let samples =
            IntCounter::new("rlhf_reward_samples_total", "Samples scored").expect("valid metric");
        let request_seconds = Histogram::with_opts(
            HistogramOpts::new("rlhf_reward_request_seconds", "Score request latency")
                .buckets(exponential_buckets(0.001, 2.0, 16).expect("valid buckets")),
        )
        .expect("valid metric");
        let batch_size = Histogram::with_opts(
            HistogramOpts::new(
                "rlhf_reward_batch_size",
                "Sequences per reward-model forward pass",
            )
            .buckets(exponential_buckets(1.0, 2.0, 10).expect("valid buckets")),
        )
        .expect("valid metric");
        let batch_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "rlhf_reward_batch_seconds",
                "Reward-model forward pass latency",
            )
            .buckets(exponential_buckets(0.0005, 2.0, 16).expect("valid buckets")),
        )
        .expect("valid metric");
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "rlhf_reward_queue_depth",
                "Requests waiting for a reward model",
            ),
            &["model"],
        )
        .expect("valid metric");
        for m in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(samples.clone()),
            Box::new(request_seconds.clone()),
            Box::new(batch_size.clone()),
            Box::new(batch_seconds.clone()),
            Box::new(queue_depth.clone()),
        ] {
            registry.register(m).expect("metric names are unique");
        }
        Metrics {
            registry,
            requests,
            samples,
            request_seconds,
            batch_size,
            batch_seconds,
            queue_depth,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
