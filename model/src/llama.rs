//! The Llama-family decoder (Llama, Qwen2, Mistral) with its three heads.
//!
//! Field names mirror the Hugging Face checkpoint layout, so a parameter's path in the module
//! tree (`model.layers.0.self_attn.q_proj.weight`) is its safetensors name. Linear weights are
//! kept in HF's `[out, in]` layout and multiplied transposed (burn's CPU matmul takes strided
//! operands without a copy), so loading, saving and streaming weights never transposes.
//!
//! Modules hold weights only; the KV cache and rotary tables live outside (STYLE.md §8).

use burn::module::{Module, Param};
use burn::tensor::activation::silu;
use burn::tensor::module::{attention, embedding};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use crate::batch::{TokenBatch, attention_mask};
use crate::config::{HeadKind, ModelConfig};
use crate::kv_cache::KvCache;
use crate::rope;

/// Row count below which a batch-invariant model pads its matmuls (see [`matmul_t`]).
pub const BATCH_INVARIANT_ROWS: usize = 16;

/// `x W^T` for a `[rows, in]` matrix; fewer than `min_rows` rows are zero-padded to `min_rows`.
///
/// flex's CPU matmul picks its kernel by the number of rows: below about nine rows each row's
/// sums are rounded differently than in a larger batch. With `min_rows` =
/// [`BATCH_INVARIANT_ROWS`] a row's result never depends on how many other rows share the batch
/// (tested bitwise), which is what makes a seeded sample's tokens the same alone or in any batch.
/// The price is paid only by batches of fewer than 16 rows (up to 2.4× slower batch-1 decoding on
/// a 25M model), so it is a per-model switch ([`Model::batch_invariant`]) that the rollout actor
/// turns on.
fn matmul_t(x: Tensor<2>, w: Tensor<2>, min_rows: usize) -> Tensor<2> {
    let [rows, d_in] = x.dims();
    if rows < min_rows {
        let d_out = w.dims()[0];
        let pad = Tensor::zeros([min_rows - rows, d_in], &x.device());
        return Tensor::cat(vec![x, pad], 0)
            .matmul(w.transpose())
            .slice([0..rows, 0..d_out]);
    }
    x.matmul(w.transpose())
}

/// `y = x W^T + b` with `W` in `[out, in]` layout.
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
}

impl Linear {
    /// # Shapes
    /// - `x`: `[batch, seq, in]` → `[batch, seq, out]`
    pub fn forward(&self, x: Tensor<3>, min_rows: usize) -> Tensor<3> {
        let [b, t, d_in] = x.dims();
        let w = self.weight.val();
        let d_out = w.dims()[0];
        let y = matmul_t(x.reshape([b * t, d_in]), w, min_rows);
        let y = match &self.bias {
            Some(bias) => y + bias.val().unsqueeze::<2>(),
            None => y,
        };
        y.reshape([b, t, d_out])
    }
}

/// Token embedding table `[vocab, hidden]`.
#[derive(Module, Debug)]
pub struct Embedding {
    pub weight: Param<Tensor<2>>,
}

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * weight` (Zhang & Sennrich 2019; HF `LlamaRMSNorm`).
#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    #[module(skip)]
    pub eps: f64,
}

impl RmsNorm {
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` → same
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let variance = x.clone().square().mean_dim(2);
        let normed = x * (variance + self.eps).sqrt().recip();
        normed * self.weight.val().unsqueeze::<3>()
    }
}

