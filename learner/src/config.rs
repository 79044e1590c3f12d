//! The learner's configuration (`learner --config learner.toml`, and the `[learner]` part of a
//! job). Every field has a documented default; `validate` names the field and the allowed values.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::algo::grpo::AdvantageScale;
use crate::algo::kl::{KlController, KlEstimator, KlPlacement};
use crate::algo::policy_loss::{Aggregation, RatioLevel};
use crate::algo::transform::{ObjectiveWeight, QuantileEstimator, RewardPipeline};

/// Which RL algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    Grpo,
    Ppo,
}

/// Everything the learner needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearnerConfig {
    /// The initial policy (HF model folder).
    pub policy: PathBuf,
    /// The frozen reference policy; default: `policy`.
    #[serde(default)]
    pub reference: Option<PathBuf>,
    /// PPO critic initialisation (a value model, or a causal LM / reward model to put a value head
    /// on); default: `policy`.
    #[serde(default)]
    pub critic: Option<PathBuf>,
    /// Where checkpoints go.
    pub output_dir: PathBuf,
    #[serde(default = "default_algorithm")]
    pub algorithm: Algorithm,
    /// Sampling temperature of the rollouts (log-probs are computed at the same temperature).
    #[serde(default = "one")]
    pub temperature: f64,
    #[serde(default)]
    pub seed: u64,
    pub rewards: RewardsConfig,
    #[serde(default)]
    pub kl: KlConfig,
    #[serde(default)]
    pub grpo: GrpoConfig,
    #[serde(default)]
    pub ppo: PpoConfig,
    #[serde(default)]
    pub optim: OptimConfig,
    #[serde(default)]
    pub sft_regularizer: Option<SftRegularizer>,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub parallel: ParallelConfig,
}

fn default_algorithm() -> Algorithm {
    Algorithm::Grpo
}

fn one() -> f64 {
    1.0
}

/// Objectives, transforms and combination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardsConfig {
    /// One entry per objective, in the order the reward vectors carry them.
    pub objectives: Vec<ObjectiveWeight>,
    #[serde(default)]
    pub clip: Option<(f64, f64)>,
    /// r_ref estimation: quantile of the reference policy's rewards per prompt.
    #[serde(default = "default_quantile")]
    pub reference_quantile: f64,
    #[serde(default = "default_estimator")]
    pub reference_estimator: QuantileEstimator,
}

fn default_quantile() -> f64 {
    0.85
}

fn default_estimator() -> QuantileEstimator {
    QuantileEstimator::Empirical
}

impl RewardsConfig {
    pub fn pipeline(&self) -> RewardPipeline {
        RewardPipeline {
            objectives: self.objectives.clone(),
            clip: self.clip,
        }
    }
}

/// KL control.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KlConfig {
    /// `in_reward` (default for PPO) or `loss` (default for GRPO).
    #[serde(default)]
    pub placement: Option<KlPlacement>,
    /// k1 (default in the reward) or k3 (default in the loss), or k2.
    #[serde(default)]
    pub estimator: Option<KlEstimator>,
    /// Fixed β, or the adaptive controller.
    #[serde(default = "default_controller")]
    pub controller: KlController,
    /// Multiply the KL loss term by the importance ratio (TRL ≥ 1 default).
    #[serde(default)]
    pub ratio_correction: bool,
}

fn default_controller() -> KlController {
    KlController::Fixed { value: 0.04 }
}

impl Default for KlConfig {
    fn default() -> Self {
        KlConfig {
            placement: None,
            estimator: None,
            controller: default_controller(),
            ratio_correction: false,
        }
    }
}

impl KlConfig {
    pub fn placement(&self, algorithm: Algorithm) -> KlPlacement {
        self.placement.unwrap_or(match algorithm {
            Algorithm::Grpo => KlPlacement::Loss,
            Algorithm::Ppo => KlPlacement::InReward,
        })
    }

    pub fn estimator(&self, placement: KlPlacement) -> KlEstimator {
        self.estimator.unwrap_or(match placement {
            KlPlacement::Loss => KlEstimator::K3,
            KlPlacement::InReward => KlEstimator::K1,
        })
    }
}

