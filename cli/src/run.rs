//! `rlhf run job.toml`: the whole job on this machine — workers as local child processes, the
//! controller in this process, a live progress display. Ctrl-C checkpoints and stops cleanly;
//! `--resume` continues from the latest checkpoint. A file with a `[task]` table is the
//! quickstart pipeline. Also `rlhf validate`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use rlhf_coordinator::controller::{Event, Outcome};
use rlhf_coordinator::job::JobSpec;
use rlhf_coordinator::runner::{JobFile, RunOptions, Sink};
use rlhf_coordinator::state::JobRecord;
use tokio::sync::watch;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The job file.
    pub job: PathBuf,
    /// Output folder (default: the job's `output_dir`, else `runs/<name>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue from the latest checkpoint in the output folder.
    #[arg(long)]
    pub resume: bool,
    /// Override `rollout.steps`.
    #[arg(long)]
    pub steps: Option<u64>,
    /// No progress bar (one log line per step).
    #[arg(long)]
    pub quiet: bool,
}

/// Loads a job file, listing every validation problem.
pub fn load_job(path: &Path) -> Result<JobSpec> {
    JobSpec::from_file(path)
        .map_err(|problems| rlhf_coordinator::job::problems_error(path, problems))
}

pub fn run(args: RunArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.job)
        .with_context(|| format!("reading {}", args.job.display()))?;
    let runtime = crate::runtime::runtime()?;
    if rlhf_quickstart::is_pipeline(&text) {
        return pipeline(&args, text, &runtime);
    }
    let stop = runtime.block_on(async { ctrl_c_stops() });
    let mut job = load_job(&args.job)?;
    if let Some(out) = &args.out {
        job.output_dir = Some(out.clone());
    }
    if let Some(steps) = args.steps {
        job.rollout.steps = steps;
    }
    let outcome = runtime.block_on(run_job(&job, text, args.resume, args.quiet, stop))?;
    match outcome {
        Outcome::Succeeded => {
            let out = job.output_dir();
            eprintln!(
                "job {} succeeded; metrics in {}",
                job.name,
                out.join("metrics.jsonl").display()
            );
            // The controller exports the trained policy there with the last checkpoint.
            let policy = out.join("policy");
            if policy.join("config.json").is_file() {
                eprintln!(
                    "trained policy (a Hugging Face model folder): {}",
                    policy.display()
                );
            }
        }
        Outcome::Stopped { step } => eprintln!(
            "stopped after step {step}; `rlhf run {} --resume` continues",
            args.job.display()
        ),
    }
    Ok(())
}

/// Runs one job here with the progress display and `job.json`.
pub async fn run_job(
    job: &JobSpec,
    spec_toml: String,
    resume: bool,
    quiet: bool,
    stop: watch::Receiver<bool>,
) -> Result<Outcome> {
    let (file, record) = JobFile::open(&job.output_dir(), job, spec_toml, resume)?;
    let sinks: Vec<Box<dyn Sink>> = vec![Box::new(file), Box::new(Display::new(job, quiet))];
    let options = RunOptions {
        resume,
        stop,
        gang: None,
        exe: rlhf_proto::process::self_exe().context("locating the rlhf binary")?,
    };
    rlhf_coordinator::runner::run(job, record, options, sinks)
        .await
        .0
}

fn pipeline(args: &RunArgs, text: String, runtime: &tokio::runtime::Runtime) -> Result<()> {
    let options = rlhf_quickstart::Options {
        file: args.job.clone(),
        text,
        out: args.out.clone(),
        steps: args.steps,
        resume: args.resume,
        quiet: args.quiet,
    };
    let quiet = args.quiet;
    let progress =
        move |job: &JobSpec| -> Option<Box<dyn Sink>> { Some(Box::new(Display::new(job, quiet))) };
    // Ctrl-C keeps its default action (end at once) through the training stages; from the
    // first RL job on, it stops the job after a checkpoint.
    let stop = std::cell::OnceCell::new();
    let stop = || {
        stop.get_or_init(|| runtime.block_on(async { ctrl_c_stops() }))
            .clone()
    };
    match rlhf_quickstart::run(&options, runtime.handle(), &stop, &progress)? {
        rlhf_quickstart::Finished::Done {
            table,
            report,
            curves,
        } => {
            println!("\n{table}");
            println!("report: {}  curves: {}", report.display(), curves.display());
        }
        rlhf_quickstart::Finished::Stopped { arm, seed, step } => eprintln!(
            "stopped in arm {arm}/seed {seed} after step {step}; `rlhf run {} --resume` continues",
            args.job.display()
        ),
    }
    Ok(())
}

