//! One forward pass over a batch of (prompt, completion) pairs: each completion token's
//! log-prob and entropy, the values of a critic, or a reward model's score.
//!
//! All three use the layouts of [`crate::batch`]; the outputs are differentiable when the model
//! lives on an autodiff device, so the learner trains through them.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};

use crate::batch::{CompletionLayout, TokenBatch};
use crate::config::HeadKind;
use crate::error::{ModelError, Result};
use crate::llama::Model;

/// Per-token results for the completions of a batch, `[batch, completion_width]`; padding
/// slots hold 0.
#[derive(Debug, Clone)]
pub struct CompletionTensors {
    /// `log softmax(logits / T)[y_t]` of each completion token.
    pub logprobs: Tensor<2>,
    /// Entropy of the distribution each token was drawn from (at the same temperature).
    pub entropy: Tensor<2>,
    /// 1 for real completion tokens, 0 for padding.
    pub mask: Tensor<2>,
    pub layout: CompletionLayout,
}

/// A (prompt, completion) pair of token ids.
pub type Pair<'a> = (&'a [u32], &'a [u32]);

impl Model {
    fn pad_id(&self) -> u32 {
        self.config
            .pad_token_id
            .or(self.config.eos_token_ids.first().copied())
            .unwrap_or(0)
    }

    fn require_head(&self, head: HeadKind, what: &str) -> Result<()> {
        if self.head() == head {
            Ok(())
        } else {
            Err(ModelError::InvalidInput(format!(
                "{what} needs a {head:?} model, but this is a {}",
                self.config.architecture
            )))
        }
    }

    /// Hidden states at the positions that predict each completion token
    /// (`[batch, completion_width, hidden]`), with the batch layout.
    fn completion_hidden(&self, pairs: &[Pair]) -> Result<(Tensor<3>, CompletionLayout)> {
        let (batch, layout) = TokenBatch::prompt_completion(pairs, self.pad_id())?;
        batch.check_vocab(self.config.vocab_size)?;
        let (hidden, _) = self.hidden_states(&batch, None, false);
        let [b, _, h] = hidden.dims();
        let (p, c) = (layout.prompt_width, layout.completion_width);
        Ok((hidden.slice([0..b, p - 1..p - 1 + c, 0..h]), layout))
    }

    /// Log-probs and entropies of every completion token given its prompt and the completion
    /// before it, with the logits divided by `temperature`.
    pub fn completion_logprobs(
        &self,
        pairs: &[Pair],
        temperature: f64,
    ) -> Result<CompletionTensors> {
        self.require_head(HeadKind::CausalLm, "completion log-probs")?;
        if !(temperature > 0.0 && temperature.is_finite()) {
            return Err(ModelError::InvalidInput(format!(
                "temperature must be a positive number for log-probs, got {temperature}"
            )));
        }
        let (hidden, layout) = self.completion_hidden(pairs)?;
        let device = hidden.device();
        let [b, c, _] = hidden.dims();
        let mask = Tensor::<2>::from_data(TensorData::new(layout.mask(), [b, c]), &device);
        if c == 0 {
            let zeros = Tensor::<2>::zeros([b, 0], &device);
            return Ok(CompletionTensors {
                logprobs: zeros.clone(),
                entropy: zeros,
                mask,
                layout,
            });
        }
        let logits = self.lm_logits(hidden);
        let logits = if temperature == 1.0 {
            logits
        } else {
            logits / temperature
        };
        let targets: Vec<i64> = pairs
            .iter()
            .flat_map(|(_, comp)| (0..c).map(|t| comp.get(t).map_or(0, |&id| id as i64)))
            .collect();
        let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [b, c]), &device);
        let (logprobs, entropy) = logprobs_and_entropy(logits, targets);
        let logprobs = logprobs * mask.clone();
        let entropy = entropy * mask.clone();
        Ok(CompletionTensors {
            logprobs,
            entropy,
            mask,
            layout,
        })
    }

    /// A critic's value of the state before each completion token, `[batch, completion_width]`
    /// (padding slots 0).
    pub fn completion_values(&self, pairs: &[Pair]) -> Result<(Tensor<2>, CompletionLayout)> {
        self.require_head(HeadKind::Value, "completion values")?;
        let (hidden, layout) = self.completion_hidden(pairs)?;
        let device = hidden.device();
        let [b, c, _] = hidden.dims();
        let mask = Tensor::<2>::from_data(TensorData::new(layout.mask(), [b, c]), &device);
        if c == 0 {
            return Ok((mask, layout));
        }
        let values = self.score_head(hidden).reshape([b, c]) * mask;
        Ok((values, layout))
    }

    /// A reward model's score of each sequence at its last token, `[batch, num_labels]`.
    pub fn sequence_scores(&self, sequences: &[&[u32]]) -> Result<Tensor<2>> {
        self.require_head(HeadKind::Score, "sequence scores")?;
        let batch = TokenBatch::left_padded(sequences, self.pad_id())?;
        batch.check_vocab(self.config.vocab_size)?;
        let (hidden, _) = self.hidden_states(&batch, None, false);
        let [b, t, h] = hidden.dims();
        let last = hidden.slice([0..b, t - 1..t, 0..h]);
        let labels = self.config.num_labels;
        Ok(self.score_head(last).reshape([b, labels]))
    }
}

/// `log_softmax(logits)[target]` and the entropy of each position's distribution (TRL's
/// `selective_log_softmax` and `entropy_from_logits`).
///
/// # Shapes
/// - `logits`: `[batch, seq, vocab]`, `targets`: `[batch, seq]` → two `[batch, seq]`
pub fn logprobs_and_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> (Tensor<2>, Tensor<2>) {
    let [b, t, _] = logits.dims();
    let logp = log_softmax(logits, 2);
    let logprobs = logp
        .clone()
        .gather(2, targets.reshape([b, t, 1]))
        .reshape([b, t]);
    let entropy = (logp.clone().exp() * logp).sum_dim(2).reshape([b, t]).neg();
    (logprobs, entropy)
}

/// Copies a `[batch, width]` tensor to the host as one vector per row, cut to `lens[row]`.
pub fn rows_to_host(tensor: Tensor<2>, lens: &[usize]) -> Vec<Vec<f32>> {
    let [b, w] = tensor.dims();
    let values = crate::host::to_vec(tensor);
    (0..b)
        .map(|r| values[r * w..r * w + lens[r]].to_vec())
        .collect()
}
