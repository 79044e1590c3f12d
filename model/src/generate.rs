//! Batched generation with a KV cache: every request is prefilled together (left-padded), then
//! each step feeds every unfinished sequence its last token; a finished sequence leaves the batch
//! (its cache rows are dropped). The mechanics live in [`DecodeBatch`], which the rollout actor
//! also drives with sequences joining mid-way.

use crate::config::HeadKind;
use crate::decode::DecodeBatch;
use crate::error::{ModelError, Result};
use crate::llama::Model;
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;

/// Everything that decides one sequence's generation besides its prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    /// Seed of this sequence's random generator: the same seed gives the same tokens.
    pub seed: u64,
    /// Finish when one of these is generated (in addition to the model's EOS ids).
    pub stop_token_ids: Vec<u32>,
    /// Finish when the decoded completion contains one of these (needs a tokenizer).
    pub stop_strings: Vec<String>,
    /// Do not stop on the model's EOS ids (reference runs that need a fixed length).
    pub ignore_eos: bool,
}

impl Default for GenerationParams {
    fn default() -> Self {
        GenerationParams {
            sampling: SamplingParams::default(),
            max_new_tokens: 64,
            seed: 0,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS or stop token was generated, or a stop string appeared.
    Stop,
    /// `max_new_tokens` or the context length was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One prompt to continue.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub params: GenerationParams,
}

/// A finished completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated ids, including the stop token when there was one.
    pub tokens: Vec<u32>,
    /// Log-prob of each generated token under its sampling distribution (see [`sample`]).
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
}

impl Model {
    /// Generates a completion for every request, in one batch.
    ///
    /// A `tokenizer` is needed only when a request has stop strings.
    pub fn generate(
        &self,
        requests: &[GenerationRequest],
        tokenizer: Option<&Tokenizer>,
    ) -> Result<Vec<Generation>> {
        let mut batch = DecodeBatch::new();
        let numbered = requests
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, r)| (i as u64, r))
            .collect();
        batch.admit(self, numbered, tokenizer)?;
        let mut done: Vec<Option<Generation>> = vec![None; requests.len()];
        while !batch.is_empty() {
            for f in batch.step(self, tokenizer)? {
                done[f.id as usize] = Some(f.generation);
            }
        }
        Ok(done
            .into_iter()
            .map(|g| g.expect("every sequence finished"))
            .collect())
    }

    pub(crate) fn check_requests(
        &self,
        requests: &[GenerationRequest],
        tokenizer: Option<&Tokenizer>,
    ) -> Result<()> {
        if self.head() != HeadKind::CausalLm {
            return Err(ModelError::InvalidInput(format!(
                "generation needs a causal LM, but this is a {}",
                self.config.architecture
            )));
        }
        let context = self.config.max_position_embeddings;
        for (i, r) in requests.iter().enumerate() {
            let bad = |m: String| Err(ModelError::InvalidInput(format!("request {i}: {m}")));
            if r.prompt.is_empty() {
                return bad("the prompt is empty".into());
            }
            if r.prompt.len() >= context {
                return bad(format!(
                    "the prompt has {} tokens; the context length is {context}",
                    r.prompt.len()
                ));
            }
            if let Some(&t) = r
                .prompt
                .iter()
                .find(|&&t| t as usize >= self.config.vocab_size)
            {
                return bad(format!(
                    "token id {t} is outside the vocabulary ({})",
                    self.config.vocab_size
                ));
            }
            if r.params.max_new_tokens == 0 {
                return bad("max_new_tokens must be at least 1".into());
            }
            if let Err(m) = r.params.sampling.validate() {
                return bad(m);
            }
            if !r.params.stop_strings.is_empty() && tokenizer.is_none() {
                return bad("stop strings need a tokenizer".into());
            }
        }
        Ok(())
    }

    /// Logits of the last column, on the host, row-major `[batch, vocab]`.
    pub(crate) fn last_logits(&self, hidden: burn::tensor::Tensor<3>) -> Vec<f32> {
        let [b, t, h] = hidden.dims();
        let last = hidden.slice([0..b, t - 1..t, 0..h]);
        crate::host::to_vec(self.lm_logits(last))
    }
}
