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
//!
//! Split by concern: [`scheduler`] is the scheduling pass as a pure function (jobs, the running
//! set, slots → a plan); `placement` asks the pool (and Slurm) for a job's workers; `jobs` runs
//! one job with the [`runner`](crate::runner) and mirrors its record into the store; `jobs_api`
//! and `workers_api` are the gRPC faces; `serving` puts them on one port and leads.

mod coordinator;
mod jobs;
mod jobs_api;
mod placement;
pub mod scheduler;
mod serving;
mod workers_api;

pub use coordinator::{Coordinator, LauncherKind, Settings, StoredJob};
pub use jobs_api::{DEFAULT_MAX_JOBS, JobApi, MAX_SPEC_BYTES};
pub use serving::{Config, default_state_dir, run, serve};
pub use workers_api::WorkerApi;
