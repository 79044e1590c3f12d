//! A decode batch that sequences can join and leave between iterations (continuous batching).
//!
//! Each running sequence has pending logits (from its prefill or the last decode step). A
//! [`DecodeBatch::step`] samples one token for every running sequence, retires the finished ones
//! and runs one forward pass for the rest. [`DecodeBatch::admit`] prefills new sequences in one
//! batch and merges their KV cache into the running one (left-padding the shorter cache with
//! masked columns), so new work joins without waiting for the batch to drain.
//!
//! The request and result types of generation ([`GenerationRequest`], [`GenerationParams`],
//! [`Generation`], [`FinishReason`]) and their checks live here too, so [`crate::generate`]
//! builds on this module and not the other way round.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::batch::TokenBatch;
use crate::config::HeadKind;
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::llama::Model;
use crate::sampling::{SamplingParams, sample};
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
    /// Log-prob of each generated token under the full softmax at the sampling temperature
    /// (see [`sample`]).
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
}

/// A sequence in the batch.
struct Running {
    id: u64,
    params: GenerationParams,
    rng: ChaCha8Rng,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    /// Position of the next token fed to the model.
    next_position: usize,
    /// Logits for the next token.
    logits: Vec<f32>,
}

/// A sequence that left the batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub id: u64,
    pub generation: Generation,
}

/// The running sequences and their shared KV cache.
#[derive(Default)]
pub struct DecodeBatch {
    running: Vec<Running>,
    cache: Option<KvCache>,
}

