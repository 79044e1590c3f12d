//! Reward service: multi-objective scoring and Bradley-Terry reward-model training.
//!
//! This crate is filled in by its own issue; for now it only links the shared crates so the
//! workspace builds end to end.

pub use rlhf_model;
pub use rlhf_proto;
