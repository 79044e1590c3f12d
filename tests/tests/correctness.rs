//! Defects a user would hit, each with the job that showed it: prompts that come twice in a
//! step, r_ref from a reference that is not the starting policy, importance ratios under
//! top-k/top-p, an async pipeline k steps deep, DAPO's extra generation rounds, and restarts that
//! say which finished steps are trained again. Real `rlhf run` processes on the tiny fixtures.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rlhf_tests::*;
use toml::Value;

fn run_ok(job: &Path) -> String {
    rlhf_ok(&["run", job.to_str().unwrap(), "--quiet"])
}

/// `rlhf run JOB --quiet` started, its stderr piped.
fn spawn_run(job: &Path) -> std::process::Child {
    Command::new(bin("rlhf"))
        .args(["run", job.to_str().unwrap(), "--quiet"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn metric(line: &serde_json::Value, key: &str) -> f64 {
    line[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no `{key}` in {line}"))
}

fn reference_table(run: &Path) -> BTreeMap<String, Vec<f64>> {
    let text = std::fs::read_to_string(run.join("reference_rewards.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn a_prompt_that_comes_twice_in_a_step_gets_its_reference_reward() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job_with(
        tmp.path(),
        "twice",
        &[
            ("rollout.steps", Value::Integer(2)),
            // 12 prompts, 5 per step: step 3 would cross the epoch; here 3 prompts and 4 per step
            // make every step hold one prompt twice (renamed `id#k`).
            ("rollout.prompts_per_step", Value::Integer(4)),
        ],
    );
    write_prompts(&tmp.path().join("prompts.jsonl"), "p", 3);
    let err = run_ok(&job);
    let run = tmp.path().join("run");
    assert_eq!(metric_steps(&run), vec![1, 2]);
    // The table holds the data's ids only; the renamed ones were given to the learner.
    assert_eq!(reference_table(&run).len(), 3);
    for line in metric_lines(&run) {
        assert_eq!(metric(&line, "rollout/samples"), 16.0, "{line}");
        assert!(metric(&line, "reward/rm/transformed").is_finite());
    }
    // The trained policy is exported as a model folder and named at the end.
    assert!(run.join("policy/config.json").is_file());
    assert!(run.join("policy/model.safetensors").is_file());
    assert!(err.contains("trained policy"), "{err}");
}

#[test]
fn calibration_samples_the_reference_policy_not_the_starting_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let f = fixtures();
    // Another model of the fixture's shape: the "reference" of a second RL run.
    let other = tmp.path().join("other");
    rlhf_ok(&[
        "model",
        "init",
        "--config",
        f.join("tiny-llama/config.json").to_str().unwrap(),
        "--tokenizer-from",
        f.join("tiny-llama").to_str().unwrap(),
        "--out",
        other.to_str().unwrap(),
        "--seed",
        "11",
    ]);
    let table = |name: &str, edits: &[(&str, Value)]| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut all = vec![("rollout.steps", Value::Integer(1))];
        all.extend(edits.iter().cloned());
        let job = tiny_job_with(&dir, name, &all);
        run_ok(&job);
        reference_table(&dir.join("run"))
    };
    let other_path = Value::String(other.display().to_string());
    let fixture = Value::String(f.join("tiny-llama").display().to_string());
    let reference_itself = table("itself", &[("policy.model", other_path.clone())]);
    let from_fixture = table(
        "second-run",
        &[
            ("policy.model", fixture.clone()),
            ("policy.reference", other_path),
        ],
    );
    let fixture_itself = table("fixture", &[("policy.model", fixture)]);
    // Same seeds, same reference: the same samples and the same r_ref, whatever the policy.
    assert_eq!(from_fixture, reference_itself);
    assert_ne!(from_fixture, fixture_itself);
}

#[test]
fn top_k_and_top_p_give_importance_ratios_of_one_before_the_first_update() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job_with(
        tmp.path(),
        "truncated",
        &[
            ("rollout.steps", Value::Integer(1)),
            ("rollout.top_k", Value::Integer(5)),
            ("rollout.top_p", Value::Float(0.8)),
        ],
    );
    run_ok(&job);
    let line = &metric_lines(&tmp.path().join("run"))[0];
    // One epoch, one minibatch: the ratio is taken before the update, so it is 1 when the
    // actor's log-probs and the learner's are of the same distribution.
    let ratio = metric(line, "train/ratio");
    assert!((ratio - 1.0).abs() < 1e-3, "train/ratio {ratio}");
}

#[test]
fn an_async_job_generates_k_steps_ahead_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job_with(
        tmp.path(),
        "async",
        &[
            ("rollout.steps", Value::Integer(6)),
            ("rollout.mode", Value::String("async".into())),
            ("rollout.max_staleness", Value::Integer(2)),
        ],
    );
    let run = tmp.path().join("run");
    // Interrupted after its third step, resumed to the end.
    let child = spawn_run(&job);
    wait_for("three steps", Duration::from_secs(240), || {
        metric_steps(&run).len() >= 3
    });
    signal(child.id(), "INT");
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    rlhf_ok(&["run", job.to_str().unwrap(), "--quiet", "--resume"]);
    assert_eq!(metric_steps(&run), vec![1, 2, 3, 4, 5, 6]);
    let lines = metric_lines(&run);
    let staleness: Vec<f64> = lines
        .iter()
        .map(|l| metric(l, "rollout/staleness"))
        .collect();
    assert_eq!(
        staleness[0], 0.0,
        "step 1 is generated with v0 and trained at v0"
    );
    assert!(
        staleness.iter().all(|&s| (0.0..=2.0).contains(&s)),
        "{staleness:?}"
    );
    // Two steps ahead: some step is trained from weights more than one version newer than
    // the ones that generated it (a one-deep pipeline never exceeds 1).
    assert!(staleness.iter().any(|&s| s > 1.0), "{staleness:?}");
    let ratio = metric(&lines[0], "train/ratio");
    assert!((ratio - 1.0).abs() < 1e-3, "step 1 is on-policy: {ratio}");
}

#[test]
fn dynamic_sampling_generates_more_rounds_until_the_step_is_full() {
    let tmp = tempfile::tempdir().unwrap();
    // One binary objective: many groups of two samples are all-equal (uninformative).
    let job = tiny_job_with(
        tmp.path(),
        "dapo",
        &[
            ("rollout.steps", Value::Integer(3)),
            ("rollout.samples_per_prompt", Value::Integer(2)),
            ("rollout.max_generation_rounds", Value::Integer(4)),
            ("learner.grpo.dynamic_sampling", Value::Boolean(true)),
        ],
    );
    let text = std::fs::read_to_string(&job).unwrap();
    let mut doc: toml::Table = text.parse().unwrap();
    let short: toml::Table = toml::from_str(
        r#"name = "short"
kind = "rule"
verifier = "regex"
pattern = "^.{0,34}$"
transform = "identity""#,
    )
    .unwrap();
    doc.insert("objective".into(), Value::Array(vec![Value::Table(short)]));
    std::fs::write(&job, toml::to_string(&doc).unwrap()).unwrap();
    run_ok(&job);
    let lines = metric_lines(&tmp.path().join("run"));
    assert_eq!(lines.len(), 3);
    let mut more_rounds = 0;
    for line in &lines {
        let rounds = metric(line, "dynamic_sampling/rounds");
        let groups = metric(line, "dynamic_sampling/groups");
        let used = metric(line, "dynamic_sampling/informative_groups")
            + metric(line, "dynamic_sampling/carried_in");
        assert!((1.0..=4.0).contains(&rounds), "{line}");
        // Every round generated a whole step's prompts.
        assert_eq!(
            metric(line, "rollout/samples"),
            rounds * 4.0 * 2.0,
            "{line}"
        );
        if rounds < 4.0 {
            assert!(used >= groups, "stopped early without a full step: {line}");
        }
        if rounds > 1.0 {
            more_rounds += 1;
        }
    }
    assert!(more_rounds > 0, "no step needed a second round: {lines:?}");
}

#[test]
fn a_restart_without_a_checkpoint_says_which_steps_are_trained_again() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job_with(
        tmp.path(),
        "nockpt",
        &[
            // Steps of the tiny job take a fraction of a second: enough of them that the kill
            // lands mid-run.
            ("rollout.steps", Value::Integer(40)),
            ("evaluation.every_steps", Value::Integer(0)),
            ("learner.checkpoint.every_steps", Value::Integer(0)),
        ],
    );
    let run = tmp.path().join("run");
    let child = spawn_run(&job);
    wait_for("two steps", Duration::from_secs(240), || {
        metric_steps(&run).len() >= 2
    });
    signal(worker_pid(&run, "learner", 0), "KILL");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(metric_steps(&run), (1..=40).collect::<Vec<u64>>());
    let record = job_record(&run);
    let reasons: Vec<&str> = record["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h["reason"].as_str())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("no checkpoint found") && r.contains("trained again")),
        "{reasons:?}\n{err}"
    );
}
