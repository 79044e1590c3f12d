//! `rlhf chaos`: a job run twice on a cluster of real processes on this machine, once clean
//! and once while a seeded fault injector kills or pauses its processes (actors, learner
//! ranks, reward servers, the coordinator, whole pool workers); then the two are compared.
//!
//! The faulted run must succeed with every step recorded exactly once and, on CPU with the same
//! seeds, end with bit-identical weights (docs/reliability.md says what makes that hold and
//! what would break it). The report says what was injected, how long each recovery took
//! (fault to the next recorded step), which steps were trained again from a checkpoint, and
//! the largest weight difference.

pub mod cluster;
pub mod compare;
pub mod plan;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;

use crate::job::JobSpec;
use cluster::{Cluster, signal};
use plan::{Action, Fault, Shape, Target};

/// What `rlhf chaos` is asked for.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    pub job: PathBuf,
    pub faults: usize,
    pub seed: u64,
    /// Where the cluster's logs and both runs go.
    pub out: PathBuf,
    /// Overrides the job's `rollout.steps`.
    pub steps: Option<u64>,
    /// The `rlhf` binary.
    pub exe: PathBuf,
}

/// One injected fault and what became of it.
#[derive(Debug, Clone, Serialize)]
pub struct FaultReport {
    #[serde(flatten)]
    pub fault: Fault,
    /// Seconds into the faulted run.
    pub at_seconds: f64,
    /// The last recorded step when it hit.
    pub step: u64,
    /// From the fault to the next recorded step (or the job's end); None: never.
    pub recovery_seconds: Option<f64>,
}

/// The result of a chaos run (`--json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    pub job: String,
    pub seed: u64,
    pub steps: u64,
    /// Faults injected (of `planned`).
    pub faults: usize,
    pub planned: usize,
    pub recovered: usize,
    pub steps_lost: usize,
    pub steps_applied_twice: usize,
    pub steps_redone: u64,
    pub max_abs_weight_diff: f64,
    pub tensors_differing: Vec<String>,
    pub clean_seconds: f64,
    pub faulted_seconds: f64,
    pub events: Vec<FaultReport>,
    pub clean_dir: PathBuf,
    pub faulted_dir: PathBuf,
}

impl ChaosReport {
    /// Whether the faults changed nothing that matters: every fault recovered, no step lost or
    /// applied twice, weights within `max_weight_diff`.
    pub fn passed(&self, max_weight_diff: f64) -> bool {
        self.recovered == self.faults
            && self.steps_lost == 0
            && self.steps_applied_twice == 0
            && self.max_abs_weight_diff <= max_weight_diff
    }

    /// The report for people, one line per fault.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for e in &self.events {
            let action = match e.fault.action {
                Action::Kill => "killed".to_string(),
                Action::Pause { seconds } => format!("paused {seconds:.1} s"),
            };
            let recovery = e.recovery_seconds.map_or("not recovered".to_string(), |s| {
                format!("recovered in {s:.1} s")
            });
            out += &format!(
                "  {:>6.1} s  after step {:>3}: {} {action}; {recovery}\n",
                e.at_seconds, e.step, e.fault.target
            );
        }
        out += &format!(
            "faults {} of {} planned, recovered {}; steps lost {}, applied twice {}, redone {}; \
             max |weight diff| {:e}{}\nclean run {:.1} s, faulted run {:.1} s",
            self.faults,
            self.planned,
            self.recovered,
            self.steps_lost,
            self.steps_applied_twice,
            self.steps_redone,
            self.max_abs_weight_diff,
            if self.tensors_differing.is_empty() {
                " (bit-identical)".to_string()
            } else {
                format!(" in {} tensors", self.tensors_differing.len())
            },
            self.clean_seconds,
            self.faulted_seconds
        );
        out
    }
}

/// The job's text with its output folder (and steps) replaced.
fn variant(text: &str, out: &Path, steps: Option<u64>) -> Result<String> {
    let mut doc: toml::Table = text.parse().context("parsing the job file")?;
    doc.insert("output_dir".into(), out.display().to_string().into());
    if let Some(steps) = steps {
        let rollout = doc
            .entry("rollout")
            .or_insert_with(|| toml::Value::Table(Default::default()));
        let table = rollout
            .as_table_mut()
            .ok_or_else(|| anyhow!("`rollout` is not a table"))?;
        table.insert("steps".into(), toml::Value::Integer(steps as i64));
    }
    Ok(toml::to_string(&doc)?)
}

