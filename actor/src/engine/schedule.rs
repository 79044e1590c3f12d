//! The engine's decisions, free of the model: which waiting sequences join the batch, which are
//! dropped because their request was cancelled, when a staged weight update may be swapped in,
//! and where a finished (or failed) sequence reports. The engine thread owns one [`Schedule`]
//! next to its model and `DecodeBatch`, and does what it says.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use rlhf_model::weights::NamedTensor;
use rlhf_model::{Generation, GenerationRequest};
use tokio::sync::oneshot;

use super::{Finished, Job, Limits, RequestHandle};

/// A sequence waiting to start.
struct Queued {
    job: Job,
    enqueued: Instant,
}

/// A sequence in the batch.
struct Active {
    request: Arc<RequestHandle>,
    sample_index: u32,
    enqueued: Instant,
    started: Instant,
    /// Its share of the KV budget: prompt + max new tokens.
    budget: usize,
}

/// A weight update waiting for the running sequences to finish.
pub struct Staged {
    pub version: u64,
    pub tensors: Vec<NamedTensor>,
    pub reply: oneshot::Sender<Result<u64, String>>,
}

/// The queue, the running sequences' bookkeeping, the staged update and the weight version.
pub struct Schedule {
    limits: Limits,
    version: u64,
    waiting: VecDeque<Queued>,
    active: HashMap<u64, Active>,
    staged: Option<Staged>,
    next_id: u64,
}

impl Schedule {
    pub fn new(limits: Limits, version: u64) -> Self {
        Schedule {
            limits,
            version,
            waiting: VecDeque::new(),
            active: HashMap::new(),
            staged: None,
            next_id: 0,
        }
    }

