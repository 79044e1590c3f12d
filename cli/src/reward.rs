//! `rlhf reward serve | train`.

use anyhow::Result;
use clap::Subcommand;
use rlhf_reward::cli::ServeArgs;
use rlhf_reward::train::TrainOptions;

#[derive(Debug, Subcommand)]
pub enum RewardCommand {
    /// Serve reward objectives over gRPC (same as the `reward-server` binary).
    Serve(ServeArgs),
    /// Train a Bradley-Terry reward model on preference pairs.
    Train(TrainOptions),
}

pub fn run(command: RewardCommand) -> Result<()> {
    match command {
        RewardCommand::Serve(args) => rlhf_reward::cli::serve_blocking(args),
        RewardCommand::Train(opts) => {
            let report = rlhf_reward::train::train(&opts)?;
            let last = report.epochs.last();
            eprintln!(
                "trained on {} pairs ({} held out, {} lines skipped, {} too long); final loss {:.4}, held-out accuracy {}",
                report.train_pairs,
                report.eval_pairs,
                report.skipped_lines,
                report.skipped_too_long,
                last.map_or(f64::NAN, |e| e.train_loss),
                last.and_then(|e| e.eval_accuracy)
                    .map_or("n/a".to_string(), |a| format!("{:.3}", a)),
            );
            eprintln!("saved to {}", opts.out.display());
            Ok(())
        }
    }
}
