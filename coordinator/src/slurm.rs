//! The `slurm` launcher: pool placement (as `static`), plus, for a job the pool cannot hold, an
//! sbatch script that asks Slurm for the missing workers. Each srun step is one
//! `rlhf worker --role R --coordinator URL` on the node Slurm picked; it registers, is placed,
//! and exits once it has been idle for a while, so the allocation ends with the job.
//!
//! Assumptions (as on any Slurm cluster running one program across nodes): the `rlhf` binary,
//! the models and the job's output folder are on a filesystem every node mounts at the same
//! path, node names resolve between nodes, and the compute nodes reach the coordinator at
//! `--advertise-url`.

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

    /// Writes the script for `job` and submits it; returns Slurm's job id.
    pub async fn submit(
        &self,
        job: &str,
        workers: &BTreeMap<String, usize>,
        logs: &Path,
    ) -> Result<String> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        std::fs::create_dir_all(logs).with_context(|| format!("creating {}", logs.display()))?;
        let path = self.dir.join(format!("{job}.sbatch"));
        std::fs::write(&path, self.script(job, workers, logs))
            .with_context(|| format!("writing {}", path.display()))?;
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
        if id.is_empty() {
            bail!("sbatch {} printed no job id", path.display());
        }
        Ok(id)
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
        assert!(s.contains("#SBATCH --output=/shared/runs/grpo-1/logs/slurm-%j.out\n"));
        assert!(s.contains("#SBATCH --partition=gpu\n#SBATCH --gpus-per-task=1\n"));
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
    fn quoting_survives_single_quotes() {
        assert_eq!(quote("a'b"), r"'a'\''b'");
    }
}
