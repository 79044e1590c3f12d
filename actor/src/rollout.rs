//! What happens to a finished sequence: its text is decoded, it is scored on the reward server
//! and pushed to the learners (each call retried with `rlhf_proto::error::retry`), and it
//! becomes the `Completion` the caller receives, or that completion's summary.

use std::time::{Duration, Instant};

use rlhf_model::Tokenizer;
use rlhf_proto::client::{LearnerClient, RewardClient};
use rlhf_proto::error::{RetryPolicy, retry};
use rlhf_proto::v1;
use tonic::Status;

use crate::engine::Finished;
use crate::request::{ValidGenerate, ValidPrompt};

/// The reward server of a request, and how long one Score call may take.
#[derive(Clone)]
pub struct Scorer {
    pub client: RewardClient,
    pub timeout: Duration,
}

/// Everything a request's finished sequences need.
pub struct Rollout {
    pub job_id: String,
    pub step: u64,
    pub prompts: Vec<ValidPrompt>,
    pub tokenizer: Tokenizer,
    pub scorer: Option<Scorer>,
    /// Learners to push every trajectory to, with their addresses.
    pub learners: Vec<(String, LearnerClient)>,
    pub summaries_only: bool,
}

impl Rollout {
    pub fn new(
        request: ValidGenerate,
        tokenizer: Tokenizer,
        scorer: Option<Scorer>,
        learners: Vec<(String, LearnerClient)>,
    ) -> Self {
        Rollout {
            job_id: request.job_id,
            step: request.step,
            prompts: request.prompts,
            tokenizer,
            scorer,
            learners,
            summaries_only: request.summaries_only,
        }
    }

    /// Scores and pushes sequence `f` of prompt `prompt` (an index into `prompts`), and builds
    /// its `Completion` (a summary under `summaries_only`).
    #[tracing::instrument(skip_all, fields(prompt = %self.prompts[prompt].input.id, sample = f.sample_index))]
    pub async fn finish(&self, prompt: usize, f: Finished) -> Result<v1::Completion, Status> {
        let p = &self.prompts[prompt];
        let text = self
            .tokenizer
            .decode(&f.generation.tokens, true)
            .map_err(|e| Status::internal(e.to_string()))?;
        let started = Instant::now();
        let rewards = match &self.scorer {
            Some(scorer) => scorer.score(p, &text).await?,
            None => Vec::new(),
        };
        let score_seconds = started.elapsed().as_secs_f64();
        let pushed = !self.learners.is_empty();
        if pushed {
            let t = trajectory(&self.job_id, self.step, p, &f, &rewards);
            push(&self.learners, t).await?;
        }
        let completion = completion(p, f, text, rewards, score_seconds, pushed);
        Ok(if self.summaries_only {
            summary(completion)
        } else {
            completion
        })
    }
}

impl Scorer {
    /// The rewards of `text` as the completion of `p`, one per objective.
    #[tracing::instrument(skip_all)]
    pub async fn score(&self, p: &ValidPrompt, text: &str) -> Result<Vec<f32>, Status> {
        let sample = v1::Sample {
            prompt: Some(reward_prompt(p)),
            completion: Some(v1::sample::Completion::CompletionText(text.to_string())),
            metadata: p.input.metadata.clone(),
        };
        let timeout = self.timeout;
        let reply = retry("reward server", RetryPolicy::default(), || {
            let mut client = self.client.clone();
            let sample = sample.clone();
            async move {
                let call = client.score(v1::ScoreRequest {
                    samples: vec![sample],
                });
                // A client-side deadline: a stalled server (stopped, deadlocked) may never
                // answer, and the channel's own timeout is the generous default.
                match tokio::time::timeout(timeout, call).await {
                    Ok(reply) => reply,
                    Err(_) => Err(Status::deadline_exceeded(format!(
                        "no answer within {timeout:?}"
                    ))),
                }
            }
        })
        .await?;
        Ok(reply
            .into_inner()
            .scores
            .pop()
            .map(|s| s.values)
            .unwrap_or_default())
    }
}

/// The prompt as the reward server sees it: as the caller sent it (text or messages), or its
/// token ids.
fn reward_prompt(p: &ValidPrompt) -> v1::sample::Prompt {
    match &p.input.content {
        Some(v1::prompt_input::Content::Text(t)) => v1::sample::Prompt::PromptText(t.clone()),
        Some(v1::prompt_input::Content::Messages(m)) => {
            v1::sample::Prompt::PromptMessages(m.clone())
        }
        _ => v1::sample::Prompt::PromptIds(v1::TokenIds { ids: p.ids.clone() }),
    }
}

