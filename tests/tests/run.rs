//! `rlhf run` end to end: real worker processes, real gRPC, the tiny fixtures. Jobs complete
//! (GRPO and PPO), resume, survive a killed learner, actor or reward server, fail clearly when a
//! reward server cannot be restarted, and stop cleanly on Ctrl-C.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rlhf_tests::*;

fn rlhf_command(args: &[&str]) -> Command {
    let mut command = Command::new(bin("rlhf"));
    command
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

fn rlhf(args: &[&str]) -> Child {
    rlhf_command(args).spawn().expect("rlhf starts")
}

fn finish(child: Child) -> (bool, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn grpo_job_completes_evaluates_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), "grpo", "");
    let run = tmp.path().join("run");
    let (ok, err) = finish(rlhf(&["run", job.to_str().unwrap(), "--quiet"]));
    assert!(ok, "{err}");
    assert_eq!(metric_steps(&run), vec![1, 2, 3]);
    assert!(
        run.join("eval/step-000002.jsonl").is_file()
            && run.join("eval/step-000003.jsonl").is_file()
    );
    assert!(
        run.join("reference_rewards.json").is_file(),
        "r_ref was calibrated"
    );
    let record = job_record(&run);
    let states: Vec<&str> = record["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        ["queued", "placing", "calibrating", "running", "succeeded"]
    );
    let line: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    for key in [
        "reward/rm/raw",
        "reward/rm/transformed",
        "reward/short/raw",
        "kl/token",
        "kl/beta",
        "eval/rm",
        "rollout/tokens_per_s",
    ] {
        assert!(line[key].is_number(), "metric {key} missing: {line}");
    }

    // Two more steps from the checkpoint of step 3.
    let (ok, err) = finish(rlhf(&[
        "run",
        job.to_str().unwrap(),
        "--resume",
        "--steps",
        "5",
        "--quiet",
    ]));
    assert!(ok, "{err}");
    assert!(err.contains("resuming after step 3"), "{err}");
    assert_eq!(metric_steps(&run), vec![1, 2, 3, 4, 5]);
}

#[test]
fn ppo_job_with_a_critic_completes_and_learns_an_easy_objective() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job_with(
        tmp.path(),
        "ppo",
        &[
            ("learner.algorithm", "ppo".into()),
            ("learner.ppo.critic_lr", 1e-4.into()),
            ("learner.optim.lr", 1e-3.into()),
            ("rollout.steps", 12.into()),
            ("evaluation.every_steps", 0.into()),
        ],
    );
    // One rule a tiny model can learn: completions of at most 34 characters (about half of the
    // fixture's samples at the start).
    let mut doc: toml::Table = std::fs::read_to_string(&job).unwrap().parse().unwrap();
    let short: toml::Table = toml::from_str(
        "name = \"short\"\nkind = \"rule\"\nverifier = \"regex\"\npattern = \"^.{0,34}$\"\ntransform = \"identity\"",
    )
    .unwrap();
    doc.insert("objective".into(), toml::Value::Array(vec![short.into()]));
    std::fs::write(&job, toml::to_string(&doc).unwrap()).unwrap();
    let (ok, err) = finish(rlhf(&["run", job.to_str().unwrap(), "--quiet"]));
    assert!(ok, "{err}");
    let run = tmp.path().join("run");
    assert_eq!(metric_steps(&run), (1..=12).collect::<Vec<u64>>());
    let lines = metric_lines(&run);
    assert!(lines.iter().all(|l| l["critic/value_loss"].is_f64()));
    let reward = |r: std::ops::Range<usize>| {
        let n = r.len() as f64;
        r.map(|i| lines[i]["reward/total"].as_f64().unwrap())
            .sum::<f64>()
            / n
    };
    // Seeded on CPU, so the same every run: about 0.47 over steps 1-2, 0.66 over steps 7-12.
    // A sign error in the advantages, a critic that does not feed GAE or a policy loss that
    // does not reach the weights leaves the rate where it started or lowers it.
    let (first, last) = (reward(0..2), reward(6..12));
    assert!(
        last > first + 0.1,
        "PPO did not learn the rule: {first:.3} -> {last:.3}"
    );
}

