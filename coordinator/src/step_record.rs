//! The run's record of its steps, in its output folder: `metrics.jsonl` (one line per applied
//! step, in order) and `pending-step.json` (what the controller measured of the step the learner
//! is training now).
//!
//! Why a pending file: the learner applies a step and checkpoints it before its reply reaches
//! the controller. When the learner or the controller dies in between, the step is applied but
//! has no line. The learner keeps the last applied step's report (also in its checkpoint) and
//! answers a repeated call of that step with it; the controller merges it with the pending
//! file's rollout metrics and writes the line it would have written. Every applied step is
//! recorded exactly once, whoever died.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// `metrics.jsonl` and `pending-step.json` of one output folder.
#[derive(Debug, Clone)]
pub struct StepRecord {
    metrics: PathBuf,
    pending: PathBuf,
}

/// The controller's metrics of a step sent to the learner.
#[derive(Debug, Serialize, Deserialize)]
struct Pending {
    step: u64,
    metrics: BTreeMap<String, f64>,
}

impl StepRecord {
    pub fn new(out: &Path) -> StepRecord {
        StepRecord {
            metrics: out.join("metrics.jsonl"),
            pending: out.join("pending-step.json"),
        }
    }

    /// Keeps the lines of steps up to `last_step` (the learner's state: later ones are trained
    /// again). Returns the highest step recorded before (0 when none).
    pub fn truncate(&self, last_step: u64) -> Result<u64> {
        let path = &self.metrics;
        if !path.is_file() {
            return Ok(0);
        }
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let recorded = text.lines().filter_map(step_of).max().unwrap_or(0);
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| step_of(l).is_some_and(|s| s <= last_step))
            .collect();
        let mut out = kept.join("\n");
        if !out.is_empty() {
            out.push('\n');
        }
        std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))?;
        Ok(recorded)
    }

    /// Appends step `step`'s line.
    pub fn append(&self, step: u64, metrics: &BTreeMap<String, f64>) -> Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.metrics)
            .with_context(|| format!("opening {}", self.metrics.display()))?;
        writeln!(file, "{}", metrics_line(step, metrics))
            .with_context(|| format!("writing {}", self.metrics.display()))
    }

    /// Keeps `metrics` as step `step`'s pending metrics (replacing any older step's), written
    /// whole or not at all.
    pub fn set_pending(&self, step: u64, metrics: &BTreeMap<String, f64>) -> Result<()> {
        let pending = Pending {
            step,
            metrics: finite(metrics),
        };
        let text = serde_json::to_string(&pending).expect("metrics serialise");
        let tmp = self.pending.with_extension("json.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.pending)
            .with_context(|| format!("writing {}", self.pending.display()))
    }

    /// Step `step`'s pending metrics, if the pending file holds that step (an unreadable file
    /// counts as none: the line then lacks the rollout metrics, nothing else).
    pub fn pending(&self, step: u64) -> Option<BTreeMap<String, f64>> {
        let text = std::fs::read_to_string(&self.pending).ok()?;
        let pending: Pending = serde_json::from_str(&text).ok()?;
        (pending.step == step).then_some(pending.metrics)
    }
}

fn step_of(line: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(line).ok()?["step"].as_u64()
}

/// JSON has no NaN or infinity: a metrics line writes them as `null`, the same as leaving
/// them out.
fn finite(metrics: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    metrics
        .iter()
        .filter(|(_, v)| v.is_finite())
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

/// One line of `metrics.jsonl`.
pub fn metrics_line(step: u64, metrics: &BTreeMap<String, f64>) -> String {
    let mut obj = serde_json::Map::new();
    obj.insert("step".into(), serde_json::json!(step));
    for (k, v) in metrics {
        obj.insert(k.clone(), serde_json::json!(v));
    }
    serde_json::Value::Object(obj).to_string()
}

/// What a restart from `restored` loses of the `recorded` steps, said plainly (None: nothing).
pub fn redone_steps(recorded: u64, restored: u64) -> Option<String> {
    (recorded > restored).then(|| match restored {
        0 => format!(
            "no checkpoint found: training restarts from step 1, recorded steps 1..={recorded} are trained again"
        ),
        r => format!(
            "the last checkpoint is step {r}: steps {}..={recorded} are trained again",
            r + 1
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(v: f64) -> BTreeMap<String, f64> {
        [("loss".to_string(), v)].into()
    }

    #[test]
    fn truncation_keeps_the_steps_up_to_the_learner_s_and_says_what_was_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let record = StepRecord::new(dir.path());
        assert_eq!(record.truncate(3).unwrap(), 0);
        for step in 1..=4 {
            record.append(step, &metrics(step as f64)).unwrap();
        }
        // A line cut short by a crash is not a step.
        let path = dir.path().join("metrics.jsonl");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"step\":5,\"lo");
        std::fs::write(&path, text).unwrap();
        assert_eq!(record.truncate(2).unwrap(), 4);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "{\"loss\":1.0,\"step\":1}\n{\"loss\":2.0,\"step\":2}\n"
        );
        assert_eq!(
            redone_steps(4, 2).unwrap(),
            "the last checkpoint is step 2: steps 3..=4 are trained again"
        );
        assert_eq!(redone_steps(2, 2), None);
    }

    #[test]
    fn the_pending_step_is_read_back_only_for_its_own_step() {
        let dir = tempfile::tempdir().unwrap();
        let record = StepRecord::new(dir.path());
        assert_eq!(record.pending(1), None);
        let mut m = metrics(0.1 + 0.2);
        m.insert("nan".into(), f64::NAN);
        record.set_pending(7, &m).unwrap();
        record.set_pending(8, &m).unwrap();
        assert_eq!(record.pending(7), None);
        let back = record.pending(8).unwrap();
        assert_eq!(back, metrics(0.1 + 0.2), "exact, without the NaN");
        std::fs::write(dir.path().join("pending-step.json"), "{\"step\": 8").unwrap();
        assert_eq!(record.pending(8), None);
    }
}
