//! `rlhf coordinator`: a long-running control plane. Jobs are submitted over gRPC
//! (`JobService`), kept in the state store (`jobs/<id>`, JSON), and run by the *active*
//! coordinator: the one holding the `coordinator` election (trivially the only one with the
//! embedded store; with etcd, standbys wait and the first to win after the active one dies takes
//! over).
//!
//! Scheduling: up to `slots` jobs run at once, each as a gang (all of its workers or none):
//! started here by the local launcher, or placed on registered pool workers (`static`, `slurm`;
//! see [`crate::pool`]). Queued jobs start by priority (higher first), then submission order; a
//! job that waits for workers or a slot is not overtaken, and its record says what it waits for.
//! A job found placing/calibrating/running that no live coordinator runs (the previous active
//! one died) is resumed from its last checkpoint first.
//! Cancel: a queued job is cancelled at once; a running one checkpoints, stops, and its workers
//! exit, freeing the slot. Any coordinator answers reads and accepts submissions and cancels
//! (a cancel of a running job is a flag in the store that the active coordinator acts on).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rlhf_proto::v1;
use rlhf_proto::v1::job_service_server::{JobService, JobServiceServer};
use rlhf_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify, mpsc, oneshot, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::cli::run::{RunHooks, run_job_with};
use crate::controller::{Event, Outcome};
use crate::job::JobSpec;
use crate::launcher::WorkerCommand;
use crate::metrics::Metrics;
use crate::pool::{HeartbeatError, Placement, Pool};
use crate::slurm::Slurm;
use crate::state::{JobRecord, JobState, now};
use crate::store::{AnyStore, StateStore, campaign};

const JOBS: &str = "jobs/";

/// A job as the store keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredJob {
    pub record: JobRecord,
    /// Where the job's relative paths resolve.
    pub base_dir: PathBuf,
    pub output_dir: PathBuf,
    pub total_steps: u64,
    pub submitted: f64,
    /// The last step's metrics.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// Set by `Cancel` on a running job; the active coordinator stops it.
    #[serde(default)]
    pub cancel_requested: bool,
    /// Why a queued job is not placed yet (pool launchers), empty otherwise.
    #[serde(default)]
    pub waiting: String,
    /// The Slurm job submitted for this job's workers (the `slurm` launcher), if any.
    #[serde(default)]
    pub slurm_job: String,
}

impl StoredJob {
    fn info(&self) -> v1::JobInfo {
        let r = &self.record;
        v1::JobInfo {
            id: r.id.clone(),
            name: r.name.clone(),
            state: r.state.as_str().into(),
            priority: r.priority,
            last_step: r.last_step,
            total_steps: self.total_steps,
            output_dir: self.output_dir.display().to_string(),
            history: r
                .history
                .iter()
                .map(|t| v1::StateChange {
                    state: t.state.as_str().into(),
                    at_unix: t.at,
                    reason: t.reason.clone(),
                })
                .collect(),
            metrics: self.metrics.clone().into_iter().collect(),
            waiting: self.waiting.clone(),
        }
    }

    /// The validated spec, with this job's output folder.
    fn spec(&self) -> Result<JobSpec> {
        let mut spec = JobSpec::from_toml(&self.record.spec_toml, &self.base_dir.join("job.toml"))
            .map_err(|p| anyhow::anyhow!("{}", p.join("\n")))?;
        spec.output_dir = Some(self.output_dir.clone());
        Ok(spec)
    }
}

/// How the active coordinator gets a job's workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LauncherKind {
    /// Child processes on this machine.
    Local,
    /// Workers that registered themselves (`rlhf worker --coordinator URL`).
    Static,
    /// As `static`, and the workers a job lacks are asked of Slurm (sbatch).
    Slurm,
}

/// How a coordinator runs jobs.
pub struct Settings {
    pub launcher: LauncherKind,
    /// Where jobs without an `output_dir` write (`<state-dir>/runs/<id>`).
    pub state_dir: PathBuf,
    /// Jobs run at once.
    pub slots: usize,
    /// How long a pool worker stays registered without a heartbeat.
    pub worker_ttl: Duration,
    /// Required by the `slurm` launcher.
    pub slurm: Option<Slurm>,
}

