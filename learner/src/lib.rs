//! The training service: PPO and GRPO with transformed multi-objective rewards, KL control,
//! SFT, data-parallel gradient sync and exact checkpoints.

pub mod algo;
