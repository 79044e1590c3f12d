//! The quickstart experiment: a synthetic instruction task with a ground-truth judge. `rlhf run`
//! on a file with a `[task]` table runs, in order,
//!
//! 1. `data`: prompts, SFT corpus and noisy preference pairs of the synthetic task;
//! 2. `tokenizer`: a byte-level BPE tokenizer trained on that corpus;
//! 3. `init`: a tiny Llama initialised from scratch;
//! 4. `sft`: supervised fine-tuning on the corpus;
//! 5. `reward_models`: one Bradley-Terry reward model per property (helpful, harmless);
//! 6. `sft_eval`: the SFT policy judged on held-out prompts;
//! 7. one RL job per arm (transform × seed): calibration of r_ref, GRPO or PPO, evaluations;
//! 8. the report: `report.json`, `report.md`, `curves.png` and the arms' `metrics.jsonl`.
//!
//! Each finished stage leaves `stages/<stage>.json`; `--resume` skips finished stages and arms
//! and continues an interrupted arm from its checkpoint. The chain itself (stage markers,
//! the output folder's claim, RL jobs through the runner) is the control plane's generic
//! [`rlhf_coordinator::pipeline`]; this crate holds only what is particular to the demo task.

pub mod data;
pub mod report;
pub mod spec;
pub mod task;
pub mod tokenizer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use rlhf_coordinator::controller::Outcome;
use rlhf_coordinator::job::JobSpec;
use rlhf_coordinator::pipeline::{Stages, claim_output, rl_job};
use rlhf_coordinator::plot;
use rlhf_coordinator::runner::Sink;
use rlhf_model::config::LlamaDims;
use rlhf_model::{DType, Model, ModelConfig, SaveOptions, device};
use tokio::sync::watch;

use report::{ArmReport, Report, RunResult};
pub use spec::{Layout, PipelineSpec, is_pipeline};

/// A pipeline run as the command line asks for it.
pub struct Options {
    /// The pipeline file and its text.
    pub file: PathBuf,
    pub text: String,
    /// Overrides the file's `output_dir`.
    pub out: Option<PathBuf>,
    /// Overrides `rollout.steps`.
    pub steps: Option<u64>,
    pub resume: bool,
    /// No progress bars in the training stages.
    pub quiet: bool,
}

/// How a pipeline run ended.
pub enum Finished {
    /// Every stage ran: the report's table and where its files are.
    Done {
        table: String,
        report: PathBuf,
        curves: PathBuf,
    },
    /// Stopped on request inside an RL arm (checkpointed).
    Stopped { arm: String, seed: u64, step: u64 },
}

/// Progress display for one RL job (the command line's), if any.
pub type Progress<'a> = &'a dyn Fn(&JobSpec) -> Option<Box<dyn Sink>>;

