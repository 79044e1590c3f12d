//! Ground-truth evaluation and the pipeline's report: the judge applied to held-out
//! completions (the SFT policy's, and each arm's evaluations), aggregated per arm over seeds,
//! written as `report.json`, `report.md` and `curves.png`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use rlhf_model::{
    FinishReason, GenerationParams, GenerationRequest, Model, SamplingParams, Tokenizer, device,
};
use serde::{Deserialize, Serialize};

use crate::task::{Request, judge};
use rlhf_coordinator::plot::{Panel, Series};

/// Ground-truth rates over a set of held-out completions.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Judged {
    pub helpful: f64,
    pub harmless: f64,
    pub both_good: f64,
    /// Mean length in words.
    pub mean_length: f64,
}

/// One completion of a held-out prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub prompt_id: String,
    pub text: String,
    pub finished: bool,
}

/// The held-out prompts: id → (request, prompt text), in file order.
pub fn eval_requests(path: &Path) -> Result<Vec<(String, Request, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let at = || format!("{}:{}", path.display(), i + 1);
            let v: serde_json::Value = serde_json::from_str(line).with_context(at)?;
            let field = |k: &str| v.get(k).and_then(serde_json::Value::as_str);
            let meta = |k: &str| v["metadata"].get(k).and_then(serde_json::Value::as_str);
            let (Some(id), Some(prompt), Some(topic), Some(tone)) =
                (field("id"), field("prompt"), meta("topic"), meta("tone"))
            else {
                return Err(anyhow!(
                    "{}: needs id, prompt and metadata.topic/tone",
                    at()
                ));
            };
            let request = Request::from_names(topic, tone)
                .ok_or_else(|| anyhow!("{}: unknown topic `{topic}` or tone `{tone}`", at()))?;
            Ok((id.to_string(), request, prompt.to_string()))
        })
        .collect()
}

/// Applies the judge to completions of the held-out prompts.
pub fn judge_all(requests: &[(String, Request, String)], completions: &[Completion]) -> Judged {
    let by_id: HashMap<&str, &Request> =
        requests.iter().map(|(id, r, _)| (id.as_str(), r)).collect();
    let mut j = Judged::default();
    let mut n = 0.0;
    for c in completions {
        let Some(r) = by_id.get(c.prompt_id.as_str()) else {
            continue;
        };
        let v = judge(r, &c.text, c.finished);
        j.helpful += v.helpful as u8 as f64;
        j.harmless += v.harmless as u8 as f64;
        j.both_good += v.good() as u8 as f64;
        j.mean_length += v.words as f64;
        n += 1.0;
    }
    let n: f64 = f64::max(n, 1.0);
    Judged {
        helpful: j.helpful / n,
        harmless: j.harmless / n,
        both_good: j.both_good / n,
        mean_length: j.mean_length / n,
    }
}

