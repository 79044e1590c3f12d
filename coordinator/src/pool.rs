//! The worker pool: workers that registered themselves (`rlhf worker --role R --coordinator
//! URL`), and the placement of job gangs onto them (the `static` and `slurm` launchers).
//!
//! Everything lives in the state store, so any coordinator can answer a worker and a standby
//! that takes over sees the pool as it was:
//! - `workers/<id>`: the worker (JSON [`Worker`]), attached to the worker's lease. Each heartbeat
//!   renews the lease; a worker that stops heartbeating vanishes with everything attached.
//! - `assignments/<worker>/<job>/<role>-<index>`: what the worker should run (JSON
//!   [`AssignmentSpec`]), attached to the worker's lease. Written by the active coordinator;
//!   the worker starts what is new, restarts what has a new generation, stops what is gone.
//! - `status/<worker>/<job>/<role>-<index>`: what the worker reports about it (starting, ready
//!   at a URL, exited and why), attached to the worker's lease.
//!
//! Paths in assignments (configs, models, checkpoints, logs) are on a filesystem the
//! coordinator and the workers share, as on a Slurm cluster or a Kubernetes volume.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rlhf_proto::v1;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::controller::{Endpoints, Supervisor};
use crate::launcher::WorkerCommand;
use crate::state::now;
use crate::store::{AnyStore, LeaseId, StateStore};

const WORKERS: &str = "workers/";
const ASSIGNMENTS: &str = "assignments/";
const STATUS: &str = "status/";

/// The shortest worker lease: a few heartbeats.
pub const MIN_TTL: Duration = Duration::from_secs(2);

/// A registered worker, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Worker {
    pub id: String,
    pub role: String,
    pub node: String,
    pub address: String,
    pub devices: Vec<String>,
    pub capacity: u32,
    pub registered: f64,
    pub last_heartbeat: f64,
    pub lease: LeaseId,
}

/// One service process a worker should run, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssignmentSpec {
    pub job: String,
    pub role: String,
    pub index: u32,
    pub args: Vec<String>,
    pub log_path: String,
    pub generation: u64,
}

impl AssignmentSpec {
    /// `<job>/<role>-<index>`.
    pub fn id(&self) -> String {
        format!("{}/{}-{}", self.job, self.role, self.index)
    }

    fn to_proto(&self) -> v1::Assignment {
        v1::Assignment {
            id: self.id(),
            job: self.job.clone(),
            role: self.role.clone(),
            index: self.index,
            args: self.args.clone(),
            log_path: self.log_path.clone(),
            generation: self.generation,
        }
    }
}

/// What a worker reported about an assignment, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub generation: u64,
    pub state: String,
    pub url: String,
    pub detail: String,
    #[serde(default)]
    pub pid: u32,
}

impl Status {
    fn from_proto(s: &v1::AssignmentStatus) -> Status {
        Status {
            generation: s.generation,
            state: s.state.clone(),
            url: s.url.clone(),
            detail: s.detail.clone(),
            pid: s.pid,
        }
    }
}

/// A worker left the pool before its part of a gang was ready: the job can be placed again.
#[derive(Debug)]
pub struct WorkerLeft(pub String);

impl std::fmt::Display for WorkerLeft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WorkerLeft {}

/// Why a heartbeat was refused.
#[derive(Debug)]
pub enum HeartbeatError {
    /// The worker is not registered (its lease expired): it must register again.
    Unknown(String),
    Store(anyhow::Error),
}

/// Where one of a job's worker commands was placed.
#[derive(Debug, Clone)]
pub struct Placement {
    pub worker: String,
    pub spec: AssignmentSpec,
}

impl Placement {
    fn key(&self, root: &str) -> String {
        format!("{root}{}/{}", self.worker, self.spec.id())
    }
}

/// The first generation of a new placement: the time in milliseconds, so a job placed again (by
/// a coordinator that took over) never matches what a worker still runs from before, and the
/// worker restarts it rather than keep a process the new controller knows nothing of.
fn placement_generation() -> u64 {
    (now() * 1000.0) as u64
}