/// Multi-head attention with grouped key/value heads.
#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    #[module(skip)]
    pub num_heads: usize,
    #[module(skip)]
    pub num_kv_heads: usize,
    #[module(skip)]
    pub head_dim: usize,
}

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` → same
    pub fn forward(&self, x: Tensor<3>, min_rows: usize) -> Tensor<3> {
        let gate = silu(self.gate_proj.forward(x.clone(), min_rows));
        self.down_proj
            .forward(gate * self.up_proj.forward(x, min_rows), min_rows)
    }
}

/// One pre-norm decoder block.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

/// The decoder stack: HF's `model.` prefix.
#[derive(Module, Debug)]
pub struct Decoder {
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
}

/// A decoder and its head, mirroring one HF checkpoint.
#[derive(Module, Debug)]
pub struct Model {
    pub model: Decoder,
    /// Absent when the embeddings are tied or the head is `score`.
    pub lm_head: Option<Linear>,
    /// Present for reward (`Score`) and value (`Value`) heads.
    pub score: Option<Linear>,
    #[module(skip)]
    pub config: ModelConfig,
    #[module(skip)]
    inv_freq: Vec<f32>,
    /// Make every row's result independent of the batch it is in (see [`matmul_t`]); off by
    /// default, on in the rollout actor.
    #[module(skip)]
    pub batch_invariant: bool,
}

/// Per-forward inputs derived once from a [`TokenBatch`] and shared by all layers.
struct ForwardContext {
    /// `[batch, 1, seq, head_dim]`
    cos: Tensor<4>,
    /// `[batch, 1, seq, head_dim]`
    sin: Tensor<4>,
    /// `[batch, heads, seq, past + seq]`, `true` = masked; `None` when `causal` (or nothing)
    /// says everything.
    mask: Option<Tensor<4, Bool>>,
    /// Use the backend's causal masking (no padding, no cache).
    causal: bool,
    /// Matmuls with fewer rows are padded (batch invariance).
    min_rows: usize,
}

impl Attention {
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` → same
    fn forward(
        &self,
        x: Tensor<3>,
        ctx: &ForwardContext,
        cache: Option<(&mut KvCache, usize)>,
        fresh_cache: &mut Option<(Tensor<4>, Tensor<4>)>,
    ) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let split = |y: Tensor<3>, heads: usize| y.reshape([b, t, heads, d]).swap_dims(1, 2);
        let r = ctx.min_rows;
        let q = split(self.q_proj.forward(x.clone(), r), h);
        let k = split(self.k_proj.forward(x.clone(), r), kvh);
        let v = split(self.v_proj.forward(x, r), kvh);
        let q = apply_rope(q, &ctx.cos, &ctx.sin);
        let k = apply_rope(k, &ctx.cos, &ctx.sin);

        let (k, v) = match cache {
            // A decode step: the new column goes in front of the newest-first cache.
            Some((cache, layer)) => cache.push_front(layer, k, v),
            None => {
                *fresh_cache = Some((k.clone(), v.clone()));
                (k, v)
            }
        };
        let k = repeat_kv(k, h / kvh);
        let v = repeat_kv(v, h / kvh);
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: ctx.causal,
        };
        let out = attention(q, k, v, ctx.mask.clone(), None, options);
        self.o_proj
            .forward(out.swap_dims(1, 2).reshape([b, t, h * d]), r)
    }
}

/// Rotates query/key pairs by their position (`rotate_half` convention of HF Llama).
///
/// # Shapes
/// - `x`: `[batch, heads, seq, head_dim]`, `cos`/`sin`: `[batch, 1, seq, head_dim]`
fn apply_rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let [b, h, t, d] = x.dims();
    let first = x.clone().slice([0..b, 0..h, 0..t, 0..d / 2]);
    let second = x.clone().slice([0..b, 0..h, 0..t, d / 2..d]);
    let rotated = Tensor::cat(vec![second.neg(), first], 3);
    x * cos.clone() + rotated * sin.clone()
}

/// Repeats each key/value head `n_rep` times for grouped-query attention.
///
/// # Shapes
/// - `x`: `[batch, kv_heads, seq, head_dim]` → `[batch, kv_heads * n_rep, seq, head_dim]`
fn repeat_kv(x: Tensor<4>, n_rep: usize) -> Tensor<4> {
    if n_rep == 1 {
        return x;
    }
    let [b, kvh, t, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kvh, n_rep, t, d])
        .reshape([b, kvh * n_rep, t, d])
}

impl DecoderLayer {
    fn forward(
        &self,
        x: Tensor<3>,
        ctx: &ForwardContext,
        cache: Option<(&mut KvCache, usize)>,
        fresh_cache: &mut Option<(Tensor<4>, Tensor<4>)>,
    ) -> Tensor<3> {
        let attn = self.self_attn.forward(
            self.input_layernorm.forward(x.clone()),
            ctx,
            cache,
            fresh_cache,
        );
        let x = x + attn;
        let mlp = self.mlp.forward(
            self.post_attention_layernorm.forward(x.clone()),
            ctx.min_rows,
        );
        x + mlp
    }
}

impl Model {
    /// Assembles a model from its parts; used by the weight loader and [`Model::init`].
    pub(crate) fn from_parts(
        config: ModelConfig,
        model: Decoder,
        lm_head: Option<Linear>,
        score: Option<Linear>,
    ) -> Self {
        let inv_freq = rope::inv_freq(&config.rope, config.head_dim);
        Model {
            model,
            lm_head,
            score,
            config,
            inv_freq,
            batch_invariant: false,
        }
    }

    fn min_rows(&self) -> usize {
        if self.batch_invariant {
            BATCH_INVARIANT_ROWS
        } else {
            1
        }
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.model.embed_tokens.weight.val().device()
    }

