//! One test suite for both state stores: the embedded one (in memory and persisted to a file)
//! and etcd (a real `etcd` from Debian's `etcd-server`, started on free loopback ports with a
//! temporary data directory).

use std::time::{Duration, Instant};

use rlhf_coordinator::store::embedded::EmbeddedStore;
use rlhf_coordinator::store::etcd::EtcdStore;
use rlhf_coordinator::store::{
    Expect, StateStore, WatchEvent, Write, Written, campaign, epoch, holds, leader,
};
use rlhf_tests::{Etcd, free_port};
use tokio::sync::mpsc::UnboundedReceiver;

async fn next(events: &mut UnboundedReceiver<WatchEvent>, within: Duration) -> WatchEvent {
    tokio::time::timeout(within, events.recv())
        .await
        .expect("a watch event in time")
        .expect("the watch is open")
}

/// Everything the control plane relies on, against any store. `ttl` is the lease TTL to test
/// expiry with (etcd's minimum is about 2 s).
async fn suite<S: StateStore + Clone + 'static>(store: S, ttl: Duration) {
    // Keys, values, prefixes.
    assert_eq!(store.get("jobs/a").await.unwrap(), None);
    store.put("jobs/a", "1", None).await.unwrap();
    store.put("jobs/b", "2", None).await.unwrap();
    store.put("workers/x", "w", None).await.unwrap();
    assert_eq!(store.get("jobs/a").await.unwrap().as_deref(), Some("1"));
    assert_eq!(
        store.list("jobs/").await.unwrap(),
        vec![("jobs/a".into(), "1".into()), ("jobs/b".into(), "2".into())]
    );
    assert!(store.delete("jobs/b").await.unwrap());
    assert!(!store.delete("jobs/b").await.unwrap());

    // Create is atomic create-if-absent.
    assert!(store.create("ids/next", "7", None).await.unwrap());
    assert!(!store.create("ids/next", "8", None).await.unwrap());
    assert_eq!(store.get("ids/next").await.unwrap().as_deref(), Some("7"));

    // Replace is atomic compare-and-set on the value.
    assert!(store.replace("ids/next", "7", "9").await.unwrap());
    assert!(!store.replace("ids/next", "7", "10").await.unwrap());
    assert!(!store.replace("ids/none", "", "1").await.unwrap());
    assert_eq!(store.get("ids/next").await.unwrap().as_deref(), Some("9"));

    // Watches see puts and deletes under their prefix only.
    let mut events = store.watch("jobs/").await.unwrap();
    store.put("workers/y", "ignored", None).await.unwrap();
    store.put("jobs/c", "3", None).await.unwrap();
    store.delete("jobs/c").await.unwrap();
    let second = Duration::from_secs(5);
    assert_eq!(
        next(&mut events, second).await,
        WatchEvent::Put {
            key: "jobs/c".into(),
            value: "3".into()
        }
    );
    assert_eq!(
        next(&mut events, second).await,
        WatchEvent::Delete {
            key: "jobs/c".into()
        }
    );

    // A leased key lives while the lease is kept alive and goes (with a delete event) after.
    let mut workers = store.watch("workers/").await.unwrap();
    let lease = store.grant_lease(ttl).await.unwrap();
    store
        .put("workers/live", "actor", Some(lease))
        .await
        .unwrap();
    assert!(matches!(
        next(&mut workers, second).await,
        WatchEvent::Put { .. }
    ));
    let until = Instant::now() + ttl * 2;
    while Instant::now() < until {
        store.keep_alive(lease).await.unwrap();
        tokio::time::sleep(ttl / 4).await;
    }
    assert_eq!(
        store.get("workers/live").await.unwrap().as_deref(),
        Some("actor")
    );
    let gone = next(&mut workers, ttl * 4).await;
    assert_eq!(
        gone,
        WatchEvent::Delete {
            key: "workers/live".into()
        }
    );
    assert_eq!(store.get("workers/live").await.unwrap(), None);
    assert!(
        store.keep_alive(lease).await.is_err(),
        "an expired lease cannot be renewed"
    );
    assert!(store.put("workers/late", "x", Some(lease)).await.is_err());

    // Election: one holder; a standby takes over when the holder's lease is revoked.
    let first = store.grant_lease(ttl * 10).await.unwrap();
    let fence = campaign(&store, "coordinator", "c1", first).await.unwrap();
    assert_eq!(fence.epoch, 1, "the store's first leader");
    assert!(holds(&store, &fence).await.unwrap());
    // Fenced writes: made while the fence holds, with the key's expectation checked.
    let put = |key: &'static str, value: &'static str| Write::Put {
        key,
        value,
        lease: None,
    };
    assert_eq!(
        store
            .write_fenced(&fence, Expect::Absent, put("jobs/f", "1"))
            .await
            .unwrap(),
        Written::Done
    );
    assert_eq!(
        store
            .write_fenced(&fence, Expect::Absent, put("jobs/f", "2"))
            .await
            .unwrap(),
        Written::Mismatch
    );
    assert_eq!(
        store
            .write_fenced(&fence, Expect::Value("1"), put("jobs/f", "2"))
            .await
            .unwrap(),
        Written::Done
    );
    assert_eq!(store.get("jobs/f").await.unwrap().as_deref(), Some("2"));
    assert_eq!(
        leader(&store, "coordinator").await.unwrap().as_deref(),
        Some("c1")
    );
    let standby_lease = store.grant_lease(ttl * 10).await.unwrap();
    let standby = {
        let store = store.clone();
        tokio::spawn(async move { campaign(&store, "coordinator", "c2", standby_lease).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!standby.is_finished(), "the standby waits while c1 holds");
    store.revoke(first).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), standby)
        .await
        .expect("the standby takes over")
        .unwrap()
        .unwrap();
    assert_eq!(
        leader(&store, "coordinator").await.unwrap().as_deref(),
        Some("c2")
    );
    // The old holder's writes no longer land, whatever they expect; the new holder's do.
    assert!(!holds(&store, &fence).await.unwrap());
    for (expect, write) in [
        (Expect::Any, put("jobs/f", "stale")),
        (Expect::Value("2"), put("jobs/f", "stale")),
        (Expect::Absent, put("jobs/g", "stale")),
        (Expect::Any, Write::Delete { key: "jobs/f" }),
    ] {
        assert_eq!(
            store.write_fenced(&fence, expect, write).await.unwrap(),
            Written::Fenced,
            "{write:?}"
        );
    }
    assert_eq!(store.get("jobs/f").await.unwrap().as_deref(), Some("2"));
    assert_eq!(store.get("jobs/g").await.unwrap(), None);
    assert_eq!(
        (second.epoch, epoch(&store, "coordinator").await.unwrap()),
        (2, 2)
    );
    assert_eq!(
        store
            .write_fenced(&second, Expect::Value("2"), put("jobs/f", "3"))
            .await
            .unwrap(),
        Written::Done
    );
    // The same name elected again is a new holder: the old fence stays void.
    store.revoke(standby_lease).await.unwrap();
    let again = store.grant_lease(ttl * 10).await.unwrap();
    let third = campaign(&store, "coordinator", "c1", again).await.unwrap();
    assert_eq!(third.epoch, 3);
    assert_ne!(third.revision, fence.revision);
    assert_eq!(
        store
            .write_fenced(&fence, Expect::Any, put("jobs/f", "stale"))
            .await
            .unwrap(),
        Written::Fenced
    );
    store.revoke(again).await.unwrap();
}

