//! Built-in verifiers and ensemble aggregation: pure functions from a sample to a value.
//!
//! Conventions (larger is better for every objective):
//! - `exact_answer`: 1 when the extracted answer equals the sample's reference answer, else 0.
//! - `regex`: 1 when the completion matches, else 0.
//! - `forbidden_words`: mode `any` gives 1 when no listed word appears, else 0; mode `count`
//!   gives minus the number of occurrences (0 is best).
//! - `length`: DAPO's soft overlong penalty over completion tokens (0 up to L_max - L_cache,
//!   linear down to -1 at L_max, -1 beyond).

use std::collections::HashMap;

use regex::Regex;

/// The last number of the text, the usual final-answer convention of math datasets.
pub const DEFAULT_ANSWER_PATTERN: &str = r"(-?[0-9][0-9,]*(?:\.[0-9]+)?)[^0-9]*$";

/// A verifier.
#[derive(Debug, Clone)]
pub enum Rule {
    ExactAnswer {
        pattern: Regex,
        key: String,
    },
    Regex(Regex),
    ForbiddenWords {
        matcher: Regex,
        mode: ForbiddenMode,
    },
    Length {
        max_tokens: usize,
        cache_tokens: usize,
    },
    ByteShare(u8),
}

impl PartialEq for Rule {
    fn eq(&self, other: &Self) -> bool {
        self.describe() == other.describe()
    }
}

/// How `forbidden_words` turns matches into a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForbiddenMode {
    Count,
    Any,
}

/// What a verifier needs of a sample.
pub struct RuleInput<'a> {
    pub completion: &'a str,
    pub completion_tokens: Option<usize>,
    pub metadata: &'a HashMap<String, String>,
}

impl Rule {
    /// A whole-word matcher over `words` (regex metacharacters in words are literal; a word
    /// boundary is required on each side that is a word character, so `c++` matches too).
    pub fn forbidden_words(
        words: &[String],
        mode: ForbiddenMode,
        case_sensitive: bool,
    ) -> Result<Rule, String> {
        let is_word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        let alternatives: Vec<String> = words
            .iter()
            .map(|w| {
                let w = w.trim();
                let start = if is_word(w.chars().next()) { r"\b" } else { "" };
                let end = if is_word(w.chars().last()) { r"\b" } else { "" };
                format!("{start}{}{end}", regex::escape(w))
            })
            .collect();
        let flags = if case_sensitive { "" } else { "(?i)" };
        let pattern = format!("{flags}(?:{})", alternatives.join("|"));
        let matcher =
            Regex::new(&pattern).map_err(|e| format!("cannot build the word matcher: {e}"))?;
        Ok(Rule::ForbiddenWords { matcher, mode })
    }

    /// Whether the rule needs the completion's token count.
    pub fn needs_tokens(&self) -> bool {
        matches!(self, Rule::Length { .. })
    }

    /// The metadata key the rule reads, if any.
    pub fn metadata_key(&self) -> Option<&str> {
        match self {
            Rule::ExactAnswer { key, .. } => Some(key),
            _ => None,
        }
    }

    /// The value of one sample. Errors say what the sample lacks.
    pub fn score(&self, input: &RuleInput) -> Result<f32, String> {
        match self {
            Rule::ExactAnswer { pattern, key } => {
                let Some(reference) = input.metadata.get(key) else {
                    return Err(format!("metadata has no `{key}` (the reference answer)"));
                };
                let found = extract_answer(pattern, input.completion);
                Ok(found.is_some_and(|a| answers_equal(a, reference)) as u8 as f32)
            }
            Rule::Regex(re) => Ok(re.is_match(input.completion) as u8 as f32),
            Rule::ForbiddenWords { matcher, mode } => {
                let hits = matcher.find_iter(input.completion).count();
                Ok(match mode {
                    ForbiddenMode::Count => 0.0 - hits as f32,
                    ForbiddenMode::Any => (hits == 0) as u8 as f32,
                })
            }
            Rule::Length {
                max_tokens,
                cache_tokens,
            } => {
                let Some(n) = input.completion_tokens else {
                    return Err("the completion's token count is unknown".into());
                };
                Ok(overlong_penalty(n, *max_tokens, *cache_tokens))
            }
            Rule::ByteShare(byte) => Ok(byte_share(input.completion, *byte)),
        }
    }

