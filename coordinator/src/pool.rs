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

use crate::controller::{Endpoints, Gang, Supervisor};
use crate::launcher::WorkerCommand;
use crate::state::now;
use crate::store::fenced::FencedWriter;
use crate::store::{AnyStore, LeaseId, StateStore};

const WORKERS: &str = "workers/";
const ASSIGNMENTS: &str = "assignments/";
const STATUS: &str = "status/";
/// `worker-seq/<node>-<role>`: the last worker number given (not leased: ids are never reused).
const WORKER_SEQ: &str = "worker-seq/";

/// The roles a worker can have.
pub const ROLES: [&str; 3] = ["actor", "learner", "reward"];

/// What a worker reports about an assignment's process.
pub use rlhf_proto::process::assignment_state as state;

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
    /// Learner workers: ports on `address` for data-parallel rings, one per slot.
    #[serde(default)]
    pub collective_ports: Vec<u32>,
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
    /// The worker's collective port this assignment uses (learner ranks of a ring), 0: none.
    #[serde(default)]
    pub collective_port: u32,
    /// The leader epoch of the coordinator that wrote this generation.
    #[serde(default)]
    pub epoch: u64,
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
            epoch: self.epoch,
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
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WorkerLeft(pub String);

/// Why a heartbeat was refused.
#[derive(Debug)]
pub enum HeartbeatError {
    /// The worker is not registered (its lease expired): it must register again.
    Unknown(String),
    Store(anyhow::Error),
}

/// A worker with free capacity: how many slots, and its collective ports no assignment uses.
struct Free {
    worker: Worker,
    left: usize,
    ports: Vec<u32>,
}

/// A worker chosen for one process of a gang, as the gang's commands need to know it.
#[derive(Debug, Clone)]
pub struct Chosen {
    pub role: String,
    pub worker: String,
    /// The host its processes bind.
    pub address: String,
    /// A collective port of the worker for this process, if it offers any (learners).
    pub collective_port: Option<u32>,
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
    /// The active coordinator's writes (assignments, releases), fenced once it leads; workers'
    /// own records (registration, heartbeats, statuses) are written plainly by any coordinator.
    writer: FencedWriter,
    /// Held from reading free capacity to writing the assignment, so the scheduler and the
    /// jobs' supervisors (which replace lost workers) never give away the same slot twice.
    placing: std::sync::Arc<Mutex<()>>,
    /// A worker vanishes this long after its last heartbeat.
    ttl: Duration,
}

fn parse<T: for<'de> Deserialize<'de>>(key: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).with_context(|| format!("{key}: corrupt record"))
}

/// The records of a listing that parse, with their keys; a corrupt one is reported and skipped
/// (one bad record must not stop scheduling).
fn parse_all<T: for<'de> Deserialize<'de>>(listing: Vec<(String, String)>) -> Vec<(String, T)> {
    listing
        .into_iter()
        .filter_map(|(k, v)| match parse(&k, &v) {
            Ok(t) => Some((k, t)),
            Err(e) => {
                tracing::warn!("skipping: {e:#}");
                None
            }
        })
        .collect()
}

impl Pool {
    pub fn new(store: AnyStore, ttl: Duration) -> Pool {
        Pool {
            writer: FencedWriter::new(store.clone()),
            store,
            placing: Default::default(),
            ttl: ttl.max(MIN_TTL),
        }
    }

    /// The active coordinator's fenced writes (shared by every clone of this pool).
    pub fn writer(&self) -> &FencedWriter {
        &self.writer
    }

    /// The cluster's current leader epoch, told to workers with every heartbeat.
    pub async fn leader_epoch(&self) -> Result<u64> {
        crate::store::epoch(&self.store, "coordinator").await
    }

    /// How long a worker stays registered without a heartbeat.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How often workers should heartbeat: five times per lease, at most once a second.
    pub fn heartbeat_every(&self) -> Duration {
        (self.ttl / 5).min(Duration::from_secs(1))
    }

    /// What is wrong with a registration, if anything.
    pub fn registration_problem(r: &v1::RegisterWorkerRequest) -> Option<String> {
        if !ROLES.contains(&r.role.as_str()) {
            return Some(format!(
                "role `{}`: expected one of {}",
                r.role,
                ROLES.join(", ")
            ));
        }
        if r.capacity == 0 {
            return Some("capacity must be at least 1".into());
        }
        if r.node.is_empty() || r.node.contains('/') {
            return Some(format!(
                "node `{}`: must be non-empty and without `/`",
                r.node
            ));
        }
        None
    }

