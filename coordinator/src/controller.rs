//! The training controller of one job: calibration of r_ref, then per step generate → score →
//! push → learner step → weight sync → record, in `sync` or bounded-staleness `async` mode, with
//! periodic evaluation and checkpoints. Bulk data never passes through the controller
//! (shared/DESIGN.md, the data plane): trajectories go from the actors straight to the learners
//! and the controller receives per-sample summaries (ids, rewards, token counts); weights go
//! from learner rank 0 straight to every actor in parallel (`PublishWeights`). So a controller
//! stays small whatever the model size. Every call of one step carries that step's trace
//! context ([`rlhf_proto::trace`]).
//!
//! Failures: an actor that stops answering has its unfinished prompts re-sent to the other
//! actors (sample seeds depend only on (seed, prompt, sample), so the redone samples are the
//! same); a learner that dies is replaced through the [`Supervisor`] and restored from its last
//! checkpoint, and the job resumes after the checkpointed step (no step is applied twice); a
//! reward server that fails makes the actors retry with backoff and then fail the step, and the
//! job fails with that reason instead of hanging.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use rlhf_proto::client::{ActorClient, LearnerClient, Timeouts};
use rlhf_proto::error::Failure;
use rlhf_proto::trace::Context as TraceContext;
use rlhf_proto::v1;
use tokio::sync::{mpsc, watch};

use crate::data::{Prompt, load_prompts, step_prompts};
use crate::job::{JobSpec, RolloutMode};
use crate::state::JobState;

/// What the controller reports while it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    State {
        state: JobState,
        reason: String,
    },
    Step {
        step: u64,
        total: u64,
        metrics: BTreeMap<String, f64>,
    },
    Log(String),
}

impl Event {
    pub fn state(state: JobState, reason: impl Into<String>) -> Event {
        Event::State {
            state,
            reason: reason.into(),
        }
    }
}

/// Addresses of a job's workers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Endpoints {
    pub actors: Vec<String>,
    /// In rank order; rank 0 serves weights and checkpoints.
    pub learners: Vec<String>,
    /// Reward server replicas; actors spread their scoring over them.
    pub rewards: Vec<String>,
}

/// Replaces workers that died.
#[tonic::async_trait]
pub trait Supervisor: Send + Sync {
    /// Fresh learner ranks (all of them: a data-parallel ring is relaunched whole) that restored
    /// the latest checkpoint, in rank order; an error when they cannot be had.
    async fn replace_learners(&self) -> Result<Vec<String>>;
    /// Addresses of actors that joined since the last call (replacements).
    async fn new_actors(&self) -> Vec<String>;
    /// The reward server replicas serving now, dead ones restarted (waiting for them up to the
    /// launcher's ready timeout); `None` when nothing changed since the last call.
    async fn rewards(&self) -> Result<Option<Vec<String>>>;
}

/// A job's running workers and who replaces them when they die.
pub struct Gang {
    pub endpoints: Endpoints,
    pub supervisor: Box<dyn Supervisor>,
}

/// A supervisor that can replace nothing (workers started by someone else).
pub struct NoSupervisor;

