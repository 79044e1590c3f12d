//! The coordinator's shared state and its leader loop: the jobs in the store, the scheduling
//! pass carried out, and how a job that did not get to run ends.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rlhf_proto::v1;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify, watch};
use tonic::Status;

use super::scheduler;
use crate::allow::AllowedPaths;
use crate::controller::Outcome;
use crate::job::JobSpec;
use crate::launcher::WorkerCommand;
use crate::metrics::Metrics;
use crate::pool::{Placement, Pool};
use crate::slurm::Slurm;
use crate::state::{JobRecord, JobState};
use crate::store::{AnyStore, StateStore, campaign};

pub(super) const JOBS: &str = "jobs/";

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
    pub(super) fn view(&self) -> scheduler::JobView {
        scheduler::JobView {
            id: self.record.id.clone(),
            state: self.record.state,
            priority: self.record.priority,
            submitted: self.submitted,
            cancel_requested: self.cancel_requested,
            last_step: self.record.last_step,
        }
    }

    pub(super) fn info(&self) -> v1::JobInfo {
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
    pub(super) fn spec(&self) -> Result<JobSpec> {
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
    /// Where submitted jobs may read and write (the state directory is added).
    pub allowed: AllowedPaths,
    /// Jobs not yet ended it holds at most (docs/reliability.md).
    pub max_jobs: usize,
}

/// The coordinator's shared state.
pub struct Coordinator {
    pub(super) store: AnyStore,
    pub(super) pool: Pool,
    pub(super) launcher: LauncherKind,
    pub(super) slurm: Option<Slurm>,
    pub(super) state_dir: PathBuf,
    pub(super) slots: usize,
    pub(super) allowed: AllowedPaths,
    pub(super) max_jobs: usize,
    /// Jobs this process runs: their stop switches.
    pub(super) running: Mutex<HashMap<String, watch::Sender<bool>>>,
    pub(super) wake: Notify,
    pub(super) metrics: Metrics,
    /// When each rate-limited Slurm command (`squeue:<batch>`, `sbatch:<job>`) last ran.
    pub(super) slurm_checked: Mutex<HashMap<String, std::time::Instant>>,
}

pub(super) fn internal(e: anyhow::Error) -> Status {
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
            allowed: settings.allowed,
            max_jobs: settings.max_jobs,
            running: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            metrics: Metrics::new(),
            slurm_checked: Mutex::new(HashMap::new()),
        })
    }

    pub(super) async fn load(&self, id: &str) -> Result<Option<StoredJob>> {
        match self.store.get(&format!("{JOBS}{id}")).await? {
            Some(text) => Ok(Some(
                serde_json::from_str(&text).with_context(|| format!("job {id}: corrupt record"))?,
            )),
            None => Ok(None),
        }
    }

    /// Every job; a record that does not parse is reported and skipped.
    pub(super) async fn all(&self) -> Result<Vec<StoredJob>> {
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
    pub(super) async fn update(
        &self,
        id: &str,
        mut f: impl FnMut(&mut StoredJob),
    ) -> Result<StoredJob> {
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
                .pool
                .writer()
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
        // a cut-off active coordinator still does. This timer is the first line; the second,
        // which holds whatever the timer does, is that every write is fenced by the election
        // (store::fenced). `RLHF_FAULT_NO_LEASE_TIMER=1` turns the timer off, to test the
        // fence alone.
        const LEASE_TTL: Duration = Duration::from_secs(6);
        const FENCE: Duration = Duration::from_secs(4);
        let lease = self.store.grant_lease(LEASE_TTL).await?;
        let store = self.store.clone();
        let timer = std::env::var_os("RLHF_FAULT_NO_LEASE_TIMER").is_none();
        if !timer {
            tracing::warn!("RLHF_FAULT_NO_LEASE_TIMER: the lease timer is off (a fault test)");
        }
        tokio::spawn(async move {
            let mut last_ok = std::time::Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if timer && last_ok.elapsed() >= FENCE {
                    // Paused or starved past the fence (SIGSTOP, a stalled VM): step down before
                    // anything else of this process acts on a lease that may be gone.
                    eprintln!("coordinator held no renewed lease for {FENCE:?}; exiting");
                    std::process::exit(3);
                }
                let renewed =
                    tokio::time::timeout(Duration::from_millis(1500), store.keep_alive(lease))
                        .await;
                match renewed {
                    Ok(Ok(())) => last_ok = std::time::Instant::now(),
                    Ok(Err(e)) => tracing::warn!("lease renewal failed: {e:#}"),
                    Err(_) => tracing::warn!("lease renewal timed out"),
                }
                if timer && last_ok.elapsed() >= FENCE {
                    // Someone else may hold the election soon: running on could double-run jobs.
                    eprintln!("coordinator could not renew its lease for {FENCE:?}; exiting");
                    std::process::exit(3);
                }
            }
        });
        let fence = campaign(&self.store, "coordinator", &name, lease).await?;
        let epoch = fence.epoch;
        self.pool.writer().lead(fence);
        tracing::info!(name, epoch, "active coordinator");
        self.metrics.active.set(1);
        eprintln!("coordinator {name} is active (leader epoch {epoch})");
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

    /// One scheduling pass: forward cancels, resume orphans, start queued jobs into free slots
    /// (the decisions are [`scheduler::plan`]'s; this carries them out).
    pub(super) async fn schedule(self: &Arc<Self>) -> Result<()> {
        let jobs = self.all().await?;
        let mut running = self.running.lock().await;
        if self.launcher != LauncherKind::Local {
            self.release_leftovers(&running).await?;
        }
        let views: Vec<scheduler::JobView> = jobs.iter().map(StoredJob::view).collect();
        let plan = scheduler::plan(
            &views,
            |id| running.contains_key(id),
            running.len(),
            self.slots,
        );
        for id in &plan.stop {
            if let Some(stop) = running.get(id) {
                let _ = stop.send(true);
            }
        }
        for (id, step) in &plan.cancel {
            self.finish(id, Ok(Outcome::Stopped { step: *step }))
                .await?;
        }
        let by_id: HashMap<&str, &StoredJob> =
            jobs.iter().map(|j| (j.record.id.as_str(), j)).collect();
        if let Some(job) = plan.slot_wait.as_deref().and_then(|id| by_id.get(id)) {
            let note = format!(
                "waiting for a slot: {} job(s) run at once (--slots)",
                self.slots
            );
            self.set_waiting(job, note).await?;
        }
        for start in &plan.start {
            let Some(job) = by_id.get(start.id.as_str()).copied() else {
                continue;
            };
            let resume = start.resume;
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
                // The job in a task of its own: a panic in it fails the job and frees its slot
                // instead of holding the slot forever.
                let job = {
                    let (me, id) = (me.clone(), id.clone());
                    tokio::spawn(async move { me.run(&id, resume, stop_rx, placed).await })
                };
                match job.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(id, "job bookkeeping failed: {e:#}"),
                    Err(panic) => {
                        let e = anyhow::anyhow!("the job's task ended unexpectedly: {panic}");
                        if let Err(e) = me.finish(&id, Err(e)).await {
                            tracing::warn!(id, "recording the job's end: {e:#}");
                        }
                    }
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
    pub(super) async fn release_leftovers(
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
    pub(super) async fn refresh_metrics(&self) -> Result<()> {
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
    pub(super) async fn set_waiting(&self, job: &StoredJob, note: String) -> Result<()> {
        if job.waiting != note {
            self.update(&job.record.id, |j| j.waiting = note.clone())
                .await?;
        }
        Ok(())
    }

    /// Moves the job to placing (no longer waiting), with `reason`.
    pub(super) async fn to_placing(&self, id: &str, reason: &str) -> Result<StoredJob> {
        self.update(id, |j| {
            let _ = j.record.transition(JobState::Placing, reason);
            j.waiting.clear();
        })
        .await
    }

    /// Ends a job that did not get to run (cancelled or failed before or while its workers
    /// started). A job that ran was ended by its runner.
    pub(super) async fn finish(&self, id: &str, outcome: Result<Outcome>) -> Result<()> {
        let (state, reason) = match &outcome {
            Ok(Outcome::Succeeded) => (JobState::Succeeded, "all steps done".to_string()),
            Ok(Outcome::Stopped { step }) => (
                JobState::Cancelled,
                format!("cancelled after step {step} (checkpointed)"),
            ),
            Err(e) => (JobState::Failed, format!("{e:#}")),
        };
        self.persist(id, |j| {
            if !j.record.state.is_terminal()
                && let Err(e) = j.record.transition(state, reason.clone())
            {
                tracing::warn!(id, "{e}");
            }
        })
        .await
    }

    /// [`Coordinator::update`], tried again with backoff for a few seconds: for the writes
    /// that end a job, which must not be lost to a passing store failure.
    pub(super) async fn persist(&self, id: &str, mut f: impl FnMut(&mut StoredJob)) -> Result<()> {
        let mut last = None;
        for attempt in 0..5 {
            match self.update(id, &mut f).await {
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
pub(super) struct JobProblem(pub(super) String);

/// A job's gang as placed on pool workers.
pub(super) struct Placed {
    pub(super) commands: Vec<WorkerCommand>,
    pub(super) placements: Vec<Placement>,
}

/// `2 actor, 1 learner`.
pub(super) fn counts<'a>(items: impl Iterator<Item = (&'a str, usize)>) -> String {
    items
        .map(|(role, n)| format!("{n} {role}"))
        .collect::<Vec<_>>()
        .join(", ")
}