#[test]
fn a_killed_learner_is_replaced_and_the_job_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), "learner-dies", "");
    let run = tmp.path().join("run");
    let child = rlhf(&["run", job.to_str().unwrap(), "--steps", "6", "--quiet"]);
    wait_for("step 2", Duration::from_secs(120), || {
        metric_steps(&run).len() >= 2
    });
    let pid = worker_pid(&run, "learner", 0);
    signal(pid, "KILL");
    let (ok, err) = finish(child);
    assert!(ok, "{err}");
    assert!(err.contains("learner died"), "{err}");
    assert_ne!(
        worker_pid(&run, "learner", 0),
        pid,
        "a new learner process took over"
    );
    // Every step once, in order: none lost, none applied twice.
    assert_eq!(metric_steps(&run), vec![1, 2, 3, 4, 5, 6]);
}

#[test]
fn a_learner_dead_between_applying_a_step_and_replying_loses_no_step() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), "learner-dies-late", "");
    let run = tmp.path().join("run");
    // Step 3 is applied and checkpointed, then the learner exits before it replies: the
    // replacement resumes after step 3 and the step is recorded from its kept report.
    let child = rlhf_command(&["run", job.to_str().unwrap(), "--steps", "5", "--quiet"])
        .env("RLHF_FAULT_EXIT_AFTER_STEP", "3")
        .spawn()
        .unwrap();
    let (ok, err) = finish(child);
    assert!(ok, "{err}");
    assert!(
        err.contains("step 3 was applied before its reply was lost; recording it"),
        "{err}"
    );
    assert_eq!(metric_steps(&run), vec![1, 2, 3, 4, 5]);
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let third: serde_json::Value = serde_json::from_str(lines.lines().nth(2).unwrap()).unwrap();
    for key in [
        "reward/total",
        "rollout/samples",
        "kl/beta",
        "weight_version",
    ] {
        assert!(third[key].is_number(), "step 3's line lacks {key}: {third}");
    }
}

/// The address of a job's worker, from `workers/endpoints.json`.
fn worker_address(run: &std::path::Path, role: &str, index: u64) -> String {
    let text = std::fs::read_to_string(run.join("workers/endpoints.json")).unwrap_or_default();
    let all: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap_or_default();
    all.iter()
        .find(|w| w["role"] == role && w["index"] == index)
        .and_then(|w| w["address"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_killed_actor_leaves_its_prompts_to_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), "actor-dies", "[resources]\nactors = 2\n");
    // Long completions, so that a step's generation takes a while on each actor.
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("max_new_tokens = 16", "max_new_tokens = 48");
    std::fs::write(&job, text).unwrap();
    let run = tmp.path().join("run");
    let child = rlhf(&["run", job.to_str().unwrap(), "--steps", "4", "--quiet"]);
    wait_for("step 1", Duration::from_secs(120), || {
        !metric_steps(&run).is_empty()
    });
    // Killed while it decodes a later step's sequences, not between steps.
    let address = worker_address(&run, "actor", 1);
    wait_for("actor 1 decoding", Duration::from_secs(120), || {
        actor_info(&address).is_some_and(|i| i.running_sequences > 0)
    });
    signal(worker_pid(&run, "actor", 1), "KILL");
    let (ok, err) = finish(child);
    assert!(ok, "{err}");
    assert!(err.contains("re-sending its prompts"), "{err}");
    assert_eq!(metric_steps(&run), vec![1, 2, 3, 4]);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Every step trained on exactly its 4 prompts x 4 samples: the dead actor's unfinished
    // prompts were redone by the other, and none of its finished samples counted twice.
    for line in &lines {
        assert_eq!(line["rollout/samples"].as_f64(), Some(16.0), "{line}");
    }
    let redistributed: f64 = lines
        .iter()
        .map(|l| l["rollout/redistributed_prompts"].as_f64().unwrap())
        .sum();
    assert!(
        (1.0..=2.0).contains(&redistributed),
        "the kill lands mid-generation: {redistributed} prompts re-sent"
    );
}