    /// Adds a worker (checked with [`Pool::registration_problem`]) under a fresh lease; returns
    /// its id, `<node>-<role>-<n>`, never reused: a worker that registers again is a new worker,
    /// so nothing placed on the old one is mistaken for its.
    pub async fn register(&self, r: &v1::RegisterWorkerRequest) -> Result<String> {
        let lease = self.store.grant_lease(self.ttl).await?;
        let counter = format!("{WORKER_SEQ}{}-{}", r.node, r.role);
        loop {
            let n = self.next(&counter).await?;
            let id = format!("{}-{}-{n}", r.node, r.role);
            let worker = Worker {
                id: id.clone(),
                role: r.role.clone(),
                node: r.node.clone(),
                address: r.address.clone(),
                devices: r.devices.clone(),
                capacity: r.capacity,
                collective_ports: r.collective_ports.clone(),
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
    }

    /// Increments the counter at `key` (atomically); returns its new value.
    async fn next(&self, key: &str) -> Result<u64> {
        for _ in 0..100 {
            let done = match self.store.get(key).await? {
                None => self.store.create(key, "1", None).await?.then_some(1),
                Some(v) => {
                    let n: u64 = v.parse().with_context(|| format!("{key}: not a number"))?;
                    self.store
                        .replace(key, &v, &(n + 1).to_string())
                        .await?
                        .then_some(n + 1)
                }
            };
            if let Some(n) = done {
                return Ok(n);
            }
        }
        bail!("{key}: too many concurrent updates")
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
        if let Err(e) = self.store.keep_alive(worker.lease).await {
            // Expired (the record went with it) or the store failed: only the first means the
            // worker must stop its work and register again.
            return match self.worker(id).await {
                Ok(None) => Err(unknown()),
                _ => Err(HeartbeatError::Store(e)),
            };
        }
        let lease = Some(worker.lease);
        let heard = now();
        let store = |e: anyhow::Error| HeartbeatError::Store(e);
        let known = self.statuses(id).await.map_err(store)?;
        // Statuses of assignments the worker no longer runs (released, replaced) are dropped.
        for old in known
            .keys()
            .filter(|k| !statuses.iter().any(|s| &s.id == *k))
        {
            self.store
                .delete(&format!("{STATUS}{id}/{old}"))
                .await
                .map_err(store)?;
        }
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
        // The report first, then the time it was heard: whoever sees a heartbeat newer than a
        // moment also sees what the worker reported then
        // ([`PoolSupervisor::wait_for_current_reports`]).
        worker.last_heartbeat = heard;
        let text = serde_json::to_string(&worker).map_err(|e| store(e.into()))?;
        self.store
            .put(&format!("{WORKERS}{id}"), &text, lease)
            .await
            .map_err(store)?;
        Ok(self
            .assignments(id)
            .await
            .map_err(store)?
            .iter()
            .map(AssignmentSpec::to_proto)
            .collect())
    }

    async fn assignments(&self, worker: &str) -> Result<Vec<AssignmentSpec>> {
        let listing = self.store.list(&format!("{ASSIGNMENTS}{worker}/")).await?;
        Ok(parse_all(listing).into_iter().map(|(_, a)| a).collect())
    }

    /// Reported statuses of a worker's assignments, by assignment id.
    async fn statuses(&self, worker: &str) -> Result<BTreeMap<String, Status>> {
        let prefix = format!("{STATUS}{worker}/");
        let listing = self.store.list(&prefix).await?;
        Ok(parse_all(listing)
            .into_iter()
            .map(|(k, s)| (k[prefix.len()..].to_string(), s))
            .collect())
    }

    /// Every worker with what it reported about its assignments.
    pub async fn list(&self) -> Result<Vec<v1::WorkerInfo>> {
        let mut out = Vec::new();
        for (_, w) in parse_all::<Worker>(self.store.list(WORKERS).await?) {
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
                        state: s.map_or(state::ASSIGNED.into(), |s| s.state.clone()),
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

    /// Workers with free capacity by role, most free first (one listing of the pool).
    async fn free(&self) -> Result<BTreeMap<String, Vec<Free>>> {
        let mut free: BTreeMap<String, Vec<Free>> = BTreeMap::new();
        for (_, w) in parse_all::<Worker>(self.store.list(WORKERS).await?) {
            let taken = self.assignments(&w.id).await?;
            let left = (w.capacity as usize).saturating_sub(taken.len());
            let ports = w
                .collective_ports
                .iter()
                .copied()
                .filter(|p| !taken.iter().any(|a| a.collective_port == *p))
                .collect();
            if left > 0 {
                free.entry(w.role.clone()).or_default().push(Free {
                    worker: w,
                    left,
                    ports,
                });
            }
        }
        for workers in free.values_mut() {
            workers.sort_by(|a, b| b.left.cmp(&a.left).then(a.worker.id.cmp(&b.worker.id)));
        }
        Ok(free)
    }

    /// Free capacity per role (for "waiting for workers" messages).
    pub async fn free_capacity(&self) -> Result<BTreeMap<String, usize>> {
        let free = self.free().await?;
        Ok(ROLES
            .iter()
            .map(|role| {
                let n = free
                    .get(*role)
                    .map_or(0, |f| f.iter().map(|f| f.left).sum());
                (role.to_string(), n)
            })
            .collect())
    }

    /// Places a gang — one process per entry of `roles`, each on a worker of that role with
    /// free capacity — or nothing: `Ok(None)` when the pool is too small right now. A gang's
    /// processes of one role are spread over that role's workers (the one holding fewest of
    /// them, then the one with most room), so replicas and ranks do not all die with one
    /// worker. `build` makes the commands (in `roles`' order) once the workers are chosen, so
    /// they can name each other (a learner ring's peers). One placement at a time (see
    /// `placing`).
    pub async fn place(
        &self,
        job: &str,
        roles: &[&str],
        build: impl FnOnce(&[Chosen]) -> Result<Vec<WorkerCommand>>,
        logs: &std::path::Path,
    ) -> Result<Option<(Vec<WorkerCommand>, Vec<Placement>)>> {
        let _placing = self.placing.lock().await;
        let mut free = self.free().await?;
        let (mut chosen, mut leases) = (Vec::new(), Vec::new());
        for role in roles {
            let slot = free.get_mut(*role).and_then(|candidates| {
                candidates
                    .iter_mut()
                    .filter(|f| f.left > 0)
                    .min_by_key(|f| {
                        let mine = chosen
                            .iter()
                            .filter(|c: &&Chosen| c.worker == f.worker.id)
                            .count();
                        (mine, std::cmp::Reverse(f.left))
                    })
            });
            let Some(slot) = slot else {
                return Ok(None);
            };
            slot.left -= 1;
            leases.push(slot.worker.lease);
            chosen.push(Chosen {
                role: role.to_string(),
                worker: slot.worker.id.clone(),
                address: slot.worker.address.clone(),
                collective_port: (!slot.ports.is_empty()).then(|| slot.ports.remove(0)),
            });
        }
        let commands = build(&chosen)?;
        if commands.len() != chosen.len() {
            bail!(
                "{} commands for {} placed processes",
                commands.len(),
                chosen.len()
            );
        }
        let mut placements = Vec::new();
        for ((c, lease), command) in chosen.iter().zip(leases).zip(&commands) {
            let placement = Placement {
                worker: c.worker.clone(),
                spec: AssignmentSpec {
                    job: job.to_string(),
                    role: command.role.to_string(),
                    index: command.index as u32,
                    args: command.args.clone(),
                    log_path: logs
                        .join(format!("{}.log", command.name()))
                        .display()
                        .to_string(),
                    generation: placement_generation(),
                    collective_port: c.collective_port.unwrap_or(0),
                    epoch: 0, // stamped by `assign`
                },
            };
            if let Err(e) = self.assign(&placement, lease).await {
                self.release(job).await?;
                return Err(e);
            }
            placements.push(placement);
        }
        Ok(Some((commands, placements)))
    }

    /// Writes the placement's assignment, stamped with this coordinator's leader epoch.
    async fn assign(&self, p: &Placement, lease: LeaseId) -> Result<()> {
        let spec = AssignmentSpec {
            epoch: self.writer.epoch(),
            ..p.spec.clone()
        };
        self.writer
            .put(
                &p.key(ASSIGNMENTS),
                &serde_json::to_string(&spec)?,
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
                    Some(s) if s.state == state::READY => urls.push(s.url),
                    Some(s) if s.state == state::EXITED => bail!(
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
        self.release_where(|j| j == job).await
    }

    /// Takes away every assignment whose job matches `pred` (one listing of all assignments).
    pub async fn release_where(&self, pred: impl Fn(&str) -> bool) -> Result<()> {
        for (key, spec) in parse_all::<AssignmentSpec>(self.store.list(ASSIGNMENTS).await?) {
            if pred(&spec.job) {
                tracing::info!(job = spec.job, "releasing {}", spec.id());
                self.writer.delete(&key).await?;
                let status = format!("{STATUS}{}", &key[ASSIGNMENTS.len()..]);
                self.writer.delete(&status).await?;
            }
        }
        Ok(())
    }

    /// Moves the placement to a new generation running `args`: on its worker while that is
    /// registered, else on a worker of its role with free capacity. False when there is none.
    async fn reassign(&self, p: &mut Placement, args: &[String]) -> Result<bool> {
        let _placing = self.placing.lock().await;
        let worker = match self.worker(&p.worker).await? {
            Some(w) => w,
            None => {
                let free = self.free().await?.remove(&p.spec.role);
                match free.and_then(|f| f.into_iter().next()) {
                    Some(f) => f.worker,
                    None => return Ok(false),
                }
            }
        };
        p.worker = worker.id.clone();
        p.spec.args = args.to_vec();
        p.spec.generation += 1;
        self.assign(p, worker.lease).await?;
        Ok(true)
    }

    /// The placement's URL if its process is ready now; an error if it exited (saying why) or
    /// its worker left (it is lost again).
    async fn ready_now(&self, p: &Placement) -> Result<Option<String>> {
        if self.worker(&p.worker).await?.is_none() {
            bail!(
                "worker {} left the pool while {} was starting",
                p.worker,
                p.spec.id()
            );
        }
        match self.status(p).await? {
            Some(s) if s.state == state::READY => Ok(Some(s.url)),
            Some(s) if s.state == state::EXITED => bail!(
                "{} on worker {} exited while starting: {} (log: {})",
                p.spec.id(),
                p.worker,
                s.detail,
                p.spec.log_path
            ),
            _ => Ok(None),
        }
    }

    /// Moves every rank of a learner ring (`ranks`: indices into `placements`, in rank order)
    /// to a new generation running `args[rank]`, all at once: each on its worker while that is
    /// registered (the same collective port), else on a learner worker with a free slot (and,
    /// for a ring, a free collective port), the ring's addresses then rewritten in every rank's
    /// configuration. The workers kill what the ranks ran before (the survivors of a ring
    /// with a dead rank). False, and nothing changed, when a rank has no worker to go to.
    async fn reassign_ring(
        &self,
        placements: &mut [Placement],
        ranks: &[usize],
        args: &[Vec<String>],
    ) -> Result<bool> {
        let _placing = self.placing.lock().await;
        let ring = ranks.len() > 1;
        let mut free: Option<Vec<Free>> = None;
        let mut plan: Vec<(Worker, u32)> = Vec::new();
        for &i in ranks {
            let p = &placements[i];
            if let Some(w) = self.worker(&p.worker).await? {
                plan.push((w, p.spec.collective_port));
                continue;
            }
            if free.is_none() {
                free = Some(self.free().await?.remove("learner").unwrap_or_default());
            }
            let candidates = free.as_mut().expect("just listed");
            let Some(f) = candidates
                .iter_mut()
                .find(|f| f.left > 0 && (!ring || !f.ports.is_empty()))
            else {
                return Ok(false);
            };
            f.left -= 1;
            let port = if ring { f.ports.remove(0) } else { 0 };
            plan.push((f.worker.clone(), port));
        }
        let moved = plan
            .iter()
            .zip(ranks)
            .any(|((w, _), &i)| w.id != placements[i].worker);
        if ring && moved {
            let peers: Vec<String> = plan
                .iter()
                .map(|(w, port)| format!("{}:{port}", w.address))
                .collect();
            for a in args {
                let config = WorkerCommand {
                    role: "learner",
                    index: 0,
                    args: a.clone(),
                }
                .config()
                .context("a learner command without --config")?;
                crate::launcher::set_ring_peers(&config, &peers)?;
            }
        }
        for (((w, port), &i), a) in plan.into_iter().zip(ranks).zip(args) {
            let p = &mut placements[i];
            p.worker = w.id.clone();
            p.spec.collective_port = port;
            p.spec.args = a.clone();
            p.spec.generation += 1;
            self.assign(p, w.lease).await?;
        }
        Ok(true)
    }

    /// Whether the placement needs replacing: its worker left or its process exited.
    async fn lost(&self, p: &Placement) -> Result<bool> {
        Ok(self.worker(&p.worker).await?.is_none()
            || self
                .status(p)
                .await?
                .is_some_and(|s| s.state == state::EXITED))
    }
}

impl Pool {
    /// Waits for a job's placed processes and assembles its gang, supervised by a
    /// [`PoolSupervisor`].
    pub async fn gang(
        self,
        commands: Vec<WorkerCommand>,
        placements: Vec<Placement>,
        timeout: Duration,
    ) -> Result<Gang> {
        let urls = self.wait_ready(&placements, timeout).await?;
        let mut endpoints = Endpoints::default();
        let mut replicas = Replicas::default();
        for (i, (p, url)) in placements.iter().zip(urls).enumerate() {
            match p.spec.role.as_str() {
                "reward" => {
                    replicas.serving.insert(i, url.clone());
                    endpoints.rewards.push(url);
                }
                "learner" => endpoints.learners.push(url),
                _ => endpoints.actors.push(url),
            }
        }
        Ok(Gang {
            endpoints,
            supervisor: Box::new(PoolSupervisor {
                pool: self,
                commands,
                placements: Mutex::new(placements),
                starting: Mutex::new(Vec::new()),
                replicas: Mutex::new(replicas),
                timeout,
            }),
        })
    }
}

/// A job's reward replicas as its supervisor knows them (indices into its placements).
#[derive(Debug, Default)]
struct Replicas {
    /// The ones serving, with their URLs, in placement (replica) order.
    serving: BTreeMap<usize, String>,
    /// The ones being restarted.
    starting: Vec<usize>,
}

/// Replaces a job's dead pool workers:
/// - learners: every rank is restarted at once (restoring the checkpoint; a data-parallel ring
///   with a dead rank is relaunched whole), each on its worker, or on another learner worker
///   when its worker left, waiting for one to register;
/// - an actor that was lost (its process exited or its worker left) is started again on its
///   worker or on another actor worker with free capacity, in the background, and joins at the
///   first step after it is ready (training goes on with the other actors meanwhile);
/// - a reward replica that was lost is restarted the same way and serves again once ready;
///   while no replica serves, [`Supervisor::rewards`] waits for one (up to the ready timeout).
pub struct PoolSupervisor {
    pool: Pool,
    commands: Vec<WorkerCommand>,
    placements: Mutex<Vec<Placement>>,
    /// Indices (into `placements`) of actors being replaced.
    starting: Mutex<Vec<usize>>,
    replicas: Mutex<Replicas>,
    timeout: Duration,
}

impl PoolSupervisor {
    /// Looks at every reward replica once: a restarted one that is ready serves again, a lost
    /// one stops serving and is reassigned (when a worker can take it). Whether the serving
    /// set changed. A restart whose process exited is an error when `strict` (nothing else
    /// serves), else logged and tried again at the next look; one whose worker left is tried
    /// again on another worker.
    async fn check_replicas(
        &self,
        placements: &mut [Placement],
        r: &mut Replicas,
        strict: bool,
    ) -> Result<bool> {
        let mut changed = false;
        for (i, p) in placements.iter_mut().enumerate() {
            if p.spec.role != "reward" {
                continue;
            }
            if let Some(at) = r.starting.iter().position(|&s| s == i) {
                match self.pool.ready_now(p).await {
                    Ok(Some(url)) => {
                        tracing::info!("{} serves again at {url}", p.spec.id());
                        r.starting.remove(at);
                        r.serving.insert(i, url);
                        changed = true;
                    }
                    Ok(None) => {}
                    Err(e) if strict && self.pool.worker(&p.worker).await?.is_some() => {
                        return Err(e.context("no reward server replica is serving"));
                    }
                    Err(e) => {
                        tracing::warn!("restarting a reward replica: {e:#}");
                        r.starting.remove(at);
                    }
                }
                continue;
            }
            if !self.pool.lost(p).await? {
                continue;
            }
            if r.serving.remove(&i).is_some() {
                tracing::warn!(
                    "{} on worker {} was lost; restarting it",
                    p.spec.id(),
                    p.worker
                );
                changed = true;
            }
            let args = p.spec.args.clone();
            if self.pool.reassign(p, &args).await? {
                r.starting.push(i);
            } // else no reward worker is free yet: tried again at the next look
        }
        Ok(changed)
    }

    /// Waits until the pool's view of every serving reward replica is current: its worker
    /// heartbeated after this call began (so its report says whether the process still runs),
    /// or its lease ended (it is gone). Until then a replica on a machine that just died looks
    /// alive, and a scoring failure it caused would be taken for one no restart can mend
    /// (found across hosts: a host killed while its reward server scored failed the job).
    /// Bounded by twice the lease (heartbeat times come from whichever coordinator heard them;
    /// a clock behind this one's only makes the wait run to that bound).
    async fn wait_for_current_reports(&self) -> Result<()> {
        let since = now();
        let workers: Vec<String> = {
            let placements = self.placements.lock().await;
            let r = self.replicas.lock().await;
            r.serving
                .keys()
                .map(|&i| placements[i].worker.clone())
                .collect()
        };
        let deadline = Instant::now() + 2 * self.pool.ttl();
        loop {
            let mut current = true;
            for id in &workers {
                if self
                    .pool
                    .worker(id)
                    .await?
                    .is_some_and(|w| w.last_heartbeat <= since)
                {
                    current = false;
                    break;
                }
            }
            if current || Instant::now() >= deadline {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tonic::async_trait]
impl Supervisor for PoolSupervisor {
    async fn rewards_after_failure(&self) -> Result<Option<Vec<String>>> {
        self.wait_for_current_reports().await?;
        self.rewards().await
    }

    async fn replace_learners(&self) -> Result<Vec<String>> {
        let mut placements = self.placements.lock().await;
        let mut ranks: Vec<usize> = (0..placements.len())
            .filter(|&i| placements[i].spec.role == "learner")
            .collect();
        ranks.sort_by_key(|&i| placements[i].spec.index);
        if ranks.is_empty() {
            bail!("the job has no learner placed");
        }
        let args = ranks
            .iter()
            .map(|&i| {
                let rank = placements[i].spec.index as usize;
                self.commands
                    .iter()
                    .find(|c| c.role == "learner" && c.index == rank)
                    .map(|c| c.resuming().args)
                    .with_context(|| format!("no command for learner rank {rank}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let deadline = Instant::now() + self.timeout;
        loop {
            while !self
                .pool
                .reassign_ring(&mut placements, &ranks, &args)
                .await?
            {
                if Instant::now() >= deadline {
                    bail!(
                        "no learner worker registered within {:?} to replace the job's lost learner ranks",
                        self.timeout
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let ring: Vec<Placement> = ranks.iter().map(|&i| placements[i].clone()).collect();
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .pool
                .wait_ready(&ring, left.max(Duration::from_secs(60)))
                .await
            {
                // A worker that died with its process (a Slurm batch job cancelled, a host
                // lost) is still registered until its lease ends, so the rank may have been
                // restarted on it: once it is gone, the rank moves to another learner worker.
                Err(e) if e.downcast_ref::<WorkerLeft>().is_some() && Instant::now() < deadline => {
                    tracing::warn!("{e:#}; moving the learner ranks again");
                }
                ready => return ready,
            }
        }
    }

    async fn rewards(&self) -> Result<Option<Vec<String>>> {
        let mut placements = self.placements.lock().await;
        let mut r = self.replicas.lock().await;
        let mut changed = self.check_replicas(&mut placements, &mut r, false).await?;
        let deadline = Instant::now() + self.timeout;
        while r.serving.is_empty() {
            if Instant::now() >= deadline {
                bail!(
                    "no reward server replica is serving, and none was restarted within {:?}",
                    self.timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            changed |= self.check_replicas(&mut placements, &mut r, true).await?;
        }
        Ok(changed.then(|| r.serving.values().cloned().collect()))
    }

    async fn new_actors(&self) -> Vec<String> {
        let mut joined = Vec::new();
        let mut placements = self.placements.lock().await;
        let mut starting = self.starting.lock().await;
        // Replacements started earlier: join the ready ones, forget the ones lost again.
        let mut still = Vec::new();
        for i in starting.drain(..) {
            match self.pool.ready_now(&placements[i]).await {
                Ok(Some(url)) => joined.push(url),
                Ok(None) => still.push(i),
                Err(e) => tracing::warn!("replacement actor: {e:#}"),
            }
        }
        *starting = still;
        for (i, p) in placements.iter_mut().enumerate() {
            if p.spec.role != "actor" || starting.contains(&i) {
                continue;
            }
            match self.pool.lost(p).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!("checking actor {}: {e:#}", p.spec.id());
                    continue;
                }
            }
            let args = p.spec.args.clone();
            match self.pool.reassign(p, &args).await {
                Ok(true) => starting.push(i),
                Ok(false) => {} // no actor worker free yet: tried again next step
                Err(e) => tracing::warn!("replacing actor {}: {e:#}", p.spec.id()),
            }
        }
        joined
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    async fn pool() -> Pool {
        Pool::new(
            AnyStore::open("embedded:").await.unwrap(),
            Duration::from_secs(30),
        )
    }

    async fn register(pool: &Pool, role: &str, node: &str, capacity: u32, ports: &[u32]) -> String {
        let r = v1::RegisterWorkerRequest {
            role: role.into(),
            node: node.into(),
            address: format!("10.0.0.{}", node.trim_start_matches('n')),
            devices: Vec::new(),
            capacity,
            collective_ports: ports.to_vec(),
        };
        pool.register(&r).await.unwrap()
    }

    fn command(role: &'static str, index: usize, args: Vec<String>) -> WorkerCommand {
        WorkerCommand { role, index, args }
    }

    /// A heartbeat from `worker` reporting `id` (generation `generation`) ready at `url`.
    async fn report_ready(pool: &Pool, worker: &str, id: &str, generation: u64, url: &str) {
        let status = v1::AssignmentStatus {
            id: id.into(),
            generation,
            state: state::READY.into(),
            url: url.into(),
            detail: String::new(),
            pid: 1,
        };
        pool.heartbeat(worker, &[status]).await.unwrap();
    }

    #[tokio::test]
    async fn after_a_scoring_failure_a_reward_replica_on_a_dead_machine_is_found_and_moved() {
        let pool = Pool::new(AnyStore::open("embedded:").await.unwrap(), MIN_TTL);
        let doomed = register(&pool, "reward", "n1", 1, &[]).await;
        let build = |_: &[Chosen]| Ok(vec![command("reward", 0, Vec::new())]);
        let (commands, placed) = pool
            .place("j", &["reward"], build, Path::new("/logs"))
            .await
            .unwrap()
            .expect("room for the replica");
        let id = placed[0].spec.id();
        let first = placed[0].spec.generation;
        report_ready(&pool, &doomed, &id, first, "http://10.0.0.1:1").await;
        let gang = pool
            .clone()
            .gang(commands, placed, Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(gang.endpoints.rewards, ["http://10.0.0.1:1"]);

        // Its machine dies now: no heartbeat any more, but its lease runs on for a while. A
        // spare registers and serves whatever it is given.
        let spare = register(&pool, "reward", "n2", 1, &[]).await;
        let (p, s, i) = (pool.clone(), spare.clone(), id.clone());
        let spare_worker = tokio::spawn(async move {
            loop {
                let given = p.heartbeat(&s, &[]).await.unwrap();
                if let Some(a) = given.iter().find(|a| a.id == i) {
                    report_ready(&p, &s, &i, a.generation, "http://10.0.0.2:1").await;
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        // Right after the failure the pool cannot tell yet ...
        assert_eq!(gang.supervisor.rewards().await.unwrap(), None);
        // ... so after a failure the supervisor waits until it can: the lease ends, the
        // replica moves to the spare, and the job is given its address.
        let moved = gang.supervisor.rewards_after_failure().await.unwrap();
        assert_eq!(moved, Some(vec!["http://10.0.0.2:1".to_string()]));
        spare_worker.await.unwrap();
    }

    #[tokio::test]
    async fn a_gang_s_replicas_are_spread_over_the_workers_of_their_role() {
        let pool = pool().await;
        let big = register(&pool, "reward", "n1", 3, &[]).await;
        let small = register(&pool, "reward", "n2", 1, &[]).await;
        let build = |chosen: &[Chosen]| {
            Ok((0..chosen.len())
                .map(|i| command("reward", i, Vec::new()))
                .collect())
        };
        let (_, placed) = pool
            .place(
                "j",
                &["reward", "reward", "reward"],
                build,
                Path::new("/logs"),
            )
            .await
            .unwrap()
            .expect("room for three");
        let on: Vec<&str> = placed.iter().map(|p| p.worker.as_str()).collect();
        // The roomiest first, then the one holding none of the gang yet, then room again.
        assert_eq!(on, [big.as_str(), small.as_str(), big.as_str()]);
    }

    #[tokio::test]
    async fn a_ring_whose_worker_left_moves_that_rank_and_rewrites_every_rank_s_peers() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool().await;
        let w1 = register(&pool, "learner", "n1", 1, &[7001]).await;
        let w2 = register(&pool, "learner", "n2", 1, &[7002]).await;
        let configs: Vec<PathBuf> = (0..2)
            .map(|r| {
                let path = dir.path().join(format!("learner-{r}.toml"));
                std::fs::write(
                    &path,
                    format!(
                        "[parallel]\nrank = {r}\npeers = [\"10.0.0.1:7001\", \"10.0.0.2:7002\"]\n"
                    ),
                )
                .unwrap();
                path
            })
            .collect();
        let args: Vec<Vec<String>> = configs
            .iter()
            .map(|c| vec!["--config".into(), c.display().to_string()])
            .collect();
        let build = |_: &[Chosen]| {
            Ok((0..2)
                .map(|r| command("learner", r, args[r].clone()))
                .collect())
        };
        let (_, mut placed) = pool
            .place("j", &["learner", "learner"], build, Path::new("/logs"))
            .await
            .unwrap()
            .expect("room for the ring");
        assert_eq!(
            (placed[0].worker.as_str(), placed[1].worker.as_str()),
            (w1.as_str(), w2.as_str())
        );
        let before: Vec<u64> = placed.iter().map(|p| p.spec.generation).collect();

        // Rank 1's worker leaves; no learner worker is free: nothing moves.
        pool.leave(&w2).await.unwrap();
        let resumed: Vec<Vec<String>> = args
            .iter()
            .map(|a| [a.clone(), vec!["--resume".into()]].concat())
            .collect();
        assert!(
            !pool
                .reassign_ring(&mut placed, &[0, 1], &resumed)
                .await
                .unwrap()
        );
        assert_eq!(
            placed[0].spec.generation, before[0],
            "rank 0 was left alone"
        );

        // A new worker: rank 1 moves there, rank 0 restarts where it was, both resume.
        let w3 = register(&pool, "learner", "n3", 1, &[7003]).await;
        assert!(
            pool.reassign_ring(&mut placed, &[0, 1], &resumed)
                .await
                .unwrap()
        );
        assert_eq!(
            (placed[0].worker.as_str(), placed[1].worker.as_str()),
            (w1.as_str(), w3.as_str())
        );
        assert_eq!(placed[1].spec.collective_port, 7003);
        for (p, b) in placed.iter().zip(&before) {
            assert_eq!(p.spec.generation, b + 1);
            assert_eq!(p.spec.args.last().map(String::as_str), Some("--resume"));
        }
        for c in &configs {
            let table: toml::Table = std::fs::read_to_string(c).unwrap().parse().unwrap();
            let peers = table["parallel"]["peers"].as_array().unwrap();
            assert_eq!(
                peers
                    .iter()
                    .map(|p| p.as_str().unwrap())
                    .collect::<Vec<_>>(),
                ["10.0.0.1:7001", "10.0.0.3:7003"]
            );
        }
        // What the workers are told to run: the new generations, rank 1 on the new worker.
        let on_w3 = pool.heartbeat(&w3, &[]).await.unwrap();
        assert_eq!(on_w3.len(), 1);
        assert_eq!(
            (on_w3[0].id.as_str(), on_w3[0].generation),
            ("j/learner-1", before[1] + 1)
        );
        let on_w1 = pool.heartbeat(&w1, &[]).await.unwrap();
        assert_eq!(on_w1[0].generation, before[0] + 1);
    }
}