impl DecodeBatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Running sequences.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Ids of the running sequences.
    pub fn ids(&self) -> Vec<u64> {
        self.running.iter().map(|r| r.id).collect()
    }

    /// Cached columns × rows (padding included): the KV memory in use, in tokens.
    pub fn cache_tokens(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.batch * c.len)
    }

    /// Prefills `requests` (checked like [`Model::generate`]) and adds them to the batch.
    pub fn admit(
        &mut self,
        model: &Model,
        requests: Vec<(u64, GenerationRequest)>,
        tokenizer: Option<&Tokenizer>,
    ) -> Result<()> {
        if requests.is_empty() {
            return Ok(());
        }
        let plain: Vec<GenerationRequest> = requests.iter().map(|(_, r)| r.clone()).collect();
        model.check_requests(&plain, tokenizer)?;
        // Each distinct prompt is prefilled alone (no padding, so its cache and logits are the
        // same whatever else is admitted with it) and its rows repeated for its samples.
        let mut distinct: Vec<&[u32]> = Vec::new();
        let mut row_of: Vec<usize> = Vec::with_capacity(plain.len());
        for r in &plain {
            match distinct.iter().position(|p| *p == r.prompt.as_slice()) {
                Some(i) => row_of.push(i),
                None => {
                    row_of.push(distinct.len());
                    distinct.push(&r.prompt);
                }
            }
        }
        let vocab = model.config.vocab_size;
        let mut prefilled: Option<KvCache> = None;
        let mut prompt_logits: Vec<Vec<f32>> = Vec::with_capacity(distinct.len());
        for prompt in &distinct {
            let batch = TokenBatch::left_padded(&[prompt], model.config.pad_token_id.unwrap_or(0))?;
            let (hidden, cache) = model.hidden_states(&batch, None, true);
            prompt_logits.push(model.last_logits(hidden));
            let cache = cache.expect("a cache was requested");
            prefilled = Some(match prefilled {
                None => cache,
                Some(c) => c.merge(cache),
            });
        }
        let mut fresh = prefilled.expect("at least one prompt");
        fresh.retain_rows(&row_of);
        self.cache = Some(match self.cache.take() {
            None => fresh,
            Some(running) => running.merge(fresh),
        });
        let logits: Vec<f32> = row_of
            .iter()
            .flat_map(|&i| prompt_logits[i].iter().copied())
            .collect();
        for (row, (id, r)) in requests.into_iter().enumerate() {
            self.running.push(Running {
                id,
                rng: ChaCha8Rng::seed_from_u64(r.params.seed),
                next_position: r.prompt.len(),
                params: r.params,
                tokens: Vec::new(),
                logprobs: Vec::new(),
                logits: logits[row * vocab..(row + 1) * vocab].to_vec(),
            });
        }
        Ok(())
    }

    /// Samples one token for every running sequence, retires the finished ones, and runs the
    /// next forward pass for the others.
    pub fn step(&mut self, model: &Model, tokenizer: Option<&Tokenizer>) -> Result<Vec<Finished>> {
        let mut finished = Vec::new();
        let mut keep = Vec::new();
        let running = std::mem::take(&mut self.running);
        for (row, mut seq) in running.into_iter().enumerate() {
            let (token, lp) = sample(&seq.logits, &seq.params.sampling, &mut seq.rng);
            seq.tokens.push(token);
            seq.logprobs.push(lp);
            match finish_reason(model, &seq, token, tokenizer)? {
                Some(reason) => finished.push(Finished {
                    id: seq.id,
                    generation: Generation {
                        tokens: seq.tokens,
                        logprobs: seq.logprobs,
                        finish_reason: reason,
                    },
                }),
                None => {
                    keep.push(row);
                    self.running.push(seq);
                }
            }
        }
        self.retain_rows(&keep);
        if !self.running.is_empty() {
            self.forward(model);
        }
        Ok(finished)
    }

    /// Drops the sequences with these ids (their requests were cancelled).
    pub fn cancel(&mut self, ids: &[u64]) {
        let keep: Vec<usize> = (0..self.running.len())
            .filter(|&i| !ids.contains(&self.running[i].id))
            .collect();
        if keep.len() == self.running.len() {
            return;
        }
        let running = std::mem::take(&mut self.running);
        self.running = running
            .into_iter()
            .enumerate()
            .filter(|(i, _)| keep.contains(i))
            .map(|(_, r)| r)
            .collect();
        self.retain_rows(&keep);
    }

    fn retain_rows(&mut self, keep: &[usize]) {
        if self.running.is_empty() {
            self.cache = None;
            return;
        }
        if let Some(cache) = &mut self.cache {
            cache.retain_rows(keep);
            cache.trim();
        }
    }

    fn forward(&mut self, model: &Model) {
        let tokens: Vec<u32> = self
            .running
            .iter()
            .map(|s| *s.tokens.last().expect("sampled"))
            .collect();
        let positions: Vec<usize> = self.running.iter().map(|s| s.next_position).collect();
        let step = TokenBatch::decode_step(&tokens, &positions);
        let cache = self.cache.as_mut().expect("running sequences have a cache");
        let (hidden, _) = model.hidden_states(&step, Some(cache), false);
        let logits = model.last_logits(hidden);
        let vocab = model.config.vocab_size;
        for (row, seq) in self.running.iter_mut().enumerate() {
            seq.next_position += 1;
            seq.logits = logits[row * vocab..(row + 1) * vocab].to_vec();
        }
    }
}

/// Why `seq` ends after `token`, if it does.
fn finish_reason(
    model: &Model,
    seq: &Running,
    token: u32,
    tokenizer: Option<&Tokenizer>,
) -> Result<Option<FinishReason>> {
    let p = &seq.params;
    let is_eos = !p.ignore_eos && model.config.eos_token_ids.contains(&token);
    if is_eos || p.stop_token_ids.contains(&token) {
        return Ok(Some(FinishReason::Stop));
    }
    if !p.stop_strings.is_empty() {
        let tok = tokenizer
            .ok_or_else(|| ModelError::InvalidInput("stop strings need a tokenizer".into()))?;
        let text = tok.decode(&seq.tokens, true)?;
        if p.stop_strings.iter().any(|s| text.contains(s.as_str())) {
            return Ok(Some(FinishReason::Stop));
        }
    }
    let at_context = seq.next_position + 1 >= model.config.max_position_embeddings;
    if seq.tokens.len() >= p.max_new_tokens || at_context {
        return Ok(Some(FinishReason::Length));
    }
    Ok(None)
}

impl Model {
    /// Checks `requests` before they are prefilled: a causal LM, prompts that fit the context
    /// and the vocabulary, valid sampling, a tokenizer when stop strings need one.
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