    /// A stable description (also hashed into the objective's content hash).
    pub fn describe(&self) -> String {
        match self {
            Rule::ExactAnswer { pattern, key } => {
                format!("exact_answer pattern={} key={key}", pattern.as_str())
            }
            Rule::Regex(re) => format!("regex {}", re.as_str()),
            Rule::ForbiddenWords { matcher, mode } => {
                format!("forbidden_words {mode:?} {}", matcher.as_str())
            }
            Rule::Length {
                max_tokens,
                cache_tokens,
            } => format!("length max_tokens={max_tokens} cache_tokens={cache_tokens}"),
            Rule::ByteShare(byte) => format!("byte_share {byte}"),
        }
    }
}

/// The answer the pattern finds: its first capture group that matched, else the whole match.
pub fn extract_answer<'a>(pattern: &Regex, text: &'a str) -> Option<&'a str> {
    let caps = pattern.captures(text)?;
    caps.iter()
        .skip(1)
        .flatten()
        .next()
        .or_else(|| caps.get(0))
        .map(|m| m.as_str().trim())
}

/// Numbers compare numerically (commas ignored, relative tolerance 1e-9); anything else as
/// trimmed text.
pub fn answers_equal(found: &str, reference: &str) -> bool {
    let number = |s: &str| s.trim().replace(',', "").parse::<f64>().ok();
    match (number(found), number(reference)) {
        (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * b.abs().max(1.0),
        _ => found.trim() == reference.trim(),
    }
}

/// Share of `text`'s bytes equal to `byte` (0 for an empty text).
pub fn byte_share(text: &str, byte: u8) -> f32 {
    let bytes = text.as_bytes();
    if bytes.is_empty() {
        return 0.0;
    }
    bytes.iter().filter(|b| **b == byte).count() as f32 / bytes.len() as f32
}

/// DAPO soft overlong punishment (Yu et al. 2025, eq. 13): 0 for L <= L_max - L_cache,
/// `((L_max - L_cache) - L) / L_cache` up to L_max, -1 beyond.
pub fn overlong_penalty(len: usize, max_tokens: usize, cache_tokens: usize) -> f32 {
    let start = max_tokens - cache_tokens;
    if len <= start {
        0.0
    } else if len <= max_tokens {
        (start as f32 - len as f32) / cache_tokens as f32
    } else {
        -1.0
    }
}

/// How an ensemble's member scores become one value ("Helping or Herding?", arXiv 2312.09244).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Aggregation {
    Mean,
    Median,
    Min,
    /// `mean - lambda * std` (population std over members).
    MeanMinusStd {
        lambda: f64,
    },
}

