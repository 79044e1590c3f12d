//! PPO for RLHF: per-token rewards with the KL penalty, GAE, and the clipped value loss
//! (REFERENCES.md §4; Ziegler et al. 2019, InstructGPT).
//!
//! Host functions work on row-major `[rows, tokens]` slices; the value loss is a tensor function
//! because it is differentiated.

use rlhf_model::burn::tensor::Tensor;

use super::kl::KlEstimator;
use super::stats::masked_whiten;

/// Per-token rewards of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRewards {
    /// `-β·kl_t`, plus the sequence's score at its score position.
    pub rewards: Vec<f32>,
    /// `-β·kl_t` alone.
    pub non_score: Vec<f32>,
    /// The per-token KL estimate.
    pub kl: Vec<f32>,
}

/// `r_t = -β · kl(logp_t, ref_t)` for every token, plus `score` at `score_index[row]`
/// (Ziegler et al. 2019). `logp` is the behaviour policy's log-prob. Positions outside the
/// completion are not masked here: callers mask what they feed in (TRL 0.11 semantics).
pub fn kl_rewards(
    scores: &[f32],
    logp: &[f32],
    ref_logp: &[f32],
    width: usize,
    score_index: &[usize],
    beta: f64,
    estimator: KlEstimator,
) -> TokenRewards {
    let kl: Vec<f32> = logp
        .iter()
        .zip(ref_logp)
        .map(|(&l, &r)| estimator.estimate(l, r))
        .collect();
    let non_score: Vec<f32> = kl.iter().map(|&k| (-beta * k as f64) as f32).collect();
    let mut rewards = non_score.clone();
    for (row, (&score, &index)) in scores.iter().zip(score_index).enumerate() {
        rewards[row * width + index] += score;
    }
    TokenRewards {
        rewards,
        non_score,
        kl,
    }
}

/// The index of the last 1 of each row of a mask (0 for an empty row).
pub fn last_valid_index(mask: &[f32], width: usize) -> Vec<usize> {
    mask.chunks(width)
        .map(|row| row.iter().rposition(|&m| m > 0.0).unwrap_or(0))
        .collect()
}

/// The KL the adaptive controller observes: the batch mean of each sequence's summed KL.
pub fn sequence_kl_mean(kl: &[f32], mask: &[f32], width: usize) -> f64 {
    let rows = kl.len() / width;
    let total: f64 = kl
        .chunks(width)
        .zip(mask.chunks(width))
        .map(|(k, m)| {
            k.iter()
                .zip(m)
                .map(|(&k, &m)| k as f64 * m as f64)
                .sum::<f64>()
        })
        .sum();
    total / rows.max(1) as f64
}

/// Advantages and returns of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Gae {
    pub advantages: Vec<f32>,
    pub returns: Vec<f32>,
}

/// Generalised advantage estimation over every position of each row (Schulman et al. 2016):
/// `δ_t = r_t + γ V_{t+1} - V_t` (V after the last position is 0), `A_t = δ_t + γλ A_{t+1}`,
/// `returns = A + V`. Whitening is left to the caller ([`masked_whiten`]).
pub fn gae(values: &[f32], rewards: &[f32], width: usize, gamma: f64, lambda: f64) -> Gae {
    let mut advantages = vec![0.0f32; values.len()];
    for (row, adv) in advantages.chunks_mut(width).enumerate() {
        let v = &values[row * width..(row + 1) * width];
        let r = &rewards[row * width..(row + 1) * width];
        let mut last = 0.0f64;
        for t in (0..width).rev() {
            let next = if t + 1 < width { v[t + 1] as f64 } else { 0.0 };
            let delta = r[t] as f64 + gamma * next - v[t] as f64;
            last = delta + gamma * lambda * last;
            adv[t] = last as f32;
        }
    }
    let returns = advantages.iter().zip(values).map(|(a, v)| a + v).collect();
    Gae {
        advantages,
        returns,
    }
}

