//! The rollout service: requests become sequences for the engine; finished sequences are scored
//! and pushed to learners as they finish (overlapping the generation of the others) and streamed
//! back to the caller.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rlhf_model::weights::{NamedTensor, param_specs};
use rlhf_model::{ChatMessage, DType, GenerationParams, ModelConfig, SamplingParams, Tokenizer};
use rlhf_proto::client::{Timeouts, channel};
use rlhf_proto::service::ServiceHost;
use rlhf_proto::v1;
use rlhf_proto::v1::learner_service_client::LearnerServiceClient;
use rlhf_proto::v1::reward_service_client::RewardServiceClient;
use rlhf_proto::v1::rollout_service_server::{RolloutService, RolloutServiceServer};
use rlhf_proto::weights::{Assembler, WireTensor};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::server::NamedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::engine::{Command, EngineHandle, Finished, Job, RequestHandle};
use crate::metrics::Metrics;

/// The `RolloutService` implementation.
pub struct Actor {
    engine: EngineHandle,
    config: ModelConfig,
    tokenizer: Tokenizer,
    model_dir: PathBuf,
    max_sequences: usize,
    metrics: Metrics,
    rewards: Mutex<HashMap<String, RewardServiceClient<Channel>>>,
    learners: Mutex<HashMap<String, LearnerServiceClient<Channel>>>,
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
            rewards: Mutex::new(HashMap::new()),
            learners: Mutex::new(HashMap::new()),
            update_lock: Mutex::new(()),
        }
    }

    /// Token ids of a prompt; the error names the prompt.
    fn prompt_ids(&self, p: &v1::PromptInput) -> Result<Vec<u32>, Status> {
        let bad = |m: String| Status::invalid_argument(format!("prompt `{}`: {m}", p.id));
        let ids = match &p.content {
            None => return Err(bad("no content (text, ids or messages)".into())),
            Some(v1::prompt_input::Content::Text(t)) => self
                .tokenizer
                .encode(t, true)
                .map_err(|e| bad(e.to_string()))?,
            Some(v1::prompt_input::Content::Ids(ids)) => ids.ids.clone(),
            Some(v1::prompt_input::Content::Messages(m)) => {
                let messages: Vec<ChatMessage> = m
                    .messages
                    .iter()
                    .map(|m| ChatMessage::new(&m.role, &m.content))
                    .collect();
                self.tokenizer
                    .encode_chat(&messages, true)
                    .map_err(|e| bad(e.to_string()))?
            }
        };
        if ids.is_empty() {
            return Err(bad("empty prompt".into()));
        }
        if let Some(t) = ids.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(bad(format!(
                "token id {t} is outside the vocabulary ({})",
                self.config.vocab_size
            )));
        }
        if ids.len() >= self.config.max_position_embeddings {
            return Err(bad(format!(
                "{} tokens; the context length is {}",
                ids.len(),
                self.config.max_position_embeddings
            )));
        }
        Ok(ids)
    }

    async fn reward_client(&self, address: &str) -> Result<RewardServiceClient<Channel>, Status> {
        let mut map = self.rewards.lock().await;
        if let Some(c) = map.get(address) {
            return Ok(c.clone());
        }
        let ch = channel(address, Timeouts::default())
            .map_err(|e| Status::invalid_argument(format!("reward address {address}: {e}")))?;
        let c = RewardServiceClient::new(ch);
        map.insert(address.to_string(), c.clone());
        Ok(c)
    }

    async fn learner_client(&self, address: &str) -> Result<LearnerServiceClient<Channel>, Status> {
        let mut map = self.learners.lock().await;
        if let Some(c) = map.get(address) {
            return Ok(c.clone());
        }
        let ch = channel(address, Timeouts::default())
            .map_err(|e| Status::invalid_argument(format!("learner address {address}: {e}")))?;
        let c = LearnerServiceClient::new(ch).max_encoding_message_size(256 << 20);
        map.insert(address.to_string(), c.clone());
        Ok(c)
    }
}

