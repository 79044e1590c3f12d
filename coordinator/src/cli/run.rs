//! `rlhf run job.toml`: the whole job on this machine — workers as local child processes, the
//! controller in this process, a live progress display. Ctrl-C checkpoints and stops cleanly;
//! `--resume` continues from the latest checkpoint.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use tokio::sync::{Mutex, mpsc, watch};

use crate::controller::{Controller, Event, Gang, Outcome};
use crate::job::JobSpec;
use crate::launcher::{LocalCluster, LocalSupervisor};
use crate::state::{JobRecord, JobState};

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
pub fn load_job(path: &std::path::Path) -> Result<JobSpec> {
    JobSpec::from_file(path).map_err(|problems| crate::job::problems_error(path, problems))
}

/// Persists the job's record (state and history) in its output folder, atomically.
fn save_record(path: &std::path::Path, record: &JobRecord) -> Result<()> {
    crate::job::write_atomic(path, serde_json::to_string_pretty(record)?.as_bytes())?;
    Ok(())
}

pub fn run(args: RunArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.job)
        .with_context(|| format!("reading {}", args.job.display()))?;
    if crate::pipeline::is_pipeline(&text) {
        return crate::pipeline::run(&args, &text);
    }
    let mut job = load_job(&args.job)?;
    if let Some(out) = &args.out {
        job.output_dir = Some(out.clone());
    }
    if let Some(steps) = args.steps {
        job.rollout.steps = steps;
    }
    match run_job(&job, text, args.resume, args.quiet)? {
        Outcome::Succeeded => eprintln!(
            "job {} succeeded; metrics in {}",
            job.name,
            job.output_dir().join("metrics.jsonl").display()
        ),
        Outcome::Stopped { step } => eprintln!(
            "stopped after step {step}; `rlhf run {} --resume` continues",
            args.job.display()
        ),
    }
    Ok(())
}

/// How a caller other than the terminal drives a job run.
#[derive(Default)]
pub struct RunHooks {
    /// Stops the job (checkpoint, then `Outcome::Stopped`) when it turns true; without it,
    /// Ctrl-C does.
    pub stop: Option<watch::Receiver<bool>>,
    /// Receives every controller event.
    pub events: Option<mpsc::UnboundedSender<Event>>,
    /// Workers already started elsewhere (the pool launchers); without it, the job's workers
    /// are started here by the local launcher.
    pub gang: Option<Gang>,
}

/// Runs one job to its end on this machine: local workers, the controller, the progress
/// display, and the job's record in `job.json`. `spec` is the job file's text (kept in the
/// record). With `resume`, continues from the latest checkpoint.
pub fn run_job(job: &JobSpec, spec: String, resume: bool, quiet: bool) -> Result<Outcome> {
    run_job_with(job, spec, resume, quiet, RunHooks::default())
}

/// [`run_job`] with a stop signal and an event feed (the coordinator's jobs).
pub fn run_job_with(
    job: &JobSpec,
    spec: String,
    resume: bool,
    quiet: bool,
    hooks: RunHooks,
) -> Result<Outcome> {
    let out = job.output_dir();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let record_path = out.join("job.json");
    let mut record = if resume && record_path.is_file() {
        serde_json::from_str(&std::fs::read_to_string(&record_path)?).context("reading job.json")?
    } else {
        JobRecord::new(job.name.clone(), job.name.clone(), spec, job.priority)
    };
    if record.state.is_terminal() {
        if !resume {
            bail!(
                "{} holds a finished job ({}); use another --out or --resume",
                out.display(),
                record.state.as_str()
            );
        }
        record = JobRecord::new(
            job.name.clone(),
            job.name.clone(),
            record.spec_toml.clone(),
            job.priority,
        );
    }
    let placing = if hooks.gang.is_some() {
        "workers placed by the coordinator"
    } else {
        "starting local workers"
    };
    record
        .transition(JobState::Placing, placing)
        .map_err(anyhow::Error::msg)?;
    save_record(&record_path, &record)?;

    let exe = self_exe()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(drive(
        job.clone(),
        exe,
        resume,
        quiet,
        hooks,
        &mut record,
        &record_path,
    ));
    match &result {
        Ok(Outcome::Succeeded) => record.transition(JobState::Succeeded, "all steps done"),
        Ok(Outcome::Stopped { step }) => record.transition(
            JobState::Cancelled,
            format!("stopped by the user after step {step} (checkpointed; --resume continues)"),
        ),
        Err(e) => record.transition(JobState::Failed, format!("{e:#}")),
    }
    .map_err(anyhow::Error::msg)?;
    save_record(&record_path, &record)?;
    result
}

/// This binary, for starting workers. On Linux `/proc/self/exe` names the running image even
/// after the file was replaced (a rebuild during a long run), so workers started late in a
/// pipeline run the same code as the controller.
pub fn self_exe() -> Result<PathBuf> {
    let proc = PathBuf::from("/proc/self/exe");
    if proc.exists() {
        return Ok(proc);
    }
    std::env::current_exe().context("locating the rlhf binary")
}

async fn drive(
    job: JobSpec,
    exe: PathBuf,
    resume: bool,
    quiet: bool,
    hooks: RunHooks,
    record: &mut JobRecord,
    record_path: &std::path::Path,
) -> Result<Outcome> {
    let (gang, cluster) = match hooks.gang {
        Some(gang) => (gang, None),
        None => {
            let job = job.clone();
            let cluster =
                tokio::task::spawn_blocking(move || LocalCluster::launch(&job, &exe, resume))
                    .await??;
            let endpoints = cluster.endpoints();
            let cluster = Arc::new(Mutex::new(cluster));
            let supervisor = Box::new(LocalSupervisor(cluster.clone()));
            (
                Gang {
                    endpoints,
                    supervisor,
                },
                Some(cluster),
            )
        }
    };
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let stop_rx = match hooks.stop {
        Some(stop) => stop,
        None => {
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
    };
    let mut controller = Controller::new(
        job.clone(),
        gang.endpoints,
        events_tx,
        stop_rx,
        gang.supervisor,
    )?;
    let run = tokio::spawn(async move { controller.run().await });
    let display = Display::new(job.rollout.steps, quiet, job.objective_names());
    while let Some(e) = events.recv().await {
        if let Some(feed) = &hooks.events {
            let _ = feed.send(e.clone());
        }
        match e {
            Event::State { state, reason } => {
                if record.state != state {
                    let _ = record.transition(state, reason.clone());
                    save_record(record_path, record)?;
                }
                display.log(&format!("{}: {reason}", state.as_str()));
            }
            Event::Step {
                step,
                total,
                metrics,
            } => {
                record.last_step = step;
                save_record(record_path, record)?;
                display.step(step, total, &metrics);
            }
            Event::Log(line) => display.log(&line),
        }
    }
    display.finish();
    let outcome = run
        .await
        .map_err(|e| anyhow::anyhow!("controller task: {e}"))?;
    drop(cluster);
    outcome
}

/// The live progress display.
struct Display {
    bar: indicatif::ProgressBar,
    quiet: bool,
    objectives: Vec<String>,
}

impl Display {
    fn new(total: u64, quiet: bool, objectives: Vec<String>) -> Self {
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
