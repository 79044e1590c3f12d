//! Choosing the next token from logits: greedy, temperature, top-k, top-p.
//!
//! Pure functions over one row of logits and the sequence's own random generator, so a
//! sequence's samples depend only on its seed and its logits, never on what shares its batch.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// How to pick tokens. `temperature == 0` is greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Checks the ranges; the message names the parameter.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

/// The chosen token and its log-prob.
///
/// The token is drawn from the logits divided by the temperature, restricted to the top-k / top-p
/// set and renormalised, but its log-prob is under the full softmax at the same temperature,
/// `log_softmax(logits / T)[token]`: what the learner recomputes, so importance ratios compare
/// like with like (verl's and TRL's importance-sampling correction take the same convention).
/// For greedy decoding (a point mass, whose log-prob would always be 0) it is the log-prob under
/// the model's untempered distribution, which is what a caller scoring greedy outputs wants.
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut ChaCha8Rng) -> (u32, f32) {
    if params.temperature == 0.0 {
        let best = argmax(logits);
        return (best as u32, log_softmax_at(logits, best, 1.0));
    }
    let inv_t = 1.0 / params.temperature as f64;
    let filtered = params.top_k > 0 && params.top_k < logits.len() || params.top_p < 1.0;
    let u: f64 = rng.random::<f64>();
    if !filtered {
        // Full distribution: one pass for the normaliser, one to find the sampled token.
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let weights = logits.iter().map(|&l| ((l as f64 - max) * inv_t).exp());
        let total: f64 = weights.clone().sum();
        let target = u * total;
        let mut acc = 0.0;
        let mut chosen = logits.len() - 1;
        for (i, w) in weights.enumerate() {
            acc += w;
            if acc > target {
                chosen = i;
                break;
            }
        }
        let lp = (logits[chosen] as f64 - max) * inv_t - total.ln();
        return (chosen as u32, lp as f32);
    }
    let kept = truncated_candidates(logits, params, inv_t);
    let total: f64 = kept.iter().map(|&(_, w)| w).sum();
    let target = u * total;
    let mut acc = 0.0;
    let mut chosen = kept[kept.len() - 1];
    for &(i, w) in &kept {
        acc += w;
        if acc > target {
            chosen = (i, w);
            break;
        }
    }
    // Full softmax, not `chosen.1 / total`: the truncated set's renormalisation is not returned.
    let lp = log_softmax_at(logits, chosen.0, params.temperature as f64);
    (chosen.0 as u32, lp)
}

/// Tokens surviving top-k then top-p, most likely first, with unnormalised weights
/// `exp((l - max) / T)`.
fn truncated_candidates(logits: &[f32], params: &SamplingParams, inv_t: f64) -> Vec<(usize, f64)> {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let k = if params.top_k > 0 {
        params.top_k.min(logits.len())
    } else {
        logits.len()
    };
    let by_logit_desc = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, by_logit_desc);
        order.truncate(k);
    }
    order.sort_unstable_by(by_logit_desc);
    let max = logits[order[0]] as f64;
    let mut kept: Vec<(usize, f64)> = order
        .into_iter()
        .map(|i| (i, ((logits[i] as f64 - max) * inv_t).exp()))
        .collect();
    if params.top_p < 1.0 {
        let total: f64 = kept.iter().map(|&(_, w)| w).sum();
        let mut acc = 0.0;
        let mut n = 0;
        for &(_, w) in &kept {
            n += 1;
            acc += w / total;
            if acc >= params.top_p as f64 {
                break;
            }
        }
        kept.truncate(n.max(1));
    }
    kept
}

/// Index of the largest logit (the first one on ties, as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best
}

/// `log_softmax(logits / T)[index]`, computed in f64.
pub fn log_softmax_at(logits: &[f32], index: usize, temperature: f64) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits
        .iter()
        .map(|&l| ((l as f64 - max) / temperature).exp())
        .sum();
    ((logits[index] as f64 - max) / temperature - sum.ln()) as f32
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let (t, lp) = sample(
            &[1.0, 3.0, 3.0, 0.0],
            &SamplingParams::greedy(),
            &mut rng(0),
        );
        assert_eq!(t, 1);
        assert!((lp - log_softmax_at(&[1.0, 3.0, 3.0, 0.0], 1, 1.0)).abs() < 1e-7);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = SamplingParams::default();
        let a: Vec<u32> = (0..20)
            .scan(rng(7), |r, _| Some(sample(&logits, &p, r).0))
            .collect();
        let b: Vec<u32> = (0..20)
            .scan(rng(7), |r, _| Some(sample(&logits, &p, r).0))
            .collect();
        assert_eq!(a, b);
        assert!(a.iter().any(|&t| t != a[0]), "samples vary");
    }

    #[test]
    fn frequencies_follow_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()];
        let p = SamplingParams::default();
        let mut r = rng(1);
        let ones = (0..20000)
            .filter(|_| sample(&logits, &p, &mut r).0 == 1)
            .count();
        let share = ones as f64 / 20000.0;
        assert!((share - 0.75).abs() < 0.02, "{share}");
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [5.0f32, 4.0, 3.0, -10.0];
        let mut r = rng(3);
        let k1 = SamplingParams {
            top_k: 1,
            ..Default::default()
        };
        for _ in 0..50 {
            let (t, lp) = sample(&logits, &k1, &mut r);
            assert_eq!((t, lp), (0, log_softmax_at(&logits, 0, 1.0)));
        }
        let p = SamplingParams {
            top_p: 0.8,
            ..Default::default()
        };
        // p(0) = 0.665, p(0)+p(1) = 0.91 >= 0.8: tokens 0 and 1 only; the log-prob is the full
        // softmax's, not the renormalised one's.
        for _ in 0..200 {
            let (t, lp) = sample(&logits, &p, &mut r);
            assert!(t < 2);
            assert!((lp - log_softmax_at(&logits, t as usize, 1.0)).abs() < 1e-7);
        }
    }

    #[test]
    fn sampled_logprob_matches_tempered_softmax() {
        let logits = [0.5f32, -1.0, 2.0];
        let p = SamplingParams {
            temperature: 0.7,
            ..Default::default()
        };
        let (t, lp) = sample(&logits, &p, &mut rng(11));
        assert!((lp - log_softmax_at(&logits, t as usize, 0.7)).abs() < 1e-6);
    }

    #[test]
    fn validation_names_the_parameter() {
        let bad = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("top_p"));
    }
}
