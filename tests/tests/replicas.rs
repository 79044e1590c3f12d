//! Replicated and data-parallel workers, and devices, end to end with real processes: a job
//! with two reward replicas spreads its scoring over both and survives one being killed (it is
//! restarted and used again); a two-rank learner whose rank 1 is killed is relaunched whole
//! from its checkpoint; `[resources] devices` reaches every local process as `RLHF_DEVICE`,
//! and a pool worker's `--devices cuda:ID` becomes `CUDA_VISIBLE_DEVICES=ID RLHF_DEVICE=cuda:0`.
//! The same failures on pool workers (`rlhf coordinator --launcher static`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rlhf_tests::cluster::{
    Agent, assignment, coordinator, embedded_store, job, status, submit, wait_state,
};
use rlhf_tests::*;

fn rlhf(args: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(bin("rlhf"))
        .args(args)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rlhf starts")
}

fn finish(child: Child) -> (bool, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `workers/endpoints.json` of a local run.
fn endpoints(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("workers/endpoints.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

fn endpoint(run: &Path, role: &str, index: usize) -> serde_json::Value {
    endpoints(run)
        .into_iter()
        .find(|w| w["role"] == role && w["index"] == index)
        .unwrap_or_else(|| panic!("no {role}-{index} in endpoints.json"))
}

/// `rlhf_reward_samples_total` of the reward server at `url` (`http://HOST:PORT`), or `None`
/// when it does not answer (dead, or the job is over).
fn samples_scored(url: &str) -> Option<u64> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = url.strip_prefix("http://")?.parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("rlhf_reward_samples_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// A process's environment (`/proc/PID/environ`).
fn environment(pid: u64) -> BTreeMap<String, String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    raw.split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// Drops the reward-model objective of a [`tiny_job`] file: only the rule scores, so a reward
/// server loads no model (and starts on any device, even one this build cannot compute on).
fn drop_model_objective(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap();
    let start = text.find("[[objective]]\nname = \"rm\"").unwrap();
    let end = start + 1 + text[start + 1..].find("[[objective]]").unwrap();
    std::fs::write(path, format!("{}{}", &text[..start], &text[end..])).unwrap();
}

/// [`tiny_job`] with the rule objective only.
fn rule_only_job(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let path = tiny_job(dir, name, extra);
    drop_model_objective(&path);
    path
}

#[test]
fn two_reward_replicas_share_the_scoring_and_a_killed_one_is_restarted_and_used_again() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), "replicas", "[resources]\nreward_replicas = 2\n");
    let run = tmp.path().join("run");
    let child = rlhf(
        &["run", job.to_str().unwrap(), "--steps", "10", "--quiet"],
        &[],
    );
    let scored = |i: usize| samples_scored(endpoint(&run, "reward", i)["address"].as_str()?);
    wait_for("both replicas to score", Duration::from_secs(180), || {
        !endpoints(&run).is_empty() && (0..2).all(|i| scored(i).is_some_and(|n| n > 0))
    });
    let first = worker_pid(&run, "reward", 0);
    let killed = worker_pid(&run, "reward", 1);
    signal(killed, "KILL");
    wait_for("reward-1 to be restarted", Duration::from_secs(120), || {
        worker_pid(&run, "reward", 1) != killed
    });
    // The new process starts from zero: anything it counts, it scored after its restart.
    wait_for(
        "the restarted replica to score",
        Duration::from_secs(120),
        || scored(1).is_some_and(|n| n > 0),
    );
    let (ok, err) = finish(child);
    assert!(ok, "{err}");
    assert_eq!(metric_steps(&run), (1..=10).collect::<Vec<u64>>());
    assert_eq!(
        worker_pid(&run, "reward", 0),
        first,
        "the replica that lived was left alone"
    );
}

#[test]
fn a_killed_rank_of_a_two_rank_learner_relaunches_the_ring_from_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), "ring-dies", "[resources]\nlearner_ranks = 2\n");
    let run = tmp.path().join("run");
    let child = rlhf(
        &["run", job.to_str().unwrap(), "--steps", "6", "--quiet"],
        &[("RUST_LOG", "warn,rlhf_learner=info")],
    );
    wait_for("step 2", Duration::from_secs(180), || {
        metric_steps(&run).len() >= 2
    });
    let before = [
        worker_pid(&run, "learner", 0),
        worker_pid(&run, "learner", 1),
    ];
    signal(before[1], "KILL");
    let (ok, err) = finish(child);
    assert!(ok, "{err}");
    // Every step once, in order: none lost, none applied twice.
    assert_eq!(metric_steps(&run), (1..=6).collect::<Vec<u64>>());
    for (rank, pid) in before.iter().enumerate() {
        assert_ne!(
            worker_pid(&run, "learner", rank),
            *pid,
            "rank {rank} was started again"
        );
        // Each rank's log: the first process, then its successor that restored a checkpoint.
        let log = std::fs::read_to_string(run.join(format!("logs/learner-{rank}.log"))).unwrap();
        assert!(log.contains("resumed"), "rank {rank}:\n{log}");
    }
}

