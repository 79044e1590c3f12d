//! Trajectories as the learner keeps them, and the buffer they wait in until their step runs.

use std::collections::BTreeMap;
use std::sync::Mutex;

use rlhf_proto::v1;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// One finished rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trajectory {
    pub step: u64,
    pub prompt_id: String,
    pub group_id: String,
    pub sample_index: u32,
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
    /// Behaviour log-probs, one per completion token.
    pub logprobs: Vec<f32>,
    pub weight_version: u64,
    /// Raw reward per objective.
    pub rewards: Vec<f32>,
    pub finish_reason: String,
}

impl Trajectory {
    /// Checks a pushed trajectory; the message says what is wrong.
    pub fn from_proto(
        t: v1::Trajectory,
        objectives: usize,
        vocab: usize,
    ) -> Result<Trajectory, String> {
        let who = format!(
            "trajectory {}#{} of step {}",
            t.prompt_id, t.sample_index, t.step
        );
        if t.prompt_ids.is_empty() {
            return Err(format!("{who}: empty prompt"));
        }
        if t.completion_ids.is_empty() {
            return Err(format!("{who}: empty completion"));
        }
        if t.logprobs.len() != t.completion_ids.len() {
            return Err(format!(
                "{who}: {} log-probs for {} completion tokens",
                t.logprobs.len(),
                t.completion_ids.len()
            ));
        }
        if t.rewards.len() != objectives {
            return Err(format!(
                "{who}: {} rewards for {objectives} objectives",
                t.rewards.len()
            ));
        }
        if let Some(bad) = t
            .prompt_ids
            .iter()
            .chain(&t.completion_ids)
            .find(|&&id| id as usize >= vocab)
        {
            return Err(format!(
                "{who}: token id {bad} outside the vocabulary ({vocab})"
            ));
        }
        if t.logprobs.iter().any(|l| !l.is_finite() || *l > 0.0) {
            return Err(format!("{who}: log-probs must be finite and <= 0"));
        }
        let group_id = if t.group_id.is_empty() {
            t.prompt_id.clone()
        } else {
            t.group_id
        };
        Ok(Trajectory {
            step: t.step,
            prompt_id: t.prompt_id,
            group_id,
            sample_index: t.sample_index,
            prompt_ids: t.prompt_ids,
            completion_ids: t.completion_ids,
            logprobs: t.logprobs,
            weight_version: t.weight_version,
            rewards: t.rewards,
            finish_reason: t.finish_reason,
        })
    }

    pub fn to_proto(&self) -> v1::Trajectory {
        v1::Trajectory {
            job_id: String::new(),
            step: self.step,
            prompt_id: self.prompt_id.clone(),
            group_id: self.group_id.clone(),
            sample_index: self.sample_index,
            prompt_ids: self.prompt_ids.clone(),
            completion_ids: self.completion_ids.clone(),
            logprobs: self.logprobs.clone(),
            weight_version: self.weight_version,
            rewards: self.rewards.clone(),
            finish_reason: self.finish_reason.clone(),
            metadata: Default::default(),
        }
    }
}

/// Trajectories by step, filled by pushes and drained by steps.
#[derive(Default)]
pub struct Buffer {
    steps: Mutex<BTreeMap<u64, Vec<Trajectory>>>,
    arrived: Notify,
}

impl Buffer {
    pub fn push(&self, t: Trajectory) {
        let mut steps = self.steps.lock().expect("buffer lock");
        let list = steps.entry(t.step).or_default();
        // A retried push of the same sample replaces the earlier copy.
        list.retain(|x| {
            !(x.prompt_id == t.prompt_id
                && x.sample_index == t.sample_index
                && x.group_id == t.group_id)
        });
        list.push(t);
        drop(steps);
        self.arrived.notify_waiters();
    }

    pub fn len(&self, step: u64) -> usize {
        self.steps
            .lock()
            .expect("buffer lock")
            .get(&step)
            .map_or(0, Vec::len)
    }

    pub fn total(&self) -> usize {
        self.steps
            .lock()
            .expect("buffer lock")
            .values()
            .map(Vec::len)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.total() == 0
    }

    /// Waits until `step` holds at least `expected` trajectories (or `deadline`: the error is
    /// how many it holds), then returns a copy of them. They stay buffered until
    /// [`Buffer::finish`]: a step that dynamic sampling sends back for another round is called
    /// again with all of its trajectories, the new round's added to the earlier ones.
    pub async fn wait_for(
        &self,
        step: u64,
        expected: usize,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<Trajectory>, usize> {
        loop {
            let notified = self.arrived.notified();
            {
                let steps = self.steps.lock().expect("buffer lock");
                let have = steps.get(&step).map_or(&[][..], Vec::as_slice);
                if have.len() >= expected {
                    return Ok(have.to_vec());
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(self.len(step));
            }
        }
    }

    /// Forgets the trajectories of `step` and of every older step (trained, or never to be).
    pub fn finish(&self, step: u64) {
        let mut steps = self.steps.lock().expect("buffer lock");
        *steps = match step.checked_add(1) {
            Some(next) => steps.split_off(&next),
            None => BTreeMap::new(),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(step: u64, prompt: &str, i: u32) -> Trajectory {
        Trajectory {
            step,
            prompt_id: prompt.into(),
            group_id: prompt.into(),
            sample_index: i,
            prompt_ids: vec![3],
            completion_ids: vec![4],
            logprobs: vec![-1.0],
            weight_version: 0,
            rewards: vec![i as f32],
            finish_reason: "stop".into(),
        }
    }

    #[tokio::test]
    async fn waiting_keeps_a_step_until_it_is_finished_and_retries_replace() {
        let b = Buffer::default();
        let soon = || tokio::time::Instant::now() + std::time::Duration::from_millis(50);
        for i in 0..2 {
            b.push(t(1, "a", i));
            b.push(t(2, "b", i));
        }
        // A retried push of the same sample replaces the earlier copy.
        let mut again = t(1, "a", 1);
        again.rewards = vec![9.0];
        b.push(again.clone());
        assert_eq!(b.wait_for(1, 3, soon()).await, Err(2));
        let first = b.wait_for(1, 2, soon()).await.unwrap();
        assert_eq!(first.len(), 2);
        assert!(first.contains(&again));
        // Waiting took nothing: a second round adds to the first.
        b.push(t(1, "c", 0));
        assert_eq!(b.wait_for(1, 3, soon()).await.unwrap().len(), 3);
        b.push(t(3, "d", 0));
        b.finish(2);
        assert_eq!((b.len(1), b.len(2), b.len(3)), (0, 0, 1));
    }
}
