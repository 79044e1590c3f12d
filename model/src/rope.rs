//! Rotary position embeddings: frequencies (with `linear` / `llama3` scaling) and the cos/sin
//! tables for the positions of a batch.
//!
//! Tables are built per forward pass for exactly the positions used, on the host, in the same
//! precision steps as `transformers` (f32 frequencies, f32 angle), so long-context models cost no
//! memory for positions they never see.

use std::f64::consts::PI;

use crate::config::{RopeConfig, RopeScaling};

/// Inverse frequencies `1 / theta^(2i/d)` for `i < d/2`, after scaling.
///
/// Source: `transformers` `_compute_default_rope_parameters`, `_compute_linear_scaling_rope_parameters`,
/// `_compute_llama3_parameters` (modeling_rope_utils.py).
pub fn inv_freq(rope: &RopeConfig, head_dim: usize) -> Vec<f32> {
    let base: Vec<f32> = (0..head_dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / head_dim as f32;
            1.0 / (rope.theta as f32).powf(exponent)
        })
        .collect();
    match rope.scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_len,
        } => base
            .iter()
            .map(|&f| {
                let low_freq_wavelen = old_len / low_freq_factor;
                let high_freq_wavelen = old_len / high_freq_factor;
                let wavelen = 2.0 * PI / f as f64;
                if wavelen < high_freq_wavelen {
                    f
                } else if wavelen > low_freq_wavelen {
                    (f as f64 / factor) as f32
                } else {
                    let smooth = (old_len / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    ((1.0 - smooth) * f as f64 / factor + smooth * f as f64) as f32
                }
            })
            .collect(),
    }
}

/// `cos` and `sin` of `position * inv_freq`, duplicated over both halves of the head
/// (`rotate_half` layout), row-major `[positions.len(), head_dim]`.
pub fn tables(inv_freq: &[f32], positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(positions.len() * half * 2);
    let mut sin = Vec::with_capacity(positions.len() * half * 2);
    for &p in positions {
        let angles = inv_freq.iter().map(|&f| (p as f32 * f) as f64);
        let row_start = cos.len();
        for a in angles {
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
        cos.extend_from_within(row_start..row_start + half);
        sin.extend_from_within(row_start..row_start + half);
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rope(scaling: RopeScaling) -> RopeConfig {
        RopeConfig {
            theta: 500000.0,
            scaling,
        }
    }

    #[test]
    fn default_frequencies_follow_theta() {
        let f = inv_freq(&rope(RopeScaling::None), 8);
        assert_eq!(f.len(), 4);
        assert_eq!(f[0], 1.0);
        assert!((f[1] - 1.0 / 500000f32.powf(0.25)).abs() < 1e-9);
    }

    #[test]
    fn linear_divides_all_frequencies() {
        let plain = inv_freq(&rope(RopeScaling::None), 64);
        let lin = inv_freq(&rope(RopeScaling::Linear { factor: 4.0 }), 64);
        for (a, b) in plain.iter().zip(&lin) {
            assert!((a / 4.0 - b).abs() <= f32::EPSILON * a);
        }
    }

    #[test]
    fn llama3_keeps_high_and_scales_low_frequencies() {
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let plain = inv_freq(&rope(RopeScaling::None), 128);
        let scaled = inv_freq(&rope(scaling), 128);
        // Highest frequency (short wavelength) unchanged; lowest divided by the factor.
        assert_eq!(plain[0], scaled[0]);
        let last = plain.len() - 1;
        assert!((plain[last] / 8.0 - scaled[last]).abs() < 1e-12);
        // Monotone decreasing, as the smoothing interpolates between the two regimes.
        assert!(scaled.windows(2).all(|w| w[0] >= w[1]));
    }

    #[test]
    fn tables_repeat_halves() {
        let f = inv_freq(&rope(RopeScaling::None), 4);
        let (cos, sin) = tables(&f, &[0, 3]);
        assert_eq!(&cos[..4], &[1.0, 1.0, 1.0, 1.0]);
        assert_eq!(&sin[..4], &[0.0, 0.0, 0.0, 0.0]);
        assert_eq!(cos[4], cos[6]);
        assert_eq!(sin[5], sin[7]);
        assert!((cos[4] - 3f32.cos()).abs() < 1e-6);
    }
}
