//! Reward transformation and combination (REFERENCES.md §1; Wang et al., arXiv 2402.00742).
//!
//! Each objective's raw reward `r_i` is transformed — `identity`, or `log σ(r_i − r_ref_i(x))`
//! against a per-prompt reference reward — then the transformed rewards are summed with weights
//! and optionally clipped. With unit weights the log-sigmoid sum is log P(good on every
//! objective): one bad objective drags it down without bound, while more of an already good one
//! gains almost nothing.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// How one objective's raw reward is transformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    Identity,
    /// `log σ(r − r_ref(x))`, "log-sigmoid centred".
    LogSigmoid,
}

impl Transform {
    /// Whether the transform needs the per-prompt reference reward.
    pub fn needs_reference(self) -> bool {
        matches!(self, Transform::LogSigmoid)
    }
}

/// One objective of the combination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectiveWeight {
    pub name: String,
    pub transform: Transform,
    pub weight: f64,
}

/// The whole reward pipeline: transforms, weights, clipping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardPipeline {
    pub objectives: Vec<ObjectiveWeight>,
    /// Clip the combined reward into `[lo, hi]`.
    pub clip: Option<(f64, f64)>,
}

/// `log(1 + e^x)` without overflow.
pub fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// `log σ(z)` computed as `−softplus(−z)` (never `ln(σ(z))`, which underflows).
pub fn log_sigmoid(z: f64) -> f64 {
    -softplus(-z)
}

/// Per-prompt reference rewards: prompt id → one value per objective (pipeline order).
pub type ReferenceTable = HashMap<String, Vec<f32>>;

/// A sample's transformed rewards and their combination.
#[derive(Debug, Clone, PartialEq)]
pub struct CombinedReward {
    pub transformed: Vec<f32>,
    pub total: f32,
}

impl RewardPipeline {
    /// Whether any objective needs `r_ref`.
    pub fn needs_reference(&self) -> bool {
        self.objectives
            .iter()
            .any(|o| o.transform.needs_reference())
    }

    /// Transforms and combines one sample's raw rewards (one per objective, pipeline order).
    pub fn combine(
        &self,
        prompt_id: &str,
        raw: &[f32],
        reference: &ReferenceTable,
    ) -> Result<CombinedReward, String> {
        if raw.len() != self.objectives.len() {
            return Err(format!(
                "prompt `{prompt_id}`: {} reward values for {} objectives",
                raw.len(),
                self.objectives.len()
            ));
        }
        let r_ref = if self.needs_reference() {
            let row = reference.get(prompt_id).ok_or_else(|| {
                format!("prompt `{prompt_id}` has no reference reward r_ref (calibrate or SetReferenceRewards first)")
            })?;
            if row.len() != self.objectives.len() {
                return Err(format!(
                    "prompt `{prompt_id}`: r_ref has {} values for {} objectives",
                    row.len(),
                    self.objectives.len()
                ));
            }
            Some(row)
        } else {
            None
        };
        let mut transformed = Vec::with_capacity(raw.len());
        let mut total = 0.0f64;
        for (i, (o, &r)) in self.objectives.iter().zip(raw).enumerate() {
            if !r.is_finite() {
                return Err(format!(
                    "prompt `{prompt_id}`: objective `{}` reward is {r}",
                    o.name
                ));
            }
            let u = match o.transform {
                Transform::Identity => r as f64,
                Transform::LogSigmoid => {
                    let reference =
                        r_ref.expect("checked above: a transform needs r_ref")[i] as f64;
                    log_sigmoid(r as f64 - reference)
                }
            };
            transformed.push(u as f32);
            total += o.weight * u;
        }
        if let Some((lo, hi)) = self.clip {
            total = total.clamp(lo, hi);
        }
        Ok(CombinedReward {
            transformed,
            total: total as f32,
        })
    }
}

/// How `r_ref` is estimated from the reference policy's rewards for one prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantileEstimator {
    /// The sample quantile (linear interpolation between order statistics, numpy's default).
    Empirical,
    /// `mean + Φ⁻¹(q) · std` of a normal fitted to the samples (population std).
    Normal,
}