impl Aggregation {
    /// Aggregates the members' scores of one sample. `scores` is never empty.
    pub fn apply(&self, scores: &[f32]) -> f32 {
        let n = scores.len() as f64;
        let mean = scores.iter().map(|&s| s as f64).sum::<f64>() / n;
        match self {
            Aggregation::Mean => mean as f32,
            Aggregation::Min => scores.iter().copied().fold(f32::INFINITY, f32::min),
            Aggregation::Median => {
                let mut s: Vec<f32> = scores.to_vec();
                s.sort_by(f32::total_cmp);
                let mid = s.len() / 2;
                if s.len() % 2 == 1 {
                    s[mid]
                } else {
                    ((s[mid - 1] as f64 + s[mid] as f64) / 2.0) as f32
                }
            }
            Aggregation::MeanMinusStd { lambda } => {
                let var = scores
                    .iter()
                    .map(|&s| (s as f64 - mean).powi(2))
                    .sum::<f64>()
                    / n;
                (mean - lambda * var.sqrt()) as f32
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(completion: &'a str, meta: &'a HashMap<String, String>) -> RuleInput<'a> {
        RuleInput {
            completion,
            completion_tokens: Some(10),
            metadata: meta,
        }
    }

    #[test]
    fn byte_share_counts_one_byte() {
        let meta = HashMap::new();
        let rule = Rule::ByteShare(b'a');
        assert_eq!(rule.score(&input("abca", &meta)).unwrap(), 0.5);
        assert_eq!(rule.score(&input("", &meta)).unwrap(), 0.0);
        assert_eq!(rule.score(&input("xyz", &meta)).unwrap(), 0.0);
    }

    #[test]
    fn exact_answer_compares_numbers_numerically() {
        let rule = Rule::ExactAnswer {
            pattern: Regex::new(DEFAULT_ANSWER_PATTERN).unwrap(),
            key: "answer".into(),
        };
        let meta = HashMap::from([("answer".to_string(), "1,250".to_string())]);
        assert_eq!(
            rule.score(&input("so the total is 1250.0 apples.", &meta))
                .unwrap(),
            1.0
        );
        assert_eq!(rule.score(&input("maybe 12 or 1251", &meta)).unwrap(), 0.0);
        assert_eq!(rule.score(&input("no number", &meta)).unwrap(), 0.0);
        let err = rule.score(&input("1250", &HashMap::new())).unwrap_err();
        assert!(err.contains("`answer`"), "{err}");
        let boxed = Rule::ExactAnswer {
            pattern: Regex::new(r"\\boxed\{([^}]*)\}").unwrap(),
            key: "answer".into(),
        };
        let meta = HashMap::from([("answer".to_string(), "x+1".to_string())]);
        assert_eq!(
            boxed.score(&input(r"thus \boxed{x+1}", &meta)).unwrap(),
            1.0
        );
    }

    #[test]
    fn forbidden_words_whole_words_any_case() {
        let meta = HashMap::new();
        let count =
            Rule::forbidden_words(&["heck".into(), "c++".into()], ForbiddenMode::Count, false)
                .unwrap();
        assert_eq!(
            count
                .score(&input("Heck, what the heck; checking", &meta))
                .unwrap(),
            -2.0
        );
        assert_eq!(
            count.score(&input("I like c++ a lot", &meta)).unwrap(),
            -1.0
        );
        let any = Rule::forbidden_words(&["heck".into()], ForbiddenMode::Any, true).unwrap();
        assert_eq!(any.score(&input("Heck", &meta)).unwrap(), 1.0);
        assert_eq!(any.score(&input("heck", &meta)).unwrap(), 0.0);
    }

    #[test]
    fn overlong_penalty_is_dapo() {
        assert_eq!(overlong_penalty(60, 100, 20), 0.0);
        assert_eq!(overlong_penalty(80, 100, 20), 0.0);
        assert_eq!(overlong_penalty(90, 100, 20), -0.5);
        assert_eq!(overlong_penalty(100, 100, 20), -1.0);
        assert_eq!(overlong_penalty(101, 100, 20), -1.0);
    }

    #[test]
    fn aggregations() {
        let s = [1.0f32, 3.0, 2.0, 6.0];
        assert_eq!(Aggregation::Mean.apply(&s), 3.0);
        assert_eq!(Aggregation::Median.apply(&s), 2.5);
        assert_eq!(Aggregation::Median.apply(&s[..3]), 2.0);
        assert_eq!(Aggregation::Min.apply(&s), 1.0);
        let std = ((4.0f64 + 0.0 + 1.0 + 9.0) / 4.0).sqrt();
        let v = Aggregation::MeanMinusStd { lambda: 0.5 }.apply(&s);
        assert!((v as f64 - (3.0 - 0.5 * std)).abs() < 1e-6);
    }
}
