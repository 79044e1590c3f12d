//! One place that sets up `tracing` for every binary (STYLE.md §9).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written (always to stderr, so stdout stays clean for `--json` output).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber; `RUST_LOG` filters (default `info`). Colour codes only when
/// stderr is a terminal (a log file or a pipe gets plain text).
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // A second call (e.g. from tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A binary's exit: success, or the error with its whole chain of causes on stderr (so the user
/// sees the file or field at the root of the problem) and a failure code.
pub fn exit_code<E>(result: Result<(), E>) -> std::process::ExitCode
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Err(err) = result else {
        return std::process::ExitCode::SUCCESS;
    };
    let err: Box<dyn std::error::Error + Send + Sync> = err.into();
    eprintln!("error: {err}");
    let mut cause = err.source();
    while let Some(c) = cause {
        eprintln!("  caused by: {c}");
        cause = c.source();
    }
    std::process::ExitCode::FAILURE
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format `{other}` (expected text or json)"
            )),
        }
    }
}