#[test]
fn each_local_process_is_given_its_device_in_rlhf_device() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = rule_only_job(
        tmp.path(),
        "devices",
        "[resources]\ndevices = [\"cpu\", \"gpu0\"]\n",
    );
    let (ok, err) = finish(rlhf(&["run", bad.to_str().unwrap(), "--quiet"], &[]));
    assert!(!ok, "an invalid device is refused");
    assert!(
        err.contains("resources.devices[1]") && err.contains("gpu0"),
        "{err}"
    );

    // Learner, actor, then the two replicas: the replicas get the CUDA entries, which a reward
    // server without a model accepts on a CPU build. RLHF_DEVICE of `rlhf run` is overridden.
    let job = rule_only_job(
        tmp.path(),
        "devices",
        "[resources]\nreward_replicas = 2\ndevices = [\"cpu\", \"cpu\", \"cuda:1\", \"cuda:2\"]\n",
    );
    let run = tmp.path().join("run");
    let child = rlhf(
        &["run", job.to_str().unwrap(), "--steps", "2", "--quiet"],
        &[("RLHF_DEVICE", "flex")],
    );
    wait_for("the workers", Duration::from_secs(120), || {
        endpoints(&run).len() == 4
    });
    // The job waits while its workers' environment is read (they stay up meanwhile).
    let stopped = Stopped::new(child.id());
    let expected = [
        ("learner", 0, "cpu"),
        ("actor", 0, "cpu"),
        ("reward", 0, "cuda:1"),
        ("reward", 1, "cuda:2"),
    ];
    for (role, index, device) in expected {
        let w = endpoint(&run, role, index);
        assert_eq!(w["device"], device, "{w}");
        let env = environment(w["pid"].as_u64().unwrap());
        assert_eq!(
            env.get("RLHF_DEVICE").map(String::as_str),
            Some(device),
            "{role}-{index}"
        );
    }
    drop(stopped);
    let (ok, err) = finish(child);
    assert!(ok, "{err}");
    assert_eq!(metric_steps(&run), vec![1, 2]);
}

/// A ready assignment of generation `generation`, if it is one now.
fn ready_at(url: &str, job: &str, name: &str, generation: u64) -> bool {
    assignment(url, job, name)
        .is_some_and(|(_, a)| a["generation"] == generation && a["state"] == "ready")
}

