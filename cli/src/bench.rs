//! `rlhf bench grpo`: GRPO steps through the real services (actor, reward server, learner as
//! local processes, the controller in this process) on a fixed synthetic workload, reporting
//! seconds per step, generated tokens per second and peak memory. The workload matches
//! `examples/bench/trl_grpo.py`, which runs TRL's `GRPOTrainer` on the same checkpoint:
//! fixed prompts, a rule reward (the share of the byte `a` in the completion), β = 0,
//! temperature 1, learning rate 1e-6, one optimizer step per GRPO step.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use rlhf_coordinator::controller::Outcome;
use rlhf_coordinator::job::{DataSpec, JobSpec, PolicySpec};
use rlhf_learner::algo::kl::KlController;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// GRPO steps through the real services on a fixed synthetic workload.
    Grpo(GrpoBenchArgs),
}

#[derive(Debug, Args)]
pub struct GrpoBenchArgs {
    /// The policy (HF model folder).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompts per step.
    #[arg(long, default_value_t = 8)]
    pub prompts: usize,
    /// Completions per prompt.
    #[arg(long, default_value_t = 8)]
    pub samples: u32,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: u32,
    /// Measured steps.
    #[arg(long, default_value_t = 5)]
    pub steps: u64,
    /// Steps run first and not measured.
    #[arg(long, default_value_t = 1)]
    pub warmup: u64,
    /// Where the run's files go (default: a temporary folder, removed afterwards).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Grpo(args) => grpo(&args),
    }
}

/// The benchmark's prompts: fixed, so every system sees the same workload.
pub fn bench_prompts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("Write a short story about the number {i}. Once upon a time"))
        .collect()
}

fn bench_job(args: &GrpoBenchArgs, dir: &Path) -> Result<JobSpec> {
    let prompts = dir.join("prompts.jsonl");
    let lines: Vec<String> = bench_prompts(args.prompts)
        .into_iter()
        .enumerate()
        .map(|(i, p)| serde_json::json!({"id": format!("p{i}"), "prompt": p}).to_string())
        .collect();
    std::fs::write(&prompts, lines.join("\n") + "\n")?;
    let objective: toml::Table = toml::from_str(
        "name = \"byte_share\"\nkind = \"rule\"\nverifier = \"byte_share\"\nbyte = \"a\"\n",
    )
    .expect("a valid table");
    let mut job = JobSpec {
        name: "bench-grpo".into(),
        output_dir: Some(dir.join("run")),
        seed: 0,
        priority: 0,
        policy: PolicySpec {
            model: args.model.clone(),
            reference: None,
            critic: None,
        },
        data: DataSpec {
            prompts,
            eval_prompts: None,
        },
        objectives: vec![objective],
        rewards: Default::default(),
        rollout: Default::default(),
        learner: Default::default(),
        resources: Default::default(),
        evaluation: Default::default(),
    };
    job.rollout.steps = args.warmup + args.steps;
    job.rollout.prompts_per_step = args.prompts;
    job.rollout.samples_per_prompt = args.samples;
    job.rollout.max_new_tokens = args.max_new_tokens;
    job.learner.kl.controller = KlController::Fixed { value: 0.0 };
    job.learner.optim.lr = 1e-6;
    job.learner.optim.micro_batch = (args.prompts * args.samples as usize).max(1);
    // Validate like a job file would be.
    let path = dir.join("job.toml");
    std::fs::write(&path, toml::to_string(&job)?)?;
    JobSpec::from_file(&path).map_err(|p| anyhow::anyhow!("{}", p.join("\n")))
}