/// The pool over a state store.
#[derive(Clone)]
pub struct Pool {
    store: AnyStore,
    /// A worker vanishes this long after its last heartbeat.
    ttl: Duration,
}

fn parse<T: for<'de> Deserialize<'de>>(key: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).with_context(|| format!("{key}: corrupt record"))
}

impl Pool {
    pub fn new(store: AnyStore, ttl: Duration) -> Pool {
        Pool {
            store,
            ttl: ttl.max(MIN_TTL),
        }
    }

    /// How long a worker stays registered without a heartbeat.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How often workers should heartbeat: five times per lease, at most once a second.
    pub fn heartbeat_every(&self) -> Duration {
        (self.ttl / 5).min(Duration::from_secs(1))
    }

    /// Adds a worker under a fresh lease; returns its id (`<node>-<role>-<n>`).
    pub async fn register(&self, r: &v1::RegisterWorkerRequest) -> Result<String> {
        if !["actor", "learner", "reward"].contains(&r.role.as_str()) {
            bail!("role `{}`: expected actor, learner or reward", r.role);
        }
        if r.capacity == 0 {
            bail!("capacity must be at least 1");
        }
        if r.node.is_empty() || r.node.contains('/') {
            bail!("node `{}`: must be non-empty and without `/`", r.node);
        }
        let lease = self.store.grant_lease(self.ttl).await?;
        for n in 1..=100_000u32 {
            let id = format!("{}-{}-{n}", r.node, r.role);
            let worker = Worker {
                id: id.clone(),
                role: r.role.clone(),
                node: r.node.clone(),
                address: r.address.clone(),
                devices: r.devices.clone(),
                capacity: r.capacity,
                registered: now(),
                last_heartbeat: now(),
                lease,
            };
            let key = format!("{WORKERS}{id}");
            if self
                .store
                .create(&key, &serde_json::to_string(&worker)?, Some(lease))
                .await?
            {
                return Ok(id);
            }
        }
        bail!("no free worker id for node {}", r.node)
    }

    async fn worker(&self, id: &str) -> Result<Option<Worker>> {
        let key = format!("{WORKERS}{id}");
        match self.store.get(&key).await? {
            Some(text) => Ok(Some(parse(&key, &text)?)),
            None => Ok(None),
        }
    }

    /// Removes a worker that is leaving (its lease is revoked: its record, assignments and
    /// statuses go with it). Unknown workers are ignored.
    pub async fn leave(&self, id: &str) -> Result<()> {
        if let Some(w) = self.worker(id).await? {
            self.store.revoke(w.lease).await?;
        }
        Ok(())
    }

    /// Renews the worker's lease, records what it reports, and returns what it should run.
    pub async fn heartbeat(
        &self,
        id: &str,
        statuses: &[v1::AssignmentStatus],
    ) -> Result<Vec<v1::Assignment>, HeartbeatError> {
        let unknown = || HeartbeatError::Unknown(format!("worker `{id}` is not registered"));
        let mut worker = self
            .worker(id)
            .await
            .map_err(HeartbeatError::Store)?
            .ok_or_else(unknown)?;
        if self.store.keep_alive(worker.lease).await.is_err() {
            return Err(unknown());
        }
        let lease = Some(worker.lease);
        worker.last_heartbeat = now();
        let store = |e: anyhow::Error| HeartbeatError::Store(e);
        let text = serde_json::to_string(&worker).map_err(|e| store(e.into()))?;
        self.store
            .put(&format!("{WORKERS}{id}"), &text, lease)
            .await
            .map_err(store)?;
        let known = self.statuses(id).await.map_err(store)?;
        for s in statuses {
            let status = Status::from_proto(s);
            if known.get(&s.id) != Some(&status) {
                let text = serde_json::to_string(&status).map_err(|e| store(e.into()))?;
                self.store
                    .put(&format!("{STATUS}{id}/{}", s.id), &text, lease)
                    .await
                    .map_err(store)?;
            }
        }
        Ok(self
            .assignments(id)
            .await
            .map_err(store)?
            .iter()
            .map(AssignmentSpec::to_proto)
            .collect())
    }

