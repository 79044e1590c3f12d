//! Prompt data: JSONL files, and which prompts each step uses.
//!
//! A line is `{"id": "...", "prompt": "..."}` or `{"id": "...", "messages": [...]}`, with an
//! optional `"metadata": {"key": "value"}` passed to the reward server (e.g. a reference
//! answer). `id` defaults to `line-<n>`; ids must be unique (r_ref is stored per prompt id).

use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::path::Path;

use anyhow::{Context, Result, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rlhf_proto::v1;
use serde_json::Value;

/// A prompt as the actors receive it.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub id: String,
    pub content: v1::prompt_input::Content,
    pub metadata: HashMap<String, String>,
}

impl Prompt {
    pub fn to_proto(&self) -> v1::PromptInput {
        v1::PromptInput {
            id: self.id.clone(),
            content: Some(self.content.clone()),
            metadata: self.metadata.clone(),
        }
    }
}

/// Reads a prompt file; a bad line is an error naming the file and line.
pub fn load_prompts(path: &Path) -> Result<Vec<Prompt>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let n = i + 1;
        let line = line.with_context(|| format!("{}:{n}: cannot read", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let p = parse(&line, n).map_err(|m| anyhow::anyhow!("{}:{n}: {m}", path.display()))?;
        if !seen.insert(p.id.clone()) {
            bail!("{}:{n}: prompt id `{}` appears twice", path.display(), p.id);
        }
        out.push(p);
    }
    if out.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(out)
}

fn parse(line: &str, n: usize) -> Result<Prompt, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = v.as_object().ok_or("expected a JSON object")?;
    for k in obj.keys() {
        if !["id", "prompt", "messages", "metadata"].contains(&k.as_str()) {
            return Err(format!(
                "unknown field `{k}` (expected id, prompt, messages, metadata)"
            ));
        }
    }
    let id = match obj.get("id") {
        None => format!("line-{n}"),
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(x)) => x.to_string(),
        Some(other) => return Err(format!("`id` must be a non-empty string, found {other}")),
    };
    let content = match (obj.get("prompt"), obj.get("messages")) {
        (Some(Value::String(t)), None) => v1::prompt_input::Content::Text(t.clone()),
        (None, Some(m)) => {
            let msgs: Vec<Turn> = serde_json::from_value(m.clone())
                .map_err(|e| format!("`messages` must be a list of {{role, content}}: {e}"))?;
            if msgs.is_empty() {
                return Err("`messages` is empty".into());
            }
            v1::prompt_input::Content::Messages(v1::ChatMessages {
                messages: msgs
                    .into_iter()
                    .map(|m| v1::ChatMessage {
                        role: m.role,
                        content: m.content,
                    })
                    .collect(),
            })
        }
        _ => return Err("exactly one of `prompt` (a string) or `messages` is required".into()),
    };
    let metadata = match obj.get("metadata") {
        None => HashMap::new(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                other => Ok((k.clone(), other.to_string())),
            })
            .collect::<Result<_, String>>()?,
        Some(other) => return Err(format!("`metadata` must be an object, found {other}")),
    };
    Ok(Prompt {
        id,
        content,
        metadata,
    })
}

/// The prompt indices of (1-based) `step`: the data is walked in a fresh seeded permutation per
/// epoch, `per_step` prompts at a time, so any step's prompts follow from (seed, step) alone
/// and a resumed job continues exactly where it stopped.
pub fn step_prompts(n: usize, per_step: usize, seed: u64, step: u64) -> Vec<usize> {
    let start = (step.saturating_sub(1)) as usize * per_step;
    (start..start + per_step)
        .map(|k| {
            let (epoch, offset) = (k / n, k % n);
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(
                seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ));
            order[offset]
        })
        .collect()
}

