//! A faulted run against the fault-free one: its recorded steps, the steps it trained again,
//! and how far its final weights are from the clean run's.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};

/// What `metrics.jsonl` recorded: for each line, its step and weight version, in file order.
pub fn recorded(run: &Path) -> Result<Vec<(u64, u64)>> {
    let path = run.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
            let step = v["step"].as_u64();
            let version = v["weight_version"].as_f64().map(|x| x as u64);
            match (step, version) {
                (Some(s), Some(w)) => Ok((s, w)),
                _ => bail!("{}:{}: no step or weight_version", path.display(), i + 1),
            }
        })
        .collect()
}

/// The steps of `1..=total` with no line.
pub fn lost(lines: &[(u64, u64)], total: u64) -> Vec<u64> {
    (1..=total)
        .filter(|s| !lines.iter().any(|(step, _)| step == s))
        .collect()
}

/// Steps applied twice: recorded on more than one line, or recorded with another weight
/// version than the clean run's (one more update than the clean run made by then).
pub fn applied_twice(lines: &[(u64, u64)], clean: &[(u64, u64)]) -> Vec<u64> {
    let mut count: BTreeMap<u64, usize> = BTreeMap::new();
    for (step, _) in lines {
        *count.entry(*step).or_default() += 1;
    }
    let clean: BTreeMap<u64, u64> = clean.iter().copied().collect();
    let mut twice: Vec<u64> = lines
        .iter()
        .filter(|(step, version)| count[step] > 1 || clean.get(step).is_some_and(|c| c != version))
        .map(|(step, _)| *step)
        .collect();
    twice.dedup();
    twice
}

/// Steps trained again after a restore, from the job history's reasons ("the last checkpoint
/// is step 4: steps 5..=6 are trained again", "recorded steps 1..=3 are trained again").
pub fn redone(reasons: &[String]) -> u64 {
    let re = regex::Regex::new(r"steps (\d+)\.\.=(\d+) are trained again").expect("valid regex");
    reasons
        .iter()
        .filter_map(|r| re.captures(r))
        .filter_map(|c| Some(c[2].parse::<u64>().ok()? + 1 - c[1].parse::<u64>().ok()?))
        .sum()
}

/// The largest absolute difference between two policy folders' weights (every
/// `*.safetensors` file; 0 when bit-identical), and the tensors that differ.
pub fn weight_diff(a: &Path, b: &Path) -> Result<(f64, Vec<String>)> {
    let (ta, tb) = (tensors(a)?, tensors(b)?);
    if ta.keys().ne(tb.keys()) {
        bail!("{} and {} hold different tensors", a.display(), b.display());
    }
    let mut max = 0.0f64;
    let mut differ = Vec::new();
    for (name, (shape, x)) in &ta {
        let (shape_b, y) = &tb[name];
        if shape != shape_b {
            bail!("tensor {name}: shape {shape:?} against {shape_b:?}");
        }
        let mut d = 0.0f64;
        for (p, q) in x.iter().zip(y) {
            if p.to_bits() != q.to_bits() {
                d = d
                    .max((f64::from(*p) - f64::from(*q)).abs())
                    .max(f64::MIN_POSITIVE);
            }
        }
        if d > 0.0 {
            differ.push(name.clone());
        }
        max = max.max(d);
    }
    Ok((max, differ))
}

type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn tensors(dir: &Path) -> Result<Tensors> {
    let mut out = BTreeMap::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            for t in rlhf_model::weights::load_tensors(&path)? {
                out.insert(t.name, (t.shape, t.values));
            }
        }
    }
    if out.is_empty() {
        bail!("{}: no safetensors weights", dir.display());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_twice_and_redone_steps_are_counted() {
        let clean = [(1, 1), (2, 2), (3, 3), (4, 4)];
        assert!(lost(&clean, 4).is_empty());
        assert!(applied_twice(&clean, &clean).is_empty());
        let faulted = [(1, 1), (2, 2), (2, 2), (4, 5)];
        assert_eq!(lost(&faulted, 4), [3]);
        assert_eq!(applied_twice(&faulted, &clean), [2, 4]);
        let reasons = [
            "resumed after step 4 (the last checkpoint is step 4: steps 5..=6 are trained again)"
                .to_string(),
            "no checkpoint found: training restarts from step 1, recorded steps 1..=3 are trained again"
                .to_string(),
            "running".to_string(),
        ];
        assert_eq!(redone(&reasons), 5);
    }

    #[test]
    fn weights_differ_by_their_largest_gap_and_not_at_all_when_equal() {
        use rlhf_model::DType;
        use rlhf_model::weights::{NamedTensor, save_tensors};
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, values: Vec<f32>| {
            let d = dir.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            let t = NamedTensor {
                name: "w".into(),
                shape: vec![values.len()],
                values,
            };
            save_tensors(&d.join("model.safetensors"), &[t], DType::F32).unwrap();
            d
        };
        let a = write("a", vec![1.0, 2.0, -0.0]);
        let b = write("b", vec![1.0, 2.5, -0.0]);
        let c = write("c", vec![1.0, 2.0, -0.0]);
        assert_eq!(weight_diff(&a, &c).unwrap(), (0.0, vec![]));
        assert_eq!(weight_diff(&a, &b).unwrap(), (0.5, vec!["w".to_string()]));
        // Equal values of other bits (0.0 and -0.0) are a difference, if the smallest.
        let z = write("z", vec![1.0, 2.0, 0.0]);
        let (d, names) = weight_diff(&a, &z).unwrap();
        assert!(d > 0.0 && d < 1e-300 && names == ["w"]);
    }
}
