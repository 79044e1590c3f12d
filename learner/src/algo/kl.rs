//! KL estimators and the KL coefficient controllers (REFERENCES.md §5).

use serde::{Deserialize, Serialize};

/// Per-token estimators of KL(π ‖ π_ref) from samples of π, with `log_r = log π_ref − log π`
/// (Schulman, "Approximating KL divergence", 2020). TRL's names: 0.11 `kl_penalty` `kl` = k1,
/// `mse` = k2, `abs`; 0.29 `kl_estimator` `k1`, `k3`; GRPO's KL term is k3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `−log_r`: unbiased, can be negative.
    K1,
    /// `½ log_r²`.
    K2,
    /// `exp(log_r) − 1 − log_r`: unbiased and ≥ 0.
    K3,
    /// `|log_r|` (trl 0.11.4 `PPOTrainer._kl_penalty`, `kl_penalty = "abs"`): ≥ 0, biased.
    Abs,
}

impl KlEstimator {
    /// The estimate for one token.
    pub fn estimate(self, logp: f32, ref_logp: f32) -> f32 {
        let log_r = ref_logp - logp;
        match self {
            KlEstimator::K1 => -log_r,
            KlEstimator::K2 => 0.5 * log_r * log_r,
            KlEstimator::K3 => log_r.exp() - 1.0 - log_r,
            KlEstimator::Abs => log_r.abs(),
        }
    }
}

/// Where the KL penalty enters the objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlPlacement {
    /// Per-token penalty `−β·kl` added to the rewards (PPO style; Ziegler et al. 2019).
    InReward,
    /// `β·kl` added to the per-token loss (GRPO style; DeepSeekMath).
    Loss,
}

/// The KL coefficient β: fixed, or adapted toward a target KL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KlController {
    Fixed {
        value: f64,
    },
    /// Ziegler et al. 2019: `e = clip(KL/target − 1, −0.2, 0.2)`,
    /// `β ← β (1 + e · n_steps / horizon)`.
    Adaptive {
        value: f64,
        target: f64,
        horizon: f64,
    },
}

impl KlController {
    /// The current β.
    pub fn value(&self) -> f64 {
        match self {
            KlController::Fixed { value } | KlController::Adaptive { value, .. } => *value,
        }
    }

    /// Updates β after a step that observed `current` KL over `n_steps` samples.
    pub fn update(&mut self, current: f64, n_steps: u64) {
        if let KlController::Adaptive {
            value,
            target,
            horizon,
        } = self
        {
            let error = (current / *target - 1.0).clamp(-0.2, 0.2);
            *value *= 1.0 + error * n_steps as f64 / *horizon;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimators() {
        // log_r = -0.5
        assert!((KlEstimator::K1.estimate(-1.0, -1.5) - 0.5).abs() < 1e-7);
        assert!((KlEstimator::K2.estimate(-1.0, -1.5) - 0.125).abs() < 1e-7);
        let k3 = KlEstimator::K3.estimate(-1.0, -1.5);
        assert!((k3 - ((-0.5f32).exp() - 1.0 + 0.5)).abs() < 1e-7);
        assert!(k3 >= 0.0);
        assert!((KlEstimator::Abs.estimate(-1.0, -1.5) - 0.5).abs() < 1e-7);
        assert!((KlEstimator::Abs.estimate(-1.5, -1.0) - 0.5).abs() < 1e-7);
    }

    #[test]
    fn adaptive_moves_toward_target_and_fixed_stays() {
        let mut c = KlController::Adaptive {
            value: 0.1,
            target: 6.0,
            horizon: 10000.0,
        };
        c.update(12.0, 1000);
        assert!((c.value() - 0.1 * (1.0 + 0.2 * 0.1)).abs() < 1e-12);
        c.update(0.0, 1000);
        assert!(c.value() < 0.1 * 1.02);
        let mut f = KlController::Fixed { value: 0.3 };
        f.update(100.0, 1000);
        assert_eq!(f.value(), 0.3);
    }
}
