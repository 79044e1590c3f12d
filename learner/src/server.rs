//! The learner service: gRPC handlers in front of the [`Engine`], which one thread owns.
//!
//! Pushed trajectories wait in a [`Buffer`]; `Step` hands a copy of its step's trajectories to
//! the engine thread once the expected number has arrived, and they are forgotten once the step
//! is applied (under DAPO dynamic sampling a step short of informative groups is sent back for
//! another round and keeps them). After every update the new weights are published for
//! `StreamWeights` and `PublishWeights` (which pushes them to actors, see [`crate::publish`]).
//! Only rank 0 writes checkpoints (every rank's state is identical after a step); every rank can
//! restore one. A [`Stopper`] ends the service the way SIGTERM does: steps not started are
//! refused, a running step finishes, and the last applied step is checkpointed.
//!
//! Every handler runs in [`trace::serve`], so its span and the calls it makes carry the caller's
//! job, step and trace id; commands carry the handler's span to the engine thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rlhf_model::DType;
use rlhf_model::weights::NamedTensor;
use rlhf_proto::client::limits;
use rlhf_proto::service::ServiceHost;
use rlhf_proto::trace;
use rlhf_proto::v1;
use rlhf_proto::v1::learner_service_server::{LearnerService, LearnerServiceServer};
use rlhf_proto::weights::{WireTensor, to_chunks};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};

use crate::checkpoint;
use crate::config::LearnerConfig;
use crate::engine::{Engine, StepOutcome};
use crate::publish;
use crate::trajectory::{Buffer, Trajectory};

/// Published weights of one version.
pub struct Snapshot {
    pub version: u64,
    pub tensors: Vec<NamedTensor>,
}

/// Work for the engine thread.
enum Command {
    Step {
        step: u64,
        trajectories: Vec<Trajectory>,
        cursor: u64,
        last_round: bool,
        reply: oneshot::Sender<Result<StepOutcome>>,
    },
    SetReference {
        objectives: Vec<String>,
        rows: crate::algo::transform::ReferenceTable,
        reply: oneshot::Sender<Result<usize>>,
    },
    Save {
        /// Also export the policy as a Hugging Face folder here.
        export: Option<PathBuf>,
        reply: oneshot::Sender<Result<Saved>>,
    },
    Restore {
        path: Option<PathBuf>,
        reply: oneshot::Sender<Result<(PathBuf, u64, u64, u64)>>,
    },
    /// The frozen reference's weights when resident (`None`: load them from its folder).
    ReferenceWeights {
        reply: oneshot::Sender<Result<Option<Vec<NamedTensor>>>>,
    },
    /// The last command: checkpoint the last applied step unless it is checkpointed already
    /// (rank 0), then stop. Replies with the checkpoint written, if any.
    Shutdown {
        reply: oneshot::Sender<Result<Option<PathBuf>>>,
    },
}

/// A checkpoint written on request.
#[derive(Debug, Clone)]
struct Saved {
    path: PathBuf,
    step: u64,
    version: u64,
    /// Where the policy was exported, when asked.
    policy_dir: Option<PathBuf>,
}

/// What handlers read without asking the engine thread.
#[derive(Debug, Clone, Default)]
struct Progress {
    step: u64,
    version: u64,
    /// The last applied step's report ([`Engine::last_applied`]).
    last: Option<Arc<StepOutcome>>,
}

impl Progress {
    fn of(engine: &Engine) -> Progress {
        Progress {
            step: engine.step(),
            version: engine.version(),
            last: engine.last_applied().map(Arc::new),
        }
    }
}

/// Prometheus metrics of the learner (prefix `rlhf_learner_`).
#[derive(Clone)]
pub struct Metrics {
    pub registry: prometheus::Registry,
    steps: prometheus::IntCounter,
    version: prometheus::IntGauge,
    step_seconds: prometheus::Histogram,
    pushed: prometheus::IntCounterVec,
    actor_updates: prometheus::IntCounterVec,
}

