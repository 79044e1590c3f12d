//! `rlhf`: the one user-facing binary.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = rlhf_coordinator::cli::Cli::parse();
    // Rust ignores SIGPIPE, so printing into a closed pipe (`rlhf jobs | head -1`) would panic;
    // the default action ends a command quietly, as other tools do. Services keep ignoring it:
    // one must not die because whoever reads its output went away.
    #[cfg(unix)]
    if !cli.command.is_service() {
        // SAFETY: called before this process starts any thread; SIG_DFL is a valid action.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
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
