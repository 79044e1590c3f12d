//! The model crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while reading, running or writing a model.
///
/// Each variant names the file, field or tensor at fault, so that the message alone tells a user
/// what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("cannot access {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file is not valid JSON or does not have the expected structure.
    #[error("{path}: invalid JSON")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A field of `config.json` (or another config file) is missing or has a bad value.
    #[error("{path}: field `{field}`: {message}")]
    Config {
        path: PathBuf,
        field: String,
        message: String,
    },
    /// The checkpoint's architecture is not one this crate implements; `supported` lists the
    /// ones it does.
    #[error(
        "{path}: architecture `{architecture}` is not supported (supported: {list})",
        list = supported.join(", ")
    )]
    UnsupportedArchitecture {
        path: PathBuf,
        architecture: String,
        supported: &'static [&'static str],
    },
    /// A safetensors file is malformed or holds a tensor we cannot use.
    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },
    /// The checkpoint lacks tensors the model needs.
    #[error("{dir}: missing tensors: {names}", names = names.join(", "))]
    MissingTensors { dir: PathBuf, names: Vec<String> },
    /// The checkpoint has tensors the model does not know.
    #[error(
        "{dir}: unexpected tensors (is this the right architecture?): {names}",
        names = names.join(", ")
    )]
    UnexpectedTensors { dir: PathBuf, names: Vec<String> },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// The tokenizer could not be loaded or failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be parsed or rendered.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A caller passed an invalid argument (token id out of range, empty batch, ...).
    #[error("{0}")]
    InvalidInput(String),
    /// The compute backend reported an error.
    #[error("backend: {0}")]
    Backend(String),
}

/// Result alias of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::Config {
            path: path.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}
