//! Losses over model outputs that more than one trainer uses.

use burn::tensor::Tensor;
use burn::tensor::activation::log_sigmoid;

/// Bradley-Terry pairwise loss, mean over pairs (REFERENCES.md §2):
/// `-log σ(r_c - r_r - margin) + center_coef · (r_c + r_r)²` ("Helping or Herding?", arXiv
/// 2312.09244, for the centring term).
///
/// # Shapes
/// - `chosen`, `rejected`, `margin`: `[pairs]` → `[1]`
pub fn bradley_terry(
    chosen: Tensor<1>,
    rejected: Tensor<1>,
    margin: Tensor<1>,
    center_coef: f64,
) -> Tensor<1> {
    let diff = chosen.clone() - rejected.clone() - margin;
    let loss = log_sigmoid(diff).neg().mean();
    if center_coef == 0.0 {
        loss
    } else {
        loss + (chosen + rejected).square().mean() * center_coef
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, TensorData};

    use super::*;

    fn t(v: Vec<f32>) -> Tensor<1> {
        let n = v.len();
        Tensor::from_data(TensorData::new(v, [n]), &Device::flex())
    }

    #[test]
    fn matches_the_formula() {
        let (c, r, m) = (vec![2.0f32, -1.0], vec![1.0f32, 0.5], vec![0.5f32, 0.0]);
        let loss = crate::host::to_vec(bradley_terry(
            t(c.clone()),
            t(r.clone()),
            t(m.clone()),
            0.01,
        ))[0] as f64;
        let by_hand: f64 = (0..2)
            .map(|i| {
                let d = (c[i] - r[i] - m[i]) as f64;
                (1.0 + (-d).exp()).ln() + 0.01 * ((c[i] + r[i]) as f64).powi(2)
            })
            .sum::<f64>()
            / 2.0;
        assert!((loss - by_hand).abs() < 1e-6, "{loss} vs {by_hand}");
    }
}
