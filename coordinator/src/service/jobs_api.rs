//! The job API (`JobService`): submit, get, list, cancel, watch, logs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rlhf_proto::v1;
use rlhf_proto::v1::job_service_server::JobService;
use tokio::sync::mpsc;
use tokio_stream::Stream;

/// A job file larger than this is refused before it is parsed.
pub const MAX_SPEC_BYTES: usize = 1 << 20;
/// The default of `--max-jobs`.
pub const DEFAULT_MAX_JOBS: usize = 1000;
use tonic::{Request, Response, Status};

use super::coordinator::{Coordinator, JOBS, StoredJob, internal};
use crate::job::JobSpec;
use crate::logs;
use crate::state::{JobRecord, JobState, now};

/// The gRPC face of a [`Coordinator`].
pub struct JobApi(pub Arc<Coordinator>);

type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for JobApi {
    type LogsStream = Pin<Box<dyn Stream<Item = Result<v1::LogLine, Status>> + Send>>;

    /// The job's log lines (see [`crate::logs`]): read from its output folder's `logs/`, on the
    /// filesystem this coordinator shares with the job's workers.
    #[tracing::instrument(skip_all, name = "jobs.logs")]
    async fn logs(
        &self,
        request: Request<v1::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let r = request.into_inner();
        let c = self.0.clone();
        let job = c
            .load(&r.id)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("no job `{}`", r.id)))?;
        let options = logs::StreamOptions {
            follow: r.follow,
            tail: r.tail as usize,
        };
        let id = r.id;
        // Ended: a final state, or a record that is gone.
        let ended = move || {
            let (c, id) = (c.clone(), id.clone());
            async move {
                let job = c.load(&id).await?;
                Ok(job.is_none_or(|j| j.record.state.is_terminal()))
            }
        };
        let (tx, rx) = mpsc::channel(256);
        let reader = tokio::spawn(logs::stream(
            logs::folder(&job.output_dir),
            options,
            ended,
            tx,
        ));
        let lines = tokio_stream::wrappers::ReceiverStream::new(rx).map(|l| {
            Ok(v1::LogLine {
                source: l.source,
                line: l.line,
            })
        });
        // After the last line: the reader's failure, if it failed.
        let end = futures::stream::once(async move {
            match reader.await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(Err(internal(e))),
                Err(e) => Some(Err(Status::internal(format!("the log reader: {e}")))),
            }
        })
        .filter_map(std::future::ready);
        Ok(Response::new(Box::pin(lines.chain(end))))
    }

    #[tracing::instrument(skip_all, name = "jobs.submit")]
    async fn submit(
        &self,
        request: Request<v1::SubmitJobRequest>,
    ) -> Result<Response<v1::JobInfo>, Status> {
        let r = request.into_inner();
        if r.spec_toml.len() > MAX_SPEC_BYTES {
            return Err(Status::invalid_argument(format!(
                "spec_toml: {} bytes, more than a job file may hold ({MAX_SPEC_BYTES})",
                r.spec_toml.len()
            )));
        }
        let base = PathBuf::from(&r.base_dir);
        let invalid = |problems: Vec<String>| {
            Status::invalid_argument(format!(
                "{} problem(s):\n{}",
                problems.len(),
                problems.join("\n")
            ))
        };
        let file = base.join("job.toml");
        let c = &self.0;
        // Paths are judged before any is looked at: whether a file outside the allowed
        // directories exists is not the submitter's to learn.
        let spec = JobSpec::parse_unchecked(&r.spec_toml, &file).map_err(invalid)?;
        let problems = c
            .allowed
            .problems(&spec, &c.state_dir.join("runs").join(&spec.name));
        if !problems.is_empty() {
            return Err(invalid(problems));
        }
        let spec = spec.checked(&file).map_err(invalid)?;
        let live = c.all().await.map_err(internal)?;
        let open = live
            .iter()
            .filter(|j| !j.record.state.is_terminal())
            .count();
        if open >= c.max_jobs {
            return Err(Status::resource_exhausted(format!(
                "{open} jobs are queued or running, the most this coordinator holds \
                 (--max-jobs {}); submit again when some have ended",
                c.max_jobs
            )));
        }
        if let Some(dir) = &spec.output_dir
            && let Some(other) = live
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
            if c.pool
                .writer()
                .create(&format!("{JOBS}{id}"), &text)
                .await
                .map_err(internal)?
            {
                c.wake.notify_one();
                return Ok(Response::new(job.info()));
            }
        }
        Err(Status::resource_exhausted("no free job id"))
    }

    #[tracing::instrument(skip_all, name = "jobs.get")]
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

    #[tracing::instrument(skip_all, name = "jobs.list")]
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

    #[tracing::instrument(skip_all, name = "jobs.cancel")]
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

    #[tracing::instrument(skip_all, name = "jobs.watch")]
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
