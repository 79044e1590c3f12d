//! Trace context across gRPC calls: a caller's job id, step and trace id travel as metadata
//! (`x-rlhf-trace`, `x-rlhf-job`, `x-rlhf-step`) on every call made through the clients of
//! [`crate::client`], and a server's handler opens its span from them, so one step's log lines
//! can be followed from the controller through the actors to the reward server and learners.
//!
//! The context lives in a tokio task-local: [`Context::scope`] sets it for a future, the
//! clients' interceptor reads it, [`spawn`] carries it (and the current span) into a new task.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use tonic::metadata::{MetadataMap, MetadataValue};
use tracing::Instrument;

const TRACE: &str = "x-rlhf-trace";
const JOB: &str = "x-rlhf-job";
const STEP: &str = "x-rlhf-step";

tokio::task_local! {
    static CONTEXT: Context;
}

/// What identifies the work a call belongs to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// Shared by every call made on behalf of one job step (or one command).
    pub trace_id: String,
    /// The job's id (empty outside a job).
    pub job: String,
    /// The RL step (0 outside a step: calibration, evaluation, control calls).
    pub step: u64,
}

impl Context {
    /// A new trace for `job`'s `step`.
    pub fn new(job: impl Into<String>, step: u64) -> Context {
        Context {
            trace_id: new_trace_id(),
            job: job.into(),
            step,
        }
    }

    /// The context of the running task, if one was set.
    pub fn current() -> Option<Context> {
        CONTEXT.try_with(Clone::clone).ok()
    }

    /// Runs `f` with this context (and a span naming it).
    pub async fn scope<F: Future>(self, f: F) -> F::Output {
        let span =
            tracing::info_span!("job", job = %self.job, step = self.step, trace = %self.trace_id);
        CONTEXT.scope(self, f.instrument(span)).await
    }

    /// The context a request carries (empty fields where it carries none).
    pub fn from_metadata(metadata: &MetadataMap) -> Context {
        let get = |k: &str| {
            metadata
                .get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        Context {
            trace_id: get(TRACE),
            job: get(JOB),
            step: get(STEP).parse().unwrap_or(0),
        }
    }

    fn write(&self, metadata: &mut MetadataMap) {
        for (key, value) in [
            (TRACE, self.trace_id.clone()),
            (JOB, self.job.clone()),
            (STEP, self.step.to_string()),
        ] {
            // A value that is not valid ASCII metadata (a job name with control characters)
            // is left out rather than failing the call.
            if let Ok(v) = MetadataValue::try_from(value.as_str()) {
                metadata.insert(key, v);
            }
        }
    }
}

/// The span of a server handler: the RPC's name and the caller's context. Calls the handler
/// makes inside [`serve`] carry the same context on.
pub fn server_span(rpc: &'static str, metadata: &MetadataMap) -> tracing::Span {
    let c = Context::from_metadata(metadata);
    tracing::info_span!("rpc", rpc, job = %c.job, step = c.step, trace = %c.trace_id)
}

/// Runs a handler's body in its span and with the caller's context, so the calls it makes
/// downstream carry the same trace.
pub async fn serve<F: Future>(rpc: &'static str, metadata: &MetadataMap, f: F) -> F::Output {
    let span = server_span(rpc, metadata);
    CONTEXT
        .scope(Context::from_metadata(metadata), f.instrument(span))
        .await
}

/// `tokio::spawn` that keeps the current trace context and span.
pub fn spawn<F>(f: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let span = tracing::Span::current();
    match Context::current() {
        Some(c) => tokio::spawn(CONTEXT.scope(c, f.instrument(span))),
        None => tokio::spawn(f.instrument(span)),
    }
}

/// The clients' interceptor: writes the current context into each request's metadata.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContext;

impl tonic::service::Interceptor for TraceContext {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(c) = Context::current() {
            c.write(request.metadata_mut());
        }
        Ok(request)
    }
}

/// 16 hex digits, unique per process and call (time, pid and a counter mixed by splitmix64).
fn new_trace_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut z = nanos
        ^ (std::process::id() as u64).rotate_left(32)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    format!("{:016x}", z ^ (z >> 31))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn context_round_trips_through_metadata_and_the_interceptor() {
        use tonic::service::Interceptor;
        let c = Context::new("job-1", 7);
        let request = c
            .clone()
            .scope(async { TraceContext.call(tonic::Request::new(())).unwrap() })
            .await;
        assert_eq!(Context::from_metadata(request.metadata()), c);
        // Outside a scope nothing is written.
        let bare = TraceContext.call(tonic::Request::new(())).unwrap();
        assert_eq!(Context::from_metadata(bare.metadata()), Context::default());
    }

    #[tokio::test]
    async fn spawned_tasks_keep_the_context() {
        let c = Context::new("job-2", 3);
        let inner = c
            .clone()
            .scope(async { spawn(async { Context::current() }).await.unwrap() })
            .await;
        assert_eq!(inner, Some(c));
    }

    #[test]
    fn trace_ids_differ() {
        assert_ne!(new_trace_id(), new_trace_id());
    }
}
