//! One RL step from trajectories to updated weights: reward transforms, KL, advantages, the
//! optimisation epochs with gradient sync, metrics; and the engine's state for checkpoints.
//!
//! Data-parallel ranks all receive every trajectory of a step; each trains on the groups whose
//! index (in a fixed order) is its rank modulo the world size. Losses are normalised by global
//! counts (all-reduced per minibatch) and gradients are summed across micro-batches and ranks,
//! so N ranks compute the same update as one rank with the whole batch.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rlhf_model::burn::module::Module;
use rlhf_model::burn::tensor::{Device, Tensor, TensorData};
use rlhf_model::logprobs::rows_to_host;
use rlhf_model::optim::{AdamWConfig, LrSchedule, Trainer, grads_to_host};
use rlhf_model::weights::{NamedTensor, load_tensors, save_tensors};
use rlhf_model::{DType, HeadKind, Model, SaveOptions, Tokenizer, device};
use serde::{Deserialize, Serialize};

use crate::algo::grpo::{group_advantages, is_informative, soft_overlong_penalty};
use crate::algo::kl::{KlController, KlEstimator, KlPlacement};
use crate::algo::policy_loss::{KlLoss, Normalisation, PolicyBatch, PolicyLossConfig, policy_loss};
use crate::algo::ppo::{AdvantageOptions, kl_rewards, ppo_advantages};
use crate::algo::transform::{ReferenceTable, RewardPipeline};
use crate::collective::Collective;
use crate::config::{Algorithm, LearnerConfig};
use crate::sft::{SftExample, load_examples, nll};
use crate::trajectory::Trajectory;

/// What a step reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepOutcome {
    pub step: u64,
    pub version: u64,
    pub metrics: BTreeMap<String, f64>,
    /// Trajectories the step was given (all its rounds; before any selection).
    pub samples: u64,
    pub tokens: u64,
    pub seconds: f64,
    pub already_applied: bool,
    /// DAPO dynamic sampling: the step was not applied because it lacks this many informative
    /// groups (see [`Engine::train_round`]); 0 when it was applied.
    pub missing_groups: u64,
}

impl StepOutcome {
    /// Whether the step changed the engine (trained or skipped for want of data), as opposed to
    /// being refused for more rounds or found already applied.
    pub fn applied(&self) -> bool {
        !self.already_applied && self.missing_groups == 0
    }
}

/// SFT data for the regulariser, and where the next batch starts.
struct SftState {
    examples: Vec<SftExample>,
    cursor: usize,
    coef: f64,
    batch: usize,
}

/// The learner's models, optimizer and bookkeeping. Owned by one thread.
pub struct Engine {
    pub config: LearnerConfig,
    policy: Model,
    /// The frozen reference; `None` when β is fixed at 0 (never evaluated, so never loaded).
    reference: Option<Model>,
    critic: Option<Model>,
    trainer: Trainer,
    critic_trainer: Option<Trainer>,
    kl: KlController,
    pipeline: RewardPipeline,
    reference_table: ReferenceTable,
    step: u64,
    version: u64,
    data_cursor: u64,
    /// Informative groups carried over from earlier steps (at most one step's worth).
    carry: Vec<Trajectory>,
    /// Dynamic sampling: `(step, target group count)` of the step being filled round by round.
    round_target: Option<(u64, usize)>,
    /// The step of the checkpoint this engine was restored from, if any.
    restored_from: Option<u64>,
    /// What the last applied step reported, kept (and checkpointed) so that a caller that lost
    /// the reply, because this process or the caller died after the step was applied, can
    /// still record the step (see [`Engine::last_applied`]).
    last_applied: Option<StepOutcome>,
    sft: Option<SftState>,
    collective: Box<dyn Collective>,
}

/// Everything of the engine that is not weights, for checkpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct EngineState {
    step: u64,
    version: u64,
    data_cursor: u64,
    kl: KlController,
    reference_table: ReferenceTable,
    carry: Vec<Trajectory>,
    sft_cursor: usize,
    trainer_step: u64,
    critic_trainer_step: Option<u64>,
    /// Absent in checkpoints written before it existed.
    #[serde(default)]
    last_applied: Option<StepOutcome>,
}

/// A trajectory being trained on, with everything computed for it.
struct Work {
    t: Trajectory,
    /// Combined scalar reward (GRPO) or score (PPO), after shaping.
    reward: f32,
    ref_logp: Vec<f32>,
    /// One value per token (PPO) or the same value repeated (GRPO).
    advantages: Vec<f32>,
    returns: Vec<f32>,
    old_values: Vec<f32>,
}

fn schedule(c: &crate::config::OptimConfig, lr: f64) -> LrSchedule {
    LrSchedule {
        lr,
        warmup_steps: c.warmup_steps,
        decay: c.schedule,
        total_steps: c.total_steps,
        min_lr: c.min_lr,
    }
}

