//! One worker per reward-model checkpoint: a bounded queue in front of a thread that owns the
//! model and scores requests in dynamic batches.
//!
//! A batch takes every request that queued while the previous one ran (so batches form by
//! themselves under load and an idle server adds no latency), then optionally waits up to
//! `max_wait` for more; it closes earlier at `max_batch_size` sequences or `max_batch_tokens`
//! tokens. Its sequences are sorted by length and cut into
//! forward passes that respect both limits, so short sequences are not padded to long ones.
//! Each row's score is computed at its own last token with padding masked, so batching changes
//! only speed (scores equal one-at-a-time scores up to float rounding).
//!
//! The queue is bounded: when it is full a request fails at once with `Overloaded`
//! (RESOURCE_EXHAUSTED). Requests whose deadline passed while queued are answered
//! `DeadlineExceeded` without being computed.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::Instant;

use rlhf_model::{HeadKind, Model, ModelError, Tokenizer, device};
use tokio::sync::oneshot;

use crate::config::BatchingConfig;
use crate::error::ScoreError;
use crate::metrics::Metrics;

/// Sequences to score, with where to send the scores.
struct Job {
    sequences: Vec<Vec<u32>>,
    reply: oneshot::Sender<Result<Vec<f32>, ScoreError>>,
    deadline: Instant,
}

/// A loaded reward model behind its batching queue. Cheap to share (`Arc`); the thread stops
/// when the last handle is dropped.
pub struct ModelWorker {
    tx: SyncSender<Job>,
    tokenizer: Tokenizer,
    context_length: usize,
    dir: PathBuf,
    metrics: Metrics,
    label: String,
}

impl ModelWorker {
    /// Loads a `*ForSequenceClassification` checkpoint and starts its thread.
    pub fn spawn(
        dir: &Path,
        batching: &BatchingConfig,
        metrics: Metrics,
    ) -> Result<ModelWorker, ModelError> {
        let model = Model::load(dir, &device::inference_device()?)?;
        if model.head() != HeadKind::Score {
            return Err(ModelError::InvalidInput(format!(
                "{}: a reward model must be a *ForSequenceClassification checkpoint, this is a {}",
                dir.display(),
                model.config.architecture
            )));
        }
        let tokenizer = Tokenizer::from_dir(dir)?;
        let context_length = model.config.max_position_embeddings;
        let (tx, rx) = sync_channel(batching.queue_capacity);
        let label = dir.file_name().map_or_else(
            || dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let loop_state = WorkerLoop {
            model,
            batching: batching.clone(),
            metrics: metrics.clone(),
            label: label.clone(),
        };
        std::thread::Builder::new()
            .name(format!("reward-model-{label}"))
            .spawn(move || loop_state.run(rx))
            .map_err(|e| ModelError::Backend(format!("cannot start the model thread: {e}")))?;
        Ok(ModelWorker {
            tx,
            tokenizer,
            context_length,
            dir: dir.to_path_buf(),
            metrics,
            label,
        })
    }

    /// The reward model's own tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Scores sequences of token ids (each becomes one value), waiting at most until `deadline`.
    /// Sequence errors name the index in `sequences` through `sample_index`.
    pub async fn score(
        &self,
        sequences: Vec<Vec<u32>>,
        sample_index: impl Fn(usize) -> usize,
        deadline: Instant,
    ) -> Result<Vec<f32>, ScoreError> {
        for (i, s) in sequences.iter().enumerate() {
            if s.is_empty() {
                return Err(ScoreError::InvalidArgument(format!(
                    "sample {}: tokenises to no tokens",
                    sample_index(i)
                )));
            }
            if s.len() > self.context_length {
                return Err(ScoreError::InvalidArgument(format!(
                    "sample {}: {} tokens exceed the context length {} of reward model {}",
                    sample_index(i),
                    s.len(),
                    self.context_length,
                    self.dir.display()
                )));
            }
        }
        let (reply, rx) = oneshot::channel();
        let job = Job {
            sequences,
            reply,
            deadline,
        };
        match self.tx.try_send(job) {
            Ok(()) => self
                .metrics
                .queue_depth
                .with_label_values(&[&self.label])
                .inc(),
            Err(TrySendError::Full(_)) => {
                return Err(ScoreError::Overloaded(format!(
                    "the queue of reward model {} is full",
                    self.label
                )));
            }
            Err(TrySendError::Disconnected(_)) => return Err(ScoreError::Unavailable),
        }
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ScoreError::Unavailable),
            Err(_) => Err(ScoreError::DeadlineExceeded(format!(
                "waiting for reward model {}",
                self.label
            ))),
        }
    }
}

/// The state of the worker thread.
struct WorkerLoop {
    model: Model,
    batching: BatchingConfig,
    metrics: Metrics,
    label: String,
}

impl WorkerLoop {
    fn run(self, rx: Receiver<Job>) {
        while let Some(jobs) = self.collect(&rx) {
            self.process(jobs);
        }
    }

