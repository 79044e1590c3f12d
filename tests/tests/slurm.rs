//! The `slurm` launcher against a real Slurm (`bash .ci/slurm.sh` makes a one-machine cluster:
//! slurmctld and two slurmd, nodes `slurm1` and `slurm2`). `rlhf coordinator --launcher slurm`
//! submits the workers a job lacks with sbatch; they register, run the job and leave when idle,
//! ending their batch job; a job cancelled with `rlhf cancel` lets its batch job end the same
//! way; a batch job cancelled with `scancel` before its workers start, or while they run the
//! job, is noticed and submitted again, and the job succeeds.
//!
//! Where `sinfo` does not answer the tests skip, saying so, unless `RLHF_REQUIRE_SLURM=1` (CI),
//! where they fail. The Slurm-started workers run the coordinator's own binary on this machine
//! (the "shared filesystem" is this one) as the submitting user, with its environment.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rlhf_proto::process::ServiceProcess;
use rlhf_tests::cluster::{
    Agent, assignment, cli, coordinator, embedded_store, job, placing_reason, status, submit,
    wait_state, workers,
};
use rlhf_tests::{metric_steps, wait_for};

/// Whether a Slurm controller answers here (`sinfo`, within 10 s; asked once per test binary).
/// Without one the test is skipped, saying so, unless `RLHF_REQUIRE_SLURM=1`, where it fails.
fn slurm_here() -> bool {
    static HERE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let why = match HERE.get_or_init(sinfo_answers) {
        Ok(()) => return true,
        Err(why) => why,
    };
    assert!(
        std::env::var("RLHF_REQUIRE_SLURM").as_deref() != Ok("1"),
        "RLHF_REQUIRE_SLURM=1 but Slurm is not here: {why}; `sudo bash .ci/slurm.sh` makes a one-machine cluster"
    );
    eprintln!(
        "skipping: no Slurm here ({why}); `sudo bash .ci/slurm.sh` makes a one-machine cluster"
    );
    false
}

