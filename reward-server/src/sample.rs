//! Turning wire samples into what objectives read: prompt and completion text (or chat messages),
//! the completion's token count, metadata. Validated once here (STYLE.md §6).

use std::collections::HashMap;

use rlhf_model::{ChatMessage, Tokenizer};
use rlhf_proto::v1;

use crate::error::ScoreError;

/// The prompt of a sample.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Messages(Vec<ChatMessage>),
}

/// A validated sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub prompt: Prompt,
    pub completion: String,
    /// Completion length in policy tokens: the ids' count when sent as ids, else the policy
    /// tokenizer's count when one is configured.
    pub completion_tokens: Option<usize>,
    pub metadata: HashMap<String, String>,
}

impl Sample {
    /// A text sample (tests, training code, the remote client).
    pub fn text(prompt: impl Into<String>, completion: impl Into<String>) -> Sample {
        Sample {
            prompt: Prompt::Text(prompt.into()),
            completion: completion.into(),
            completion_tokens: None,
            metadata: HashMap::new(),
        }
    }

    /// The sample on the wire, completion as text (what a remote objective receives).
    pub fn to_proto(&self) -> v1::Sample {
        let prompt = match &self.prompt {
            Prompt::Text(t) => v1::sample::Prompt::PromptText(t.clone()),
            Prompt::Messages(ms) => v1::sample::Prompt::PromptMessages(v1::ChatMessages {
                messages: ms
                    .iter()
                    .map(|m| v1::ChatMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect(),
            }),
        };
        v1::Sample {
            prompt: Some(prompt),
            completion: Some(v1::sample::Completion::CompletionText(
                self.completion.clone(),
            )),
            metadata: self.metadata.clone(),
        }
    }
}

/// Validates and converts the samples of a request. `tokenizer` is the policy tokenizer that
/// decodes id samples and counts completion tokens.
pub fn prepare(
    samples: Vec<v1::Sample>,
    tokenizer: Option<&Tokenizer>,
) -> Result<Vec<Sample>, ScoreError> {
    if samples.is_empty() {
        return Err(ScoreError::InvalidArgument(
            "the request has no samples".into(),
        ));
    }
    samples
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            prepare_one(s, tokenizer)
                .map_err(|m| ScoreError::InvalidArgument(format!("sample {i}: {m}")))
        })
        .collect()
}

fn prepare_one(s: v1::Sample, tokenizer: Option<&Tokenizer>) -> Result<Sample, String> {
    let decode = |ids: &[u32], what: &str| -> Result<String, String> {
        let Some(tok) = tokenizer else {
            return Err(format!(
                "the {what} is given as token ids but the server has no `tokenizer` to decode them"
            ));
        };
        let vocab = tok.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(format!(
                "{what} token id {bad} is outside the tokenizer's vocabulary ({vocab})"
            ));
        }
        tok.decode(ids, true)
            .map_err(|e| format!("cannot decode the {what}: {e}"))
    };
    let prompt = match s.prompt {
        None => return Err("the prompt is missing".into()),
        Some(v1::sample::Prompt::PromptText(t)) => Prompt::Text(t),
        Some(v1::sample::Prompt::PromptIds(ids)) => Prompt::Text(decode(&ids.ids, "prompt")?),
        Some(v1::sample::Prompt::PromptMessages(ms)) => {
            if ms.messages.is_empty() {
                return Err("the prompt has an empty message list".into());
            }
            Prompt::Messages(
                ms.messages
                    .into_iter()
                    .map(|m| ChatMessage::new(m.role, m.content))
                    .collect(),
            )
        }
    };
    let (completion, completion_tokens) = match s.completion {
        None => return Err("the completion is missing".into()),
        Some(v1::sample::Completion::CompletionText(t)) => {
            let n = match tokenizer {
                Some(tok) => Some(tok.encode(&t, false).map_err(|e| e.to_string())?.len()),
                None => None,
            };
            (t, n)
        }
        Some(v1::sample::Completion::CompletionIds(ids)) => {
            let n = ids.ids.len();
            (decode(&ids.ids, "completion")?, Some(n))
        }
    };
    Ok(Sample {
        prompt,
        completion,
        completion_tokens,
        metadata: s.metadata,
    })
}

/// The token ids a reward model scores for a sample: prompt and completion concatenated as text
/// and tokenised once with special tokens (how `transformers` reward models are usually fed);
/// for chat prompts, the conversation with the completion as the assistant's turn, rendered by
/// the model's chat template.
pub fn reward_model_ids(tokenizer: &Tokenizer, sample: &Sample) -> Result<Vec<u32>, String> {
    match &sample.prompt {
        Prompt::Text(p) => tokenizer
            .encode(&format!("{p}{}", sample.completion), true)
            .map_err(|e| e.to_string()),
        Prompt::Messages(ms) => {
            let mut conversation = ms.clone();
            conversation.push(ChatMessage::new("assistant", sample.completion.clone()));
            tokenizer
                .encode_chat(&conversation, false)
                .map_err(|e| e.to_string())
        }
    }
}
