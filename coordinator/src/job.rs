//! A job: one TOML file that says what to train, on what, against which objectives, how, and
//! with which resources. `rlhf validate job.toml` reports every problem it finds, each naming the
//! field and what is allowed; unknown fields are errors.
//!
//! ```toml
//! name = "helpful-harmless"
//! seed = 0
//!
//! [policy]
//! model = "models/sft"            # reference defaults to the same folder
//!
//! [data]
//! prompts = "data/prompts.jsonl"  # {"id", "prompt" | "messages", "metadata"}
//! eval_prompts = "data/eval.jsonl"
//!
//! [[objective]]                   # a reward-server objective + how the learner uses it
//! name = "helpful"
//! kind = "model"
//! model = "models/rm-helpful"
//! transform = "log_sigmoid"       # identity | log_sigmoid
//! weight = 1.0
//!
//! [rollout]
//! steps = 50
//! prompts_per_step = 8
//! samples_per_prompt = 8
//! max_new_tokens = 48
//! mode = "sync"                   # or "async" with max_staleness
//!
//! [learner]                       # the learner's settings (docs/job-config.md)
//! algorithm = "grpo"
//! [learner.kl]
//! controller = { kind = "adaptive", value = 0.1, target = 6.0, horizon = 10000 }
//! ```

use std::path::{Path, PathBuf};

use rlhf_learner::algo::transform::{ObjectiveWeight, QuantileEstimator, Transform};
use rlhf_learner::config::{
    Algorithm, CheckpointConfig, GrpoConfig, KlConfig, LearnerConfig, OptimConfig, ParallelConfig,
    PpoConfig, RewardsConfig, SftRegularizer,
};
use rlhf_reward::RewardConfig;
use serde::{Deserialize, Serialize};

/// A validated job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    /// Where the job writes everything (default `runs/<name>`).
    #[serde(default)]
    pub output_dir: Option<PathBuf>,
    #[serde(default)]
    pub seed: u64,
    /// Higher runs first among queued jobs.
    #[serde(default)]
    pub priority: i32,
    pub policy: PolicySpec,
    pub data: DataSpec,
    #[serde(rename = "objective")]
    pub objectives: Vec<toml::Table>,
    #[serde(default)]
    pub rewards: RewardsSpec,
    #[serde(default)]
    pub rollout: RolloutSpec,
    #[serde(default)]
    pub learner: LearnerSpec,
    #[serde(default)]
    pub resources: ResourcesSpec,
    #[serde(default)]
    pub evaluation: EvaluationSpec,
}

/// The models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// The initial policy (HF folder).
    pub model: PathBuf,
    /// The frozen reference (default: `model`).
    #[serde(default)]
    pub reference: Option<PathBuf>,
    /// PPO's critic initialisation (default: `model` with a value head).
    #[serde(default)]
    pub critic: Option<PathBuf>,
}

/// Prompt data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Training prompts (JSONL).
    pub prompts: PathBuf,
    /// Held-out prompts for evaluation (JSONL).
    #[serde(default)]
    pub eval_prompts: Option<PathBuf>,
}

/// Reward-server settings shared by every objective, and r_ref calibration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardsSpec {
    /// Clip the combined reward into `[lo, hi]`.
    pub clip: Option<(f64, f64)>,
    /// r_ref = this quantile of the reference policy's rewards per prompt.
    pub reference_quantile: f64,
    pub reference_estimator: QuantileEstimator,
    /// Reference samples per prompt for calibration (K).
    pub reference_samples: u32,
    /// The reward server's `[batching]` table (see docs/reward-server.md).
    pub batching: Option<toml::Table>,
    /// How long one scoring call may take before the actor retries it (4 attempts, then the
    /// step, and the job, fail with the reason).
    pub timeout_seconds: f64,
}

impl Default for RewardsSpec {
    fn default() -> Self {
        RewardsSpec {
            clip: None,
            reference_quantile: 0.85,
            reference_estimator: QuantileEstimator::Empirical,
            reference_samples: 8,
            batching: None,
            timeout_seconds: 60.0,
        }
    }
}

/// Synchronous (on-policy) or asynchronous (bounded staleness) rollouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutMode {
    Sync,
    Async,
}

