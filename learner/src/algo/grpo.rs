//! Group-relative advantages (GRPO family) and the group filters of DAPO.

use serde::{Deserialize, Serialize};

use super::stats::{nanmean, nanstd};

/// How group-relative advantages are scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageScale {
    /// Divide by the group's std (GRPO, DeepSeekMath).
    Group,
    /// Divide by the std of the whole batch.
    Batch,
    /// No scaling: `R - mean(R)` (Dr. GRPO, arXiv 2503.20783).
    None,
}

/// `A_j = (R_j - mean_g(R)) / (std(R) + eps)` for every sample j of group g (REFERENCES.md §3).
///
/// Means and stds ignore NaN rewards (unscorable samples, as TRL's nanmean/nanstd), std is
/// unbiased; a NaN reward gets advantage 0, and so does every sample of a group with fewer than
/// two scored samples (there is nothing to compare it with).
pub fn group_advantages(
    rewards: &[f32],
    groups: &[Vec<usize>],
    scale: AdvantageScale,
    eps: f64,
) -> Vec<f32> {
    let mut out = vec![0.0f32; rewards.len()];
    let batch_std = nanstd(rewards);
    for group in groups {
        let values: Vec<f32> = group.iter().map(|&i| rewards[i]).collect();
        let scored = values.iter().filter(|v| !v.is_nan()).count();
        if scored < 2 {
            continue;
        }
        let mean = nanmean(&values);
        let denom = match scale {
            AdvantageScale::Group => nanstd(&values) + eps,
            AdvantageScale::Batch => batch_std + eps,
            AdvantageScale::None => 1.0,
        };
        for &i in group {
            let r = rewards[i];
            out[i] = if r.is_nan() {
                0.0
            } else {
                ((r as f64 - mean) / denom) as f32
            };
        }
    }
    out
}

/// How several reward functions become one advantage (TRL 1.16
/// `GRPOConfig.multi_objective_aggregation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MultiObjective {
    /// Weighted sum of the functions, then group-relative advantages ([`group_advantages`]).
    SumThenNormalize,
    /// Each function normalised within its group, weighted sum, then normalised over the batch
    /// (GDPO, arXiv 2601.05242).
    NormalizeThenSum,
}

/// `R_j = Σ_k w_k r_jk` over the functions that scored sample j; NaN when none did (TRL 1.16
/// `GRPOTrainer._generate_and_score_completions`: `nansum`, then unscorable rows set to NaN).
/// `per_func` is row-major `[samples, weights.len()]`, NaN where a function returned None.
pub fn weighted_rewards(per_func: &[f32], weights: &[f32]) -> Vec<f32> {
    per_func
        .chunks(weights.len())
        .map(|row| {
            if row.iter().all(|v| v.is_nan()) {
                return f32::NAN;
            }
            row.iter()
                .zip(weights)
                .filter(|(v, _)| !v.is_nan())
                .map(|(v, w)| v * w)
                .sum()
        })
        .collect()
}

/// Advantages from several reward functions, as TRL 1.16
/// `GRPOTrainer._generate_and_score_completions` computes them with `std_epsilon = 1e-4`.
///
/// `sum_then_normalize`: [`weighted_rewards`] then [`group_advantages`] with `scale`.
/// `normalize_then_sum` (`scale` unused, as in TRL): for each function k and group g,
/// `z_jk = (r_jk − nanmean_g(r_k)) / (nanstd_g(r_k) + eps)` (NaN where r_jk is NaN or the group
/// has fewer than two scores of k; 0 for a group of one), `R_j = nansum_k(w_k z_jk)` (NaN when
/// no function scored j), then `A_j = (R_j − nanmean(R)) / (nanstd(R) + eps)` over the batch;
/// NaN advantages become 0. Stds are unbiased ([`nanstd`]).
pub fn multi_objective_advantages(
    per_func: &[f32],
    weights: &[f32],
    groups: &[Vec<usize>],
    aggregation: MultiObjective,
    scale: AdvantageScale,
    eps: f64,
) -> Vec<f32> {
    let funcs = weights.len();
    match aggregation {
        MultiObjective::SumThenNormalize => {
            group_advantages(&weighted_rewards(per_func, weights), groups, scale, eps)
        }
        MultiObjective::NormalizeThenSum => {
            let n = per_func.len() / funcs.max(1);
            let mut z = vec![f32::NAN; per_func.len()];
            for group in groups {
                for k in 0..funcs {
                    let values: Vec<f32> = group.iter().map(|&j| per_func[j * funcs + k]).collect();
                    let mean = nanmean(&values);
                    let std = if group.len() > 1 {
                        nanstd(&values)
                    } else {
                        0.0
                    };
                    for &j in group {
                        let r = per_func[j * funcs + k] as f64;
                        z[j * funcs + k] = ((r - mean) / (std + eps)) as f32;
                    }
                }
            }
            let mut rewards: Vec<f32> = z
                .chunks(funcs)
                .map(|row| {
                    row.iter()
                        .zip(weights)
                        .filter(|(v, _)| !v.is_nan())
                        .map(|(v, w)| v * w)
                        .sum()
                })
                .collect();
            for (j, r) in rewards.iter_mut().enumerate() {
                if per_func[j * funcs..(j + 1) * funcs]
                    .iter()
                    .all(|v| v.is_nan())
                {
                    *r = f32::NAN;
                }
            }
            let mean = nanmean(&rewards);
            let std = if n > 1 { nanstd(&rewards) } else { 0.0 };
            rewards
                .iter()
                .map(|&r| {
                    let a = (r as f64 - mean) / (std + eps);
                    if a.is_nan() { 0.0 } else { a as f32 }
                })
                .collect()
        }
    }
}

