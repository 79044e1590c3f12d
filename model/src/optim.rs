//! Training step plumbing shared by every trainer (SFT, reward models, the RL learner):
//! gradients to the host by name, global-norm clipping, AdamW, learning-rate schedules.
//!
//! The optimizer works on host f32 vectors keyed by HF parameter name. On the CPU backend that is
//! where the tensors live anyway; it makes the state trivially serialisable (exact checkpoint
//! resume), lets data-parallel ranks all-reduce one flat buffer, and keeps f32 master weights and
//! moments whatever the model's storage dtype.

use std::collections::{BTreeMap, HashMap};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Gradients, Tensor};
use serde::{Deserialize, Serialize};

use crate::llama::Model;
use crate::weights::{NamedTensor, param_specs};

/// Gradients of every trainable parameter, in [`param_specs`] order. A parameter the loss does
/// not reach gets zeros, so every rank always produces the same list.
pub fn grads_to_host(model: &Model, grads: &Gradients) -> Vec<NamedTensor> {
    let mut visitor = CollectGrads {
        path: Vec::new(),
        grads,
        out: HashMap::new(),
    };
    model.visit(&mut visitor);
    param_specs(&model.config)
        .into_iter()
        .map(|spec| {
            visitor
                .out
                .remove(&spec.name)
                .unwrap_or_else(|| NamedTensor {
                    values: vec![0.0; spec.shape.iter().product()],
                    name: spec.name,
                    shape: spec.shape,
                })
        })
        .collect()
}

struct CollectGrads<'a> {
    path: Vec<String>,
    grads: &'a Gradients,
    out: HashMap<String, NamedTensor>,
}

impl ModuleVisitor for CollectGrads<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let tensor = param.val();
        if let Some(grad) = tensor.grad(self.grads) {
            let name = self.path.join(".");
            let shape = grad.dims().to_vec();
            let values = crate::host::to_vec(grad);
            self.out.insert(
                name.clone(),
                NamedTensor {
                    name,
                    shape,
                    values,
                },
            );
        }
    }
}

/// L2 norm over every gradient value (`torch.nn.utils.clip_grad_norm_`'s total norm).
pub fn global_norm(grads: &[NamedTensor]) -> f64 {
    grads
        .iter()
        .flat_map(|g| g.values.iter())
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt()
}

/// Scales all gradients so their global norm is at most `max_norm`; returns the norm before.
pub fn clip_global_norm(grads: &mut [NamedTensor], max_norm: f64) -> f64 {
    let norm = global_norm(grads);
    // torch: clip_coef = max_norm / (total_norm + 1e-6), applied when < 1.
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            g.values
                .iter_mut()
                .for_each(|v| *v = (*v as f64 * coef) as f32);
        }
    }
    norm
}

/// AdamW hyper-parameters (the learning rate comes with each step, from a schedule).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// First and second moments of one parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// AdamW (Loshchilov & Hutter, arXiv 1711.05101) with f32 state, as `torch.optim.AdamW`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Updates applied so far.
    pub step: u64,
    pub state: BTreeMap<String, Moments>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW {
            config,
            step: 0,
            state: BTreeMap::new(),
        }
    }

    /// Applies one update to `params` in place. `grads` pairs with `params` by name.
    ///
    /// # Panics
    /// When a gradient's name or length does not match its parameter (a programming error: both
    /// come from the same model).
    pub fn update(&mut self, params: &mut [NamedTensor], grads: &[NamedTensor], lr: f64) {
        self.step += 1;
        let c = &self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        for (p, g) in params.iter_mut().zip(grads) {
            assert_eq!(p.name, g.name, "gradients pair with parameters by name");
            assert_eq!(
                p.values.len(),
                g.values.len(),
                "gradient size of {}",
                p.name
            );
            let n = p.values.len();
            let moments = self.state.entry(p.name.clone()).or_insert_with(|| Moments {
                m: vec![0.0; n],
                v: vec![0.0; n],
            });
            adamw_update(&mut p.values, &g.values, moments, lr, c, bias1, bias2);
        }
    }
}