/// The coordinator's shared state.
pub struct Coordinator {
    store: AnyStore,
    pool: Pool,
    launcher: LauncherKind,
    slurm: Option<Slurm>,
    state_dir: PathBuf,
    slots: usize,
    /// Jobs this process runs: their stop switches.
    running: Mutex<HashMap<String, watch::Sender<bool>>>,
    wake: Notify,
    metrics: Metrics,
    /// When each rate-limited Slurm command (`squeue:<batch>`, `sbatch:<job>`) last ran.
    slurm_checked: Mutex<HashMap<String, std::time::Instant>>,
}

/// How often a waiting job's Slurm batch job is looked up.
const SLURM_CHECK: Duration = Duration::from_secs(10);
/// How long after a failed sbatch it is tried again for the same job.
const SLURM_SUBMIT: Duration = Duration::from_secs(30);

fn internal(e: anyhow::Error) -> Status {
    Status::internal(format!("{e:#}"))
}

impl Coordinator {
    pub fn new(store: AnyStore, settings: Settings) -> Arc<Coordinator> {
        Arc::new(Coordinator {
            pool: Pool::new(store.clone(), settings.worker_ttl),
            launcher: settings.launcher,
            slurm: settings.slurm,
            store,
            state_dir: settings.state_dir,
            slots: settings.slots.max(1),
            running: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            metrics: Metrics::new(),
            slurm_checked: Mutex::new(HashMap::new()),
        })
    }

    async fn load(&self, id: &str) -> Result<Option<StoredJob>> {
        match self.store.get(&format!("{JOBS}{id}")).await? {
            Some(text) => Ok(Some(
                serde_json::from_str(&text).with_context(|| format!("job {id}: corrupt record"))?,
            )),
            None => Ok(None),
        }
    }

    /// Every job; a record that does not parse is reported and skipped.
    async fn all(&self) -> Result<Vec<StoredJob>> {
        Ok(self
            .store
            .list(JOBS)
            .await?
            .into_iter()
            .filter_map(|(k, v)| match serde_json::from_str(&v) {
                Ok(job) => Some(job),
                Err(e) => {
                    tracing::warn!(key = k, "skipping a corrupt job record: {e}");
                    None
                }
            })
            .collect())
    }

    /// Reads, changes and writes a job's record with compare-and-set, so concurrent writers
    /// (a cancel from a standby, this job's progress) never lose each other's changes.
    async fn update(&self, id: &str, mut f: impl FnMut(&mut StoredJob)) -> Result<StoredJob> {
        let key = format!("{JOBS}{id}");
        for _ in 0..50 {
            let text = self
                .store
                .get(&key)
                .await?
                .with_context(|| format!("job {id} vanished"))?;
            let mut job: StoredJob =
                serde_json::from_str(&text).with_context(|| format!("job {id}: corrupt record"))?;
            f(&mut job);
            if self
                .store
                .replace(&key, &text, &serde_json::to_string(&job)?)
                .await?
            {
                return Ok(job);
            }
        }
        anyhow::bail!("job {id}: too many concurrent updates")
    }