    async fn assignments(&self, worker: &str) -> Result<Vec<AssignmentSpec>> {
        self.store
            .list(&format!("{ASSIGNMENTS}{worker}/"))
            .await?
            .iter()
            .map(|(k, v)| parse(k, v))
            .collect()
    }

    /// Reported statuses of a worker's assignments, by assignment id.
    async fn statuses(&self, worker: &str) -> Result<BTreeMap<String, Status>> {
        let prefix = format!("{STATUS}{worker}/");
        self.store
            .list(&prefix)
            .await?
            .iter()
            .map(|(k, v)| Ok((k[prefix.len()..].to_string(), parse(k, v)?)))
            .collect()
    }

    /// Every worker with what it reported about its assignments.
    pub async fn list(&self) -> Result<Vec<v1::WorkerInfo>> {
        let mut out = Vec::new();
        for (key, text) in self.store.list(WORKERS).await? {
            let w: Worker = parse(&key, &text)?;
            let statuses = self.statuses(&w.id).await?;
            let assignments = self
                .assignments(&w.id)
                .await?
                .iter()
                .map(|a| {
                    let s = statuses
                        .get(&a.id())
                        .filter(|s| s.generation == a.generation);
                    v1::AssignmentStatus {
                        id: a.id(),
                        generation: a.generation,
                        state: s.map_or("assigned".into(), |s| s.state.clone()),
                        url: s.map(|s| s.url.clone()).unwrap_or_default(),
                        detail: s.map(|s| s.detail.clone()).unwrap_or_default(),
                        pid: s.map_or(0, |s| s.pid),
                    }
                })
                .collect();
            out.push(v1::WorkerInfo {
                id: w.id,
                role: w.role,
                node: w.node,
                address: w.address,
                devices: w.devices,
                capacity: w.capacity,
                registered_unix: w.registered,
                last_heartbeat_unix: w.last_heartbeat,
                assignments,
            });
        }
        Ok(out)
    }

