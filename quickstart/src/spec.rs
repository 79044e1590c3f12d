//! A pipeline file: a job file with a `[task]` table instead of `[policy]`, `[data]` and
//! `[[objective]]`. The pipeline builds those itself (data, tokenizer, SFT policy, reward
//! models) and then runs one RL job per arm with the file's `[rollout]`, `[learner]`,
//! `[rewards]`, `[resources]` and `[evaluation]` (documented in docs/job-config.md).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::task::{Annotators, BehaviourMix};
use rlhf_coordinator::job::{
    DataSpec, EvaluationSpec, JobSpec, LearnerSpec, PolicySpec, ResourcesSpec, RewardsSpec,
    RolloutSpec,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    pub name: String,
    #[serde(default)]
    pub output_dir: Option<PathBuf>,
    /// Seeds the data, the models' initialisation and training (arms add their own seed).
    #[serde(default)]
    pub seed: u64,
    pub task: TaskSpec,
    #[serde(default)]
    pub model: TinyModelSpec,
    #[serde(default)]
    pub sft: TrainingStage,
    #[serde(default = "TrainingStage::reward_model_default")]
    pub reward_models: TrainingStage,
    #[serde(default)]
    pub arms: ArmsSpec,
    #[serde(default)]
    pub rewards: RewardsSpec,
    #[serde(default)]
    pub rollout: RolloutSpec,
    #[serde(default)]
    pub learner: LearnerSpec,
    #[serde(default)]
    pub resources: ResourcesSpec,
    #[serde(default)]
    pub evaluation: EvaluationSpec,
}

/// The synthetic task's data (see `task.rs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskSpec {
    /// RL training prompts (drawn from the training combinations).
    pub train_prompts: usize,
    /// Held-out evaluation prompts (drawn from the held-out combinations).
    pub eval_prompts: usize,
    /// Share of (topic, tone, phrasing) combinations held out.
    pub held_out_fraction: f64,
    pub sft_examples: usize,
    /// Preference pairs per property (helpful, harmless).
    pub preference_pairs: usize,
    /// Behaviours of the SFT corpus.
    pub sft_mix: BehaviourMix,
    /// Behaviours the preference pairs are drawn from.
    pub preference_mix: BehaviourMix,
    pub annotators: Annotators,
    /// Tokenizer vocabulary size (BPE, trained on the corpus).
    pub vocab_size: usize,
}

impl Default for TaskSpec {
    fn default() -> Self {
        TaskSpec {
            train_prompts: 512,
            eval_prompts: 128,
            held_out_fraction: 0.2,
            sft_examples: 3000,
            preference_pairs: 3000,
            sft_mix: BehaviourMix::default(),
            preference_mix: BehaviourMix {
                good: 0.2,
                off_topic: 0.2,
                wrong_tone: 0.2,
                rambling: 0.2,
                rude: 0.2,
            },
            annotators: Annotators::default(),
            vocab_size: 400,
        }
    }
}

/// The policy's architecture (a Llama trained from scratch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TinyModelSpec {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub max_position_embeddings: usize,
}

impl Default for TinyModelSpec {
    fn default() -> Self {
        TinyModelSpec {
            hidden_size: 64,
            intermediate_size: 192,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            max_position_embeddings: 128,
        }
    }
}

/// Supervised training of the policy (SFT) or of the reward models (Bradley-Terry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingStage {
    pub epochs: usize,
    pub lr: f64,
    pub batch_size: usize,
}

impl Default for TrainingStage {
    fn default() -> Self {
        TrainingStage {
            epochs: 3,
            lr: 3e-3,
            batch_size: 32,
        }
    }
}

impl TrainingStage {
    fn reward_model_default() -> Self {
        TrainingStage {
            epochs: 2,
            lr: 1e-3,
            batch_size: 32,
        }
    }
}

/// The RL runs: every transform × every seed, all from the same SFT policy and reward models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArmsSpec {
    /// `identity` (raw sum) and/or `log_sigmoid` (sum of log-sigmoid transformed rewards).
    pub transforms: Vec<String>,
    /// RL seeds (default: the pipeline's seed).
    pub seeds: Vec<u64>,
}

impl Default for ArmsSpec {
    fn default() -> Self {
        ArmsSpec {
            transforms: vec!["log_sigmoid".into()],
            seeds: Vec::new(),
        }
    }
}

/// Where the pipeline puts things, relative to its output folder.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn data(&self, file: &str) -> PathBuf {
        self.root.join("data").join(file)
    }
    pub fn model(&self, name: &str) -> PathBuf {
        self.root.join("models").join(name)
    }
    pub fn stage_marker(&self, stage: &str) -> PathBuf {
        self.root.join("stages").join(format!("{stage}.json"))
    }
    pub fn arm(&self, transform: &str, seed: u64) -> PathBuf {
        self.root
            .join("arms")
            .join(format!("{transform}-seed{seed}"))
    }
}

/// The reward models the pipeline trains, in objective order.
pub const OBJECTIVES: [&str; 2] = ["helpful", "harmless"];