#[test]
fn pool_workers_restart_a_killed_reward_replica_and_a_whole_ring_and_give_out_devices() {
    const STEPS: u64 = 40;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let c = coordinator(
        &embedded_store(&state),
        &state,
        "c1",
        &["--launcher", "static"],
    );
    let url = c.url();
    let _pool = [
        Agent::start_with(&url, "reward", "n1", &["--devices", "cuda:3"], &[]),
        Agent::start_with(&url, "reward", "n2", &[], &[]),
        Agent::start_with(&url, "learner", "n1", &["--devices", "cpu"], &[]),
        Agent::start_with(&url, "learner", "n2", &["--devices", "cpu"], &[]),
        Agent::start_with(&url, "actor", "n3", &[], &[]),
    ];
    let extra = "[resources]\nreward_replicas = 2\nlearner_ranks = 2\n";
    let path = job(dir.path(), "pooled", STEPS, 0, extra);
    // The replica on the `cuda:3` worker loads no model.
    drop_model_objective(&path);
    let id = submit(&url, &path);
    let step = || status(&url, &id)["last_step"].as_u64().unwrap_or(0);
    wait_for("step 1", Duration::from_secs(180), || step() >= 1);

    // Placement spread the replicas and the ranks over their workers; each process sees the
    // device its worker gave it.
    let mut replicas = Vec::new();
    for r in 0..2 {
        let (w, a) = assignment(&url, &id, &format!("reward-{r}")).expect("placed");
        replicas.push((w["node"].as_str().unwrap().to_string(), a));
    }
    assert_ne!(replicas[0].0, replicas[1].0, "{replicas:?}");
    for (node, a) in &replicas {
        let env = environment(a["pid"].as_u64().unwrap());
        let device = (
            env.get("CUDA_VISIBLE_DEVICES").map(String::as_str),
            env.get("RLHF_DEVICE").map(String::as_str),
        );
        if node == "n1" {
            assert_eq!(device, (Some("3"), Some("cuda:0")));
        } else {
            assert_eq!(device.1, None, "a worker without --devices sets none");
        }
    }
    let (_, learner) = assignment(&url, &id, "learner-1").unwrap();
    let env = environment(learner["pid"].as_u64().unwrap());
    assert_eq!(env.get("RLHF_DEVICE").map(String::as_str), Some("cpu"));

    // Both replicas score.
    wait_for("both replicas to score", Duration::from_secs(120), || {
        (0..2).all(|r| {
            assignment(&url, &id, &format!("reward-{r}"))
                .and_then(|(_, a)| samples_scored(a["url"].as_str()?))
                .is_some_and(|n| n > 0)
        })
    });
    assert!(step() < STEPS / 2, "the job must still be running");

    // A replica's process is killed (its worker lives): it is started again and scores again.
    let (_, reward) = assignment(&url, &id, "reward-1").unwrap();
    let generation = reward["generation"].as_u64().unwrap();
    signal(reward["pid"].as_u64().unwrap() as u32, "KILL");
    wait_for("reward-1's restart", Duration::from_secs(120), || {
        ready_at(&url, &id, "reward-1", generation + 1)
    });
    wait_for(
        "the restarted replica to score",
        Duration::from_secs(120),
        || {
            assignment(&url, &id, "reward-1")
                .and_then(|(_, a)| samples_scored(a["url"].as_str()?))
                .is_some_and(|n| n > 0)
        },
    );

    // Rank 1 of the ring is killed: both ranks get a new generation, restored from the
    // checkpoint.
    let generations: Vec<u64> = (0..2)
        .map(|r| {
            let (_, a) = assignment(&url, &id, &format!("learner-{r}")).unwrap();
            a["generation"].as_u64().unwrap()
        })
        .collect();
    assert!(step() < STEPS, "the job must still be running");
    let (_, rank1) = assignment(&url, &id, "learner-1").unwrap();
    signal(rank1["pid"].as_u64().unwrap() as u32, "KILL");
    wait_for("the ring's relaunch", Duration::from_secs(180), || {
        (0..2).all(|r| ready_at(&url, &id, &format!("learner-{r}"), generations[r] + 1))
    });

    let done = wait_state(&url, &id, "succeeded", Duration::from_secs(400));
    let out = PathBuf::from(done["output_dir"].as_str().unwrap());
    // Every step once, in order: none lost, none applied twice.
    assert_eq!(metric_steps(&out), (1..=STEPS).collect::<Vec<u64>>());
}
