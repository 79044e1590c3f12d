//! The gRPC face of the rollout service: thin handlers that check the request, call the plain
//! functions of [`crate::request`], [`crate::stream`], [`crate::rollout`] and
//! [`crate::weights`], and record metrics. Each runs in `rlhf_proto::trace::serve`, so the calls
//! it makes downstream (reward server, learners) carry the caller's trace context.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use rlhf_model::{ModelConfig, Tokenizer};
use rlhf_proto::client::limits;
use rlhf_proto::service::ServiceHost;
use rlhf_proto::trace;
use rlhf_proto::v1;
use rlhf_proto::v1::rollout_service_server::{RolloutService, RolloutServiceServer};
use tokio::sync::Mutex;
use tokio_stream::wrappers::ReceiverStream;
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};

use crate::engine::{EngineHandle, EngineStopped};
use crate::metrics::Metrics;
use crate::peers::Peers;
use crate::request::ValidGenerate;
use crate::rollout::{Rollout, Scorer};
use crate::{stream, weights};

/// The `RolloutService` implementation.
pub struct Actor {
    engine: EngineHandle,
    config: ModelConfig,
    tokenizer: Tokenizer,
    model_dir: PathBuf,
    max_sequences: usize,
    metrics: Metrics,
    peers: Peers,
    /// Serialises weight updates.
    update_lock: Mutex<()>,
}

impl Actor {
    pub fn new(
        engine: EngineHandle,
        config: ModelConfig,
        tokenizer: Tokenizer,
        model_dir: PathBuf,
        max_sequences: usize,
        metrics: Metrics,
    ) -> Self {
        Actor {
            engine,
            config,
            tokenizer,
            model_dir,
            max_sequences,
            metrics,
            peers: Peers::default(),
            update_lock: Mutex::new(()),
        }
    }

    /// Checks `r`, resolves its peers, enqueues its sequences and returns the stream of their
    /// completions.
    async fn start_generation(
        &self,
        r: v1::GenerateRequest,
    ) -> Result<ReceiverStream<Result<v1::Completion, Status>>, Status> {
        let request = ValidGenerate::new(r, &self.tokenizer, &self.config)?;
        let scorer = match &request.reward {
            Some(target) => Some(Scorer {
                replicas: self.peers.rewards(&target.addresses)?,
                turn: self.peers.reward_turn(),
                timeout: target.timeout,
            }),
            None => None,
        };
        let learners = self.peers.learners(&request.learners)?;
        let (jobs, sequences) = stream::sequences(&request);
        self.engine.enqueue(jobs).map_err(unavailable)?;
        let rollout = Rollout::new(request, self.tokenizer.clone(), scorer, learners);
        Ok(stream::completions(
            Arc::new(rollout),
            sequences,
            self.metrics.clone(),
        ))
    }

    /// Receives, checks and stages a weight update; replies once it is in use.
    async fn update(
        &self,
        chunks: Streaming<v1::WeightChunk>,
    ) -> Result<v1::UpdateWeightsReply, Status> {
        let _one_at_a_time = self.update_lock.lock().await;
        let update = weights::receive(&self.config, chunks).await?;
        let tensors = update.tensors.len() as u32;
        let version = self
            .engine
            .stage(update.version, update.tensors)
            .await
            .map_err(unavailable)?
            .map_err(weights::refused)?;
        self.metrics.weight_version.set(version as i64);
        tracing::info!(version, bytes = update.bytes, tensors, "weights updated");
        Ok(v1::UpdateWeightsReply {
            version,
            bytes: update.bytes,
            tensors,
        })
    }

    /// What `Info` reports: the engine's gauges and the actor's limits.
    fn snapshot(&self) -> v1::ActorInfo {
        let g = &self.engine.gauges;
        v1::ActorInfo {
            model: self.model_dir.display().to_string(),
            weight_version: g.version.load(Ordering::SeqCst),
            running_sequences: g.running.load(Ordering::SeqCst) as u32,
            waiting_sequences: g.waiting.load(Ordering::SeqCst) as u32,
            max_sequences: self.max_sequences as u32,
            generated_tokens: g.generated_tokens.load(Ordering::Relaxed),
        }
    }
}

fn unavailable(e: EngineStopped) -> Status {
    Status::unavailable(e.to_string())
}

#[tonic::async_trait]
impl RolloutService for Actor {
    type GenerateStream = ReceiverStream<Result<v1::Completion, Status>>;

    async fn generate(
        &self,
        request: Request<v1::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let (metadata, _, r) = request.into_parts();
        trace::serve("actor.generate", &metadata, self.start_generation(r))
            .await
            .map(Response::new)
    }

    async fn update_weights(
        &self,
        request: Request<Streaming<v1::WeightChunk>>,
    ) -> Result<Response<v1::UpdateWeightsReply>, Status> {
        let (metadata, _, chunks) = request.into_parts();
        trace::serve("actor.update_weights", &metadata, self.update(chunks))
            .await
            .map(Response::new)
    }

    async fn info(
        &self,
        request: Request<v1::ActorInfoRequest>,
    ) -> Result<Response<v1::ActorInfo>, Status> {
        let info = trace::serve("actor.info", request.metadata(), async { self.snapshot() }).await;
        Ok(Response::new(info))
    }
}

/// Serves the actor on `listener` until `shutdown`.
pub async fn serve(
    actor: Actor,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let registry = actor.metrics.registry.clone();
    let server = RolloutServiceServer::new(actor)
        .max_decoding_message_size(limits::BULK)
        .max_encoding_message_size(limits::REPLY);
    let name = <RolloutServiceServer<Actor> as NamedService>::NAME;
    ServiceHost::new(tonic::service::Routes::new(server), vec![name], registry)
        .serve(listener, shutdown)
        .await?;
    Ok(())
}