impl Engine {
    /// Loads the models named by `config`.
    pub fn new(config: LearnerConfig, collective: Box<dyn Collective>) -> Result<Engine> {
        let train_dev = device::training_device()?;
        let infer_dev = device::inference_device()?;
        let policy = Model::load(&config.policy, &train_dev)
            .with_context(|| format!("policy {}", config.policy.display()))?;
        if policy.head() != HeadKind::CausalLm {
            bail!(
                "policy {}: a causal LM is required, found {}",
                config.policy.display(),
                policy.config.architecture
            );
        }
        let reference = if tracks_reference(&config) {
            Some(load_reference(&reference_dir(&config), &infer_dev)?)
        } else {
            None
        };
        let critic = match config.algorithm {
            Algorithm::Ppo => {
                let dir = config
                    .critic
                    .clone()
                    .unwrap_or_else(|| config.policy.clone());
                Some(
                    Model::load_with_head(&dir, HeadKind::Value, &train_dev, config.seed)
                        .with_context(|| format!("critic {}", dir.display()))?,
                )
            }
            Algorithm::Grpo => None,
        };
        let adamw = AdamWConfig {
            weight_decay: config.optim.weight_decay,
            ..Default::default()
        };
        let trainer = Trainer::new(
            adamw.clone(),
            schedule(&config.optim, config.optim.lr),
            config.optim.max_grad_norm,
        );
        let critic_trainer = critic.as_ref().map(|_| {
            Trainer::new(
                adamw,
                schedule(&config.optim, config.ppo.critic_lr),
                config.optim.max_grad_norm,
            )
        });
        let sft = match &config.sft_regularizer {
            Some(s) => {
                let tokenizer = Tokenizer::from_dir(&config.policy)?;
                let eos = policy.config.eos_token_ids.first().copied();
                let (examples, _, _) = load_examples(
                    &s.data,
                    &tokenizer,
                    eos,
                    policy.config.max_position_embeddings,
                    false,
                )?;
                Some(SftState {
                    examples,
                    cursor: 0,
                    coef: s.coef,
                    batch: s.batch_size,
                })
            }
            None => None,
        };
        Ok(Engine {
            kl: config.kl.controller.clone(),
            pipeline: config.rewards.pipeline(),
            config,
            policy,
            reference,
            critic,
            trainer,
            critic_trainer,
            reference_table: ReferenceTable::new(),
            step: 0,
            version: 0,
            data_cursor: 0,
            carry: Vec::new(),
            round_target: None,
            restored_from: None,
            last_applied: None,
            sft,
            collective,
        })
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    /// The report of the last applied step (this process's or the checkpoint's), marked
    /// `already_applied`: what a repeated call of that step is answered with.
    pub fn last_applied(&self) -> Option<StepOutcome> {
        self.last_applied
            .as_ref()
            .filter(|o| o.step == self.step)
            .map(|o| StepOutcome {
                already_applied: true,
                ..o.clone()
            })
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn data_cursor(&self) -> u64 {
        self.data_cursor
    }

    pub fn rank(&self) -> usize {
        self.collective.rank()
    }

    pub fn world(&self) -> usize {
        self.collective.world()
    }

    pub fn vocab_size(&self) -> usize {
        self.policy.config.vocab_size
    }

    pub fn kl_coef(&self) -> f64 {
        self.kl.value()
    }

    /// The current policy weights by HF name.
    pub fn policy_tensors(&self) -> Vec<NamedTensor> {
        self.policy.named_tensors()
    }

    /// The frozen reference's weights by HF name, when it is resident (not when β is fixed at
    /// 0: then [`load_reference`] reads it from its folder).
    pub fn resident_reference_tensors(&self) -> Option<Vec<NamedTensor>> {
        self.reference.as_ref().map(Model::named_tensors)
    }

    /// The step of the checkpoint [`Engine::load_state`] last restored, if any.
    pub fn restored_from(&self) -> Option<u64> {
        self.restored_from
    }

    /// The groups carried over to the next step by dynamic sampling.
    pub fn carried(&self) -> &[Trajectory] {
        &self.carry
    }

    /// Writes the current policy as a Hugging Face model folder at `dir` (replacing an earlier
    /// export there): `config.json` and `model.safetensors` in the dtype the initial policy's
    /// `config.json` declares (float32 weights stay exact), the tokenizer files of the policy
    /// folder, and its `generation_config.json` (one is written from the model's token ids when
    /// it has none).
    pub fn export_policy(&self, dir: &Path) -> Result<()> {
        let options = SaveOptions {
            dtype: self.policy.config.dtype,
            ..Default::default()
        };
        crate::checkpoint::write_folder(dir, |tmp| {
            self.policy
                .valid()
                .save_with_tokenizer(tmp, &options, &self.config.policy)
                .with_context(|| {
                    format!(
                        "exporting the policy (tokenizer from {})",
                        self.config.policy.display()
                    )
                })
        })
    }

    /// Replaces the r_ref table (values in the pipeline's objective order).
    pub fn set_reference_table(
        &mut self,
        objectives: &[String],
        rows: ReferenceTable,
    ) -> Result<usize> {
        let ours: Vec<&str> = self
            .pipeline
            .objectives
            .iter()
            .map(|o| o.name.as_str())
            .collect();
        if objectives
            .iter()
            .map(String::as_str)
            .ne(ours.iter().copied())
        {
            bail!("reference rewards are for objectives {objectives:?}, the learner has {ours:?}");
        }
        if let Some((p, v)) = rows
            .iter()
            .find(|(_, v)| v.len() != ours.len() || v.iter().any(|x| !x.is_finite()))
        {
            bail!(
                "prompt `{p}`: {} reference values, {} objectives (all must be finite)",
                v.len(),
                ours.len()
            );
        }
        let n = rows.len();
        self.reference_table.extend(rows);
        Ok(n)
    }

    /// Trains on one step's trajectories, whatever dynamic sampling finds in them:
    /// [`Engine::train_round`] as the step's last round.
    pub fn train_step(
        &mut self,
        step: u64,
        trajectories: Vec<Trajectory>,
        data_cursor: u64,
    ) -> Result<StepOutcome> {
        self.train_round(step, trajectories, data_cursor, true)
    }

    /// One call of step `step` with every trajectory the step has so far (all its rounds). A
    /// step at or below the last applied one is not trained again (`already_applied`).
    ///
    /// With GRPO `dynamic_sampling` (DAPO), a step is filled with informative groups (rewards
    /// not all equal) round by round:
    /// - Its **target group count** is the number of groups in its first call, i.e. its first
    ///   generation round (`prompts_per_step` prompts). The engine records it until the step is
    ///   applied: a later call brings the first round's groups plus the new ones, so its own
    ///   count would be too high. (A restarted learner has no record; the controller then starts
    ///   the step over from its first round anyway.)
    /// - When the groups carried over from earlier steps plus the informative groups of
    ///   `trajectories` fall short of the target and `last_round` is false, nothing changes:
    ///   the outcome has `missing_groups` = target − (carried + informative), and the caller
    ///   generates another round and calls again with all of the step's trajectories.
    /// - Otherwise the step trains on the carried groups first (the older data), then on new
    ///   informative groups up to the target (fewer when a last round is short). New
    ///   informative groups beyond the target are carried to the next step, at most one
    ///   target's worth; the rest is dropped (verl's DAPO drops the whole surplus; carrying a
    ///   bounded part keeps informative samples at a cost of one step of staleness, which the
    ///   importance ratio against their behaviour log-probs corrects).
    pub fn train_round(
        &mut self,
        step: u64,
        trajectories: Vec<Trajectory>,
        data_cursor: u64,
        last_round: bool,
    ) -> Result<StepOutcome> {
        let started = Instant::now();
        let samples = trajectories.len() as u64;
        let tokens: u64 = trajectories
            .iter()
            .map(|t| t.completion_ids.len() as u64)
            .sum();
        let mut outcome = StepOutcome {
            step,
            version: self.version,
            metrics: BTreeMap::new(),
            samples,
            tokens,
            seconds: 0.0,
            already_applied: false,
            missing_groups: 0,
        };
        if step <= self.step && self.step > 0 {
            let last = self.last_applied().filter(|o| o.step == step);
            return Ok(last.unwrap_or(StepOutcome {
                already_applied: true,
                samples: 0,
                tokens: 0,
                ..outcome
            }));
        }
        let mut metrics = BTreeMap::new();
        let mut timings = Timings::default();
        let (selected, carry) = if self.dynamic_sampling() {
            match self.select(step, &trajectories, last_round, &mut metrics)? {
                Selection::Short { missing } => {
                    outcome.metrics = metrics;
                    outcome.missing_groups = missing as u64;
                    outcome.seconds = started.elapsed().as_secs_f64();
                    return Ok(outcome);
                }
                Selection::Train { trained, carry } => {
                    self.reward_metrics(&trajectories, &mut metrics)?;
                    (trained, Some(carry))
                }
            }
        } else {
            self.reward_metrics(&trajectories, &mut metrics)?;
            (trajectories, None)
        };
        let groups = group_order(&selected);
        let (rank, world) = (self.rank(), self.world());
        // This rank's groups, and where each group's samples sit in `work`.
        let mut mine: Vec<Trajectory> = Vec::new();
        let mut work_of_group: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (gi, g) in groups
            .iter()
            .enumerate()
            .filter(|(gi, _)| gi % world == rank)
        {
            let slots = (mine.len()..mine.len() + g.len()).collect();
            work_of_group.insert(gi, slots);
            mine.extend(g.iter().map(|&i| selected[i].clone()));
        }

        let t = Instant::now();
        let mut work = self.prepare(mine)?;
        timings.reference += t.elapsed().as_secs_f64();
        let kl_sums = self.kl_sums(&work);

        let plan = Plan {
            step,
            groups: groups.len(),
            work_of_group,
        };
        let updated = self.optimise(&plan, &mut work, &mut timings, &mut metrics)?;

        // KL metrics over every rank's samples; the controller follows the per-sequence KL.
        let mut sums = kl_sums;
        self.reduce(&mut sums, &mut timings)?;
        let [kl_sum, tokens_all, seqs] = sums;
        let kl_token = kl_sum as f64 / (tokens_all as f64).max(1.0);
        let kl_sequence = kl_sum as f64 / (seqs as f64).max(1.0);
        if self.tracks_reference() {
            metrics.insert("kl/token".into(), kl_token);
            metrics.insert("kl/sequence".into(), kl_sequence);
        }
        metrics.insert("kl/beta".into(), self.kl.value());
        self.kl.update(kl_sequence, seqs as u64);

        if updated {
            self.version += 1;
        }
        self.step = step;
        self.data_cursor = data_cursor;
        if let Some(carry) = carry {
            self.carry = carry;
        }
        self.round_target = None;
        metrics.insert("time/reference_s".into(), timings.reference);
        metrics.insert("time/policy_fwd_bwd_s".into(), timings.fwd_bwd);
        metrics.insert("time/optimizer_s".into(), timings.optimizer);
        metrics.insert("time/allreduce_s".into(), timings.allreduce);
        metrics.insert("time/critic_s".into(), timings.critic);
        let seconds = started.elapsed().as_secs_f64();
        metrics.insert("time/step_s".into(), seconds);
        metrics.insert(
            "tokens/trained_per_s".into(),
            tokens as f64 / seconds.max(1e-9),
        );
        let outcome = StepOutcome {
            version: self.version,
            metrics,
            seconds,
            ..outcome
        };
        self.last_applied = Some(finite_metrics(&outcome));
        Ok(outcome)
    }

    /// Per-objective raw and transformed means, the combined reward and lengths, over the whole
    /// step (every rank sees every trajectory, so no reduction is needed).
    fn reward_metrics(&self, ts: &[Trajectory], metrics: &mut BTreeMap<String, f64>) -> Result<()> {
        if ts.is_empty() {
            return Ok(());
        }
        let n = ts.len() as f64;
        let mut totals = Vec::with_capacity(ts.len());
        for (i, o) in self.pipeline.objectives.iter().enumerate() {
            let raw: f64 = ts.iter().map(|t| t.rewards[i] as f64).sum::<f64>() / n;
            metrics.insert(format!("reward/{}/raw", o.name), raw);
        }
        let mut transformed_sums = vec![0.0f64; self.pipeline.objectives.len()];
        for t in ts {
            let c = self
                .pipeline
                .combine(&t.prompt_id, &t.rewards, &self.reference_table)
                .map_err(anyhow::Error::msg)?;
            for (s, v) in transformed_sums.iter_mut().zip(&c.transformed) {
                *s += *v as f64;
            }
            totals.push(c.total as f64);
        }
        for (o, s) in self.pipeline.objectives.iter().zip(&transformed_sums) {
            metrics.insert(format!("reward/{}/transformed", o.name), s / n);
        }
        let mean = totals.iter().sum::<f64>() / n;
        let var = totals.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        metrics.insert("reward/total".into(), mean);
        metrics.insert("reward/total_std".into(), var.sqrt());
        let len = ts
            .iter()
            .map(|t| t.completion_ids.len() as f64)
            .sum::<f64>()
            / n;
        metrics.insert("completion/length".into(), len);
        let stopped = ts.iter().filter(|t| t.finish_reason == "stop").count() as f64 / n;
        metrics.insert("completion/stopped".into(), stopped);
        let stale = ts
            .iter()
            .map(|t| (self.version.saturating_sub(t.weight_version)) as f64)
            .sum::<f64>()
            / n;
        metrics.insert("rollout/staleness".into(), stale);
        Ok(())
    }

    fn dynamic_sampling(&self) -> bool {
        self.config.algorithm == Algorithm::Grpo && self.config.grpo.dynamic_sampling
    }

    /// GRPO dynamic sampling over one call of `step` (see [`Engine::train_round`]): the groups
    /// to train on and the next carry, or how many informative groups are missing. Changes
    /// nothing but the record of the step's target group count.
    fn select(
        &mut self,
        step: u64,
        ts: &[Trajectory],
        last_round: bool,
        metrics: &mut BTreeMap<String, f64>,
    ) -> Result<Selection> {
        let rewards = self.combined(ts)?;
        let groups = group_order(ts);
        let target = match self.round_target {
            Some((s, target)) if s == step => target,
            _ => {
                self.round_target = Some((step, groups.len()));
                groups.len()
            }
        };
        let informative: Vec<&Vec<usize>> = groups
            .iter()
            .filter(|g| is_informative(&rewards, g))
            .collect();
        let carried = group_order(&self.carry);
        let plan = dynamic_plan(target, carried.len(), informative.len(), last_round);
        metrics.insert("dynamic_sampling/groups".into(), target as f64);
        metrics.insert(
            "dynamic_sampling/informative_groups".into(),
            informative.len() as f64,
        );
        metrics.insert("dynamic_sampling/carried_in".into(), plan.carried_in as f64);
        if plan.missing > 0 {
            return Ok(Selection::Short {
                missing: plan.missing,
            });
        }
        let take = |from: &[Trajectory], g: &[usize], out: &mut Vec<Trajectory>| {
            out.extend(g.iter().map(|&i| from[i].clone()));
        };
        let mut trained = Vec::new();
        for g in &carried[..plan.carried_in] {
            take(&self.carry, g, &mut trained);
        }
        for g in &informative[..plan.fresh] {
            take(ts, g, &mut trained);
        }
        let mut carry = Vec::new();
        for g in &informative[plan.fresh..plan.fresh + plan.carried_out] {
            take(ts, g, &mut carry);
        }
        let uninformative = groups.len() - informative.len();
        metrics.insert(
            "dynamic_sampling/carried_out".into(),
            plan.carried_out as f64,
        );
        metrics.insert(
            "dynamic_sampling/dropped_groups".into(),
            (uninformative + plan.dropped) as f64,
        );
        metrics.insert(
            "dynamic_sampling/trained_groups".into(),
            (plan.carried_in + plan.fresh) as f64,
        );
        Ok(Selection::Train { trained, carry })
    }

    /// The combined (transformed, weighted, shaped) scalar reward of each trajectory.
    fn combined(&self, ts: &[Trajectory]) -> Result<Vec<f32>> {
        ts.iter()
            .map(|t| {
                let c = self
                    .pipeline
                    .combine(&t.prompt_id, &t.rewards, &self.reference_table)
                    .map_err(anyhow::Error::msg)?;
                let shaping = match (self.config.algorithm, self.config.grpo.overlong) {
                    (Algorithm::Grpo, Some((max, cache))) => {
                        soft_overlong_penalty(t.completion_ids.len(), max, cache)
                    }
                    _ => 0.0,
                };
                Ok(c.total + shaping)
            })
            .collect()
    }

    fn kl_placement(&self) -> KlPlacement {
        self.config.kl.placement(self.config.algorithm)
    }

    fn kl_estimator(&self) -> KlEstimator {
        self.config.kl.estimator(self.kl_placement())
    }

    fn tracks_reference(&self) -> bool {
        tracks_reference(&self.config)
    }

    /// Reference log-probs, rewards, advantages (and values and returns for PPO) of this rank's
    /// trajectories.
    fn prepare(&mut self, mine: Vec<Trajectory>) -> Result<Vec<Work>> {
        let rewards = self.combined(&mine)?;
        let ref_logp = if let Some(reference) = &self.reference {
            self.forward_rows(reference, &mine, |m, pairs| {
                Ok(m.completion_logprobs(pairs, self.config.temperature)?
                    .logprobs)
            })?
        } else {
            // β = 0: every KL term is multiplied by 0; the behaviour log-probs stand in.
            mine.iter().map(|t| t.logprobs.clone()).collect()
        };
        let beta = self.kl.value();
        let estimator = self.kl_estimator();
        let mut work: Vec<Work> = mine
            .into_iter()
            .zip(rewards)
            .zip(ref_logp)
            .map(|((t, reward), ref_logp)| Work {
                t,
                reward,
                ref_logp,
                advantages: Vec::new(),
                returns: Vec::new(),
                old_values: Vec::new(),
            })
            .collect();
        match self.config.algorithm {
            Algorithm::Grpo => {
                if self.kl_placement() == KlPlacement::InReward {
                    // GRPO with the KL in the reward: the sequence's summed per-token penalty.
                    for w in &mut work {
                        let kl: f64 =
                            w.t.logprobs
                                .iter()
                                .zip(&w.ref_logp)
                                .map(|(&l, &r)| estimator.estimate(l, r) as f64)
                                .sum();
                        w.reward -= (beta * kl) as f32;
                    }
                }
                let rewards: Vec<f32> = work.iter().map(|w| w.reward).collect();
                let groups = group_order_of(work.iter().map(|w| &w.t));
                let adv = group_advantages(
                    &rewards,
                    &groups,
                    self.config.grpo.scale,
                    self.config.grpo.std_eps,
                );
                for (w, a) in work.iter_mut().zip(adv) {
                    w.advantages = vec![a; w.t.completion_ids.len()];
                }
            }
            Algorithm::Ppo => self.prepare_ppo(&mut work, beta, estimator)?,
        }
        Ok(work)
    }

    fn prepare_ppo(&mut self, work: &mut [Work], beta: f64, estimator: KlEstimator) -> Result<()> {
        let critic = self.critic.as_ref().expect("PPO loads a critic").valid();
        let ts: Vec<Trajectory> = work.iter().map(|w| w.t.clone()).collect();
        let values =
            self.forward_rows(&critic, &ts, |m, pairs| Ok(m.completion_values(pairs)?.0))?;
        let kl_beta = if self.kl_placement() == KlPlacement::InReward {
            beta
        } else {
            0.0
        };
        let width = work
            .iter()
            .map(|w| w.t.completion_ids.len())
            .max()
            .unwrap_or(0);
        if width == 0 {
            return Ok(());
        }
        // This rank's batch as padded [rows, width] matrices; values and rewards are 0 under
        // padding, so GAE over the padded rows equals GAE over each completion.
        let (mut all_values, mut all_rewards, mut mask) = (Vec::new(), Vec::new(), Vec::new());
        for (w, v) in work.iter().zip(&values) {
            let n = w.t.completion_ids.len();
            // Per-token rewards: -β·kl (when the KL is in the reward) plus the score at the last token.
            let r = kl_rewards(
                &[w.reward],
                &w.t.logprobs,
                &w.ref_logp,
                n,
                &[n - 1],
                kl_beta,
                estimator,
            );
            let pad = |mut x: Vec<f32>| {
                x.resize(width, 0.0);
                x
            };
            all_values.extend(pad(v.clone()));
            all_rewards.extend(pad(r.rewards));
            mask.extend((0..width).map(|c| if c < n { 1.0f32 } else { 0.0 }));
        }
        let ppo = &self.config.ppo;
        let options = AdvantageOptions {
            gamma: ppo.gamma,
            lambda: ppo.lambda,
            whiten_rewards: ppo.whiten_rewards,
            whiten_advantages: ppo.whiten_advantages,
        };
        // Rewards are whitened over this rank's completion tokens (TRL: over its rollout batch).
        let out = ppo_advantages(&all_values, &all_rewards, &mask, &mask, width, &options)
            .map_err(|e| {
                anyhow::anyhow!(
                    "ppo.{e} on this rank; send more trajectories per step or turn it off"
                )
            })?;
        for (i, (w, v)) in work.iter_mut().zip(values).enumerate() {
            let row = i * width..i * width + w.t.completion_ids.len();
            w.advantages = out.advantages[row.clone()].to_vec();
            w.returns = out.returns[row].to_vec();
            w.old_values = v;
        }
        Ok(())
    }

    /// Runs `f` over micro-batches of trajectories and returns each row's values on the host.
    fn forward_rows(
        &self,
        model: &Model,
        ts: &[Trajectory],
        f: impl Fn(&Model, &[(&[u32], &[u32])]) -> Result<Tensor<2>>,
    ) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(ts.len());
        for chunk in ts.chunks(self.config.optim.micro_batch) {
            let pairs: Vec<(&[u32], &[u32])> = chunk
                .iter()
                .map(|t| (t.prompt_ids.as_slice(), t.completion_ids.as_slice()))
                .collect();
            let lens: Vec<usize> = chunk.iter().map(|t| t.completion_ids.len()).collect();
            out.extend(rows_to_host(f(model, &pairs)?, &lens));
        }
        Ok(out)
    }

    /// [Σ k1 over tokens, tokens, sequences] of the behaviour policy against the reference.
    fn kl_sums(&self, work: &[Work]) -> [f32; 3] {
        let mut s = [0.0f32; 3];
        for w in work {
            let k: f32 =
                w.t.logprobs
                    .iter()
                    .zip(&w.ref_logp)
                    .map(|(&l, &r)| KlEstimator::K1.estimate(l, r))
                    .sum();
            s[0] += k;
            s[1] += w.t.logprobs.len() as f32;
            s[2] += 1.0;
        }
        s
    }

    fn reduce<const N: usize>(&mut self, v: &mut [f32; N], timings: &mut Timings) -> Result<()> {
        let t = Instant::now();
        self.collective
            .all_reduce_sum(v)
            .context("all-reduce of step statistics")?;
        timings.allreduce += t.elapsed().as_secs_f64();
        Ok(())
    }

    /// The optimisation epochs. Returns whether any update was applied.
    fn optimise(
        &mut self,
        plan: &Plan,
        work: &mut [Work],
        timings: &mut Timings,
        metrics: &mut BTreeMap<String, f64>,
    ) -> Result<bool> {
        let o = self.config.optim.clone();
        let mut any = [work.len() as f32];
        self.reduce(&mut any, timings)?;
        if any[0] == 0.0 {
            metrics.insert("train/skipped".into(), 1.0);
            return Ok(false);
        }
        let device = self.policy.device();
        let mut acc = MetricAcc::default();
        let mut order: Vec<usize> = (0..plan.groups).collect();
        for epoch in 0..o.epochs {
            // Minibatches are sets of groups chosen from the whole step (the same on every rank
            // and for every world size); each rank trains on its own groups of each minibatch.
            // The shuffle's generator is a function of (seed, step, epoch): nothing to
            // checkpoint, and a restored run shuffles exactly as an uninterrupted one.
            let mut rng =
                ChaCha8Rng::seed_from_u64(mix(&[self.config.seed, plan.step, epoch as u64]));
            order.shuffle(&mut rng);
            for part in split(&order, o.minibatches) {
                let mb: Vec<usize> = part
                    .iter()
                    .filter_map(|gi| plan.work_of_group.get(gi))
                    .flatten()
                    .copied()
                    .collect();
                let tokens: usize = mb.iter().map(|&i| work[i].t.completion_ids.len()).sum();
                let mut global = [mb.len() as f32, tokens as f32];
                self.reduce(&mut global, timings)?;
                let (g_rows, g_tokens) = (global[0] as f64, global[1] as f64);
                if g_rows == 0.0 {
                    continue;
                }
                let t = Instant::now();
                let mut grads = zero_grads(&self.policy);
                for micro in mb.chunks(o.micro_batch) {
                    let (loss, stats) = self.micro_loss(work, micro, g_rows, g_tokens, &device)?;
                    if epoch == 0 {
                        acc.add(&stats);
                    }
                    add_grads(&mut grads, &grads_to_host(&self.policy, &loss.backward()));
                }
                if let Some(sft) = self.sft_batch() {
                    let loss = nll(&self.policy, &sft.iter().collect::<Vec<_>>())?;
                    let scaled =
                        loss * (self.sft.as_ref().expect("checked").coef / self.world() as f64);
                    add_grads(&mut grads, &grads_to_host(&self.policy, &scaled.backward()));
                }
                timings.fwd_bwd += t.elapsed().as_secs_f64();
                let t = Instant::now();
                all_reduce_grads(self.collective.as_mut(), &mut grads)?;
                timings.allreduce += t.elapsed().as_secs_f64();
                let t = Instant::now();
                let (policy, stats) = self.trainer.apply(self.policy.clone(), &mut grads);
                self.policy = policy;
                timings.optimizer += t.elapsed().as_secs_f64();
                metrics.insert("train/grad_norm".into(), stats.grad_norm);
                metrics.insert("train/lr".into(), stats.lr);
                if self.critic.is_some() {
                    let t = Instant::now();
                    self.critic_update(work, &mb, g_tokens, timings, metrics)?;
                    timings.critic += t.elapsed().as_secs_f64();
                }
            }
        }
        let mut sums = acc.sums();
        self.reduce(&mut sums, timings)?;
        acc.report(&sums, o.minibatches, metrics);
        Ok(true)
    }

    /// The next SFT regulariser batch (this rank's slice), advancing the cursor.
    fn sft_batch(&mut self) -> Option<Vec<SftExample>> {
        let (rank, world) = (self.rank(), self.world());
        let sft = self.sft.as_mut()?;
        let n = sft.examples.len();
        let batch = (0..sft.batch)
            .map(|k| sft.examples[(sft.cursor + rank + k * world) % n].clone())
            .collect();
        sft.cursor = (sft.cursor + sft.batch * world) % n;
        Some(batch)
    }

    /// The policy loss of one micro-batch, normalised by the minibatch's global counts.
    fn micro_loss(
        &self,
        work: &[Work],
        micro: &[usize],
        g_rows: f64,
        g_tokens: f64,
        device: &Device,
    ) -> Result<(Tensor<1>, MicroStats)> {
        let rows: Vec<&Work> = micro.iter().map(|&i| &work[i]).collect();
        let pairs: Vec<(&[u32], &[u32])> = rows
            .iter()
            .map(|w| (w.t.prompt_ids.as_slice(), w.t.completion_ids.as_slice()))
            .collect();
        let out = self
            .policy
            .completion_logprobs(&pairs, self.config.temperature)?;
        let [b, width] = out.logprobs.dims();
        let micro_tokens: usize = rows.iter().map(|w| w.t.completion_ids.len()).sum();
        let pad = |f: &dyn Fn(&Work) -> &[f32]| -> Tensor<2> {
            let mut v = Vec::with_capacity(b * width);
            for w in &rows {
                let row = f(w);
                v.extend_from_slice(row);
                v.extend(std::iter::repeat_n(0.0, width - row.len()));
            }
            Tensor::from_data(TensorData::new(v, [b, width]), device)
        };
        let g = &self.config.grpo;
        let (config, aggregation_rows) = match self.config.algorithm {
            Algorithm::Grpo => (
                PolicyLossConfig {
                    aggregation: g.loss,
                    eps_low: g.eps_low,
                    eps_high: g.eps_high,
                    delta: g.delta,
                    ratio_level: g.ratio_level,
                    truncated_is: g.truncated_is,
                },
                g.loss,
            ),
            Algorithm::Ppo => {
                let c = PolicyLossConfig {
                    aggregation: crate::algo::policy_loss::Aggregation::Bnpo,
                    eps_low: self.config.ppo.clip,
                    eps_high: self.config.ppo.clip,
                    delta: None,
                    ratio_level: crate::algo::policy_loss::RatioLevel::Token,
                    truncated_is: g.truncated_is,
                };
                (c, crate::algo::policy_loss::Aggregation::Bnpo)
            }
        };
        use crate::algo::policy_loss::Aggregation as A;
        let grad_accumulation = match aggregation_rows {
            A::Grpo | A::DrGrpo => g_rows / b as f64,
            A::Bnpo => g_tokens / micro_tokens.max(1) as f64,
            A::Dapo => 1.0,
        };
        let norm = Normalisation {
            grad_accumulation,
            dapo_tokens: g_tokens,
            max_completion_length: g.max_completion_length as f64,
        };
        let kl =
            (self.kl_placement() == KlPlacement::Loss && self.kl.value() > 0.0).then(|| KlLoss {
                beta: self.kl.value(),
                estimator: self.kl_estimator(),
                ratio_correction: self.config.kl.ratio_correction,
            });
        let advantages = pad(&|w| &w.advantages);
        let batch = PolicyBatch {
            logp: out.logprobs,
            old_logp: pad(&|w| &w.t.logprobs),
            ref_logp: Some(pad(&|w| &w.ref_logp)),
            mask: out.mask.clone(),
            advantages,
        };
        let (mut loss, pm) = policy_loss(&batch, &config, kl, &norm);
        let entropy_sum =
            rlhf_model::host::to_vec((out.entropy.clone() * out.mask.clone()).sum())[0] as f64;
        if self.config.algorithm == Algorithm::Ppo && self.config.ppo.entropy_coef > 0.0 {
            let bonus = (out.entropy * out.mask).sum() * (self.config.ppo.entropy_coef / g_tokens);
            loss = loss - bonus;
        }
        let loss_value = rlhf_model::host::to_vec(loss.clone())[0] as f64;
        let t = micro_tokens as f64;
        let stats = MicroStats {
            tokens: t,
            loss: loss_value,
            entropy_sum,
            clip_low: pm.clip_low_mean * t,
            clip_high: pm.clip_high_mean * t,
            ratio: pm.ratio_mean * t,
            kl_loss: pm.kl.unwrap_or(0.0) * t,
        };
        Ok((loss, stats))
    }

    fn critic_update(
        &mut self,
        work: &[Work],
        mb: &[usize],
        g_tokens: f64,
        timings: &mut Timings,
        metrics: &mut BTreeMap<String, f64>,
    ) -> Result<()> {
        let critic = self.critic.clone().expect("PPO has a critic");
        let device = critic.device();
        let mut grads = zero_grads(&critic);
        let (mut loss_sum, mut clip_sum) = (0.0f64, 0.0f64);
        for micro in mb.chunks(self.config.optim.micro_batch) {
            let rows: Vec<&Work> = micro.iter().map(|&i| &work[i]).collect();
            let pairs: Vec<(&[u32], &[u32])> = rows
                .iter()
                .map(|w| (w.t.prompt_ids.as_slice(), w.t.completion_ids.as_slice()))
                .collect();
            let (values, layout) = critic.completion_values(&pairs)?;
            let [b, width] = values.dims();
            let pad = |f: &dyn Fn(&Work) -> &[f32]| -> Tensor<2> {
                let mut v = Vec::with_capacity(b * width);
                for w in &rows {
                    let row = f(w);
                    v.extend_from_slice(row);
                    v.extend(std::iter::repeat_n(0.0, width - row.len()));
                }
                Tensor::from_data(TensorData::new(v, [b, width]), &device)
            };
            let mask = Tensor::<2>::from_data(TensorData::new(layout.mask(), [b, width]), &device);
            let micro_tokens: f64 = rows.iter().map(|w| w.t.completion_ids.len() as f64).sum();
            let (loss, clipfrac) = crate::algo::ppo::value_loss(
                values,
                pad(&|w| &w.old_values),
                pad(&|w| &w.returns),
                mask,
                self.config.ppo.value_clip,
            );
            let loss = loss * (self.config.ppo.vf_coef * micro_tokens / g_tokens);
            loss_sum += rlhf_model::host::to_vec(loss.clone())[0] as f64;
            clip_sum += clipfrac * micro_tokens;
            add_grads(&mut grads, &grads_to_host(&critic, &loss.backward()));
        }
        let t = Instant::now();
        all_reduce_grads(self.collective.as_mut(), &mut grads)?;
        timings.allreduce += t.elapsed().as_secs_f64();
        let trainer = self
            .critic_trainer
            .as_mut()
            .expect("PPO has a critic trainer");
        let (critic, _) = trainer.apply(critic, &mut grads);
        self.critic = Some(critic);
        let mut sums = [loss_sum as f32, clip_sum as f32];
        self.reduce(&mut sums, timings)?;
        metrics.insert("critic/value_loss".into(), sums[0] as f64);
        metrics.insert("critic/clipfrac".into(), sums[1] as f64 / g_tokens.max(1.0));
        Ok(())
    }

    /// Writes the engine's full state into a checkpoint folder's temporary directory.
    pub fn save_state(&self, dir: &Path) -> Result<()> {
        let f32_opts = SaveOptions {
            dtype: DType::F32,
            ..Default::default()
        };
        self.policy.valid().save(&dir.join("policy"), &f32_opts)?;
        rlhf_model::tokenizer::copy_tokenizer_files(&self.config.policy, &dir.join("policy"))?;
        save_moments(&dir.join("optimizer.safetensors"), &self.trainer)?;
        if let (Some(critic), Some(trainer)) = (&self.critic, &self.critic_trainer) {
            critic.valid().save(&dir.join("critic"), &f32_opts)?;
            save_moments(&dir.join("critic_optimizer.safetensors"), trainer)?;
        }
        let state = EngineState {
            step: self.step,
            version: self.version,
            data_cursor: self.data_cursor,
            kl: self.kl.clone(),
            reference_table: self.reference_table.clone(),
            carry: self.carry.clone(),
            sft_cursor: self.sft.as_ref().map_or(0, |s| s.cursor),
            trainer_step: self.trainer.optimizer.step,
            critic_trainer_step: self.critic_trainer.as_ref().map(|t| t.optimizer.step),
            last_applied: self.last_applied.clone(),
        };
        let text = serde_json::to_string(&state).expect("state serialises");
        std::fs::write(dir.join("state.json"), text).context("writing state.json")?;
        Ok(())
    }

    /// Restores everything [`Engine::save_state`] wrote (the manifest is checked by the caller).
    pub fn load_state(&mut self, dir: &Path) -> Result<()> {
        let text = std::fs::read_to_string(dir.join("state.json")).context("reading state.json")?;
        let state: EngineState = serde_json::from_str(&text).context("parsing state.json")?;
        let policy = Model::load(&dir.join("policy"), &device::training_device()?)?;
        self.policy = policy;
        load_moments(
            &dir.join("optimizer.safetensors"),
            &mut self.trainer,
            state.trainer_step,
        )?;
        if let Some(trainer) = &mut self.critic_trainer {
            self.critic = Some(Model::load(
                &dir.join("critic"),
                &device::training_device()?,
            )?);
            load_moments(
                &dir.join("critic_optimizer.safetensors"),
                trainer,
                state.critic_trainer_step.unwrap_or(0),
            )?;
        }
        self.step = state.step;
        self.version = state.version;
        self.data_cursor = state.data_cursor;
        self.kl = state.kl;
        self.reference_table = state.reference_table;
        self.carry = state.carry;
        self.round_target = None;
        self.restored_from = Some(state.step);
        self.last_applied = state.last_applied.filter(|o| o.step == state.step);
        if let Some(s) = &mut self.sft {
            s.cursor = state.sft_cursor % s.examples.len().max(1);
        }
        Ok(())
    }
}

/// `outcome` without its non-finite metrics, which JSON cannot hold (a metrics line writes them
/// as `null`, the same as leaving them out).
fn finite_metrics(outcome: &StepOutcome) -> StepOutcome {
    StepOutcome {
        metrics: outcome
            .metrics
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
        ..outcome.clone()
    }
}

fn save_moments(path: &Path, trainer: &Trainer) -> Result<()> {
    let mut tensors = Vec::new();
    for (name, m) in &trainer.optimizer.state {
        let shape = vec![m.m.len()];
        tensors.push(NamedTensor {
            name: format!("m.{name}"),
            shape: shape.clone(),
            values: m.m.clone(),
        });
        tensors.push(NamedTensor {
            name: format!("v.{name}"),
            shape,
            values: m.v.clone(),
        });
    }
    save_tensors(path, &tensors, DType::F32).with_context(|| format!("writing {}", path.display()))
}

fn load_moments(path: &Path, trainer: &mut Trainer, step: u64) -> Result<()> {
    let tensors = load_tensors(path).with_context(|| format!("reading {}", path.display()))?;
    let mut by_name: HashMap<String, Vec<f32>> =
        tensors.into_iter().map(|t| (t.name, t.values)).collect();
    let mut state = BTreeMap::new();
    let names: Vec<String> = by_name
        .keys()
        .filter_map(|k| k.strip_prefix("m.").map(str::to_string))
        .collect();
    for name in names {
        let m = by_name.remove(&format!("m.{name}")).expect("listed");
        let v = by_name
            .remove(&format!("v.{name}"))
            .with_context(|| format!("{}: second moment of {name} missing", path.display()))?;
        state.insert(name, rlhf_model::optim::Moments { m, v });
    }
    trainer.optimizer.state = state;
    trainer.optimizer.step = step;
    Ok(())
}

/// What dynamic sampling makes of one call of a step.
enum Selection {
    /// Not enough informative groups yet: this many more are needed.
    Short { missing: usize },
    /// Train on `trained`; carry `carry` to the next step.
    Train {
        trained: Vec<Trajectory>,
        carry: Vec<Trajectory>,
    },
}

/// DAPO dynamic sampling's arithmetic for one call of a step, in groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DynamicPlan {
    /// Informative groups still missing; 0 when the step trains now.
    pub missing: usize,
    /// Carried groups trained on (or that would be, when `missing > 0`).
    pub carried_in: usize,
    /// New informative groups trained on.
    pub fresh: usize,
    /// New informative groups beyond the target, carried to the next step.
    pub carried_out: usize,
    /// Informative groups (carried or new) that fit neither the step nor the carry.
    pub dropped: usize,
}