/// One AdamW step over a parameter (torch.optim.AdamW, non-amsgrad, single-tensor path):
/// `p -= lr*wd*p; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
///  p -= lr/bias1 * m / (sqrt(v)/sqrt(bias2) + eps)`.
fn adamw_update(
    p: &mut [f32],
    g: &[f32],
    state: &mut Moments,
    lr: f64,
    c: &AdamWConfig,
    bias1: f64,
    bias2: f64,
) {
    let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
    let decay = (1.0 - lr * c.weight_decay) as f32;
    let step_size = (lr / bias1) as f32;
    let bias2_sqrt = bias2.sqrt() as f32;
    let eps = c.eps as f32;
    for i in 0..p.len() {
        let gi = g[i];
        let m = b1 * state.m[i] + (1.0 - b1) * gi;
        let v = b2 * state.v[i] + (1.0 - b2) * gi * gi;
        state.m[i] = m;
        state.v[i] = v;
        let denom = v.sqrt() / bias2_sqrt + eps;
        p[i] = p[i] * decay - step_size * m / denom;
    }
}

/// Learning-rate schedule: linear warmup, then constant or cosine decay to `min_lr`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub lr: f64,
    pub warmup_steps: u64,
    pub decay: Decay,
    /// Steps of the whole run (cosine reaches `min_lr` there).
    pub total_steps: u64,
    pub min_lr: f64,
}

/// The shape of the learning rate after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    Constant,
    Cosine,
}

impl LrSchedule {
    pub fn constant(lr: f64) -> Self {
        LrSchedule {
            lr,
            warmup_steps: 0,
            decay: Decay::Constant,
            total_steps: 0,
            min_lr: 0.0,
        }
    }

    /// The learning rate of (0-based) optimizer step `step`.
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.decay {
            Decay::Constant => self.lr,
            Decay::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                self.min_lr + (self.lr - self.min_lr) * cosine
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, values: Vec<f32>) -> NamedTensor {
        NamedTensor {
            name: name.into(),
            shape: vec![values.len()],
            values,
        }
    }

    #[test]
    fn adamw_matches_torch() {
        // torch.optim.AdamW([p], lr=0.1, weight_decay=0.01) with p=[1,-2], grads [0.5,0.5] then
        // [-1, 0.25]: p after step 1 = [0.899, -2.098], after step 2 = [0.8435..., -2.19539...].
        let mut opt = AdamW::new(AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        });
        let mut p = vec![t("w", vec![1.0, -2.0])];
        opt.update(&mut p, &[t("w", vec![0.5, 0.5])], 0.1);
        assert!((p[0].values[0] - 0.899).abs() < 1e-6, "{:?}", p[0].values);
        assert!(
            (p[0].values[1] - (-2.098)).abs() < 1e-6,
            "{:?}",
            p[0].values
        );
        opt.update(&mut p, &[t("w", vec![-1.0, 0.25])], 0.1);
        // Step 2 by hand: m = [0.9*0.05-0.1, 0.9*0.05+0.025], v = [0.999*2.5e-4+1e-3, ...].
        let expect = |p0: f64, m_prev: f64, v_prev: f64, g: f64| {
            let p = p0 * (1.0 - 0.1 * 0.01);
            let m = 0.9 * m_prev + 0.1 * g;
            let v = 0.999 * v_prev + 0.001 * g * g;
            p - 0.1 / (1.0 - 0.81) * m / (v.sqrt() / (1.0 - 0.998001f64).sqrt() + 1e-8)
        };
        let e0 = expect(0.899, 0.05, 0.00025, -1.0);
        let e1 = expect(-2.098, 0.05, 0.00025, 0.25);
        assert!(
            (p[0].values[0] as f64 - e0).abs() < 1e-5,
            "{} vs {e0}",
            p[0].values[0]
        );
        assert!(
            (p[0].values[1] as f64 - e1).abs() < 1e-5,
            "{} vs {e1}",
            p[0].values[1]
        );
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut g = vec![t("a", vec![3.0]), t("b", vec![4.0])];
        let norm = clip_global_norm(&mut g, 1.0);
        assert!((norm - 5.0).abs() < 1e-9);
        assert!((global_norm(&g) - 1.0).abs() < 1e-5);
        let mut small = vec![t("a", vec![0.1])];
        clip_global_norm(&mut small, 1.0);
        assert_eq!(small[0].values, vec![0.1]);
    }

    #[test]
    fn schedules_warm_up_and_decay() {
        let s = LrSchedule {
            lr: 1.0,
            warmup_steps: 2,
            decay: Decay::Cosine,
            total_steps: 12,
            min_lr: 0.0,
        };
        assert_eq!(s.at(0), 0.5);
        assert_eq!(s.at(1), 1.0);
        assert!((s.at(2) - 1.0).abs() < 1e-12);
        assert!((s.at(7) - 0.5).abs() < 1e-12);
        assert!(s.at(12).abs() < 1e-12);
        assert_eq!(LrSchedule::constant(0.3).at(100), 0.3);
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
}

