//! Runs one job to its end: its workers (a gang placed by the coordinator, or local child
//! processes), its [`Controller`], and its record. The record has one owner, this runner: it
//! applies every state change through [`JobRecord::transition`] (no forced states) and hands
//! each event, with the record as it is after it, to the job's [`Sink`]s: the terminal
//! display of `rlhf run`, `job.json` in the output folder ([`JobFile`]), the coordinator's
//! state store. The runner is async and runs on its caller's runtime.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::sync::{Mutex, mpsc, watch};

use crate::controller::{Controller, Event, Gang, Outcome};
use crate::job::JobSpec;
use crate::launcher::{LocalCluster, LocalSupervisor};
use crate::state::{JobRecord, JobState};

/// Hears a job's events. A sink's failure is logged and does not stop the job: its workers
/// run on, and the other sinks still hear it.
#[tonic::async_trait]
pub trait Sink: Send {
    /// `record` is the job's record after `event` was applied.
    async fn event(&mut self, event: &Event, record: &JobRecord) -> Result<()>;
}

/// How a job runs.
pub struct RunOptions {
    /// Continue from the learner's latest checkpoint.
    pub resume: bool,
    /// Stops the job (checkpoint, then [`Outcome::Stopped`]) when it turns true.
    pub stop: watch::Receiver<bool>,
    /// Workers already started elsewhere (the pool launchers); without it, the job's workers
    /// are started here as child processes of `exe`.
    pub gang: Option<Gang>,
    /// The `rlhf` binary, for local workers.
    pub exe: PathBuf,
}

/// Runs `job` from `record` (queued or placing, or an interrupted one being resumed) to a
/// terminal state; returns the outcome and the final record.
pub async fn run(
    job: &JobSpec,
    mut record: JobRecord,
    options: RunOptions,
    mut sinks: Vec<Box<dyn Sink>>,
) -> (Result<Outcome>, JobRecord) {
    let mut publish = Publisher { sinks: &mut sinks };
    let placing = if options.gang.is_some() {
        "workers placed by the coordinator"
    } else {
        "starting local workers"
    };
    publish
        .publish(Event::state(JobState::Placing, placing), &mut record)
        .await;
    let result = drive(job, options, &mut record, &mut publish).await;
    let end = match &result {
        Ok(Outcome::Succeeded) => Event::state(JobState::Succeeded, "all steps done"),
        Ok(Outcome::Stopped { step }) => Event::state(
            JobState::Cancelled,
            format!("stopped after step {step} (checkpointed; a resume continues)"),
        ),
        Err(e) => Event::state(JobState::Failed, format!("{e:#}")),
    };
    publish.publish(end, &mut record).await;
    (result, record)
}

/// Applies events to the record and hands them to the sinks.
struct Publisher<'a> {
    sinks: &'a mut Vec<Box<dyn Sink>>,
}

impl Publisher<'_> {
    async fn publish(&mut self, event: Event, record: &mut JobRecord) {
        match &event {
            // A repeated state (`running`: paused, resumed) is news for the sinks, not a
            // transition.
            Event::State { state, reason } if record.state != *state => {
                if let Err(e) = record.transition(*state, reason.clone()) {
                    tracing::warn!(job = record.id, "{e}");
                    return;
                }
            }
            Event::Step { step, .. } => record.last_step = *step,
            Event::State { .. } | Event::Log(_) => {}
        }
        for sink in self.sinks.iter_mut() {
            if let Err(e) = sink.event(&event, record).await {
                tracing::warn!(job = record.id, "recording the job's progress: {e:#}");
            }
        }
    }
}

