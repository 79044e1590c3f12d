//! A `remote` objective: another `RewardService` computes the value, so rewards can be written in
//! any language that speaks gRPC.

use std::time::{Duration, Instant};

use rlhf_proto::client::{Timeouts, channel};
use rlhf_proto::v1;
use rlhf_proto::v1::reward_service_client::RewardServiceClient;
use tokio::sync::OnceCell;
use tonic::transport::Channel;

use crate::error::ScoreError;
use crate::sample::Sample;

/// A client of a remote reward server, bound to one of its objectives.
pub struct RemoteObjective {
    client: RewardServiceClient<Channel>,
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
        let channel = channel(address, timeouts).map_err(|e| format!("{address}: {e}"))?;
        Ok(RemoteObjective {
            client: RewardServiceClient::new(channel),
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
    fn request<T>(&self, body: T, deadline: Instant) -> Result<tonic::Request<T>, ScoreError> {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .min(self.timeout);
        if left.is_zero() {
            return Err(ScoreError::DeadlineExceeded(format!(
                "before calling remote {}",
                self.address
            )));
        }
        let mut request = tonic::Request::new(body);
        request.set_timeout(left);
        Ok(request)
    }

    async fn index(&self, deadline: Instant) -> Result<usize, ScoreError> {
        self.index
            .get_or_try_init(|| async {
                let request = self.request(v1::DescribeRequest {}, deadline)?;
                let reply = self
                    .client
                    .clone()
                    .describe(request)
                    .await
                    .map_err(|s| self.failed(status_text(&s)))?
                    .into_inner();
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
    pub async fn score(
        &self,
        samples: &[Sample],
        deadline: Instant,
    ) -> Result<Vec<f32>, ScoreError> {
        let index = self.index(deadline).await?;
        let body = v1::ScoreRequest {
            samples: samples.iter().map(Sample::to_proto).collect(),
        };
        let request = self.request(body, deadline)?;
        let reply = self
            .client
            .clone()
            .score(request)
            .await
            .map_err(|s| match s.code() {
                tonic::Code::InvalidArgument => {
                    ScoreError::InvalidArgument(format!("remote {}: {}", self.address, s.message()))
                }
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                    ScoreError::DeadlineExceeded(format!(
                        "remote {}: {}",
                        self.address,
                        s.message()
                    ))
                }
                _ => self.failed(status_text(&s)),
            })?;
        let scores = reply.into_inner().scores;
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

fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}