/// GRPO and its variants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoConfig {
    pub scale: AdvantageScale,
    pub std_eps: f64,
    pub loss: Aggregation,
    pub eps_low: f64,
    pub eps_high: f64,
    pub delta: Option<f64>,
    pub ratio_level: RatioLevel,
    /// Truncated importance weight cap for off-policy (async) rollouts.
    pub truncated_is: Option<f64>,
    /// DAPO dynamic sampling: train only on informative groups (rewards not all equal). A step
    /// short of them is sent back for more generation rounds (`StepReport.missing_groups`)
    /// until it has its first round's group count or its last round; a surplus is carried to
    /// the next step (at most one step's worth). See `Engine::train_round`.
    pub dynamic_sampling: bool,
    /// DAPO soft overlong penalty `(max_tokens, cache_tokens)` added to the combined reward.
    pub overlong: Option<(usize, usize)>,
    /// Dr. GRPO's constant (the rollouts' `max_new_tokens`).
    pub max_completion_length: usize,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            scale: AdvantageScale::Group,
            std_eps: 1e-4,
            loss: Aggregation::Grpo,
            eps_low: 0.2,
            eps_high: 0.2,
            delta: None,
            ratio_level: RatioLevel::Token,
            truncated_is: None,
            dynamic_sampling: false,
            overlong: None,
            max_completion_length: 256,
        }
    }
}

/// PPO with a critic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PpoConfig {
    pub gamma: f64,
    pub lambda: f64,
    /// Whiten the advantages over the rank's completion tokens after GAE (mean 0, unit variance).
    pub whiten_advantages: bool,
    /// Whiten the per-token rewards over the rank's completion tokens before GAE, keeping their
    /// mean (TRL PPO `whiten_rewards`: `masked_whiten(rewards, shift_mean=False)`).
    pub whiten_rewards: bool,
    pub clip: f64,
    pub value_clip: f64,
    pub vf_coef: f64,
    pub entropy_coef: f64,
    /// Learning rate of the critic.
    pub critic_lr: f64,
}

impl Default for PpoConfig {
    fn default() -> Self {
        PpoConfig {
            gamma: 1.0,
            lambda: 0.95,
            whiten_advantages: true,
            whiten_rewards: false,
            clip: 0.2,
            value_clip: 0.2,
            vf_coef: 0.1,
            entropy_coef: 0.0,
            critic_lr: 1e-5,
        }
    }
}

/// Optimisation schedule of one RL step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub lr: f64,
    pub warmup_steps: u64,
    /// `constant` or `cosine` (over `total_steps` optimizer steps).
    pub schedule: rlhf_model::optim::Decay,
    pub total_steps: u64,
    pub min_lr: f64,
    pub weight_decay: f64,
    pub max_grad_norm: Option<f64>,
    /// Passes over each step's trajectories.
    pub epochs: usize,
    /// Optimizer steps per epoch (the batch is split into this many minibatches).
    pub minibatches: usize,
    /// Sequences per forward/backward pass (gradients accumulate up to a minibatch).
    pub micro_batch: usize,
    /// Storage dtype of the weights the learner streams to actors.
    pub weights_dtype: String,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 1e-6,
            warmup_steps: 0,
            schedule: rlhf_model::optim::Decay::Constant,
            total_steps: 1000,
            min_lr: 0.0,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            epochs: 1,
            minibatches: 1,
            micro_batch: 16,
            weights_dtype: "float32".into(),
        }
    }
}

/// The SFT regulariser of REFERENCES.md §6: `coef · NLL(response | prompt)` on SFT data, added
/// to every policy update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftRegularizer {
    pub data: PathBuf,
    pub coef: f64,
    #[serde(default = "default_sft_batch")]
    pub batch_size: usize,
}

fn default_sft_batch() -> usize {
    8
}

/// When checkpoints are written (besides on request and when the learner is stopped by
/// SIGTERM or Ctrl-C, which checkpoints the last applied step).
///
/// Defaults: every 5 steps, the 3 newest kept. A learner that crashes (SIGKILL, out of memory,
/// a lost node) on the defaults loses at most the 4 steps since its last checkpoint, where with
/// no periodic checkpoint it would start over at step 1. A checkpoint holds the policy and its
/// AdamW moments in f32 (about 3× the policy's f32 size; twice that with PPO's critic), so
/// keeping 3 bounds the disk at about 9× the policy while leaving older checkpoints to fall
/// back on when the newest is found corrupt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Every N steps (0: only on request and on stop).
    pub every_steps: u64,
    /// How many checkpoints to keep (0: all).
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            every_steps: 5,
            keep: 3,
        }
    }
}

/// Data-parallel ranks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelConfig {
    pub rank: usize,
    /// Addresses (`host:port`) of every rank's collective endpoint, in rank order; one entry or
    /// none for a single learner.
    pub peers: Vec<String>,
    /// `tcp` (ring all-reduce over the peers, CPU) or `nccl` (GPU; the build needs the `nccl`
    /// feature, the communicator id comes from `RLHF_NCCL_ID`, 256 hex characters made by
    /// rank 0 and published through the state store).
    pub backend: CollectiveBackend,
    /// GPU of this rank for NCCL.
    pub device: usize,
}