#[test]
fn a_killed_reward_server_is_restarted_and_one_that_cannot_be_fails_the_job() {
    // Killed: it is started again and the job goes on, every step once.
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), "reward-dies", "");
    let run = tmp.path().join("run");
    let child = rlhf(&["run", job.to_str().unwrap(), "--steps", "6", "--quiet"]);
    wait_for("step 1", Duration::from_secs(120), || {
        !metric_steps(&run).is_empty()
    });
    let pid = worker_pid(&run, "reward", 0);
    signal(pid, "KILL");
    let (ok, err) = finish(child);
    assert!(ok, "a killed reward server is restarted: {err}");
    assert_ne!(
        worker_pid(&run, "reward", 0),
        pid,
        "a new reward server took over"
    );
    assert_eq!(metric_steps(&run), vec![1, 2, 3, 4, 5, 6]);

    // Killed once its configuration has turned invalid on disk: it cannot be started again,
    // and the job fails saying why.
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), "reward-broken", "");
    let run = tmp.path().join("run");
    let child = rlhf(&["run", job.to_str().unwrap(), "--steps", "50", "--quiet"]);
    wait_for("step 1", Duration::from_secs(120), || {
        !metric_steps(&run).is_empty()
    });
    std::fs::write(
        run.join("workers/rewards.toml"),
        "[[objective]]\nname = \"rm\"\nkind = \"telepathy\"\n",
    )
    .unwrap();
    signal(worker_pid(&run, "reward", 0), "KILL");
    let (ok, err) = finish(child);
    assert!(!ok, "the job must fail");
    assert!(err.contains("reward-0"), "{err}");
    let record = job_record(&run);
    assert_eq!(record["state"], "failed");
    let reason = record["history"].as_array().unwrap().last().unwrap()["reason"]
        .as_str()
        .unwrap()
        .to_string();
    // The reason names the replica, its log, and the log's last line: the refused kind.
    assert!(
        reason.contains("reward-0") && reason.contains("telepathy"),
        "{reason}"
    );
}

#[test]
fn a_stalled_reward_server_fails_the_job_instead_of_hanging() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(
        tmp.path(),
        "reward-stalls",
        "[rewards]\ntimeout_seconds = 1\n",
    );
    let run = tmp.path().join("run");
    let child = rlhf(&["run", job.to_str().unwrap(), "--steps", "50", "--quiet"]);
    wait_for("step 1", Duration::from_secs(120), || {
        !metric_steps(&run).is_empty()
    });
    // Stopped, not dead: connections are accepted by the kernel and never answered.
    let reward = worker_pid(&run, "reward", 0);
    signal(reward, "STOP");
    let started = std::time::Instant::now();
    // (The launcher SIGKILLs its workers when the job ends, stopped ones included.)
    let (ok, err) = finish(child);
    assert!(!ok, "the job must fail");
    assert!(
        err.contains("reward server") && err.contains("no answer within 1s"),
        "{err}"
    );
    // 4 attempts of 1 s and their backoff, plus the step's own wind-down: well under a minute.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(job_record(&run)["state"], "failed");
}