/// Runs a pipeline file. The training stages run on this thread; the RL jobs on `runtime`.
/// `stop` is asked for when the first RL job starts (so a front end can let Ctrl-C end the
/// training stages at once, and stop an RL job after a checkpoint); its turning true stops the
/// current RL job.
pub fn run(
    args: &Options,
    runtime: &tokio::runtime::Handle,
    stop: &dyn Fn() -> watch::Receiver<bool>,
    progress: Progress<'_>,
) -> Result<Finished> {
    let text = args.text.as_str();
    let mut spec = PipelineSpec::from_toml(text, &args.file)
        .map_err(|problems| rlhf_coordinator::job::problems_error(&args.file, problems))?;
    if let Some(out) = &args.out {
        spec.output_dir = Some(out.clone());
    }
    if let Some(steps) = args.steps {
        spec.rollout.steps = steps;
    }
    // Absolute, so the arms' job files (which resolve relative paths against their own folder)
    // point at the right models and data.
    let root = std::path::absolute(spec.output_dir())
        .with_context(|| format!("output folder {}", spec.output_dir().display()))?;
    let layout = Layout { root };
    claim_output(&layout.root, text, args.resume)?;
    let mut stages = Stages::new(&layout.root);

    let data = stages.run("data", || data::generate(&spec, &layout))?;
    eprintln!(
        "  {} train / {} held-out prompts, {} SFT examples ({:.0}% good), {} pairs per property",
        data.train_prompts,
        data.eval_prompts,
        data.sft_examples,
        100.0 * data.sft_good_rate,
        data.preference_pairs
    );
    let vocab = stages.run("tokenizer", || {
        let corpus = data::corpus(&layout)?;
        let (vocab, _) = tokenizer::train_tokenizer(
            corpus.iter().map(String::as_str),
            spec.task.vocab_size,
            &layout.model("tokenizer"),
        )?;
        Ok(vocab)
    })?;
    stages.run("init", || init_model(&spec, &layout, vocab))?;
    let sft = stages.run("sft", || {
        let report = rlhf_learner::sft::train_sft(&rlhf_learner::sft::SftOptions {
            model: layout.model("init"),
            data: layout.data("sft.jsonl"),
            out: layout.model("sft"),
            epochs: spec.sft.epochs,
            lr: spec.sft.lr,
            batch_size: spec.sft.batch_size,
            max_length: None,
            eval_fraction: 0.05,
            seed: spec.seed,
            weight_decay: 0.0,
            skip_invalid: false,
            dtype: None,
            quiet: args.quiet,
        })?;
        Ok(report.last().cloned())
    })?;
    if let Some(e) = &sft {
        eprintln!(
            "  SFT: train NLL {:.3}, held-out NLL {:.3}",
            e.train_nll,
            e.eval_nll.unwrap_or(f64::NAN)
        );
    }
    let reward_models = stages.run("reward_models", || {
        train_reward_models(&spec, &layout, args.quiet)
    })?;
    let requests = report::eval_requests(&layout.data("eval.jsonl"))?;
    let sft_judged = stages.run("sft_eval", || {
        let completions = report::sample_policy(
            &layout.model("sft"),
            &requests,
            spec.evaluation.temperature,
            spec.rollout.max_new_tokens as usize,
            spec.seed,
        )?;
        Ok(report::judge_all(&requests, &completions))
    })?;
    eprintln!(
        "  SFT policy on held-out prompts: helpful {:.3}, harmless {:.3}, both good {:.3}, {:.1} words",
        sft_judged.helpful, sft_judged.harmless, sft_judged.both_good, sft_judged.mean_length
    );

    let mut arms = BTreeMap::new();
    let mut arm_metrics = BTreeMap::new();
    let mut rl_seconds = 0.0;
    for transform in &spec.arms.transforms {
        let mut runs = Vec::new();
        for seed in spec.seeds() {
            let job = spec.arm_job(&layout, transform, seed);
            let dir = job.output_dir();
            eprintln!("[rl {transform} seed {seed}] → {}", dir.display());
            let arm_started = Instant::now();
            let outcome = runtime.block_on(rl_job(&job, stop(), progress(&job)))?;
            rl_seconds += arm_seconds(&dir, arm_started.elapsed().as_secs_f64())?;
            if let Outcome::Stopped { step } = outcome {
                return Ok(Finished::Stopped {
                    arm: transform.clone(),
                    seed,
                    step,
                });
            }
            let metrics = plot::read_metrics(&dir.join("metrics.jsonl"))?;
            let evaluations = report::judge_arm(&dir, &requests)?;
            let last = evaluations
                .last()
                .cloned()
                .with_context(|| format!("{}: no evaluation was written", dir.display()))?;
            runs.push(RunResult {
                seed,
                judged: last.judged,
                kl: report::final_kl(&metrics, 5),
                rewards: last.rewards.clone(),
                evaluations,
            });
            arm_metrics.insert((transform.clone(), seed), metrics);
        }
        arms.insert(transform.clone(), ArmReport::new(runs));
    }
    let mut timing = stages.timing;
    timing.insert("rl".into(), rl_seconds);
    let total = timing.values().sum::<f64>();
    timing.insert("total".into(), total);
    let report = Report {
        algorithm: format!("{:?}", spec.learner.algorithm).to_lowercase(),
        sft: sft_judged,
        arms,
        data: serde_json::to_value(&data)?,
        reward_models,
        timing_seconds: timing,
    };
    write_report(&layout, &report, &arm_metrics)?;
    Ok(Finished::Done {
        table: report.table(),
        report: layout.root.join("report.md"),
        curves: layout.root.join("curves.png"),
    })
}