    /// Workers of `role` with free capacity, most free first: (worker, free slots).
    async fn free(&self, role: &str) -> Result<Vec<(Worker, usize)>> {
        let mut free = Vec::new();
        for (key, text) in self.store.list(WORKERS).await? {
            let w: Worker = parse(&key, &text)?;
            if w.role != role {
                continue;
            }
            let used = self.assignments(&w.id).await?.len();
            let left = (w.capacity as usize).saturating_sub(used);
            if left > 0 {
                free.push((w, left));
            }
        }
        free.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.id.cmp(&b.0.id)));
        Ok(free)
    }

    /// Free capacity per role (for "waiting for workers" messages).
    pub async fn free_capacity(&self) -> Result<BTreeMap<String, usize>> {
        let mut out = BTreeMap::new();
        for role in ["reward", "learner", "actor"] {
            let n = self.free(role).await?.iter().map(|(_, n)| n).sum();
            out.insert(role.to_string(), n);
        }
        Ok(out)
    }

    /// Places every command of `job` on a worker of its role with free capacity, or none of them
    /// (gang placement): `Ok(None)` when the pool is too small right now. Only one caller may
    /// place at a time (the active coordinator's scheduling pass).
    pub async fn place(
        &self,
        job: &str,
        commands: &[WorkerCommand],
        logs: &std::path::Path,
    ) -> Result<Option<Vec<Placement>>> {
        let mut free: BTreeMap<&str, Vec<(Worker, usize)>> = BTreeMap::new();
        for c in commands {
            if !free.contains_key(c.role) {
                free.insert(c.role, self.free(c.role).await?);
            }
        }
        let mut chosen = Vec::new();
        for c in commands {
            let candidates = free.get_mut(c.role).expect("listed above");
            let Some(slot) = candidates.iter_mut().find(|(_, left)| *left > 0) else {
                return Ok(None);
            };
            slot.1 -= 1;
            chosen.push((slot.0.clone(), c));
        }
        let mut placements = Vec::new();
        for (worker, c) in chosen {
            let placement = Placement {
                worker: worker.id.clone(),
                spec: AssignmentSpec {
                    job: job.to_string(),
                    role: c.role.to_string(),
                    index: c.index as u32,
                    args: c.args.clone(),
                    log_path: logs.join(format!("{}.log", c.name())).display().to_string(),
                    generation: placement_generation(),
                },
            };
            if let Err(e) = self.assign(&placement, worker.lease).await {
                self.release(job).await?;
                return Err(e);
            }
            placements.push(placement);
        }
        Ok(Some(placements))
    }

    async fn assign(&self, p: &Placement, lease: LeaseId) -> Result<()> {
        self.store
            .put(
                &p.key(ASSIGNMENTS),
                &serde_json::to_string(&p.spec)?,
                Some(lease),
            )
            .await
            .with_context(|| format!("assigning {} to worker {}", p.spec.id(), p.worker))
    }

    /// Waits until every placement reports ready; returns their URLs in order. Fails when a
    /// worker vanishes or a process exits first, or after `timeout`.
    pub async fn wait_ready(
        &self,
        placements: &[Placement],
        timeout: Duration,
    ) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut urls = Vec::new();
            for p in placements {
                match self.status(p).await? {
                    Some(s) if s.state == "ready" => urls.push(s.url),
                    Some(s) if s.state == "exited" => bail!(
                        "{} on worker {} exited: {} (log: {})",
                        p.spec.id(),
                        p.worker,
                        s.detail,
                        p.spec.log_path
                    ),
                    _ if self.worker(&p.worker).await?.is_none() => {
                        return Err(WorkerLeft(format!(
                            "worker {} left the pool before {} was ready",
                            p.worker,
                            p.spec.id()
                        ))
                        .into());
                    }
                    _ => {}
                }
            }
            if urls.len() == placements.len() {
                return Ok(urls);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the job's workers were not ready within {timeout:?} (logs: {})",
                    placements
                        .first()
                        .map(|p| p.spec.log_path.as_str())
                        .unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The worker's report on this generation of the placement, if any.
    async fn status(&self, p: &Placement) -> Result<Option<Status>> {
        let key = p.key(STATUS);
        Ok(match self.store.get(&key).await? {
            Some(text) => {
                Some(parse::<Status>(&key, &text)?).filter(|s| s.generation == p.spec.generation)
            }
            None => None,
        })
    }

    /// Takes every assignment of `job` away from its worker (the workers stop the processes).
    pub async fn release(&self, job: &str) -> Result<()> {
        for (key, text) in self.store.list(ASSIGNMENTS).await? {
            let spec: AssignmentSpec = parse(&key, &text)?;
            if spec.job == job {
                self.store.delete(&key).await?;
                let status = format!("{STATUS}{}", &key[ASSIGNMENTS.len()..]);
                self.store.delete(&status).await?;
            }
        }
        Ok(())
    }

    /// Moves the placement to a new generation running `args`: on its worker while that is
    /// registered, else on a worker of its role with free capacity. False when there is none.
    async fn reassign(&self, p: &mut Placement, args: &[String]) -> Result<bool> {
        let worker = match self.worker(&p.worker).await? {
            Some(w) => w,
            None => match self.free(&p.spec.role).await?.into_iter().next() {
                Some((w, _)) => w,
                None => return Ok(false),
            },
        };
        p.worker = worker.id.clone();
        p.spec.args = args.to_vec();
        p.spec.generation += 1;
        self.assign(p, worker.lease).await?;
        Ok(true)
    }

    /// Restarts a placement with `args` ([`Pool::reassign`]), waiting up to `timeout` for a
    /// worker when none is free, then for the process to be ready; returns its URL.
    async fn restart(
        &self,
        p: &mut Placement,
        args: &[String],
        timeout: Duration,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        while !self.reassign(p, args).await? {
            if Instant::now() >= deadline {
                bail!(
                    "no {} worker registered within {timeout:?} to replace {}",
                    p.spec.role,
                    p.spec.id()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let urls = self
            .wait_ready(std::slice::from_ref(p), left.max(Duration::from_secs(60)))
            .await?;
        Ok(urls[0].clone())
    }

    /// Whether the placement needs replacing: its worker left or its process exited.
    async fn lost(&self, p: &Placement) -> Result<bool> {
        Ok(self.worker(&p.worker).await?.is_none()
            || self.status(p).await?.is_some_and(|s| s.state == "exited"))
    }
}

/// A job's gang on pool workers: where it serves, and the supervisor that replaces its dead
/// workers.
pub struct PoolGang {
    pub endpoints: Endpoints,
    pub supervisor: PoolSupervisor,
}

impl PoolGang {
    /// Waits for the placed processes and assembles the gang.
    pub async fn ready(
        pool: Pool,
        commands: Vec<WorkerCommand>,
        placements: Vec<Placement>,
        timeout: Duration,
    ) -> Result<PoolGang> {
        let urls = pool.wait_ready(&placements, timeout).await?;
        let mut endpoints = Endpoints::default();
        for (p, url) in placements.iter().zip(urls) {
            match p.spec.role.as_str() {
                "reward" => endpoints.reward = url,
                "learner" => endpoints.learners.push(url),
                _ => endpoints.actors.push(url),
            }
        }
        Ok(PoolGang {
            endpoints,
            supervisor: PoolSupervisor {
                pool,
                commands,
                placements: Mutex::new(placements),
                timeout,
            },
        })
    }
}

/// Replaces a job's dead pool workers: a learner is restarted (restoring its checkpoint) on its
/// worker, or on another learner worker when its worker left, waiting for one to register; an
/// actor whose worker left is placed on another actor worker with free capacity, and joins
/// once ready.
pub struct PoolSupervisor {
    pool: Pool,
    commands: Vec<WorkerCommand>,
    placements: Mutex<Vec<Placement>>,
    timeout: Duration,
}

#[tonic::async_trait]
impl Supervisor for PoolSupervisor {
    async fn replace_learner(&self, rank: usize) -> Result<String> {
        let command = self
            .commands
            .iter()
            .find(|c| c.role == "learner" && c.index == rank)
            .with_context(|| format!("no learner rank {rank}"))?
            .resuming();
        let mut placements = self.placements.lock().await;
        let p = placements
            .iter_mut()
            .find(|p| p.spec.role == "learner" && p.spec.index as usize == rank)
            .with_context(|| format!("learner rank {rank} was never placed"))?;
        self.pool.restart(p, &command.args, self.timeout).await
    }

    async fn new_actors(&self) -> Vec<String> {
        let mut joined = Vec::new();
        let mut placements = self.placements.lock().await;
        for p in placements.iter_mut().filter(|p| p.spec.role == "actor") {
            if !self.pool.lost(p).await.unwrap_or(false) {
                continue;
            }
            let args = p.spec.args.clone();
            match self.pool.reassign(p, &args).await {
                Ok(true) => {}
                Ok(false) => continue, // no actor worker free yet: tried again next step
                Err(e) => {
                    tracing::warn!("replacing actor {}: {e:#}", p.spec.id());
                    continue;
                }
            }
            match self
                .pool
                .wait_ready(std::slice::from_ref(p), self.timeout)
                .await
            {
                Ok(urls) => joined.push(urls[0].clone()),
                Err(e) => tracing::warn!("replacement actor {}: {e:#}", p.spec.id()),
            }
        }
        joined
    }
}
