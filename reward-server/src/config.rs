//! The reward server's TOML configuration, validated into [`RewardConfig`].
//!
//! ```toml
//! tokenizer = "models/policy"      # decodes samples sent as token ids; counts completion tokens
//!
//! [batching]                       # every field optional, defaults below
//! max_batch_size = 32              # sequences per forward pass
//! max_batch_tokens = 8192          # padded tokens per forward pass
//! max_wait_ms = 0                  # extra wait for more requests (queued ones always join)
//! queue_capacity = 256             # waiting requests per model; beyond: RESOURCE_EXHAUSTED
//! request_timeout_ms = 30000       # deadline of a request without its own
//!
//! [[objective]]
//! name = "helpful"
//! kind = "model"
//! model = "models/rm-helpful"      # or models = [..] with aggregation
//!
//! [[objective]]
//! name = "no-swearing"
//! kind = "rule"
//! verifier = "forbidden_words"
//! words = ["darn", "heck"]
//! mode = "any"
//!
//! [[objective]]
//! name = "python-judge"
//! kind = "remote"
//! address = "http://127.0.0.1:50061"
//! ```
//!
//! Every problem is reported with the file, the line of the objective's table and the field.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::ConfigError;
use crate::rules::{Aggregation, ForbiddenMode, Rule};

/// A validated reward-server configuration.
#[derive(Debug, Clone)]
pub struct RewardConfig {
    pub tokenizer: Option<PathBuf>,
    pub batching: BatchingConfig,
    pub objectives: Vec<ObjectiveSpec>,
}

/// Dynamic batching and admission limits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchingConfig {
    pub max_batch_size: usize,
    pub max_batch_tokens: usize,
    pub max_wait_ms: u64,
    pub queue_capacity: usize,
    pub request_timeout_ms: u64,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        BatchingConfig {
            max_batch_size: 32,
            max_batch_tokens: 8192,
            max_wait_ms: 0,
            queue_capacity: 256,
            request_timeout_ms: 30_000,
        }
    }
}

impl BatchingConfig {
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// Batching off: every request is scored alone, at once (the benchmark's baseline).
    pub fn unbatched(&self) -> Self {
        BatchingConfig {
            max_batch_size: 1,
            max_wait_ms: 0,
            ..self.clone()
        }
    }
}

/// One objective: its name and how its value is computed.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectiveSpec {
    pub name: String,
    pub kind: ObjectiveKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ObjectiveKind {
    /// One Bradley-Terry reward model, or an ensemble aggregated per sample.
    Model {
        models: Vec<PathBuf>,
        aggregation: Aggregation,
    },
    Rule(Rule),
    /// Another `RewardService`; `objective` names which of its objectives (its only one when
    /// unset).
    Remote {
        address: String,
        objective: Option<String>,
        timeout: Duration,
    },
}

impl ObjectiveKind {
    pub fn label(&self) -> &'static str {
        match self {
            ObjectiveKind::Model { .. } => "model",
            ObjectiveKind::Rule(_) => "rule",
            ObjectiveKind::Remote { .. } => "remote",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    tokenizer: Option<PathBuf>,
    #[serde(default)]
    batching: BatchingConfig,
    #[serde(default)]
    objective: Vec<toml::Spanned<RawObjective>>,
}

/// Every field any kind may use; [`validate_objective`] checks which belong together.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawObjective {
    name: Option<String>,
    kind: Option<String>,
    // model
    model: Option<PathBuf>,
    models: Option<Vec<PathBuf>>,
    aggregation: Option<String>,
    lambda: Option<f64>,
    // rule
    verifier: Option<String>,
    answer_pattern: Option<String>,
    answer_key: Option<String>,
    pattern: Option<String>,
    words: Option<Vec<String>>,
    mode: Option<String>,
    case_sensitive: Option<bool>,
    max_tokens: Option<usize>,
    cache_tokens: Option<usize>,
    byte: Option<String>,
    // remote
    address: Option<String>,
    objective: Option<String>,
    timeout_ms: Option<u64>,
}