impl Metrics {
    fn new() -> Self {
        let registry = prometheus::Registry::new();
        let steps = prometheus::IntCounter::new("rlhf_learner_steps_total", "Steps trained")
            .expect("valid metric");
        let version =
            prometheus::IntGauge::new("rlhf_learner_weight_version", "Current weight version")
                .expect("valid metric");
        let step_seconds = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(
                "rlhf_learner_step_seconds",
                "Wall time of a training step",
            )
            .buckets(prometheus::exponential_buckets(0.05, 2.0, 14).expect("valid buckets")),
        )
        .expect("valid metric");
        let pushed = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "rlhf_learner_trajectories_total",
                "Pushed trajectories by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        let actor_updates = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "rlhf_learner_actor_updates_total",
                "Weight updates pushed to actors by PublishWeights, by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        registry.register(Box::new(steps.clone())).expect("unique");
        registry
            .register(Box::new(version.clone()))
            .expect("unique");
        registry
            .register(Box::new(step_seconds.clone()))
            .expect("unique");
        registry.register(Box::new(pushed.clone())).expect("unique");
        registry
            .register(Box::new(actor_updates.clone()))
            .expect("unique");
        Metrics {
            registry,
            steps,
            version,
            step_seconds,
            pushed,
            actor_updates,
        }
    }
}

/// The service implementation.
pub struct Learner {
    pub metrics: Metrics,
    /// Each command with the span of the handler that sent it.
    commands: mpsc::Sender<(tracing::Span, Command)>,
    buffer: Arc<Buffer>,
    weights: watch::Receiver<Arc<Snapshot>>,
    status: watch::Receiver<Progress>,
    /// Set once the learner is stopping (see [`Stopper`]).
    stopping: watch::Receiver<bool>,
    stop_tx: Arc<watch::Sender<bool>>,
    /// The frozen reference's folder, for publishing it when it is not resident.
    reference_dir: PathBuf,
    objectives: Vec<String>,
    vocab: usize,
    rank: u32,
    world: u32,
    algorithm: String,
}

/// Stops a learner the way SIGTERM does (see [`Stopper::stop`]); cloneable, usable while the
/// service is being served.
#[derive(Clone)]
pub struct Stopper {
    commands: mpsc::Sender<(tracing::Span, Command)>,
    stop_tx: Arc<watch::Sender<bool>>,
}