/// The plan for a step of `target` groups with `carried` groups carried over and `informative`
/// new informative groups: short unless `last_round` or `carried + informative >= target`;
/// else carried groups first, then new ones up to `target`, and at most `target` new groups
/// carried on (the rule of [`Engine::train_round`]).
pub fn dynamic_plan(
    target: usize,
    carried: usize,
    informative: usize,
    last_round: bool,
) -> DynamicPlan {
    let carried_in = carried.min(target);
    if carried + informative < target && !last_round {
        return DynamicPlan {
            missing: target - carried - informative,
            carried_in,
            fresh: 0,
            carried_out: 0,
            dropped: 0,
        };
    }
    let fresh = informative.min(target - carried_in);
    let carried_out = (informative - fresh).min(target);
    DynamicPlan {
        missing: 0,
        carried_in,
        fresh,
        carried_out,
        dropped: (carried - carried_in) + (informative - fresh - carried_out),
    }
}

/// Whether the reference policy is evaluated: not when β is fixed at 0 (as TRL with
/// `beta = 0`), which saves its memory and a forward pass per step; the step then reports no KL
/// metrics.
fn tracks_reference(config: &LearnerConfig) -> bool {
    !matches!(config.kl.controller, KlController::Fixed { value } if value == 0.0)
}

