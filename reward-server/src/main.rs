//! `reward-server --config rewards.toml --listen ADDR`

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = rlhf_reward::cli::BinaryArgs::parse();
    rlhf_proto::logging::init_logging(args.log_format);
    // A broken TLS/token setting is reported before anything starts (docs/security.md).
    let security = rlhf_proto::security::init()
        .map(|_| ())
        .map_err(anyhow::Error::msg);
    rlhf_proto::logging::exit_code(
        security.and_then(|()| rlhf_reward::cli::serve_blocking(args.serve)),
    )
}
