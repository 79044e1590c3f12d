//! The writes a coordinator makes as the cluster's leader, fenced by its election.
//!
//! Before a coordinator leads (a standby serving the API: submits, cancels) its writes are
//! plain. Once it has won ([`FencedWriter::lead`]), every write goes through
//! [`StateStore::write_fenced`] under its [`Fence`]: a write refused because another coordinator
//! holds the election now means this one was paused or cut off past its lease, and it steps
//! down at once (the process exits with code 3), before any other of its tasks acts. None of a
//! deposed leader's writes lands.
//!
//! Acts outside the store that must not follow a lost election (a job's controller training a
//! step or appending its metrics line) call [`check_leading`] first: a read of the election
//! key against the process's fence. A process leads at most once, so the fence is the
//! process's (set by [`FencedWriter::lead`]); a process that never leads (`rlhf run`) has none
//! and checks nothing.

use std::sync::{Arc, OnceLock};

use anyhow::Result;

use super::{AnyStore, Expect, Fence, LeaseId, StateStore, Write, Written, holds};

/// Cloning shares the fence: the scheduler, the job runners and the pool write under one.
#[derive(Clone)]
pub struct FencedWriter {
    store: AnyStore,
    fence: Arc<OnceLock<Fence>>,
}

/// The leadership of this process, once it leads.
static PROCESS: OnceLock<FencedWriter> = OnceLock::new();

/// Steps down (exits) if this process led and no longer does; nothing for a process that never
/// led. `what` names the act, for the message.
pub async fn check_leading(what: &str) -> Result<()> {
    match PROCESS.get() {
        Some(writer) => writer.check(what).await,
        None => Ok(()),
    }
}

/// How a deposed leader leaves: at once, with the reason, so no task of it writes again.
fn step_down(fence: &Fence, what: &str) -> ! {
    let message = format!(
        "coordinator of leader epoch {} is no longer the leader ({what} refused: another \
         coordinator holds the election); stepping down",
        fence.epoch
    );
    tracing::error!("{message}");
    eprintln!("{message}");
    std::process::exit(3)
}

impl FencedWriter {
    pub fn new(store: AnyStore) -> FencedWriter {
        FencedWriter {
            store,
            fence: Arc::new(OnceLock::new()),
        }
    }

    /// From now on every write is fenced by `fence`, and this writer is the process's
    /// leadership for [`check_leading`] (set once: a process leads once).
    pub fn lead(&self, fence: Fence) {
        let _ = self.fence.set(fence);
        let _ = PROCESS.set(self.clone());
    }

    /// The leader epoch this coordinator writes under (0 while it does not lead).
    pub fn epoch(&self) -> u64 {
        self.fence.get().map_or(0, |f| f.epoch)
    }

    /// Steps down unless the fence still holds: for acts outside the store (a metrics line,
    /// a call that trains a step) that must not follow a lost election.
    pub async fn check(&self, what: &str) -> Result<()> {
        if let Some(fence) = self.fence.get()
            && !holds(&self.store, fence).await?
        {
            step_down(fence, what);
        }
        Ok(())
    }

    /// One write; whether the key was as expected (it was written) or not.
    async fn write(&self, expect: Expect<'_>, write: Write<'_>) -> Result<bool> {
        let Some(fence) = self.fence.get() else {
            return self.plain(expect, write).await;
        };
        match self.store.write_fenced(fence, expect, write).await? {
            Written::Done => Ok(true),
            Written::Mismatch => Ok(false),
            Written::Fenced => step_down(fence, &format!("writing {}", write.key())),
        }
    }

    async fn plain(&self, expect: Expect<'_>, write: Write<'_>) -> Result<bool> {
        let s = &self.store;
        match (expect, write) {
            (Expect::Any, Write::Put { key, value, lease }) => {
                s.put(key, value, lease).await.map(|()| true)
            }
            (Expect::Absent, Write::Put { key, value, lease }) => s.create(key, value, lease).await,
            (
                Expect::Value(old),
                Write::Put {
                    key,
                    value,
                    lease: None,
                },
            ) => s.replace(key, old, value).await,
            (Expect::Any, Write::Delete { key }) => s.delete(key).await.map(|_| true),
            (expect, write) => anyhow::bail!("no plain store write does {expect:?} then {write:?}"),
        }
    }

    pub async fn put(&self, key: &str, value: &str, lease: Option<LeaseId>) -> Result<()> {
        self.write(Expect::Any, Write::Put { key, value, lease })
            .await
            .map(|_| ())
    }

    /// Writes `key` only if it does not exist; whether it did.
    pub async fn create(&self, key: &str, value: &str) -> Result<bool> {
        let lease = None;
        self.write(Expect::Absent, Write::Put { key, value, lease })
            .await
    }

    /// Sets `key` to `new` only if it holds `old`; whether it did.
    pub async fn replace(&self, key: &str, old: &str, new: &str) -> Result<bool> {
        let (value, lease) = (new, None);
        self.write(Expect::Value(old), Write::Put { key, value, lease })
            .await
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        self.write(Expect::Any, Write::Delete { key })
            .await
            .map(|_| ())
    }
}
