//! The training controller of one job: calibration of r_ref, then per step generate → score →
//! push → learner step → weight sync → record, in `sync` or bounded-staleness `async` mode, with
//! periodic evaluation and checkpoints. Bulk data never passes through the controller
//! (shared/DESIGN.md, the data plane): trajectories go from the actors straight to the learners
//! and the controller receives per-sample summaries (ids, rewards, token counts); weights go
//! from learner rank 0 straight to every actor in parallel (`PublishWeights`). So a controller
//! stays small whatever the model size. Every call of one step carries that step's trace
//! context ([`rlhf_proto::trace`]).
//!
//! Pipelining: in `async` mode the generation of up to `max_staleness` later steps runs while the
//! learner trains, each started with the weights the actors have then, so a step's samples are at
//! most `max_staleness` versions behind the weights it is trained from (the learner reports
//! `rollout/staleness`). Under GRPO dynamic sampling (DAPO) a step the learner finds short of
//! informative groups gets further generation rounds (up to `rollout.max_generation_rounds`);
//! the learner carries surplus groups to the next step.
//!
//! Calibration: r_ref comes from the reference policy; when `[policy] reference` is not the
//! policy's starting point, learner rank 0 publishes the reference's weights to the actors for
//! the calibration pass and the policy's afterwards. Prompt ids are unique within a step (a
//! prompt that comes twice is `id#k`); the learners get r_ref under the renamed ids too.
//!
//! Failures: an actor that stops answering has its unfinished prompts re-sent to the other
//! actors (sample seeds depend only on (seed, prompt, sample), so the redone samples are the
//! same); a learner that dies is replaced through the [`Supervisor`] (a data-parallel ring as a
//! whole) and restored from its last checkpoint, and the job resumes after the checkpointed step
//! (no step is applied twice; steps trained again are named in the log and the job's state);
//! a reward server that fails makes the actors retry with backoff on the other replicas, and
//! when the step still fails the supervisor restarts dead replicas and the step is generated
//! again (at most [`MAX_REGENERATIONS`] times), else the job fails with that reason instead of
//! hanging. The last step is checkpointed and the trained policy exported as a Hugging Face
//! folder at `<output_dir>/policy`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use rlhf_proto::client::{ActorClient, LearnerClient, Timeouts};
use rlhf_proto::error::Failure;
use rlhf_proto::trace::Context as TraceContext;
use rlhf_proto::v1;
use tokio::sync::{mpsc, watch};

use crate::data::{Prompt, load_prompts, round_prompts};
use crate::job::{JobSpec, RolloutMode};
use crate::state::JobState;
use crate::step_record::{StepRecord, redone_steps};
use crate::store::fenced;
use rlhf_learner::config::Algorithm;

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
    /// [`Supervisor::rewards`] after scoring failed, once the supervisor can know whether a
    /// replica died (a pool learns that a machine is gone only when its lease ends).
    async fn rewards_after_failure(&self) -> Result<Option<Vec<String>>> {
        self.rewards().await
    }
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
    /// `metrics.jsonl` and the pending step, in `out`.
    record: StepRecord,
    stop: watch::Receiver<bool>,
    supervisor: Box<dyn Supervisor>,
    version: u64,
    /// r_ref per prompt id, once calibrated.
    reference: BTreeMap<String, Vec<f32>>,
}

/// A step whose generation runs.
type InFlight = (u64, tokio::task::JoinHandle<Result<Rollouts>>);

/// How often one step is generated again after its scoring failed and reward servers were
/// restarted.
const MAX_REGENERATIONS: u32 = 3;

