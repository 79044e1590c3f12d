//! One typed client per service, built in one place: every call has a deadline, every
//! connection attempt a timeout, every message a size limit from [`limits`], and every call
//! carries the caller's trace context ([`crate::trace`]) and this process's bearer token, over
//! TLS when the process has a CA ([`crate::security`]). No crate builds a tonic client by hand.

use std::time::Duration;

use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::security;
use crate::trace::TraceContext;
use crate::v1::job_service_client::JobServiceClient;
use crate::v1::learner_service_client::LearnerServiceClient;
use crate::v1::reward_service_client::RewardServiceClient;
use crate::v1::rollout_service_client::RolloutServiceClient;
use crate::v1::worker_service_client::WorkerServiceClient;

/// Message-size limits of every service, for clients and servers alike.
pub mod limits {
    /// Bulk messages: weight chunks, trajectories, a learner's step report.
    pub const BULK: usize = 256 << 20;
    /// Replies of request/response services: completions, scores, job listings.
    pub const REPLY: usize = 64 << 20;
    /// Requests a client sends to a control-plane service (a job file, a heartbeat).
    pub const CONTROL: usize = 16 << 20;
}

/// Timeouts of a client channel.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// To establish the TCP/HTTP2 connection.
    pub connect: Duration,
    /// Whole-request deadline for unary calls (streams set their own per call).
    pub request: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(60),
        }
    }
}

impl Timeouts {
    /// The default connect timeout and a request deadline of `request`.
    pub fn request(request: Duration) -> Self {
        Timeouts {
            request,
            ..Timeouts::default()
        }
    }
}

/// `http://` is added when the address has no scheme (`host:port`); with TLS on
/// ([`security::current`]), `https://` is, and `http://` becomes `https://`: whether a channel
/// is encrypted is the process's setting, not each address's. An `https://` address without
/// TLS on stays as it is (and its calls fail: no CA to verify the server with), never downgraded.
pub fn normalize_address(address: &str) -> String {
    normalize_for(address, security::current().tls_on())
}

fn normalize_for(address: &str, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    // Schemes are case-insensitive (RFC 3986 §3.1): `HTTP://` is `http://` and gets TLS too.
    match address.split_once("://") {
        Some((s, rest)) if s.eq_ignore_ascii_case("http") => format!("{scheme}://{rest}"),
        Some((s, rest)) if s.eq_ignore_ascii_case("https") => format!("https://{rest}"),
        Some(_) => address.to_string(),
        None => format!("{scheme}://{address}"),
    }
}

