//! Weight publishing: one encoded weight version pushed straight to many actors at once
//! (`LearnerService.PublishWeights`), each over its own `RolloutService.UpdateWeights` stream.
//!
//! The chunks are encoded once and shared by every actor's stream through an `Arc`; a stream
//! clones one chunk at a time, as the transport asks for it. Every actor has its own deadline,
//! so a slow or dead actor costs only its own update, never the others'.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rlhf_proto::client::{self, Timeouts};
use rlhf_proto::error::Failure;
use rlhf_proto::v1;
use tonic::Status;

/// How one actor's update went.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub address: String,
    /// Why the update failed; `None` when the actor took it.
    pub error: Option<String>,
    /// The actor could not be reached (dead or cut off), as opposed to refusing the update or
    /// answering too late.
    pub unreachable: bool,
    /// The actor did not take the update within the deadline.
    pub timed_out: bool,
    /// Tensor bytes handed to the transport.
    pub bytes: u64,
    pub seconds: f64,
}

impl Outcome {
    pub fn to_proto(&self) -> v1::ActorUpdate {
        v1::ActorUpdate {
            address: self.address.clone(),
            ok: self.error.is_none(),
            error: self.error.clone().unwrap_or_default(),
            unreachable: self.unreachable,
            timed_out: self.timed_out,
            bytes: self.bytes,
            seconds: self.seconds,
        }
    }
}

/// Sends `chunks` to every actor in `addresses`, all in parallel, each within `timeout`
/// (connecting included). One outcome per address, in the order given.
pub async fn publish(
    addresses: &[String],
    chunks: Arc<Vec<v1::WeightChunk>>,
    timeout: Duration,
) -> Vec<Outcome> {
    let tasks: Vec<_> = addresses
        .iter()
        .map(|address| {
            let (address, chunks) = (address.clone(), chunks.clone());
            rlhf_proto::trace::spawn(async move { update_one(address, chunks, timeout).await })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(tasks.len());
    for (task, address) in tasks.into_iter().zip(addresses) {
        outcomes.push(task.await.unwrap_or_else(|e| Outcome {
            address: address.clone(),
            error: Some(format!("the update task failed: {e}")),
            unreachable: false,
            timed_out: false,
            bytes: 0,
            seconds: 0.0,
        }));
    }
    outcomes
}

/// One actor's update.
#[tracing::instrument(skip_all, fields(actor = %address))]
async fn update_one(
    address: String,
    chunks: Arc<Vec<v1::WeightChunk>>,
    timeout: Duration,
) -> Outcome {
    let started = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    // The deadline is ours, connecting included: an actor that misses it timed out. The
    // channel's deadline and the one sent to the actor only back it up, a little later, because
    // tonic reports its own timeout as a transport error that `Failure::of` would take for an
    // unreachable peer.
    let backstop = timeout + Duration::from_secs(1);
    let timeouts = Timeouts {
        connect: timeout.min(Timeouts::default().connect),
        request: backstop,
    };
    let result = match client::actor(&address, timeouts) {
        // An address that does not even parse cannot be reached.
        Err(e) => Err((format!("cannot connect: {e}"), Failure::Unreachable)),
        Ok(mut actor) => {
            let mut request = tonic::Request::new(stream(chunks, sent.clone()));
            request.set_timeout(backstop);
            match tokio::time::timeout(timeout, actor.update_weights(request)).await {
                Ok(Ok(_reply)) => Ok(()),
                Ok(Err(status)) => Err(failed(&status)),
                Err(_) => Err((
                    format!("no reply within {} s", timeout.as_secs_f64()),
                    Failure::TimedOut,
                )),
            }
        }
    };
    let outcome = Outcome {
        address,
        unreachable: matches!(&result, Err((_, f)) if f.peer_gone()),
        timed_out: matches!(result, Err((_, Failure::TimedOut))),
        error: result.err().map(|(message, _)| message),
        bytes: sent.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
    };
    match &outcome.error {
        None => tracing::info!(
            bytes = outcome.bytes,
            seconds = outcome.seconds,
            "weights sent"
        ),
        Some(e) => tracing::warn!(
            unreachable = outcome.unreachable,
            "weight update failed: {e}"
        ),
    }
    outcome
}

/// The error text of a failed update and what kind of failure it is.
fn failed(status: &Status) -> (String, Failure) {
    (
        format!("{:?}: {}", status.code(), status.message()),
        Failure::of(status),
    )
}

/// The shared chunks as one actor's request stream, counting the data bytes handed out.
fn stream(
    chunks: Arc<Vec<v1::WeightChunk>>,
    sent: Arc<AtomicU64>,
) -> impl tokio_stream::Stream<Item = v1::WeightChunk> + Send + 'static {
    let n = chunks.len();
    tokio_stream::iter((0..n).map(move |i| {
        let chunk = chunks[i].clone();
        sent.fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
        chunk
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closed_port_and_a_bad_address_are_unreachable_and_keep_their_order() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addresses = vec![format!("127.0.0.1:{port}"), "not a uri\n".to_string()];
        let chunks = Arc::new(rlhf_proto::weights::to_chunks(&[], 3, 16));
        let outcomes = publish(&addresses, chunks, Duration::from_secs(5)).await;
        assert_eq!(outcomes.len(), 2);
        for (o, address) in outcomes.iter().zip(&addresses) {
            assert_eq!(&o.address, address);
            assert!(o.unreachable && o.error.is_some(), "{o:?}");
            assert!(!o.to_proto().ok);
        }
    }
}