/// Peak resident memory (`VmHWM`) of a process, in bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Polls the workers' peak memory while the run lasts (each process's `VmHWM` only grows, so
/// the last reading before it exits is its peak).
fn watch_workers(run: PathBuf, done: Arc<AtomicBool>, peaks: Arc<Mutex<BTreeMap<u32, u64>>>) {
    while !done.load(Ordering::Relaxed) {
        let pids: Vec<u32> = std::fs::read_to_string(run.join("workers/endpoints.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<Vec<serde_json::Value>>(&t).ok())
            .unwrap_or_default()
            .iter()
            .filter_map(|w| w["pid"].as_u64().map(|p| p as u32))
            .collect();
        for pid in pids {
            if let Some(rss) = peak_rss(pid) {
                let mut p = peaks.lock().expect("not poisoned");
                let e = p.entry(pid).or_default();
                *e = (*e).max(rss);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn grpo(args: &GrpoBenchArgs) -> Result<()> {
    if args.steps == 0 || args.prompts == 0 || args.samples < 2 {
        bail!("--steps and --prompts must be at least 1 and --samples at least 2");
    }
    let temp = match &args.out {
        Some(_) => None,
        None => Some(tempfile::tempdir().context("creating a temporary folder")?),
    };
    let dir = args
        .out
        .clone()
        .unwrap_or_else(|| temp.as_ref().expect("set above").path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let job = bench_job(args, &dir)?;
    let done = Arc::new(AtomicBool::new(false));
    let peaks = Arc::new(Mutex::new(BTreeMap::new()));
    let watcher = {
        let (run, done, peaks) = (job.output_dir(), done.clone(), peaks.clone());
        std::thread::spawn(move || watch_workers(run, done, peaks))
    };
    let (_, never) = tokio::sync::watch::channel(false);
    let outcome =
        crate::runtime::block_on(crate::run::run_job(&job, String::new(), false, true, never));
    done.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    if let Outcome::Stopped { .. } = outcome? {
        bail!("interrupted");
    }
    let metrics = rlhf_coordinator::plot::read_metrics(&job.output_dir().join("metrics.jsonl"))?;
    let measured = |key: &str| -> Vec<f64> {
        metrics
            .get(key)
            .map(|points| {
                points
                    .iter()
                    .filter(|(step, _)| *step > args.warmup as f64)
                    .map(|p| p.1)
                    .collect()
            })
            .unwrap_or_default()
    };
    let seconds = measured("time/step_total_s");
    let lengths = measured("completion/length");
    let sequences = (args.prompts * args.samples as usize) as f64;
    let total_s: f64 = seconds.iter().sum();
    let tokens: f64 = lengths.iter().map(|l| l * sequences).sum();
    let workers: u64 = peaks.lock().expect("not poisoned").values().sum();
    let controller = peak_rss(std::process::id()).unwrap_or(0);
    let report = serde_json::json!({
        "system": "rlhf",
        "model": args.model.display().to_string(),
        "prompts": args.prompts,
        "samples": args.samples,
        "max_new_tokens": args.max_new_tokens,
        "steps": args.steps,
        "warmup": args.warmup,
        "seconds_per_step": total_s / seconds.len().max(1) as f64,
        "step_seconds": seconds,
        "generated_tokens_per_s": tokens / total_s.max(1e-9),
        "mean_completion_tokens": lengths.iter().sum::<f64>() / lengths.len().max(1) as f64,
        "peak_rss_mb": (workers + controller) as f64 / 1e6,
        // The controller (this process): it handles summaries and control calls only, so it
        // stays small whatever the model size.
        "controller_peak_rss_mb": controller as f64 / 1e6,
        "peak_rss_mb_per_process": peaks.lock().expect("not poisoned").values().map(|b| *b as f64 / 1e6).collect::<Vec<_>>(),
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "GRPO on {}: {} prompts × {} samples × ≤{} tokens, {} measured steps after {} warm-up\n  {:.3} s/step, {:.0} generated tokens/s, peak memory {:.0} MB (all processes; the controller {:.0} MB)",
            args.model.display(),
            args.prompts,
            args.samples,
            args.max_new_tokens,
            args.steps,
            args.warmup,
            report["seconds_per_step"].as_f64().unwrap_or(f64::NAN),
            report["generated_tokens_per_s"]
                .as_f64()
                .unwrap_or(f64::NAN),
            report["peak_rss_mb"].as_f64().unwrap_or(f64::NAN),
            report["controller_peak_rss_mb"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
    }
    Ok(())
}
