//! The control plane and the `rlhf` command line.

pub mod cli;
pub mod controller;
pub mod data;
pub mod job;
pub mod launcher;
pub mod metrics;
pub mod pipeline;
pub mod plot;
pub mod pool;
pub mod service;
pub mod slurm;
pub mod state;
pub mod store;