/// How rollouts are generated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutSpec {
    pub steps: u64,
    pub prompts_per_step: usize,
    pub samples_per_prompt: u32,
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub max_new_tokens: u32,
    pub stop: Vec<String>,
    pub mode: RolloutMode,
    /// Async: up to this many steps are generated ahead of the learner, so a step's samples may
    /// come from weights this many versions behind the ones it is trained from.
    pub max_staleness: u64,
    /// GRPO dynamic sampling (DAPO): at most this many generation rounds per step (the first
    /// included) to fill the step with informative groups; DAPO's `max_num_gen_batches`. After
    /// the last round the step trains on the informative groups it has.
    pub max_generation_rounds: u32,
    /// Seconds a step's generation, scoring and training may take before the job fails.
    pub step_timeout_seconds: f64,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        RolloutSpec {
            steps: 100,
            prompts_per_step: 8,
            samples_per_prompt: 8,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 64,
            stop: Vec::new(),
            mode: RolloutMode::Sync,
            max_staleness: 1,
            max_generation_rounds: 4,
            step_timeout_seconds: 1800.0,
        }
    }
}

/// The learner's settings (the fields of `LearnerConfig` that are not paths).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LearnerSpec {
    pub algorithm: Algorithm,
    pub kl: KlConfig,
    pub grpo: GrpoConfig,
    pub ppo: PpoConfig,
    pub optim: OptimConfig,
    pub sft_regularizer: Option<SftRegularizer>,
    pub checkpoint: CheckpointConfig,
}

impl Default for LearnerSpec {
    fn default() -> Self {
        LearnerSpec {
            algorithm: Algorithm::Grpo,
            kl: KlConfig::default(),
            grpo: GrpoConfig::default(),
            ppo: PpoConfig::default(),
            optim: OptimConfig::default(),
            sft_regularizer: None,
            checkpoint: CheckpointConfig::default(),
        }
    }
}

/// Processes the job needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourcesSpec {
    pub actors: usize,
    pub learner_ranks: usize,
    pub reward_replicas: usize,
    /// Sequences each actor decodes together.
    pub max_sequences: usize,
    /// Devices (e.g. `cuda:0`) assigned to workers in order; empty: CPU.
    pub devices: Vec<String>,
}

impl Default for ResourcesSpec {
    fn default() -> Self {
        ResourcesSpec {
            actors: 1,
            learner_ranks: 1,
            reward_replicas: 1,
            max_sequences: 64,
            devices: Vec::new(),
        }
    }
}

/// Periodic evaluation on held-out prompts (greedy, scored by the reward server).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluationSpec {
    /// Every N steps (0: never; the last step is always evaluated when eval prompts exist).
    pub every_steps: u64,
    /// At most this many eval prompts.
    pub max_prompts: usize,
    pub temperature: f32,
}

impl Default for EvaluationSpec {
    fn default() -> Self {
        EvaluationSpec {
            every_steps: 0,
            max_prompts: 64,
            temperature: 0.0,
        }
    }
}

/// The problem with a job name, if any: names become folder names and job ids.
pub fn name_problem(name: &str) -> Option<String> {
    let ok = !name.trim().is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    (!ok).then(|| format!("name: `{name}` must be non-empty letters, digits, `-`, `_` or `.`"))
}

/// Every problem of a file in one error: `N problem(s) in FILE:` then one per line.
pub fn problems_error(path: &Path, problems: Vec<String>) -> anyhow::Error {
    anyhow::anyhow!(
        "{} problem(s) in {}:\n  {}",
        problems.len(),
        path.display(),
        problems.join("\n  ")
    )
}

