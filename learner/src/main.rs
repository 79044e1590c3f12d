//! `learner --config learner.toml --listen ADDR`

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = rlhf_learner::cli::BinaryArgs::parse();
    rlhf_proto::logging::init_logging(args.log_format);
    rlhf_proto::logging::exit_code(rlhf_learner::cli::serve_blocking(args.serve))
}
