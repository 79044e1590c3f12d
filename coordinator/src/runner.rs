//! Runs one job to its end: its workers (a gang placed by the coordinator, or local child
//! processes), its [`Controller`], and its record. The record has one owner, this runner: it
//! applies every state change through [`JobRecord::transition`] (no forced states) and hands
//! each event, with the record as it is after it, to the job's [`Sink`]s: the terminal
//! display of `rlhf run`, `job.json` in the output folder ([`JobFile`]), the coordinator's
//! state store, and always `logs/controller.log` ([`ControllerLog`]), the controller's source of
//! `rlhf logs`. The runner is async and runs on its caller's runtime.

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
    // First, so an event is in the log before any other sink (the store) says it happened:
    // whoever follows the log until the job's final state sees the final line.
    match ControllerLog::open(&job.output_dir()) {
        Ok(log) => sinks.insert(0, Box::new(log)),
        Err(e) => tracing::warn!(job = record.id, "no controller log: {e:#}"),
    }
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
            // A repeated state with a new reason (`running`: paused, resumed, "no checkpoint
            // found: …") goes into the history too: it is what a user reads to learn why.
            Event::State { state, reason }
                if record.state != *state
                    || record.history.last().is_none_or(|h| h.reason != *reason) =>
            {
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

/// The job's events as lines of `<out>/logs/controller.log`, each with its UTC time: state
/// changes with their reasons, the controller's notes, and a summary of every step. Appended
/// to: a resumed job continues its file. A new file starts with the record's history so far
/// (a coordinator's job was queued and placed before its runner started).
pub struct ControllerLog {
    file: std::fs::File,
    /// Whether the history before the first event still has to be written.
    fresh: bool,
}

/// The metrics a step's summary line shows (every metric is in `metrics.jsonl`).
fn summarised(key: &str) -> bool {
    key.starts_with("reward/")
        || key.starts_with("kl/")
        || key.starts_with("eval/")
        || ["train/loss", "train/entropy", "rollout/tokens_per_s"].contains(&key)
}

impl ControllerLog {
    /// Opens (appending) the controller log of the job whose output folder is `out`.
    pub fn open(out: &Path) -> Result<ControllerLog> {
        let dir = crate::logs::folder(out);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{}.log", crate::logs::CONTROLLER));
        let file = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let fresh = file.metadata().map(|m| m.len() == 0).unwrap_or(false);
        Ok(ControllerLog { file, fresh })
    }

    /// The line(s) of one event, without their time.
    fn describe(event: &Event) -> String {
        match event {
            Event::State { state, reason } => format!("state {}: {reason}", state.as_str()),
            Event::Step {
                step,
                total,
                metrics,
            } => {
                let shown: Vec<String> = metrics
                    .iter()
                    .filter(|(k, _)| summarised(k))
                    .map(|(k, v)| format!("{k}={v:.4}"))
                    .collect();
                format!("step {step}/{total} {}", shown.join(" "))
                    .trim_end()
                    .to_string()
            }
            Event::Log(line) => line.clone(),
        }
    }

    /// Writes `text` at time `at`, one timestamped line per line of it.
    fn write(&mut self, at: f64, text: &str) -> std::io::Result<()> {
        use std::io::Write;
        let stamp = crate::logs::utc_timestamp(at);
        let mut out = String::new();
        for line in text.lines() {
            out.push_str(&format!("{stamp} {line}\n"));
        }
        // One write per event: lines of concurrent writers never interleave mid-line.
        self.file.write_all(out.as_bytes())
    }
}

#[tonic::async_trait]
impl Sink for ControllerLog {
    async fn event(&mut self, event: &Event, record: &JobRecord) -> Result<()> {
        if std::mem::take(&mut self.fresh) {
            let current = match event {
                Event::State { state, reason } => Some((*state, reason.as_str())),
                _ => None,
            };
            let mut earlier = record.history.clone();
            // The event's own transition is written as the event.
            if let (Some(last), Some((state, reason))) = (earlier.last(), current)
                && last.state == state
                && last.reason == reason
            {
                earlier.pop();
            }
            for t in earlier {
                let line = Self::describe(&Event::state(t.state, t.reason));
                self.write(t.at, &line)?;
            }
        }
        self.write(crate::state::now(), &Self::describe(event))?;
        Ok(())
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

    /// The controller log's lines without their times (and checks each has one).
    fn log_lines(out: &Path) -> Vec<String> {
        let text = std::fs::read_to_string(out.join("logs/controller.log")).unwrap();
        text.lines()
            .map(|l| {
                let (stamp, rest) = l.split_once(' ').unwrap();
                assert!(stamp.len() == 24 && stamp.ends_with('Z'), "{l}");
                rest.to_string()
            })
            .collect()
    }

    #[tokio::test]
    async fn the_controller_log_has_the_history_then_every_event() {
        let dir = tempfile::tempdir().unwrap();
        let mut record = JobRecord::new("j-1".into(), "j".into(), String::new(), 0);
        record
            .transition(JobState::Placing, "placed on w1")
            .unwrap();
        let mut log = ControllerLog::open(dir.path()).unwrap();
        let placing = Event::state(JobState::Placing, "workers placed by the coordinator");
        log.event(&placing, &record).await.unwrap();
        let metrics = [
            ("reward/total".to_string(), 0.5),
            ("timing/step_s".to_string(), 2.0),
        ];
        let step = Event::Step {
            step: 1,
            total: 3,
            metrics: metrics.into_iter().collect(),
        };
        log.event(&step, &record).await.unwrap();
        log.event(&Event::Log("two\nlines".into()), &record)
            .await
            .unwrap();
        // Reopened (a resumed job): appended, without the history again.
        let mut again = ControllerLog::open(dir.path()).unwrap();
        record.transition(JobState::Failed, "boom").unwrap();
        let failed = Event::state(JobState::Failed, "boom");
        again.event(&failed, &record).await.unwrap();
        assert_eq!(
            log_lines(dir.path()),
            [
                "state queued: submitted",
                "state placing: placed on w1",
                "state placing: workers placed by the coordinator",
                "step 1/3 reward/total=0.5000",
                "two",
                "lines",
                "state failed: boom",
            ]
        );
    }

    #[tokio::test]
    async fn the_event_of_the_last_transition_is_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut record = JobRecord::new("j".into(), "j".into(), String::new(), 0);
        record
            .transition(JobState::Placing, "starting local workers")
            .unwrap();
        let mut log = ControllerLog::open(dir.path()).unwrap();
        let placing = Event::state(JobState::Placing, "starting local workers");
        log.event(&placing, &record).await.unwrap();
        assert_eq!(
            log_lines(dir.path()),
            [
                "state queued: submitted",
                "state placing: starting local workers"
            ]
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