/// Writes a file atomically and durably: a temporary file beside it, fsynced, then renamed,
/// so a crash leaves the old or the new content, never a torn file.
pub fn write_atomic(path: &Path, content: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(content)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// The learner-side keys of an `[[objective]]` table; every other key is the reward server's.
const LEARNER_KEYS: &[&str] = &["transform", "weight"];

impl JobSpec {
    /// Reads, resolves and validates a job file. On failure, every problem found is listed.
    pub fn from_file(path: &Path) -> Result<JobSpec, Vec<String>> {
        let text =
            std::fs::read_to_string(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates; relative paths resolve against `path`'s folder.
    pub fn from_toml(text: &str, path: &Path) -> Result<JobSpec, Vec<String>> {
        Self::parse_unchecked(text, path)?.checked(path)
    }

    /// Parses, with relative paths resolved against `path`'s folder, but looks at no file (a
    /// coordinator checks a job's paths are allowed before it says whether they exist).
    pub fn parse_unchecked(text: &str, path: &Path) -> Result<JobSpec, Vec<String>> {
        let mut job: JobSpec = match toml::from_str(text) {
            Ok(job) => job,
            Err(first) => return Err(collect_parse_errors(text, path, first)),
        };
        // Absolute, so that no process (the learner resolves paths against its own config's
        // folder) reads a relative path against another folder.
        job.resolve_paths(&absolute_folder(path));
        Ok(job)
    }

    /// This job if it has no semantic problem, else every problem, prefixed with `path`.
    pub fn checked(self, path: &Path) -> Result<JobSpec, Vec<String>> {
        let at = |m: String| format!("{}: {m}", path.display());
        let problems: Vec<String> = self.problems().into_iter().map(at).collect();
        if problems.is_empty() {
            Ok(self)
        } else {
            Err(problems)
        }
    }

    /// Every path the job names, with its field, for `f` to read or rewrite.
    fn visit_paths(&mut self, mut f: impl FnMut(&str, &mut PathBuf)) {
        f("policy.model", &mut self.policy.model);
        if let Some(p) = &mut self.policy.reference {
            f("policy.reference", p);
        }
        if let Some(p) = &mut self.policy.critic {
            f("policy.critic", p);
        }
        f("data.prompts", &mut self.data.prompts);
        if let Some(p) = &mut self.data.eval_prompts {
            f("data.eval_prompts", p);
        }
        if let Some(p) = &mut self.output_dir {
            f("output_dir", p);
        }
        if let Some(s) = &mut self.learner.sft_regularizer {
            f("learner.sft_regularizer.data", &mut s.data);
        }
        let mut text_path = |field: String, value: &mut toml::Value| {
            if let toml::Value::String(s) = value {
                let mut p = PathBuf::from(&*s);
                f(&field, &mut p);
                *s = p.display().to_string();
            }
        };
        for (i, o) in self.objectives.iter_mut().enumerate() {
            for key in ["model", "tokenizer"] {
                if let Some(v) = o.get_mut(key) {
                    text_path(format!("objective[{i}].{key}"), v);
                }
            }
            if let Some(toml::Value::Array(models)) = o.get_mut("models") {
                for (j, m) in models.iter_mut().enumerate() {
                    text_path(format!("objective[{i}].models[{j}]"), m);
                }
            }
        }
    }

    fn resolve_paths(&mut self, base: &Path) {
        self.visit_paths(|_, p| {
            if p.is_relative() {
                *p = base.join(&*p)
            }
        });
    }

    /// Every path the job reads or writes, with its field (`output_dir` only when set).
    pub fn paths(&self) -> Vec<(String, PathBuf)> {
        let mut out = Vec::new();
        self.clone()
            .visit_paths(|field, p| out.push((field.to_string(), p.clone())));
        out
    }

    /// Every semantic problem, each naming its field.
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        p.extend(name_problem(&self.name));
        for (field, path) in [
            ("policy.model", Some(&self.policy.model)),
            ("policy.reference", self.policy.reference.as_ref()),
            ("policy.critic", self.policy.critic.as_ref()),
        ] {
            if let Some(dir) = path
                && !dir.join("config.json").is_file()
            {
                p.push(format!(
                    "{field}: {} is not a model folder (no config.json)",
                    dir.display()
                ));
            }
        }
        for (field, path) in [
            ("data.prompts", Some(&self.data.prompts)),
            ("data.eval_prompts", self.data.eval_prompts.as_ref()),
        ] {
            if let Some(file) = path
                && !file.is_file()
            {
                p.push(format!("{field}: {} does not exist", file.display()));
            }
        }
        if self.objectives.is_empty() {
            p.push("objective: at least one [[objective]] is required".into());
        }
        for (i, o) in self.objectives.iter().enumerate() {
            if let Some(t) = o.get("transform")
                && !matches!(t.as_str(), Some("identity" | "log_sigmoid"))
            {
                p.push(format!(
                    "objective[{i}].transform: {t} is not one of: identity, log_sigmoid"
                ));
            }
            if let Some(w) = o.get("weight")
                && w.as_float().or(w.as_integer().map(|i| i as f64)).is_none()
            {
                p.push(format!("objective[{i}].weight: {w} is not a number"));
            }
        }
        if let Err(e) = self.reward_config(Path::new("<job>")) {
            p.push(e);
        }
        let r = &self.rollout;
        for (field, v) in [
            ("rollout.steps", r.steps as usize),
            ("rollout.prompts_per_step", r.prompts_per_step),
            ("rollout.samples_per_prompt", r.samples_per_prompt as usize),
            ("rollout.max_new_tokens", r.max_new_tokens as usize),
        ] {
            if v == 0 {
                p.push(format!("{field}: must be at least 1"));
            }
        }
        if r.temperature.is_nan() || r.temperature <= 0.0 {
            p.push(format!(
                "rollout.temperature: must be > 0 for RL rollouts, got {}",
                r.temperature
            ));
        }
        if !(r.top_p > 0.0 && r.top_p <= 1.0) {
            p.push(format!("rollout.top_p: must be in (0, 1], got {}", r.top_p));
        }
        if r.mode == RolloutMode::Async && r.max_staleness == 0 {
            p.push("rollout.max_staleness: async mode needs at least 1 (0 is sync)".into());
        }
        if r.max_generation_rounds == 0 {
            p.push(
                "rollout.max_generation_rounds: must be at least 1 (the step's own round)".into(),
            );
        }
        if r.step_timeout_seconds.is_nan() || r.step_timeout_seconds <= 0.0 {
            p.push("rollout.step_timeout_seconds: must be > 0".into());
        }
        if self.learner.algorithm == Algorithm::Grpo && r.samples_per_prompt < 2 {
            p.push(format!("rollout.samples_per_prompt: GRPO compares samples of a prompt, needs at least 2, got {}", r.samples_per_prompt));
        }
        let res = &self.resources;
        for (field, v) in [
            ("resources.actors", res.actors),
            ("resources.learner_ranks", res.learner_ranks),
            ("resources.reward_replicas", res.reward_replicas),
            ("resources.max_sequences", res.max_sequences),
        ] {
            if v == 0 {
                p.push(format!("{field}: must be at least 1"));
            }
        }
        p.extend(crate::launcher::devices_problems(&res.devices));
        let q = self.rewards.reference_quantile;
        if !(0.0 < q && q < 1.0) {
            p.push(format!(
                "rewards.reference_quantile: must be in (0, 1), got {q}"
            ));
        }
        let t = self.rewards.timeout_seconds;
        if !(t.is_finite() && t > 0.0) {
            p.push(format!("rewards.timeout_seconds: must be > 0, got {t}"));
        }
        if self.rewards.reference_samples < 2 {
            p.push(format!(
                "rewards.reference_samples: at least 2 samples per prompt, got {}",
                self.rewards.reference_samples
            ));
        }
        if let Err(e) = self
            .learner_config(Path::new("learner"), &ParallelConfig::default())
            .validate()
        {
            p.push(format!("learner: {e}"));
        }
        p
    }

    /// The job's output folder, absolute (the default `runs/<name>` and a `--out` given on the
    /// command line are under the current folder).
    pub fn output_dir(&self) -> PathBuf {
        let dir = self
            .output_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(&self.name));
        std::path::absolute(&dir).unwrap_or(dir)
    }

    /// Objective names in order.
    pub fn objective_names(&self) -> Vec<String> {
        self.objectives
            .iter()
            .map(|o| {
                o.get("name")
                    .and_then(toml::Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    }

    /// Whether calibration of r_ref is needed.
    /// Whether `[policy] reference` names another model than `policy.model` (a second RL run
    /// from an RL checkpoint is the common case): r_ref must then be calibrated on it.
    pub fn reference_differs(&self) -> bool {
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        self.policy
            .reference
            .as_deref()
            .is_some_and(|r| canonical(r) != canonical(&self.policy.model))
    }

    pub fn needs_reference_rewards(&self) -> bool {
        self.objectives
            .iter()
            .any(|o| o.get("transform").and_then(toml::Value::as_str) == Some("log_sigmoid"))
    }

    /// The reward server's configuration text (objectives without the learner-side keys).
    pub fn reward_config_text(&self) -> String {
        let mut doc = toml::Table::new();
        doc.insert(
            "tokenizer".into(),
            toml::Value::String(self.policy.model.display().to_string()),
        );
        if let Some(b) = &self.rewards.batching {
            doc.insert("batching".into(), toml::Value::Table(b.clone()));
        }
        let objectives: Vec<toml::Value> = self
            .objectives
            .iter()
            .map(|o| {
                let mut t = o.clone();
                for k in LEARNER_KEYS {
                    t.remove(*k);
                }
                toml::Value::Table(t)
            })
            .collect();
        doc.insert("objective".into(), toml::Value::Array(objectives));
        toml::to_string(&doc).expect("a TOML table serialises")
    }

    /// The reward server's validated configuration.
    pub fn reward_config(&self, path: &Path) -> Result<RewardConfig, String> {
        RewardConfig::from_toml(&self.reward_config_text(), path).map_err(|e| {
            // Lines refer to the generated text, not the job file: report the field only.
            format!("{}: {}", e.field, e.message)
        })
    }

    /// The learner's configuration for this job.
    pub fn learner_config(&self, output_dir: &Path, parallel: &ParallelConfig) -> LearnerConfig {
        let l = &self.learner;
        let objectives = self
            .objectives
            .iter()
            .map(|o| ObjectiveWeight {
                name: o
                    .get("name")
                    .and_then(toml::Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                transform: match o.get("transform").and_then(toml::Value::as_str) {
                    Some("log_sigmoid") => Transform::LogSigmoid,
                    _ => Transform::Identity,
                },
                weight: o
                    .get("weight")
                    .and_then(|w| w.as_float().or(w.as_integer().map(|i| i as f64)))
                    .unwrap_or(1.0),
            })
            .collect();
        let mut grpo = l.grpo.clone();
        grpo.max_completion_length = self.rollout.max_new_tokens as usize;
        LearnerConfig {
            policy: self.policy.model.clone(),
            reference: self.policy.reference.clone(),
            critic: self.policy.critic.clone(),
            output_dir: output_dir.to_path_buf(),
            algorithm: l.algorithm,
            temperature: self.rollout.temperature as f64,
            seed: self.seed,
            rewards: RewardsConfig {
                objectives,
                clip: self.rewards.clip,
                reference_quantile: self.rewards.reference_quantile,
                reference_estimator: self.rewards.reference_estimator,
            },
            kl: l.kl.clone(),
            grpo,
            ppo: l.ppo.clone(),
            optim: l.optim.clone(),
            sft_regularizer: l.sft_regularizer.clone(),
            checkpoint: l.checkpoint.clone(),
            parallel: parallel.clone(),
        }
    }
}

/// After a whole-document parse error, parse section by section to report every problem.
fn collect_parse_errors(text: &str, path: &Path, first: toml::de::Error) -> Vec<String> {
    let line_of = |e: &toml::de::Error| {
        e.span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
    };
    let fmt = |e: &toml::de::Error, section: &str| match line_of(e) {
        Some(l) => format!("{}:{l}: {section}{}", path.display(), e.message()),
        None => format!("{}: {section}{}", path.display(), e.message()),
    };
    let Ok(doc) = toml::from_str::<toml::Table>(text) else {
        return vec![fmt(&first, "")];
    };
    let known = [
        "name",
        "output_dir",
        "seed",
        "priority",
        "policy",
        "data",
        "objective",
        "rewards",
        "rollout",
        "learner",
        "resources",
        "evaluation",
    ];
    let mut out: Vec<String> = doc
        .keys()
        .filter(|k| !known.contains(&k.as_str()))
        .map(|k| {
            format!(
                "{}: unknown field `{k}` (expected one of: {})",
                path.display(),
                known.join(", ")
            )
        })
        .collect();
    let mut check = |section: &str, r: Result<(), toml::de::Error>| {
        if let Err(e) = r {
            out.push(format!("{}: {section}: {}", path.display(), e.message()));
        }
    };
    fn section<T: serde::de::DeserializeOwned>(
        doc: &toml::Table,
        key: &str,
    ) -> Result<(), toml::de::Error> {
        match doc.get(key) {
            Some(v) => T::deserialize(v.clone()).map(|_| ()),
            None => Ok(()),
        }
    }
    check("policy", section::<PolicySpec>(&doc, "policy"));
    check("data", section::<DataSpec>(&doc, "data"));
    check("rewards", section::<RewardsSpec>(&doc, "rewards"));
    check("rollout", section::<RolloutSpec>(&doc, "rollout"));
    check("learner", section::<LearnerSpec>(&doc, "learner"));
    check("resources", section::<ResourcesSpec>(&doc, "resources"));
    check("evaluation", section::<EvaluationSpec>(&doc, "evaluation"));
    for required in ["name", "policy", "data", "objective"] {
        if !doc.contains_key(required) {
            out.push(format!("{}: missing field `{required}`", path.display()));
        }
    }
    if out.is_empty() {
        out.push(fmt(&first, ""));
    }
    out
}

/// The absolute folder of a file path (`job.toml` alone: the current folder).
fn absolute_folder(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => {
            std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
        }
        _ => std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let text = r#"
name = "bad name!"
colour = "blue"
[policy]
model = "nowhere"
[data]
prompts = "missing.jsonl"
[[objective]]
name = "a"
kind = "rule"
verifier = "regex"
pattern = "("
transform = "sqrt"
[rollout]
samples_per_prompt = 1
temperature = 0.0
[resources]
actors = 0
devices = ["cpu", "gpu0"]
"#;
        let errors = JobSpec::from_toml(text, Path::new("/jobs/job.toml")).unwrap_err();
        let all = errors.join("\n");
        assert!(all.contains("unknown field `colour`"), "{all}");
        let errors = JobSpec::from_toml(
            &text.replace("colour = \"blue\"\n", ""),
            Path::new("/jobs/job.toml"),
        )
        .unwrap_err();
        let all = errors.join("\n");
        for needle in [
            "name:",
            "policy.model",
            "data.prompts",
            "objective[0].pattern",
            "objective[0].transform",
            "rollout.samples_per_prompt",
            "rollout.temperature",
            "resources.actors",
            "resources.devices[1]",
        ] {
            assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
        }
        assert!(
            errors.iter().all(|e| e.starts_with("/jobs/job.toml")),
            "{all}"
        );
    }

    #[test]
    fn paths_of_a_job_given_by_a_relative_file_name_are_absolute() {
        // `rlhf run job.toml` from the job's folder: nothing may stay relative, or a worker
        // resolving it against its own folder writes elsewhere.
        let text = "name = \"x\"\n[policy]\nmodel = \"m\"\n[data]\nprompts = \"p.jsonl\"\n[[objective]]\nname = \"a\"\n";
        let mut job: JobSpec = toml::from_str(text).unwrap();
        job.output_dir = Some("out".into());
        job.resolve_paths(&absolute_folder(Path::new("job.toml")));
        assert!(job.policy.model.is_absolute() && job.data.prompts.is_absolute());
        assert!(job.output_dir().is_absolute());
        job.output_dir = None;
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(job.output_dir(), cwd.join("runs/x"));
    }

    #[test]
    fn unknown_nested_fields_are_errors() {
        let text = "name = \"x\"\n[policy]\nmodel = \"m\"\n[data]\nprompts = \"p\"\n[[objective]]\nname = \"a\"\n[rollout]\nstepz = 3\n[learner.optim]\nlrr = 1.0\n";
        let all = JobSpec::from_toml(text, Path::new("job.toml"))
            .unwrap_err()
            .join("\n");
        assert!(all.contains("stepz") && all.contains("lrr"), "{all}");
    }
}