/// Groups of consecutive samples, `size` each (TRL's layout: row i belongs to prompt i / size).
pub fn consecutive_groups(n: usize, size: usize) -> Vec<Vec<usize>> {
    (0..n)
        .collect::<Vec<_>>()
        .chunks(size)
        .map(<[usize]>::to_vec)
        .collect()
}

/// DAPO dynamic sampling: whether a group is informative (its rewards are not all equal).
/// Groups where every sample got the same reward have zero advantage everywhere and only dilute
/// the batch.
pub fn is_informative(rewards: &[f32], group: &[usize]) -> bool {
    let mut values = group.iter().map(|&i| rewards[i]).filter(|r| !r.is_nan());
    match values.next() {
        None => false,
        Some(first) => values.any(|r| (r - first).abs() > 1e-6 * first.abs().max(1.0)),
    }
}

/// DAPO soft overlong punishment (Yu et al., arXiv 2503.14476, eq. 13), added to the reward of
/// a completion of `len` tokens: 0 up to `max_len - cache`, then falling linearly to -1 at
/// `max_len`, and -1 beyond.
pub fn soft_overlong_penalty(len: usize, max_len: usize, cache: usize) -> f32 {
    let free = max_len.saturating_sub(cache);
    match len {
        l if l <= free => 0.0,
        l if l > max_len => -1.0,
        l => -((l - free) as f32) / cache.max(1) as f32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantages_center_and_scale() {
        let r = [1.0, 0.0, 0.5, 0.5];
        let g = consecutive_groups(4, 4);
        let a = group_advantages(&r, &g, AdvantageScale::None, 1e-4);
        assert_eq!(a, vec![0.5, -0.5, 0.0, 0.0]);
        let a = group_advantages(&r, &g, AdvantageScale::Group, 1e-4);
        let std = (0.5f64 / 3.0).sqrt();
        assert!((a[0] as f64 - 0.5 / (std + 1e-4)).abs() < 1e-6);
    }

    #[test]
    fn lonely_or_unscored_samples_get_zero() {
        let r = [f32::NAN, 2.0, 5.0, 1.0];
        let a = group_advantages(&r, &consecutive_groups(4, 2), AdvantageScale::Group, 1e-4);
        assert_eq!(&a[..2], &[0.0, 0.0]);
        assert!(a[2] > 0.0 && a[3] < 0.0);
    }

    #[test]
    fn normalize_then_sum_normalises_each_function_before_the_sum() {
        // One group of 4; function b has 100 times the spread of a, weights 1 and 1.
        let per_func = [1.0, 100.0, 0.0, -100.0, 1.0, 0.0, 0.0, 10.0];
        let groups = consecutive_groups(4, 4);
        let w = [1.0, 1.0];
        let eps = 1e-4;
        let got = multi_objective_advantages(
            &per_func,
            &w,
            &groups,
            MultiObjective::NormalizeThenSum,
            AdvantageScale::None,
            eps,
        );
        let z = |x: [f64; 4]| -> Vec<f64> {
            let m = x.iter().sum::<f64>() / 4.0;
            let s = (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / 3.0).sqrt();
            x.iter().map(|v| (v - m) / (s + eps)).collect()
        };
        let (za, zb) = (z([1.0, 0.0, 1.0, 0.0]), z([100.0, -100.0, 0.0, 10.0]));
        let r: Vec<f64> = (0..4).map(|j| za[j] + zb[j]).collect();
        let want = z([r[0], r[1], r[2], r[3]]);
        for (g, e) in got.iter().zip(&want) {
            assert!((*g as f64 - e).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        // Summing first lets b's scale dominate: sample 2 (a = 1, b = 0) is above average once
        // each function is normalised, below it when the raw values are summed.
        let summed = multi_objective_advantages(
            &per_func,
            &w,
            &groups,
            MultiObjective::SumThenNormalize,
            AdvantageScale::Group,
            eps,
        );
        assert!(got[2] > 0.0 && summed[2] < 0.0, "{got:?} {summed:?}");
    }

    #[test]
    fn unscorable_samples_and_missing_scores() {
        let nan = f32::NAN;
        // Sample 3 has no score at all; sample 1 misses function b.
        let per_func = [1.0, 0.5, 0.0, nan, 1.0, 1.5, nan, nan];
        let a = multi_objective_advantages(
            &per_func,
            &[1.0, 2.0],
            &consecutive_groups(4, 4),
            MultiObjective::NormalizeThenSum,
            AdvantageScale::Group,
            1e-4,
        );
        assert_eq!(a[3], 0.0);
        assert!(a.iter().all(|v| v.is_finite()));
        assert!(weighted_rewards(&per_func, &[1.0, 2.0])[3].is_nan());
        assert_eq!(weighted_rewards(&per_func, &[1.0, 2.0])[1], 0.0);
    }

    #[test]
    fn dynamic_sampling_and_overlong() {
        let r = [1.0, 1.0, 0.0, 1.0];
        assert!(!is_informative(&r, &[0, 1]));
        assert!(is_informative(&r, &[1, 2]));
        assert_eq!(soft_overlong_penalty(10, 20, 4), 0.0);
        assert_eq!(soft_overlong_penalty(18, 20, 4), -0.5);
        assert_eq!(soft_overlong_penalty(20, 20, 4), -1.0);
        assert_eq!(soft_overlong_penalty(25, 20, 4), -1.0);
    }
}