/// Backward, clip, AdamW, schedule: one optimizer step on a scalar loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trainer {
    pub optimizer: AdamW,
    pub schedule: LrSchedule,
    /// Clip the global gradient norm to this value (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
}

impl Trainer {
    pub fn new(config: AdamWConfig, schedule: LrSchedule, max_grad_norm: Option<f64>) -> Self {
        Trainer {
            optimizer: AdamW::new(config),
            schedule,
            max_grad_norm,
        }
    }

    /// The fine-tuning recipe of `rlhf sft` and `rlhf reward train`: AdamW, linear warmup over
    /// 5% of `total_steps`, cosine decay to 10% of `lr`, global gradient norm clipped to 1.
    pub fn fine_tuning(lr: f64, weight_decay: f64, total_steps: u64) -> Self {
        let schedule = LrSchedule {
            lr,
            warmup_steps: (total_steps / 20).max(1),
            decay: Decay::Cosine,
            total_steps,
            min_lr: lr * 0.1,
        };
        let adamw = AdamWConfig {
            weight_decay,
            ..Default::default()
        };
        Trainer::new(adamw, schedule, Some(1.0))
    }

    /// Differentiates `loss` (a one-element tensor computed from `model` on an autodiff device)
    /// and updates the model.
    pub fn step(&mut self, model: Model, loss: Tensor<1>) -> (Model, StepStats) {
        let loss_value = crate::host::to_vec(loss.clone())[0] as f64;
        let grads = loss.backward();
        let mut grads = grads_to_host(&model, &grads);
        let (model, mut stats) = self.apply(model, &mut grads);
        stats.loss = loss_value;
        (model, stats)
    }

    /// Clips and applies already computed (e.g. all-reduced or accumulated) gradients.
    pub fn apply(&mut self, model: Model, grads: &mut [NamedTensor]) -> (Model, StepStats) {
        let grad_norm = match self.max_grad_norm {
            Some(max) => clip_global_norm(grads, max),
            None => global_norm(grads),
        };
        let lr = self.schedule.at(self.optimizer.step);
        let mut params = model.named_tensors();
        self.optimizer.update(&mut params, grads, lr);
        let model = model
            .with_tensors(params)
            .expect("parameters keep their names and shapes through an update");
        let stats = StepStats {
            loss: f64::NAN,
            grad_norm,
            lr,
        };
        (model, stats)
    }
}

/// Moves the first `fraction` of `items` (shuffle them first) into a held-out set, always
/// leaving at least one item to train on.
pub fn hold_out<T>(items: &mut Vec<T>, fraction: f64) -> Vec<T> {
    let n = ((items.len() as f64) * fraction).round() as usize;
    items
        .drain(..n.min(items.len().saturating_sub(1)))
        .collect()
}

/// A training progress bar over `total` optimizer steps (hidden when `quiet`).
pub fn progress_bar(total: u64, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} steps {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}
