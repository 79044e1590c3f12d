//! Host-side layout of a batch of token sequences: padding, positions and which slots hold
//! real tokens.
//!
//! Two layouts cover every use:
//! - [`TokenBatch::left_padded`]: prompts end in the same column (generation prefill, reward
//!   scoring: the last column is every row's last token).
//! - [`TokenBatch::prompt_completion`]: prompts left-padded to a common width P and completions
//!   right-padded after them, so every completion starts at column P and the log-probs of all
//!   completions are one slice of the logits (as TRL lays out its GRPO batches).
//!
//! Positions count only real tokens (`cumsum(valid) - 1`, what `transformers`' `generate`
//! passes), so a sequence gets the same RoPE angles whatever padding it shares a batch with.

use crate::error::{ModelError, Result};

/// Token ids, positions and validity of a `[batch, seq]` block, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    pub batch: usize,
    pub seq: usize,
    /// Token ids; padding slots hold `pad_id`.
    pub tokens: Vec<u32>,
    /// RoPE position of each slot (padding slots repeat a neighbour's position; they are never
    /// attended to).
    pub positions: Vec<usize>,
    /// `true` where the slot holds a real token.
    pub valid: Vec<bool>,
}

/// Where the completions sit in a [`TokenBatch::prompt_completion`] batch.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionLayout {
    /// Column of every row's first completion token.
    pub prompt_width: usize,
    /// Number of completion columns (the longest completion).
    pub completion_width: usize,
    /// Real completion length of each row.
    pub completion_lens: Vec<usize>,
}

impl CompletionLayout {
    /// `[batch * completion_width]` mask: 1 for real completion tokens, 0 for padding.
    pub fn mask(&self) -> Vec<f32> {
        let mut mask = Vec::with_capacity(self.completion_lens.len() * self.completion_width);
        for &len in &self.completion_lens {
            mask.extend((0..self.completion_width).map(|c| if c < len { 1.0 } else { 0.0 }));
        }
        mask
    }
}

impl TokenBatch {
    /// Rows right-aligned (left-padded) to the longest one.
    pub fn left_padded(rows: &[&[u32]], pad_id: u32) -> Result<Self> {
        let pairs: Vec<(&[u32], &[u32])> = rows.iter().map(|r| (*r, &[][..])).collect();
        Ok(Self::prompt_completion(&pairs, pad_id)?.0)
    }

    /// Prompts left-padded to a common width, completions right-padded after them.
    ///
    /// Every prompt must hold at least one token (the first completion token is predicted from
    /// the last prompt token).
    pub fn prompt_completion(
        pairs: &[(&[u32], &[u32])],
        pad_id: u32,
    ) -> Result<(Self, CompletionLayout)> {
        if pairs.is_empty() {
            return Err(ModelError::InvalidInput("empty batch".into()));
        }
        if let Some(i) = pairs.iter().position(|(p, _)| p.is_empty()) {
            return Err(ModelError::InvalidInput(format!(
                "sequence {i}: the prompt is empty (it needs at least one token, e.g. BOS)"
            )));
        }
        let prompt_width = pairs.iter().map(|(p, _)| p.len()).max().unwrap_or(0);
        let completion_width = pairs.iter().map(|(_, c)| c.len()).max().unwrap_or(0);
        let seq = prompt_width + completion_width;
        let mut batch = TokenBatch {
            batch: pairs.len(),
            seq,
            tokens: Vec::with_capacity(pairs.len() * seq),
            positions: Vec::with_capacity(pairs.len() * seq),
            valid: Vec::with_capacity(pairs.len() * seq),
        };
        for (prompt, completion) in pairs {
            let left = prompt_width - prompt.len();
            let right = completion_width - completion.len();
            let real = prompt.iter().chain(completion.iter()).copied();
            batch.tokens.extend(std::iter::repeat_n(pad_id, left));
            batch.tokens.extend(real);
            batch.tokens.extend(std::iter::repeat_n(pad_id, right));
            batch.valid.extend(std::iter::repeat_n(false, left));
            batch
                .valid
                .extend(std::iter::repeat_n(true, prompt.len() + completion.len()));
            batch.valid.extend(std::iter::repeat_n(false, right));
            let n_real = prompt.len() + completion.len();
            batch.positions.extend(std::iter::repeat_n(0, left));
            batch.positions.extend(0..n_real);
            batch
                .positions
                .extend(std::iter::repeat_n(n_real.saturating_sub(1), right));
        }
        let layout = CompletionLayout {
            prompt_width,
            completion_width,
            completion_lens: pairs.iter().map(|(_, c)| c.len()).collect(),
        };
        Ok((batch, layout))
    }

