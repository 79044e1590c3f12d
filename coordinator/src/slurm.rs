//! The `slurm` launcher: pool placement (as `static`), plus, for a job the pool cannot hold, an
//! sbatch script that asks Slurm for the missing workers. Each srun step is one
//! `rlhf worker --role R --coordinator URL` on the node Slurm picked; it registers, is placed,
//! and exits once it has been idle for a while, so the allocation ends with the job.
//!
//! While the job runs, [`Slurm::while_running`] watches its batch job: one that ends other than
//! by its workers leaving idle (`scancel`, a node failure, its time limit) took the job's
//! workers with it, and is submitted again (the same script), so the job's supervisor finds
//! replacements to move the lost processes to.
//!
//! Assumptions (as on any Slurm cluster running one program across nodes): the `rlhf` binary,
//! the models and the job's output folder are on a filesystem every node mounts at the same
//! path, node names resolve between nodes, and the compute nodes reach the coordinator at
//! `--advertise-url`. The batch job runs with the coordinator's environment (`--export=ALL`,
//! sbatch's default), so the workers get its `RLHF_TOKEN`, `RLHF_TLS_*` and `PATH`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// How the coordinator submits workers to Slurm.
#[derive(Debug, Clone)]
pub struct Slurm {
    /// Where the workers reach the coordinator.
    pub coordinator_url: String,
    /// The `rlhf` binary the workers run.
    pub rlhf: PathBuf,
    /// Extra `#SBATCH` options, e.g. `--partition=gpu`, `--gpus-per-task=1`.
    pub options: Vec<String>,
    /// Where the scripts are written (`<state-dir>/slurm`).
    pub dir: PathBuf,
    /// A worker exits after this long without an assignment.
    pub idle_exit: Duration,
}

/// How long `sbatch` or `squeue` may take.
const SLURM_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a running job's batch job is looked up.
const KEEP_CHECK: Duration = Duration::from_secs(5);
/// How many times one run of a job has its batch job submitted again.
const MAX_RESUBMITS: usize = 5;

/// Runs a Slurm command with a timeout.
async fn run_slurm(program: &str, args: &[&str]) -> Result<std::process::Output> {
    let run = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(SLURM_TIMEOUT, run)
        .await
        .with_context(|| format!("{program} {args:?} took over {SLURM_TIMEOUT:?}"))?
        .with_context(|| {
            format!("running `{program}` (is Slurm installed on the coordinator's machine?)")
        })
}

/// Whether a Slurm job state (`squeue -o %T`) is one a job is still alive in.
fn is_live_state(state: &str) -> bool {
    matches!(
        state,
        "PENDING"
            | "RUNNING"
            | "CONFIGURING"
            | "COMPLETING"
            | "SUSPENDED"
            | "REQUEUED"
            | "REQUEUE_HOLD"
            | "REQUEUE_FED"
            | "RESIZING"
            | "SIGNALING"
            | "STAGE_OUT"
            | "STOPPED"
    )
}

/// Who submitted a batch job: the placement of a waiting job, or [`Slurm::while_running`]
/// replacing one that ended under a running job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Submitter {
    Placing,
    Keeper,
}

impl Submitter {
    fn as_str(self) -> &'static str {
        match self {
            Submitter::Placing => "placing",
            Submitter::Keeper => "keeper",
        }
    }
}

/// The last batch job in a `<job>.batches` file (lines `ID placing|keeper`, oldest first).
fn last_batch(text: &str) -> Option<(String, Submitter)> {
    let line = text.lines().rev().find(|l| !l.trim().is_empty())?;
    let mut words = line.split_whitespace();
    let id = words.next()?.to_string();
    let by = match words.next() {
        Some("keeper") => Submitter::Keeper,
        _ => Submitter::Placing,
    };
    Some((id, by))
}

/// What the watcher of a running job does about its batch job, given what
/// `squeue -t all -j ID -o %T` says (`None`: not listed) and whether it was seen live before.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// Pending or running: its workers are (or will be) there.
    Live,
    /// Its workers left idle (the script's `wait` returned), or it ended before this run
    /// began (not this run's to replace): nothing to do.
    Done,
    /// It ended under the running job (cancelled, failed, timed out, node failure; or no
    /// longer listed after it was seen live): submit it again.
    Lost,
}

fn seen(state: Option<&str>, was_live: bool) -> Seen {
    match state {
        Some(s) if is_live_state(s) => Seen::Live,
        Some("COMPLETED") => Seen::Done,
        _ if !was_live => Seen::Done,
        _ => Seen::Lost,
    }
}