#[tonic::async_trait]
impl Supervisor for NoSupervisor {
    async fn replace_learners(&self) -> Result<Vec<String>> {
        bail!("a learner died and this launcher cannot replace it")
    }
    async fn new_actors(&self) -> Vec<String> {
        Vec::new()
    }
    async fn rewards(&self) -> Result<Option<Vec<String>>> {
        Ok(None)
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded,
    /// Stopped on request after a checkpoint at this step.
    Stopped {
        step: u64,
    },
}

/// The controller of one job.
pub struct Controller {
    job: JobSpec,
    /// The job's id (its record's), carried in every call's trace context.
    job_id: String,
    prompts: Vec<Prompt>,
    eval_prompts: Vec<Prompt>,
    endpoints: Endpoints,
    events: mpsc::UnboundedSender<Event>,
    out: PathBuf,
    stop: watch::Receiver<bool>,
    supervisor: Box<dyn Supervisor>,
    version: u64,
}

/// The size of one weight chunk on the wire (many per tensor of a large model).
const WEIGHT_CHUNK_BYTES: u32 = 4 << 20;

/// Whether a failed call says the peer process is gone.
fn is_unreachable(s: &tonic::Status) -> bool {
    Failure::of(s).peer_gone()
}

fn actor_client(address: &str, timeout: Duration) -> Result<ActorClient> {
    rlhf_proto::client::actor(address, Timeouts::request(timeout))
        .with_context(|| format!("actor address {address}"))
}

fn learner_client(address: &str, timeout: Duration) -> Result<LearnerClient> {
    rlhf_proto::client::learner(address, Timeouts::request(timeout))
        .with_context(|| format!("learner address {address}"))
}

impl Controller {
    pub fn new(
        job: JobSpec,
        job_id: String,
        endpoints: Endpoints,
        events: mpsc::UnboundedSender<Event>,
        stop: watch::Receiver<bool>,
        supervisor: Box<dyn Supervisor>,
    ) -> Result<Controller> {
        let prompts = load_prompts(&job.data.prompts)?;
        let eval_prompts = match &job.data.eval_prompts {
            Some(p) => {
                let mut e = load_prompts(p)?;
                e.truncate(job.evaluation.max_prompts);
                e
            }
            None => Vec::new(),
        };
        let out = job.output_dir();
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        Ok(Controller {
            job,
            job_id,
            prompts,
            eval_prompts,
            endpoints,
            events,
            out,
            stop,
            supervisor,
            version: 0,
        })
    }

    fn emit(&self, e: Event) {
        let _ = self.events.send(e);
    }

    fn state(&self, state: JobState, reason: impl Into<String>) {
        self.emit(Event::State {
            state,
            reason: reason.into(),
        });
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.job.rollout.step_timeout_seconds)
    }

    fn stop_requested(&self) -> bool {
        *self.stop.borrow()
    }