/// The q-quantile of `samples` (non-empty, finite) by the chosen estimator.
pub fn reference_reward(samples: &[f32], q: f64, estimator: QuantileEstimator) -> f32 {
    let n = samples.len() as f64;
    match estimator {
        QuantileEstimator::Empirical => {
            let mut s: Vec<f64> = samples.iter().map(|&v| v as f64).collect();
            s.sort_by(f64::total_cmp);
            let pos = q * (n - 1.0);
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            (s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)) as f32
        }
        QuantileEstimator::Normal => {
            let mean = samples.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = samples
                .iter()
                .map(|&v| (v as f64 - mean).powi(2))
                .sum::<f64>()
                / n;
            (mean + inverse_normal_cdf(q) * var.sqrt()) as f32
        }
    }
}

/// Φ⁻¹(p) for 0 < p < 1 (Acklam's rational approximation, relative error < 1.2e-9).
#[allow(clippy::excessive_precision)] // the published coefficients, digit for digit
pub fn inverse_normal_cdf(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.383577518672690e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_sigmoid_properties() {
        // ≤ 0, monotone, ≈ z for z ≪ 0, saturating at 0 for z ≫ 0, finite for |z| up to 1e4.
        let mut zs: Vec<f64> = (-10000..=10000)
            .step_by(7)
            .map(|i| i as f64)
            .chain([-1e4, 1e4, 0.5, -0.5])
            .collect();
        zs.sort_by(f64::total_cmp);
        let mut prev = f64::NEG_INFINITY;
        for &z in &zs {
            let u = log_sigmoid(z);
            assert!(u.is_finite() && u <= 0.0, "z={z} u={u}");
            assert!(u >= prev);
            prev = u;
        }
        assert!((log_sigmoid(-50.0) - -50.0).abs() < 1e-12);
        assert!((log_sigmoid(-1e4) - -1e4).abs() < 1e-9);
        assert!(log_sigmoid(40.0).abs() < 1e-15);
        assert!(log_sigmoid(1e4) == 0.0 || log_sigmoid(1e4).abs() < 1e-300);
        let strictly: Vec<f64> = [-3.0, -1.0, 0.0, 1.0, 3.0]
            .iter()
            .map(|&z| log_sigmoid(z))
            .collect();
        assert!(strictly.windows(2).all(|w| w[0] < w[1]));
        assert!((log_sigmoid(0.0) - 0.5f64.ln()).abs() < 1e-15);
    }

    fn pipeline(t: Transform) -> RewardPipeline {
        RewardPipeline {
            objectives: vec![
                ObjectiveWeight {
                    name: "a".into(),
                    transform: t,
                    weight: 1.0,
                },
                ObjectiveWeight {
                    name: "b".into(),
                    transform: t,
                    weight: 0.5,
                },
            ],
            clip: None,
        }
    }

    #[test]
    fn combination_sums_weighted_transforms() {
        let table = ReferenceTable::from([("p".to_string(), vec![1.0, -1.0])]);
        let out = pipeline(Transform::Identity)
            .combine("p", &[2.0, 4.0], &table)
            .unwrap();
        assert_eq!(out.total, 4.0);
        let out = pipeline(Transform::LogSigmoid)
            .combine("p", &[1.0, -1.0], &table)
            .unwrap();
        let expected = 1.5 * 0.5f64.ln();
        assert!((out.total as f64 - expected).abs() < 1e-6);
        let mut clipped = pipeline(Transform::Identity);
        clipped.clip = Some((-1.0, 1.0));
        assert_eq!(
            clipped.combine("p", &[2.0, 4.0], &table).unwrap().total,
            1.0
        );
    }

    #[test]
    fn a_prompt_without_reference_is_an_error() {
        let err = pipeline(Transform::LogSigmoid)
            .combine("q7", &[1.0, 1.0], &ReferenceTable::new())
            .unwrap_err();
        assert!(err.contains("q7") && err.contains("r_ref"), "{err}");
        assert!(
            pipeline(Transform::Identity)
                .combine("q7", &[1.0, 1.0], &ReferenceTable::new())
                .is_ok()
        );
    }

    #[test]
    fn quantiles() {
        let s: Vec<f32> = (0..=10).map(|i| i as f32).collect();
        assert!((reference_reward(&s, 0.85, QuantileEstimator::Empirical) - 8.5).abs() < 1e-6);
        assert!((inverse_normal_cdf(0.85) - 1.0364333894937898).abs() < 1e-8);
        assert!((inverse_normal_cdf(0.001) + 3.090232306167813).abs() < 1e-7);
        let n = reference_reward(&[1.0, 3.0], 0.85, QuantileEstimator::Normal);
        assert!((n as f64 - (2.0 + 1.0364333894937898)).abs() < 1e-5);
    }
}
