//! Batched generation with a KV cache.
//!
//! Prompts of different lengths are left-padded into one prefill; then each step feeds every
//! unfinished sequence its last token. A finished sequence leaves the batch (its cache rows are
//! dropped), so the cost follows the sequences still running.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::batch::TokenBatch;
use crate::config::HeadKind;
use crate::error::{ModelError, Result};
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
    /// Log-prob of each generated token under its sampling distribution (see [`sample`]).
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
}

/// A sequence being generated.
struct Running {
    index: usize,
    rng: ChaCha8Rng,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    next_position: usize,
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
        self.check_requests(requests, tokenizer)?;
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let prompts: Vec<&[u32]> = requests.iter().map(|r| r.prompt.as_slice()).collect();
        let batch = TokenBatch::left_padded(&prompts, self.config.pad_token_id.unwrap_or(0))?;
        let (hidden, cache) = self.hidden_states(&batch, None, true);
        let mut cache = cache.expect("a cache was requested");
        let mut logits = self.last_logits(hidden);

        let mut done: Vec<Option<Generation>> = vec![None; requests.len()];
        let mut running: Vec<Running> = requests
            .iter()
            .enumerate()
            .map(|(index, r)| Running {
                index,
                rng: ChaCha8Rng::seed_from_u64(r.params.seed),
                tokens: Vec::new(),
                logprobs: Vec::new(),
                next_position: r.prompt.len(),
            })
            .collect();

        loop {
            let vocab = self.config.vocab_size;
            let mut keep_rows = Vec::new();
            let mut still = Vec::new();
            for (row, mut seq) in running.into_iter().enumerate() {
                let req = &requests[seq.index];
                let row_logits = &logits[row * vocab..(row + 1) * vocab];
                let (token, lp) = sample(row_logits, &req.params.sampling, &mut seq.rng);
                seq.tokens.push(token);
                seq.logprobs.push(lp);
                match self.finished(&seq, req, token, tokenizer)? {
                    Some(reason) => {
                        done[seq.index] = Some(Generation {
                            tokens: seq.tokens,
                            logprobs: seq.logprobs,
                            finish_reason: reason,
                        })
                    }
                    None => {
                        keep_rows.push(row);
                        still.push(seq);
                    }
                }
            }
            running = still;
            if running.is_empty() {
                break;
            }
            cache.retain_rows(&keep_rows);
            let tokens: Vec<u32> = running
                .iter()
                .map(|s| *s.tokens.last().expect("sampled"))
                .collect();
            let positions: Vec<usize> = running.iter().map(|s| s.next_position).collect();
            for s in &mut running {
                s.next_position += 1;
            }
            let step = TokenBatch::decode_step(&tokens, &positions);
            let (hidden, _) = self.hidden_states(&step, Some(&mut cache), false);
            logits = self.last_logits(hidden);
        }
        Ok(done
            .into_iter()
            .map(|g| g.expect("every sequence finished"))
            .collect())
    }

    fn check_requests(
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
    fn last_logits(&self, hidden: burn::tensor::Tensor<3>) -> Vec<f32> {
        let [b, t, h] = hidden.dims();
        let last = hidden.slice([0..b, t - 1..t, 0..h]);
        crate::host::to_vec(self.lm_logits(last))
    }

    fn finished(
        &self,
        seq: &Running,
        req: &GenerationRequest,
        token: u32,
        tokenizer: Option<&Tokenizer>,
    ) -> Result<Option<FinishReason>> {
        let p = &req.params;
        let is_eos = !p.ignore_eos && self.config.eos_token_ids.contains(&token);
        if is_eos || p.stop_token_ids.contains(&token) {
            return Ok(Some(FinishReason::Stop));
        }
        if let (false, Some(tok)) = (p.stop_strings.is_empty(), tokenizer) {
            let text = tok.decode(&seq.tokens, true)?;
            if p.stop_strings.iter().any(|s| text.contains(s.as_str())) {
                return Ok(Some(FinishReason::Stop));
            }
        }
        let at_context = seq.next_position + 1 >= self.config.max_position_embeddings;
        if seq.tokens.len() >= p.max_new_tokens || at_context {
            return Ok(Some(FinishReason::Length));
        }
        Ok(None)
    }
}