/// TRL 0.11's `compute_advantages`: values and rewards masked, rewards optionally whitened
/// (mean kept), GAE, returns, advantages whitened over the mask.
pub fn masked_gae(
    values: &[f32],
    rewards: &[f32],
    mask: &[f32],
    width: usize,
    gamma: f64,
    lambda: f64,
    whiten_rewards: bool,
) -> (Vec<f32>, Gae) {
    let values: Vec<f32> = values.iter().zip(mask).map(|(v, m)| v * m).collect();
    let mut rewards: Vec<f32> = rewards.iter().zip(mask).map(|(r, m)| r * m).collect();
    if whiten_rewards {
        rewards = masked_whiten(&rewards, mask, false);
    }
    let mut out = gae(&values, &rewards, width, gamma, lambda);
    out.advantages = masked_whiten(&out.advantages, mask, true);
    (values, out)
}

/// Options of [`ppo_advantages`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdvantageOptions {
    pub gamma: f64,
    pub lambda: f64,
    /// Whiten the per-token rewards before GAE, keeping their mean.
    pub whiten_rewards: bool,
    /// Whiten the advantages after GAE.
    pub whiten_advantages: bool,
}

/// What [`ppo_advantages`] computed, row-major `[rows, width]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PpoAdvantages {
    /// The rewards GAE consumed (whitened when asked).
    pub rewards: Vec<f32>,
    pub advantages: Vec<f32>,
    pub returns: Vec<f32>,
}

/// Steps 5–6 of TRL's PPO rollout (trl 0.29.1 `experimental/ppo/ppo_trainer.py`,
/// `PPOTrainer.train`) on a padded batch: with `whiten_rewards`,
/// `r = masked_whiten(r, reward_mask, shift_mean=False)` then 0 outside `reward_mask`; GAE over
/// every position ([`gae`]; callers zero values and rewards under padding); `returns = A + V`;
/// with `whiten_advantages`, `A = masked_whiten(A, adv_mask)` then 0 outside `adv_mask`.
///
/// Whitening uses the unbiased variance, so a mask with fewer than two ones is an error (TRL
/// would produce NaN; its trainer asserts a per-rank minibatch of at least 8 for this).
pub fn ppo_advantages(
    values: &[f32],
    rewards: &[f32],
    reward_mask: &[f32],
    adv_mask: &[f32],
    width: usize,
    options: &AdvantageOptions,
) -> Result<PpoAdvantages, String> {
    let count = |m: &[f32]| m.iter().filter(|&&v| v > 0.0).count();
    let zero_outside = |x: Vec<f32>, m: &[f32]| -> Vec<f32> {
        x.into_iter()
            .zip(m)
            .map(|(v, &m)| if m > 0.0 { v } else { 0.0 })
            .collect()
    };
    let mut rewards = rewards.to_vec();
    if options.whiten_rewards {
        let n = count(reward_mask);
        if n < 2 {
            return Err(format!(
                "whiten_rewards: whitening needs at least 2 tokens in the batch, got {n}"
            ));
        }
        rewards = zero_outside(masked_whiten(&rewards, reward_mask, false), reward_mask);
    }
    let Gae {
        mut advantages,
        returns,
    } = gae(values, &rewards, width, options.gamma, options.lambda);
    if options.whiten_advantages {
        let n = count(adv_mask);
        if n < 2 {
            return Err(format!(
                "whiten_advantages: whitening needs at least 2 tokens in the batch, got {n}"
            ));
        }
        advantages = zero_outside(masked_whiten(&advantages, adv_mask, true), adv_mask);
    }
    Ok(PpoAdvantages {
        rewards,
        advantages,
        returns,
    })
}

