//! Trains the quickstart's byte-level BPE tokenizer on its own corpus (the `tokenizers` crate)
//! and writes it as a Hugging Face tokenizer (`tokenizer.json` + `tokenizer_config.json`).
//!
//! No prefix space is added, so a completion tokenises the same whether it is encoded on its own
//! (SFT, generation) or after its prompt (reward models): prompts end with a newline.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

pub const PAD: &str = "<pad>";
pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";

/// The special token ids of a trained tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    pub pad: u32,
    pub bos: u32,
    pub eos: u32,
}

/// Trains a BPE tokenizer of at most `vocab_size` tokens on `texts` and saves it in `dir`.
pub fn train_tokenizer<'a>(
    texts: impl Iterator<Item = &'a str> + Send,
    vocab_size: usize,
    dir: &Path,
) -> Result<(usize, SpecialIds)> {
    let byte_level = ByteLevel::new(false, true, true);
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(byte_level));
    tokenizer.with_decoder(Some(byte_level));
    let specials = [PAD, BOS, EOS].map(|t| AddedToken::from(t, true));
    let mut trainer: TrainerWrapper = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials.to_vec())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tokenizer
        .train(&mut trainer, texts)
        .map_err(|e| anyhow!("training the tokenizer: {e}"))?;
    let id = |t: &str| {
        tokenizer
            .token_to_id(t)
            .ok_or_else(|| anyhow!("the trained tokenizer lacks {t}"))
    };
    let ids = SpecialIds {
        pad: id(PAD)?,
        bos: id(BOS)?,
        eos: id(EOS)?,
    };
    let post = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))
        .map_err(|e| anyhow!("post-processor template: {e}"))?
        .special_tokens(vec![(BOS, ids.bos)])
        .build()
        .map_err(|e| anyhow!("post-processor: {e}"))?;
    tokenizer.with_post_processor(Some(post));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("tokenizer.json");
    tokenizer
        .save(&path, true)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": 128,
        "add_bos_token": true,
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    Ok((tokenizer.get_vocab_size(true), ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trained_tokenizer_round_trips_and_loads_as_a_model_tokenizer() {
        let dir = tempfile::tempdir().unwrap();
        let texts = [
            "Write a calm line about rain.\n",
            "gentle rain falls on the roof.",
            "the rain waits by the window, soft and slow.",
        ];
        let corpus: Vec<&str> = texts.iter().copied().cycle().take(60).collect();
        let (vocab, ids) = train_tokenizer(corpus.into_iter(), 300, dir.path()).unwrap();
        assert!(vocab > 256 && vocab <= 300, "{vocab}");
        let t = rlhf_model::Tokenizer::from_dir(dir.path()).unwrap();
        let prompt = t.encode(texts[0], true).unwrap();
        assert_eq!(prompt[0], ids.bos);
        let completion = t.encode(texts[1], false).unwrap();
        assert_eq!(t.decode(&completion, true).unwrap(), texts[1]);
        let joined = t
            .encode(&format!("{}{}", texts[0], texts[1]), true)
            .unwrap();
        assert_eq!(
            joined,
            [prompt, completion].concat(),
            "no prefix-space drift"
        );
        assert_eq!(t.special_tokens().eos.as_deref(), Some(EOS));
    }
}
