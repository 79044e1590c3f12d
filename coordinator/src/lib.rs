//! The control plane and the `rlhf` command line.

pub mod cli;