    /// Runs the job to its last step (or until a stop request, after a checkpoint).
    pub async fn run(&mut self) -> Result<Outcome> {
        let info = self.learner_info().await?;
        let start = info.step + 1;
        self.version = info.weight_version;
        if info.step > 0 {
            self.emit(Event::Log(format!(
                "resuming after step {} (weights v{})",
                info.step, info.weight_version
            )));
        }
        // Lines of steps after the learner's state (a crash after the last checkpoint) go.
        truncate_metrics(&self.out.join("metrics.jsonl"), info.step)?;
        // Actors start from the policy folder; after a resume they need the learner's weights.
        if self.version > 0 {
            self.sync_weights(self.version).await?;
        }
        if self.job.needs_reference_rewards() {
            self.state(
                JobState::Calibrating,
                "estimating r_ref from the reference policy",
            );
            let trace = TraceContext::new(&self.job_id, 0);
            trace.scope(self.calibrate()).await.context("calibration")?;
        }
        self.state(JobState::Running, format!("from step {start}"));
        let total = self.job.rollout.steps;
        let mut metrics_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.out.join("metrics.jsonl"))
            .context("opening metrics.jsonl")?;
        let mut step = start;
        let mut prefetched: Option<tokio::task::JoinHandle<Result<Rollouts>>> = None;
        while step <= total {
            if self.stop_requested() {
                return self.checkpoint_and_stop(step - 1).await;
            }
            let started = Instant::now();
            let generated = match prefetched.take() {
                Some(handle) => handle.await.map_err(|e| anyhow!("generation task: {e}"))?,
                None => {
                    let trace = TraceContext::new(&self.job_id, step);
                    trace.scope(self.generate_step(step, self.version)).await
                }
            };
            let rollouts = match generated {
                Ok(r) => r,
                Err(e)
                    if e.downcast_ref::<DownstreamError>().is_some()
                        && !self.learners_alive().await =>
                {
                    // The actors could not push: the learner is gone.
                    self.emit(Event::Log(format!(
                        "learner died during step {step} ({e}); replacing it"
                    )));
                    step = self.recover_learner().await? + 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if self.job.rollout.mode == RolloutMode::Async && step < total {
                // Generate the next step with the current weights while the learner trains.
                let generator = self.generator();
                let next = step + 1;
                let version = self.version;
                let trace = TraceContext::new(&self.job_id, next);
                prefetched =
                    Some(tokio::spawn(trace.scope(async move {
                        generator.generate_step(next, version).await
                    })));
            }
            let trace = TraceContext::new(&self.job_id, step);
            let report = match trace
                .clone()
                .scope(self.learner_step(step, rollouts.samples))
                .await
            {
                Ok(r) => r,
                Err(failure) => {
                    let e = match failure {
                        LearnerFailure::Died(e) => e,
                        // It answered with an error or not in time, and now does not answer.
                        LearnerFailure::Failed(e) if !self.learners_alive().await => e,
                        LearnerFailure::Failed(e) => return Err(e),
                    };
                    self.emit(Event::Log(format!(
                        "learner died in step {step}: {e:#}; replacing it"
                    )));
                    if let Some(h) = prefetched.take() {
                        h.abort();
                    }
                    step = self.recover_learner().await? + 1;
                    continue;
                }
            };
            if report.already_applied {
                self.emit(Event::Log(format!(
                    "step {step} was already applied; skipping"
                )));
                step += 1;
                continue;
            }
            self.version = report.weight_version;
            let t = Instant::now();
            let version = self.version;
            if let Err(e) = trace.scope(self.sync_weights(version)).await {
                if self.learners_alive().await {
                    return Err(e);
                }
                self.emit(Event::Log(format!(
                    "learner died while its weights were synced after step {step} ({e:#}); replacing it"
                )));
                if let Some(h) = prefetched.take() {
                    h.abort();
                }
                // The replacement syncs the actors itself.
                let restored = self.recover_learner().await?;
                if restored < step {
                    step = restored + 1;
                    continue;
                }
                // The step's update survived in the checkpoint: it is recorded below.
            }
            let sync_seconds = t.elapsed().as_secs_f64();
            let mut metrics: BTreeMap<String, f64> = report.metrics.into_iter().collect();
            metrics.insert("rollout/generate_s".into(), rollouts.seconds);
            metrics.insert(
                "rollout/tokens_per_s".into(),
                rollouts.tokens as f64 / rollouts.seconds.max(1e-9),
            );
            metrics.insert(
                "rollout/redistributed_prompts".into(),
                rollouts.redistributed as f64,
            );
            metrics.insert("time/weight_sync_s".into(), sync_seconds);
            metrics.insert("time/step_total_s".into(), started.elapsed().as_secs_f64());
            metrics.insert("weight_version".into(), self.version as f64);
            let every = self.job.evaluation.every_steps;
            if !self.eval_prompts.is_empty()
                && ((every > 0 && step.is_multiple_of(every)) || step == total)
            {
                let trace = TraceContext::new(&self.job_id, step);
                metrics.extend(trace.scope(self.evaluate(step)).await?);
            }
            if self.job.learner.checkpoint.every_steps == 0 && step == total {
                self.save_checkpoint().await?;
            }
            let line = metrics_line(step, &metrics);
            use std::io::Write;
            writeln!(metrics_file, "{line}").context("writing metrics.jsonl")?;
            self.emit(Event::Step {
                step,
                total,
                metrics,
            });
            step += 1;
        }
        Ok(Outcome::Succeeded)
    }

    async fn checkpoint_and_stop(&mut self, last: u64) -> Result<Outcome> {
        if last > 0 {
            self.save_checkpoint().await?;
        }
        Ok(Outcome::Stopped { step: last })
    }

    /// Whether every learner rank answers `Info`.
    async fn learners_alive(&self) -> bool {
        for address in &self.endpoints.learners {
            let Ok(mut c) = learner_client(address, Duration::from_secs(3)) else {
                return false;
            };
            let ok =
                tokio::time::timeout(Duration::from_secs(3), c.info(v1::LearnerInfoRequest {}))
                    .await
                    .is_ok_and(|r| r.is_ok());
            if !ok {
                return false;
            }
        }
        true
    }

    async fn learner_info(&self) -> Result<v1::LearnerInfo> {
        let mut c = learner_client(&self.endpoints.learners[0], Duration::from_secs(30))?;
        Ok(c.info(v1::LearnerInfoRequest {})
            .await
            .context("learner Info")?
            .into_inner())
    }

    async fn save_checkpoint(&self) -> Result<()> {
        let mut c = learner_client(&self.endpoints.learners[0], self.timeout())?;
        let info = c
            .save_checkpoint(v1::SaveCheckpointRequest::default())
            .await
            .context("SaveCheckpoint")?
            .into_inner();
        self.emit(Event::Log(format!(
            "checkpoint {} (step {})",
            info.path, info.step
        )));
        Ok(())
    }

    /// A generator sharing this controller's settings, for a background task.
    fn generator(&self) -> Generator {
        Generator {
            job: self.job.clone(),
            job_id: self.job_id.clone(),
            prompts: self.prompts.clone(),
            actors: self.endpoints.actors.clone(),
            learners: self.endpoints.learners.clone(),
            rewards: self.endpoints.rewards.clone(),
            events: self.events.clone(),
        }
    }

    async fn generate_step(&mut self, step: u64, version: u64) -> Result<Rollouts> {
        let joined = self.supervisor.new_actors().await;
        if !joined.is_empty() {
            self.emit(Event::Log(format!(
                "{} actor(s) joined; giving them weights v{}",
                joined.len(),
                self.version
            )));
            for a in &joined {
                self.update_actor(a, self.version).await?;
            }
            self.endpoints.actors.extend(joined);
        }
        let generator = self.generator();
        let r = generator.generate_step(step, version).await?;
        self.endpoints.actors = r.live_actors.clone();
        Ok(r)
    }

    /// r_ref per prompt and objective: the configured quantile of K reference samples' rewards.
    async fn calibrate(&mut self) -> Result<()> {
        let path = self.out.join("reference_rewards.json");
        let objectives = self.job.objective_names();
        let table: BTreeMap<String, Vec<f32>> = if path.is_file() {
            let text = std::fs::read_to_string(&path)?;
            serde_json::from_str(&text).with_context(|| format!("{}: invalid", path.display()))?
        } else {
            let k = self.job.rewards.reference_samples;
            let prompts: Vec<Prompt> = self.prompts.clone();
            let generator = self.generator();
            let completions = generator
                .generate(Pass {
                    prompts: &prompts,
                    n: k,
                    temperature: self.job.rollout.temperature,
                    min_version: 0,
                    push_step: None,
                    seed_step: u64::MAX - 1,
                    full: false,
                })
                .await?
                .0;
            let mut by_prompt: HashMap<String, Vec<Vec<f32>>> = HashMap::new();
            for c in completions {
                by_prompt.entry(c.prompt_id).or_default().push(c.rewards);
            }
            let q = self.job.rewards.reference_quantile;
            let est = self.job.rewards.reference_estimator;
            let table: BTreeMap<String, Vec<f32>> = by_prompt
                .into_iter()
                .map(|(id, rows)| {
                    let values = (0..objectives.len())
                        .map(|o| {
                            let xs: Vec<f32> = rows.iter().map(|r| r[o]).collect();
                            rlhf_learner::algo::transform::reference_reward(&xs, q, est)
                        })
                        .collect();
                    (id, values)
                })
                .collect();
            std::fs::write(&path, serde_json::to_string_pretty(&table)?)?;
            table
        };
        let rows = table
            .into_iter()
            .map(|(prompt_id, values)| v1::ReferenceRow { prompt_id, values })
            .collect::<Vec<_>>();
        let n = rows.len();
        for address in &self.endpoints.learners {
            let mut c = learner_client(address, self.timeout())?;
            c.set_reference_rewards(v1::ReferenceRewards {
                objectives: objectives.clone(),
                rows: rows.clone(),
            })
            .await
            .context("SetReferenceRewards")?;
        }
        self.emit(Event::Log(format!("r_ref set for {n} prompts")));
        Ok(())
    }

    async fn learner_step(
        &self,
        step: u64,
        expected: u64,
    ) -> Result<v1::StepReport, LearnerFailure> {
        let request = v1::StepRequest {
            step,
            expected_samples: expected,
            timeout_seconds: self.job.rollout.step_timeout_seconds,
            data_cursor: step,
            last_round: true,
        };
        let calls = self.endpoints.learners.iter().map(|address| async move {
            let mut c = learner_client(address, self.timeout()).map_err(LearnerFailure::Failed)?;
            c.step(request).await.map(|r| r.into_inner()).map_err(|s| {
                if is_unreachable(&s) {
                    LearnerFailure::Died(anyhow!("{address}: {}", s.message()))
                } else {
                    LearnerFailure::Failed(anyhow!(
                        "learner {address}, step {step}: {:?}: {}",
                        s.code(),
                        s.message()
                    ))
                }
            })
        });
        let mut reports = futures::future::join_all(calls).await;
        // Rank 0's report stands for the step (every rank computes the same update).
        reports.swap_remove(0)
    }

    /// Replaces the dead learner(s); returns the step they restored.
    async fn recover_learner(&mut self) -> Result<u64> {
        self.state(JobState::Running, "paused: replacing the learner");
        self.endpoints.learners = self.supervisor.replace_learners().await?;
        let info = self.learner_info().await?;
        self.version = info.weight_version;
        self.sync_weights(self.version).await?;
        if self.job.needs_reference_rewards() {
            let trace = TraceContext::new(&self.job_id, 0);
            trace.scope(self.calibrate()).await?;
        }
        // Steps after the checkpoint are trained again: drop their old metric lines.
        truncate_metrics(&self.out.join("metrics.jsonl"), info.step)?;
        self.emit(Event::Log(format!(
            "learner back at step {} (weights v{})",
            info.step, info.weight_version
        )));
        self.state(
            JobState::Running,
            format!("resumed after step {}", info.step),
        );
        Ok(info.step)
    }

    /// Has learner rank 0 push its weights of `version` to every actor (in parallel, straight
    /// from the learner); actors that are gone are dropped from the job.
    async fn sync_weights(&mut self, version: u64) -> Result<()> {
        let actors = self.endpoints.actors.clone();
        let updates = self.publish_weights(version, &actors).await?;
        let mut live = Vec::new();
        for update in updates {
            if update.ok {
                live.push(update.address);
            } else if update.unreachable || update.timed_out {
                // An actor that cannot take weights within a step's timeout is as good as gone.
                self.emit(Event::Log(format!(
                    "actor {} is gone: {}",
                    update.address, update.error
                )));
            } else {
                bail!(
                    "actor {} refused weights v{version}: {}",
                    update.address,
                    update.error
                );
            }
        }
        if live.is_empty() {
            bail!("no actor left to generate with");
        }
        self.endpoints.actors = live;
        Ok(())
    }

    /// `PublishWeights` on learner rank 0: its weights of at least `version` to `actors`.
    async fn publish_weights(
        &self,
        version: u64,
        actors: &[String],
    ) -> Result<Vec<v1::ActorUpdate>> {
        // The learner waits up to a step's timeout for the version, then gives each actor as long.
        let deadline = 2 * self.timeout() + Duration::from_secs(10);
        let mut c = learner_client(&self.endpoints.learners[0], deadline)?;
        let reply = c
            .publish_weights(v1::PublishWeightsRequest {
                min_version: version,
                dtype: self.job.learner.optim.weights_dtype.clone(),
                chunk_bytes: WEIGHT_CHUNK_BYTES,
                timeout_seconds: self.job.rollout.step_timeout_seconds,
                actor_addresses: actors.to_vec(),
                reference: false,
            })
            .await
            .context("PublishWeights")?
            .into_inner();
        Ok(reply.actors)
    }

    /// Gives a joining actor the current weights.
    async fn update_actor(&self, address: &str, version: u64) -> Result<()> {
        if version == 0 {
            return Ok(());
        }
        let update = self
            .publish_weights(version, &[address.to_string()])
            .await?
            .pop()
            .context("PublishWeights: no reply for the actor")?;
        if !update.ok {
            bail!("actor {address}: weights v{version}: {}", update.error);
        }
        Ok(())
    }

    /// Greedy (or the configured temperature) completions of the eval prompts, scored; written to
    /// `eval/step-<n>.jsonl`; returns the mean reward per objective.
    async fn evaluate(&self, step: u64) -> Result<BTreeMap<String, f64>> {
        let generator = self.generator();
        let (completions, _) = generator
            .generate(Pass {
                prompts: &self.eval_prompts,
                n: 1,
                temperature: self.job.evaluation.temperature,
                min_version: self.version,
                push_step: None,
                seed_step: step,
                full: true,
            })
            .await
            .context("evaluation")?;
        let dir = self.out.join("eval");
        std::fs::create_dir_all(&dir)?;
        let mut lines = String::new();
        let names = self.job.objective_names();
        let mut sums = vec![0.0f64; names.len()];
        for c in &completions {
            for (s, r) in sums.iter_mut().zip(&c.rewards) {
                *s += *r as f64;
            }
            let rewards: serde_json::Map<String, serde_json::Value> = names
                .iter()
                .zip(&c.rewards)
                .map(|(n, r)| (n.clone(), serde_json::json!(r)))
                .collect();
            lines.push_str(&serde_json::json!({"prompt_id": c.prompt_id, "text": c.text, "tokens": c.completion_tokens, "finish_reason": c.finish_reason, "rewards": rewards}).to_string());
            lines.push('\n');
        }
        std::fs::write(dir.join(format!("step-{step:06}.jsonl")), lines)?;
        let n = completions.len().max(1) as f64;
        let mut m: BTreeMap<String, f64> = names
            .iter()
            .zip(sums)
            .map(|(name, s)| (format!("eval/{name}"), s / n))
            .collect();
        let len = completions
            .iter()
            .map(|c| c.completion_tokens as f64)
            .sum::<f64>()
            / n;
        m.insert("eval/length".into(), len);
        Ok(m)
    }
}

/// An actor is alive but a service it depends on (reward server, learner) failed.
#[derive(Debug, thiserror::Error)]
#[error("actor {actor}: {message}")]
pub struct DownstreamError {
    pub actor: String,
    pub message: String,
}

/// Whether an actor answers `Info` within a few seconds.
async fn actor_alive(address: &str) -> bool {
    let Ok(mut c) = actor_client(address, Duration::from_secs(3)) else {
        return false;
    };
    tokio::time::timeout(Duration::from_secs(3), c.info(v1::ActorInfoRequest {}))
        .await
        .is_ok_and(|r| r.is_ok())
}

enum LearnerFailure {
    /// The process is unreachable.
    Died(anyhow::Error),
    /// It answered with an error.
    Failed(anyhow::Error),
}

/// A step's rollouts.
pub struct Rollouts {
    pub samples: u64,
    pub tokens: u64,
    pub seconds: f64,
    pub redistributed: usize,
    pub live_actors: Vec<String>,
}

/// One generation pass over a set of prompts.
struct Pass<'a> {
    prompts: &'a [Prompt],
    /// Samples per prompt.
    n: u32,
    temperature: f32,
    /// The weight version the actors must have at least.
    min_version: u64,
    /// Trajectories go to the learners under this step.
    push_step: Option<u64>,
    /// Seeds the samples (with the job's seed, the prompt and the sample index).
    seed_step: u64,
    /// Whole completions (text, tokens: evaluation) instead of per-sample summaries.
    full: bool,
}

