//! `rlhf`: the one user-facing binary. This crate parses arguments and prints; everything it
//! runs lives in the libraries below it (the control plane, the services, the quickstart).

mod args;
mod bench;
mod chaos;
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
    // Rust ignores SIGPIPE, so printing into a closed pipe (`rlhf jobs | head -1`) panics.
    // SIGPIPE cannot simply be given its default action back: a write to a socket the peer
    // closed raises it too (a TLS server hanging up on a plaintext client would kill the CLI
    // without a word). Instead a failed print to stdout ends the process as the default action
    // would, and socket writes keep failing with EPIPE, as errors the CLI reports.
    #[cfg(unix)]
    if !cli.command.is_service() {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .unwrap_or("");
            if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
                // SAFETY: restoring the default action and raising the signal in this thread
                // ends the process as a tool that never ignored SIGPIPE would end.
                unsafe {
                    libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                    libc::raise(libc::SIGPIPE);
                }
            }
            default(info);
        }));
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
