//! A `Generate` request checked once, at the edge (STYLE.md §6): prompts tokenised and checked
//! against the model, sampling turned into generation parameters, the reward and learner
//! targets resolved. Every problem is an `INVALID_ARGUMENT` that names the field or the prompt,
//! the limit and the value received.

use std::time::Duration;

use rlhf_model::{ChatMessage, GenerationParams, ModelConfig, SamplingParams, Tokenizer};
use rlhf_proto::v1;
use tonic::Status;

/// How long one Score call may take when the request does not say.
pub const DEFAULT_SCORE_TIMEOUT: Duration = Duration::from_secs(60);

/// A prompt with its token ids.
#[derive(Debug, Clone)]
pub struct ValidPrompt {
    pub input: v1::PromptInput,
    pub ids: Vec<u32>,
}

/// Where completions are scored, and how long one Score call may take.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardTarget {
    /// Reward server replicas.
    pub addresses: Vec<String>,
    pub timeout: Duration,
}

/// A checked `GenerateRequest`.
#[derive(Debug, Clone)]
pub struct ValidGenerate {
    pub job_id: String,
    pub step: u64,
    pub prompts: Vec<ValidPrompt>,
    /// Completions per prompt (at least 1: 0 asks for 1).
    pub samples_per_prompt: u32,
    /// The request's seed; each sample's own is derived from it ([`sample_seed`]).
    pub seed: u64,
    /// The generation parameters shared by every sample (the seed aside).
    pub params: GenerationParams,
    pub min_weight_version: u64,
    pub reward: Option<RewardTarget>,
    pub learners: Vec<String>,
    pub summaries_only: bool,
}

