//! The clipped surrogate policy loss shared by GRPO and PPO, with its aggregation variants, the
//! KL loss term and the importance ratio against the behaviour policy (REFERENCES.md §3, §4, §5).
//!
//! Per token: `r = exp(logp - logp_old)` (or, at sequence level — GSPO, arXiv 2507.18071 —
//! `r = exp(masked_mean_t(logp - logp_old))` for the whole sequence),
//! `l = -min(min(r, δ)·A, clip(r, 1-ε_low, 1+ε_high)·A)` (δ: optional two-sided bound), then
//! `l += β·kl` with `kl` the chosen estimator, multiplied by `r` when `kl_ratio_correction`
//! (TRL ≥ 1.x: the KL of samples from π_old is reweighted to π).
//!
//! `logp_old` is the behaviour policy's log-prob: with asynchronous rollouts it comes from an
//! older weight version, and `r` is the off-policy correction. `truncated_is` additionally
//! multiplies each token's loss by `min(r, c)` detached (truncated importance sampling) —
//! useful when the behaviour policy is far behind.

use rlhf_model::burn::tensor::{Bool, Tensor};
use serde::{Deserialize, Serialize};

use super::kl::KlEstimator;

/// How per-token losses become one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Mean over each sequence's tokens, then over sequences (GRPO).
    Grpo,
    /// Sum over the micro-batch's tokens / their count.
    Bnpo,
    /// Sum over tokens / the token count of the whole step batch (DAPO token-level).
    Dapo,
    /// Sum over tokens / (sequences × max completion length) (Dr. GRPO).
    DrGrpo,
}

/// Ratio at the token or the sequence level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RatioLevel {
    Token,
    Sequence,
}

/// Parameters of the policy loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyLossConfig {
    pub aggregation: Aggregation,
    pub eps_low: f64,
    pub eps_high: f64,
    /// Upper bound on the unclipped ratio (two-sided clipping), off when `None`.
    pub delta: Option<f64>,
    pub ratio_level: RatioLevel,
    /// Truncated importance weight `min(r, c)` (detached) on each token's loss, off when `None`.
    pub truncated_is: Option<f64>,
}

impl Default for PolicyLossConfig {
    fn default() -> Self {
        PolicyLossConfig {
            aggregation: Aggregation::Grpo,
            eps_low: 0.2,
            eps_high: 0.2,
            delta: None,
            ratio_level: RatioLevel::Token,
            truncated_is: None,
        }
    }
}

/// The KL-as-loss term.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KlLoss {
    pub beta: f64,
    pub estimator: KlEstimator,
    /// Multiply the per-token KL by the (differentiable) ratio `r`.
    pub ratio_correction: bool,
}

/// Normalisers that depend on the whole step, not on the micro-batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalisation {
    /// Micro-batches accumulated into one optimizer step (divides grpo/bnpo/dr_grpo).
    pub grad_accumulation: f64,
    /// DAPO's divisor: the step batch's completion tokens per rank, times
    /// grad_accumulation / micro-batches per generation (TRL's `num_items_in_batch` form).
    pub dapo_tokens: f64,
    /// Dr. GRPO's constant: the maximum completion length.
    pub max_completion_length: f64,
}

/// Tensors of one micro-batch, `[batch, tokens]`.
pub struct PolicyBatch {
    /// The policy's log-probs (differentiable).
    pub logp: Tensor<2>,
    /// Behaviour log-probs (constants).
    pub old_logp: Tensor<2>,
    /// Reference log-probs, needed when a KL loss is set.
    pub ref_logp: Option<Tensor<2>>,
    pub mask: Tensor<2>,
    /// `[batch, 1]` (one advantage per sequence) or `[batch, tokens]`.
    pub advantages: Tensor<2>,
}

/// Host-side metrics of the loss (computed from detached values).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyMetrics {
    /// Masked token mean of the KL term as used in the loss (with the ratio when corrected).
    pub kl: Option<f64>,
    pub clip_low_mean: f64,
    pub clip_high_mean: f64,
    pub clip_region_mean: f64,
    /// Smallest per-sequence share of low-clipped tokens.
    pub clip_low_min: f64,
    /// Largest per-sequence share of high-clipped tokens.
    pub clip_high_max: f64,
    /// Masked token mean of `r`.
    pub ratio_mean: f64,
}

/// Masked mean of `x` over each row (`[b, t]` → `[b, 1]`), with empty rows counted as one token.
fn row_mean(x: Tensor<2>, mask: &Tensor<2>) -> Tensor<2> {
    (x * mask.clone()).sum_dim(1) / mask.clone().sum_dim(1).clamp_min(1.0)
}

/// Per-token KL estimate as a tensor, `log_r = ref - logp`.
pub fn kl_tensor(estimator: KlEstimator, logp: Tensor<2>, ref_logp: Tensor<2>) -> Tensor<2> {
    let log_r = ref_logp - logp;
    match estimator {
        KlEstimator::K1 => log_r.neg(),
        KlEstimator::K2 => log_r.square() * 0.5,
        KlEstimator::K3 => log_r.clone().exp() - log_r - 1.0,
        KlEstimator::Abs => log_r.abs(),
    }
}

