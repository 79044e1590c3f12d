//! A request's completions as they finish: its sequences go to the engine (one engine request
//! per prompt, so a prompt's samples report together), each finished one is handed to
//! [`Rollout::finish`] in its own task (scoring and pushing overlap the generation of the
//! others), and the results stream back to the caller. When the caller goes away, or a
//! sequence fails, the request's remaining sequences are cancelled.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rlhf_proto::trace;
use rlhf_proto::v1;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::engine::{Finished, Job, RequestHandle};
use crate::metrics::Metrics;
use crate::request::ValidGenerate;
use crate::rollout::Rollout;

/// Completions waiting in the response stream before finishing ones wait for the caller.
const BUFFERED: usize = 64;

/// The engine side of a request: where its sequences report, tagged with their prompt index.
pub struct Sequences {
    handles: Vec<Arc<RequestHandle>>,
    finished: mpsc::UnboundedReceiver<(usize, Result<Finished, String>)>,
    total: usize,
}

impl Sequences {
    /// Stops every sequence of the request (queued or running).
    fn cancel(&self) {
        for h in &self.handles {
            h.cancelled.store(true, Ordering::SeqCst);
        }
    }
}

/// The engine jobs of `r`, and where they will report.
pub fn sequences(r: &ValidGenerate) -> (Vec<Job>, Sequences) {
    let (done_tx, finished) = mpsc::unbounded_channel();
    let mut handles = Vec::with_capacity(r.prompts.len());
    let mut jobs = Vec::with_capacity(r.sequences());
    for (pi, prompt) in r.prompts.iter().enumerate() {
        let (out, mut from_engine) = mpsc::unbounded_channel();
        let handle = Arc::new(RequestHandle {
            min_version: r.min_weight_version,
            out,
            cancelled: AtomicBool::new(false),
        });
        handles.push(handle.clone());
        for j in 0..r.samples_per_prompt {
            jobs.push(Job {
                request: handle.clone(),
                sample_index: j,
                prompt: prompt.ids.clone(),
                params: r.sample_params(prompt, j),
            });
        }
        let done_tx = done_tx.clone();
        trace::spawn(async move {
            while let Some(f) = from_engine.recv().await {
                if done_tx.send((pi, f)).is_err() {
                    break;
                }
            }
        });
    }
    let total = jobs.len();
    let sequences = Sequences {
        handles,
        finished,
        total,
    };
    (jobs, sequences)
}

/// The response stream of a request whose jobs were enqueued.
pub fn completions(
    rollout: Arc<Rollout>,
    sequences: Sequences,
    metrics: Metrics,
) -> ReceiverStream<Result<v1::Completion, Status>> {
    let (tx, rx) = mpsc::channel(BUFFERED);
    trace::spawn(forward(rollout, sequences, tx, metrics));
    ReceiverStream::new(rx)
}

/// Hands each finished sequence to its own task until all have finished, the caller left or
/// one failed. The stream ends when the last task has sent its completion.
async fn forward(
    rollout: Arc<Rollout>,
    mut sequences: Sequences,
    tx: mpsc::Sender<Result<v1::Completion, Status>>,
    metrics: Metrics,
) {
    let mut received = 0;
    while received < sequences.total {
        let next = tokio::select! {
            _ = tx.closed() => {
                // The caller went away: stop its sequences.
                sequences.cancel();
                return;
            }
            next = sequences.finished.recv() => next,
        };
        let Some((pi, result)) = next else { return };
        received += 1;
        let finished = match result {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.send(Err(Status::internal(e))).await;
                sequences.cancel();
                return;
            }
        };
        let (rollout, tx, metrics) = (rollout.clone(), tx.clone(), metrics.clone());
        trace::spawn(async move {
            let out = rollout.finish(pi, finished).await;
            if out.is_ok() {
                metrics.completions.inc();
            }
            let _ = tx.send(out).await;
        });
    }
}
