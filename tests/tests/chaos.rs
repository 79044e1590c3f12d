//! `rlhf chaos` end to end: a job on a cluster of real processes (coordinator, pool workers,
//! the services they start) run clean and under seeded kills and pauses of every kind of
//! process; the faulted run records every step once and ends with bit-identical weights.

use std::process::Command;

use rlhf_tests::{bin, tiny_job};

#[test]
fn a_chaos_run_ends_where_the_clean_run_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tiny_job(tmp.path(), "chaos", "[resources]\nactors = 2\n");
    let out = tmp.path().join("chaos");
    // Seed 2 hits actors (killed, paused), the coordinator, the learner, the reward server
    // and two whole workers within 24 steps.
    let run = Command::new(bin("rlhf"))
        .args([
            "chaos",
            job.to_str().unwrap(),
            "--faults",
            "8",
            "--seed",
            "2",
        ])
        .args(["--steps", "24", "--json", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(report["faults"], 8, "{report}");
    assert_eq!(report["recovered"], 8, "{report}");
    assert_eq!(report["steps_lost"], 0, "{report}");
    assert_eq!(report["steps_applied_twice"], 0, "{report}");
    assert_eq!(report["max_abs_weight_diff"], 0.0, "{report}");
    let targets: Vec<&str> = report["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["target"]["role"].as_str().unwrap())
        .collect();
    for role in ["actor", "learner", "reward", "coordinator", "worker"] {
        assert!(targets.contains(&role), "no {role} fault in {targets:?}");
    }
    let steps = rlhf_tests::metric_steps(&out.join("faulted"));
    assert_eq!(steps, (1..=24).collect::<Vec<u64>>());
}
