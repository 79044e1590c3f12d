//! `rlhf worker --role actor|learner|reward -- ARGS`: one service process, as the launchers
//! start them. The arguments after `--` are those of the role's own binary (`actor`, `learner`,
//! `reward-server`).

use anyhow::Result;
use clap::{Args, Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    Actor,
    Learner,
    Reward,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[arg(long, value_enum)]
    role: Role,
    /// The role's own arguments (see `actor --help`, `learner --help`, `reward-server --help`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

#[derive(Debug, Parser)]
struct ActorArgs {
    #[command(flatten)]
    serve: rlhf_actor::cli::ServeArgs,
}

#[derive(Debug, Parser)]
struct LearnerArgs {
    #[command(flatten)]
    serve: rlhf_learner::cli::ServeArgs,
}

#[derive(Debug, Parser)]
struct RewardArgs {
    #[command(flatten)]
    serve: rlhf_reward::cli::ServeArgs,
}

/// Exits when the parent process goes away (the launcher died without stopping us).
#[cfg(unix)]
fn exit_with_parent() {
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(std::time::Duration::from_millis(500));
            if std::os::unix::process::parent_id() != parent {
                tracing::warn!("the launching process is gone; exiting");
                std::process::exit(0);
            }
        }
    });
}

pub fn run(w: WorkerArgs) -> Result<()> {
    #[cfg(unix)]
    exit_with_parent();
    let argv =
        std::iter::once(format!("rlhf worker --role {:?}", w.role).to_lowercase()).chain(w.args);
    match w.role {
        Role::Actor => rlhf_actor::cli::serve_blocking(ActorArgs::try_parse_from(argv)?.serve),
        Role::Learner => {
            rlhf_learner::cli::serve_blocking(LearnerArgs::try_parse_from(argv)?.serve)
        }
        Role::Reward => rlhf_reward::cli::serve_blocking(RewardArgs::try_parse_from(argv)?.serve),
    }
}
