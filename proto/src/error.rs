//! One classification of failed calls for every service: what a `tonic::Status` means for the
//! caller, whether trying again can help ([`Failure::retryable`]), and whether the peer itself
//! is gone ([`Failure::peer_gone`]). The actor's retries, the controller's "this worker is
//! dead" decision and the CLI's messages all use it, so a failure is judged the same way
//! everywhere.

use std::error::Error as _;
use std::future::Future;
use std::time::{Duration, Instant};

use tonic::{Code, Status};

/// What kind of failure a status is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection could be made or it broke (refused, reset, closed mid-call): the peer
    /// may be dead or cut off.
    Unreachable,
    /// The peer answered that it cannot serve right now (shutting down, a dependency down).
    Unavailable,
    /// The peer's queue is full: back off and try again; it is alive and working.
    Overloaded,
    /// The call's deadline passed (the peer is slow, stalled or paused).
    TimedOut,
    /// The request is wrong or not allowed; the same request will fail again.
    Rejected,
    /// The peer failed while handling the request (a bug, a corrupt input it cannot handle).
    Internal,
}

impl Failure {
    /// Classifies `status`. Exhaustive over the gRPC codes on purpose (no wildcard arm): a new
    /// code forces a decision (STYLE.md §5).
    pub fn of(status: &Status) -> Failure {
        let from_transport = status.source().is_some();
        // tonic's own deadline may sit anywhere in the source chain.
        if std::iter::successors(status.source(), |e| (*e).source())
            .any(|e| e.is::<tonic::TimeoutExpired>())
        {
            return Failure::TimedOut;
        }
        match status.code() {
            Code::Unavailable if from_transport => Failure::Unreachable,
            Code::Unavailable => Failure::Unavailable,
            // A connection that dies mid-call surfaces as UNKNOWN or CANCELLED with the
            // transport error as its source.
            Code::Unknown | Code::Cancelled if from_transport => Failure::Unreachable,
            Code::Cancelled => Failure::Unavailable,
            Code::Unknown => Failure::Internal,
            Code::ResourceExhausted => Failure::Overloaded,
            Code::DeadlineExceeded => Failure::TimedOut,
            Code::Aborted => Failure::Unavailable,
            Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unimplemented => Failure::Rejected,
            Code::Internal | Code::DataLoss => Failure::Internal,
            Code::Ok => Failure::Internal,
        }
    }

    /// Whether the same call may succeed later. Exhaustive: a new variant must decide.
    pub fn retryable(self) -> bool {
        match self {
            Failure::Unreachable => true,
            Failure::Unavailable => true,
            Failure::Overloaded => true,
            Failure::TimedOut => true,
            Failure::Rejected => false,
            Failure::Internal => false,
        }
    }

    /// Whether the failure says the peer process is gone (dead or cut off), so its work should
    /// go elsewhere. Exhaustive: a new variant must decide.
    pub fn peer_gone(self) -> bool {
        match self {
            Failure::Unreachable => true,
            Failure::Unavailable => false,
            Failure::Overloaded => false,
            Failure::TimedOut => false,
            Failure::Rejected => false,
            Failure::Internal => false,
        }
    }
}

/// How [`retry`] retries.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all for unreachable, unavailable or timed-out peers, so a dead peer fails
    /// the caller quickly.
    pub attempts: u32,
    /// How long an overloaded peer (RESOURCE_EXHAUSTED: backpressure, not failure) is retried.
    pub overload_patience: Duration,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 4,
            overload_patience: Duration::from_secs(120),
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        }
    }
}

/// Calls `f` until it succeeds or its failure is not worth retrying under `policy`, with
/// exponential backoff. The final error's message is prefixed with `what`.
pub async fn retry<T, F, Fut>(what: &str, policy: RetryPolicy, mut f: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let started = Instant::now();
    let mut delay = policy.first_delay;
    let mut failures = 0;
    loop {
        let status = match f().await {
            Ok(v) => return Ok(v),
            Err(s) => s,
        };
        let failure = Failure::of(&status);
        let again = failure.retryable()
            && match failure {
                Failure::Overloaded => started.elapsed() < policy.overload_patience,
                _ => {
                    failures += 1;
                    failures < policy.attempts
                }
            };
        if !again {
            return Err(Status::new(
                status.code(),
                format!("{what}: {}", status.message()),
            ));
        }
        tracing::warn!(
            what,
            ?failure,
            "retrying after {delay:?}: {}",
            status.message()
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(policy.max_delay);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_statuses_are_classified_by_code() {
        assert_eq!(Failure::of(&Status::unavailable("x")), Failure::Unavailable);
        assert_eq!(
            Failure::of(&Status::resource_exhausted("x")),
            Failure::Overloaded
        );
        assert_eq!(
            Failure::of(&Status::invalid_argument("x")),
            Failure::Rejected
        );
        assert_eq!(Failure::of(&Status::internal("x")), Failure::Internal);
        assert_eq!(
            Failure::of(&Status::deadline_exceeded("x")),
            Failure::TimedOut
        );
        assert!(!Failure::of(&Status::unavailable("engine stopped")).peer_gone());
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable() {
        // Bind and drop: nothing listens on the port afterwards.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut c = crate::client::actor(
            &format!("127.0.0.1:{port}"),
            crate::client::Timeouts::request(Duration::from_secs(2)),
        )
        .unwrap();
        let status = c.info(crate::v1::ActorInfoRequest {}).await.unwrap_err();
        let failure = Failure::of(&status);
        assert_eq!(failure, Failure::Unreachable, "{status:?}");
        assert!(failure.peer_gone() && failure.retryable());
    }

    #[tokio::test]
    async fn retry_gives_up_on_rejected_and_after_the_attempts() {
        let policy = RetryPolicy {
            first_delay: Duration::from_millis(1),
            ..RetryPolicy::default()
        };
        let mut calls = 0;
        let r: Result<(), Status> = retry("svc", policy, || {
            calls += 1;
            async { Err(Status::invalid_argument("bad")) }
        })
        .await;
        assert_eq!(calls, 1);
        assert!(r.unwrap_err().message().starts_with("svc: "));
        let mut calls = 0;
        let _ = retry("svc", policy, || {
            calls += 1;
            async { Err::<(), _>(Status::unavailable("down")) }
        })
        .await;
        assert_eq!(calls, policy.attempts);
    }
}
