//! Masked statistics over `[rows, cols]` host matrices (row-major), as TRL computes them.
//!
//! Values are f32 like the tensors they come from; sums run in f64.

/// `sum(x * m) / sum(m)` (trl.core.masked_mean).
pub fn masked_mean(x: &[f32], mask: &[f32]) -> f64 {
    let (num, den) = x
        .iter()
        .zip(mask)
        .fold((0.0f64, 0.0f64), |(n, d), (&v, &m)| {
            (n + v as f64 * m as f64, d + m as f64)
        });
    num / den
}

/// Masked variance around the masked mean; `unbiased` applies Bessel's correction over the mask
/// count (trl.core.masked_var).
pub fn masked_var(x: &[f32], mask: &[f32], unbiased: bool) -> f64 {
    let mean = masked_mean(x, mask);
    let centered: Vec<f32> = x
        .iter()
        .map(|&v| ((v as f64 - mean).powi(2)) as f32)
        .collect();
    let var = masked_mean(&centered, mask);
    if unbiased {
        let n: f64 = mask.iter().map(|&m| m as f64).sum();
        var * n / (n - 1.0)
    } else {
        var
    }
}

/// `(x - mean) / sqrt(var + 1e-8)` with masked mean and unbiased masked variance, applied to
/// every element; the mean is added back when `shift_mean` is false (trl.core.masked_whiten).
pub fn masked_whiten(x: &[f32], mask: &[f32], shift_mean: bool) -> Vec<f32> {
    let mean = masked_mean(x, mask);
    let var = masked_var(x, mask, true);
    let scale = 1.0 / (var + 1e-8).sqrt();
    x.iter()
        .map(|&v| {
            let w = (v as f64 - mean) * scale;
            (if shift_mean { w } else { w + mean }) as f32
        })
        .collect()
}

/// Mean of the values that are not NaN (NaN when all are).
pub fn nanmean(x: &[f32]) -> f64 {
    let vals: Vec<f64> = x
        .iter()
        .filter(|v| !v.is_nan())
        .map(|&v| v as f64)
        .collect();
    vals.iter().sum::<f64>() / vals.len() as f64
}

/// Unbiased standard deviation of the values that are not NaN (trl.trainer.utils.nanstd); NaN
/// with fewer than two values.
pub fn nanstd(x: &[f32]) -> f64 {
    let vals: Vec<f64> = x
        .iter()
        .filter(|v| !v.is_nan())
        .map(|&v| v as f64)
        .collect();
    let n = vals.len() as f64;
    let mean = vals.iter().sum::<f64>() / n;
    let ss: f64 = vals.iter().map(|v| (v - mean).powi(2)).sum();
    (ss / (n - 1.0)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitening_centres_and_scales() {
        let x = [1.0, 2.0, 3.0, 100.0];
        let m = [1.0, 1.0, 1.0, 0.0];
        assert!((masked_mean(&x, &m) - 2.0).abs() < 1e-12);
        assert!((masked_var(&x, &m, true) - 1.0).abs() < 1e-12);
        assert!((masked_var(&x, &m, false) - 2.0 / 3.0).abs() < 1e-12);
        let w = masked_whiten(&x, &m, true);
        assert!((w[0] + 1.0).abs() < 1e-6 && w[1].abs() < 1e-6);
        let w = masked_whiten(&x, &m, false);
        assert!((w[1] - 2.0).abs() < 1e-6);
    }

    #[test]
    fn nan_aware_statistics() {
        let x = [1.0, f32::NAN, 3.0];
        assert_eq!(nanmean(&x), 2.0);
        assert!((nanstd(&x) - 2f64.sqrt()).abs() < 1e-12);
        assert!(nanstd(&[f32::NAN, 1.0]).is_nan());
    }
}