    /// Holds the election, then schedules for as long as the process lives.
    pub async fn lead(self: Arc<Self>, name: String) -> Result<()> {
        // The store expires the lease LEASE_TTL after the last renewal; this process gives up
        // earlier (FENCE after its last successful renewal), so a standby never runs jobs while
        // a cut-off active coordinator still does.
        const LEASE_TTL: Duration = Duration::from_secs(6);
        const FENCE: Duration = Duration::from_secs(4);
        let lease = self.store.grant_lease(LEASE_TTL).await?;
        let store = self.store.clone();
        tokio::spawn(async move {
            let mut last_ok = std::time::Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let renewed =
                    tokio::time::timeout(Duration::from_millis(1500), store.keep_alive(lease))
                        .await;
                match renewed {
                    Ok(Ok(())) => last_ok = std::time::Instant::now(),
                    Ok(Err(e)) => tracing::warn!("lease renewal failed: {e:#}"),
                    Err(_) => tracing::warn!("lease renewal timed out"),
                }
                if last_ok.elapsed() >= FENCE {
                    // Someone else may hold the election soon: running on could double-run jobs.
                    eprintln!("coordinator could not renew its lease for {FENCE:?}; exiting");
                    std::process::exit(3);
                }
            }
        });
        campaign(&self.store, "coordinator", &name, lease).await?;
        tracing::info!(name, "active coordinator");
        self.metrics.active.set(1);
        eprintln!("coordinator {name} is active");
        loop {
            if let Err(e) = self.schedule().await {
                tracing::warn!("scheduling: {e:#}");
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// One scheduling pass: forward cancels, resume orphans, start queued jobs into free slots.
    async fn schedule(self: &Arc<Self>) -> Result<()> {
        let jobs = self.all().await?;
        let mut running = self.running.lock().await;
        if self.launcher != LauncherKind::Local {
            self.release_leftovers(&running).await?;
        }
        for job in &jobs {
            if !job.cancel_requested || job.record.state.is_terminal() {
                continue;
            }
            match running.get(&job.record.id) {
                Some(stop) => {
                    let _ = stop.send(true);
                }
                // Not running here (an orphan waiting to be placed again): cancelled now.
                None => {
                    let step = job.record.last_step;
                    self.finish(&job.record.id, Ok(Outcome::Stopped { step }))
                        .await?;
                }
            }
        }
        let (mut orphans, mut queued): (Vec<&StoredJob>, Vec<&StoredJob>) = jobs
            .iter()
            .filter(|j| {
                !j.record.state.is_terminal()
                    && !j.cancel_requested
                    && !running.contains_key(&j.record.id)
            })
            .partition(|j| j.record.state != JobState::Queued);
        let order = |a: &&StoredJob, b: &&StoredJob| {
            b.record
                .priority
                .cmp(&a.record.priority)
                .then(a.submitted.total_cmp(&b.submitted))
        };
        orphans.sort_by(order);
        queued.sort_by(order);
        for job in orphans.into_iter().chain(queued) {
            if running.len() >= self.slots {
                let note = format!(
                    "waiting for a slot: {} job(s) run at once (--slots)",
                    self.slots
                );
                self.set_waiting(job, note).await?;
                break;
            }
            let resume = job.record.state != JobState::Queued;
            let placed = match self.launcher {
                LauncherKind::Local => None,
                LauncherKind::Static | LauncherKind::Slurm => match self.place(job, resume).await {
                    Ok(Some(placed)) => Some(placed),
                    // Strict order: a job waiting for workers is not overtaken.
                    Ok(None) => {
                        if resume && job.record.state != JobState::Placing {
                            // An orphan nobody runs: say so instead of "running".
                            let reason = "interrupted (its coordinator or workers are gone); waiting to be placed again";
                            self.update(&job.record.id, |j| {
                                let _ = j.record.transition(JobState::Placing, reason);
                            })
                            .await?;
                        }
                        break;
                    }
                    Err(e) if e.downcast_ref::<JobProblem>().is_some() => {
                        self.finish(&job.record.id, Err(e)).await?;
                        continue;
                    }
                    Err(e) => {
                        // The store or sbatch failed: tried again next pass.
                        let note = format!("placement failed, retrying: {e:#}");
                        tracing::warn!(id = job.record.id, "{note}");
                        self.pool.release(&job.record.id).await?;
                        self.set_waiting(job, note).await?;
                        break;
                    }
                },
            };
            let (stop_tx, stop_rx) = watch::channel(job.cancel_requested);
            running.insert(job.record.id.clone(), stop_tx);
            let me = self.clone();
            let id = job.record.id.clone();
            tokio::spawn(async move {
                if let Err(e) = me.run(&id, resume, stop_rx, placed).await {
                    tracing::warn!(id, "job bookkeeping failed: {e:#}");
                }
                me.running.lock().await.remove(&id);
                me.wake.notify_one();
            });
        }
        Ok(())
    }

    /// Takes back assignments no job of this coordinator's runs owns: those of jobs that ended
    /// or vanished (a release that failed, a coordinator that died between a job's end and its
    /// release) and of orphans.
    async fn release_leftovers(
        &self,
        running: &HashMap<String, watch::Sender<bool>>,
    ) -> Result<()> {
        // Only this (active) coordinator places, under the `running` lock, so assignments of a
        // job it does not run are stale: the job ended, or is an orphan that will be placed
        // afresh (its old processes must not hold slots another orphan needs meanwhile).
        self.pool
            .release_where(|job| !running.contains_key(job))
            .await
    }

    /// Sets the job and pool gauges from the store.
    async fn refresh_metrics(&self) -> Result<()> {
        let m = &self.metrics;
        m.jobs.reset();
        for job in self.all().await? {
            m.jobs.with_label_values(&[job.record.state.as_str()]).inc();
        }
        m.workers.reset();
        for w in self.pool.list().await? {
            m.workers.with_label_values(&[w.role.as_str()]).inc();
        }
        for (role, free) in self.pool.free_capacity().await? {
            m.free_slots
                .with_label_values(&[role.as_str()])
                .set(free as i64);
        }
        Ok(())
    }

    /// Records why a queued job waits (empty: it does not), when that changed.
    async fn set_waiting(&self, job: &StoredJob, note: String) -> Result<()> {
        if job.waiting != note {
            self.update(&job.record.id, |j| j.waiting = note.clone())
                .await?;
        }
        Ok(())
    }

    /// Places `job`'s gang on pool workers: `Ok(None)` (and the job's `waiting` note set)
    /// when the pool is too small now. Data-parallel learner ranks form their ring on the
    /// collective ports their workers offer.
    async fn place(&self, job: &StoredJob, resume: bool) -> Result<Option<Placed>> {
        let id = &job.record.id;
        let spec = job.spec().map_err(|e| JobProblem(format!("{e:#}")))?;
        let ranks = spec.resources.learner_ranks;
        // In the order worker_commands gives them.
        let mut roles = vec!["reward"];
        roles.extend(std::iter::repeat_n("learner", ranks));
        roles.extend(std::iter::repeat_n("actor", spec.resources.actors));
        let build = |chosen: &[crate::pool::Chosen]| {
            let mut peers = Vec::new();
            for c in chosen.iter().filter(|c| c.role == "learner" && ranks > 1) {
                let port = c.collective_port.with_context(|| {
                    format!(
                        "learner worker {} offers no collective port for a ring of {ranks} ranks",
                        c.worker
                    )
                })?;
                peers.push(format!("{}:{port}", c.address));
            }
            crate::launcher::worker_commands(&spec, resume, &peers)
        };
        let logs = spec.output_dir().join("logs");
        match self.pool.place(id, &roles, build, &logs).await? {
            Some((commands, placements)) => {
                if !job.slurm_job.is_empty() {
                    // A later placement (a resume) may need Slurm again.
                    self.update(id, |j| j.slurm_job.clear()).await?;
                }
                Ok(Some(Placed {
                    commands,
                    placements,
                }))
            }
            None => {
                let mut need: BTreeMap<&str, usize> = BTreeMap::new();
                for role in &roles {
                    *need.entry(role).or_default() += 1;
                }
                let free = self.pool.free_capacity().await?;
                let mut waiting = format!(
                    "waiting for workers: needs {}; free now: {}",
                    counts(need.iter().map(|(r, n)| (*r, *n))),
                    counts(free.iter().map(|(r, n)| (r.as_str(), *n)))
                );
                if let Some(slurm) = &self.slurm {
                    let Some(batch) = self.slurm_batch(slurm, job, &need, &free, &logs).await?
                    else {
                        // sbatch failed a moment ago: the note still says why.
                        return Ok(None);
                    };
                    waiting += &format!("; Slurm job {batch} starts the missing workers");
                }
                self.set_waiting(job, waiting).await?;
                Ok(None)
            }
        }
    }

    /// The Slurm batch job that starts the workers `job` lacks (`need` minus `free`, per
    /// role): the one submitted earlier while Slurm still lists it, else a new one. `None` while
    /// a failed sbatch for the job waits [`SLURM_SUBMIT`] to be tried again.
    async fn slurm_batch(
        &self,
        slurm: &Slurm,
        job: &StoredJob,
        need: &BTreeMap<&str, usize>,
        free: &BTreeMap<String, usize>,
        logs: &Path,
    ) -> Result<Option<String>> {
        let id = &job.record.id;
        if !job.slurm_job.is_empty() {
            if !self.slurm_job_gone(slurm, &job.slurm_job).await {
                return Ok(Some(job.slurm_job.clone()));
            }
            tracing::warn!(
                id,
                batch = job.slurm_job,
                "the Slurm job for this job's workers ended before they were placed; submitting again"
            );
        }
        let failed = format!("sbatch:{id}");
        if self.failed_recently(&failed).await {
            return Ok(None);
        }
        let missing: BTreeMap<String, usize> = need
            .iter()
            .map(|(r, n)| {
                (
                    r.to_string(),
                    n.saturating_sub(free.get(*r).copied().unwrap_or(0)),
                )
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        match slurm.submit(id, &missing, logs).await {
            Ok(batch) => {
                self.update(id, |j| j.slurm_job = batch.clone()).await?;
                Ok(Some(batch))
            }
            Err(e) => {
                let now = std::time::Instant::now();
                self.slurm_checked.lock().await.insert(failed, now);
                Err(e)
            }
        }
    }

    /// Whether Slurm no longer knows batch job `batch` (it ended: failed, timed out, or its
    /// workers left). Asked at most every [`SLURM_CHECK`] per batch job; `false` when unsure.
    async fn slurm_job_gone(&self, slurm: &Slurm, batch: &str) -> bool {
        if !self.due(&format!("squeue:{batch}"), SLURM_CHECK).await {
            return false;
        }
        match slurm.is_queued(batch).await {
            Ok(queued) => !queued,
            Err(e) => {
                tracing::warn!(batch, "squeue: {e:#}");
                false
            }
        }
    }

    /// Whether `every` has passed since `key` was last due (if so, it is due again from now on);
    /// the first call for a key starts the clock. Rate-limits squeue.
    async fn due(&self, key: &str, every: Duration) -> bool {
        let mut times = self.slurm_checked.lock().await;
        let now = std::time::Instant::now();
        match times.get_mut(key) {
            None => {
                times.insert(key.to_string(), now);
                false
            }
            Some(last) if now.duration_since(*last) >= every => {
                *last = now;
                true
            }
            Some(_) => false,
        }
    }

    /// Whether `key` was marked (a failure) less than [`SLURM_SUBMIT`] ago.
    async fn failed_recently(&self, key: &str) -> bool {
        let times = self.slurm_checked.lock().await;
        times.get(key).is_some_and(|t| t.elapsed() < SLURM_SUBMIT)
    }

    /// Moves the job to placing (no longer waiting), with `reason`.
    async fn to_placing(&self, id: &str, reason: &str) -> Result<StoredJob> {
        self.update(id, |j| {
            let _ = j.record.transition(JobState::Placing, reason);
            j.waiting.clear();
        })
        .await
    }

    /// Runs one job, mirroring its progress into the store: on its placed pool workers, or on
    /// local workers when `placed` is `None`.
    async fn run(
        &self,
        id: &str,
        resume: bool,
        stop: watch::Receiver<bool>,
        placed: Option<Placed>,
    ) -> Result<()> {
        let reason = match (&placed, resume) {
            (_, true) => {
                "resuming from the last checkpoint (its previous run was interrupted)".into()
            }
            (None, false) => "starting local workers".into(),
            (Some(p), false) => format!(
                "placed on workers {}",
                p.placements
                    .iter()
                    .map(|p| p.worker.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let job = self.to_placing(id, &reason).await?;
        let result = self
            .run_placed(id, job, resume, stop, placed.as_ref())
            .await;
        if placed.is_some() {
            // The workers stop the job's processes and return to the pool.
            if let Err(e) = self.pool.release(id).await {
                tracing::warn!(id, "releasing the job's workers: {e:#}");
            }
        }
        result
    }

    async fn run_placed(
        &self,
        id: &str,
        job: StoredJob,
        resume: bool,
        stop: watch::Receiver<bool>,
        placed: Option<&Placed>,
    ) -> Result<()> {
        if job.record.state != JobState::Placing {
            // Cancelled between the scheduling pass and now.
            return Ok(());
        }
        let spec = match job.spec() {
            Ok(spec) => spec,
            Err(e) => return self.finish(id, Err(e)).await,
        };
        let gang = match placed {
            None => None,
            Some(p) => {
                let ready = self.pool.clone().gang(
                    p.commands.clone(),
                    p.placements.clone(),
                    crate::launcher::READY,
                );
                let mut cancel = stop.clone();
                let ready = tokio::select! {
                    ready = ready => ready,
                    _ = async {
                        if cancel.wait_for(|stop| *stop).await.is_err() {
                            std::future::pending::<()>().await; // no one can cancel any more
                        }
                    } => {
                        // Cancelled while its workers were starting: nothing ran, nothing to save.
                        let step = job.record.last_step;
                        return self.finish(id, Ok(Outcome::Stopped { step })).await;
                    }
                };
                match ready {
                    Ok(gang) => Some(gang),
                    Err(e) if e.downcast_ref::<crate::pool::WorkerLeft>().is_some() => {
                        // Still placing and run by no one: the next pass places it again.
                        self.to_placing(id, &format!("{e:#}; placing again"))
                            .await?;
                        return Ok(());
                    }
                    Err(e) => return self.finish(id, Err(e)).await,
                }
            }
        };
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let (done_tx, done_rx) = oneshot::channel();
        let text = job.record.spec_toml.clone();
        // run_job drives its own runtime: it runs on a thread of its own.
        std::thread::spawn(move || {
            let hooks = RunHooks {
                stop: Some(stop),
                events: Some(events_tx),
                gang,
            };
            let _ = done_tx.send(run_job_with(&spec, text, resume, true, hooks));
        });
        // Store errors are logged, never returned: the job's thread and workers run on until
        // it ends, and the slot must stay taken until then.
        while let Some(event) = events.recv().await {
            let updated = match event {
                Event::State { state, reason } => {
                    self.update(id, |j| {
                        if j.record.state != state {
                            let _ = j.record.transition(state, reason.clone());
                        }
                    })
                    .await
                }
                Event::Step { step, metrics, .. } => {
                    self.update(id, |j| {
                        j.record.last_step = step;
                        j.metrics = metrics.clone();
                    })
                    .await
                }
                Event::Log(_) => continue,
            };
            if let Err(e) = updated {
                tracing::warn!(id, "recording progress: {e:#}");
            }
        }
        let outcome = done_rx
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the job's thread ended without a result")));
        self.finish(id, outcome).await
    }

    async fn finish(&self, id: &str, outcome: Result<Outcome>) -> Result<()> {
        let (state, reason) = match &outcome {
            Ok(Outcome::Succeeded) => (JobState::Succeeded, "all steps done".to_string()),
            Ok(Outcome::Stopped { step }) => (
                JobState::Cancelled,
                format!("cancelled after step {step} (checkpointed)"),
            ),
            Err(e) => (JobState::Failed, format!("{e:#}")),
        };
        let mut last = None;
        for attempt in 0..5 {
            let result = self
                .update(id, |j| {
                    if j.record.state.is_terminal() {
                        return;
                    }
                    if j.record.transition(state, reason.clone()).is_err() {
                        // e.g. succeeded straight from placing when there was nothing to do.
                        j.record.state = state;
                        j.record.history.push(crate::state::Transition {
                            state,
                            at: now(),
                            reason: reason.clone(),
                        });
                    }
                })
                .await;
            match result {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
        }
        Err(last.expect("at least one attempt"))
    }
}

/// A problem with the job itself (its spec, its resources): placing it again would fail again.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct JobProblem(String);

/// A job's gang as placed on pool workers.
struct Placed {
    commands: Vec<WorkerCommand>,
    placements: Vec<Placement>,
}

/// `2 actor, 1 learner`.
fn counts<'a>(items: impl Iterator<Item = (&'a str, usize)>) -> String {
    items
        .map(|(role, n)| format!("{n} {role}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The gRPC face of a [`Coordinator`].
pub struct JobApi(pub Arc<Coordinator>);

type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for JobApi {
    async fn submit(
        &self,
        request: Request<v1::SubmitJobRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        let r = request.into_inner();
        let base = PathBuf::from(&r.base_dir);
        let spec =
            JobSpec::from_toml(&r.spec_toml, &base.join("job.toml")).map_err(|problems| {
                Status::invalid_argument(format!(
                    "{} problem(s):\n{}",
                    problems.len(),
                    problems.join("\n")
                ))
            })?;
        let c = &self.0;
        if let Some(dir) = &spec.output_dir {
            let live = c.all().await.map_err(internal)?;
            if let Some(other) = live
                .iter()
                .find(|j| !j.record.state.is_terminal() && &j.output_dir == dir)
            {
                return Err(Status::failed_precondition(format!(
                    "output_dir {} is in use by job `{}` ({})",
                    dir.display(),
                    other.record.id,
                    other.record.state.as_str()
                )));
            }
        }
        for n in 1..=100_000u32 {
            let id = format!("{}-{n}", spec.name);
            let output_dir = spec
                .output_dir
                .clone()
                .unwrap_or_else(|| c.state_dir.join("runs").join(&id));
            let job = StoredJob {
                record: JobRecord::new(
                    id.clone(),
                    spec.name.clone(),
                    r.spec_toml.clone(),
                    spec.priority,
                ),
                base_dir: base.clone(),
                output_dir,
                total_steps: spec.rollout.steps,
                submitted: now(),
                metrics: BTreeMap::new(),
                cancel_requested: false,
                waiting: String::new(),
                slurm_job: String::new(),
            };
            let text = serde_json::to_string(&job).map_err(|e| internal(e.into()))?;
            if c.store
                .create(&format!("{JOBS}{id}"), &text, None)
                .await
                .map_err(internal)?
            {
                c.wake.notify_one();
                return Ok(Response::new(job.info()));
            }
        }
        Err(Status::resource_exhausted("no free job id"))
    }

    async fn get(
        &self,
        request: Request<v1::GetJobRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        let id = request.into_inner().id;
        match self.0.load(&id).await.map_err(internal)? {
            Some(job) => Ok(Response::new(job.info())),
            None => Err(Status::not_found(format!("no job `{id}`"))),
        }
    }

    async fn list(
        &self,
        _: Request<v1::ListJobsRequest>,
    ) -> Result<Response<v1::ListJobsReply>, Status> {
        let mut jobs = self.0.all().await.map_err(internal)?;
        jobs.sort_by(|a, b| b.submitted.total_cmp(&a.submitted));
        Ok(Response::new(v1::ListJobsReply {
            jobs: jobs.iter().map(StoredJob::info).collect(),
        }))
    }

    async fn cancel(
        &self,
        request: Request<v1::CancelJobRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        let id = request.into_inner().id;
        let c = &self.0;
        let job = c
            .load(&id)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("no job `{id}`")))?;
        if job.record.state.is_terminal() {
            return Err(Status::failed_precondition(format!(
                "job `{id}` already {}",
                job.record.state.as_str()
            )));
        }
        let job = c
            .update(&id, |j| {
                if j.record.state == JobState::Queued {
                    let _ = j
                        .record
                        .transition(JobState::Cancelled, "cancelled before it started");
                } else {
                    j.cancel_requested = true;
                }
            })
            .await
            .map_err(internal)?;
        c.wake.notify_one();
        Ok(Response::new(job.info()))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<v1::WatchJobRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let id = request.into_inner().id;
        let c = self.0.clone();
        // The whole history is sent first, so a client sees every change without a gap.
        c.load(&id)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("no job `{id}`")))?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let (mut seen_history, mut seen_step) = (0, 0);
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let job = match c.load(&id).await {
                    Ok(Some(job)) => job,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(internal(e))).await;
                        return;
                    }
                };
                let info = job.info();
                if job.record.last_step > seen_step {
                    seen_step = job.record.last_step;
                    let step = v1::StepMetrics {
                        step: seen_step,
                        total: job.total_steps,
                        metrics: info.metrics.clone(),
                    };
                    let event = v1::job_event::Event::Step(step);
                    if tx
                        .send(Ok(v1::JobEvent { event: Some(event) }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                for change in info.history.into_iter().skip(seen_history) {
                    seen_history += 1;
                    let event = v1::job_event::Event::State(change);
                    if tx
                        .send(Ok(v1::JobEvent { event: Some(event) }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                if job.record.state.is_terminal() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// The gRPC face of the worker pool.
pub struct WorkerApi(pub Pool);

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register(
        &self,
        request: Request<v1::RegisterWorkerRequest>,
    ) -> Result<Response<v1::RegisterWorkerReply>, Status> {
        let r = request.into_inner();
        if let Some(problem) = Pool::registration_problem(&r) {
            return Err(Status::invalid_argument(problem));
        }
        // A store failure is worth retrying: UNAVAILABLE, which workers retry.
        let id = self
            .0
            .register(&r)
            .await
            .map_err(|e| Status::unavailable(format!("{e:#}")))?;
        tracing::info!(id, role = r.role, node = r.node, "worker registered");
        Ok(Response::new(v1::RegisterWorkerReply {
            worker_id: id,
            heartbeat_ms: self.0.heartbeat_every().as_millis() as u64,
            lease_ttl_ms: self.0.ttl().as_millis() as u64,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatReply>, Status> {
        let r = request.into_inner();
        match self.0.heartbeat(&r.worker_id, &r.statuses).await {
            Ok(assignments) => Ok(Response::new(v1::HeartbeatReply { assignments })),
            Err(HeartbeatError::Unknown(m)) => Err(Status::not_found(m)),
            Err(HeartbeatError::Store(e)) => Err(Status::unavailable(format!("{e:#}"))),
        }
    }

    async fn leave(
        &self,
        request: Request<v1::LeaveRequest>,
    ) -> Result<Response<v1::LeaveReply>, Status> {
        let id = request.into_inner().worker_id;
        self.0.leave(&id).await.map_err(internal)?;
        tracing::info!(id, "worker left");
        Ok(Response::new(v1::LeaveReply {}))
    }

    async fn list_workers(
        &self,
        _: Request<v1::ListWorkersRequest>,
    ) -> Result<Response<v1::ListWorkersReply>, Status> {
        let workers = self.0.list().await.map_err(internal)?;
        Ok(Response::new(v1::ListWorkersReply { workers }))
    }
}

/// Serves the job API on `listener` and, once elected, runs jobs.
pub async fn serve(
    coordinator: Arc<Coordinator>,
    name: String,
    listener: tokio::net::TcpListener,
) -> Result<()> {
    let jobs = JobServiceServer::new(JobApi(coordinator.clone()));
    let workers = WorkerServiceServer::new(WorkerApi(coordinator.pool.clone()));
    let names = vec![
        <JobServiceServer<JobApi> as tonic::server::NamedService>::NAME,
        <WorkerServiceServer<WorkerApi> as tonic::server::NamedService>::NAME,
    ];
    let host = rlhf_proto::service::ServiceHost::new(
        tonic::service::Routes::new(jobs).add_service(workers),
        names,
        coordinator.metrics.registry.clone(),
    );
    let refresher = coordinator.clone();
    tokio::spawn(async move {
        loop {
            if let Err(e) = refresher.refresh_metrics().await {
                tracing::debug!("refreshing metrics: {e:#}");
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    let leader = tokio::spawn(coordinator.lead(name));
    tokio::select! {
        served = host.serve(listener, rlhf_proto::service::shutdown_signal()) => served?,
        led = leader => led.map_err(|e| anyhow::anyhow!("scheduler task: {e}"))??,
    }
    Ok(())
}

/// Where a coordinator keeps state by default.
pub fn default_state_dir() -> PathBuf {
    Path::new("runs").join("coordinator")
}
