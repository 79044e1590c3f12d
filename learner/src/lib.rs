//! Training service: PPO/GRPO, transformed multi-objective rewards, KL control, checkpoints.
//!
//! This crate is filled in by its own issue; for now it only links the shared crates so the
//! workspace builds end to end.

pub use rlhf_model;
pub use rlhf_proto;