impl Stopper {
    /// Stops the learner for good: `Step` calls not started yet are refused (those waiting for
    /// trajectories at once, with `UNAVAILABLE`), a step that is training finishes, and rank 0
    /// then checkpoints the last applied step unless a checkpoint of it exists already. Returns
    /// the checkpoint written, if any. Every later command is refused.
    pub async fn stop(&self) -> Result<Option<PathBuf>> {
        self.stop_tx.send_replace(true);
        let (reply, rx) = oneshot::channel();
        self.commands
            .send((tracing::Span::current(), Command::Shutdown { reply }))
            .await
            .map_err(|_| anyhow::anyhow!("the learner engine stopped already"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the learner engine stopped before checkpointing"))?
    }
}

fn checkpoint_root(config: &LearnerConfig) -> PathBuf {
    config.output_dir.join("checkpoints")
}

/// Starts the engine thread; returns the service.
pub fn start(engine: Engine) -> Learner {
    let (commands, rx) = mpsc::channel::<(tracing::Span, Command)>(64);
    let first = Arc::new(Snapshot {
        version: engine.version(),
        tensors: engine.policy_tensors(),
    });
    let (weights_tx, weights) = watch::channel(first);
    let (status_tx, status) = watch::channel(Progress::of(&engine));
    let (stop_tx, stopping) = watch::channel(false);
    let objectives = engine
        .config
        .rewards
        .objectives
        .iter()
        .map(|o| o.name.clone())
        .collect();
    let vocab = engine.vocab_size();
    let (rank, world) = (engine.rank() as u32, engine.world() as u32);
    let algorithm = format!("{:?}", engine.config.algorithm).to_lowercase();
    let reference_dir = crate::engine::reference_dir(&engine.config);
    let thread = EngineThread {
        // A resumed engine's state is the checkpoint it came from, until it trains.
        checkpointed: engine.restored_from().filter(|&s| s == engine.step()),
        engine,
        weights: weights_tx,
        status: status_tx,
        stopping: stopping.clone(),
    };
    std::thread::Builder::new()
        .name("learner-engine".into())
        .spawn(move || thread.run(rx))
        .expect("the engine thread starts");
    Learner {
        metrics: Metrics::new(),
        commands,
        buffer: Arc::new(Buffer::default()),
        weights,
        status,
        stopping,
        stop_tx: Arc::new(stop_tx),
        reference_dir,
        objectives,
        vocab,
        rank,
        world,
        algorithm,
    }
}

/// The engine and what it tells the handlers, owned by the engine thread.
struct EngineThread {
    engine: Engine,
    weights: watch::Sender<Arc<Snapshot>>,
    status: watch::Sender<Progress>,
    stopping: watch::Receiver<bool>,
    /// The step of the last checkpoint written or restored.
    checkpointed: Option<u64>,
}

impl EngineThread {
    fn run(mut self, mut rx: mpsc::Receiver<(tracing::Span, Command)>) {
        while let Some((span, cmd)) = rx.blocking_recv() {
            let _in_span = span.enter();
            match cmd {
                Command::Step {
                    step,
                    trajectories,
                    cursor,
                    last_round,
                    reply,
                } => {
                    let result = if *self.stopping.borrow() {
                        Err(anyhow::anyhow!(
                            "step {step} not started: the learner is shutting down"
                        ))
                    } else {
                        self.step(step, trajectories, cursor, last_round)
                    };
                    self.publish(false);
                    let _ = reply.send(result);
                }
                Command::SetReference {
                    objectives,
                    rows,
                    reply,
                } => {
                    let _ = reply.send(self.engine.set_reference_table(&objectives, rows));
                }
                Command::Save { export, reply } => {
                    let _ = reply.send(self.save(export.as_deref()));
                }
                Command::Restore { path, reply } => {
                    let result = restore(&mut self.engine, path);
                    if let Ok((_, step, _, _)) = &result {
                        self.checkpointed = Some(*step);
                    }
                    // New weights even when the version number is the same.
                    self.publish(result.is_ok());
                    let _ = reply.send(result);
                }
                Command::ReferenceWeights { reply } => {
                    let _ = reply.send(Ok(self.engine.resident_reference_tensors()));
                }
                Command::Shutdown { reply } => {
                    let _ = reply.send(self.final_checkpoint());
                    return;
                }
            }
        }
    }

    fn step(
        &mut self,
        step: u64,
        trajectories: Vec<Trajectory>,
        cursor: u64,
        last_round: bool,
    ) -> Result<StepOutcome> {
        let outcome = self
            .engine
            .train_round(step, trajectories, cursor, last_round)?;
        let every = self.engine.config.checkpoint.every_steps;
        if outcome.applied() && every > 0 && step.is_multiple_of(every) && self.engine.rank() == 0 {
            let path = save(&self.engine)?;
            self.checkpointed = Some(self.engine.step());
            tracing::debug!(path = %path.display(), "periodic checkpoint");
        }
        Ok(outcome)
    }

    /// `SaveCheckpoint` (rank 0: see the handler).
    fn save(&mut self, export: Option<&Path>) -> Result<Saved> {
        let path = save(&self.engine)?;
        self.checkpointed = Some(self.engine.step());
        let policy_dir = match export {
            Some(dir) => {
                self.engine.export_policy(dir).with_context(|| {
                    format!(
                        "checkpoint {} written, but exporting the policy to {} failed",
                        path.display(),
                        dir.display()
                    )
                })?;
                tracing::info!(dir = %dir.display(), step = self.engine.step(), "policy exported");
                Some(dir.to_path_buf())
            }
            None => None,
        };
        Ok(Saved {
            path,
            step: self.engine.step(),
            version: self.engine.version(),
            policy_dir,
        })
    }

    /// On the way out: rank 0 checkpoints the last applied step if no checkpoint has it.
    fn final_checkpoint(&mut self) -> Result<Option<PathBuf>> {
        let step = self.engine.step();
        if self.engine.rank() != 0 || step == 0 || self.checkpointed == Some(step) {
            return Ok(None);
        }
        let path = save(&self.engine)?;
        self.checkpointed = Some(step);
        Ok(Some(path))
    }

    /// Tells the handlers the engine's step and version (and its weights, when their version
    /// changed or `weights` says so) before a reply goes out, so a caller that got a reply never
    /// sees older ones.
    fn publish(&self, weights: bool) {
        let e = &self.engine;
        if weights || self.weights.borrow().version != e.version() {
            self.weights.send_replace(Arc::new(Snapshot {
                version: e.version(),
                tensors: e.policy_tensors(),
            }));
        }
        self.status.send_replace(Progress::of(e));
    }
}

fn save(engine: &Engine) -> Result<PathBuf> {
    let root = checkpoint_root(&engine.config);
    let path = checkpoint::write(&root, engine.step(), |dir| engine.save_state(dir))?;
    checkpoint::prune(&root, engine.config.checkpoint.keep)?;
    tracing::info!(path = %path.display(), step = engine.step(), "checkpoint written");
    Ok(path)
}

fn restore(engine: &mut Engine, path: Option<PathBuf>) -> Result<(PathBuf, u64, u64, u64)> {
    let root = checkpoint_root(&engine.config);
    let path = match path {
        Some(p) => p,
        None => checkpoint::latest(&root)
            .with_context(|| format!("no checkpoint in {}", root.display()))?,
    };
    checkpoint::verify(&path)?;
    engine
        .load_state(&path)
        .with_context(|| format!("restoring {}", path.display()))?;
    tracing::info!(path = %path.display(), step = engine.step(), "checkpoint restored");
    Ok((path, engine.step(), engine.version(), engine.data_cursor()))
}

fn internal(e: anyhow::Error) -> Status {
    Status::internal(format!("{e:#}"))
}

/// A checked `WeightsRequest` or `PublishWeightsRequest`: what to encode, and how long to wait.
#[derive(Debug, Clone, Copy)]
struct WeightsSpec {
    min_version: u64,
    dtype: DType,
    chunk_bytes: usize,
    /// For the version to be reached (and, when publishing, for each actor's update).
    timeout: Duration,
    timeout_seconds: f64,
}

impl WeightsSpec {
    fn new(
        min_version: u64,
        dtype: &str,
        chunk_bytes: u32,
        timeout_seconds: f64,
    ) -> Result<Self, Status> {
        let dtype = if dtype.is_empty() {
            DType::F32
        } else {
            DType::parse(dtype).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "dtype `{dtype}`: expected float32, bfloat16 or float16"
                ))
            })?
        };
        let timeout_seconds = if timeout_seconds > 0.0 {
            timeout_seconds
        } else {
            600.0
        };
        let timeout = Duration::try_from_secs_f64(timeout_seconds).map_err(|_| {
            Status::invalid_argument(format!(
                "timeout_seconds: {timeout_seconds} is not a duration"
            ))
        })?;
        let chunk_bytes = if chunk_bytes == 0 {
            1 << 20
        } else {
            chunk_bytes as usize
        };
        Ok(WeightsSpec {
            min_version,
            dtype,
            chunk_bytes,
            timeout,
            timeout_seconds,
        })
    }
}

