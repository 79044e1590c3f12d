//! The rollout actor: generates completions with continuous batching, scores them on the reward
//! server and pushes them to the learners as they finish, and swaps in new weights between
//! decode iterations.

pub mod cli;
pub mod engine;
pub mod metrics;
pub mod peers;
pub mod request;
pub mod rollout;
pub mod service;
pub mod stream;
pub mod weights;