/// Whether `address` (normalised) names this machine: `localhost` or a loopback IP.
fn is_loopback(address: &str) -> bool {
    let Ok(uri) = address.parse::<tonic::codegen::http::Uri>() else {
        return false;
    };
    match uri.host() {
        Some("localhost") => true,
        Some(h) => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

/// A lazily connecting channel: the first call connects, within `timeouts.connect`.
pub fn channel(address: &str, timeouts: Timeouts) -> Result<Channel, tonic::transport::Error> {
    Ok(endpoint(address, timeouts)?.connect_lazy())
}

/// An endpoint with our timeouts and keep-alives, for callers that connect eagerly.
pub fn endpoint(address: &str, timeouts: Timeouts) -> Result<Endpoint, tonic::transport::Error> {
    let security = security::current();
    let endpoint = Endpoint::from_shared(normalize_address(address))?;
    let endpoint = match &security.tls {
        Some(tls) => endpoint.tls_config(tls.client())?,
        None => endpoint,
    };
    Ok(endpoint
        .connect_timeout(timeouts.connect)
        .timeout(timeouts.request)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

/// What every call carries: the current trace context and this process's bearer token.
#[derive(Clone)]
pub struct Outgoing {
    authorization: Option<AsciiMetadataValue>,
}

impl Outgoing {
    /// The process's token for calls to `address`, unless that would send it in the clear to
    /// another machine (no TLS, not loopback, not `--insecure`): then none, and a warning
    /// (the call is refused as unauthenticated, which names the missing setting).
    fn for_address(address: &str) -> Outgoing {
        let security = security::current();
        let plaintext_beyond_loopback =
            !security.tls_on() && !security.insecure && !is_loopback(&normalize_address(address));
        let token = security.token.as_ref().filter(|_| {
            if plaintext_beyond_loopback {
                tracing::warn!(
                    address,
                    "not sending this process's token in plaintext to another machine: give the CA (RLHF_TLS_CA) or start with --insecure"
                );
            }
            !plaintext_beyond_loopback
        });
        Outgoing::with_token(token.map(String::as_str))
    }

    fn with_token(token: Option<&str>) -> Outgoing {
        let authorization = token.and_then(|t| {
            // Tokens are checked to be visible ASCII when loaded, so this always parses.
            AsciiMetadataValue::try_from(format!("Bearer {t}")).ok()
        });
        Outgoing { authorization }
    }
}

impl Interceptor for Outgoing {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let mut request = TraceContext.call(request)?;
        if let Some(a) = &self.authorization {
            request.metadata_mut().insert("authorization", a.clone());
        }
        Ok(request)
    }
}

/// A channel whose every call carries [`Outgoing`]'s metadata.
pub type Traced = InterceptedService<Channel, Outgoing>;

/// The rollout service of an actor.
pub type ActorClient = RolloutServiceClient<Traced>;
/// The training service of a learner rank.
pub type LearnerClient = LearnerServiceClient<Traced>;
/// The reward service.
pub type RewardClient = RewardServiceClient<Traced>;
/// A coordinator's job API.
pub type JobsClient = JobServiceClient<Traced>;
/// A coordinator's worker API.
pub type WorkersClient = WorkerServiceClient<Traced>;

fn traced(address: &str, timeouts: Timeouts) -> Result<Traced, tonic::transport::Error> {
    Ok(InterceptedService::new(
        channel(address, timeouts)?,
        Outgoing::for_address(address),
    ))
}

/// An actor's client: sends weight updates (bulk), receives completions.
pub fn actor(address: &str, timeouts: Timeouts) -> Result<ActorClient, tonic::transport::Error> {
    Ok(RolloutServiceClient::new(traced(address, timeouts)?)
        .max_encoding_message_size(limits::BULK)
        .max_decoding_message_size(limits::REPLY))
}

/// A learner rank's client: trajectories and weights are bulk both ways.
pub fn learner(
    address: &str,
    timeouts: Timeouts,
) -> Result<LearnerClient, tonic::transport::Error> {
    Ok(LearnerServiceClient::new(traced(address, timeouts)?)
        .max_encoding_message_size(limits::BULK)
        .max_decoding_message_size(limits::BULK))
}

/// The reward server's client.
pub fn reward(address: &str, timeouts: Timeouts) -> Result<RewardClient, tonic::transport::Error> {
    Ok(RewardServiceClient::new(traced(address, timeouts)?)
        .max_encoding_message_size(limits::REPLY)
        .max_decoding_message_size(limits::REPLY))
}

/// A reward server named by a job (`kind = "remote"`): outside the cluster's trust, so it never
/// gets the cluster's token, only `token` when one is given for it.
pub fn external_reward(
    address: &str,
    timeouts: Timeouts,
    token: Option<&str>,
) -> Result<RewardClient, tonic::transport::Error> {
    let channel = InterceptedService::new(channel(address, timeouts)?, Outgoing::with_token(token));
    Ok(RewardServiceClient::new(channel)
        .max_encoding_message_size(limits::REPLY)
        .max_decoding_message_size(limits::REPLY))
}

/// A coordinator's job API.
pub fn jobs(address: &str, timeouts: Timeouts) -> Result<JobsClient, tonic::transport::Error> {
    Ok(JobServiceClient::new(traced(address, timeouts)?)
        .max_encoding_message_size(limits::CONTROL)
        .max_decoding_message_size(limits::REPLY))
}

/// A coordinator's worker API.
pub fn workers(
    address: &str,
    timeouts: Timeouts,
) -> Result<WorkersClient, tonic::transport::Error> {
    Ok(WorkerServiceClient::new(traced(address, timeouts)?)
        .max_encoding_message_size(limits::CONTROL)
        .max_decoding_message_size(limits::REPLY))
}

#[cfg(test)]
mod tests {
    use super::normalize_for;

    #[test]
    fn the_scheme_follows_the_tls_setting() {
        assert_eq!(normalize_for("h:1", false), "http://h:1");
        assert_eq!(normalize_for("h:1", true), "https://h:1");
        assert_eq!(normalize_for("http://h:1", true), "https://h:1");
        assert_eq!(normalize_for("https://h:1", false), "https://h:1");
        assert_eq!(normalize_for("unix:///x", true), "unix:///x");
        assert_eq!(normalize_for("HTTP://h:1", true), "https://h:1");
        assert_eq!(normalize_for("HtTpS://h:1", false), "https://h:1");
    }

    #[test]
    fn loopback_addresses_are_told_apart_from_other_machines() {
        assert!(super::is_loopback("http://127.0.0.1:5"));
        assert!(super::is_loopback("http://127.0.2.1:5"));
        assert!(super::is_loopback("http://localhost:5"));
        assert!(super::is_loopback("http://[::1]:5"));
        assert!(!super::is_loopback("http://10.0.0.1:5"));
        assert!(!super::is_loopback("http://node-1:5"));
        assert!(!super::is_loopback("not a uri"));
    }
}
