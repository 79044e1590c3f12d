//! The control plane's state store: one trait, two implementations.
//!
//! - [`embedded::EmbeddedStore`]: one machine; kept in memory and persisted to a file (temp
//!   file, fsync, rename) so a restarted coordinator finds its jobs. Keys attached to a lease are
//!   liveness, not state: they are not persisted and vanish when the lease expires.
//! - [`etcd::EtcdStore`]: several machines; etcd through `etcd-client`, keys under a prefix,
//!   leases for worker liveness, watches, and the election of the active coordinator.
//!
//! Values are UTF-8 text (the control plane stores JSON). Keys given to a store are relative to
//! its prefix; keys it returns are too. The election ([`campaign`]) is written once on top of
//! the trait (create-if-absent with a lease, then wait for the holder's key to go), so both
//! stores share it and the shared test suite covers it.

pub mod embedded;
pub mod etcd;

use std::future::Future;
use std::time::Duration;

use anyhow::Result;
use tokio::sync::mpsc;

/// A lease: keys attached to it are deleted when it is revoked or not kept alive within its TTL.
pub type LeaseId = i64;

/// A change under a watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put { key: String, value: String },
    Delete { key: String },
}

impl WatchEvent {
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put { key, .. } | WatchEvent::Delete { key } => key,
        }
    }
}

/// What the control plane needs of its store.
pub trait StateStore: Send + Sync {
    /// Writes `key`, attached to `lease` when given.
    fn put(
        &self,
        key: &str,
        value: &str,
        lease: Option<LeaseId>,
    ) -> impl Future<Output = Result<()>> + Send;
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<String>>> + Send;
    /// Whether the key existed.
    fn delete(&self, key: &str) -> impl Future<Output = Result<bool>> + Send;
    /// Every key under `prefix`, in key order.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<(String, String)>>> + Send;
    /// Writes `key` only if it does not exist; whether it did the write (atomic).
    fn create(
        &self,
        key: &str,
        value: &str,
        lease: Option<LeaseId>,
    ) -> impl Future<Output = Result<bool>> + Send;
    /// Sets `key` to `new` only if its value is `old` (atomic compare-and-set, no lease);
    /// whether it did.
    fn replace(&self, key: &str, old: &str, new: &str)
    -> impl Future<Output = Result<bool>> + Send;
    fn grant_lease(&self, ttl: Duration) -> impl Future<Output = Result<LeaseId>> + Send;
    /// Renews a lease for another TTL; an error when it has already expired.
    fn keep_alive(&self, lease: LeaseId) -> impl Future<Output = Result<()>> + Send;
    fn revoke(&self, lease: LeaseId) -> impl Future<Output = Result<()>> + Send;
    /// Changes under `prefix` from now on, until the receiver is dropped.
    fn watch(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<mpsc::UnboundedReceiver<WatchEvent>>> + Send;
}

fn election_key(election: &str) -> String {
    format!("elections/{election}")
}

/// Blocks until `candidate` holds `election`: its key is created with `lease`, so the
/// candidate keeps it while it keeps the lease alive, and loses it when it dies. Standbys wait
/// here and the first to create the key after the holder's goes takes over.
pub async fn campaign<S: StateStore>(
    store: &S,
    election: &str,
    candidate: &str,
    lease: LeaseId,
) -> Result<()> {
    let key = election_key(election);
    loop {
        // Watch before trying, so a release between the two is not missed.
        let mut events = store.watch(&key).await?;
        if store.create(&key, candidate, Some(lease)).await? {
            return Ok(());
        }
        loop {
            match events.recv().await {
                Some(WatchEvent::Delete { key: k }) if k == key => break,
                Some(_) => {}
                None => anyhow::bail!("the store closed the watch on {key}"),
            }
        }
    }
}

/// The current holder of `election`, if any.
pub async fn leader<S: StateStore>(store: &S, election: &str) -> Result<Option<String>> {
    store.get(&election_key(election)).await
}

/// A store chosen at run time (`--store embedded:PATH | etcd://HOST:PORT[,HOST:PORT]`).
#[derive(Clone)]
pub enum AnyStore {
    Embedded(embedded::EmbeddedStore),
    Etcd(Box<etcd::EtcdStore>),
}

impl AnyStore {
    /// Opens a store from its URL; etcd keys go under `/rlhf/`.
    pub async fn open(url: &str) -> Result<AnyStore> {
        if let Some(path) = url.strip_prefix("embedded:") {
            let path = (!path.is_empty()).then(|| std::path::Path::new(path));
            return Ok(AnyStore::Embedded(embedded::EmbeddedStore::open(path)?));
        }
        if let Some(hosts) = url.strip_prefix("etcd://") {
            let endpoints: Vec<String> = hosts.split(',').map(str::to_string).collect();
            // etcd may still be starting (a cluster coming up together): retry for 30 s.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let attempt = async {
                    let store =
                        etcd::EtcdStore::connect(&endpoints, "/rlhf/", Duration::from_secs(5))
                            .await?;
                    store.get("coordinator-probe").await?;
                    Ok::<_, anyhow::Error>(store)
                }
                .await;
                match attempt {
                    Ok(store) => return Ok(AnyStore::Etcd(Box::new(store))),
                    Err(e) if std::time::Instant::now() >= deadline => return Err(e),
                    Err(e) => {
                        tracing::warn!("etcd not ready yet: {e:#}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }
        anyhow::bail!("--store {url}: expected embedded:PATH or etcd://HOST:PORT[,HOST:PORT]")
    }
}

/// Forwards each call to the chosen store.
macro_rules! delegate {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            AnyStore::Embedded($s) => $call.await,
            AnyStore::Etcd($s) => $call.await,
        }
    };
}

impl StateStore for AnyStore {
    async fn put(&self, key: &str, value: &str, lease: Option<LeaseId>) -> Result<()> {
        delegate!(self, s => s.put(key, value, lease))
    }
    async fn get(&self, key: &str) -> Result<Option<String>> {
        delegate!(self, s => s.get(key))
    }
    async fn delete(&self, key: &str) -> Result<bool> {
        delegate!(self, s => s.delete(key))
    }
    async fn list(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        delegate!(self, s => s.list(prefix))
    }
    async fn create(&self, key: &str, value: &str, lease: Option<LeaseId>) -> Result<bool> {
        delegate!(self, s => s.create(key, value, lease))
    }
    async fn replace(&self, key: &str, old: &str, new: &str) -> Result<bool> {
        delegate!(self, s => s.replace(key, old, new))
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        delegate!(self, s => s.grant_lease(ttl))
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        delegate!(self, s => s.keep_alive(lease))
    }
    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        delegate!(self, s => s.revoke(lease))
    }
    async fn watch(&self, prefix: &str) -> Result<mpsc::UnboundedReceiver<WatchEvent>> {
        delegate!(self, s => s.watch(prefix))
    }
}
