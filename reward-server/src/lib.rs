//! The reward service: scores (prompt, completion) samples on every configured objective —
//! Bradley-Terry reward models (alone or as ensembles), built-in verifiers, remote reward
//! servers — with dynamic batching; and Bradley-Terry reward-model training.

pub mod batcher;
pub mod cli;
pub mod config;
pub mod error;
pub mod metrics;
pub mod remote;
pub mod rules;
pub mod sample;
pub mod scorer;
pub mod server;
pub mod train;

pub use config::RewardConfig;
pub use error::{ConfigError, ScoreError};
pub use scorer::Scorer;