    /// One new token per row (a decode step), at the given positions.
    pub fn decode_step(tokens: &[u32], positions: &[usize]) -> Self {
        TokenBatch {
            batch: tokens.len(),
            seq: 1,
            tokens: tokens.to_vec(),
            positions: positions.to_vec(),
            valid: vec![true; tokens.len()],
        }
    }

    /// Whether every slot holds a real token.
    pub fn is_dense(&self) -> bool {
        self.valid.iter().all(|&v| v)
    }

    /// Checks every real token against the vocabulary size.
    pub fn check_vocab(&self, vocab_size: usize) -> Result<()> {
        for (i, (&t, &v)) in self.tokens.iter().zip(&self.valid).enumerate() {
            if v && t as usize >= vocab_size {
                return Err(ModelError::InvalidInput(format!(
                    "sequence {}: token id {t} at column {} is outside the vocabulary (size {vocab_size})",
                    i / self.seq,
                    i % self.seq
                )));
            }
        }
        Ok(())
    }
}

/// The attention mask of one forward pass, `true` = masked, row-major
/// `[batch, queries, past + queries]`.
///
/// A query attends to real keys at or before it (and within `window`, when set). A padding query
/// attends to itself only, so that no row of the softmax is empty (an all-masked row would make
/// NaN that then leaks into real rows through the values).
pub fn attention_mask(
    batch: &TokenBatch,
    past_valid: &[bool],
    past_len: usize,
    window: Option<usize>,
) -> Vec<bool> {
    let (b, q) = (batch.batch, batch.seq);
    let k = past_len + q;
    let mut mask = vec![true; b * q * k];
    for row in 0..b {
        let key_valid = |j: usize| {
            if j < past_len {
                past_valid[row * past_len + j]
            } else {
                batch.valid[row * q + (j - past_len)]
            }
        };
        for i in 0..q {
            let qi = past_len + i;
            let out = &mut mask[(row * q + i) * k..(row * q + i + 1) * k];
            if !batch.valid[row * q + i] {
                out[qi] = false;
                continue;
            }
            let first = window.map_or(0, |w| (qi + 1).saturating_sub(w));
            for (j, slot) in out.iter_mut().enumerate().take(qi + 1).skip(first) {
                *slot = !key_valid(j);
            }
        }
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_completion_aligns_completions() {
        let (b, layout) =
            TokenBatch::prompt_completion(&[(&[5, 6], &[7]), (&[8], &[9, 10, 11])], 0).unwrap();
        assert_eq!(b.seq, 5);
        assert_eq!(b.tokens, vec![5, 6, 7, 0, 0, 0, 8, 9, 10, 11]);
        assert_eq!(b.positions, vec![0, 1, 2, 2, 2, 0, 0, 1, 2, 3]);
        assert_eq!(
            b.valid,
            vec![
                true, true, true, false, false, false, true, true, true, true
            ]
        );
        assert_eq!(layout.prompt_width, 2);
        assert_eq!(layout.mask(), vec![1., 0., 0., 1., 1., 1.]);
    }

    #[test]
    fn empty_prompt_is_an_error() {
        let err = TokenBatch::prompt_completion(&[(&[1], &[2]), (&[], &[3])], 0).unwrap_err();
        assert!(err.to_string().contains("sequence 1"), "{err}");
    }

    #[test]
    fn mask_hides_padding_and_future() {
        let b = TokenBatch::left_padded(&[&[1, 2], &[3]], 0).unwrap();
        let m = attention_mask(&b, &[], 0, None);
        // Row 0 dense: causal only.
        assert_eq!(&m[..4], &[false, true, false, false]);
        // Row 1: the pad query sees itself only; the real query skips the pad key.
        assert_eq!(&m[4..], &[false, true, true, false]);
    }

    #[test]
    fn mask_with_past_and_window() {
        let past_valid = [false, true, true];
        let step = TokenBatch::decode_step(&[4], &[2]);
        let m = attention_mask(&step, &past_valid, 3, None);
        assert_eq!(m, vec![true, false, false, false]);
        let m = attention_mask(&step, &past_valid, 3, Some(2));
        assert_eq!(m, vec![true, true, false, false]);
    }

    #[test]
    fn vocab_check_names_the_sequence() {
        let b = TokenBatch::left_padded(&[&[1, 2], &[3, 999]], 0).unwrap();
        let err = b.check_vocab(10).unwrap_err().to_string();
        assert!(err.contains("sequence 1") && err.contains("999"), "{err}");
    }
}