/// A stop switch that Ctrl-C turns on (a second Ctrl-C exits at once). Call on the runtime.
fn ctrl_c_stops() -> watch::Receiver<bool> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\nstopping after the current step (Ctrl-C again to kill)…");
            let _ = stop_tx.send(true);
            let _ = tokio::signal::ctrl_c().await;
            std::process::exit(130);
        }
    });
    stop_rx
}

/// `rlhf validate`: every problem of a job or pipeline file.
pub fn validate(job: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(job).map_err(|e| anyhow::anyhow!("{}: {e}", job.display()))?;
    if rlhf_quickstart::is_pipeline(&text) {
        let spec = rlhf_quickstart::PipelineSpec::from_toml(&text, job)
            .map_err(|p| rlhf_coordinator::job::problems_error(job, p))?;
        println!(
            "{}: ok — pipeline `{}`, arms {:?} × seeds {:?}, {} RL steps, {:?}",
            job.display(),
            spec.name,
            spec.arms.transforms,
            spec.seeds(),
            spec.rollout.steps,
            spec.learner.algorithm
        );
        return Ok(());
    }
    let spec = load_job(job)?;
    println!(
        "{}: ok — job `{}`, {} objective(s), {} steps, {:?}",
        job.display(),
        spec.name,
        spec.objectives.len(),
        spec.rollout.steps,
        spec.learner.algorithm
    );
    Ok(())
}

/// The live progress display.
struct Display {
    bar: indicatif::ProgressBar,
    quiet: bool,
    objectives: Vec<String>,
}

impl Display {
    fn new(job: &JobSpec, quiet: bool) -> Self {
        let (total, objectives) = (job.rollout.steps, job.objective_names());
        let bar = if quiet {
            indicatif::ProgressBar::hidden()
        } else {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:25}] step {pos}/{len} ETA {eta} {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar
        };
        Display {
            bar,
            quiet,
            objectives,
        }
    }

    fn log(&self, line: &str) {
        if self.quiet {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    fn step(&self, step: u64, total: u64, m: &BTreeMap<String, f64>) {
        let get = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
        let rewards: Vec<String> = self
            .objectives
            .iter()
            .map(|o| format!("{o}={:.3}", get(&format!("reward/{o}/raw"))))
            .collect();
        let msg = format!(
            "| {} | total {:.3} | kl {:.3} (β {:.3}) | {:.0} tok/s",
            rewards.join(" "),
            get("reward/total"),
            get("kl/sequence"),
            get("kl/beta"),
            get("rollout/tokens_per_s")
        );
        if self.quiet {
            eprintln!("step {step}/{total} {msg}");
        } else {
            self.bar.set_position(step);
            self.bar.set_message(msg);
        }
    }

    fn finish(&self) {
        self.bar.finish();
    }
}

#[tonic::async_trait]
impl Sink for Display {
    async fn event(&mut self, event: &Event, record: &JobRecord) -> Result<()> {
        match event {
            Event::State { state, reason } => {
                self.log(&format!("{}: {reason}", state.as_str()));
                if record.state.is_terminal() {
                    self.finish();
                }
            }
            Event::Step {
                step,
                total,
                metrics,
            } => self.step(*step, *total, metrics),
            Event::Log(line) => self.log(line),
        }
        Ok(())
    }
}