impl RawObjective {
    /// Names of the fields that are set, for "does not belong to this kind" checks.
    fn set_fields(&self) -> Vec<&'static str> {
        let mut set = Vec::new();
        let mut mark = |present: bool, name: &'static str| {
            if present {
                set.push(name)
            }
        };
        mark(self.model.is_some(), "model");
        mark(self.models.is_some(), "models");
        mark(self.aggregation.is_some(), "aggregation");
        mark(self.lambda.is_some(), "lambda");
        mark(self.verifier.is_some(), "verifier");
        mark(self.answer_pattern.is_some(), "answer_pattern");
        mark(self.answer_key.is_some(), "answer_key");
        mark(self.pattern.is_some(), "pattern");
        mark(self.words.is_some(), "words");
        mark(self.mode.is_some(), "mode");
        mark(self.byte.is_some(), "byte");
        mark(self.case_sensitive.is_some(), "case_sensitive");
        mark(self.max_tokens.is_some(), "max_tokens");
        mark(self.cache_tokens.is_some(), "cache_tokens");
        mark(self.address.is_some(), "address");
        mark(self.objective.is_some(), "objective");
        mark(self.timeout_ms.is_some(), "timeout_ms");
        set
    }
}

impl RewardConfig {
    /// Reads and validates a TOML file. Relative model paths are resolved against the file's
    /// folder.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path, None, "", e.to_string()))?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates TOML text; `path` names the file in errors and anchors relative
    /// paths.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            ConfigError::new(path, line, "", e.message().to_string())
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let b = &raw.batching;
        let positive = [
            ("batching.max_batch_size", b.max_batch_size as u64),
            ("batching.max_batch_tokens", b.max_batch_tokens as u64),
            ("batching.queue_capacity", b.queue_capacity as u64),
            ("batching.request_timeout_ms", b.request_timeout_ms),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ConfigError::new(path, None, field, "must be at least 1"));
            }
        }
        if raw.objective.is_empty() {
            return Err(ConfigError::new(
                path,
                None,
                "objective",
                "at least one [[objective]] is required",
            ));
        }
        let mut objectives = Vec::with_capacity(raw.objective.len());
        for (i, spanned) in raw.objective.into_iter().enumerate() {
            let line = Some(line_of(text, spanned.span().start));
            let spec = validate_objective(spanned.into_inner(), &resolve).map_err(
                |(field, message)| {
                    ConfigError::new(path, line, &format!("objective[{i}].{field}"), message)
                },
            )?;
            if objectives
                .iter()
                .any(|o: &ObjectiveSpec| o.name == spec.name)
            {
                return Err(ConfigError::new(
                    path,
                    line,
                    &format!("objective[{i}].name"),
                    format!(
                        "`{}` is used by an earlier objective; names must be unique",
                        spec.name
                    ),
                ));
            }
            objectives.push(spec);
        }
        Ok(RewardConfig {
            tokenizer: raw.tokenizer.map(resolve),
            batching: raw.batching,
            objectives,
        })
    }
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

