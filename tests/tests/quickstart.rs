//! The quickstart pipeline end to end, shortened: `examples/quickstart/job.toml` with smaller
//! data, model and step counts, run by the real `rlhf` binary (real worker processes, gRPC over
//! loopback). Checks every stage's artefacts, the report's schema, that RL raised the learned
//! reward, and that `--resume` skips finished work.

use std::path::Path;
use std::process::Command;

use rlhf_tests::bin;

/// The bundled quickstart, shortened, with `extra` (`"table.key"` → value) applied.
fn shortened_quickstart(dir: &Path, extra: &[(&str, toml::Value)]) -> std::path::PathBuf {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart/job.toml");
    let mut job: toml::Table = toml::from_str(&std::fs::read_to_string(example).unwrap()).unwrap();
    let overrides: &[(&str, toml::Value)] = &[
        ("task.train_prompts", 16.into()),
        ("task.eval_prompts", 12.into()),
        ("task.sft_examples", 600.into()),
        ("task.preference_pairs", 1500.into()),
        ("model.hidden_size", 32.into()),
        ("model.intermediate_size", 64.into()),
        ("model.num_layers", 1.into()),
        ("sft.epochs", 2.into()),
        ("reward_models.epochs", 3.into()),
        ("rewards.reference_samples", 4.into()),
        ("rollout.steps", 10.into()),
        ("rollout.prompts_per_step", 8.into()),
        ("rollout.samples_per_prompt", 4.into()),
        ("rollout.max_new_tokens", 24.into()),
        ("learner.optim.lr", 3e-3.into()),
        ("evaluation.every_steps", 5.into()),
    ];
    for (key, value) in overrides.iter().chain(extra) {
        let (table, field) = key.rsplit_once('.').unwrap();
        let mut t = &mut job;
        for part in table.split('.') {
            t = t.get_mut(part).and_then(toml::Value::as_table_mut).unwrap();
        }
        assert!(t.contains_key(field), "{key} is not in the example");
        t.insert(field.to_string(), value.clone());
    }
    let path = dir.join("job.toml");
    std::fs::write(&path, toml::to_string(&job).unwrap()).unwrap();
    path
}

fn rlhf(args: &[&str]) -> std::process::Output {
    Command::new(bin("rlhf"))
        .args(args)
        .output()
        .expect("rlhf runs")
}

fn metric(line: &serde_json::Value, key: &str) -> f64 {
    line[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} in {line}"))
}