impl PipelineSpec {
    /// Parses and validates a pipeline file; every problem is listed with its field.
    pub fn from_toml(text: &str, path: &Path) -> Result<PipelineSpec, Vec<String>> {
        let mut spec: PipelineSpec = toml::from_str(text)
            .map_err(|e| vec![format!("{}: {}", path.display(), e.message())])?;
        if let Some(out) = &mut spec.output_dir
            && out.is_relative()
        {
            *out = path.parent().unwrap_or(Path::new(".")).join(&*out);
        }
        let problems: Vec<String> = spec
            .problems()
            .into_iter()
            .map(|p| format!("{}: {p}", path.display()))
            .collect();
        if problems.is_empty() {
            Ok(spec)
        } else {
            Err(problems)
        }
    }

    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let t = &self.task;
        for (field, v) in [
            ("task.train_prompts", t.train_prompts),
            ("task.eval_prompts", t.eval_prompts),
            ("task.sft_examples", t.sft_examples),
            ("task.preference_pairs", t.preference_pairs),
            ("sft.epochs", self.sft.epochs),
            ("sft.batch_size", self.sft.batch_size),
            ("reward_models.epochs", self.reward_models.epochs),
            ("reward_models.batch_size", self.reward_models.batch_size),
        ] {
            if v == 0 {
                p.push(format!("{field}: must be at least 1"));
            }
        }
        if !(t.held_out_fraction > 0.0 && t.held_out_fraction < 1.0) {
            p.push(format!(
                "task.held_out_fraction: must be in (0, 1), got {}",
                t.held_out_fraction
            ));
        }
        if !(0.0..0.5).contains(&t.annotators.label_noise) {
            p.push(format!(
                "task.annotators.label_noise: must be in [0, 0.5), got {}",
                t.annotators.label_noise
            ));
        }
        if t.vocab_size < 300 {
            p.push(format!(
                "task.vocab_size: needs at least 300 (256 bytes, special tokens, merges), got {}",
                t.vocab_size
            ));
        }
        p.extend(t.sft_mix.problems("task.sft_mix"));
        p.extend(t.preference_mix.problems("task.preference_mix"));
        let m = &self.model;
        if m.num_heads == 0
            || m.num_kv_heads == 0
            || !m.hidden_size.is_multiple_of(m.num_heads)
            || !m.num_heads.is_multiple_of(m.num_kv_heads)
        {
            p.push(format!(
                "model: hidden_size ({}) must be a multiple of num_heads ({}), and num_heads a multiple of num_kv_heads ({})",
                m.hidden_size, m.num_heads, m.num_kv_heads
            ));
        }
        if self.arms.transforms.is_empty() {
            p.push("arms.transforms: at least one of identity, log_sigmoid".into());
        }
        for t in &self.arms.transforms {
            if !matches!(t.as_str(), "identity" | "log_sigmoid") {
                p.push(format!(
                    "arms.transforms: `{t}` is not one of identity, log_sigmoid"
                ));
            }
        }
        p.extend(rlhf_coordinator::job::name_problem(&self.name));
        // The RL settings, checked now rather than after the training stages.
        let layout = Layout {
            root: PathBuf::from("/nonexistent"),
        };
        let arm = self.arm_job(&layout, "log_sigmoid", self.seed);
        if let Err(e) = arm
            .learner_config(Path::new("learner"), &Default::default())
            .validate()
        {
            p.push(format!("learner: {e}"));
        }
        if self.rollout.samples_per_prompt < 2
            && self.learner.algorithm == rlhf_learner::config::Algorithm::Grpo
        {
            p.push("rollout.samples_per_prompt: GRPO needs at least 2".into());
        }
        if self.evaluation.every_steps == 0 {
            p.push(
                "evaluation.every_steps: the pipeline judges evaluations, set at least 1".into(),
            );
        }
        p
    }

    pub fn output_dir(&self) -> PathBuf {
        self.output_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(&self.name))
    }

    pub fn seeds(&self) -> Vec<u64> {
        if self.arms.seeds.is_empty() {
            vec![self.seed]
        } else {
            self.arms.seeds.clone()
        }
    }

    /// The RL job of one arm: the pipeline's models and data, the file's RL settings.
    pub fn arm_job(&self, layout: &Layout, transform: &str, seed: u64) -> JobSpec {
        let objectives = OBJECTIVES
            .iter()
            .map(|name| {
                let mut t = toml::Table::new();
                t.insert("name".into(), (*name).into());
                t.insert("kind".into(), "model".into());
                t.insert(
                    "model".into(),
                    layout
                        .model(&format!("rm-{name}"))
                        .display()
                        .to_string()
                        .into(),
                );
                t.insert("transform".into(), transform.into());
                t.insert("weight".into(), 1.0.into());
                t
            })
            .collect();
        JobSpec {
            name: format!("{}-{transform}-seed{seed}", self.name),
            output_dir: Some(layout.arm(transform, seed)),
            seed,
            priority: 0,
            policy: PolicySpec {
                model: layout.model("sft"),
                reference: None,
                critic: None,
            },
            data: DataSpec {
                prompts: layout.data("prompts.jsonl"),
                eval_prompts: Some(layout.data("eval.jsonl")),
            },
            objectives,
            rewards: self.rewards.clone(),
            rollout: self.rollout.clone(),
            learner: self.learner.clone(),
            resources: self.resources.clone(),
            evaluation: self.evaluation.clone(),
        }
    }
}

/// Whether a job file is a pipeline (has a `[task]` table).
pub fn is_pipeline(text: &str) -> bool {
    toml::from_str::<toml::Table>(text).is_ok_and(|t| t.contains_key("task"))
}
