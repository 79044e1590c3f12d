//! Command-line interface of `rlhf`. Each subcommand group lives in its own module.

mod model;

use clap::{Parser, Subcommand};

use crate::logging::LogFormat;

/// Align Llama-family language models with online RL against several rewards at once.
#[derive(Debug, Parser)]
#[command(name = "rlhf", version, about)]
pub struct Cli {
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
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
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Model { command } => model::run(command),
    }
}
