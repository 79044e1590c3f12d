//! The control plane: job files and their validation, the per-job training controller and the
//! runner that drives it, the launchers (local processes, the worker pool, Slurm), the
//! long-running coordinator service and its state store, and the generic pipeline stages.
//! The `rlhf` command line (crate `rlhf-cli`) sits on top; nothing here prints to a terminal.

pub mod allow;
pub mod chaos;
pub mod controller;
pub mod data;
pub mod job;
pub mod launcher;
pub mod logs;
pub mod metrics;
pub mod pipeline;
pub mod plot;
pub mod pool;
pub mod runner;
pub mod service;
pub mod slurm;
pub mod state;
pub mod step_record;
pub mod store;
