//! A `remote` objective: another `RewardService` computes the value, so rewards can be written in
//! any language that speaks gRPC.
//!
//! Calls to the remote are retried with `rlhf_proto::error::retry` (so its failures are judged by
//! the one classification, `rlhf_proto::error::Failure`), never past the caller's deadline.

use std::future::Future;
use std::time::{Duration, Instant};

use rlhf_proto::client::{RewardClient, Timeouts};
use rlhf_proto::error::{RetryPolicy, retry};
use rlhf_proto::v1;
use tokio::sync::OnceCell;
use tonic::Status;

use crate::error::ScoreError;
use crate::sample::Sample;

/// A client of a remote reward server, bound to one of its objectives.
pub struct RemoteObjective {
    client: RewardClient,
    address: String,
    objective: Option<String>,
    timeout: Duration,
    /// Position of the objective in the remote's values, learned from its `Describe` on first use.
    index: OnceCell<usize>,
}

impl RemoteObjective {
    /// Connects lazily: a server that is down now may be up by the first request.
    pub fn new(
        address: &str,
        objective: Option<String>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let timeouts = Timeouts {
            connect: timeout.min(Duration::from_secs(5)),
            request: timeout,
        };
        // Named by a job, so never given the cluster's token (docs/security.md).
        let client = rlhf_proto::client::external_reward(address, timeouts, None)
            .map_err(|e| format!("{address}: {e}"))?;
        Ok(RemoteObjective {
            client,
            address: address.to_string(),
            objective,
            timeout,
            index: OnceCell::new(),
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn objective(&self) -> Option<&str> {
        self.objective.as_deref()
    }

    fn failed(&self, message: impl std::fmt::Display) -> ScoreError {
        ScoreError::Objective {
            objective: String::new(),
            message: format!("remote {}: {message}", self.address),
        }
    }

    /// A request with the earlier of our timeout and the caller's deadline.
    fn request<T>(&self, body: T, deadline: Instant) -> Result<tonic::Request<T>, Status> {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .min(self.timeout);
        if left.is_zero() {
            return Err(Status::deadline_exceeded(format!(
                "before calling remote {}",
                self.address
            )));
        }
        let mut request = tonic::Request::new(body);
        request.set_timeout(left);
        Ok(request)
    }

    /// Calls the remote through `call` (given a request carrying what is left of the
    /// deadline), retrying what `Failure` says is worth retrying, until `deadline`.
    async fn call<B, T, F, Fut>(
        &self,
        rpc: &str,
        body: B,
        deadline: Instant,
        mut call: F,
    ) -> Result<T, ScoreError>
    where
        B: Clone,
        F: FnMut(RewardClient, tonic::Request<B>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let what = format!("remote {} {rpc}", self.address);
        let attempts = retry(&what, RetryPolicy::default(), || {
            let request = self.request(body.clone(), deadline);
            let client = self.client.clone();
            let attempt = request.map(|r| call(client, r));
            async move { attempt?.await }
        });
        match tokio::time::timeout_at(deadline.into(), attempts).await {
            Ok(Ok(reply)) => Ok(reply.into_inner()),
            Ok(Err(status)) => Err(self.classify(status)),
            Err(_) => Err(ScoreError::DeadlineExceeded(format!(
                "waiting for remote {}",
                self.address
            ))),
        }
    }

    /// What the remote's final status (its message already names the remote and the call)
    /// means for our caller: its verdict on the request stands, a deadline stays a deadline,
    /// anything else is a failure of this objective.
    fn classify(&self, s: Status) -> ScoreError {
        match s.code() {
            tonic::Code::InvalidArgument => ScoreError::InvalidArgument(s.message().to_string()),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                ScoreError::DeadlineExceeded(s.message().to_string())
            }
            code => ScoreError::Objective {
                objective: String::new(),
                message: format!("{} ({code:?})", s.message()),
            },
        }
    }

    async fn index(&self, deadline: Instant) -> Result<usize, ScoreError> {
        self.index
            .get_or_try_init(|| async {
                let reply = self
                    .call(
                        "describe",
                        v1::DescribeRequest {},
                        deadline,
                        |mut c, r| async move { c.describe(r).await },
                    )
                    .await?;
                let names: Vec<&str> = reply.objectives.iter().map(|o| o.name.as_str()).collect();
                match &self.objective {
                    Some(want) => names.iter().position(|n| n == want).ok_or_else(|| {
                        self.failed(format!(
                            "has no objective `{want}` (it has: {})",
                            names.join(", ")
                        ))
                    }),
                    None if names.len() == 1 => Ok(0),
                    None => Err(self.failed(format!(
                        "has {} objectives ({}); set `objective` to pick one",
                        names.len(),
                        names.join(", ")
                    ))),
                }
            })
            .await
            .copied()
    }

    /// The remote's value of each sample.
    #[tracing::instrument(skip_all, fields(remote = %self.address, samples = samples.len()))]
    pub async fn score(
        &self,
        samples: &[Sample],
        deadline: Instant,
    ) -> Result<Vec<f32>, ScoreError> {
        let index = self.index(deadline).await?;
        let body = v1::ScoreRequest {
            samples: samples.iter().map(Sample::to_proto).collect(),
        };
        let reply = self
            .call("score", body, deadline, |mut c, r| async move {
                c.score(r).await
            })
            .await?;
        let scores = reply.scores;
        if scores.len() != samples.len() {
            return Err(self.failed(format!(
                "returned {} scores for {} samples",
                scores.len(),
                samples.len()
            )));
        }
        scores
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                s.values
                    .get(index)
                    .copied()
                    .ok_or_else(|| self.failed(format!("sample {i}: no value at index {index}")))
            })
            .collect()
    }
}