/// Sends prompts to actors and collects completions, re-sending an actor's unfinished prompts
/// to the others when it stops answering.
#[derive(Clone)]
pub struct Generator {
    job: JobSpec,
    job_id: String,
    prompts: Vec<Prompt>,
    actors: Vec<String>,
    learners: Vec<String>,
    rewards: Vec<String>,
    events: mpsc::UnboundedSender<Event>,
}

impl Generator {
    async fn generate_step(&self, step: u64, version: u64) -> Result<Rollouts> {
        let started = Instant::now();
        let idx = step_prompts(
            self.prompts.len(),
            self.job.rollout.prompts_per_step,
            self.job.seed,
            step,
        );
        // A prompt may come twice in a step when the data is smaller than a step: ids stay unique.
        let prompts: Vec<Prompt> = idx
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                let mut p = self.prompts[i].clone();
                if idx[..k].contains(&i) {
                    p.id = format!("{}#{k}", p.id);
                }
                p
            })
            .collect();
        let n = self.job.rollout.samples_per_prompt;
        let (completions, (redistributed, live)) = self
            .generate(Pass {
                prompts: &prompts,
                n,
                temperature: self.job.rollout.temperature,
                min_version: version.saturating_sub(self.staleness()),
                push_step: Some(step),
                seed_step: step,
                full: false,
            })
            .await?;
        let tokens = completions.iter().map(|c| c.completion_tokens as u64).sum();
        Ok(Rollouts {
            samples: completions.len() as u64,
            tokens,
            seconds: started.elapsed().as_secs_f64(),
            redistributed,
            live_actors: live,
        })
    }

    fn staleness(&self) -> u64 {
        match self.job.rollout.mode {
            RolloutMode::Sync => 0,
            RolloutMode::Async => self.job.rollout.max_staleness,
        }
    }

    /// Generates `pass.n` samples of every prompt over the actors. Returns the completions
    /// (summaries unless `pass.full`) and (re-sent prompts, actors still alive).
    async fn generate(
        &self,
        pass: Pass<'_>,
    ) -> Result<(Vec<v1::Completion>, (usize, Vec<String>))> {
        let Pass {
            prompts,
            n,
            temperature,
            min_version,
            push_step,
            seed_step,
            full,
        } = pass;
        let r = &self.job.rollout;
        let sampling = v1::SamplingParams {
            samples_per_prompt: n,
            temperature,
            top_k: r.top_k,
            top_p: r.top_p,
            max_new_tokens: r.max_new_tokens,
            stop: r.stop.clone(),
            stop_token_ids: vec![],
            seed: self
                .job
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add(seed_step),
            ignore_eos: false,
        };
        let mut live = self.actors.clone();
        let mut pending: Vec<Prompt> = prompts.to_vec();
        let mut done: HashMap<(String, u32), v1::Completion> = HashMap::new();
        let mut redistributed = 0usize;
        let timeout = Duration::from_secs_f64(r.step_timeout_seconds);
        while !pending.is_empty() {
            if live.is_empty() {
                bail!("no actor left: every actor stopped answering");
            }
            // Round-robin shards, one Generate stream per actor.
            let shards: Vec<(String, Vec<Prompt>)> = live
                .iter()
                .enumerate()
                .map(|(a, address)| {
                    (
                        address.clone(),
                        pending
                            .iter()
                            .skip(a)
                            .step_by(live.len())
                            .cloned()
                            .collect(),
                    )
                })
                .filter(|(_, s): &(String, Vec<Prompt>)| !s.is_empty())
                .collect();
            let calls = shards.into_iter().map(|(address, shard)| {
                let request = v1::GenerateRequest {
                    job_id: self.job_id.clone(),
                    summaries_only: !full,
                    step: push_step.unwrap_or(0),
                    prompts: shard.iter().map(Prompt::to_proto).collect(),
                    sampling: Some(sampling.clone()),
                    min_weight_version: min_version,
                    reward_addresses: self.rewards.clone(),
                    reward_timeout_seconds: self.job.rewards.timeout_seconds,
                    learner_addresses: if push_step.is_some() {
                        self.learners.clone()
                    } else {
                        vec![]
                    },
                };
                async move {
                    let mut got = Vec::new();
                    let result: Result<(), tonic::Status> = async {
                        let mut c = actor_client(&address, timeout)
                            .map_err(|e| tonic::Status::unavailable(format!("transport: {e}")))?;
                        let mut stream = c.generate(request).await?.into_inner();
                        while let Some(m) = stream.message().await? {
                            got.push(m);
                        }
                        Ok(())
                    }
                    .await;
                    (address, shard, got, result)
                }
            });
            let results = tokio::time::timeout(timeout, futures::future::join_all(calls))
                .await
                .map_err(|_| {
                    anyhow!(
                        "generation did not finish within {} s",
                        r.step_timeout_seconds
                    )
                })?;
            let mut missing: Vec<Prompt> = Vec::new();
            for (address, shard, got, result) in results {
                for c in got {
                    done.insert((c.prompt_id.clone(), c.sample_index), c);
                }
                if let Err(s) = result {
                    // An error may be the actor's own death, or something it depends on (the
                    // reward server, a learner) failing: ask the actor whether it is alive.
                    if actor_alive(&address).await {
                        return Err(DownstreamError {
                            actor: address.clone(),
                            message: format!("{:?}: {}", s.code(), s.message()),
                        }
                        .into());
                    }
                    let _ = self.events.send(Event::Log(format!(
                        "actor {address} stopped answering ({}); re-sending its prompts",
                        s.message()
                    )));
                    live.retain(|a| a != &address);
                }
                let unfinished: Vec<Prompt> = shard
                    .into_iter()
                    .filter(|p| (0..n).any(|j| !done.contains_key(&(p.id.clone(), j))))
                    .collect();
                redistributed += if live.contains(&address) {
                    0
                } else {
                    unfinished.len()
                };
                missing.extend(unfinished);
            }
            let before: HashSet<String> = pending.iter().map(|p| p.id.clone()).collect();
            pending = missing;
            if !pending.is_empty()
                && pending.iter().all(|p| before.contains(&p.id))
                && live.len() == self.actors.len()
            {
                bail!(
                    "{} prompts were not completed although every actor answered",
                    pending.len()
                );
            }
        }
        let mut out: Vec<v1::Completion> = done.into_values().collect();
        out.sort_by(|a, b| (&a.prompt_id, a.sample_index).cmp(&(&b.prompt_id, b.sample_index)));
        Ok((out, (redistributed, live)))
    }
}

/// Keeps the lines of `metrics.jsonl` up to `last_step`.
fn truncate_metrics(path: &std::path::Path, last_step: u64) -> Result<()> {
    if !path.is_file() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path)?;
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= last_step)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    std::fs::write(path, out)?;
    Ok(())
}

/// One line of `metrics.jsonl`.
pub fn metrics_line(step: u64, metrics: &BTreeMap<String, f64>) -> String {
    let mut obj = serde_json::Map::new();
    obj.insert("step".into(), serde_json::json!(step));
    for (k, v) in metrics {
        obj.insert(k.clone(), serde_json::json!(v));
    }
    serde_json::Value::Object(obj).to_string()
}