/// Samples one completion per held-out prompt from a model folder, in this process.
pub fn sample_policy(
    model_dir: &Path,
    requests: &[(String, Request, String)],
    temperature: f32,
    max_new_tokens: usize,
    seed: u64,
) -> Result<Vec<Completion>> {
    let dev = device::inference_device()?;
    let model = Model::load(model_dir, &dev)?;
    let tokenizer = Tokenizer::from_dir(model_dir)?;
    let batch = requests
        .iter()
        .enumerate()
        .map(|(i, (_, _, prompt))| {
            Ok(GenerationRequest {
                prompt: tokenizer.encode(prompt, true)?,
                params: GenerationParams {
                    sampling: SamplingParams {
                        temperature,
                        ..Default::default()
                    },
                    max_new_tokens,
                    seed: seed.wrapping_add(i as u64),
                    ..Default::default()
                },
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let out = model.generate(&batch, Some(&tokenizer))?;
    requests
        .iter()
        .zip(out)
        .map(|((id, _, _), g)| {
            Ok(Completion {
                prompt_id: id.clone(),
                text: tokenizer.decode(&g.tokens, true)?,
                finished: g.finish_reason == FinishReason::Stop,
            })
        })
        .collect()
}

/// One evaluation of an arm: the judge's rates, the learned rewards, the KL at that step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalPoint {
    pub step: u64,
    #[serde(flatten)]
    pub judged: Judged,
    /// Mean learned reward per objective on the held-out completions.
    pub rewards: BTreeMap<String, f64>,
}

/// Judges every `eval/step-*.jsonl` of an arm, in step order.
pub fn judge_arm(arm: &Path, requests: &[(String, Request, String)]) -> Result<Vec<EvalPoint>> {
    let dir = arm.join("eval");
    let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let step = p
                .file_stem()?
                .to_str()?
                .strip_prefix("step-")?
                .parse()
                .ok()?;
            Some((step, p))
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|(step, path)| {
            let text = std::fs::read_to_string(&path)?;
            let mut completions = Vec::new();
            let mut rewards: BTreeMap<String, f64> = BTreeMap::new();
            for (i, line) in text.lines().enumerate() {
                let v: serde_json::Value = serde_json::from_str(line)
                    .with_context(|| format!("{}:{}", path.display(), i + 1))?;
                completions.push(Completion {
                    prompt_id: v["prompt_id"].as_str().unwrap_or_default().to_string(),
                    text: v["text"].as_str().unwrap_or_default().to_string(),
                    finished: v["finish_reason"].as_str() == Some("stop"),
                });
                for (k, r) in v["rewards"].as_object().into_iter().flatten() {
                    *rewards.entry(k.clone()).or_default() += r.as_f64().unwrap_or(f64::NAN);
                }
            }
            let n = completions.len().max(1) as f64;
            rewards.values_mut().for_each(|r| *r /= n);
            Ok(EvalPoint {
                step,
                judged: judge_all(requests, &completions),
                rewards,
            })
        })
        .collect()
}

/// One RL run's result, as `report.json` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub seed: u64,
    #[serde(flatten)]
    pub judged: Judged,
    /// Mean sequence KL to the reference over the last steps (the learner's estimate).
    pub kl: f64,
    /// Learned rewards on the held-out completions.
    pub rewards: BTreeMap<String, f64>,
    /// Every evaluation of the run (for the curves).
    pub evaluations: Vec<EvalPoint>,
}

/// Mean and (sample) standard deviation.
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// The per-arm summary: each scalar's mean and standard deviation over seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArmReport {
    pub runs: Vec<RunResult>,
    pub mean: BTreeMap<String, f64>,
    pub std: BTreeMap<String, f64>,
}

impl ArmReport {
    pub fn new(runs: Vec<RunResult>) -> ArmReport {
        let mut columns: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for r in &runs {
            for (k, v) in scalars(r) {
                columns.entry(k).or_default().push(v);
            }
        }
        let (mut mean, mut std) = (BTreeMap::new(), BTreeMap::new());
        for (k, vs) in columns {
            let (m, s) = mean_std(&vs);
            mean.insert(k.clone(), m);
            std.insert(k, s);
        }
        ArmReport { runs, mean, std }
    }
}

/// The scalars of a run that the report aggregates (rewards as `reward/<objective>`).
fn scalars(r: &RunResult) -> Vec<(String, f64)> {
    let j = &r.judged;
    let mut v = vec![
        ("helpful".to_string(), j.helpful),
        ("harmless".to_string(), j.harmless),
        ("both_good".to_string(), j.both_good),
        ("mean_length".to_string(), j.mean_length),
        ("kl".to_string(), r.kl),
    ];
    v.extend(r.rewards.iter().map(|(k, x)| (format!("reward/{k}"), *x)));
    v
}

/// Mean sequence KL over the last `n` steps of a metrics file.
pub fn final_kl(metrics: &rlhf_coordinator::plot::MetricSeries, n: usize) -> f64 {
    let Some(points) = metrics.get("kl/sequence") else {
        return f64::NAN;
    };
    let tail: Vec<f64> = points.iter().rev().take(n).map(|p| p.1).collect();
    mean_std(&tail).0
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// `grpo` or `ppo`.
    pub algorithm: String,
    pub sft: Judged,
    pub arms: BTreeMap<String, ArmReport>,
    pub data: serde_json::Value,
    pub reward_models: serde_json::Value,
    pub timing_seconds: BTreeMap<String, f64>,
}

fn pm(arm: &ArmReport, key: &str, digits: usize) -> String {
    let m = arm.mean.get(key).copied().unwrap_or(f64::NAN);
    let s = arm.std.get(key).copied().unwrap_or(f64::NAN);
    if arm.runs.len() > 1 {
        format!("{m:.digits$} ± {s:.digits$}")
    } else {
        format!("{m:.digits$}")
    }
}

impl Report {
    /// The final table (also the core of report.md).
    pub fn table(&self) -> String {
        let mut t = String::from(
            "| policy | seeds | helpful | harmless | both good | length (words) | KL | learned helpful | learned harmless |\n|---|---|---|---|---|---|---|---|---|\n",
        );
        let s = &self.sft;
        t.push_str(&format!(
            "| SFT | – | {:.3} | {:.3} | {:.3} | {:.1} | 0 | – | – |\n",
            s.helpful, s.harmless, s.both_good, s.mean_length
        ));
        for (name, arm) in &self.arms {
            t.push_str(&format!(
                "| {}, {name} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                self.algorithm.to_uppercase(),
                arm.runs.len(),
                pm(arm, "helpful", 3),
                pm(arm, "harmless", 3),
                pm(arm, "both_good", 3),
                pm(arm, "mean_length", 1),
                pm(arm, "kl", 2),
                pm(arm, "reward/helpful", 2),
                pm(arm, "reward/harmless", 2),
            ));
        }
        t
    }