fn abort_all(inflight: &mut VecDeque<InFlight>) {
    for (_, handle) in inflight.drain(..) {
        handle.abort();
    }
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
            record: StepRecord::new(&out),
            out,
            stop,
            supervisor,
            version: 0,
            reference: BTreeMap::new(),
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
        // Lines of steps after the learner's state (a crash after the last checkpoint) go, and
        // the user is told which finished steps are trained again.
        let recorded = self.record.truncate(info.step)?;
        let redone = redone_steps(recorded, info.step);
        if let Some(note) = &redone {
            self.emit(Event::Log(note.clone()));
        }
        self.refresh_workers().await?;
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
        let from = match redone {
            Some(note) => format!("from step {start} ({note})"),
            None => format!("from step {start}"),
        };
        self.state(JobState::Running, from);
        // A step the learner applied whose reply the previous coordinator did not live to see.
        self.record_lost_steps(recorded, info.step).await?;
        let total = self.job.rollout.steps;
        let mut step = start;
        let mut inflight: VecDeque<InFlight> = VecDeque::new();
        let mut regenerations = 0;
        while step <= total {
            if self.stop_requested() {
                abort_all(&mut inflight);
                return self.checkpoint_and_stop(step - 1).await;
            }
            let started = Instant::now();
            self.refresh_workers().await?;
            self.launch_generation(&mut inflight, step, total);
            let (launched, handle) = inflight.pop_front().expect("the step's generation");
            debug_assert_eq!(launched, step);
            let generated = handle.await.map_err(|e| anyhow!("generation task: {e}"))?;
            let mut rollouts = match generated {
                Ok(r) => r,
                Err(e) if e.downcast_ref::<DownstreamError>().is_some() => {
                    abort_all(&mut inflight);
                    if !self.learners_alive().await {
                        // The actors could not push: the learner is gone.
                        self.emit(Event::Log(format!(
                            "learner died during step {step} ({e}); replacing it"
                        )));
                        step = self.recover_learner().await? + 1;
                        continue;
                    }
                    // Scoring failed: a restarted reward replica makes the step worth redoing
                    // (the samples are seeded, so the redone ones are the same).
                    if regenerations < MAX_REGENERATIONS
                        && self.rewards_restarted(&format!("step {step}"), &e).await?
                    {
                        regenerations += 1;
                        continue;
                    }
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            self.drop_actors(&rollouts.dead_actors);
            // For the line of a step whose reply is lost (written again after training).
            let mut measured = BTreeMap::new();
            rollouts.report(&mut measured);
            self.record.set_pending(step, &measured)?;
            let trace = TraceContext::new(&self.job_id, step);
            let report = match trace.clone().scope(self.train(step, &mut rollouts)).await {
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
                    abort_all(&mut inflight);
                    step = self.recover_learner().await? + 1;
                    continue;
                }
            };
            regenerations = 0;
            if report.already_applied && report.metrics.is_empty() {
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
                abort_all(&mut inflight);
                // The replacement syncs the actors itself; a step its checkpoint holds is
                // recorded by the recovery (from the learner's kept report).
                step = self.recover_learner().await? + 1;
                continue;
            }
            let sync_seconds = t.elapsed().as_secs_f64();
            let mut metrics: BTreeMap<String, f64> = report.metrics.into_iter().collect();
            // After training: DAPO's extra rounds added to the step's rollouts.
            rollouts.report(&mut metrics);
            metrics.insert("time/weight_sync_s".into(), sync_seconds);
            metrics.insert("time/step_total_s".into(), started.elapsed().as_secs_f64());
            self.finish_step(step, metrics).await?;
            step += 1;
        }
        Ok(Outcome::Succeeded)
    }

    /// The end of an applied step: its evaluation when one is due, the final policy after the
    /// last step, then its line in `metrics.jsonl` and its event.
    async fn finish_step(&mut self, step: u64, mut metrics: BTreeMap<String, f64>) -> Result<()> {
        let total = self.job.rollout.steps;
        metrics.insert("weight_version".into(), self.version as f64);
        let every = self.job.evaluation.every_steps;
        if !self.eval_prompts.is_empty()
            && ((every > 0 && step.is_multiple_of(every)) || step == total)
        {
            metrics.extend(self.evaluate_with_restarts(step).await?);
        }
        if step == total {
            self.save_final().await?;
        }
        fenced::check_leading(&format!("recording step {step}")).await?;
        self.record.append(step, &metrics)?;
        self.emit(Event::Step {
            step,
            total,
            metrics,
        });
        Ok(())
    }

    /// Records the steps after `recorded` up to `restored` (the learner's state): steps the
    /// learner applied and checkpointed whose reply was lost with the learner or with the
    /// previous coordinator. The learner answers its last applied step with that step's report,
    /// merged here with the pending file's rollout metrics (see [`StepRecord`]); an older step
    /// has no report left and is said to be missing.
    async fn record_lost_steps(&mut self, recorded: u64, restored: u64) -> Result<()> {
        for step in recorded + 1..=restored {
            let report = match self.learner_step(step, 0, true).await {
                Ok(r) if r.already_applied && !r.metrics.is_empty() => r,
                Ok(_) => {
                    self.emit(Event::Log(format!(
                        "step {step} was applied but its report is lost: it has no metrics line"
                    )));
                    continue;
                }
                Err(LearnerFailure::Died(e) | LearnerFailure::Failed(e)) => {
                    return Err(e.context(format!("asking the learner for step {step}'s report")));
                }
            };
            self.emit(Event::Log(format!(
                "step {step} was applied before its reply was lost; recording it"
            )));
            let mut metrics: BTreeMap<String, f64> = report.metrics.into_iter().collect();
            metrics.extend(self.record.pending(step).unwrap_or_default());
            self.finish_step(step, metrics).await?;
        }
        Ok(())
    }

    /// Starts the generation of every step from `step` up to the pipeline's depth (sync: only
    /// `step`; async: `max_staleness` steps ahead) that is not in flight yet, with the weights
    /// the actors have now. A step generated k steps ahead is trained k versions later.
    fn launch_generation(&self, inflight: &mut VecDeque<InFlight>, step: u64, total: u64) {
        let depth = match self.job.rollout.mode {
            RolloutMode::Sync => 0,
            RolloutMode::Async => self.job.rollout.max_staleness,
        };
        let first = inflight.back().map_or(step, |(s, _)| s + 1);
        for s in first..=(step + depth).min(total) {
            let generator = self.generator();
            let version = self.version;
            let trace = TraceContext::new(&self.job_id, s);
            let task = trace.scope(async move {
                generator
                    .generate_round(s, 1, version, HashSet::new())
                    .await
            });
            inflight.push_back((s, tokio::spawn(task)));
        }
    }

    /// One learner step, with DAPO's extra generation rounds when the learner asks for more
    /// informative groups (at most `rollout.max_generation_rounds` rounds in all).
    async fn train(
        &self,
        step: u64,
        rollouts: &mut Rollouts,
    ) -> Result<v1::StepReport, LearnerFailure> {
        let g = &self.job.learner;
        let dynamic = g.algorithm == Algorithm::Grpo && g.grpo.dynamic_sampling;
        let rounds = if dynamic {
            self.job.rollout.max_generation_rounds.max(1)
        } else {
            1
        };
        loop {
            self.send_aliases(&rollouts.aliases)
                .await
                .map_err(LearnerFailure::Failed)?;
            rollouts.aliases.clear();
            let last = rollouts.rounds >= rounds;
            fenced::check_leading(&format!("training step {step}"))
                .await
                .map_err(LearnerFailure::Failed)?;
            let mut report = self.learner_step(step, rollouts.samples, last).await?;
            if report.missing_groups == 0 || last {
                if dynamic {
                    report
                        .metrics
                        .insert("dynamic_sampling/rounds".into(), rollouts.rounds as f64);
                }
                return Ok(report);
            }
            self.emit(Event::Log(format!(
                "step {step}: {} informative group(s) missing after round {}; generating more",
                report.missing_groups, rollouts.rounds
            )));
            let taken = std::mem::take(&mut rollouts.taken);
            let more = self
                .generator()
                .generate_round(step, rollouts.rounds + 1, self.version, taken)
                .await
                .map_err(LearnerFailure::Failed)?;
            rollouts.absorb(more);
        }
    }

    /// Joins replacement actors (with the current weights) and takes the reward replicas the
    /// supervisor serves now.
    async fn refresh_workers(&mut self) -> Result<()> {
        let joined = self.supervisor.new_actors().await;
        if !joined.is_empty() {
            self.emit(Event::Log(format!(
                "{} actor(s) joined; giving them weights v{}",
                joined.len(),
                self.version
            )));
            // One that died again before taking them is left out (its worker replaces it).
            let live = match self.version {
                0 => joined,
                v => {
                    let updates = self.publish(v, &joined, false).await?;
                    self.took_update(v, updates)?
                }
            };
            self.endpoints.actors.extend(live);
        }
        if let Some(rewards) = self.supervisor.rewards().await? {
            if rewards != self.endpoints.rewards {
                self.emit(Event::Log(format!("reward servers: {rewards:?}")));
            }
            self.endpoints.rewards = rewards;
        }
        Ok(())
    }

    /// After `e` (scoring failed during `what`): whether the supervisor restarted reward
    /// replicas, so that the work is worth redoing; their addresses are taken.
    async fn rewards_restarted(&mut self, what: &str, e: &anyhow::Error) -> Result<bool> {
        let Some(rewards) = self.supervisor.rewards_after_failure().await? else {
            return Ok(false);
        };
        self.emit(Event::Log(format!(
            "{what}: {e:#}; reward servers now {rewards:?}, doing it again"
        )));
        self.endpoints.rewards = rewards;
        Ok(true)
    }

    /// [`Self::evaluate`], done again (at most [`MAX_REGENERATIONS`] times) when its scoring
    /// failed and reward replicas were restarted.
    async fn evaluate_with_restarts(&mut self, step: u64) -> Result<BTreeMap<String, f64>> {
        let mut attempts = 0;
        loop {
            let trace = TraceContext::new(&self.job_id, step);
            match trace.scope(self.evaluate(step)).await {
                Ok(m) => return Ok(m),
                Err(e)
                    if e.downcast_ref::<DownstreamError>().is_some()
                        && attempts < MAX_REGENERATIONS
                        && self
                            .rewards_restarted(&format!("evaluation of step {step}"), &e)
                            .await? =>
                {
                    attempts += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Forgets actors a generation found dead.
    fn drop_actors(&mut self, dead: &[String]) {
        self.endpoints.actors.retain(|a| !dead.contains(a));
    }

    /// Gives the learners the reference rewards of renamed prompts (`id#k`: a prompt that came
    /// twice in a step) under their new ids.
    async fn send_aliases(&self, aliases: &[(String, String)]) -> Result<()> {
        if aliases.is_empty() || !self.job.needs_reference_rewards() {
            return Ok(());
        }
        let rows = aliases
            .iter()
            .map(|(alias, original)| {
                let values = self
                    .reference
                    .get(original)
                    .with_context(|| format!("prompt `{original}` has no reference reward"))?;
                Ok(v1::ReferenceRow {
                    prompt_id: alias.clone(),
                    values: values.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.set_reference_rows(rows).await
    }

    /// Adds r_ref rows on every learner rank.
    async fn set_reference_rows(&self, rows: Vec<v1::ReferenceRow>) -> Result<()> {
        let objectives = self.job.objective_names();
        for address in &self.endpoints.learners {
            let mut c = learner_client(address, self.timeout())?;
            c.set_reference_rewards(v1::ReferenceRewards {
                objectives: objectives.clone(),
                rows: rows.clone(),
            })
            .await
            .context("SetReferenceRewards")?;
        }
        Ok(())
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

    async fn save_checkpoint(&self) -> Result<v1::CheckpointInfo> {
        self.checkpoint(None).await
    }

    /// The last step's checkpoint, with the trained policy exported as a Hugging Face folder
    /// at `<output_dir>/policy`.
    async fn save_final(&self) -> Result<()> {
        let dir = self.out.join("policy");
        let info = self.checkpoint(Some(&dir)).await?;
        if !info.policy_dir.is_empty() {
            self.emit(Event::Log(format!("final policy: {}", info.policy_dir)));
        }
        Ok(())
    }

    async fn checkpoint(&self, export: Option<&std::path::Path>) -> Result<v1::CheckpointInfo> {
        let mut c = learner_client(&self.endpoints.learners[0], self.timeout())?;
        let info = c
            .save_checkpoint(v1::SaveCheckpointRequest {
                export_policy_dir: export.map(|p| p.display().to_string()).unwrap_or_default(),
            })
            .await
            .context("SaveCheckpoint")?
            .into_inner();
        self.emit(Event::Log(format!(
            "checkpoint {} (step {})",
            info.path, info.step
        )));
        Ok(info)
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
            // r_ref comes from the reference policy: when it is not the policy's starting
            // point, the actors serve the reference's weights for the calibration pass.
            let from_reference = self.job.reference_differs();
            if from_reference {
                self.emit(Event::Log(
                    "calibrating with the reference policy's weights on the actors".into(),
                ));
                let actors = self.endpoints.actors.clone();
                self.check_updates(0, self.publish(0, &actors, true).await?)?;
            }
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
            if from_reference {
                // Back to the policy's weights before any step is generated.
                self.sync_weights(self.version).await?;
            }
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
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_string_pretty(&table)?)?;
            std::fs::rename(&tmp, &path)?;
            table
        };
        let rows = table
            .iter()
            .map(|(prompt_id, values)| v1::ReferenceRow {
                prompt_id: prompt_id.clone(),
                values: values.clone(),
            })
            .collect::<Vec<_>>();
        let n = rows.len();
        self.reference = table;
        self.set_reference_rows(rows).await?;
        self.emit(Event::Log(format!("r_ref set for {n} prompts")));
        Ok(())
    }

    async fn learner_step(
        &self,
        step: u64,
        expected: u64,
        last_round: bool,
    ) -> Result<v1::StepReport, LearnerFailure> {
        let request = v1::StepRequest {
            step,
            expected_samples: expected,
            timeout_seconds: self.job.rollout.step_timeout_seconds,
            data_cursor: step,
            last_round,
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
        let recorded = self.record.truncate(info.step)?;
        let redone = redone_steps(recorded, info.step);
        self.emit(Event::Log(format!(
            "learner back at step {} (weights v{})",
            info.step, info.weight_version
        )));
        let reason = match redone {
            Some(note) => {
                self.emit(Event::Log(note.clone()));
                format!("resumed after step {} ({note})", info.step)
            }
            None => format!("resumed after step {}", info.step),
        };
        self.state(JobState::Running, reason);
        self.record_lost_steps(recorded, info.step).await?;
        Ok(info.step)
    }

    /// Has learner rank 0 push its weights of `version` to every actor (in parallel, straight
    /// from the learner); actors that are gone are dropped from the job.
    async fn sync_weights(&mut self, version: u64) -> Result<()> {
        let actors = self.endpoints.actors.clone();
        let updates = self.publish(version, &actors, false).await?;
        self.endpoints.actors = self.check_updates(version, updates)?;
        Ok(())
    }

    /// [`Controller::took_update`], and at least one actor did.
    fn check_updates(&self, version: u64, updates: Vec<v1::ActorUpdate>) -> Result<Vec<String>> {
        let live = self.took_update(version, updates)?;
        if live.is_empty() {
            bail!("no actor left to generate with");
        }
        Ok(live)
    }

    /// The actors that took an update; an actor that refused it fails the job, one that is gone
    /// (or cannot take weights within a step's timeout) is logged and left out.
    fn took_update(&self, version: u64, updates: Vec<v1::ActorUpdate>) -> Result<Vec<String>> {
        let mut live = Vec::new();
        for update in updates {
            if update.ok {
                live.push(update.address);
            } else if update.unreachable || update.timed_out {
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
        Ok(live)
    }

    /// `PublishWeights` on learner rank 0: its weights of at least `version` (or the frozen
    /// reference's) to `actors`.
    async fn publish(
        &self,
        version: u64,
        actors: &[String],
        reference: bool,
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
                reference,
            })
            .await
            .context("PublishWeights")?
            .into_inner();
        Ok(reply.actors)
    }

    /// Gives a joining actor the current weights.
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
    /// Actors that stopped answering during the generation.
    pub dead_actors: Vec<String>,
    /// Generation rounds so far (more than one under DAPO dynamic sampling).
    pub rounds: u32,
    /// The step's prompt ids so far (ids stay unique across rounds).
    pub taken: HashSet<String>,
    /// `(renamed id, original id)` of prompts renamed since the learners last heard of them.
    pub aliases: Vec<(String, String)>,
}

impl Rollouts {
    /// Adds a further round of the same step.
    fn absorb(&mut self, more: Rollouts) {
        self.samples += more.samples;
        self.tokens += more.tokens;
        self.seconds += more.seconds;
        self.redistributed += more.redistributed;
        self.dead_actors.extend(more.dead_actors);
        self.rounds = more.rounds;
        self.taken = more.taken;
        self.aliases.extend(more.aliases);
    }

    /// The step's rollout metrics.
    fn report(&self, metrics: &mut BTreeMap<String, f64>) {
        metrics.insert("rollout/generate_s".into(), self.seconds);
        metrics.insert(
            "rollout/tokens_per_s".into(),
            self.tokens as f64 / self.seconds.max(1e-9),
        );
        metrics.insert("rollout/samples".into(), self.samples as f64);
        metrics.insert(
            "rollout/redistributed_prompts".into(),
            self.redistributed as f64,
        );
    }
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
    /// Generation round `round` of `step` (see [`round_prompts`]), pushed to the learners under
    /// `step`. Round r > 1 seeds its samples apart from the earlier rounds.
    async fn generate_round(
        &self,
        step: u64,
        round: u32,
        version: u64,
        mut taken: HashSet<String>,
    ) -> Result<Rollouts> {
        let started = Instant::now();
        let (prompts, aliases) = round_prompts(
            &self.prompts,
            self.job.rollout.prompts_per_step,
            self.job.seed,
            step,
            round,
            &mut taken,
        );
        let n = self.job.rollout.samples_per_prompt;
        let (completions, (redistributed, live)) = self
            .generate(Pass {
                prompts: &prompts,
                n,
                temperature: self.job.rollout.temperature,
                min_version: version,
                push_step: Some(step),
                seed_step: step ^ (u64::from(round.saturating_sub(1)) << 40),
                full: false,
            })
            .await?;
        let tokens = completions.iter().map(|c| c.completion_tokens as u64).sum();
        Ok(Rollouts {
            samples: completions.len() as u64,
            tokens,
            seconds: started.elapsed().as_secs_f64(),
            redistributed,
            dead_actors: self
                .actors
                .iter()
                .filter(|a| !live.contains(a))
                .cloned()
                .collect(),
            rounds: round,
            taken,
            aliases,
        })
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