#[test]
fn ctrl_c_checkpoints_and_stops_then_resume_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), "interrupted", "");
    let run = tmp.path().join("run");
    let child = rlhf(&["run", job.to_str().unwrap(), "--steps", "40", "--quiet"]);
    wait_for("step 2", Duration::from_secs(120), || {
        metric_steps(&run).len() >= 2
    });
    signal(child.id(), "INT");
    let (ok, err) = finish(child);
    assert!(ok, "{err}");
    assert_eq!(job_record(&run)["state"], "cancelled");
    let done = metric_steps(&run);
    let last = *done.last().unwrap();
    assert!(last < 40);
    assert!(
        run.join(format!("learner/checkpoints/ckpt-{last:08}"))
            .is_dir(),
        "checkpoint of step {last}"
    );
    let (ok, err) = finish(rlhf(&[
        "run",
        job.to_str().unwrap(),
        "--resume",
        "--steps",
        &(last + 2).to_string(),
        "--quiet",
    ]));
    assert!(ok, "{err}");
    let all = metric_steps(&run);
    assert_eq!(all, (1..=last + 2).collect::<Vec<_>>());
}

#[test]
fn validate_lists_every_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), "ok", "");
    let out = Command::new(bin("rlhf"))
        .args(["validate", job.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = tmp.path().join("bad.toml");
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("steps = 3", "steps = 0")
        .replace("transform = \"identity\"", "transform = \"cube\"")
        .replace("[evaluation]", "[evaluation]\nfrequency = 3");
    std::fs::write(&bad, text).unwrap();
    let out = Command::new(bin("rlhf"))
        .args(["validate", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("frequency"), "{err}");
    let fixed = std::fs::read_to_string(&bad)
        .unwrap()
        .replace("frequency = 3", "");
    std::fs::write(&bad, fixed).unwrap();
    let out = Command::new(bin("rlhf"))
        .args(["validate", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rollout.steps") && err.contains("objective[1].transform"),
        "{err}"
    );
}

/// `--log-format json` reaches the workers the launcher starts, and one step's calls carry the
/// job and step from the controller through the learner (PublishWeights) to the actor
/// (UpdateWeights) in their spans, with one trace id.
#[test]
fn worker_logs_are_json_and_carry_the_job_and_step() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), "traced", "");
    let run = rlhf_command(&[
        "--log-format",
        "json",
        "run",
        job.to_str().unwrap(),
        "--quiet",
    ])
    .env("RUST_LOG", "info")
    .spawn()
    .expect("rlhf starts");
    let (ok, err) = finish(run);
    assert!(ok, "{err}");
    let logs = tmp.path().join("run/logs");
    // Every line every worker wrote is one JSON object: no plain text, no colour codes.
    let lines = |name: &str| -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(logs.join(name)).unwrap();
        assert!(!text.contains('\u{1b}'), "{name} holds colour codes");
        text.lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {l}"))
            })
            .collect()
    };
    // The handler span a line was logged in: (rpc, job, step, trace).
    let traced = |line: &serde_json::Value| -> Option<(String, String, u64, String)> {
        let spans = line.get("spans")?.as_array()?;
        let span = spans.iter().find(|s| s.get("rpc").is_some())?;
        Some((
            span["rpc"].as_str()?.to_string(),
            span["job"].as_str()?.to_string(),
            span["step"].as_u64()?,
            span["trace"].as_str()?.to_string(),
        ))
    };
    let actor: Vec<_> = lines("actor-0.log").iter().filter_map(traced).collect();
    let learner: Vec<_> = lines("learner-0.log").iter().filter_map(traced).collect();
    lines("reward-0.log");
    let updates: Vec<_> = actor
        .iter()
        .filter(|(rpc, job, step, _)| {
            rpc == "actor.update_weights" && job == "traced" && *step >= 1
        })
        .collect();
    assert!(
        !updates.is_empty(),
        "no traced weight update in the actor's log: {actor:?}"
    );
    // The learner's PublishWeights of that step ran under the same trace.
    for (_, _, step, trace) in &updates {
        assert!(
            learner
                .iter()
                .any(|(rpc, _, s, t)| rpc == "learner.publish_weights" && s == step && t == trace),
            "step {step}: no learner line with trace {trace}: {learner:?}"
        );
    }
}