/// FNV-1a: a stable hash of a prompt id for seeding.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The seed of sample `j` of prompt `id` under request seed `seed`.
pub fn sample_seed(seed: u64, prompt_id: &str, j: u32) -> u64 {
    let mut z =
        seed ^ fnv1a(prompt_id).rotate_left(17) ^ (j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn generation_params(s: &v1::SamplingParams, seed: u64) -> Result<GenerationParams, Status> {
    let sampling = SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
    };
    sampling
        .validate()
        .map_err(|m| Status::invalid_argument(format!("sampling: {m}")))?;
    if s.max_new_tokens == 0 {
        return Err(Status::invalid_argument(
            "sampling: max_new_tokens must be at least 1",
        ));
    }
    Ok(GenerationParams {
        sampling,
        max_new_tokens: s.max_new_tokens as usize,
        seed,
        stop_token_ids: s.stop_token_ids.clone(),
        stop_strings: s.stop.clone(),
        ignore_eos: s.ignore_eos,
    })
}

/// The reward server of a request, and how long one Score call may take.
#[derive(Clone)]
struct Scorer {
    client: RewardServiceClient<Channel>,
    timeout: Duration,
}

/// One Score call's deadline: the request's `reward_timeout_seconds`, 60 s when unset.
fn score_timeout(seconds: f64) -> Duration {
    if seconds.is_finite() && seconds > 0.0 {
        Duration::from_secs_f64(seconds)
    } else {
        Duration::from_secs(60)
    }
}

/// Retries `f` with exponential backoff on retryable statuses. An unreachable or slow service
/// (`UNAVAILABLE`, `DEADLINE_EXCEEDED`) gets 4 attempts, so a dead server fails the step
/// quickly; an overloaded one (`RESOURCE_EXHAUSTED`, its queue is full) is backpressure, not
/// failure, and is retried with backoff capped at 2 s for up to `OVERLOAD_PATIENCE`.
async fn retry<T, F, Fut>(what: &str, mut f: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    const OVERLOAD_PATIENCE: Duration = Duration::from_secs(120);
    let started = Instant::now();
    let mut delay = Duration::from_millis(100);
    let mut failures = 0;
    loop {
        let status = match f().await {
            Ok(v) => return Ok(v),
            Err(s) => s,
        };
        let retry = match status.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                failures += 1;
                failures < 4
            }
            tonic::Code::ResourceExhausted => started.elapsed() < OVERLOAD_PATIENCE,
            _ => false,
        };
        if !retry {
            return Err(Status::new(
                status.code(),
                format!("{what}: {}", status.message()),
            ));
        }
        tracing::warn!(what, code = ?status.code(), "retrying after {delay:?}: {}", status.message());
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Everything a prompt's completions need after generation.
struct PromptContext {
    prompt: v1::PromptInput,
    ids: Vec<u32>,
}

#[tonic::async_trait]
impl RolloutService for Actor {
    type GenerateStream = ReceiverStream<Result<v1::Completion, Status>>;

    async fn generate(
        &self,
        request: Request<v1::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let r = request.into_inner();
        let sampling = r
            .sampling
            .clone()
            .ok_or_else(|| Status::invalid_argument("sampling parameters are missing"))?;
        let n = sampling.samples_per_prompt.max(1);
        if r.prompts.is_empty() {
            return Err(Status::invalid_argument("no prompts"));
        }
        let mut prompts = Vec::with_capacity(r.prompts.len());
        for p in &r.prompts {
            prompts.push(PromptContext {
                ids: self.prompt_ids(p)?,
                prompt: p.clone(),
            });
        }
        let prompts = Arc::new(prompts);
        // One engine request per prompt, so a prompt's samples report together.
        let (tx, rx) = mpsc::channel(64);
        let total = prompts.len() * n as usize;
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(usize, Result<Finished, String>)>();
        let mut handles = Vec::new();
        let mut jobs = Vec::new();
        for (pi, ctx) in prompts.iter().enumerate() {
            let (out, mut from_engine) = mpsc::unbounded_channel();
            let handle = Arc::new(RequestHandle {
                min_version: r.min_weight_version,
                out,
                cancelled: AtomicBool::new(false),
            });
            handles.push(handle.clone());
            for j in 0..n {
                let seed = sample_seed(sampling.seed, &ctx.prompt.id, j);
                jobs.push(Job {
                    request: handle.clone(),
                    sample_index: j,
                    prompt: ctx.ids.clone(),
                    params: generation_params(&sampling, seed)?,
                });
            }
            let done_tx = done_tx.clone();
            tokio::spawn(async move {
                while let Some(f) = from_engine.recv().await {
                    if done_tx.send((pi, f)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        self.engine
            .commands
            .send(Command::Enqueue(jobs))
            .map_err(|_| Status::unavailable("the generation engine stopped"))?;

        // Post-process each finished sequence concurrently: score, push, stream out.
        let reward = (!r.reward_address.is_empty()).then(|| r.reward_address.clone());
        let reward_client = match &reward {
            Some(a) => Some(Scorer {
                client: self.reward_client(a).await?,
                timeout: score_timeout(r.reward_timeout_seconds),
            }),
            None => None,
        };
        let mut learner_clients = Vec::new();
        for a in &r.learner_addresses {
            learner_clients.push((a.clone(), self.learner_client(a).await?));
        }
        let tokenizer = self.tokenizer.clone();
        let metrics = self.metrics.clone();
        let (job_id, step) = (r.job_id.clone(), r.step);
        tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            let mut received = 0usize;
            let cancel_all = |handles: &[Arc<RequestHandle>]| {
                for h in handles {
                    h.cancelled.store(true, Ordering::SeqCst);
                }
            };
            loop {
                tokio::select! {
                    _ = tx.closed() => {
                        // The caller went away: stop its sequences.
                        cancel_all(&handles);
                        break;
                    }
                    next = done_rx.recv(), if received < total => {
                        let Some((pi, result)) = next else { break };
                        received += 1;
                        let finished = match result {
                            Ok(f) => f,
                            Err(e) => {
                                let _ = tx.send(Err(Status::internal(e))).await;
                                cancel_all(&handles);
                                break;
                            }
                        };
                        let ctx = prompts.clone();
                        let (tx, tokenizer, metrics) = (tx.clone(), tokenizer.clone(), metrics.clone());
                        let (reward_client, learners) = (reward_client.clone(), learner_clients.clone());
                        let job_id = job_id.clone();
                        tasks.spawn(async move {
                            let out = finish(&ctx[pi], finished, &tokenizer, reward_client, &learners, &job_id, step).await;
                            if out.is_ok() {
                                metrics.completions.inc();
                            }
                            let _ = tx.send(out).await;
                        });
                    }
                    Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                    else => break,
                }
                if received == total && tasks.is_empty() {
                    break;
                }
            }
            while tasks.join_next().await.is_some() {}
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn update_weights(
        &self,
        request: Request<Streaming<v1::WeightChunk>>,
    ) -> Result<Response<v1::UpdateWeightsReply>, Status> {
        let _one_at_a_time = self.update_lock.lock().await;
        let mut stream = request.into_inner();
        let mut assembler = Assembler::new();
        let mut bytes = 0u64;
        while let Some(chunk) = stream.message().await? {
            bytes += chunk.data.len() as u64;
            assembler
                .push(chunk)
                .map_err(|e| Status::invalid_argument(format!("weight update refused: {e}")))?;
        }
        let (version, tensors) = assembler
            .finish()
            .map_err(|e| Status::invalid_argument(format!("weight update refused: {e}")))?;
        let named = check_update(&self.config, tensors)
            .map_err(|m| Status::invalid_argument(format!("weight update refused: {m}")))?;
        let count = named.len() as u32;
        let (reply, rx) = oneshot::channel();
        self.engine
            .commands
            .send(Command::Stage {
                version,
                tensors: named,
                reply,
            })
            .map_err(|_| Status::unavailable("the generation engine stopped"))?;
        let version = rx
            .await
            .map_err(|_| Status::unavailable("the generation engine stopped"))?
            .map_err(|m| Status::invalid_argument(format!("weight update refused: {m}")))?;
        self.metrics.weight_version.set(version as i64);
        Ok(Response::new(v1::UpdateWeightsReply {
            version,
            bytes,
            tensors: count,
        }))
    }

    async fn info(
        &self,
        _request: Request<v1::ActorInfoRequest>,
    ) -> Result<Response<v1::ActorInfo>, Status> {
        let g = &self.engine.gauges;
        Ok(Response::new(v1::ActorInfo {
            model: self.model_dir.display().to_string(),
            weight_version: g.version.load(Ordering::SeqCst),
            running_sequences: g.running.load(Ordering::SeqCst) as u32,
            waiting_sequences: g.waiting.load(Ordering::SeqCst) as u32,
            max_sequences: self.max_sequences as u32,
            generated_tokens: g.generated_tokens.load(Ordering::Relaxed),
        }))
    }
}

/// Scores and pushes one finished sequence, and builds its `Completion`.
async fn finish(
    ctx: &PromptContext,
    f: Finished,
    tokenizer: &Tokenizer,
    reward: Option<Scorer>,
    learners: &[(String, LearnerServiceClient<Channel>)],
    job_id: &str,
    step: u64,
) -> Result<v1::Completion, Status> {
    let text = tokenizer
        .decode(&f.generation.tokens, true)
        .map_err(|e| Status::internal(e.to_string()))?;
    let started = Instant::now();
    let mut rewards = Vec::new();
    if let Some(Scorer {
        client,
        timeout: score_timeout,
    }) = reward
    {
        let prompt = match &ctx.prompt.content {
            Some(v1::prompt_input::Content::Text(t)) => v1::sample::Prompt::PromptText(t.clone()),
            Some(v1::prompt_input::Content::Messages(m)) => {
                v1::sample::Prompt::PromptMessages(m.clone())
            }
            _ => v1::sample::Prompt::PromptIds(v1::TokenIds {
                ids: ctx.ids.clone(),
            }),
        };
        let sample = v1::Sample {
            prompt: Some(prompt),
            completion: Some(v1::sample::Completion::CompletionText(text.clone())),
            metadata: ctx.prompt.metadata.clone(),
        };
        let reply = retry("reward server", || {
            let mut c = client.clone();
            let sample = sample.clone();
            async move {
                let call = c.score(v1::ScoreRequest {
                    samples: vec![sample],
                });
                // A client-side deadline: a stalled server (stopped, deadlocked) may never
                // answer, and the channel's own timeout is the generous default.
                match tokio::time::timeout(score_timeout, call).await {
                    Ok(reply) => reply,
                    Err(_) => Err(Status::deadline_exceeded(format!(
                        "no answer within {score_timeout:?}"
                    ))),
                }
            }
        })
        .await?;
        rewards = reply
            .into_inner()
            .scores
            .pop()
            .map(|s| s.values)
            .unwrap_or_default();
    }
    let score_seconds = started.elapsed().as_secs_f64();
    let mut pushed = false;
    if !learners.is_empty() {
        let t = v1::Trajectory {
            job_id: job_id.to_string(),
            step,
            prompt_id: ctx.prompt.id.clone(),
            group_id: ctx.prompt.id.clone(),
            sample_index: f.sample_index,
            prompt_ids: ctx.ids.clone(),
            completion_ids: f.generation.tokens.clone(),
            logprobs: f.generation.logprobs.clone(),
            weight_version: f.version,
            rewards: rewards.clone(),
            finish_reason: f.generation.finish_reason.as_str().into(),
            metadata: ctx.prompt.metadata.clone(),
        };
        for (address, client) in learners {
            let reply = retry(&format!("learner {address}"), || {
                let mut c = client.clone();
                let t = t.clone();
                async move { c.push_rollouts(tokio_stream::iter(vec![t])).await }
            })
            .await?
            .into_inner();
            if reply.rejected > 0 {
                return Err(Status::failed_precondition(format!(
                    "learner {address} rejected the trajectory: {}",
                    reply.message
                )));
            }
        }
        pushed = true;
    }
    Ok(v1::Completion {
        prompt_id: ctx.prompt.id.clone(),
        sample_index: f.sample_index,
        prompt_ids: ctx.ids.clone(),
        token_ids: f.generation.tokens,
        logprobs: f.generation.logprobs,
        finish_reason: f.generation.finish_reason.as_str().into(),
        weight_version: f.version,
        scored: !rewards.is_empty(),
        rewards,
        timings: Some(v1::Timings {
            queued_seconds: f.queued_seconds,
            generate_seconds: f.generate_seconds,
            score_seconds,
        }),
        text,
        metadata: ctx.prompt.metadata.clone(),
        pushed,
    })
}

/// Checks a weight update against the model's parameters and converts it to f32 tensors: every
/// parameter exactly once, with its shape; unknown names refused.
pub fn check_update(
    config: &ModelConfig,
    tensors: Vec<WireTensor>,
) -> Result<Vec<NamedTensor>, String> {
    let specs = param_specs(config);
    if tensors.len() != specs.len() {
        let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        let missing: Vec<&str> = specs
            .iter()
            .map(|s| s.name.as_str())
            .filter(|n| !names.contains(n))
            .collect();
        if !missing.is_empty() {
            return Err(format!("missing tensors: {}", missing.join(", ")));
        }
    }
    let mut out = Vec::with_capacity(tensors.len());
    for t in tensors {
        let spec = specs
            .iter()
            .find(|s| s.name == t.name)
            .ok_or_else(|| format!("unknown tensor `{}`", t.name))?;
        let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
        if shape != spec.shape {
            return Err(format!(
                "tensor `{}`: shape {:?}, the model has {:?}",
                t.name, shape, spec.shape
            ));
        }
        let dtype = match t.dtype {
            v1::DType::F32 => DType::F32,
            v1::DType::Bf16 => DType::BF16,
            v1::DType::F16 => DType::F16,
            v1::DType::Unspecified => {
                return Err(format!("tensor `{}`: dtype unspecified", t.name));
            }
        };
        out.push(NamedTensor {
            name: t.name,
            shape,
            values: rlhf_model::dtype::decode(dtype, &t.data),
        });
    }
    Ok(out)
}

/// Serves the actor on `listener` until `shutdown`.
pub async fn serve(
    actor: Actor,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let registry = actor.metrics.registry.clone();
    let server = RolloutServiceServer::new(actor)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(64 << 20);
    let name = <RolloutServiceServer<Actor> as NamedService>::NAME;
    ServiceHost::new(tonic::service::Routes::new(server), vec![name], registry)
        .serve(listener, shutdown)
        .await?;
    Ok(())
}