type FieldError = (&'static str, String);

fn validate_objective(
    raw: RawObjective,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<ObjectiveSpec, FieldError> {
    let name = match raw.name.as_deref().map(str::trim) {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => {
            return Err((
                "name",
                "missing (every objective needs a unique name)".into(),
            ));
        }
    };
    let kind = raw.kind.as_deref().unwrap_or("");
    let (allowed, kind): (&[&str], ObjectiveKind) = match kind {
        "model" => (
            &["model", "models", "aggregation", "lambda"],
            model_kind(&raw, resolve)?,
        ),
        "rule" => {
            let (allowed, rule) = rule_kind(&raw)?;
            (allowed, ObjectiveKind::Rule(rule))
        }
        "remote" => (&["address", "objective", "timeout_ms"], remote_kind(&raw)?),
        "" => return Err(("kind", "missing (one of: model, rule, remote)".into())),
        other => {
            return Err((
                "kind",
                format!("`{other}` is not one of: model, rule, remote"),
            ));
        }
    };
    if let Some(extra) = raw.set_fields().into_iter().find(|f| !allowed.contains(f)) {
        return Err((extra, format!("is not used by kind = \"{}\"", kind.label())));
    }
    Ok(ObjectiveSpec { name, kind })
}

fn model_kind(
    raw: &RawObjective,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<ObjectiveKind, FieldError> {
    let models: Vec<PathBuf> = match (&raw.model, &raw.models) {
        (Some(m), None) => vec![m.clone()],
        (None, Some(ms)) if !ms.is_empty() => ms.clone(),
        (None, Some(_)) => return Err(("models", "is empty".into())),
        (Some(_), Some(_)) => {
            return Err(("models", "set either `model` or `models`, not both".into()));
        }
        (None, None) => {
            return Err((
                "model",
                "missing (a reward model folder, or `models` = [..])".into(),
            ));
        }
    };
    let models: Vec<PathBuf> = models.into_iter().map(resolve).collect();
    for m in &models {
        if !m.join("config.json").is_file() {
            return Err((
                "model",
                format!("{} is not a model folder (no config.json)", m.display()),
            ));
        }
    }
    let aggregation = match raw.aggregation.as_deref() {
        None | Some("mean") => Aggregation::Mean,
        Some("median") => Aggregation::Median,
        Some("min") => Aggregation::Min,
        Some("mean_minus_std") => Aggregation::MeanMinusStd {
            lambda: raw.lambda.unwrap_or(1.0),
        },
        Some(other) => {
            return Err((
                "aggregation",
                format!("`{other}` is not one of: mean, median, min, mean_minus_std"),
            ));
        }
    };
    if raw.lambda.is_some() && !matches!(aggregation, Aggregation::MeanMinusStd { .. }) {
        return Err((
            "lambda",
            "only used with aggregation = \"mean_minus_std\"".into(),
        ));
    }
    Ok(ObjectiveKind::Model {
        models,
        aggregation,
    })
}

fn rule_kind(raw: &RawObjective) -> Result<(&'static [&'static str], Rule), FieldError> {
    let regex = |field: &'static str, pattern: &str| {
        regex::Regex::new(pattern).map_err(|e| (field, format!("invalid regex: {e}")))
    };
    match raw.verifier.as_deref() {
        Some("exact_answer") => {
            let pattern = raw
                .answer_pattern
                .as_deref()
                .unwrap_or(crate::rules::DEFAULT_ANSWER_PATTERN);
            Ok((
                &["verifier", "answer_pattern", "answer_key"],
                Rule::ExactAnswer {
                    pattern: regex("answer_pattern", pattern)?,
                    key: raw.answer_key.clone().unwrap_or_else(|| "answer".into()),
                },
            ))
        }
        Some("regex") => {
            let Some(p) = &raw.pattern else {
                return Err((
                    "pattern",
                    "missing (the regex a completion must match)".into(),
                ));
            };
            Ok((&["verifier", "pattern"], Rule::Regex(regex("pattern", p)?)))
        }
        Some("forbidden_words") => {
            let words = raw.words.clone().unwrap_or_default();
            if words.is_empty() || words.iter().any(|w| w.trim().is_empty()) {
                return Err((
                    "words",
                    "a non-empty list of non-empty words is required".into(),
                ));
            }
            let mode = match raw.mode.as_deref() {
                None | Some("count") => ForbiddenMode::Count,
                Some("any") => ForbiddenMode::Any,
                Some(other) => {
                    return Err(("mode", format!("`{other}` is not one of: count, any")));
                }
            };
            let rule = Rule::forbidden_words(&words, mode, raw.case_sensitive.unwrap_or(false))
                .map_err(|e| ("words", e))?;
            Ok((&["verifier", "words", "mode", "case_sensitive"], rule))
        }
        Some("length") => {
            let Some(max_tokens) = raw.max_tokens else {
                return Err((
                    "max_tokens",
                    "missing (L_max of the overlong penalty)".into(),
                ));
            };
            let cache_tokens = raw.cache_tokens.unwrap_or(max_tokens / 4);
            if cache_tokens == 0 || cache_tokens > max_tokens {
                return Err((
                    "cache_tokens",
                    format!("must be in 1..={max_tokens} (max_tokens), found {cache_tokens}"),
                ));
            }
            Ok((
                &["verifier", "max_tokens", "cache_tokens"],
                Rule::Length {
                    max_tokens,
                    cache_tokens,
                },
            ))
        }
        Some("byte_share") => match raw.byte.as_deref().map(str::as_bytes) {
            Some([b]) => Ok((&["verifier", "byte"], Rule::ByteShare(*b))),
            _ => Err((
                "byte",
                "must be exactly one byte (an ASCII character), e.g. \"a\"".into(),
            )),
        },
        Some(other) => Err((
            "verifier",
            format!(
                "`{other}` is not one of: exact_answer, regex, forbidden_words, length, byte_share"
            ),
        )),
        None => Err((
            "verifier",
            "missing (one of: exact_answer, regex, forbidden_words, length, byte_share)".into(),
        )),
    }
}

fn remote_kind(raw: &RawObjective) -> Result<ObjectiveKind, FieldError> {
    let Some(address) = raw.address.clone() else {
        return Err(("address", "missing (e.g. \"http://10.0.0.5:50061\")".into()));
    };
    let normalized = rlhf_proto::client::normalize_address(&address);
    if normalized.parse::<tonic::transport::Uri>().is_err() {
        return Err(("address", format!("`{address}` is not a valid address")));
    }
    let timeout_ms = raw.timeout_ms.unwrap_or(10_000);
    if timeout_ms == 0 {
        return Err(("timeout_ms", "must be at least 1".into()));
    }
    Ok(ObjectiveKind::Remote {
        address: normalized,
        objective: raw.objective.clone(),
        timeout: Duration::from_millis(timeout_ms),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RewardConfig, ConfigError> {
        RewardConfig::from_toml(text, Path::new("/cfg/rewards.toml"))
    }

    #[test]
    fn rules_and_remote_parse_with_defaults() {
        let c = parse(
            r#"
[[objective]]
name = "num"
kind = "rule"
verifier = "exact_answer"

[[objective]]
name = "len"
kind = "rule"
verifier = "length"
max_tokens = 100

[[objective]]
name = "far"
kind = "remote"
address = "127.0.0.1:9"
"#,
        )
        .unwrap();
        assert_eq!(c.objectives.len(), 3);
        assert_eq!(c.batching, BatchingConfig::default());
        assert!(matches!(
            c.objectives[1].kind,
            ObjectiveKind::Rule(Rule::Length {
                max_tokens: 100,
                cache_tokens: 25
            })
        ));
        match &c.objectives[2].kind {
            ObjectiveKind::Remote { address, .. } => assert_eq!(address, "http://127.0.0.1:9"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let err = parse(
            "[[objective]]\nname = \"a\"\nkind = \"rule\"\nverifier = \"regex\"\npattern = \"(\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("/cfg/rewards.toml:1")
                && err.contains("objective[0].pattern")
                && err.contains("invalid regex"),
            "{err}"
        );

        let err = parse(
            "[[objective]]\nname = \"a\"\nkind = \"rule\"\nverifier = \"regex\"\npatern = \"x\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("patern") && err.contains(":5"), "{err}");

        let err = parse("[[objective]]\nname = \"a\"\nkind = \"rule\"\nverifier = \"regex\"\npattern = \"x\"\naddress = \"h:1\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("objective[0].address") && err.contains("not used by kind = \"rule\""),
            "{err}"
        );

        let err = parse("[[objective]]\nname = \"a\"\nkind = \"rule\"\nverifier = \"regex\"\npattern = \"x\"\n\n[[objective]]\nname = \"a\"\nkind = \"rule\"\nverifier = \"regex\"\npattern = \"y\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(":7") && err.contains("objective[1].name") && err.contains("unique"),
            "{err}"
        );

        let err = parse("[[objective]]\nname = \"m\"\nkind = \"model\"\nmodel = \"nowhere\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/cfg/nowhere") && err.contains("not a model folder"),
            "{err}"
        );

        let err = parse("[batching]\nmax_batch_size = 0\n[[objective]]\nname = \"a\"\nkind = \"rule\"\nverifier = \"regex\"\npattern = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("batching.max_batch_size"), "{err}");

        let err = parse("").unwrap_err().to_string();
        assert!(err.contains("at least one [[objective]]"), "{err}");
    }
}
