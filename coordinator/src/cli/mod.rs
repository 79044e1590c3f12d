//! Command-line interface of `rlhf`. Each subcommand group lives in its own module.

mod model;
mod reward;

use clap::{Parser, Subcommand};

use rlhf_proto::logging::LogFormat;

/// Align Llama-family language models with online RL against several rewards at once.
#[derive(Debug, Parser)]
#[command(name = "rlhf", version, about)]
pub struct Cli {
    /// Log line format on stderr.
    #[arg(long, global = true, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inspect and run a model folder (Hugging Face layout).
    Model {
        #[command(subcommand)]
        command: model::ModelCommand,
    },
    /// Serve reward objectives, or train a reward model.
    Reward {
        #[command(subcommand)]
        command: reward::RewardCommand,
    },
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Model { command } => model::run(command),
        Command::Reward { command } => reward::run(command),
    }
}