impl ValidGenerate {
    /// Checks `r` against the model it will run on.
    pub fn new(
        r: v1::GenerateRequest,
        tokenizer: &Tokenizer,
        config: &ModelConfig,
    ) -> Result<ValidGenerate, Status> {
        let sampling = r
            .sampling
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("`sampling` is missing"))?;
        let params = generation_params(sampling)?;
        if r.prompts.is_empty() {
            return Err(Status::invalid_argument(
                "`prompts` is empty: at least one prompt is needed",
            ));
        }
        let prompts = r
            .prompts
            .into_iter()
            .map(|input| {
                let ids = prompt_ids(&input, tokenizer, config)?;
                Ok(ValidPrompt { input, ids })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let reward = (!r.reward_addresses.is_empty()).then(|| RewardTarget {
            addresses: r.reward_addresses,
            timeout: score_timeout(r.reward_timeout_seconds),
        });
        Ok(ValidGenerate {
            job_id: r.job_id,
            step: r.step,
            prompts,
            samples_per_prompt: sampling.samples_per_prompt.max(1),
            seed: sampling.seed,
            params,
            min_weight_version: r.min_weight_version,
            reward,
            learners: r.learner_addresses,
            summaries_only: r.summaries_only,
        })
    }

    /// Sequences the request asks for.
    pub fn sequences(&self) -> usize {
        self.prompts.len() * self.samples_per_prompt as usize
    }

    /// The generation parameters of sample `j` of `prompt`.
    pub fn sample_params(&self, prompt: &ValidPrompt, j: u32) -> GenerationParams {
        GenerationParams {
            seed: sample_seed(self.seed, &prompt.input.id, j),
            ..self.params.clone()
        }
    }
}

/// FNV-1a: a stable hash of a prompt id for seeding.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The seed of sample `j` of prompt `id` under request seed `seed`.
pub fn sample_seed(seed: u64, prompt_id: &str, j: u32) -> u64 {
    let mut z =
        seed ^ fnv1a(prompt_id).rotate_left(17) ^ (j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The shared generation parameters of `s` (seed 0: each sample gets its own).
fn generation_params(s: &v1::SamplingParams) -> Result<GenerationParams, Status> {
    let sampling = SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
    };
    sampling
        .validate()
        .map_err(|m| Status::invalid_argument(format!("sampling.{m}")))?;
    if s.max_new_tokens == 0 {
        return Err(Status::invalid_argument(
            "sampling.max_new_tokens must be at least 1, got 0",
        ));
    }
    Ok(GenerationParams {
        sampling,
        max_new_tokens: s.max_new_tokens as usize,
        seed: 0,
        stop_token_ids: s.stop_token_ids.clone(),
        stop_strings: s.stop.clone(),
        ignore_eos: s.ignore_eos,
    })
}

/// One Score call's deadline: `reward_timeout_seconds`, [`DEFAULT_SCORE_TIMEOUT`] when unset
/// (0, negative or not finite).
pub fn score_timeout(seconds: f64) -> Duration {
    if seconds.is_finite() && seconds > 0.0 {
        Duration::from_secs_f64(seconds)
    } else {
        DEFAULT_SCORE_TIMEOUT
    }
}

/// Token ids of a prompt; the error names the prompt.
fn prompt_ids(
    p: &v1::PromptInput,
    tokenizer: &Tokenizer,
    config: &ModelConfig,
) -> Result<Vec<u32>, Status> {
    let bad = |m: String| Status::invalid_argument(format!("prompt `{}`: {m}", p.id));
    let ids = match &p.content {
        None => return Err(bad("no content (text, ids or messages)".into())),
        Some(v1::prompt_input::Content::Text(t)) => {
            tokenizer.encode(t, true).map_err(|e| bad(e.to_string()))?
        }
        Some(v1::prompt_input::Content::Ids(ids)) => ids.ids.clone(),
        Some(v1::prompt_input::Content::Messages(m)) => {
            let messages: Vec<ChatMessage> = m
                .messages
                .iter()
                .map(|m| ChatMessage::new(&m.role, &m.content))
                .collect();
            tokenizer
                .encode_chat(&messages, true)
                .map_err(|e| bad(e.to_string()))?
        }
    };
    check_prompt_ids(&ids, config).map_err(bad)?;
    Ok(ids)
}

/// A prompt must be non-empty, inside the vocabulary and shorter than the context.
fn check_prompt_ids(ids: &[u32], config: &ModelConfig) -> Result<(), String> {
    if ids.is_empty() {
        return Err("empty prompt".into());
    }
    if let Some(t) = ids.iter().find(|&&t| t as usize >= config.vocab_size) {
        return Err(format!(
            "token id {t} is outside the vocabulary ({})",
            config.vocab_size
        ));
    }
    if ids.len() >= config.max_position_embeddings {
        return Err(format!(
            "{} tokens; the context length is {}",
            ids.len(),
            config.max_position_embeddings
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling() -> v1::SamplingParams {
        v1::SamplingParams {
            samples_per_prompt: 2,
            temperature: 1.0,
            top_k: 0,
            top_p: 0.0,
            max_new_tokens: 8,
            stop: vec![],
            stop_token_ids: vec![],
            seed: 5,
            ignore_eos: false,
        }
    }

    #[test]
    fn sampling_errors_name_the_field_and_the_value() {
        let p = generation_params(&sampling()).unwrap();
        assert_eq!(p.sampling.top_p, 1.0, "top_p 0 keeps every token");
        let zero = v1::SamplingParams {
            max_new_tokens: 0,
            ..sampling()
        };
        let err = generation_params(&zero).unwrap_err();
        assert!(err.message().contains("sampling.max_new_tokens"), "{err:?}");
        let hot = v1::SamplingParams {
            temperature: -1.0,
            ..sampling()
        };
        let err = generation_params(&hot).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().starts_with("sampling.temperature"), "{err:?}");
        assert!(err.message().contains("-1"), "{err:?}");
    }

    #[test]
    fn prompt_ids_are_checked_against_the_model() {
        let config = ModelConfig::llama(rlhf_model::LlamaDims {
            vocab_size: 10,
            hidden_size: 8,
            intermediate_size: 8,
            num_layers: 1,
            num_heads: 1,
            num_kv_heads: 1,
            max_position_embeddings: 4,
            tie_word_embeddings: true,
            bos_token_id: 0,
            eos_token_id: 1,
            pad_token_id: 2,
        });
        assert!(check_prompt_ids(&[3, 4, 5], &config).is_ok());
        assert!(
            check_prompt_ids(&[], &config)
                .unwrap_err()
                .contains("empty")
        );
        assert!(
            check_prompt_ids(&[3, 10], &config)
                .unwrap_err()
                .contains("10")
        );
        let long = check_prompt_ids(&[3; 4], &config).unwrap_err();
        assert!(long.contains("context length is 4"), "{long}");
    }

    #[test]
    fn score_timeouts_default_when_unset() {
        assert_eq!(score_timeout(0.0), DEFAULT_SCORE_TIMEOUT);
        assert_eq!(score_timeout(-1.0), DEFAULT_SCORE_TIMEOUT);
        assert_eq!(score_timeout(f64::NAN), DEFAULT_SCORE_TIMEOUT);
        assert_eq!(score_timeout(2.5), Duration::from_millis(2500));
    }

    #[test]
    fn sample_seeds_differ_per_prompt_and_sample_and_are_stable() {
        assert_eq!(sample_seed(1, "a", 0), sample_seed(1, "a", 0));
        assert_ne!(sample_seed(1, "a", 0), sample_seed(1, "a", 1));
        assert_ne!(sample_seed(1, "a", 0), sample_seed(1, "b", 0));
        assert_ne!(sample_seed(1, "a", 0), sample_seed(2, "a", 0));
    }
}
