//! The training service: PPO and GRPO with transformed multi-objective rewards, KL control,
//! SFT, data-parallel gradient sync and exact checkpoints.

pub mod algo;
pub mod checkpoint;
pub mod cli;
pub mod collective;
pub mod config;
pub mod engine;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod publish;
pub mod ring_auth;
pub mod server;
pub mod sft;
pub mod trajectory;

pub use config::LearnerConfig;
pub use engine::{Engine, StepOutcome};
