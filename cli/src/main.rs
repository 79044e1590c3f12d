//! `rlhf`: the one user-facing binary. This crate parses arguments and prints; everything it
//! runs lives in the libraries below it (the control plane, the services, the quickstart).

mod args;
mod bench;
mod cluster;
mod model;
mod reward;
mod run;
mod runtime;
mod security;
mod worker;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
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
    if cli.log_format == rlhf_proto::logging::LogFormat::Json {
        // Every process this one starts (launchers' workers, a pool worker's services) is an
        // `rlhf` that reads its format from the environment: they all log JSON too.
        // SAFETY: called before this process starts any thread.
        unsafe {
            std::env::set_var(args::LOG_FORMAT_ENV, "json");
        }
    }
    // The security flags become the environment every process reads, this one included.
    // SAFETY: called before this process starts any thread.
    unsafe {
        cli.security.export();
    }
    rlhf_proto::logging::init_logging(cli.log_format);
    // A broken security setting (a missing certificate, a token file that is not one) is an
    // error now, before anything runs; the configuration itself is installed on first use (the
    // coordinator first adds its token table).
    if let Err(e) = rlhf_proto::security::Security::from_env() {
        return rlhf_proto::logging::exit_code(Err::<(), _>(e));
    }
    rlhf_proto::logging::exit_code(args::run(cli))
}
