//! What happens to a finished sequence: its text is decoded, it is scored on one of the reward
//! server replicas ([`failover`]) and pushed to the learners (each call retried with
//! `rlhf_proto::error::retry`), and it becomes the `Completion` the caller receives, or that
//! completion's summary.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rlhf_model::Tokenizer;
use rlhf_proto::client::LearnerClient;
use rlhf_proto::error::{Failure, RetryPolicy, retry};
use rlhf_proto::v1;
use tonic::Status;

use crate::engine::Finished;
use crate::peers::RewardReplica;
use crate::request::{ValidGenerate, ValidPrompt};

/// The reward server replicas of a request, and how long one Score call may take.
///
/// Each Score call goes to the replica with the fewest calls in flight (from every request of
/// the actor), ties broken round-robin by `turn` ([`replica_order`]); a retryable failure moves
/// it to the next replica ([`failover`]).
#[derive(Clone)]
pub struct Scorer {
    pub replicas: Vec<RewardReplica>,
    /// The actor's count of Score calls started.
    pub turn: Arc<AtomicUsize>,
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
        let loads: Vec<usize> = self
            .replicas
            .iter()
            .map(|r| r.in_flight.load(Ordering::SeqCst))
            .collect();
        let order = replica_order(&loads, self.turn.fetch_add(1, Ordering::Relaxed));
        let reply = failover(&order, RetryPolicy::default(), |i| {
            let replica = &self.replicas[i];
            let mut client = replica.client.clone();
            let in_flight = InFlight::start(&replica.in_flight);
            let sample = sample.clone();
            async move {
                let _in_flight = in_flight;
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
        .await
        .map_err(|f| self.failed(f))?;
        Ok(reply
            .into_inner()
            .scores
            .pop()
            .map(|s| s.values)
            .unwrap_or_default())
    }

    /// The status a request fails with when its Score call does: the replica's code, with the
    /// addresses in the message.
    fn failed(&self, f: Failed) -> Status {
        let address = &self.replicas[f.replica].address;
        let message = if f.every_replica && self.replicas.len() > 1 {
            let all: Vec<&str> = self.replicas.iter().map(|r| r.address.as_str()).collect();
            format!(
                "reward servers {}: every replica failed; the last, {address}: {}",
                all.join(", "),
                f.status.message()
            )
        } else {
            format!("reward server {address}: {}", f.status.message())
        };
        Status::new(f.status.code(), message)
    }
}

/// Counts one call in flight on a replica for as long as it lives (a call given up on its
/// deadline is dropped, and stops counting).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn start(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The order in which a call tries the replicas whose calls in flight are `loads`: least loaded
/// first; equally loaded ones round-robin, starting at replica `turn % n`.
pub fn replica_order(loads: &[usize], turn: usize) -> Vec<usize> {
    let n = loads.len();
    let mut order: Vec<usize> = (0..n).map(|k| (turn + k) % n).collect();
    // Stable: ties keep their round-robin order.
    order.sort_by_key(|&i| loads[i]);
    order
}

/// Why [`failover`] gave up.
#[derive(Debug)]
pub struct Failed {
    /// The replica of the last failure.
    pub replica: usize,
    pub status: Status,
    /// Every replica failed its attempts (otherwise the failure was not retryable).
    pub every_replica: bool,
}

/// Calls `call(replica)` for the replicas of `order` in turn until one succeeds.
///
/// A retryable failure ([`Failure::retryable`]: the replica is unreachable or gone, unavailable,
/// timed out, overloaded) moves the call to the next replica still in play, at once; coming back
/// round to a replica already tried backs off first, as [`retry`] does (`first_delay`, doubling
/// up to `max_delay`). A replica is out of play after `policy.attempts` failures, or when it is
/// overloaded past `policy.overload_patience`. The call fails when every replica is out of play,
/// or at once on a failure that is not retryable (the same request would fail anywhere). With
/// one replica this is exactly [`retry`].
pub async fn failover<T, F, Fut>(
    order: &[usize],
    policy: RetryPolicy,
    mut call: F,
) -> Result<T, Failed>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    assert!(!order.is_empty(), "failover needs at least one replica");
    let n = order.len();
    let started = Instant::now();
    let mut delay = policy.first_delay;
    let mut failures = vec![0u32; n];
    let mut out = vec![false; n];
    let mut tried = vec![false; n];
    let mut at = 0;
    loop {
        let replica = order[at];
        tried[at] = true;
        let status = match call(replica).await {
            Ok(v) => return Ok(v),
            Err(s) => s,
        };
        let failure = Failure::of(&status);
        if !failure.retryable() {
            return Err(Failed {
                replica,
                status,
                every_replica: false,
            });
        }
        out[at] = match failure {
            Failure::Overloaded => started.elapsed() >= policy.overload_patience,
            _ => {
                failures[at] += 1;
                failures[at] >= policy.attempts
            }
        };
        let Some(next) = (1..=n).map(|k| (at + k) % n).find(|&k| !out[k]) else {
            return Err(Failed {
                replica,
                status,
                every_replica: true,
            });
        };
        tracing::warn!(
            replica,
            next = order[next],
            ?failure,
            peer_gone = failure.peer_gone(),
            "score call failed, moving on: {}",
            status.message()
        );
        if tried[next] {
            // Every replica still in play failed this round: back off before the next one.
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(policy.max_delay);
            tried.fill(false);
        }
        at = next;
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
    fn replicas_are_tried_least_loaded_first_and_ties_round_robin() {
        assert_eq!(replica_order(&[0, 0, 0], 0), [0, 1, 2]);
        assert_eq!(replica_order(&[0, 0, 0], 4), [1, 2, 0]);
        assert_eq!(replica_order(&[2, 0, 1], 0), [1, 2, 0]);
        assert_eq!(replica_order(&[1, 0, 0], 1), [1, 2, 0]);
        assert_eq!(replica_order(&[1, 0, 0], 2), [2, 1, 0]);
        assert_eq!(replica_order(&[3], 7), [0]);
    }

    fn fast() -> RetryPolicy {
        RetryPolicy {
            first_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(1),
            ..RetryPolicy::default()
        }
    }

    /// Runs [`failover`] over `order` where replica `i` answers with `outcome(i, its call
    /// number)`; returns the result and the replicas called, in order.
    async fn run(
        order: &[usize],
        policy: RetryPolicy,
        outcome: impl Fn(usize, usize) -> Result<usize, Status>,
    ) -> (Result<usize, Failed>, Vec<usize>) {
        let calls = std::cell::RefCell::new(Vec::new());
        let result = failover(order, policy, |i| {
            let n = calls.borrow().iter().filter(|&&c| c == i).count();
            calls.borrow_mut().push(i);
            std::future::ready(outcome(i, n))
        })
        .await;
        (result, calls.into_inner())
    }

    #[tokio::test]
    async fn a_retryable_failure_moves_the_call_to_the_next_replica() {
        let down = |i: usize, _| {
            if i == 2 {
                Err(Status::unavailable("down"))
            } else {
                Ok(i)
            }
        };
        let (r, calls) = run(&[2, 0, 1], fast(), down).await;
        assert_eq!((r.unwrap(), calls), (0, vec![2, 0]));
        // Timed out and overloaded replicas move on too.
        let slow = |i: usize, _| match i {
            0 => Err(Status::deadline_exceeded("slow")),
            1 => Err(Status::resource_exhausted("full")),
            _ => Ok(i),
        };
        let (r, calls) = run(&[0, 1, 2], fast(), slow).await;
        assert_eq!((r.unwrap(), calls), (2, vec![0, 1, 2]));
        // A replica that recovers is used on the next round.
        let flaky = |i: usize, n| {
            if n == 0 {
                Err(Status::unavailable("restarting"))
            } else {
                Ok(i)
            }
        };
        let (r, calls) = run(&[1, 0], fast(), flaky).await;
        assert_eq!((r.unwrap(), calls), (1, vec![1, 0, 1]));
    }

    #[tokio::test]
    async fn the_call_fails_once_every_replica_spent_its_attempts() {
        let policy = fast();
        let (r, calls) = run(&[0, 1], policy, |_, _| Err(Status::unavailable("down"))).await;
        let n = policy.attempts as usize;
        assert_eq!(calls, [0, 1].repeat(n), "round after round, each replica");
        let f = r.unwrap_err();
        assert!(f.every_replica);
        assert_eq!((f.replica, f.status.code()), (1, tonic::Code::Unavailable));
        // One replica: exactly `retry`'s attempts.
        let (r, calls) = run(&[0], policy, |_, _| Err(Status::unavailable("down"))).await;
        assert_eq!(calls.len(), n);
        assert!(r.unwrap_err().every_replica);
        // A replica dropped for good (overloaded past the patience) is not called again.
        let no_patience = RetryPolicy {
            overload_patience: Duration::ZERO,
            ..policy
        };
        let (r, calls) = run(&[0, 1], no_patience, |i, _| {
            if i == 0 {
                Err(Status::resource_exhausted("full"))
            } else {
                Err(Status::unavailable("down"))
            }
        })
        .await;
        let mut expected = vec![0];
        expected.extend(std::iter::repeat_n(1, n));
        assert_eq!(calls, expected);
        assert!(r.unwrap_err().every_replica);
    }

    #[tokio::test]
    async fn a_failure_that_is_not_retryable_fails_at_once() {
        let (r, calls) = run(&[1, 0], fast(), |_, _| {
            Err(Status::invalid_argument("bad sample"))
        })
        .await;
        assert_eq!(calls, [1]);
        let f = r.unwrap_err();
        assert!(!f.every_replica);
        assert_eq!(
            (f.replica, f.status.code()),
            (1, tonic::Code::InvalidArgument)
        );
    }

    #[tokio::test]
    async fn failures_name_the_replicas() {
        let replica = |a: &str| RewardReplica {
            address: a.into(),
            client: rlhf_proto::client::reward(a, Default::default()).unwrap(),
            in_flight: Arc::default(),
        };
        let scorer = Scorer {
            replicas: vec![replica("http://a:1"), replica("http://b:2")],
            turn: Arc::default(),
            timeout: Duration::from_secs(1),
        };
        let all = scorer.failed(Failed {
            replica: 1,
            status: Status::unavailable("refused"),
            every_replica: true,
        });
        assert_eq!(all.code(), tonic::Code::Unavailable);
        assert_eq!(
            all.message(),
            "reward servers http://a:1, http://b:2: every replica failed; the last, \
             http://b:2: refused"
        );
        let one = scorer.failed(Failed {
            replica: 0,
            status: Status::invalid_argument("bad"),
            every_replica: false,
        });
        assert_eq!(one.message(), "reward server http://a:1: bad");
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
