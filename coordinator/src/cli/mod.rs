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
    /// Supervised fine-tuning on prompt/response pairs (loss on response tokens only).
    Sft(rlhf_learner::sft::SftOptions),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Model { command } => model::run(command),
        Command::Reward { command } => reward::run(command),
        Command::Sft(opts) => {
            let report = rlhf_learner::sft::train_sft(&opts)?;
            if let Some(last) = report.last() {
                let eval = last
                    .eval_nll
                    .map_or("n/a".to_string(), |v| format!("{v:.4}"));
                eprintln!(
                    "SFT done: train NLL {:.4}, held-out NLL {eval}; saved to {}",
                    last.train_nll,
                    opts.out.display()
                );
            }
            Ok(())
        }
    }
}
