//! Running one job of the coordinator: its placed gang (or local workers), the runner, and the
//! job's record mirrored into the state store.

use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::sync::watch;

use super::coordinator::{Coordinator, Placed, StoredJob};
use crate::controller::{Event, Outcome};
use crate::runner::{JobFile, RunOptions, Sink};
use crate::state::{JobRecord, JobState};

impl Coordinator {
    /// Runs one job, mirroring its progress into the store: on its placed pool workers, or on
    /// local workers when `placed` is `None`.
    pub(super) async fn run(
        self: &Arc<Self>,
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
        let run = self.run_placed(id, job, resume, stop, placed.as_ref());
        let result = match (&self.slurm, &placed) {
            // A batch job of its workers that ends under it is submitted again.
            (Some(slurm), Some(_)) => slurm.while_running(id, run).await,
            _ => run.await,
        };
        if placed.is_some() {
            // The workers stop the job's processes and return to the pool.
            if let Err(e) = self.pool.release(id).await {
                tracing::warn!(id, "releasing the job's workers: {e:#}");
            }
        }
        result
    }

    async fn run_placed(
        self: &Arc<Self>,
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
                    rlhf_proto::process::READY_TIMEOUT,
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
        // What the runner needs; a failure here ends the job (it must not stay placing, or
        // the next pass would take it for an orphan and try again at once, forever).
        let prepared = rlhf_proto::process::self_exe()
            .context("locating the rlhf binary")
            .and_then(|exe| Ok((exe, JobFile::mirror(&job.output_dir)?)));
        let (exe, file) = match prepared {
            Ok(p) => p,
            Err(e) => return self.finish(id, Err(e)).await,
        };
        let options = RunOptions {
            resume,
            stop,
            gang,
            exe,
        };
        let sinks: Vec<Box<dyn Sink>> = vec![
            Box::new(StoreSink {
                coordinator: self.clone(),
                id: id.to_string(),
            }),
            Box::new(file),
        ];
        let (outcome, record) = crate::runner::run(&spec, job.record, options, sinks).await;
        if let Err(e) = &outcome {
            tracing::warn!(id, "job failed: {e:#}");
        }
        // The runner's sinks wrote every change already; this write, retried, makes sure the
        // end is not lost to a passing store failure.
        self.persist(id, |j| j.record = record.clone()).await
    }
}

/// Mirrors a running job's record (and its last step's metrics) into the state store.
struct StoreSink {
    coordinator: Arc<Coordinator>,
    id: String,
}

#[tonic::async_trait]
impl Sink for StoreSink {
    async fn event(&mut self, event: &Event, record: &JobRecord) -> Result<()> {
        match event {
            Event::Log(_) => return Ok(()),
            Event::State { .. } => {
                self.coordinator
                    .update(&self.id, |j| j.record = record.clone())
                    .await?
            }
            Event::Step { metrics, .. } => {
                self.coordinator
                    .update(&self.id, |j| {
                        j.record = record.clone();
                        j.metrics = metrics.clone();
                    })
                    .await?
            }
        };
        Ok(())
    }
}