    /// The weight version new sequences start on.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Sequences in the batch.
    pub fn running(&self) -> usize {
        self.active.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Nothing queued, running or staged: the engine may block for the next command.
    pub fn is_idle(&self) -> bool {
        self.active.is_empty() && self.waiting.is_empty() && self.staged.is_none()
    }

    /// Nothing runs and nothing is staged, and every waiting sequence needs a newer weight
    /// version than the current one: nothing can happen until a command arrives.
    pub fn is_stuck(&self) -> bool {
        self.active.is_empty()
            && self.staged.is_none()
            && !self.waiting.is_empty()
            && self
                .waiting
                .iter()
                .all(|q| q.job.request.min_version > self.version)
    }

    pub fn enqueue(&mut self, jobs: Vec<Job>, now: Instant) {
        self.waiting
            .extend(jobs.into_iter().map(|job| Queued { job, enqueued: now }));
    }

    /// Stages a weight update; an update staged earlier and not yet applied is superseded (its
    /// caller is told so), whatever the two versions: the last update wins.
    pub fn stage(&mut self, update: Staged) {
        if let Some(old) = self.staged.replace(update) {
            let _ = old
                .reply
                .send(Err("superseded by a later weight update".into()));
        }
    }

    /// The staged update, once no sequence runs (so every completion has one weight version).
    /// The caller applies it and reports with [`Schedule::applied`].
    pub fn take_update(&mut self) -> Option<Staged> {
        if !self.active.is_empty() {
            return None;
        }
        self.staged.take()
    }

    /// New sequences start on `version` from now on, also when it is lower than the current
    /// one: versions are labels, not a clock, and the last update wins (the learner publishes
    /// the frozen reference policy as version 0 to calibrate reference rewards, then the policy
    /// again at version 0 or higher). Requests waiting for a `min_weight_version` above it keep
    /// waiting.
    pub fn applied(&mut self, version: u64) {
        self.version = version;
    }

    /// Forgets the sequences of cancelled requests: waiting ones are dropped, and the ids of
    /// running ones are returned for the batch to drop.
    pub fn drop_cancelled(&mut self) -> Vec<u64> {
        let cancelled = |r: &RequestHandle| r.cancelled.load(Ordering::SeqCst);
        self.waiting.retain(|q| !cancelled(&q.job.request));
        let gone: Vec<u64> = self
            .active
            .iter()
            .filter(|(_, a)| cancelled(&a.request))
            .map(|(id, _)| *id)
            .collect();
        for id in &gone {
            self.active.remove(id);
        }
        gone
    }

    /// Moves waiting sequences into the batch, FIFO, as capacity allows, and returns them with
    /// their batch ids.
    ///
    /// Nothing starts while an update is staged. Joining costs a prefill and a copy of the
    /// running KV cache, so while the batch runs, newcomers are let in once half of the slots
    /// (or all of the queue) can join at once, rather than one by one as slots free. The first
    /// sequence that does not fit (slots or KV budget) stops admission, so the queue stays
    /// FIFO; one that needs a newer weight version stays queued and is skipped. A lone sequence
    /// in an empty batch always fits, whatever its budget.
    pub fn admit(&mut self, now: Instant) -> Vec<(u64, GenerationRequest)> {
        if self.staged.is_some() {
            return Vec::new();
        }
        let running = self.active.len();
        let free = self.limits.max_sequences.saturating_sub(running);
        let group = (self.limits.max_sequences / 2)
            .max(1)
            .min(self.waiting.len());
        if running > 0 && free < group {
            return Vec::new();
        }
        let mut budget: usize = self.active.values().map(|a| a.budget).sum();
        let mut picked: Vec<(u64, GenerationRequest)> = Vec::new();
        let mut rest = VecDeque::new();
        while let Some(q) = self.waiting.pop_front() {
            let need = q.job.prompt.len() + q.job.params.max_new_tokens;
            let fits = running + picked.len() < self.limits.max_sequences
                && (budget + need <= self.limits.max_kv_tokens
                    || (running == 0 && picked.is_empty()));
            if !fits {
                rest.push_back(q);
                rest.extend(self.waiting.drain(..));
                break;
            }
            if q.job.request.min_version > self.version {
                rest.push_back(q);
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            budget += need;
            self.active.insert(
                id,
                Active {
                    request: q.job.request,
                    sample_index: q.job.sample_index,
                    enqueued: q.enqueued,
                    started: now,
                    budget: need,
                },
            );
            picked.push((
                id,
                GenerationRequest {
                    prompt: q.job.prompt,
                    params: q.job.params,
                },
            ));
        }
        self.waiting = rest;
        picked
    }

    /// Sequence `id` finished: its request gets the generation, the version and the timings.
    pub fn finished(&mut self, id: u64, generation: Generation, now: Instant) {
        let Some(a) = self.active.remove(&id) else {
            return;
        };
        let _ = a.request.out.send(Ok(Finished {
            sample_index: a.sample_index,
            generation,
            version: self.version,
            queued_seconds: (a.started - a.enqueued).as_secs_f64(),
            generate_seconds: (now - a.started).as_secs_f64(),
        }));
    }

    /// The sequences `ids` failed (their admission did): their requests get `error`.
    pub fn failed(&mut self, ids: &[u64], error: &str) {
        for id in ids {
            if let Some(a) = self.active.remove(id) {
                let _ = a.request.out.send(Err(error.to_string()));
            }
        }
    }

    /// Every running sequence failed (a decode step did): their requests get `error`.
    pub fn fail_running(&mut self, error: &str) {
        for (_, a) in self.active.drain() {
            let _ = a.request.out.send(Err(error.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use rlhf_model::{FinishReason, GenerationParams};
    use tokio::sync::mpsc;

    use super::*;

    type Out = mpsc::UnboundedReceiver<Result<Finished, String>>;

    fn request(min_version: u64) -> (Arc<RequestHandle>, Out) {
        let (out, rx) = mpsc::unbounded_channel();
        let handle = Arc::new(RequestHandle {
            min_version,
            out,
            cancelled: AtomicBool::new(false),
        });
        (handle, rx)
    }

    /// A sequence of `prompt` tokens and `new` new tokens (KV need `prompt + new`).
    fn job(request: &Arc<RequestHandle>, sample_index: u32, prompt: usize, new: usize) -> Job {
        Job {
            request: request.clone(),
            sample_index,
            prompt: vec![3; prompt],
            params: GenerationParams {
                max_new_tokens: new,
                ..Default::default()
            },
        }
    }

    fn schedule(max_sequences: usize, max_kv_tokens: usize) -> Schedule {
        Schedule::new(
            Limits {
                max_sequences,
                max_kv_tokens,
            },
            0,
        )
    }

    fn generation(tokens: Vec<u32>) -> Generation {
        Generation {
            logprobs: vec![0.0; tokens.len()],
            tokens,
            finish_reason: FinishReason::Length,
        }
    }

    fn update(version: u64) -> (Staged, oneshot::Receiver<Result<u64, String>>) {
        let (reply, rx) = oneshot::channel();
        let staged = Staged {
            version,
            tensors: Vec::new(),
            reply,
        };
        (staged, rx)
    }

    #[test]
    fn admits_fifo_up_to_max_sequences() {
        let mut s = schedule(3, usize::MAX);
        let (r, _out) = request(0);
        s.enqueue((0..5).map(|j| job(&r, j, 4, 4)).collect(), Instant::now());
        let picked = s.admit(Instant::now());
        let ids: Vec<u64> = picked.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, [0, 1, 2]);
        assert_eq!((s.running(), s.waiting()), (3, 2));
        // The batch is full: nothing more joins.
        assert!(s.admit(Instant::now()).is_empty());
    }

    #[test]
    fn a_running_batch_lets_newcomers_in_by_groups_of_half_the_slots() {
        let mut s = schedule(4, usize::MAX);
        let (r, _out) = request(0);
        s.enqueue((0..8).map(|j| job(&r, j, 2, 2)).collect(), Instant::now());
        assert_eq!(s.admit(Instant::now()).len(), 4);
        // One slot frees: fewer than half of the 4 slots, so nobody joins yet.
        s.finished(0, generation(vec![5]), Instant::now());
        assert!(s.admit(Instant::now()).is_empty());
        // Two free slots are half: two join at once.
        s.finished(1, generation(vec![5]), Instant::now());
        let ids: Vec<u64> = s.admit(Instant::now()).iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, [4, 5]);
        // A queue shorter than half the slots joins as soon as it all fits.
        let mut s = schedule(4, usize::MAX);
        s.enqueue(vec![job(&r, 0, 2, 2)], Instant::now());
        assert_eq!(s.admit(Instant::now()).len(), 1);
        s.enqueue(vec![job(&r, 1, 2, 2)], Instant::now());
        assert_eq!(s.admit(Instant::now()).len(), 1);
    }

    #[test]
    fn the_kv_budget_stops_admission_in_fifo_order() {
        // Each sequence needs 10 tokens; 25 fit two.
        let mut s = schedule(8, 25);
        let (r, _out) = request(0);
        s.enqueue(
            vec![job(&r, 0, 5, 5), job(&r, 1, 5, 5), job(&r, 2, 1, 1)],
            Instant::now(),
        );
        assert_eq!(s.admit(Instant::now()).len(), 3, "10 + 10 + 2 <= 25");
        // A sequence that does not fit stops admission: a smaller one behind it may not
        // overtake it.
        let mut s = schedule(8, 25);
        s.enqueue(
            vec![
                job(&r, 0, 5, 5),
                job(&r, 1, 5, 5),
                job(&r, 2, 5, 5),
                job(&r, 3, 1, 1),
            ],
            Instant::now(),
        );
        let picked: Vec<u32> = s
            .admit(Instant::now())
            .iter()
            .map(|(_, g)| g.prompt.len() as u32)
            .collect();
        assert_eq!(picked, [5, 5], "the small one behind the blocked one waits");
        assert_eq!(s.waiting(), 2);
    }

    #[test]
    fn a_lone_sequence_over_the_budget_still_runs_alone() {
        let mut s = schedule(8, 10);
        let (r, _out) = request(0);
        s.enqueue(vec![job(&r, 0, 50, 50), job(&r, 1, 1, 1)], Instant::now());
        let picked = s.admit(Instant::now());
        assert_eq!(picked.len(), 1);
        assert_eq!(picked[0].1.prompt.len(), 50);
        // While it runs, nothing else fits the budget.
        assert!(s.admit(Instant::now()).is_empty());
        s.finished(picked[0].0, generation(vec![7]), Instant::now());
        assert_eq!(s.admit(Instant::now()).len(), 1);
    }

    #[test]
    fn sequences_wait_for_their_minimum_weight_version() {
        let mut s = schedule(8, usize::MAX);
        let (new, _a) = request(2);
        let (old, _b) = request(0);
        s.enqueue(vec![job(&new, 0, 2, 2), job(&old, 0, 2, 2)], Instant::now());
        let picked = s.admit(Instant::now());
        assert_eq!(
            picked.len(),
            1,
            "the version-0 request overtakes the waiting one"
        );
        assert_eq!(s.waiting(), 1);
        assert!(!s.is_stuck(), "something runs");
        s.finished(picked[0].0, generation(vec![1]), Instant::now());
        assert!(s.is_stuck(), "only a newer version can unblock the queue");
        let (staged, _reply) = update(2);
        s.stage(staged);
        assert!(!s.is_stuck());
        let applied = s.take_update().expect("nothing runs: the update applies");
        s.applied(applied.version);
        assert_eq!(s.admit(Instant::now()).len(), 1);
    }

    #[test]
    fn a_staged_update_waits_for_the_running_sequences_and_blocks_admission() {
        let mut s = schedule(8, usize::MAX);
        let (r, mut out) = request(0);
        s.enqueue(vec![job(&r, 0, 2, 2)], Instant::now());
        let first = s.admit(Instant::now());
        let (staged, mut reply) = update(1);
        s.stage(staged);
        s.enqueue(vec![job(&r, 1, 2, 2)], Instant::now());
        assert!(s.admit(Instant::now()).is_empty(), "no start while staged");
        assert!(s.take_update().is_none(), "a sequence still runs");
        s.finished(first[0].0, generation(vec![9]), Instant::now());
        let f = out.try_recv().unwrap().unwrap();
        assert_eq!((f.sample_index, f.version), (0, 0), "finished on version 0");
        let u = s.take_update().expect("the batch drained");
        s.applied(u.version);
        let _ = u.reply.send(Ok(u.version));
        assert_eq!(reply.try_recv().unwrap(), Ok(1));
        let second = s.admit(Instant::now());
        s.finished(second[0].0, generation(vec![9]), Instant::now());
        assert_eq!(out.try_recv().unwrap().unwrap().version, 1);
    }

    #[test]
    fn a_newer_staged_update_supersedes_the_pending_one() {
        let mut s = schedule(8, usize::MAX);
        let (a, mut first) = update(1);
        let (b, _second) = update(2);
        s.stage(a);
        s.stage(b);
        assert!(
            first
                .try_recv()
                .unwrap()
                .unwrap_err()
                .contains("superseded")
        );
        assert_eq!(s.take_update().unwrap().version, 2);
    }

    #[test]
    fn a_lower_version_replaces_a_higher_one() {
        let mut s = schedule(8, usize::MAX);
        let (staged, _reply) = update(3);
        s.stage(staged);
        let u = s.take_update().unwrap();
        s.applied(u.version);
        assert_eq!(s.version(), 3);
        // The reference policy, published as version 0, replaces version 3.
        let (staged, _reply) = update(0);
        s.stage(staged);
        let u = s.take_update().expect("nothing runs: the update applies");
        s.applied(u.version);
        assert_eq!(s.version(), 0);
        let (r, mut out) = request(0);
        s.enqueue(vec![job(&r, 0, 2, 2)], Instant::now());
        let picked = s.admit(Instant::now());
        s.finished(picked[0].0, generation(vec![9]), Instant::now());
        assert_eq!(out.try_recv().unwrap().unwrap().version, 0);
        // A request for version 2 or later waits through version 0 until the policy is back.
        let (later, mut later_out) = request(2);
        s.enqueue(vec![job(&later, 0, 2, 2)], Instant::now());
        assert!(s.admit(Instant::now()).is_empty());
        assert!(s.is_stuck());
        let (staged, _reply) = update(2);
        s.stage(staged);
        let u = s.take_update().unwrap();
        s.applied(u.version);
        let picked = s.admit(Instant::now());
        assert_eq!(picked.len(), 1);
        s.finished(picked[0].0, generation(vec![9]), Instant::now());
        assert_eq!(later_out.try_recv().unwrap().unwrap().version, 2);
        // A lower update staged behind a higher one supersedes it too.
        let (high, mut high_reply) = update(5);
        let (low, _low_reply) = update(1);
        s.stage(high);
        s.stage(low);
        assert!(high_reply.try_recv().unwrap().is_err());
        assert_eq!(s.take_update().unwrap().version, 1);
    }

    #[test]
    fn cancelled_requests_leave_the_queue_and_the_batch() {
        let mut s = schedule(2, usize::MAX);
        let (keep, _k) = request(0);
        let (gone, _g) = request(0);
        s.enqueue(
            vec![
                job(&gone, 0, 2, 2),
                job(&keep, 0, 2, 2),
                job(&gone, 1, 2, 2),
            ],
            Instant::now(),
        );
        let picked = s.admit(Instant::now());
        assert_eq!(picked.len(), 2);
        gone.cancelled.store(true, Ordering::SeqCst);
        assert_eq!(s.drop_cancelled(), vec![picked[0].0]);
        assert_eq!((s.running(), s.waiting()), (1, 0));
        assert!(s.drop_cancelled().is_empty());
    }

    #[test]
    fn finished_and_failed_sequences_report_to_their_request() {
        let mut s = schedule(8, usize::MAX);
        let (r, mut out) = request(0);
        s.enqueue((0..3).map(|j| job(&r, j, 2, 2)).collect(), Instant::now());
        let ids: Vec<u64> = s.admit(Instant::now()).iter().map(|(id, _)| *id).collect();
        s.finished(ids[1], generation(vec![4, 5]), Instant::now());
        let f = out.try_recv().unwrap().unwrap();
        assert_eq!((f.sample_index, f.generation.tokens), (1, vec![4, 5]));
        // An unknown (already dropped) id is ignored.
        s.finished(ids[1], generation(vec![4]), Instant::now());
        assert!(out.try_recv().is_err());
        s.failed(&ids[..1], "admission failed");
        assert_eq!(out.try_recv().unwrap().unwrap_err(), "admission failed");
        s.fail_running("generation failed: x");
        assert_eq!(out.try_recv().unwrap().unwrap_err(), "generation failed: x");
        assert!(s.is_idle());
    }
}
