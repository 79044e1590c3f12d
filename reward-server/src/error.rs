//! Errors of the reward service, each mapped once to a gRPC status.

use std::path::{Path, PathBuf};

/// A configuration problem, located by file, line and field.
#[derive(Debug)]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    pub fn new(path: &Path, line: Option<usize>, field: &str, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.to_path_buf(),
            line,
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// Why a Score request failed.
///
/// Whether a failure is worth retrying is decided once, on the gRPC status it maps to
/// (`From<ScoreError> for Status`, exhaustive), by `rlhf_proto::error::Failure`: the reward
/// server's callers and its own remote objectives judge failures the same way.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ScoreError {
    /// The request itself is wrong (names the sample and the problem).
    #[error("{0}")]
    InvalidArgument(String),
    /// A queue is full; the caller should back off.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// The request's deadline passed before it was scored.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// An objective failed to compute (a remote server down, a model error).
    #[error("objective `{objective}`: {message}")]
    Objective { objective: String, message: String },
    /// The server is shutting down.
    #[error("shutting down")]
    Unavailable,
}

impl ScoreError {
    /// Prefixes an objective failure with the objective's name.
    pub fn in_objective(self, objective: &str) -> ScoreError {
        match self {
            ScoreError::Objective { message, .. } => ScoreError::Objective {
                objective: objective.to_string(),
                message,
            },
            other => other,
        }
    }
}

impl From<ScoreError> for tonic::Status {
    fn from(err: ScoreError) -> Self {
        let message = err.to_string();
        match err {
            ScoreError::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            ScoreError::Overloaded(_) => tonic::Status::resource_exhausted(message),
            ScoreError::DeadlineExceeded(_) => tonic::Status::deadline_exceeded(message),
            ScoreError::Objective { .. } => tonic::Status::unavailable(message),
            ScoreError::Unavailable => tonic::Status::unavailable(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use rlhf_proto::error::Failure;

    use super::*;

    /// What callers will make of each error (the mapping above decides it).
    #[test]
    fn callers_retry_what_can_succeed_later() {
        let cases = [
            (ScoreError::InvalidArgument("x".into()), Failure::Rejected),
            (ScoreError::Overloaded("x".into()), Failure::Overloaded),
            (ScoreError::DeadlineExceeded("x".into()), Failure::TimedOut),
            (
                ScoreError::Objective {
                    objective: "o".into(),
                    message: "down".into(),
                },
                Failure::Unavailable,
            ),
            (ScoreError::Unavailable, Failure::Unavailable),
        ];
        for (err, want) in cases {
            let status = tonic::Status::from(err.clone());
            assert_eq!(Failure::of(&status), want, "{err}");
            assert_eq!(
                Failure::of(&status).retryable(),
                !matches!(err, ScoreError::InvalidArgument(_)),
                "{err}"
            );
        }
    }
}