/// The loss of one micro-batch and its metrics.
pub fn policy_loss(
    batch: &PolicyBatch,
    config: &PolicyLossConfig,
    kl: Option<KlLoss>,
    norm: &Normalisation,
) -> (Tensor<1>, PolicyMetrics) {
    let mask = &batch.mask;
    let log_ratio = batch.logp.clone() - batch.old_logp.clone();
    let ratio = match config.ratio_level {
        RatioLevel::Token => log_ratio.exp(),
        RatioLevel::Sequence => row_mean(log_ratio, mask).exp(),
    };
    let clipped = ratio
        .clone()
        .clamp(1.0 - config.eps_low, 1.0 + config.eps_high);
    let bounded = match config.delta {
        Some(delta) => ratio.clone().clamp_max(delta),
        None => ratio.clone(),
    };
    let adv = batch.advantages.clone();
    let surrogate = (bounded * adv.clone()).min_pair(clipped * adv.clone());
    let mut per_token = surrogate.neg();
    if let Some(c) = config.truncated_is {
        per_token = per_token * ratio.clone().clamp_max(c).detach();
    }
    let mut kl_mean = None;
    if let Some(k) = kl {
        let ref_logp = batch
            .ref_logp
            .clone()
            .expect("a KL loss needs reference log-probs; the step builder provides them");
        let mut kl_tok = kl_tensor(k.estimator, batch.logp.clone(), ref_logp);
        if k.ratio_correction {
            kl_tok = kl_tok * ratio.clone();
        }
        kl_mean = Some(masked_token_mean(kl_tok.clone().detach(), mask));
        per_token = per_token + kl_tok * k.beta;
    }
    let [b, _] = per_token.dims();
    let masked_sum = || (per_token.clone() * mask.clone()).sum();
    let loss = match config.aggregation {
        Aggregation::Grpo => row_mean(per_token.clone(), mask).mean() / norm.grad_accumulation,
        Aggregation::Bnpo => {
            masked_sum() / mask.clone().sum().clamp_min(1.0) / norm.grad_accumulation
        }
        Aggregation::Dapo => masked_sum() / norm.dapo_tokens,
        Aggregation::DrGrpo => {
            masked_sum() / (b as f64 * norm.max_completion_length) / norm.grad_accumulation
        }
    };
    let metrics = clip_metrics(ratio.detach(), adv.detach(), mask, config, kl_mean);
    (loss, metrics)
}

fn masked_token_mean(x: Tensor<2>, mask: &Tensor<2>) -> f64 {
    let num = rlhf_model::host::to_vec((x * mask.clone()).sum())[0] as f64;
    let den = rlhf_model::host::to_vec(mask.clone().sum())[0] as f64;
    num / den.max(1.0)
}

fn clip_metrics(
    ratio: Tensor<2>,
    adv: Tensor<2>,
    mask: &Tensor<2>,
    config: &PolicyLossConfig,
    kl: Option<f64>,
) -> PolicyMetrics {
    let shape = mask.dims();
    let full = |t: Tensor<2>| t.expand(shape);
    let as_float = |b: Tensor<2, Bool>| b.float();
    let low = as_float(
        full(ratio.clone())
            .lower_elem(1.0 - config.eps_low)
            .bool_and(full(adv.clone()).lower_elem(0.0)),
    );
    let high = as_float(
        full(ratio.clone())
            .greater_elem(1.0 + config.eps_high)
            .bool_and(full(adv).greater_elem(0.0)),
    );
    let region = (low.clone() + high.clone()).clamp_max(1.0);
    let per_row = |x: Tensor<2>| rlhf_model::host::to_vec(row_mean(x, mask));
    let (low_rows, high_rows) = (per_row(low.clone()), per_row(high.clone()));
    // Token level: share of all masked tokens; sequence level: share of sequences.
    let mean_of = |x: Tensor<2>| match config.ratio_level {
        RatioLevel::Token => masked_token_mean(x, mask),
        RatioLevel::Sequence => {
            let rows = per_row(x);
            rows.iter().map(|&v| v as f64).sum::<f64>() / rows.len().max(1) as f64
        }
    };
    PolicyMetrics {
        kl,
        clip_low_mean: mean_of(low),
        clip_high_mean: mean_of(high),
        clip_region_mean: mean_of(region),
        clip_low_min: low_rows.iter().copied().fold(f32::INFINITY, f32::min) as f64,
        clip_high_max: high_rows.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64,
        ratio_mean: masked_token_mean(full(ratio), mask),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rlhf_model::burn::tensor::TensorData;

    #[test]
    fn kl_tensor_agrees_with_the_host_estimators() {
        let dev = rlhf_model::device::inference_device().unwrap();
        let logp = [-1.0f32, -0.2, -3.0, -0.7];
        let ref_logp = [-1.5f32, -0.1, -2.0, -0.7];
        let t = |v: &[f32]| Tensor::<2>::from_data(TensorData::new(v.to_vec(), [2, 2]), &dev);
        for estimator in [
            KlEstimator::K1,
            KlEstimator::K2,
            KlEstimator::K3,
            KlEstimator::Abs,
        ] {
            let got = rlhf_model::host::to_vec(kl_tensor(estimator, t(&logp), t(&ref_logp)));
            for (k, g) in got.iter().enumerate() {
                let want = estimator.estimate(logp[k], ref_logp[k]);
                assert!((g - want).abs() < 1e-6, "{estimator:?}[{k}]: {g} vs {want}");
            }
        }
    }
}