#[tokio::test]
async fn embedded_store_in_memory() {
    suite(
        EmbeddedStore::open(None).unwrap(),
        Duration::from_millis(400),
    )
    .await;
}

#[tokio::test]
async fn embedded_store_persists_state_but_not_liveness() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state/store.json");
    {
        let store = EmbeddedStore::open(Some(&file)).unwrap();
        suite(store.clone(), Duration::from_millis(400)).await;
        let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
        store.put("workers/z", "alive", Some(lease)).await.unwrap();
    }
    // A restarted coordinator finds its state; leased keys were liveness and are gone.
    let reopened = EmbeddedStore::open(Some(&file)).unwrap();
    assert_eq!(reopened.get("jobs/a").await.unwrap().as_deref(), Some("1"));
    assert_eq!(
        reopened.get("ids/next").await.unwrap().as_deref(),
        Some("9")
    );
    // One process per state file.
    let second = EmbeddedStore::open(Some(&file))
        .err()
        .expect("the file is locked");
    assert!(format!("{second:#}").contains("in use"), "{second:#}");
    assert_eq!(reopened.get("workers/z").await.unwrap(), None);
    assert_eq!(reopened.get("elections/coordinator").await.unwrap(), None);
    drop(reopened);
    std::fs::write(&file, "{ torn").unwrap();
    let err = EmbeddedStore::open(Some(&file))
        .err()
        .expect("a corrupt file is an error");
    assert!(format!("{err:#}").contains("store.json"), "{err:#}");
}

/// Connects once etcd answers.
async fn connect(etcd: &Etcd, prefix: &str) -> EtcdStore {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = EtcdStore::connect(
            std::slice::from_ref(&etcd.endpoint),
            prefix,
            Duration::from_secs(2),
        )
        .await;
        if let Ok(store) = attempt
            && store.get("ping").await.is_ok()
        {
            return store;
        }
        assert!(
            Instant::now() < deadline,
            "etcd did not come up at {}",
            etcd.endpoint
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn etcd_store() {
    let etcd = Etcd::start();
    let store = connect(&etcd, "/rlhf-test/").await;
    suite(store, Duration::from_secs(2)).await;
    // Keys live under the prefix: another prefix sees nothing of them.
    let other = connect(&etcd, "/other/").await;
    assert_eq!(other.list("").await.unwrap(), vec![]);
}

#[tokio::test]
async fn etcd_unreachable_is_a_timely_error() {
    let port = free_port();
    let started = Instant::now();
    let result = EtcdStore::connect(
        &[format!("127.0.0.1:{port}")],
        "/x/",
        Duration::from_secs(1),
    )
    .await;
    match result {
        Err(e) => assert!(format!("{e:#}").contains("etcd"), "{e:#}"),
        Ok(store) => assert!(store.get("k").await.is_err()),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
}
