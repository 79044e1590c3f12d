//! A toy RL task for learner tests: a tiny random Llama, fixed prompts, rollouts generated
//! in-process from the engine's current weights, and rewards counted from the completion.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rlhf_learner::algo::transform::{ObjectiveWeight, Transform};
use rlhf_learner::config::{LearnerConfig, RewardsConfig};
use rlhf_learner::trajectory::Trajectory;
use rlhf_learner::{Engine, StepOutcome};
use rlhf_model::{
    GenerationParams, GenerationRequest, LlamaDims, Model, ModelConfig, SamplingParams,
    SaveOptions, device,
};

pub const VOCAB: usize = 16;

/// A fresh tiny policy saved as an HF folder.
pub fn tiny_policy(dir: &Path, seed: u64) -> PathBuf {
    let config = ModelConfig::llama(LlamaDims {
        vocab_size: VOCAB,
        hidden_size: 32,
        intermediate_size: 64,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        bos_token_id: 0,
        eos_token_id: 1,
        pad_token_id: 2,
    });
    let path = dir.join("policy");
    Model::init(&config, &device::inference_device().unwrap(), seed)
        .save(&path, &SaveOptions::default())
        .unwrap();
    path
}

/// A GRPO config over `objectives` (name, transform, weight).
pub fn config(policy: &Path, out: &Path, objectives: &[(&str, Transform, f64)]) -> LearnerConfig {
    let toml = format!(
        r#"
policy = "{}"
output_dir = "{}"
[rewards]
objectives = []
[optim]
lr = 0.003
micro_batch = 32
"#,
        policy.display(),
        out.display()
    );
    let mut c: LearnerConfig = toml::from_str(&toml).unwrap();
    c.rewards = RewardsConfig {
        objectives: objectives
            .iter()
            .map(|(name, transform, weight)| ObjectiveWeight {
                name: name.to_string(),
                transform: *transform,
                weight: *weight,
            })
            .collect(),
        clip: None,
        reference_quantile: 0.85,
        reference_estimator: rlhf_learner::algo::transform::QuantileEstimator::Empirical,
    };
    c.validate().unwrap();
    c
}

/// `prompts` fixed prompts of 4 tokens (ids 3..VOCAB).
pub fn prompts(n: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            (0..4)
                .map(|j| 3 + ((i * 5 + j * 3) % (VOCAB - 3)) as u32)
                .collect()
        })
        .collect()
}

/// Share of `token` in a completion.
pub fn share(completion: &[u32], token: u32) -> f32 {
    completion.iter().filter(|&&t| t == token).count() as f32 / completion.len().max(1) as f32
}

/// Generates `group` samples per prompt with the engine's current weights and scores them with
/// `reward` (one value per objective).
pub fn rollouts(
    engine: &Engine,
    policy_dir: &Path,
    prompts: &[Vec<u32>],
    group: usize,
    step: u64,
    reward: &dyn Fn(&[u32]) -> Vec<f32>,
) -> Vec<Trajectory> {
    let model = Model::load(policy_dir, &device::inference_device().unwrap())
        .unwrap()
        .with_tensors(engine.policy_tensors())
        .unwrap();
    let requests: Vec<GenerationRequest> = prompts
        .iter()
        .enumerate()
        .flat_map(|(p, prompt)| {
            (0..group).map(move |g| GenerationRequest {
                prompt: prompt.clone(),
                params: GenerationParams {
                    sampling: SamplingParams::default(),
                    max_new_tokens: 8,
                    seed: step * 100_000 + (p * group + g) as u64,
                    ignore_eos: true,
                    ..Default::default()
                },
            })
        })
        .collect();
    let out = model.generate(&requests, None).unwrap();
    requests
        .iter()
        .zip(out)
        .enumerate()
        .map(|(i, (req, generated))| Trajectory {
            step,
            prompt_id: format!("p{}", i / group),
            group_id: format!("p{}", i / group),
            sample_index: (i % group) as u32,
            prompt_ids: req.prompt.clone(),
            rewards: reward(&generated.tokens),
            completion_ids: generated.tokens,
            logprobs: generated.logprobs,
            weight_version: engine.version(),
            finish_reason: generated.finish_reason.as_str().into(),
        })
        .collect()
}

/// Mean of objective `k` over trajectories.
pub fn mean_reward(ts: &[Trajectory], k: usize) -> f32 {
    ts.iter().map(|t| t.rewards[k]).sum::<f32>() / ts.len() as f32
}

/// Runs `steps` steps; returns (mean reward per objective of each step's rollouts, outcomes).
pub fn run(
    engine: &mut Engine,
    policy_dir: &Path,
    steps: std::ops::RangeInclusive<u64>,
    prompts: &[Vec<u32>],
    group: usize,
    reward: &dyn Fn(&[u32]) -> Vec<f32>,
) -> (Vec<Vec<f32>>, Vec<StepOutcome>) {
    let mut rewards = Vec::new();
    let mut outcomes = Vec::new();
    for step in steps {
        let ts = rollouts(engine, policy_dir, prompts, group, step, reward);
        let k = ts[0].rewards.len();
        rewards.push((0..k).map(|i| mean_reward(&ts, i)).collect());
        outcomes.push(engine.train_step(step, ts, step).unwrap());
    }
    (rewards, outcomes)
}

/// Two samples of prompt `id` for `step`: informative (rewards 0 and 1) or not (both 0.5).
pub fn wire_group(step: u64, id: &str, informative: bool) -> Vec<rlhf_proto::v1::Trajectory> {
    (0..2u32)
        .map(|i| rlhf_proto::v1::Trajectory {
            job_id: String::new(),
            step,
            prompt_id: id.into(),
            group_id: id.into(),
            sample_index: i,
            prompt_ids: vec![3, 4, 5],
            completion_ids: vec![6 + i, 7, 8 + i],
            logprobs: vec![-1.5, -2.25 - i as f32 * 0.1, -1.0],
            weight_version: 0,
            rewards: vec![if informative { i as f32 } else { 0.5 }],
            finish_reason: "length".into(),
            metadata: Default::default(),
        })
        .collect()
}
