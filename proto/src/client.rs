//! Client channels: every call has a deadline, every connection attempt a timeout.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

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

/// `http://` is added when the address has no scheme (`host:port`).
pub fn normalize_address(address: &str) -> String {
    if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    }
}

/// A lazily connecting channel: the first call connects, within `timeouts.connect`.
pub fn channel(address: &str, timeouts: Timeouts) -> Result<Channel, tonic::transport::Error> {
    Ok(endpoint(address, timeouts)?.connect_lazy())
}

/// An endpoint with our timeouts and keep-alives, for callers that connect eagerly.
pub fn endpoint(address: &str, timeouts: Timeouts) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(normalize_address(address))?
        .connect_timeout(timeouts.connect)
        .timeout(timeouts.request)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}