impl Learner {
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T>>) -> Command,
    ) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send((tracing::Span::current(), make(tx)))
            .await
            .map_err(|_| Status::unavailable("the learner engine stopped"))?;
        rx.await
            .map_err(|_| Status::unavailable("the learner engine stopped"))?
            .map_err(internal)
    }

    /// A handle that stops this learner (see [`Stopper::stop`]).
    pub fn stopper(&self) -> Stopper {
        Stopper {
            commands: self.commands.clone(),
            stop_tx: self.stop_tx.clone(),
        }
    }

    /// Resolves once the learner is stopping.
    async fn stopped(&self) {
        let mut stopping = self.stopping.clone();
        // An error means the sender is gone, which only happens with the service itself.
        let _ = stopping.wait_for(|s| *s).await;
    }

    /// The weights once their version is at least `spec.min_version`, encoded as `spec` asks.
    async fn weight_chunks(
        &self,
        spec: WeightsSpec,
    ) -> Result<(u64, Vec<v1::WeightChunk>), Status> {
        let mut weights = self.weights.clone();
        let waited = tokio::select! {
            w = tokio::time::timeout(
                spec.timeout,
                weights.wait_for(|s| s.version >= spec.min_version),
            ) => w,
            () = self.stopped() => {
                return Err(Status::unavailable(format!(
                    "weight version {}: the learner is shutting down",
                    spec.min_version
                )));
            }
        };
        let snapshot = waited
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "weight version {} not reached within {} s",
                    spec.min_version, spec.timeout_seconds
                ))
            })?
            .map_err(|_| Status::unavailable("the learner engine stopped"))?
            .clone();
        let version = snapshot.version;
        Ok((version, encode(snapshot, spec).await?))
    }

    /// The frozen reference's weights as version 0, encoded as `spec` asks: the resident
    /// reference's, else read from its folder for this call.
    async fn reference_chunks(&self, spec: WeightsSpec) -> Result<Vec<v1::WeightChunk>, Status> {
        let resident = self
            .call(|reply| Command::ReferenceWeights { reply })
            .await?;
        let tensors = match resident {
            Some(t) => t,
            None => {
                let dir = self.reference_dir.clone();
                let span = tracing::Span::current();
                tokio::task::spawn_blocking(move || {
                    span.in_scope(|| -> Result<Vec<NamedTensor>> {
                        tracing::info!(dir = %dir.display(), "loading the reference to publish it");
                        let device = rlhf_model::device::inference_device()?;
                        Ok(crate::engine::load_reference(&dir, &device)?.named_tensors())
                    })
                })
                .await
                .map_err(|e| Status::internal(format!("loading the reference failed: {e}")))?
                .map_err(|e| Status::failed_precondition(format!("{e:#}")))?
            }
        };
        encode(
            Arc::new(Snapshot {
                version: 0,
                tensors,
            }),
            spec,
        )
        .await
    }

    /// `Step`: waits for the step's trajectories, then trains on them (or, under dynamic
    /// sampling, says how many informative groups it still lacks).
    #[tracing::instrument(skip_all, fields(step = r.step, samples = tracing::field::Empty))]
    async fn train(&self, r: v1::StepRequest) -> Result<v1::StepReport, Status> {
        // Applied before (after a restore, or a retried call): its trajectories are gone. The
        // last applied step is answered with its report, so a caller that lost the reply can
        // still record it; an older one only with the current version.
        let progress = self.status.borrow().clone();
        if r.step <= progress.step && progress.step > 0 {
            self.buffer.finish(r.step);
            return Ok(match progress.last.filter(|o| o.step == r.step) {
                Some(o) => report(StepOutcome::clone(&o)),
                None => v1::StepReport {
                    step: r.step,
                    weight_version: progress.version,
                    already_applied: true,
                    ..Default::default()
                },
            });
        }
        let timeout = if r.timeout_seconds > 0.0 {
            r.timeout_seconds
        } else {
            600.0
        };
        let wait = Duration::try_from_secs_f64(timeout).map_err(|_| {
            Status::invalid_argument(format!("timeout_seconds: {timeout} is not a duration"))
        })?;
        let deadline = tokio::time::Instant::now() + wait;
        let waited = tokio::select! {
            w = self.buffer.wait_for(r.step, r.expected_samples as usize, deadline) => w,
            () = self.stopped() => {
                return Err(Status::unavailable(format!(
                    "step {} not started: the learner is shutting down",
                    r.step
                )));
            }
        };
        let trajectories = waited.map_err(|have| {
            Status::deadline_exceeded(format!(
                "step {}: {have} of {} trajectories arrived within {timeout} s",
                r.step, r.expected_samples
            ))
        })?;
        tracing::Span::current().record("samples", trajectories.len());
        let outcome = self
            .call(|reply| Command::Step {
                step: r.step,
                trajectories,
                cursor: r.data_cursor,
                last_round: r.last_round,
                reply,
            })
            .await
            .map_err(|s| {
                if *self.stopping.borrow() {
                    Status::unavailable(s.message().to_string())
                } else {
                    s
                }
            })?;
        if outcome.missing_groups > 0 {
            tracing::info!(
                missing_groups = outcome.missing_groups,
                "step short of informative groups; waiting for another round"
            );
        } else {
            self.buffer.finish(r.step);
        }
        if outcome.applied() {
            self.metrics.steps.inc();
            self.metrics.step_seconds.observe(outcome.seconds);
            exit_if_faulted(outcome.step);
        }
        self.metrics.version.set(outcome.version as i64);
        Ok(report(outcome))
    }
}