    /// Final-norm hidden states of every position.
    ///
    /// With a cache, `batch` is one decode step of the cached sequences (one token per row, rows
    /// in the cache's order) and the cache grows by one column. Without one, a new cache is
    /// returned when `want_cache` is set.
    ///
    /// # Panics
    /// When a cache is given with more than one token per row.
    ///
    /// # Shapes
    /// - returns `[batch.batch, batch.seq, hidden]`
    pub fn hidden_states(
        &self,
        batch: &TokenBatch,
        mut cache: Option<&mut KvCache>,
        want_cache: bool,
    ) -> (Tensor<3>, Option<KvCache>) {
        assert!(
            cache.is_none() || batch.seq == 1,
            "a KV cache continues one token per row; got {} columns",
            batch.seq
        );
        let device = self.device();
        let ctx = self.context(batch, cache.as_deref(), &device);
        let ids: Vec<i64> = batch.tokens.iter().map(|&t| t as i64).collect();
        let ids =
            Tensor::<2, Int>::from_data(TensorData::new(ids, [batch.batch, batch.seq]), &device);
        let mut x = embedding(self.model.embed_tokens.weight.val(), ids);
        let mut fresh: Vec<(Tensor<4>, Tensor<4>)> = Vec::new();
        for (i, layer) in self.model.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| (c, i));
            let mut fresh_layer = None;
            x = layer.forward(x, &ctx, layer_cache, &mut fresh_layer);
            if want_cache && let Some(kv) = fresh_layer {
                fresh.push(kv);
            }
        }
        if let Some(c) = cache {
            c.commit_step();
        }
        let new_cache = (want_cache && fresh.len() == self.model.layers.len())
            .then(|| KvCache::from_prefill(fresh, batch.valid.clone(), batch.batch, batch.seq));
        (self.model.norm.forward(x), new_cache)
    }

    fn context(
        &self,
        batch: &TokenBatch,
        cache: Option<&KvCache>,
        device: &Device,
    ) -> ForwardContext {
        let d = self.config.head_dim;
        let (cos, sin) = rope::tables(&self.inv_freq, &batch.positions);
        let shape = [batch.batch, 1, batch.seq, d];
        let cos = Tensor::<4>::from_data(TensorData::new(cos, shape), device);
        let sin = Tensor::<4>::from_data(TensorData::new(sin, shape), device);
        let (mask, causal) = match cache {
            Some(c) => (self.step_mask(c, device), false),
            None => self.prefill_mask(batch, device),
        };
        ForwardContext {
            cos,
            sin,
            mask,
            causal,
            min_rows: self.min_rows(),
        }
    }

    /// The mask of a prefill (time order): causal, padding, sliding window.
    fn prefill_mask(&self, batch: &TokenBatch, device: &Device) -> (Option<Tensor<4, Bool>>, bool) {
        let window_bites = self.config.sliding_window.is_some_and(|w| batch.seq > w);
        if batch.is_dense() && !window_bites {
            // No padding: the backend's causal flag says everything.
            return (None, true);
        }
        let k = batch.seq;
        let mask = attention_mask(batch, &[], 0, self.config.sliding_window);
        let mask = bool_mask(mask, [batch.batch, 1, batch.seq, k], device);
        (
            Some(mask.expand([batch.batch, self.config.num_heads, batch.seq, k])),
            false,
        )
    }

    /// The mask of a decode step over the newest-first cache: padding, and keys older than the
    /// sliding window (column c is c steps old).
    fn step_mask(&self, cache: &KvCache, device: &Device) -> Option<Tensor<4, Bool>> {
        let valid = cache.step_valid();
        let k = cache.len + 1;
        let window = self.config.sliding_window.unwrap_or(usize::MAX);
        if window >= k && valid.iter().all(|&v| v) {
            return None;
        }
        let mask: Vec<bool> = valid
            .iter()
            .enumerate()
            .map(|(i, &v)| !v || i % k >= window)
            .collect();
        let mask = bool_mask(mask, [cache.batch, 1, 1, k], device);
        Some(mask.expand([cache.batch, self.config.num_heads, 1, k]))
    }

    /// Logits over the vocabulary.
    ///
    /// # Shapes
    /// - `hidden`: `[batch, seq, hidden]` → `[batch, seq, vocab]`
    pub fn lm_logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden, self.min_rows()),
            None => {
                let [b, t, h] = hidden.dims();
                let w = self.model.embed_tokens.weight.val();
                let v = w.dims()[0];
                hidden
                    .reshape([b * t, h])
                    .matmul(w.transpose())
                    .reshape([b, t, v])
            }
        }
    }

    /// The `score` head at every position (reward or value).
    ///
    /// # Shapes
    /// - `hidden`: `[batch, seq, hidden]` → `[batch, seq, num_labels]`
    ///
    /// # Panics
    /// When the model has no `score` head (a `CausalLm` model); callers check
    /// [`HeadKind`] first.
    pub fn score_head(&self, hidden: Tensor<3>) -> Tensor<3> {
        self.score
            .as_ref()
            .expect("score_head called on a model without a score head")
            .forward(hidden, self.min_rows())
    }

    /// The head kind of this model.
    pub fn head(&self) -> HeadKind {
        self.config.architecture.head
    }
}

fn bool_mask(values: Vec<bool>, shape: [usize; 4], device: &Device) -> Tensor<4, Bool> {
    Tensor::<4, Bool>::from_data(TensorData::new(values, shape), device)
}
