//! The learner's maths: pure functions over host vectors or tensors, one module per topic,
//! separate from the I/O that feeds them (DESIGN.md, rules of the house).

pub mod grpo;
pub mod kl;
pub mod policy_loss;
pub mod ppo;
pub mod stats;
pub mod transform;