/// Clipped value loss `½ · masked_mean(max((V - R)², (clip(V, V_old ± c) - R)²))` and the share
/// of tokens where the clipped term was larger.
///
/// # Shapes
/// all `[batch, tokens]` → `[1]`
pub fn value_loss(
    values: Tensor<2>,
    old_values: Tensor<2>,
    returns: Tensor<2>,
    mask: Tensor<2>,
    clip: f64,
) -> (Tensor<1>, f64) {
    let low = old_values.clone() - clip;
    let high = old_values + clip;
    let clipped = values.clone().max_pair(low).min_pair(high);
    let loss1 = (values - returns.clone()).square();
    let loss2 = (clipped - returns).square();
    let clipfrac = {
        let hits = loss2.clone().greater(loss1.clone()).float() * mask.clone();
        let n = rlhf_model::host::to_vec(mask.clone().sum())[0].max(1.0) as f64;
        rlhf_model::host::to_vec(hits.sum())[0] as f64 / n
    };
    let worst = loss1.max_pair(loss2) * mask.clone();
    let loss = worst.sum() / mask.sum().clamp_min(1.0) * 0.5;
    (loss, clipfrac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gae_with_lambda_one_is_discounted_return_minus_value() {
        let values = [0.5, 0.25, 0.0];
        let rewards = [0.0, 0.0, 1.0];
        let out = gae(&values, &rewards, 3, 1.0, 1.0);
        assert_eq!(out.returns, vec![1.0, 1.0, 1.0]);
        assert_eq!(out.advantages, vec![0.5, 0.75, 1.0]);
    }

    #[test]
    fn whitened_rewards_keep_their_mean_and_feed_gae() {
        // Two rows of width 3; the second has one padding position.
        let values = [0.5, -0.25, 0.125, 0.25, 0.75, 0.0];
        let rewards = [0.0, -0.5, 2.0, 0.25, 1.0, 0.0];
        let mask = [1.0, 1.0, 1.0, 1.0, 1.0, 0.0];
        let mut options = AdvantageOptions {
            gamma: 0.9,
            lambda: 0.8,
            whiten_rewards: false,
            whiten_advantages: false,
        };
        let plain = ppo_advantages(&values, &rewards, &mask, &mask, 3, &options).unwrap();
        assert_eq!(plain.rewards, rewards);
        options.whiten_rewards = true;
        let w = ppo_advantages(&values, &rewards, &mask, &mask, 3, &options).unwrap();
        // masked_whiten by hand: mean 0.55, unbiased var over the 5 masked values.
        let valid = [0.0f64, -0.5, 2.0, 0.25, 1.0];
        let mean = valid.iter().sum::<f64>() / 5.0;
        let var = valid.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 4.0;
        let want: Vec<f32> = [0, 1, 2, 3, 4]
            .iter()
            .map(|&k| ((valid[k] - mean) / (var + 1e-8).sqrt() + mean) as f32)
            .chain([0.0])
            .collect();
        for (g, e) in w.rewards.iter().zip(&want) {
            assert!((g - e).abs() < 1e-6, "{:?} vs {want:?}", w.rewards);
        }
        let masked_mean: f32 = w.rewards.iter().sum::<f32>() / 5.0;
        assert!((masked_mean as f64 - mean).abs() < 1e-6);
        // GAE ran on the whitened rewards, and that changes the advantages.
        assert_eq!(
            w.advantages,
            gae(&values, &w.rewards, 3, 0.9, 0.8).advantages
        );
        assert!((w.advantages[0] - plain.advantages[0]).abs() > 1e-3);
        // Advantage whitening: mean 0 over the mask, 0 outside.
        options.whiten_advantages = true;
        let a = ppo_advantages(&values, &rewards, &mask, &mask, 3, &options).unwrap();
        assert_eq!(a.advantages[5], 0.0);
        assert!(a.advantages.iter().sum::<f32>().abs() < 1e-5);
        let err = ppo_advantages(&[0.0], &[1.0], &[1.0], &[1.0], 1, &options).unwrap_err();
        assert!(err.contains("at least 2"), "{err}");
    }

    #[test]
    fn score_lands_on_the_chosen_token() {
        let out = kl_rewards(
            &[2.0],
            &[-1.0, -1.0],
            &[-1.5, -1.0],
            2,
            &[1],
            0.1,
            KlEstimator::K1,
        );
        assert!((out.kl[0] - 0.5).abs() < 1e-7);
        assert!((out.rewards[0] + 0.05).abs() < 1e-7);
        assert_eq!(out.rewards[1], 2.0);
        assert_eq!(
            last_valid_index(&[1.0, 1.0, 0.0, 0.0, 1.0, 0.0], 3),
            vec![1, 1]
        );
    }
}