async fn drive(
    job: &JobSpec,
    options: RunOptions,
    record: &mut JobRecord,
    publish: &mut Publisher<'_>,
) -> Result<Outcome> {
    let (gang, cluster) = match options.gang {
        Some(gang) => (gang, None),
        None => {
            let (job, exe, resume) = (job.clone(), options.exe.clone(), options.resume);
            let cluster =
                tokio::task::spawn_blocking(move || LocalCluster::launch(&job, &exe, resume))
                    .await
                    .context("starting local workers")??;
            let endpoints = cluster.endpoints();
            let cluster = Arc::new(Mutex::new(cluster));
            let supervisor = Box::new(LocalSupervisor(cluster.clone()));
            (
                Gang {
                    endpoints,
                    supervisor,
                },
                Some(cluster),
            )
        }
    };
    let (events_tx, mut events) = mpsc::unbounded_channel();
    // Reads the prompt files: off the async threads, which also renew the coordinator's lease.
    let (spec, id) = (job.clone(), record.id.clone());
    let mut controller = tokio::task::spawn_blocking(move || {
        Controller::new(
            spec,
            id,
            gang.endpoints,
            events_tx,
            options.stop,
            gang.supervisor,
        )
    })
    .await
    .context("loading the job's prompts")??;
    let run = tokio::spawn(async move { controller.run().await });
    while let Some(event) = events.recv().await {
        publish.publish(event, record).await;
    }
    let outcome = run
        .await
        .map_err(|e| anyhow::anyhow!("controller task: {e}"))?;
    // The local workers stop (their processes are killed on drop) once the controller is done.
    drop(cluster);
    outcome
}

/// A job's record in its output folder: `job.json`, written atomically after every event.
pub struct JobFile {
    path: PathBuf,
}

impl JobFile {
    /// The record of `rlhf run` in `out`: a new one, or with `resume` the interrupted run's
    /// (a finished one starts a new record, keeping its spec).
    pub fn open(
        out: &Path,
        job: &JobSpec,
        spec_toml: String,
        resume: bool,
    ) -> Result<(JobFile, JobRecord)> {
        Self::open_named(out, &job.name, job.priority, spec_toml, resume)
    }

    fn open_named(
        out: &Path,
        name: &str,
        priority: i32,
        spec_toml: String,
        resume: bool,
    ) -> Result<(JobFile, JobRecord)> {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let path = out.join("job.json");
        let fresh = |spec| JobRecord::new(name.into(), name.into(), spec, priority);
        let record = if resume && path.is_file() {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let record: JobRecord = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a job record", path.display()))?;
            if record.state.is_terminal() {
                fresh(record.spec_toml)
            } else {
                record
            }
        } else {
            fresh(spec_toml)
        };
        let file = JobFile { path };
        file.save(&record)?;
        Ok((file, record))
    }

    /// `job.json` in `out`, for a record kept elsewhere (the coordinator's store).
    pub fn mirror(out: &Path) -> Result<JobFile> {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        Ok(JobFile {
            path: out.join("job.json"),
        })
    }

    fn save(&self, record: &JobRecord) -> Result<()> {
        crate::job::write_atomic(&self.path, serde_json::to_string_pretty(record)?.as_bytes())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

#[tonic::async_trait]
impl Sink for JobFile {
    async fn event(&mut self, event: &Event, record: &JobRecord) -> Result<()> {
        match event {
            Event::Log(_) => Ok(()),
            Event::State { .. } | Event::Step { .. } => self.save(record),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, spec: &str, resume: bool) -> Result<(JobFile, JobRecord)> {
        JobFile::open_named(dir, "j", 0, spec.into(), resume)
    }

    #[test]
    fn a_finished_record_starts_afresh_keeping_its_spec() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut record) = open(dir.path(), "x", false).unwrap();
        record.transition(JobState::Cancelled, "test").unwrap();
        JobFile::mirror(dir.path()).unwrap().save(&record).unwrap();
        let (_, again) = open(dir.path(), "y", true).unwrap();
        assert_eq!(again.state, JobState::Queued);
        assert_eq!(again.spec_toml, "x", "a resumed record keeps its spec");
        let (_, fresh) = open(dir.path(), "y", false).unwrap();
        assert_eq!(
            (fresh.state, fresh.spec_toml.as_str()),
            (JobState::Queued, "y")
        );
    }

    #[test]
    fn an_interrupted_record_is_resumed_with_its_history() {
        let dir = tempfile::tempdir().unwrap();
        let (file, mut record) = open(dir.path(), "x", false).unwrap();
        record.transition(JobState::Placing, "p").unwrap();
        record.transition(JobState::Running, "r").unwrap();
        record.last_step = 3;
        file.save(&record).unwrap();
        let (_, resumed) = open(dir.path(), "x", true).unwrap();
        // (Times go through JSON, which may round their last digit.)
        let changes = |r: &JobRecord| -> Vec<(JobState, String)> {
            r.history
                .iter()
                .map(|t| (t.state, t.reason.clone()))
                .collect()
        };
        assert_eq!(changes(&resumed), changes(&record));
        assert_eq!((resumed.state, resumed.last_step), (JobState::Running, 3));
    }
}