    /// Blocks for the first job, then gathers more until a limit or `max_wait`. `None` when
    /// every handle is gone.
    fn collect(&self, rx: &Receiver<Job>) -> Option<Vec<Job>> {
        let first = rx.recv().ok()?;
        let opened = Instant::now();
        let (mut seqs, mut tokens) = (0usize, 0usize);
        let count = |job: &Job, seqs: &mut usize, tokens: &mut usize| {
            *seqs += job.sequences.len();
            *tokens += job.sequences.iter().map(Vec::len).sum::<usize>();
        };
        count(&first, &mut seqs, &mut tokens);
        let mut jobs = vec![first];
        let b = &self.batching;
        let full =
            |seqs: usize, tokens: usize| seqs >= b.max_batch_size || tokens >= b.max_batch_tokens;
        // Everything that queued up while the previous batch ran joins at once: under load
        // batches form by themselves, and an idle server adds no latency.
        while !full(seqs, tokens) {
            match rx.try_recv() {
                Ok(job) => {
                    count(&job, &mut seqs, &mut tokens);
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        // Then, if configured, wait a little for more.
        while !full(seqs, tokens) {
            let Some(left) = b
                .max_wait()
                .checked_sub(opened.elapsed())
                .filter(|d| !d.is_zero())
            else {
                break;
            };
            match rx.recv_timeout(left) {
                Ok(job) => {
                    count(&job, &mut seqs, &mut tokens);
                    jobs.push(job);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        self.metrics
            .queue_depth
            .with_label_values(&[&self.label])
            .sub(jobs.len() as i64);
        Some(jobs)
    }

    fn process(&self, jobs: Vec<Job>) {
        let now = Instant::now();
        let (live, expired): (Vec<Job>, Vec<Job>) =
            jobs.into_iter().partition(|j| j.deadline > now);
        for job in expired {
            let _ = job.reply.send(Err(ScoreError::DeadlineExceeded(format!(
                "queued past the deadline at reward model {}",
                self.label
            ))));
        }
        if live.is_empty() {
            return;
        }
        // (job, sequence) of every row, shortest first.
        let mut rows: Vec<(usize, usize)> = live
            .iter()
            .enumerate()
            .flat_map(|(j, job)| (0..job.sequences.len()).map(move |s| (j, s)))
            .collect();
        rows.sort_by_key(|&(j, s)| live[j].sequences[s].len());
        let mut scores: Vec<Vec<f32>> = live.iter().map(|j| vec![0.0; j.sequences.len()]).collect();
        let mut failure: Option<String> = None;
        for chunk in chunks(&rows, |&(j, s)| live[j].sequences[s].len(), &self.batching) {
            let seqs: Vec<&[u32]> = chunk
                .iter()
                .map(|&(j, s)| live[j].sequences[s].as_slice())
                .collect();
            let started = Instant::now();
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                self.model
                    .sequence_scores(&seqs)
                    .map(rlhf_model::host::to_vec)
            }));
            self.metrics
                .batch_seconds
                .observe(started.elapsed().as_secs_f64());
            self.metrics.batch_size.observe(seqs.len() as f64);
            match result {
                Ok(Ok(values)) => {
                    for (&(j, s), v) in chunk.iter().zip(values) {
                        scores[j][s] = v;
                    }
                }
                Ok(Err(e)) => failure = Some(e.to_string()),
                Err(_) => failure = Some("the reward model panicked".into()),
            }
            if failure.is_some() {
                break;
            }
        }
        for (job, values) in live.into_iter().zip(scores) {
            let result = match &failure {
                None => Ok(values),
                Some(m) => Err(ScoreError::Objective {
                    objective: String::new(),
                    message: m.clone(),
                }),
            };
            let _ = job.reply.send(result);
        }
    }
}

/// Cuts rows (sorted by length) into forward passes of at most `max_batch_size` rows and
/// `max_batch_tokens` padded tokens (a single longer row still gets its own pass).
fn chunks<'a, T>(rows: &'a [T], len: impl Fn(&T) -> usize, b: &BatchingConfig) -> Vec<&'a [T]> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < rows.len() {
        let mut end = start + 1;
        while end < rows.len()
            && end - start < b.max_batch_size
            && (end - start + 1) * len(&rows[end]) <= b.max_batch_tokens
        {
            end += 1;
        }
        out.push(&rows[start..end]);
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_respect_both_limits() {
        let b = BatchingConfig {
            max_batch_size: 3,
            max_batch_tokens: 20,
            ..Default::default()
        };
        let lens = [2usize, 2, 3, 4, 5, 9, 30];
        let out = chunks(&lens, |&l| l, &b);
        let sizes: Vec<Vec<usize>> = out.iter().map(|c| c.to_vec()).collect();
        // [2,2,3] (3 rows), [4,5] (3*9 > 20 stops before 9), [9,...]: 2*30 > 20, [30] alone.
        assert_eq!(sizes, vec![vec![2, 2, 3], vec![4, 5], vec![9], vec![30]]);
    }
}
