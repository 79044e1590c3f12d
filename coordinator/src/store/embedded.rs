//! The single-machine store: a map in memory, persisted to a JSON file after every change of a
//! lease-less key (written to a temporary file, fsynced, renamed, so a crash leaves the old or
//! the new file, never a torn one). Leases expire on a 50 ms reaper tick.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::sync::mpsc;

use super::{Expect, Fence, LeaseId, StateStore, WatchEvent, Write, Written};

struct Entry {
    value: String,
    lease: Option<LeaseId>,
    /// The store's revision when the key was created (kept by later writes, as in etcd).
    created: i64,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
}

#[derive(Default)]
struct Inner {
    data: BTreeMap<String, Entry>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    /// The last revision given to a created key.
    revision: i64,
    watchers: Vec<(String, mpsc::UnboundedSender<WatchEvent>)>,
}

impl Inner {
    fn notify(&mut self, event: WatchEvent) {
        self.watchers.retain(|(prefix, tx)| {
            !event.key().starts_with(prefix.as_str()) || tx.send(event.clone()).is_ok()
        });
    }

    fn remove(&mut self, key: &str) -> bool {
        let existed = self.data.remove(key).is_some();
        if existed {
            self.notify(WatchEvent::Delete { key: key.into() });
        }
        existed
    }

    fn drop_lease(&mut self, lease: LeaseId) {
        self.leases.remove(&lease);
        let keys: Vec<String> = self
            .data
            .iter()
            .filter(|(_, e)| e.lease == Some(lease))
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.remove(&k);
        }
    }

    fn expire(&mut self, now: Instant) {
        let expired: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.drop_lease(id);
        }
    }

    /// Sets `key` (creating it with the next revision when new) and tells the watchers.
    fn set(&mut self, key: &str, value: &str, lease: Option<LeaseId>) {
        let created = match self.data.get(key) {
            Some(e) => e.created,
            None => {
                self.revision += 1;
                self.revision
            }
        };
        self.data.insert(
            key.into(),
            Entry {
                value: value.into(),
                lease,
                created,
            },
        );
        self.notify(WatchEvent::Put {
            key: key.into(),
            value: value.into(),
        });
    }

    fn check_lease(&self, lease: Option<LeaseId>) -> Result<()> {
        match lease {
            Some(id) if !self.leases.contains_key(&id) => {
                bail!("lease {id} not found (expired or revoked)")
            }
            _ => Ok(()),
        }
    }
}

/// The embedded store. Cloning shares it.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Mutex<Inner>>,
    path: Option<PathBuf>,
    /// An exclusive lock on `<path>.lock` for the store's life: two coordinators on one state
    /// file would each think they are alone.
    _lock: Option<Arc<std::fs::File>>,
}

impl EmbeddedStore {
    /// A store persisted to `path` (read back when it exists), or in memory only. Must be called
    /// inside a tokio runtime (the lease reaper is a task).
    pub fn open(path: Option<&Path>) -> Result<EmbeddedStore> {
        // Locked before reading, so the state read is not one another coordinator is changing.
        let lock = match path {
            Some(p) => Some(Arc::new(lock_file(p)?)),
            None => None,
        };
        let mut inner = Inner {
            next_lease: 1,
            ..Default::default()
        };
        if let Some(p) = path
            && p.is_file()
        {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let map: BTreeMap<String, String> = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a state file", p.display()))?;
            for (revision, (k, value)) in (1..).zip(map) {
                let entry = Entry {
                    value,
                    lease: None,
                    created: revision,
                };
                inner.data.insert(k, entry);
                inner.revision = revision;
            }
        }
        let store = EmbeddedStore {
            inner: Arc::new(Mutex::new(inner)),
            path: path.map(Path::to_path_buf),
            _lock: lock,
        };
        let weak: Weak<Mutex<Inner>> = Arc::downgrade(&store.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                inner.lock().expect("not poisoned").expire(Instant::now());
            }
        });
        Ok(store)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> Result<T>) -> Result<T> {
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| anyhow!("store lock poisoned"))?;
        inner.expire(Instant::now());
        f(&mut inner)
    }

    /// Writes the lease-less keys, with `change` applied (`Some(value)`: set, `None`: removed),
    /// to the state file. Called before the change is made in memory, so a failed write leaves
    /// both as they were.
    fn persist(&self, inner: &Inner, key: &str, change: Option<&str>) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut map: BTreeMap<&str, &str> = inner
            .data
            .iter()
            .filter(|(_, e)| e.lease.is_none())
            .map(|(k, e)| (k.as_str(), e.value.as_str()))
            .collect();
        match change {
            Some(value) => map.insert(key, value),
            None => map.remove(key),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        crate::job::write_atomic(path, serde_json::to_string(&map)?.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }

    fn write(
        &self,
        key: &str,
        value: &str,
        lease: Option<LeaseId>,
        only_new: bool,
    ) -> Result<bool> {
        self.with(|inner| {
            if only_new && inner.data.contains_key(key) {
                return Ok(false);
            }
            self.put_locked(inner, key, value, lease)?;
            Ok(true)
        })
    }

    /// A put under the lock: persisted first (a lease-less key; a key that gains a lease
    /// leaves the file), then made in memory.
    fn put_locked(
        &self,
        inner: &mut Inner,
        key: &str,
        value: &str,
        lease: Option<LeaseId>,
    ) -> Result<()> {
        inner.check_lease(lease)?;
        let was_persistent = inner.data.get(key).is_some_and(|e| e.lease.is_none());
        if lease.is_none() {
            self.persist(inner, key, Some(value))?;
        } else if was_persistent {
            self.persist(inner, key, None)?;
        }
        inner.set(key, value, lease);
        Ok(())
    }

    /// A delete under the lock; whether the key existed.
    fn delete_locked(&self, inner: &mut Inner, key: &str) -> Result<bool> {
        if inner.data.get(key).is_some_and(|e| e.lease.is_none()) {
            self.persist(inner, key, None)?;
        }
        Ok(inner.remove(key))
    }
}

