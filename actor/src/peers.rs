//! The reward servers and learners a request names, as typed clients built once per address
//! with `rlhf_proto::client` (its timeouts, message limits and trace-context interceptor) and
//! reused by later requests. Channels connect lazily, so a peer that is down now only fails the
//! calls made to it.

use std::collections::HashMap;
use std::sync::Mutex;

use rlhf_proto::client::{self, LearnerClient, RewardClient, Timeouts};
use tonic::Status;

/// Builds a client of `address`.
type Build<C> = fn(&str, Timeouts) -> Result<C, tonic::transport::Error>;

/// One client per address of one service.
struct Clients<C> {
    build: Build<C>,
    by_address: Mutex<HashMap<String, C>>,
}

impl<C: Clone> Clients<C> {
    fn new(build: Build<C>) -> Self {
        Clients {
            build,
            by_address: Mutex::new(HashMap::new()),
        }
    }

    /// The client of `address`; a malformed address is an `INVALID_ARGUMENT` naming `field`.
    fn get(&self, field: &str, address: &str) -> Result<C, Status> {
        let mut map = self
            .by_address
            .lock()
            .expect("the client cache is never poisoned");
        if let Some(c) = map.get(address) {
            return Ok(c.clone());
        }
        let c = (self.build)(address, Timeouts::default())
            .map_err(|e| Status::invalid_argument(format!("{field} `{address}`: {e}")))?;
        map.insert(address.to_string(), c.clone());
        Ok(c)
    }
}

/// The clients of the actor's peers.
pub struct Peers {
    rewards: Clients<RewardClient>,
    learners: Clients<LearnerClient>,
}

impl Default for Peers {
    fn default() -> Self {
        Peers {
            rewards: Clients::new(client::reward),
            learners: Clients::new(client::learner),
        }
    }
}

impl Peers {
    /// The reward server at `address` (the request's `reward_address`).
    pub fn reward(&self, address: &str) -> Result<RewardClient, Status> {
        self.rewards.get("reward_address", address)
    }

    /// The learners at `addresses` (the request's `learner_addresses`), with their addresses.
    pub fn learners(&self, addresses: &[String]) -> Result<Vec<(String, LearnerClient)>, Status> {
        addresses
            .iter()
            .map(|a| Ok((a.clone(), self.learners.get("learner_addresses", a)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn clients_are_cached_per_address_and_bad_addresses_name_the_field() {
        let peers = Peers::default();
        peers.reward("127.0.0.1:9").unwrap();
        peers.reward("127.0.0.1:9").unwrap();
        peers.reward("http://127.0.0.1:10").unwrap();
        assert_eq!(peers.rewards.by_address.lock().unwrap().len(), 2);
        let err = peers.learners(&["not a uri".into()]).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().starts_with("learner_addresses `not a uri`"),
            "{err:?}"
        );
    }
}
