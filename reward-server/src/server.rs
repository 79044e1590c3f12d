//! The gRPC face of the reward service: thin handlers over [`Scorer`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use rlhf_proto::client::limits;
use rlhf_proto::service::ServiceHost;
use rlhf_proto::trace;
use rlhf_proto::v1;
use rlhf_proto::v1::reward_service_server::{RewardService, RewardServiceServer};
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

use crate::config::RewardConfig;
use crate::metrics::Metrics;
use crate::scorer::Scorer;

/// The `RewardService` implementation.
pub struct RewardServer {
    scorer: Arc<Scorer>,
    default_timeout: Duration,
}

impl RewardServer {
    pub fn new(scorer: Arc<Scorer>, default_timeout: Duration) -> Self {
        RewardServer {
            scorer,
            default_timeout,
        }
    }
}

/// The client's `grpc-timeout` header (e.g. `500m`, `3S`), if present and valid.
pub fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl RewardServer {
    /// Scores `samples` within `timeout` and records the request's metrics.
    async fn score_samples(
        &self,
        samples: Vec<v1::Sample>,
        timeout: Duration,
    ) -> Result<v1::ScoreReply, Status> {
        let started = Instant::now();
        let n = samples.len();
        let metrics = &self.scorer.metrics;
        let result = self.scorer.score(samples, started + timeout).await;
        metrics
            .request_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(values) => {
                metrics.requests.with_label_values(&["OK"]).inc();
                metrics.samples.inc_by(n as u64);
                let scores = values
                    .into_iter()
                    .map(|values| v1::SampleScores { values })
                    .collect();
                Ok(v1::ScoreReply { scores })
            }
            Err(err) => {
                let status = Status::from(err);
                metrics
                    .requests
                    .with_label_values(&[&format!("{:?}", status.code())])
                    .inc();
                tracing::debug!(code = ?status.code(), message = status.message(), "score failed");
                Err(status)
            }
        }
    }

    fn objectives(&self) -> v1::DescribeReply {
        let objectives = self
            .scorer
            .describe()
            .into_iter()
            .map(|o| v1::Objective {
                name: o.name,
                kind: o.kind.to_string(),
                content_hash: o.content_hash,
                description: o.description,
            })
            .collect();
        v1::DescribeReply { objectives }
    }
}

#[tonic::async_trait]
impl RewardService for RewardServer {
    async fn score(
        &self,
        request: Request<v1::ScoreRequest>,
    ) -> Result<Response<v1::ScoreReply>, Status> {
        let (metadata, _, body) = request.into_parts();
        let timeout =
            grpc_timeout(&metadata).map_or(self.default_timeout, |t| t.min(self.default_timeout));
        trace::serve(
            "reward.score",
            &metadata,
            self.score_samples(body.samples, timeout),
        )
        .await
        .map(Response::new)
    }

    async fn describe(
        &self,
        request: Request<v1::DescribeRequest>,
    ) -> Result<Response<v1::DescribeReply>, Status> {
        let reply = trace::serve("reward.describe", request.metadata(), async {
            self.objectives()
        })
        .await;
        Ok(Response::new(reply))
    }
}

/// Loads every model and client a configuration names (blocking: models load from disk).
pub fn load(config: &RewardConfig) -> anyhow::Result<Arc<Scorer>> {
    Ok(Arc::new(Scorer::build(config, Metrics::new())?))
}

/// Serves `scorer` on `listener` until `shutdown` completes.
pub async fn serve(
    scorer: Arc<Scorer>,
    request_timeout: Duration,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let registry = scorer.metrics.registry.clone();
    let server = RewardServiceServer::new(RewardServer::new(scorer, request_timeout))
        .max_decoding_message_size(limits::REPLY);
    let name = <RewardServiceServer<RewardServer> as NamedService>::NAME;
    let host = ServiceHost::new(tonic::service::Routes::new(server), vec![name], registry);
    tracing::info!(address = %listener.local_addr()?, "reward server listening");
    host.serve(listener, shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeouts() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout(&m), None);
        m.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(grpc_timeout(&m), Some(Duration::from_millis(250)));
        m.insert("grpc-timeout", "3S".parse().unwrap());
        assert_eq!(grpc_timeout(&m), Some(Duration::from_secs(3)));
        m.insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(grpc_timeout(&m), None);
    }
}