/// How ranks synchronise gradients.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CollectiveBackend {
    #[default]
    Tcp,
    Nccl,
}

impl ParallelConfig {
    pub fn world_size(&self) -> usize {
        self.peers.len().max(1)
    }
}

impl LearnerConfig {
    /// Reads a TOML file; relative paths resolve against its folder.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let mut config: LearnerConfig =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(config)
    }

    /// Makes relative paths relative to `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p)
            }
        };
        fix(&mut self.policy);
        fix(&mut self.output_dir);
        if let Some(p) = &mut self.reference {
            fix(p)
        }
        if let Some(p) = &mut self.critic {
            fix(p)
        }
        if let Some(s) = &mut self.sft_regularizer {
            fix(&mut s.data)
        }
    }

    /// Checks ranges and combinations; the message names the field and what is allowed.
    pub fn validate(&self) -> Result<(), String> {
        let positive = |field: &str, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(format!("{field}: must be > 0, got {v}"))
            }
        };
        positive("temperature", self.temperature)?;
        if self.rewards.objectives.is_empty() {
            return Err("rewards.objectives: at least one objective is required".into());
        }
        for (i, o) in self.rewards.objectives.iter().enumerate() {
            if !o.weight.is_finite() {
                return Err(format!(
                    "rewards.objectives[{i}].weight: must be a finite number, got {}",
                    o.weight
                ));
            }
        }
        let q = self.rewards.reference_quantile;
        if !(0.0 < q && q < 1.0) {
            return Err(format!(
                "rewards.reference_quantile: must be in (0, 1), got {q}"
            ));
        }
        if let Some((lo, hi)) = self.rewards.clip
            && lo >= hi
        {
            return Err(format!("rewards.clip: [{lo}, {hi}] is empty"));
        }
        match &self.kl.controller {
            KlController::Fixed { value } if *value < 0.0 => {
                return Err(format!("kl.controller.value: must be >= 0, got {value}"));
            }
            KlController::Adaptive {
                value,
                target,
                horizon,
            } => {
                positive("kl.controller.value", *value)?;
                positive("kl.controller.target", *target)?;
                positive("kl.controller.horizon", *horizon)?;
            }
            _ => {}
        }
        positive("grpo.eps_low", self.grpo.eps_low)?;
        positive("grpo.eps_high", self.grpo.eps_high)?;
        if self.grpo.eps_low >= 1.0 {
            return Err(format!(
                "grpo.eps_low: must be < 1, got {}",
                self.grpo.eps_low
            ));
        }
        if let Some(d) = self.grpo.delta
            && d <= 1.0
        {
            return Err(format!("grpo.delta: must be > 1, got {d}"));
        }
        if let Some((max, cache)) = self.grpo.overlong
            && (cache == 0 || cache > max)
        {
            return Err(format!(
                "grpo.overlong: cache_tokens {cache} must be in 1..={max}"
            ));
        }
        if !(0.0..=1.0).contains(&self.ppo.gamma) || !(0.0..=1.0).contains(&self.ppo.lambda) {
            return Err("ppo.gamma and ppo.lambda: must be in [0, 1]".into());
        }
        positive("optim.lr", self.optim.lr)?;
        for (field, v) in [
            ("optim.epochs", self.optim.epochs),
            ("optim.minibatches", self.optim.minibatches),
            ("optim.micro_batch", self.optim.micro_batch),
        ] {
            if v == 0 {
                return Err(format!("{field}: must be at least 1"));
            }
        }
        if rlhf_model::DType::parse(&self.optim.weights_dtype).is_none() {
            return Err(format!(
                "optim.weights_dtype: `{}` is not one of float32, bfloat16, float16",
                self.optim.weights_dtype
            ));
        }
        if let Some(s) = &self.sft_regularizer {
            positive("sft_regularizer.coef", s.coef)?;
            if s.batch_size == 0 {
                return Err("sft_regularizer.batch_size: must be at least 1".into());
            }
        }
        if !self.parallel.peers.is_empty() && self.parallel.rank >= self.parallel.peers.len() {
            return Err(format!(
                "parallel.rank: {} but only {} peers",
                self.parallel.rank,
                self.parallel.peers.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_config_validates_and_checkpoints_by_default() {
        let c: LearnerConfig = toml::from_str(
            "policy = \"p\"\noutput_dir = \"o\"\n[rewards]\n\
             objectives = [{ name = \"r\", transform = \"identity\", weight = 1.0 }]\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.checkpoint,
            CheckpointConfig {
                every_steps: 5,
                keep: 3
            }
        );
        assert!(!c.grpo.dynamic_sampling);
    }
}
