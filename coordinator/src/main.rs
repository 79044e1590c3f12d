//! `rlhf`: the one user-facing binary.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = rlhf_coordinator::cli::Cli::parse();
    rlhf_proto::logging::init_logging(cli.log_format);
    match rlhf_coordinator::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The whole chain, so the user sees the file/field at the root of the problem.
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