/// Takes the exclusive lock next to a state file.
fn lock_file(path: &Path) -> Result<std::fs::File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let lock_path = path.with_extension("lock");
    let file = std::fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    // A lock just released can still be held for a moment by a child forked (not yet exec'd)
    // while its fd was open, so a busy lock is retried for a second before it is an error.
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::WouldBlock) => bail!(
                "{} is in use by another process (a coordinator already runs on this state file)",
                path.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", lock_path.display()));
            }
        }
    }
}

/// How long a busy state-file lock is retried.
const LOCK_WAIT: Duration = Duration::from_secs(1);

impl StateStore for EmbeddedStore {
    async fn put(&self, key: &str, value: &str, lease: Option<LeaseId>) -> Result<()> {
        self.write(key, value, lease, false).map(|_| ())
    }

    async fn get(&self, key: &str) -> Result<Option<String>> {
        self.with(|inner| Ok(inner.data.get(key).map(|e| e.value.clone())))
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        self.with(|inner| self.delete_locked(inner, key))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        self.with(|inner| {
            Ok(inner
                .data
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, e)| (k.clone(), e.value.clone()))
                .collect())
        })
    }

    async fn create(&self, key: &str, value: &str, lease: Option<LeaseId>) -> Result<bool> {
        self.write(key, value, lease, true)
    }

    async fn replace(&self, key: &str, old: &str, new: &str) -> Result<bool> {
        self.with(|inner| {
            if inner.data.get(key).map(|e| e.value.as_str()) != Some(old) {
                return Ok(false);
            }
            self.put_locked(inner, key, new, None)?;
            Ok(true)
        })
    }

    async fn created(&self, key: &str) -> Result<Option<i64>> {
        self.with(|inner| Ok(inner.data.get(key).map(|e| e.created)))
    }

    async fn write_fenced(
        &self,
        fence: &Fence,
        expect: Expect<'_>,
        write: Write<'_>,
    ) -> Result<Written> {
        self.with(|inner| {
            if inner.data.get(&fence.key).map(|e| e.created) != Some(fence.revision) {
                return Ok(Written::Fenced);
            }
            let now = inner.data.get(write.key()).map(|e| e.value.as_str());
            let expected = match expect {
                Expect::Any => true,
                Expect::Absent => now.is_none(),
                Expect::Value(v) => now == Some(v),
            };
            if !expected {
                return Ok(Written::Mismatch);
            }
            match write {
                Write::Put { key, value, lease } => self.put_locked(inner, key, value, lease)?,
                Write::Delete { key } => {
                    self.delete_locked(inner, key)?;
                }
            }
            Ok(Written::Done)
        })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        self.with(|inner| {
            let id = inner.next_lease;
            inner.next_lease += 1;
            inner.leases.insert(
                id,
                Lease {
                    ttl,
                    deadline: Instant::now() + ttl,
                },
            );
            Ok(id)
        })
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.with(|inner| match inner.leases.get_mut(&lease) {
            Some(l) => {
                l.deadline = Instant::now() + l.ttl;
                Ok(())
            }
            None => bail!("lease {lease} not found (expired or revoked)"),
        })
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        self.with(|inner| {
            inner.drop_lease(lease);
            Ok(())
        })
    }

    async fn watch(&self, prefix: &str) -> Result<mpsc::UnboundedReceiver<WatchEvent>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.with(|inner| {
            inner.watchers.push((prefix.to_string(), tx));
            Ok(rx)
        })
    }
}