/// Runs the chaos experiment of `options`.
pub fn run(options: &ChaosOptions) -> Result<ChaosReport> {
    let text = std::fs::read_to_string(&options.job)
        .with_context(|| format!("reading {}", options.job.display()))?;
    let spec = JobSpec::from_file(&options.job)
        .map_err(|problems| anyhow!("{}: {}", options.job.display(), problems.join("; ")))?;
    if spec.rollout.mode == crate::job::RolloutMode::Async {
        bail!(
            "rollout.mode = \"async\": which weights a step's samples come from depends on timing, \
             so a faulted run cannot be compared bit for bit; run chaos on the sync job"
        );
    }
    let base = std::path::absolute(&options.job)?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let steps = options.steps.unwrap_or(spec.rollout.steps);
    let r = &spec.resources;
    let mut roles = vec!["reward"; r.reward_replicas];
    roles.extend(std::iter::repeat_n("learner", r.learner_ranks));
    roles.extend(std::iter::repeat_n("actor", r.actors));
    let shape = Shape {
        steps,
        actors: r.actors,
        learner_ranks: r.learner_ranks,
        reward_replicas: r.reward_replicas,
        workers: roles.len(),
    };
    let planned = plan::plan(options.seed, options.faults, shape);
    let out = std::path::absolute(&options.out)?;
    let mut cluster = Cluster::start(&options.exe, &out.join("cluster"), &roles)?;
    let (clean_dir, faulted_dir) = (out.join("clean"), out.join("faulted"));
    for dir in [&clean_dir, &faulted_dir] {
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
    }
    eprintln!(
        "chaos: the clean run ({steps} steps) in {}",
        clean_dir.display()
    );
    let clean_job = variant(&text, &clean_dir, Some(steps))?;
    let (clean_seconds, _, _) = run_job(&mut cluster, clean_job, &base, &[])?;
    eprintln!(
        "chaos: the faulted run ({} faults, seed {}) in {}",
        planned.len(),
        options.seed,
        faulted_dir.display()
    );
    let faulted_job = variant(&text, &faulted_dir, Some(steps))?;
    let (faulted_seconds, events, reasons) = run_job(&mut cluster, faulted_job, &base, &planned)?;
    drop(cluster);

    let clean = compare::recorded(&clean_dir)?;
    let faulted = compare::recorded(&faulted_dir)?;
    let (max_abs_weight_diff, tensors_differing) =
        compare::weight_diff(&clean_dir.join("policy"), &faulted_dir.join("policy"))?;
    Ok(ChaosReport {
        job: spec.name.clone(),
        seed: options.seed,
        steps,
        faults: events.len(),
        planned: planned.len(),
        recovered: events
            .iter()
            .filter(|e| e.recovery_seconds.is_some())
            .count(),
        steps_lost: compare::lost(&faulted, steps).len(),
        steps_applied_twice: compare::applied_twice(&faulted, &clean).len(),
        steps_redone: compare::redone(&reasons),
        max_abs_weight_diff,
        tensors_differing,
        clean_seconds,
        faulted_seconds,
        events,
        clean_dir,
        faulted_dir,
    })
}

/// How often the injector looks at the job.
const TICK: Duration = Duration::from_millis(100);
/// A fault whose target cannot be found (being restarted) for this long is dropped.
const TARGET_WAIT: Duration = Duration::from_secs(60);
/// The faulted run may take this much longer than a step timeout would allow.
const RUN_LIMIT: Duration = Duration::from_secs(3600);

