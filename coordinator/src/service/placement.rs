//! Placing a job's gang on pool workers, and asking Slurm for the workers the pool lacks.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use super::coordinator::{Coordinator, JobProblem, Placed, StoredJob, counts};
use crate::slurm::Slurm;

/// How often a waiting job's Slurm batch job is looked up.
const SLURM_CHECK: Duration = Duration::from_secs(10);
/// How long after a failed sbatch it is tried again for the same job.
const SLURM_SUBMIT: Duration = Duration::from_secs(30);

impl Coordinator {
    /// Places `job`'s gang on pool workers (`reward_replicas` reward servers, `learner_ranks`
    /// learners, `actors` actors): `Ok(None)` (and the job's `waiting` note set) when the pool
    /// is too small now. Data-parallel learner ranks form their ring on the collective ports
    /// their workers offer. `[resources] devices` is the local launcher's: pool workers share
    /// out their own (`rlhf worker --devices`).
    pub(super) async fn place(&self, job: &StoredJob, resume: bool) -> Result<Option<Placed>> {
        let id = &job.record.id;
        let spec = job.spec().map_err(|e| JobProblem(format!("{e:#}")))?;
        let ranks = spec.resources.learner_ranks;
        // In the order worker_commands gives them.
        let mut roles = vec!["reward"; spec.resources.reward_replicas];
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
}
