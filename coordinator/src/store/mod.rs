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
//!
//! **Fencing.** Winning the election gives a [`Fence`]: the election key's create revision
//! (new each time the key is created) and the leader's epoch (a counter the winner bumps). The
//! active coordinator makes every write through [`StateStore::write_fenced`], which applies it
//! only while the election key still has that revision (one etcd transaction; the same rule
//! under the embedded store's lock). A leader that was paused or cut off past its lease finds
//! its writes refused ([`Written::Fenced`]) and steps down; none of them lands.

pub mod embedded;
pub mod etcd;
pub mod fenced;

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

/// The proof of holding an election: writes made with it land only while it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The election key (relative to the store's prefix).
    pub key: String,
    /// The election key's create revision when this holder created it.
    pub revision: i64,
    /// The holder's leader epoch: 1 for the first leader of the store, one more per leader.
    pub epoch: u64,
}

/// A write made under a [`Fence`].
#[derive(Debug, Clone, Copy)]
pub enum Write<'a> {
    Put {
        key: &'a str,
        value: &'a str,
        lease: Option<LeaseId>,
    },
    Delete {
        key: &'a str,
    },
}

impl Write<'_> {
    pub fn key(&self) -> &str {
        match self {
            Write::Put { key, .. } | Write::Delete { key } => key,
        }
    }
}

/// What the written key must hold for a fenced write to be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect<'a> {
    Any,
    Absent,
    Value(&'a str),
}

/// What became of a fenced write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Done,
    /// The key did not hold what was expected (nothing written).
    Mismatch,
    /// The fence no longer holds: another holder won the election (nothing written).
    Fenced,
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
    /// The create revision of `key` (a new one each time it is created anew), if it exists.
    fn created(&self, key: &str) -> impl Future<Output = Result<Option<i64>>> + Send;
    /// Makes `write` only while `fence` holds and its key is as `expect` (atomic).
    fn write_fenced(
        &self,
        fence: &Fence,
        expect: Expect<'_>,
        write: Write<'_>,
    ) -> impl Future<Output = Result<Written>> + Send;
    /// Changes under `prefix` from now on, until the receiver is dropped.
    fn watch(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<mpsc::UnboundedReceiver<WatchEvent>>> + Send;
}

fn election_key(election: &str) -> String {
    format!("elections/{election}")
}

fn epoch_key(election: &str) -> String {
    format!("epochs/{election}")
}

/// Blocks until `candidate` holds `election`: its key is created with `lease`, so the
/// candidate keeps it while it keeps the lease alive, and loses it when it dies. Standbys wait
/// here and the first to create the key after the holder's goes takes over. Returns the
/// holder's fence, with the election's epoch bumped under it.
pub async fn campaign<S: StateStore>(
    store: &S,
    election: &str,
    candidate: &str,
    lease: LeaseId,
) -> Result<Fence> {
    let key = election_key(election);
    loop {
        // Watch before trying, so a release between the two is not missed.
        let mut events = store.watch(&key).await?;
        if store.create(&key, candidate, Some(lease)).await? {
            let revision = store
                .created(&key)
                .await?
                .ok_or_else(|| anyhow::anyhow!("{key} vanished as soon as it was won"))?;
            let fence = Fence {
                key,
                revision,
                epoch: 0,
            };
            let epoch = bump_epoch(store, &fence, election).await?;
            return Ok(Fence { epoch, ..fence });
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

/// Adds one to the election's epoch under `fence`; the new epoch.
async fn bump_epoch<S: StateStore>(store: &S, fence: &Fence, election: &str) -> Result<u64> {
    let key = epoch_key(election);
    for _ in 0..50 {
        let old = store.get(&key).await?;
        let n = match &old {
            Some(v) => v
                .parse::<u64>()
                .map_err(|_| anyhow::anyhow!("{key} holds `{v}`, not an epoch"))?,
            None => 0,
        };
        let expect = old.as_deref().map_or(Expect::Absent, Expect::Value);
        let next = (n + 1).to_string();
        let write = Write::Put {
            key: &key,
            value: &next,
            lease: None,
        };
        match store.write_fenced(fence, expect, write).await? {
            Written::Done => return Ok(n + 1),
            Written::Mismatch => continue,
            Written::Fenced => anyhow::bail!("lost {election} before its epoch was written"),
        }
    }
    anyhow::bail!("{key}: too many concurrent updates")
}

/// The election's current epoch (0 before its first leader).
pub async fn epoch<S: StateStore>(store: &S, election: &str) -> Result<u64> {
    Ok(store
        .get(&epoch_key(election))
        .await?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

/// Whether `fence` still holds (a read: for checks before acting outside the store).
pub async fn holds<S: StateStore>(store: &S, fence: &Fence) -> Result<bool> {
    Ok(store.created(&fence.key).await? == Some(fence.revision))
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
    async fn created(&self, key: &str) -> Result<Option<i64>> {
        delegate!(self, s => s.created(key))
    }
    async fn write_fenced(
        &self,
        fence: &Fence,
        expect: Expect<'_>,
        write: Write<'_>,
    ) -> Result<Written> {
        delegate!(self, s => s.write_fenced(fence, expect, write))
    }
    async fn watch(&self, prefix: &str) -> Result<mpsc::UnboundedReceiver<WatchEvent>> {
        delegate!(self, s => s.watch(prefix))
    }
}
