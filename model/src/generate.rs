//! Batched generation with a KV cache: every request is prefilled together, then each step
//! feeds every unfinished sequence its last token; a finished sequence leaves the batch (its
//! cache rows are dropped). The mechanics, and the request and result types, live in
//! [`crate::decode`], whose [`DecodeBatch`] the rollout actor also drives with sequences joining
//! mid-way.

pub use crate::decode::{FinishReason, Generation, GenerationParams, GenerationRequest};

use crate::decode::DecodeBatch;
use crate::error::Result;
use crate::llama::Model;
use crate::tokenizer::Tokenizer;

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
}