/// Adds `seconds` to the arm's recorded wall time (`pipeline_seconds.json`, so a resumed
/// pipeline still reports the whole time) and returns the total.
fn arm_seconds(dir: &Path, seconds: f64) -> Result<f64> {
    let path = dir.join("pipeline_seconds.json");
    let before = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| t.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    std::fs::write(&path, format!("{}\n", before + seconds))?;
    Ok(before + seconds)
}

/// A tiny Llama from scratch, with the trained tokenizer.
fn init_model(spec: &PipelineSpec, layout: &Layout, vocab: usize) -> Result<u64> {
    let tokenizer = rlhf_model::Tokenizer::from_dir(&layout.model("tokenizer"))?;
    let id = |t: &str| {
        tokenizer
            .token_id(t)
            .with_context(|| format!("tokenizer lacks {t}"))
    };
    let m = &spec.model;
    let config = ModelConfig::llama(LlamaDims {
        vocab_size: vocab,
        hidden_size: m.hidden_size,
        intermediate_size: m.intermediate_size,
        num_layers: m.num_layers,
        num_heads: m.num_heads,
        num_kv_heads: m.num_kv_heads,
        max_position_embeddings: m.max_position_embeddings,
        tie_word_embeddings: true,
        bos_token_id: id(tokenizer::BOS)?,
        eos_token_id: id(tokenizer::EOS)?,
        pad_token_id: id(tokenizer::PAD)?,
    });
    let dir = layout.model("init");
    let options = SaveOptions {
        dtype: DType::F32,
        ..Default::default()
    };
    Model::init(&config, &device::inference_device()?, spec.seed).save_with_tokenizer(
        &dir,
        &options,
        &layout.model("tokenizer"),
    )?;
    Ok(config.num_parameters() as u64)
}

/// One Bradley-Terry reward model per property, on the SFT policy.
fn train_reward_models(
    spec: &PipelineSpec,
    layout: &Layout,
    quiet: bool,
) -> Result<serde_json::Value> {
    let mut out = serde_json::Map::new();
    for name in spec::OBJECTIVES {
        eprintln!("  reward model `{name}`");
        let report = rlhf_reward::train::train(&rlhf_reward::train::TrainOptions {
            base: layout.model("sft"),
            data: layout.data(&format!("prefs-{name}.jsonl")),
            out: layout.model(&format!("rm-{name}")),
            epochs: spec.reward_models.epochs,
            lr: spec.reward_models.lr,
            batch_size: spec.reward_models.batch_size,
            margin: 0.0,
            center_coef: 0.01,
            eval_fraction: 0.1,
            seed: spec.seed,
            weight_decay: 0.0,
            max_length: None,
            skip_invalid: false,
            dtype: None,
            quiet,
        })?;
        let accuracy = report
            .epochs
            .last()
            .and_then(|e| e.eval_accuracy)
            .unwrap_or(f64::NAN);
        eprintln!("  `{name}`: held-out pairwise accuracy {accuracy:.3}");
        out.insert(
            name.into(),
            serde_json::json!({"accuracy": accuracy, "train_pairs": report.train_pairs, "eval_pairs": report.eval_pairs}),
        );
    }
    Ok(serde_json::Value::Object(out))
}

/// `report.json`, `report.md`, `curves.png`, and every arm's metrics in one `metrics.jsonl`
/// (each line tagged with its arm and seed).
fn write_report(
    layout: &Layout,
    report: &Report,
    metrics: &BTreeMap<(String, u64), plot::MetricSeries>,
) -> Result<()> {
    let root = &layout.root;
    std::fs::write(
        root.join("report.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    std::fs::write(root.join("report.md"), report.markdown())?;
    let mut lines = String::new();
    for transform in report.arms.keys() {
        for run in &report.arms[transform].runs {
            let path = layout.arm(transform, run.seed).join("metrics.jsonl");
            for line in std::fs::read_to_string(&path)?.lines() {
                let mut v: serde_json::Value = serde_json::from_str(line)
                    .with_context(|| format!("reading {}", path.display()))?;
                v["arm"] = transform.as_str().into();
                v["seed"] = run.seed.into();
                lines.push_str(&v.to_string());
                lines.push('\n');
            }
        }
    }
    std::fs::write(root.join("metrics.jsonl"), lines)?;
    plot::draw(&report.panels(metrics), 3, &root.join("curves.png"))
}