/// What the learners receive of a finished sequence.
fn trajectory(
    job_id: &str,
    step: u64,
    p: &ValidPrompt,
    f: &Finished,
    rewards: &[f32],
) -> v1::Trajectory {
    v1::Trajectory {
        job_id: job_id.to_string(),
        step,
        prompt_id: p.input.id.clone(),
        group_id: p.input.id.clone(),
        sample_index: f.sample_index,
        prompt_ids: p.ids.clone(),
        completion_ids: f.generation.tokens.clone(),
        logprobs: f.generation.logprobs.clone(),
        weight_version: f.version,
        rewards: rewards.to_vec(),
        finish_reason: f.generation.finish_reason.as_str().into(),
        metadata: p.input.metadata.clone(),
    }
}

/// Pushes `t` to every learner in turn; a learner that rejects it fails the sequence.
#[tracing::instrument(skip_all, fields(learners = learners.len()))]
async fn push(learners: &[(String, LearnerClient)], t: v1::Trajectory) -> Result<(), Status> {
    for (address, client) in learners {
        let reply = retry(
            &format!("learner {address}"),
            RetryPolicy::default(),
            || {
                let mut client = client.clone();
                let t = t.clone();
                async move { client.push_rollouts(tokio_stream::iter(vec![t])).await }
            },
        )
        .await?
        .into_inner();
        if reply.rejected > 0 {
            return Err(Status::failed_precondition(format!(
                "learner {address} rejected the trajectory: {}",
                reply.message
            )));
        }
    }
    Ok(())
}

/// The whole completion of a finished sequence.
fn completion(
    p: &ValidPrompt,
    f: Finished,
    text: String,
    rewards: Vec<f32>,
    score_seconds: f64,
    pushed: bool,
) -> v1::Completion {
    v1::Completion {
        prompt_id: p.input.id.clone(),
        sample_index: f.sample_index,
        prompt_ids: p.ids.clone(),
        completion_tokens: f.generation.tokens.len() as u32,
        token_ids: f.generation.tokens,
        logprobs: f.generation.logprobs,
        finish_reason: f.generation.finish_reason.as_str().into(),
        weight_version: f.version,
        scored: !rewards.is_empty(),
        rewards,
        timings: Some(v1::Timings {
            queued_seconds: f.queued_seconds,
            generate_seconds: f.generate_seconds,
            score_seconds,
        }),
        text,
        metadata: p.input.metadata.clone(),
        pushed,
    }
}

/// A completion without its bulk: no token ids, log-probs, prompt ids or text (the
/// trajectories went to the learners); everything else, `completion_tokens` included, stays.
pub fn summary(c: v1::Completion) -> v1::Completion {
    v1::Completion {
        prompt_ids: Vec::new(),
        token_ids: Vec::new(),
        logprobs: Vec::new(),
        text: String::new(),
        ..c
    }
}

#[cfg(test)]
mod tests {
    use rlhf_model::{FinishReason, Generation};

    use super::*;

    fn finished() -> Finished {
        Finished {
            sample_index: 2,
            generation: Generation {
                tokens: vec![5, 6, 7],
                logprobs: vec![-0.1, -0.2, -0.3],
                finish_reason: FinishReason::Stop,
            },
            version: 4,
            queued_seconds: 0.5,
            generate_seconds: 1.5,
        }
    }

    fn prompt() -> ValidPrompt {
        ValidPrompt {
            input: v1::PromptInput {
                id: "p".into(),
                content: Some(v1::prompt_input::Content::Text("hi".into())),
                metadata: [("answer".to_string(), "4".to_string())].into(),
            },
            ids: vec![1, 2],
        }
    }

    #[test]
    fn completions_count_their_tokens_and_summaries_drop_only_the_bulk() {
        let full = completion(&prompt(), finished(), "abc".into(), vec![0.5], 0.25, true);
        assert_eq!(full.completion_tokens, 3);
        assert_eq!(full.token_ids, [5, 6, 7]);
        assert_eq!((full.finish_reason.as_str(), full.scored), ("stop", true));
        let s = summary(full.clone());
        assert!(s.token_ids.is_empty() && s.logprobs.is_empty() && s.prompt_ids.is_empty());
        assert!(s.text.is_empty());
        let kept = v1::Completion {
            prompt_ids: full.prompt_ids.clone(),
            token_ids: full.token_ids.clone(),
            logprobs: full.logprobs.clone(),
            text: full.text.clone(),
            ..s
        };
        assert_eq!(kept, full, "everything but the bulk is kept");
    }

    #[test]
    fn trajectories_carry_the_prompt_and_the_behaviour_logprobs() {
        let t = trajectory("job", 3, &prompt(), &finished(), &[1.0]);
        assert_eq!((t.prompt_id.as_str(), t.group_id.as_str()), ("p", "p"));
        assert_eq!((t.step, t.sample_index, t.weight_version), (3, 2, 4));
        assert_eq!(t.prompt_ids, [1, 2]);
        assert_eq!(t.logprobs, finished().generation.logprobs);
        assert_eq!(t.metadata["answer"], "4");
    }
}