/// The frozen reference policy's folder: `reference`, else the initial `policy`.
pub fn reference_dir(config: &LearnerConfig) -> PathBuf {
    config
        .reference
        .clone()
        .unwrap_or_else(|| config.policy.clone())
}

/// Loads the frozen reference policy from its folder (see [`reference_dir`]); it must be a
/// causal LM.
pub fn load_reference(dir: &Path, device: &Device) -> Result<Model> {
    let model = Model::load(dir, device).with_context(|| format!("reference {}", dir.display()))?;
    if model.head() != HeadKind::CausalLm {
        bail!(
            "reference {}: a causal LM is required, found {}",
            dir.display(),
            model.config.architecture
        );
    }
    Ok(model)
}

/// A 64-bit seed from several numbers (SplitMix64 finaliser over each).
fn mix(parts: &[u64]) -> u64 {
    parts.iter().fold(0x9E37_79B9_7F4A_7C15u64, |h, &p| {
        let mut z = h ^ p.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

/// How a step's groups map onto this rank's work.
struct Plan {
    step: u64,
    /// Groups in the whole step (all ranks).
    groups: usize,
    /// Global group index → positions of its samples in this rank's work.
    work_of_group: BTreeMap<usize, Vec<usize>>,
}

/// Wall time per phase of a step.
#[derive(Default)]
struct Timings {
    reference: f64,
    fwd_bwd: f64,
    optimizer: f64,
    allreduce: f64,
    critic: f64,
}

/// Token-weighted sums of one micro-batch's statistics.
struct MicroStats {
    tokens: f64,
    loss: f64,
    entropy_sum: f64,
    clip_low: f64,
    clip_high: f64,
    ratio: f64,
    kl_loss: f64,
}

#[derive(Default)]
struct MetricAcc {
    tokens: f64,
    loss: f64,
    entropy: f64,
    clip_low: f64,
    clip_high: f64,
    ratio: f64,
    kl_loss: f64,
}

impl MetricAcc {
    fn add(&mut self, s: &MicroStats) {
        self.tokens += s.tokens;
        self.loss += s.loss;
        self.entropy += s.entropy_sum;
        self.clip_low += s.clip_low;
        self.clip_high += s.clip_high;
        self.ratio += s.ratio;
        self.kl_loss += s.kl_loss;
    }

    fn sums(&self) -> [f32; 7] {
        [
            self.tokens as f32,
            self.loss as f32,
            self.entropy as f32,
            self.clip_low as f32,
            self.clip_high as f32,
            self.ratio as f32,
            self.kl_loss as f32,
        ]
    }

    /// Token means; the loss is per optimizer step (each minibatch's loss is already normalised
    /// by its global counts, summed over ranks by the reduction).
    fn report(&self, s: &[f32; 7], minibatches: usize, metrics: &mut BTreeMap<String, f64>) {
        let tokens = (s[0] as f64).max(1.0);
        metrics.insert("train/loss".into(), s[1] as f64 / minibatches.max(1) as f64);
        metrics.insert("train/entropy".into(), s[2] as f64 / tokens);
        metrics.insert("train/clip_low".into(), s[3] as f64 / tokens);
        metrics.insert("train/clip_high".into(), s[4] as f64 / tokens);
        metrics.insert("train/ratio".into(), s[5] as f64 / tokens);
        metrics.insert("train/kl_loss_term".into(), s[6] as f64 / tokens);
    }
}

/// Groups of a step in a fixed order: by group id, samples by index.
fn group_order(ts: &[Trajectory]) -> Vec<Vec<usize>> {
    group_order_of(ts.iter())
}

fn group_order_of<'a>(ts: impl Iterator<Item = &'a Trajectory>) -> Vec<Vec<usize>> {
    let mut by_group: BTreeMap<(&str, u64), Vec<(u32, usize)>> = BTreeMap::new();
    for (i, t) in ts.enumerate() {
        by_group
            .entry((t.group_id.as_str(), t.step))
            .or_default()
            .push((t.sample_index, i));
    }
    by_group
        .into_values()
        .map(|mut g| {
            g.sort();
            g.into_iter().map(|(_, i)| i).collect()
        })
        .collect()
}

/// `indices` cut into `parts` contiguous, nearly equal parts (some may be empty).
fn split(indices: &[usize], parts: usize) -> Vec<Vec<usize>> {
    let n = indices.len();
    (0..parts)
        .map(|p| {
            let start = p * n / parts;
            let end = (p + 1) * n / parts;
            indices[start..end].to_vec()
        })
        .collect()
}

fn zero_grads(model: &Model) -> Vec<NamedTensor> {
    rlhf_model::weights::param_specs(&model.config)
        .into_iter()
        .map(|s| NamedTensor {
            values: vec![0.0; s.shape.iter().product()],
            name: s.name,
            shape: s.shape,
        })
        .collect()
}

fn add_grads(acc: &mut [NamedTensor], grads: &[NamedTensor]) {
    for (a, g) in acc.iter_mut().zip(grads) {
        debug_assert_eq!(a.name, g.name);
        for (x, y) in a.values.iter_mut().zip(&g.values) {
            *x += *y;
        }
    }
}

/// Sums gradients over ranks through one flat buffer.
fn all_reduce_grads(collective: &mut dyn Collective, grads: &mut [NamedTensor]) -> Result<()> {
    if collective.world() == 1 {
        return Ok(());
    }
    let mut flat: Vec<f32> = grads
        .iter()
        .flat_map(|g| g.values.iter().copied())
        .collect();
    collective
        .all_reduce_sum(&mut flat)
        .context("gradient all-reduce")?;
    let mut offset = 0;
    for g in grads.iter_mut() {
        let n = g.values.len();
        g.values.copy_from_slice(&flat[offset..offset + n]);
        offset += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(
        missing: usize,
        carried_in: usize,
        fresh: usize,
        out: usize,
        dropped: usize,
    ) -> DynamicPlan {
        DynamicPlan {
            missing,
            carried_in,
            fresh,
            carried_out: out,
            dropped,
        }
    }

    #[test]
    fn dynamic_plan_asks_for_more_trains_on_fewer_last_and_bounds_the_carry() {
        // Short of the target: nothing trains, the shortfall counts the carry in.
        assert_eq!(dynamic_plan(4, 1, 2, false), plan(1, 1, 0, 0, 0));
        assert_eq!(dynamic_plan(4, 0, 0, false), plan(4, 0, 0, 0, 0));
        // The last round trains on what there is.
        assert_eq!(dynamic_plan(4, 1, 2, true), plan(0, 1, 2, 0, 0));
        // Exactly full.
        assert_eq!(dynamic_plan(4, 0, 4, false), plan(0, 0, 4, 0, 0));
        // Carried groups go first; the new surplus is carried on.
        assert_eq!(dynamic_plan(4, 3, 2, false), plan(0, 3, 1, 1, 0));
        // At most one step's worth is carried; the rest is dropped.
        assert_eq!(dynamic_plan(4, 0, 11, false), plan(0, 0, 4, 4, 3));
        // A carry larger than the target (the target shrank) keeps only what fits.
        assert_eq!(dynamic_plan(2, 3, 1, false), plan(0, 2, 0, 1, 1));
    }

    /// The engine state goes through JSON: every f32 and f64 of it (the carried trajectories'
    /// log-probs and rewards, the r_ref table, β) must come back bit for bit, or a restored run
    /// would drift from an uninterrupted one. serde_json parses floats exactly only with its
    /// `float_roundtrip` feature.
    #[test]
    fn engine_state_round_trips_floats_bit_for_bit() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut f32s = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    loop {
                        let x = f32::from_bits(rand::Rng::random::<u32>(&mut rng));
                        if x.is_finite() {
                            break -x.abs();
                        }
                    }
                })
                .collect()
        };
        let carry: Vec<Trajectory> = (0..200)
            .map(|i| Trajectory {
                step: 1,
                prompt_id: format!("p{i}"),
                group_id: format!("p{i}"),
                sample_index: 0,
                prompt_ids: vec![3],
                completion_ids: vec![4; 50],
                logprobs: f32s(50),
                weight_version: 0,
                rewards: f32s(2),
                finish_reason: "stop".into(),
            })
            .collect();
        let state = EngineState {
            step: 1,
            version: 1,
            data_cursor: 1,
            kl: KlController::Fixed {
                value: 0.1 + 0.2 + 1e-17,
            },
            reference_table: [("p".to_string(), f32s(100))].into_iter().collect(),
            carry,
            sft_cursor: 0,
            trainer_step: 1,
            critic_trainer_step: None,
            last_applied: Some(StepOutcome {
                step: 1,
                version: 1,
                metrics: [("loss/policy".to_string(), 0.1 + 0.2)].into(),
                samples: 8,
                tokens: 400,
                seconds: 0.5,
                already_applied: false,
                missing_groups: 0,
            }),
        };
        let text = serde_json::to_string(&state).unwrap();
        let back: EngineState = serde_json::from_str(&text).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (a, b) in state.carry.iter().zip(&back.carry) {
            assert_eq!(bits(&a.logprobs), bits(&b.logprobs), "{}", a.prompt_id);
            assert_eq!(bits(&a.rewards), bits(&b.rewards), "{}", a.prompt_id);
        }
        assert_eq!(
            bits(&state.reference_table["p"]),
            bits(&back.reference_table["p"])
        );
        assert_eq!(state.kl.value().to_bits(), back.kl.value().to_bits());
        assert_eq!(state.last_applied, back.last_applied);
        // β is an f64 that the adaptive controller multiplies every step: any value.
        for _ in 0..20_000 {
            let value = loop {
                let x = f64::from_bits(rand::Rng::random::<u64>(&mut rng));
                if x.is_finite() {
                    break x.abs();
                }
            };
            let kl = KlController::Fixed { value };
            let back: KlController =
                serde_json::from_str(&serde_json::to_string(&kl).unwrap()).unwrap();
            assert_eq!(back.value().to_bits(), value.to_bits(), "β = {value:e}");
        }
    }
}