/// A fault point for failure tests: with `RLHF_FAULT_EXIT_AFTER_STEP=N` the process exits
/// (code 137, as if SIGKILLed) once step N is applied and checkpointed but before its reply
/// goes out, the moment a learner's death is the hardest to recover from exactly (see
/// docs/reliability.md). A restarted learner resumes after step N and does not exit again.
fn exit_if_faulted(step: u64) {
    let fault = std::env::var("RLHF_FAULT_EXIT_AFTER_STEP").ok();
    if fault.and_then(|v| v.trim().parse::<u64>().ok()) == Some(step) {
        tracing::error!(
            step,
            "RLHF_FAULT_EXIT_AFTER_STEP: exiting before the step's reply"
        );
        std::process::exit(137);
    }
}

fn report(outcome: StepOutcome) -> v1::StepReport {
    v1::StepReport {
        step: outcome.step,
        weight_version: outcome.version,
        metrics: outcome.metrics.into_iter().collect(),
        samples: outcome.samples,
        tokens: outcome.tokens,
        seconds: outcome.seconds,
        already_applied: outcome.already_applied,
        missing_groups: outcome.missing_groups,
    }
}

/// `snapshot` as chunks, encoded off the async threads.
async fn encode(
    snapshot: Arc<Snapshot>,
    spec: WeightsSpec,
) -> Result<Vec<v1::WeightChunk>, Status> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        span.in_scope(|| encode_snapshot(&snapshot, spec.dtype, spec.chunk_bytes))
    })
    .await
    .map_err(|e| Status::internal(format!("encoding the weights failed: {e}")))
}

