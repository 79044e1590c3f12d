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
