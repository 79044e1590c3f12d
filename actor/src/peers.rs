//! The reward servers and learners a request names, as typed clients built once per address
//! with `rlhf_proto::client` (its timeouts, message limits and trace-context interceptor) and
//! reused by later requests. Channels connect lazily, so a peer that is down now only fails the
//! calls made to it.
//!
//! A reward server replica also carries its count of Score calls in flight, shared by every
//! request that names its address, so that [`crate::rollout::Scorer`] can send each call to the
//! least loaded replica.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

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

/// One reward server replica: its address, its client, and the Score calls in flight on it
/// from every request of this actor.
#[derive(Clone)]
pub struct RewardReplica {
    pub address: String,
    pub client: RewardClient,
    pub in_flight: Arc<AtomicUsize>,
}

fn reward_replica(
    address: &str,
    timeouts: Timeouts,
) -> Result<RewardReplica, tonic::transport::Error> {
    Ok(RewardReplica {
        address: address.to_string(),
        client: client::reward(address, timeouts)?,
        in_flight: Arc::default(),
    })
}

/// The clients of the actor's peers.
pub struct Peers {
    rewards: Clients<RewardReplica>,
    learners: Clients<LearnerClient>,
    /// Score calls started by this actor: breaks ties between equally loaded replicas in
    /// round-robin order.
    reward_turn: Arc<AtomicUsize>,
}

impl Default for Peers {
    fn default() -> Self {
        Peers {
            rewards: Clients::new(reward_replica),
            learners: Clients::new(client::learner),
            reward_turn: Arc::default(),
        }
    }
}

impl Peers {
    /// The reward server replicas at `addresses` (the request's `reward_addresses`).
    pub fn rewards(&self, addresses: &[String]) -> Result<Vec<RewardReplica>, Status> {
        addresses
            .iter()
            .map(|a| self.rewards.get("reward_addresses", a))
            .collect()
    }

    /// The actor-wide counter of Score calls, for round-robin tie-breaks.
    pub fn reward_turn(&self) -> Arc<AtomicUsize> {
        self.reward_turn.clone()
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
        let a = peers.rewards(&["127.0.0.1:9".into()]).unwrap();
        let b = peers
            .rewards(&["127.0.0.1:9".into(), "http://127.0.0.1:10".into()])
            .unwrap();
        assert_eq!(peers.rewards.by_address.lock().unwrap().len(), 2);
        assert_eq!(b[1].address, "http://127.0.0.1:10");
        assert!(
            Arc::ptr_eq(&a[0].in_flight, &b[0].in_flight),
            "requests naming one replica share its in-flight count"
        );
        let err = peers
            .rewards(&["127.0.0.1:9".into(), String::new()])
            .err()
            .unwrap();
        assert!(err.message().starts_with("reward_addresses ``"), "{err:?}");
        let err = peers.learners(&["not a uri".into()]).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().starts_with("learner_addresses `not a uri`"),
            "{err:?}"
        );
    }
}