#[tonic::async_trait]
impl LearnerService for Learner {
    async fn push_rollouts(
        &self,
        request: Request<Streaming<v1::Trajectory>>,
    ) -> Result<Response<v1::PushReply>, Status> {
        let (metadata, _, mut stream) = request.into_parts();
        trace::serve("learner.push_rollouts", &metadata, async move {
            let (mut accepted, mut rejected, mut first_error) = (0u64, 0u64, String::new());
            while let Some(t) = stream.message().await? {
                match Trajectory::from_proto(t, self.objectives.len(), self.vocab) {
                    Ok(t) => {
                        self.buffer.push(t);
                        accepted += 1;
                    }
                    Err(e) => {
                        rejected += 1;
                        if first_error.is_empty() {
                            first_error = e;
                        }
                    }
                }
            }
            self.metrics
                .pushed
                .with_label_values(&["accepted"])
                .inc_by(accepted);
            self.metrics
                .pushed
                .with_label_values(&["rejected"])
                .inc_by(rejected);
            Ok(Response::new(v1::PushReply {
                accepted,
                rejected,
                message: first_error,
            }))
        })
        .await
    }

    async fn step(
        &self,
        request: Request<v1::StepRequest>,
    ) -> Result<Response<v1::StepReport>, Status> {
        let (metadata, _, r) = request.into_parts();
        trace::serve("learner.step", &metadata, self.train(r))
            .await
            .map(Response::new)
    }

    type StreamWeightsStream = ReceiverStream<Result<v1::WeightChunk, Status>>;

    async fn stream_weights(
        &self,
        request: Request<v1::WeightsRequest>,
    ) -> Result<Response<Self::StreamWeightsStream>, Status> {
        let (metadata, _, r) = request.into_parts();
        trace::serve("learner.stream_weights", &metadata, async move {
            let spec = WeightsSpec::new(r.min_version, &r.dtype, r.chunk_bytes, r.timeout_seconds)?;
            let (_, chunks) = self.weight_chunks(spec).await?;
            let (tx, rx) = mpsc::channel(8);
            trace::spawn(async move {
                for c in chunks {
                    if tx.send(Ok(c)).await.is_err() {
                        break;
                    }
                }
            });
            Ok(Response::new(ReceiverStream::new(rx)))
        })
        .await
    }

    async fn publish_weights(
        &self,
        request: Request<v1::PublishWeightsRequest>,
    ) -> Result<Response<v1::PublishWeightsReply>, Status> {
        let (metadata, _, r) = request.into_parts();
        trace::serve("learner.publish_weights", &metadata, async move {
            let spec = WeightsSpec::new(r.min_version, &r.dtype, r.chunk_bytes, r.timeout_seconds)?;
            let (version, chunks) = if r.reference {
                (0, self.reference_chunks(spec).await?)
            } else {
                self.weight_chunks(spec).await?
            };
            let outcomes =
                publish::publish(&r.actor_addresses, Arc::new(chunks), spec.timeout).await;
            for o in &outcomes {
                let result = match (&o.error, o.unreachable) {
                    (None, _) => "ok",
                    (Some(_), true) => "unreachable",
                    (Some(_), false) => "failed",
                };
                self.metrics
                    .actor_updates
                    .with_label_values(&[result])
                    .inc();
            }
            Ok(Response::new(v1::PublishWeightsReply {
                version,
                actors: outcomes.iter().map(publish::Outcome::to_proto).collect(),
            }))
        })
        .await
    }