/// The prompts of generation `round` (1-based) of `step`, with ids unique within the step.
///
/// Round 1 is [`step_prompts`]; a further round (DAPO dynamic sampling) walks its own seeded
/// permutation, so every round follows from (seed, step, round) alone. A prompt whose id the step
/// already holds (the data is smaller than a step, or an earlier round had it) is renamed
/// `<id>#<position>`; `taken` holds the step's ids so far. Returns the prompts and, for every
/// renamed one, `(new id, original id)`: the original keys its reference reward.
pub fn round_prompts(
    prompts: &[Prompt],
    per_step: usize,
    seed: u64,
    step: u64,
    round: u32,
    taken: &mut HashSet<String>,
) -> (Vec<Prompt>, Vec<(String, String)>) {
    let round_seed = match round {
        0 | 1 => seed,
        r => seed ^ (r as u64).wrapping_mul(0xD1B5_4A32_D192_ED03),
    };
    let idx = step_prompts(prompts.len(), per_step, round_seed, step);
    let mut aliases = Vec::new();
    let batch = idx
        .into_iter()
        .enumerate()
        .map(|(k, i)| {
            let mut p = prompts[i].clone();
            let position = (round.max(1) as usize - 1) * per_step + k;
            let mut id = p.id.clone();
            while taken.contains(&id) {
                id = format!("{id}#{position}");
            }
            if id != p.id {
                aliases.push((id.clone(), std::mem::replace(&mut p.id, id.clone())));
            }
            taken.insert(id);
            p
        })
        .collect();
    (batch, aliases)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(id: &str) -> Prompt {
        Prompt {
            id: id.into(),
            content: v1::prompt_input::Content::Text(id.into()),
            metadata: HashMap::new(),
        }
    }

    #[test]
    fn round_prompts_keep_ids_unique_and_name_their_originals() {
        // Two prompts, three per step: one comes twice in round 1.
        let data = vec![prompt("a"), prompt("b"), prompt("a#2")];
        let mut taken = HashSet::new();
        let (first, aliases) = round_prompts(&data[..2], 3, 5, 1, 1, &mut taken);
        let ids: HashSet<&str> = first.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids.len(), 3, "{ids:?}");
        assert_eq!(aliases.len(), 1);
        let (alias, original) = &aliases[0];
        assert!(alias.starts_with(original.as_str()) && alias != original);
        // A second round of the same step renames every prompt the first had.
        let (second, more) = round_prompts(&data[..2], 3, 5, 1, 2, &mut taken);
        assert_eq!(more.len(), 3);
        assert!(second.iter().all(|p| !ids.contains(p.id.as_str())));
        // An original id that looks like a renamed one is never confused with it.
        let mut taken = HashSet::new();
        let (batch, aliases) = round_prompts(&data, 6, 5, 1, 1, &mut taken);
        let unique: HashSet<&str> = batch.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(unique.len(), 6);
        for (alias, original) in aliases {
            assert!(
                data.iter().any(|p| p.id == original),
                "{alias} -> {original}"
            );
        }
        // Same inputs, same rounds.
        let again = round_prompts(&data[..2], 3, 5, 1, 1, &mut HashSet::new()).0;
        assert_eq!(again, first);
    }

    #[test]
    fn parses_text_chat_and_metadata_and_names_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(
            &path,
            "{\"id\":\"a\",\"prompt\":\"hi\",\"metadata\":{\"answer\":\"4\",\"n\":3}}\n{\"messages\":[{\"role\":\"user\",\"content\":\"yo\"}]}\n",
        )
        .unwrap();
        let p = load_prompts(&path).unwrap();
        assert_eq!(p[0].metadata["answer"], "4");
        assert_eq!(p[0].metadata["n"], "3");
        assert_eq!(p[1].id, "line-2");
        std::fs::write(
            &path,
            "{\"id\":\"a\",\"prompt\":\"hi\"}\n{\"id\":\"a\",\"prompt\":\"again\"}\n",
        )
        .unwrap();
        assert!(
            load_prompts(&path)
                .unwrap_err()
                .to_string()
                .contains("p.jsonl:2")
        );
        std::fs::write(&path, "{\"prompt\": 3}\n").unwrap();
        let err = load_prompts(&path).unwrap_err().to_string();
        assert!(err.contains(":1") && err.contains("`prompt`"), "{err}");
    }

    #[test]
    fn steps_walk_seeded_epochs() {
        let a: Vec<usize> = (1..=5).flat_map(|s| step_prompts(10, 4, 7, s)).collect();
        // The first epoch (10 prompts) is a permutation.
        let mut first: Vec<usize> = a[..10].to_vec();
        first.sort();
        assert_eq!(first, (0..10).collect::<Vec<_>>());
        assert_eq!(step_prompts(10, 4, 7, 3), a[8..12].to_vec());
        assert_ne!(step_prompts(10, 4, 8, 1), step_prompts(10, 4, 7, 1));
    }
}

/// One chat turn of a prompt file's `messages`.
#[derive(serde::Deserialize)]
struct Turn {
    role: String,
    content: String,
}