/// `sinfo -h` succeeds within 10 s; else why not.
fn sinfo_answers() -> Result<(), String> {
    let mut child = Command::new("sinfo")
        .args(["-h", "-o", "%a"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("running sinfo: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(status) if status.success() => return Ok(()),
            Some(status) => return Err(format!("sinfo failed ({status}): no slurmctld answers")),
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("sinfo had no answer within 10 s".into());
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Runs a Slurm command; its stdout.
fn slurm(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Batch job `id`'s state, ended ones included (`COMPLETED`, `CANCELLED`, ...).
fn batch_state(id: &str) -> String {
    slurm("squeue", &["-h", "-t", "all", "-j", id, "-o", "%T"])
        .trim()
        .to_string()
}

/// Whether Slurm still has batch job `id` pending or running.
fn queued(id: &str) -> bool {
    matches!(
        batch_state(id).as_str(),
        "PENDING" | "CONFIGURING" | "RUNNING" | "COMPLETING"
    )
}

/// Every batch job Slurm lists (ended ones included, for `MinJobAge`) under the name the
/// coordinator gives job `id`'s (`rlhf-<id>`), from batch job `since` on (an earlier run of the
/// test left its own): their ids and states, oldest first.
fn batch_jobs(id: &str, since: &str) -> Vec<(u64, String)> {
    let since: u64 = since.parse().unwrap();
    let name = format!("rlhf-{id}");
    let mut all: Vec<(u64, String)> =
        slurm("squeue", &["-h", "-t", "all", "-n", &name, "-o", "%i %T"])
            .lines()
            .filter_map(|l| {
                let (id, state) = l.trim().split_once(' ')?;
                Some((id.parse().ok()?, state.to_string()))
            })
            .filter(|(id, _)| *id >= since)
            .collect();
    all.sort();
    all
}

/// The batch job named in job `id`'s waiting note ("Slurm job N starts the missing workers"),
/// once there is one other than `not`.
fn noted_batch(url: &str, id: &str, not: Option<&str>) -> String {
    let mut batch = String::new();
    wait_for(
        "a batch job in the waiting note",
        Duration::from_secs(60),
        || {
            let note = status(url, id)["waiting"]
                .as_str()
                .unwrap_or("")
                .to_string();
            batch = note
                .split("Slurm job ")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or("")
                .to_string();
            !batch.is_empty() && Some(batch.as_str()) != not
        },
    );
    batch
}

/// Cancels, when dropped (a failing test too), every batch job the coordinator with this state
/// directory submitted (`<state>/slurm/*.batches`), and on a failure prints what Slurm and the
/// batch jobs' output say. Made before the coordinator, so dropped after it: no coordinator is
/// left to submit again what this cancels.
struct Batches {
    state: PathBuf,
    logs: Vec<PathBuf>,
}

impl Batches {
    fn new(state: &Path) -> Batches {
        Batches {
            state: state.to_path_buf(),
            logs: Vec::new(),
        }
    }

    /// Also prints the `slurm-*.out` files in `logs` (a job's logs folder) on a failure.
    fn watch_logs(&mut self, logs: PathBuf) {
        self.logs.push(logs);
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        let mut ids = Vec::new();
        if let Ok(dir) = std::fs::read_dir(self.state.join("slurm")) {
            for entry in dir.flatten() {
                if entry.path().extension().is_some_and(|e| e == "batches") {
                    let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                    ids.extend(
                        text.lines()
                            .filter_map(|l| l.split_whitespace().next())
                            .map(str::to_string),
                    );
                }
            }
        }
        if std::thread::panicking() {
            let _ = Command::new("squeue").args(["-t", "all"]).status();
            for logs in &self.logs {
                for entry in std::fs::read_dir(logs).into_iter().flatten().flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with("slurm-") {
                        eprintln!(
                            "--- {}:\n{}",
                            entry.path().display(),
                            std::fs::read_to_string(entry.path()).unwrap_or_default()
                        );
                    }
                }
            }
        }
        if !ids.is_empty() {
            let _ = Command::new("scancel").args(&ids).status();
        }
    }
}

/// A coordinator with the `slurm` launcher, plus `extra`.
fn slurm_coordinator(state: &Path, extra: &[&str]) -> ServiceProcess {
    let args: Vec<&str> = ["--launcher", "slurm"]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    coordinator(&embedded_store(state), state, "c1", &args)
}

/// The job's output folder (from its status).
fn output(url: &str, id: &str) -> PathBuf {
    PathBuf::from(status(url, id)["output_dir"].as_str().unwrap())
}

#[test]
fn the_slurm_launcher_submits_the_missing_workers_they_run_the_job_and_leave_with_it() {
    if !slurm_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut batches = Batches::new(&state);
    // Two nodes for the two missing workers: one each.
    let c = slurm_coordinator(
        &state,
        &["--slurm-idle-exit", "15", "--slurm-option=--nodes=2"],
    );
    let url = c.url();
    // One worker is in the pool already: Slurm is asked only for the others.
    let _reward = Agent::start(&url, "reward", "static");
    wait_for("the reward worker", Duration::from_secs(30), || {
        workers(&url).len() == 1
    });

    let id = submit(&url, &job(dir.path(), "slurm-run", 3, 0, ""));
    batches.watch_logs(output(&url, &id).join("logs"));
    let batch = noted_batch(&url, &id, None);
    assert_eq!(
        slurm("squeue", &["-h", "-t", "all", "-j", &batch, "-o", "%j"]).trim(),
        format!("rlhf-{id}")
    );
    let script = std::fs::read_to_string(state.join(format!("slurm/{id}.sbatch"))).unwrap();
    assert!(script.contains("#SBATCH --ntasks=2\n"), "{script}");
    assert!(script.contains("#SBATCH --nodes=2\n"), "{script}");
    assert_eq!(script.matches("srun --ntasks=1").count(), 2, "{script}");

    let done = wait_state(&url, &id, "succeeded", Duration::from_secs(300));
    let out = PathBuf::from(done["output_dir"].as_str().unwrap());
    assert_eq!(metric_steps(&out), vec![1, 2, 3]);
    // Placed on the workers Slurm started, one on each node, each at its node's address.
    let placed = placing_reason(&done);
    assert!(
        placed.contains("static-reward-1")
            && placed.contains("slurm1-")
            && placed.contains("slurm2-"),
        "{placed}"
    );
    let started: Vec<serde_json::Value> = workers(&url)
        .into_iter()
        .filter(|w| w["node"] != "static")
        .collect();
    let nodes: BTreeSet<(String, String)> = started
        .iter()
        .map(|w| {
            (
                w["node"].as_str().unwrap().to_string(),
                w["address"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        nodes,
        BTreeSet::from([
            ("slurm1".to_string(), "127.0.2.1".to_string()),
            ("slurm2".to_string(), "127.0.2.2".to_string())
        ]),
        "{started:?}"
    );
    let log = std::fs::read_to_string(out.join(format!("logs/slurm-{batch}.out"))).unwrap();
    assert!(log.contains("registered as slurm1-"), "{log}");

    // Idle, they leave the pool; the batch job ends with them, as completed.
    wait_for("the batch job to end", Duration::from_secs(120), || {
        !queued(&batch)
    });
    assert_eq!(batch_state(&batch), "COMPLETED");
    wait_for(
        "the Slurm workers to leave",
        Duration::from_secs(30),
        || workers(&url).len() == 1,
    );

    // A running job cancelled with `rlhf cancel`: its batch job ends too, within the idle exit.
    let long = submit(&url, &job(dir.path(), "slurm-cancel", 500, 0, ""));
    batches.watch_logs(output(&url, &long).join("logs"));
    let second = noted_batch(&url, &long, Some(&batch));
    wait_for(
        "the long job's first step",
        Duration::from_secs(120),
        || status(&url, &long)["last_step"].as_u64().unwrap_or(0) >= 1,
    );
    assert!(queued(&second));
    cli(&url, &["cancel", &long]);
    let cancelled = wait_state(&url, &long, "cancelled", Duration::from_secs(120));
    assert!(cancelled["last_step"].as_u64().unwrap() < 500);
    wait_for(
        "the cancelled job's batch job to end",
        Duration::from_secs(90),
        || !queued(&second),
    );
    assert_eq!(batch_state(&second), "COMPLETED");
    assert_eq!(
        batch_jobs(&long, &second).len(),
        1,
        "{:?}",
        batch_jobs(&long, &second)
    );
}

#[test]
fn a_batch_job_cancelled_before_its_workers_start_is_submitted_again() {
    if !slurm_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut batches = Batches::new(&state);
    // Every batch job is submitted held: it stays pending until the test releases it.
    let c = slurm_coordinator(
        &state,
        &["--slurm-idle-exit", "15", "--slurm-option=--hold"],
    );
    let url = c.url();
    let id = submit(&url, &job(dir.path(), "slurm-held", 2, 0, ""));
    batches.watch_logs(output(&url, &id).join("logs"));
    let first = noted_batch(&url, &id, None);
    assert_eq!(batch_state(&first), "PENDING");
    slurm("scancel", &[&first]);
    // Noticed (squeue, every 10 s) and submitted again, once.
    let second = noted_batch(&url, &id, Some(&first));
    assert_eq!(batch_state(&first), "CANCELLED");
    slurm("scontrol", &["release", &second]);
    let done = wait_state(&url, &id, "succeeded", Duration::from_secs(300));
    assert_eq!(
        metric_steps(Path::new(done["output_dir"].as_str().unwrap())),
        vec![1, 2]
    );
    let all = batch_jobs(&id, &first);
    assert_eq!(all.len(), 2, "submitted again once: {all:?}");
    assert_eq!(all[1].0.to_string(), second, "{all:?}");
}

#[test]
fn a_batch_job_cancelled_while_its_workers_run_the_job_is_submitted_again_and_the_job_succeeds() {
    const STEPS: u64 = 60;
    if !slurm_here() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut batches = Batches::new(&state);
    // A short lease: a lost worker is noticed within a few steps. The idle exit is well above
    // it: the replacements must not leave before the lost workers' leases end.
    let c = slurm_coordinator(&state, &["--worker-ttl", "3", "--slurm-idle-exit", "30"]);
    let url = c.url();
    // One actor outside Slurm: a job that loses every actor at once fails ("no actor left").
    let _actor = Agent::start(&url, "actor", "static");
    wait_for("the actor worker", Duration::from_secs(30), || {
        workers(&url).len() == 1
    });
    let id = submit(
        &url,
        &job(
            dir.path(),
            "slurm-scancel",
            STEPS,
            0,
            "[resources]\nactors = 2\n",
        ),
    );
    batches.watch_logs(output(&url, &id).join("logs"));
    let first = noted_batch(&url, &id, None);
    wait_for("step 2", Duration::from_secs(120), || {
        status(&url, &id)["last_step"].as_u64().unwrap_or(0) >= 2
    });
    let (lost, _) = assignment(&url, &id, "learner-0").expect("the learner is placed");
    assert!(
        lost["node"].as_str().unwrap().starts_with("slurm"),
        "{lost}"
    );

    // The batch job dies under the running job, taking its learner, reward server and one
    // actor: a new one is submitted, and the lost processes move to its workers.
    slurm("scancel", &[&first]);
    wait_for(
        "a new learner worker from Slurm",
        Duration::from_secs(120),
        || {
            assignment(&url, &id, "learner-0").is_some_and(|(w, a)| {
                w["id"] != lost["id"]
                    && w["node"].as_str().unwrap_or("").starts_with("slurm")
                    && a["state"] == "ready"
            })
        },
    );
    let all = batch_jobs(&id, &first);
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(
        all[0],
        (first.parse().unwrap(), "CANCELLED".to_string()),
        "{all:?}"
    );
    assert!(
        matches!(all[1].1.as_str(), "RUNNING" | "COMPLETING"),
        "{all:?}"
    );

    let done = wait_state(&url, &id, "succeeded", Duration::from_secs(300));
    let out = PathBuf::from(done["output_dir"].as_str().unwrap());
    // Every step once, in order: the learner restarted from its checkpoint.
    assert_eq!(metric_steps(&out), (1..=STEPS).collect::<Vec<u64>>());
    assert!(
        done["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["reason"]
                .as_str()
                .unwrap_or("")
                .contains("replacing the learner")),
        "{done}"
    );
}