    pub fn markdown(&self) -> String {
        let mut md = String::from("# Quickstart report\n\n");
        md.push_str("Rates are measured by the ground-truth judge on held-out prompts (combinations of topic, tone and phrasing never seen in training); ± is the standard deviation over seeds. KL is the learner's sequence KL to the reference over the last steps. Learned rewards are the reward models' mean scores on the same held-out completions.\n\n");
        md.push_str(&self.table());
        md.push_str("\n## Reward models\n\n| objective | held-out pairwise accuracy (noisy labels) |\n|---|---|\n");
        for (name, rm) in self.reward_models.as_object().into_iter().flatten() {
            md.push_str(&format!(
                "| {name} | {:.3} |\n",
                rm["accuracy"].as_f64().unwrap_or(f64::NAN)
            ));
        }
        md.push_str("\n## Data\n\n```json\n");
        md.push_str(&serde_json::to_string_pretty(&self.data).unwrap_or_default());
        md.push_str("\n```\n\n## Time per stage (seconds)\n\n| stage | seconds |\n|---|---|\n");
        for (stage, s) in &self.timing_seconds {
            md.push_str(&format!("| {stage} | {s:.0} |\n"));
        }
        md.push_str("\n![curves](curves.png)\n");
        md
    }

    /// The panels of `curves.png`: judged rates, length and KL against the step, and the
    /// both-good rate against KL, one colour per arm.
    pub fn panels(
        &self,
        metrics: &BTreeMap<(String, u64), rlhf_coordinator::plot::MetricSeries>,
    ) -> Vec<Panel> {
        let arm_colors: BTreeMap<&String, usize> =
            self.arms.keys().enumerate().map(|(i, k)| (k, i)).collect();
        let mut panels: Vec<Panel> = [
            "held-out both-good rate (judge)",
            "held-out helpful rate (judge)",
            "held-out harmless rate (judge)",
            "held-out mean length (words)",
        ]
        .iter()
        .map(|t| Panel {
            title: t.to_string(),
            x_label: "step".into(),
            series: Vec::new(),
        })
        .collect();
        let mut kl = Panel {
            title: "KL to the reference (learner batch)".into(),
            x_label: "step".into(),
            series: Vec::new(),
        };
        let mut tradeoff = Panel {
            title: "held-out both-good rate vs KL".into(),
            x_label: "KL".into(),
            series: Vec::new(),
        };
        for (name, arm) in &self.arms {
            let color = arm_colors[name];
            for (i, run) in arm.runs.iter().enumerate() {
                let label = if i == 0 { name.clone() } else { String::new() };
                let series = |f: &dyn Fn(&Judged) -> f64| Series {
                    label: label.clone(),
                    points: std::iter::once((0.0, f(&self.sft)))
                        .chain(
                            run.evaluations
                                .iter()
                                .map(|e| (e.step as f64, f(&e.judged))),
                        )
                        .collect(),
                    color,
                    markers: true,
                };
                panels[0].series.push(series(&|j| j.both_good));
                panels[1].series.push(series(&|j| j.helpful));
                panels[2].series.push(series(&|j| j.harmless));
                panels[3].series.push(series(&|j| j.mean_length));
                let run_metrics = metrics.get(&(name.clone(), run.seed));
                let kl_points = run_metrics
                    .and_then(|m| m.get("kl/sequence"))
                    .cloned()
                    .unwrap_or_default();
                kl.series.push(Series {
                    label: label.clone(),
                    points: kl_points.clone(),
                    color,
                    markers: false,
                });
                let kl_at = |step: u64| {
                    kl_points
                        .iter()
                        .filter(|(s, _)| *s <= step as f64 && *s > step as f64 - 5.0)
                        .map(|p| p.1)
                        .collect::<Vec<_>>()
                };
                tradeoff.series.push(Series {
                    label,
                    points: std::iter::once((0.0, self.sft.both_good))
                        .chain(
                            run.evaluations
                                .iter()
                                .map(|e| (mean_std(&kl_at(e.step)).0, e.judged.both_good)),
                        )
                        .collect(),
                    color,
                    markers: true,
                });
            }
        }
        panels.push(kl);
        panels.push(tradeoff);
        panels
    }
}