#[test]
fn shortened_quickstart_runs_every_stage_and_raises_the_learned_reward() {
    let dir = tempfile::tempdir().unwrap();
    let job = shortened_quickstart(dir.path(), &[]);
    let out = dir.path().join("out");
    let (job_arg, out_arg) = (job.to_str().unwrap(), out.to_str().unwrap());
    let run = rlhf(&["run", job_arg, "--out", out_arg, "--quiet"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "rlhf run failed:\n{stderr}");

    for file in [
        "data/prompts.jsonl",
        "data/eval.jsonl",
        "data/sft.jsonl",
        "data/prefs-helpful.jsonl",
        "data/prefs-harmless.jsonl",
        "models/tokenizer/tokenizer.json",
        "models/sft/config.json",
        "models/sft/model.safetensors",
        "models/rm-helpful/config.json",
        "models/rm-harmless/config.json",
        "arms/log_sigmoid-seed1/job.toml",
        "arms/log_sigmoid-seed1/reference_rewards.json",
        "arms/log_sigmoid-seed1/eval/step-000010.jsonl",
        "metrics.jsonl",
        "report.md",
    ] {
        assert!(
            out.join(file).is_file(),
            "missing {file}; stderr:\n{stderr}"
        );
    }
    let png = std::fs::read(out.join("curves.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let rate = |v: &serde_json::Value, key: &str| {
        let x = metric(v, key);
        assert!((0.0..=1.0).contains(&x), "{key} = {x} is not a rate");
    };
    for key in ["helpful", "harmless", "both_good"] {
        rate(&report["sft"], key);
    }
    let runs = report["arms"]["log_sigmoid"]["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1);
    for key in ["helpful", "harmless", "both_good"] {
        rate(&runs[0], key);
    }
    assert_eq!(runs[0]["seed"], 1);
    assert!(metric(&runs[0], "mean_length") > 0.0 && metric(&runs[0], "kl").is_finite());
    for objective in ["helpful", "harmless"] {
        assert!(runs[0]["rewards"][objective].is_f64(), "{}", runs[0]);
        let acc = metric(&report["reward_models"][objective], "accuracy");
        eprintln!("{objective} reward model: held-out accuracy {acc:.3}");
        assert!(acc > 0.6, "{objective} reward model accuracy {acc}");
    }

    // RL raised the learned reward (the sum of the reward models' raw scores).
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 10);
    let total = |range: std::ops::Range<usize>| {
        range
            .clone()
            .map(|i| {
                metric(&lines[i], "reward/helpful/raw") + metric(&lines[i], "reward/harmless/raw")
            })
            .sum::<f64>()
            / range.len() as f64
    };
    let (first, last) = (total(0..3), total(7..10));
    eprintln!("learned reward: {first:.3} (steps 1-3) → {last:.3} (steps 8-10)");
    assert!(last > first, "learned reward fell: {first:.3} → {last:.3}");
    // The same arm with a learning rate too small to move the weights: same prompts and sample
    // seeds, so step 1 is identical and every later difference is what training did. A policy
    // loss with the wrong sign, advantages that do not reach it, or weights that never reach
    // the actors all fail this.
    let arm_job = out.join("arms/log_sigmoid-seed1/job.toml");
    let mut control: toml::Table = std::fs::read_to_string(&arm_job).unwrap().parse().unwrap();
    let control_out = dir.path().join("control");
    control.insert(
        "output_dir".into(),
        control_out.display().to_string().into(),
    );
    control["learner"]["optim"]
        .as_table_mut()
        .unwrap()
        .insert("lr".into(), 1e-12.into());
    let control_job = out.join("arms/log_sigmoid-seed1/control.toml");
    std::fs::write(&control_job, toml::to_string(&control).unwrap()).unwrap();
    let ran = rlhf(&["run", control_job.to_str().unwrap(), "--quiet"]);
    assert!(
        ran.status.success(),
        "{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    let control_lines: Vec<serde_json::Value> =
        std::fs::read_to_string(control_out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let learned =
        |l: &serde_json::Value| metric(l, "reward/helpful/raw") + metric(l, "reward/harmless/raw");
    // Same samples; the reward server's dynamic batching may pad them differently (f32 noise).
    let (untrained_1, trained_1) = (learned(&control_lines[0]), learned(&lines[0]));
    assert!(
        (untrained_1 - trained_1).abs() < 1e-6,
        "step 1 is the same: {untrained_1} vs {trained_1}"
    );
    let untrained = (7..10).map(|i| learned(&control_lines[i])).sum::<f64>() / 3.0;
    eprintln!("learned reward over steps 8-10: trained {last:.3}, untrained {untrained:.3}");
    assert!(
        last > untrained + 0.05,
        "training did not raise the learned reward: {last:.3} vs {untrained:.3} untrained"
    );

    // A finished run is not overwritten; --resume finds every stage and arm done.
    let again = rlhf(&["run", job_arg, "--out", out_arg, "--quiet"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
    let resumed = rlhf(&["run", job_arg, "--out", out_arg, "--quiet", "--resume"]);
    let resumed_err = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{resumed_err}");
    assert!(resumed_err.contains("[sft] done earlier"), "{resumed_err}");
    assert!(!resumed_err.contains("calibrating"), "{resumed_err}");

    let plot = rlhf(&[
        "plot",
        out_arg,
        "--out",
        dir.path().join("p.svg").to_str().unwrap(),
    ]);
    assert!(
        plot.status.success(),
        "{}",
        String::from_utf8_lossy(&plot.stderr)
    );
}

#[test]
fn quickstart_runs_with_ppo_and_a_critic() {
    let dir = tempfile::tempdir().unwrap();
    let job = shortened_quickstart(
        dir.path(),
        &[
            ("learner.algorithm", "ppo".into()),
            ("rollout.steps", 3.into()),
            ("evaluation.every_steps", 3.into()),
        ],
    );
    // A relative --out, run from the job's folder: the arms' job files must still find the
    // pipeline's models and data.
    let out = dir.path().join("out");
    let run = Command::new(bin("rlhf"))
        .arg("run")
        .arg(job.file_name().unwrap())
        .args(["--out", "out", "--quiet"])
        .current_dir(job.parent().unwrap())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let arm = out.join("arms/log_sigmoid-seed1");
    assert!(
        std::fs::read_to_string(arm.join("job.toml"))
            .unwrap()
            .contains("algorithm = \"ppo\"")
    );
    let lines = std::fs::read_to_string(arm.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
    assert_eq!(last["step"], 3);
    assert!(
        metric(&last, "critic/value_loss").is_finite(),
        "the critic trained: {last}"
    );
    assert!(out.join("report.json").is_file());
}
