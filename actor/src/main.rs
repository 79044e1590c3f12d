//! `actor --model DIR --listen ADDR`

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = rlhf_actor::cli::BinaryArgs::parse();
    rlhf_proto::logging::init_logging(args.log_format);
    match rlhf_actor::cli::serve_blocking(args.serve) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
