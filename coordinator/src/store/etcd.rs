//! The multi-machine store: etcd through `etcd-client`. Every key lives under the store's
//! prefix; every call has a timeout (connection and per request); leases map to etcd leases
//! (whole seconds, at least 1), watches to prefix watches forwarded by a task.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;

use super::{Expect, Fence, LeaseId, StateStore, WatchEvent, Write, Written};

/// An etcd-backed store. Cloning shares the connection.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    timeout: Duration,
}

impl EtcdStore {
    /// Connects to `endpoints` (e.g. `["127.0.0.1:2379"]`); keys go under `prefix`.
    pub async fn connect(endpoints: &[String], prefix: &str, timeout: Duration) -> Result<Self> {
        let options = ConnectOptions::new()
            .with_timeout(timeout)
            .with_connect_timeout(timeout);
        let client = tokio::time::timeout(timeout, Client::connect(endpoints, Some(options)))
            .await
            .map_err(|_| anyhow!("etcd {endpoints:?}: no connection within {timeout:?}"))?
            .with_context(|| format!("connecting to etcd at {endpoints:?}"))?;
        Ok(EtcdStore {
            client,
            prefix: prefix.to_string(),
            timeout,
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn strip<'a>(&self, key: &'a str) -> &'a str {
        key.strip_prefix(self.prefix.as_str()).unwrap_or(key)
    }

    /// Runs one etcd call with the store's timeout.
    async fn call<T>(
        &self,
        what: &str,
        f: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        tokio::time::timeout(self.timeout, f)
            .await
            .map_err(|_| anyhow!("etcd {what}: no answer within {:?}", self.timeout))?
            .with_context(|| format!("etcd {what}"))
    }
}

fn text(bytes: &[u8], key: &str) -> Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| anyhow!("etcd key {key}: value is not UTF-8"))
}

impl StateStore for EtcdStore {
    async fn put(&self, key: &str, value: &str, lease: Option<LeaseId>) -> Result<()> {
        let options = lease.map(|l| PutOptions::new().with_lease(l));
        let mut c = self.client.clone();
        self.call("put", c.put(self.key(key), value, options))
            .await?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<String>> {
        let mut c = self.client.clone();
        let reply = self.call("get", c.get(self.key(key), None)).await?;
        reply
            .kvs()
            .first()
            .map(|kv| text(kv.value(), key))
            .transpose()
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let mut c = self.client.clone();
        Ok(self
            .call("delete", c.delete(self.key(key), None))
            .await?
            .deleted()
            > 0)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let mut c = self.client.clone();
        let options = GetOptions::new().with_prefix();
        let reply = self
            .call("list", c.get(self.key(prefix), Some(options)))
            .await?;
        let mut out = reply
            .kvs()
            .iter()
            .map(|kv| {
                let key = text(kv.key(), prefix)?;
                Ok((self.strip(&key).to_string(), text(kv.value(), &key)?))
            })
            .collect::<Result<Vec<_>>>()?;
        out.sort();
        Ok(out)
    }

    async fn create(&self, key: &str, value: &str, lease: Option<LeaseId>) -> Result<bool> {
        let full = self.key(key);
        let options = lease.map(|l| PutOptions::new().with_lease(l));
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                full.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(full, value, options)]);
        let mut c = self.client.clone();
        Ok(self.call("create", c.txn(txn)).await?.succeeded())
    }

    async fn replace(&self, key: &str, old: &str, new: &str) -> Result<bool> {
        let full = self.key(key);
        let txn = Txn::new()
            .when(vec![Compare::value(full.clone(), CompareOp::Equal, old)])
            .and_then(vec![TxnOp::put(full, new, None)]);
        let mut c = self.client.clone();
        Ok(self.call("replace", c.txn(txn)).await?.succeeded())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let seconds = ttl.as_secs_f64().ceil().max(1.0) as i64;
        let mut c = self.client.clone();
        Ok(self
            .call("lease grant", c.lease_grant(seconds, None))
            .await?
            .id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let mut c = self.client.clone();
        let (mut keeper, mut replies) = self
            .call("lease keep-alive", c.lease_keep_alive(lease))
            .await?;
        self.call("lease keep-alive", keeper.keep_alive()).await?;
        match self.call("lease keep-alive", replies.message()).await? {
            Some(r) if r.ttl() > 0 => Ok(()),
            _ => bail!("lease {lease} not found (expired or revoked)"),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        let mut c = self.client.clone();
        self.call("lease revoke", c.lease_revoke(lease)).await?;
        Ok(())
    }

    async fn created(&self, key: &str) -> Result<Option<i64>> {
        let mut c = self.client.clone();
        let reply = self.call("get", c.get(self.key(key), None)).await?;
        Ok(reply.kvs().first().map(|kv| kv.create_revision()))
    }

    async fn write_fenced(
        &self,
        fence: &Fence,
        expect: Expect<'_>,
        write: Write<'_>,
    ) -> Result<Written> {
        let guard = self.key(&fence.key);
        let full = self.key(write.key());
        let mut when = vec![Compare::create_revision(
            guard.clone(),
            CompareOp::Equal,
            fence.revision,
        )];
        match expect {
            Expect::Any => {}
            Expect::Absent => {
                when.push(Compare::create_revision(full.clone(), CompareOp::Equal, 0))
            }
            Expect::Value(v) => when.push(Compare::value(full.clone(), CompareOp::Equal, v)),
        }
        let op = match write {
            Write::Put { value, lease, .. } => {
                TxnOp::put(full, value, lease.map(|l| PutOptions::new().with_lease(l)))
            }
            Write::Delete { .. } => TxnOp::delete(full, None),
        };
        // When it fails, the election key says which condition did.
        let txn = Txn::new()
            .when(when)
            .and_then(vec![op])
            .or_else(vec![TxnOp::get(guard, None)]);
        let mut c = self.client.clone();
        let reply = self.call("fenced write", c.txn(txn)).await?;
        if reply.succeeded() {
            return Ok(Written::Done);
        }
        let holds = reply.op_responses().into_iter().any(|r| match r {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .is_some_and(|kv| kv.create_revision() == fence.revision),
            _ => false,
        });
        Ok(if holds {
            Written::Mismatch
        } else {
            Written::Fenced
        })
    }

    async fn watch(&self, prefix: &str) -> Result<mpsc::UnboundedReceiver<WatchEvent>> {
        let mut c = self.client.clone();
        let options = WatchOptions::new().with_prefix();
        let mut stream = self
            .call("watch", c.watch(self.key(prefix), Some(options)))
            .await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let store = self.clone();
        tokio::spawn(async move {
            // Ends when the receiver is dropped or etcd closes the stream.
            while let Ok(Some(reply)) = stream.message().await {
                for event in reply.events() {
                    let Some(kv) = event.kv() else { continue };
                    let Ok(key) = String::from_utf8(kv.key().to_vec()) else {
                        continue;
                    };
                    let key = store.strip(&key).to_string();
                    let e = match event.event_type() {
                        EventType::Put => WatchEvent::Put {
                            value: String::from_utf8_lossy(kv.value()).into_owned(),
                            key,
                        },
                        EventType::Delete => WatchEvent::Delete { key },
                    };
                    if tx.send(e).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}