/// Submits `spec_toml`, injects `faults` as the job goes, and waits for it to succeed. Its
/// seconds, what each fault did, and the reasons of its history.
fn run_job(
    cluster: &mut Cluster,
    spec_toml: String,
    base: &Path,
    faults: &[Fault],
) -> Result<(f64, Vec<FaultReport>, Vec<String>)> {
    let started = Instant::now();
    let id = cluster.submit(spec_toml, base)?.id;
    let mut next = faults.iter().peekable();
    let mut events: Vec<FaultReport> = Vec::new();
    let mut paused: Vec<(u32, Instant)> = Vec::new();
    let mut waiting_since: Option<Instant> = None;
    loop {
        std::thread::sleep(TICK);
        if started.elapsed() > RUN_LIMIT {
            bail!("job {id} did not finish within {RUN_LIMIT:?}");
        }
        paused.retain(|&(pid, until)| {
            let due = Instant::now() >= until;
            if due {
                signal(pid, "CONT");
            }
            !due
        });
        for healed in cluster.heal()? {
            eprintln!("chaos: {healed} started again");
        }
        // The coordinator may be down or starting: look again next tick.
        let Ok(info) = cluster.job(&id) else { continue };
        let now = started.elapsed().as_secs_f64();
        let done = info.state == "succeeded";
        for e in events.iter_mut().filter(|e| e.recovery_seconds.is_none()) {
            if info.last_step > e.step || done {
                e.recovery_seconds = Some(now - e.at_seconds);
            }
        }
        match info.state.as_str() {
            "succeeded" => {
                for (pid, _) in paused.drain(..) {
                    signal(pid, "CONT");
                }
                let reasons = info.history.into_iter().map(|h| h.reason).collect();
                return Ok((now, events, reasons));
            }
            "failed" | "cancelled" => {
                let why = info.history.last().map(|h| h.reason.clone());
                bail!("job {id} {}: {}", info.state, why.unwrap_or_default());
            }
            _ => {}
        }
        let Some(fault) = next.peek() else { continue };
        if info.last_step < fault.after_step || !paused.is_empty() {
            continue;
        }
        let waited = *waiting_since.get_or_insert_with(Instant::now);
        match inject(cluster, &id, fault) {
            Some(resume) => {
                eprintln!(
                    "chaos: after step {}: {} {:?}",
                    info.last_step, fault.target, fault.action
                );
                if let Some(r) = resume {
                    paused.push(r);
                }
                events.push(FaultReport {
                    fault: (*fault).clone(),
                    at_seconds: now,
                    step: info.last_step,
                    recovery_seconds: None,
                });
            }
            None if waited.elapsed() < TARGET_WAIT => continue,
            None => eprintln!("chaos: {} not found; fault dropped", fault.target),
        }
        waiting_since = None;
        next.next();
    }
}

/// Hits the fault's target; None when it is not there now (starting, being replaced). For a
/// pause, the pid to resume and when.
fn inject(cluster: &mut Cluster, job: &str, fault: &Fault) -> Option<Option<(u32, Instant)>> {
    let pids = match &fault.target {
        Target::Coordinator => vec![cluster.coordinator_pid()?],
        Target::Worker(i) => {
            // A machine lost: the worker and every process it runs, at once.
            let mut pids = vec![cluster.worker_pid(*i)?];
            pids.extend(cluster.processes_of_worker(*i));
            pids
        }
        t => vec![cluster.assignment_pid(job, &t.assignment()?)?],
    };
    match fault.action {
        Action::Kill => {
            if fault.target == Target::Coordinator {
                cluster.kill_coordinator();
            } else {
                for pid in pids {
                    signal(pid, "KILL");
                }
            }
            Some(None)
        }
        Action::Pause { seconds } => {
            let pid = pids[0];
            signal(pid, "STOP").then_some(())?;
            Some(Some((
                pid,
                Instant::now() + Duration::from_secs_f64(seconds),
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_variant_moves_the_output_and_sets_the_steps() {
        let text = "name = \"j\"\noutput_dir = \"old\"\n[rollout]\nsteps = 3\nseed = 1\n";
        let v: toml::Table = variant(text, Path::new("/x/clean"), Some(9))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(v["output_dir"].as_str(), Some("/x/clean"));
        assert_eq!(v["rollout"]["steps"].as_integer(), Some(9));
        assert_eq!(v["rollout"]["seed"].as_integer(), Some(1));
        let v: toml::Table = variant("name = \"j\"\n", Path::new("/y"), None)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(v["output_dir"].as_str(), Some("/y"));
        assert!(v.get("rollout").is_none());
        assert!(variant("rollout = 3\n", Path::new("/y"), Some(2)).is_err());
    }
}
