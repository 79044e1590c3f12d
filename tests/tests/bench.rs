//! `rlhf bench grpo` runs real GRPO steps through the services and reports its numbers as JSON.

use std::process::Command;

use rlhf_tests::{bin, fixtures};

#[test]
fn bench_grpo_reports_step_time_throughput_and_memory() {
    let model = fixtures().join("tiny-llama");
    let out = Command::new(bin("rlhf"))
        .args(["bench", "grpo", "--model", model.to_str().unwrap()])
        .args(["--prompts", "2", "--samples", "2", "--max-new-tokens", "8"])
        .args(["--steps", "2", "--warmup", "1", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["step_seconds"].as_array().unwrap().len(),
        2,
        "{report}"
    );
    for key in ["seconds_per_step", "generated_tokens_per_s", "peak_rss_mb"] {
        let v = report[key].as_f64().unwrap();
        assert!(v > 0.0 && v.is_finite(), "{key} = {v}");
    }
    // Actor, learner and reward server were each measured.
    assert_eq!(
        report["peak_rss_mb_per_process"].as_array().unwrap().len(),
        3,
        "{report}"
    );
}