/// Single-quotes `s` for bash.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Slurm {
    /// The batch script that starts `workers` (role → count) for `job`, logging to `logs`.
    pub fn script(&self, job: &str, workers: &BTreeMap<String, usize>, logs: &Path) -> String {
        let tasks: usize = workers.values().sum();
        let mut s = String::from("#!/bin/bash\n");
        s += &format!("#SBATCH --job-name=rlhf-{job}\n");
        s += &format!("#SBATCH --ntasks={tasks}\n");
        s += &format!("#SBATCH --output={}\n", logs.join("slurm-%j.out").display());
        // sbatch's default, said out loud: the workers need the coordinator's RLHF_TOKEN,
        // RLHF_TLS_* and PATH. A later `--slurm-option=--export=…` overrides it.
        s += "#SBATCH --export=ALL\n";
        for option in &self.options {
            s += &format!("#SBATCH {option}\n");
        }
        s += "# Written by `rlhf coordinator --launcher slurm`: one srun step per worker; each\n";
        s += "# registers with the coordinator, runs what it is assigned, exits when idle.\n";
        s += "set -u\n";
        let worker = self.worker_command();
        for (role, n) in workers {
            for _ in 0..*n {
                s += &format!(
                    "srun --ntasks=1 --nodes=1 --exact bash -c {} {role} &\n",
                    quote(&worker)
                );
            }
        }
        s += "wait\n";
        s
    }

    /// What each srun step runs (in bash, the role as `$0`): a pool worker of that role on the
    /// node Slurm picked. The GPUs Slurm gave the step (`CUDA_VISIBLE_DEVICES`, when set)
    /// become its `--devices` (`cuda:ID` each), so every process it starts runs on one of them.
    fn worker_command(&self) -> String {
        format!(
            "exec {} worker --role \"$0\" --coordinator {} --node \"$SLURMD_NODENAME\" --advertise \"$SLURMD_NODENAME\" --exit-when-idle {} ${{CUDA_VISIBLE_DEVICES:+--devices \"cuda:${{CUDA_VISIBLE_DEVICES//,/,cuda:}}\"}}",
            quote(&self.rlhf.display().to_string()),
            quote(&self.coordinator_url),
            self.idle_exit.as_secs()
        )
    }

    /// Whether batch job `id` is still pending or running (`squeue -h -j ID -o %T`). An ended
    /// job is not listed, listed in an end state for a while, or refused as an invalid id; any
    /// other failure of squeue (the controller away) is an error, not "gone".
    pub async fn is_queued(&self, id: &str) -> Result<bool> {
        let out = run_slurm("squeue", &["-h", "-j", id, "-o", "%T"]).await?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("Invalid job id") {
                return Ok(false);
            }
            bail!("squeue -j {id} failed ({}): {}", out.status, err.trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .any(is_live_state))
    }

    /// The state Slurm lists batch job `id` in, ended ones included (`squeue -h -t all -j ID
    /// -o %T`); `None` once Slurm no longer lists it.
    async fn state(&self, id: &str) -> Result<Option<String>> {
        let out = run_slurm("squeue", &["-h", "-t", "all", "-j", id, "-o", "%T"]).await?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("Invalid job id") {
                return Ok(None);
            }
            bail!("squeue -j {id} failed ({}): {}", out.status, err.trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .map(str::to_string))
    }

    /// `<dir>/<job>.sbatch`: the batch script of `job`'s workers.
    fn script_path(&self, job: &str) -> PathBuf {
        self.dir.join(format!("{job}.sbatch"))
    }

    /// `<dir>/<job>.batches`: every batch job submitted for `job`'s workers, and by whom.
    fn batches_path(&self, job: &str) -> PathBuf {
        self.dir.join(format!("{job}.batches"))
    }

    /// The last batch job submitted for `job`, if any.
    fn last_batch(&self, job: &str) -> Option<(String, Submitter)> {
        last_batch(&std::fs::read_to_string(self.batches_path(job)).ok()?)
    }

    /// Submits `job`'s script (written by [`Slurm::submit`]) and records the batch job.
    async fn sbatch(&self, job: &str, by: Submitter) -> Result<String> {
        let path = self.script_path(job);
        let out = run_slurm("sbatch", &["--parsable", &path.display().to_string()]).await?;
        if !out.status.success() {
            bail!(
                "sbatch {} failed ({}): {}",
                path.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // `--parsable` prints `JOBID` or `JOBID;CLUSTER`.
        let stdout = String::from_utf8_lossy(&out.stdout);
        let id = stdout
            .trim()
            .split(';')
            .next()
            .unwrap_or_default()
            .to_string();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            bail!(
                "sbatch {} printed no job id: {:?}",
                path.display(),
                stdout.trim()
            );
        }
        let record = self.batches_path(job);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&record)
            .with_context(|| format!("opening {}", record.display()))?;
        use std::io::Write;
        writeln!(f, "{id} {}", by.as_str())
            .with_context(|| format!("writing {}", record.display()))?;
        Ok(id)
    }

    /// Writes the script for `job` and submits it; returns Slurm's job id. A batch job that
    /// [`Slurm::while_running`] submitted again for this job, and that Slurm still lists, is
    /// returned instead (its workers are on their way: the run it was for ended, and this is
    /// the job's next placement).
    pub async fn submit(
        &self,
        job: &str,
        workers: &BTreeMap<String, usize>,
        logs: &Path,
    ) -> Result<String> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        std::fs::create_dir_all(logs).with_context(|| format!("creating {}", logs.display()))?;
        if let Some((id, Submitter::Keeper)) = self.last_batch(job)
            && self.is_queued(&id).await?
        {
            return Ok(id);
        }
        let path = self.script_path(job);
        std::fs::write(&path, self.script(job, workers, logs))
            .with_context(|| format!("writing {}", path.display()))?;
        self.sbatch(job, Submitter::Placing).await
    }

    /// Runs `run` (a placed job's run) while watching the job's last batch job: when it ends
    /// under the running job other than by its workers leaving idle — `scancel`, a node
    /// failure, its time limit — its workers are gone with it, and the same script is
    /// submitted again (up to [`MAX_RESUBMITS`] times per run), so that the job's supervisor,
    /// which moves lost processes to free workers of their role, finds some. A job placed on
    /// workers nobody submitted for it has no batch job to watch.
    pub async fn while_running<T>(&self, job: &str, run: impl Future<Output = T>) -> T {
        tokio::select! {
            out = run => out,
            never = self.keep(job) => match never {},
        }
    }

    /// The watcher of [`Slurm::while_running`].
    async fn keep(&self, job: &str) -> std::convert::Infallible {
        // The batch job last looked at, whether it was seen live, and whether it is dealt with.
        let mut watched: Option<(String, bool, bool)> = None;
        let mut resubmitted = 0;
        loop {
            if let Some((id, _)) = self.last_batch(job) {
                if watched.as_ref().is_none_or(|(w, _, _)| *w != id) {
                    watched = Some((id, false, false));
                }
                let (id, was_live, done) = watched.as_mut().expect("just set");
                if !*done {
                    match self.state(id).await {
                        Err(e) => tracing::warn!(job, batch = %id, "squeue: {e:#}"),
                        Ok(state) => match seen(state.as_deref(), *was_live) {
                            Seen::Live => *was_live = true,
                            Seen::Done => *done = true,
                            Seen::Lost if resubmitted >= MAX_RESUBMITS => {
                                tracing::warn!(
                                    job,
                                    batch = %id,
                                    "the Slurm job for this job's workers ended ({}) and was submitted again {MAX_RESUBMITS} times already: not again",
                                    state.as_deref().unwrap_or("no longer listed")
                                );
                                *done = true;
                            }
                            Seen::Lost => match self.sbatch(job, Submitter::Keeper).await {
                                Ok(new) => {
                                    resubmitted += 1;
                                    tracing::warn!(
                                        job,
                                        batch = %id,
                                        "the Slurm job for this job's workers ended ({}) while the job runs: submitted Slurm job {new} for new workers",
                                        state.as_deref().unwrap_or("no longer listed")
                                    );
                                    // Submitted for this run: its end is this run's concern
                                    // even if it is over before the next look.
                                    *id = new;
                                    *was_live = true;
                                }
                                // Tried again at the next look.
                                Err(e) => tracing::warn!(job, batch = %id, "{e:#}"),
                            },
                        },
                    }
                }
            }
            tokio::time::sleep(KEEP_CHECK).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_asks_for_one_task_per_missing_worker() {
        let slurm = Slurm {
            coordinator_url: "http://head:50070".into(),
            rlhf: "/shared/bin/rlhf".into(),
            options: vec!["--partition=gpu".into(), "--gpus-per-task=1".into()],
            dir: "/tmp".into(),
            idle_exit: Duration::from_secs(120),
        };
        let workers = BTreeMap::from([("actor".to_string(), 2), ("learner".to_string(), 1)]);
        let s = slurm.script("grpo-1", &workers, Path::new("/shared/runs/grpo-1/logs"));
        assert!(s.starts_with("#!/bin/bash\n#SBATCH --job-name=rlhf-grpo-1\n#SBATCH --ntasks=3\n"));
        assert!(s.contains(
            "#SBATCH --output=/shared/runs/grpo-1/logs/slurm-%j.out\n#SBATCH --export=ALL\n"
        ));
        // After the default, so that `--slurm-option=--export=…` wins.
        assert!(s.contains(
            "#SBATCH --export=ALL\n#SBATCH --partition=gpu\n#SBATCH --gpus-per-task=1\n"
        ));
        assert_eq!(s.matches("srun --ntasks=1").count(), 3);
        assert_eq!(s.matches("' actor &\n").count(), 2);
        assert_eq!(s.matches("' learner &\n").count(), 1);
        assert!(s.contains("exec '\\''/shared/bin/rlhf'\\'' worker"), "{s}");
        assert!(s.contains("--exit-when-idle 120"));
        assert!(s.ends_with("wait\n"));
    }

    /// The step's command run by bash as srun would, with a stand-in `rlhf` that prints its
    /// arguments: the GPUs Slurm gave the step become the worker's devices.
    #[test]
    fn a_step_s_gpus_become_its_worker_s_devices() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let rlhf = dir.path().join("rlhf");
        std::fs::write(&rlhf, "#!/bin/sh\necho \"$@\"\n").unwrap();
        std::fs::set_permissions(&rlhf, std::fs::Permissions::from_mode(0o755)).unwrap();
        let slurm = Slurm {
            coordinator_url: "http://head:50070".into(),
            rlhf,
            options: Vec::new(),
            dir: dir.path().into(),
            idle_exit: Duration::from_secs(60),
        };
        let run = |gpus: Option<&str>| {
            let mut cmd = std::process::Command::new("bash");
            cmd.args(["-c", &slurm.worker_command(), "learner"])
                .env("SLURMD_NODENAME", "gpu-7")
                .env_remove("CUDA_VISIBLE_DEVICES");
            if let Some(g) = gpus {
                cmd.env("CUDA_VISIBLE_DEVICES", g);
            }
            let out = cmd.output().unwrap();
            assert!(out.status.success(), "{out:?}");
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        };
        assert_eq!(
            run(Some("2,3")),
            "worker --role learner --coordinator http://head:50070 --node gpu-7 --advertise gpu-7 --exit-when-idle 60 --devices cuda:2,cuda:3"
        );
        assert!(run(Some("0")).ends_with("--exit-when-idle 60 --devices cuda:0"));
        assert!(run(None).ends_with("--exit-when-idle 60"), "{}", run(None));
    }

    #[test]
    fn ended_states_are_not_live() {
        assert!(is_live_state("RUNNING") && is_live_state("PENDING"));
        for ended in [
            "COMPLETED",
            "FAILED",
            "TIMEOUT",
            "CANCELLED",
            "NODE_FAIL",
            "",
        ] {
            assert!(!is_live_state(ended), "{ended}");
        }
    }

    #[test]
    fn a_batch_job_is_submitted_again_only_when_it_ended_under_the_run() {
        // Seen live, then ended other than by its workers leaving idle.
        for ended in ["CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED"] {
            assert_eq!(seen(Some(ended), true), Seen::Lost, "{ended}");
        }
        assert_eq!(seen(None, true), Seen::Lost, "no longer listed");
        // Its workers left idle: the job did not need them (any more).
        assert_eq!(seen(Some("COMPLETED"), true), Seen::Done);
        // Already over when the run began: not this run's batch job.
        assert_eq!(seen(Some("CANCELLED"), false), Seen::Done);
        assert_eq!(seen(None, false), Seen::Done);
        assert_eq!(seen(Some("RUNNING"), false), Seen::Live);
        assert_eq!(seen(Some("PENDING"), true), Seen::Live);
    }

    #[test]
    fn the_last_recorded_batch_job_and_its_submitter() {
        assert_eq!(last_batch(""), None);
        assert_eq!(
            last_batch("41 placing\n42 keeper\n"),
            Some(("42".to_string(), Submitter::Keeper))
        );
        assert_eq!(
            last_batch("42 keeper\n43 placing\n\n"),
            Some(("43".to_string(), Submitter::Placing))
        );
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(quote("a'b"), r"'a'\''b'");
    }
}