    async fn set_reference_rewards(
        &self,
        request: Request<v1::ReferenceRewards>,
    ) -> Result<Response<v1::SetReferenceRewardsReply>, Status> {
        let (metadata, _, r) = request.into_parts();
        trace::serve("learner.set_reference_rewards", &metadata, async move {
            let rows = r
                .rows
                .into_iter()
                .map(|row| (row.prompt_id, row.values))
                .collect();
            let n = self
                .call(|reply| Command::SetReference {
                    objectives: r.objectives,
                    rows,
                    reply,
                })
                .await
                .map_err(|s| Status::invalid_argument(s.message().to_string()))?;
            Ok(Response::new(v1::SetReferenceRewardsReply {
                prompts: n as u64,
            }))
        })
        .await
    }

    async fn save_checkpoint(
        &self,
        request: Request<v1::SaveCheckpointRequest>,
    ) -> Result<Response<v1::CheckpointInfo>, Status> {
        let (metadata, _, r) = request.into_parts();
        trace::serve("learner.save_checkpoint", &metadata, async move {
            // Every rank holds the same state and they share the output folder.
            if self.rank != 0 {
                return Err(Status::failed_precondition(format!(
                    "rank {} does not write checkpoints; ask rank 0",
                    self.rank
                )));
            }
            let export =
                (!r.export_policy_dir.is_empty()).then(|| PathBuf::from(r.export_policy_dir));
            let saved = self.call(|reply| Command::Save { export, reply }).await?;
            Ok(Response::new(v1::CheckpointInfo {
                path: saved.path.display().to_string(),
                step: saved.step,
                weight_version: saved.version,
                policy_dir: saved
                    .policy_dir
                    .map(|d| d.display().to_string())
                    .unwrap_or_default(),
            }))
        })
        .await
    }

    async fn restore(
        &self,
        request: Request<v1::RestoreRequest>,
    ) -> Result<Response<v1::RestoreReply>, Status> {
        let (metadata, _, r) = request.into_parts();
        trace::serve("learner.restore", &metadata, async move {
            let path = (!r.path.is_empty()).then(|| PathBuf::from(r.path));
            let (path, step, version, cursor) = self
                .call(|reply| Command::Restore { path, reply })
                .await
                .map_err(|s| Status::failed_precondition(s.message().to_string()))?;
            Ok(Response::new(v1::RestoreReply {
                path: path.display().to_string(),
                step,
                weight_version: version,
                data_cursor: cursor,
            }))
        })
        .await
    }

    async fn info(
        &self,
        request: Request<v1::LearnerInfoRequest>,
    ) -> Result<Response<v1::LearnerInfo>, Status> {
        trace::serve("learner.info", request.metadata(), async {
            let s = self.status.borrow().clone();
            Ok(Response::new(v1::LearnerInfo {
                step: s.step,
                weight_version: s.version,
                rank: self.rank,
                world_size: self.world,
                buffered_trajectories: self.buffer.total() as u64,
                algorithm: self.algorithm.clone(),
                objectives: self.objectives.clone(),
            }))
        })
        .await
    }
}

/// The snapshot as weight-update chunks in `dtype`.
pub fn encode_snapshot(
    snapshot: &Snapshot,
    dtype: DType,
    chunk_bytes: usize,
) -> Vec<v1::WeightChunk> {
    let wire_dtype = match dtype {
        DType::F32 => v1::DType::F32,
        DType::BF16 => v1::DType::Bf16,
        DType::F16 => v1::DType::F16,
    };
    let tensors: Vec<WireTensor> = snapshot
        .tensors
        .iter()
        .map(|t| WireTensor {
            name: t.name.clone(),
            dtype: wire_dtype,
            shape: t.shape.iter().map(|&d| d as u64).collect(),
            data: rlhf_model::dtype::encode(dtype, &t.values),
        })
        .collect();
    to_chunks(&tensors, snapshot.version, chunk_bytes)
}

/// Serves a learner on `listener` until `shutdown`.
pub async fn serve(
    learner: Learner,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let registry = learner.metrics.registry.clone();
    let server = LearnerServiceServer::new(learner)
        .max_decoding_message_size(limits::BULK)
        .max_encoding_message_size(limits::BULK);
    let name = <LearnerServiceServer<Learner> as NamedService>::NAME;
    let host = ServiceHost::new(tonic::service::Routes::new(server), vec![name], registry);
    host.serve(listener, shutdown).await?;
    Ok(())
}
