//! `rlhf model …` as a user runs it: a real process, stdout parsed as JSON, checked against the
//! Hugging Face reference of each fixture.

use std::process::{Command, Output};

use rlhf_model::testing::{fixtures_dir, reference};
use serde_json::Value;

fn rlhf(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("rlhf runs")
}

/// Runs, expects success, and parses stdout as exactly one JSON object.
fn json(args: &[&str]) -> Value {
    let out = rlhf(args);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "rlhf {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut stream = serde_json::Deserializer::from_str(&stdout).into_iter::<Value>();
    let value = stream.next().expect("one JSON value").expect("valid JSON");
    assert!(
        stream.next().is_none(),
        "stdout holds exactly one JSON object: {stdout}"
    );
    assert!(value.is_object());
    value
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn generate_json_is_greedy_reference() {
    let dir = fixtures_dir().join("tiny-llama");
    let reference = reference(&dir);
    let case = &reference["cases"][0];
    let n = case["greedy_ids"].as_array().unwrap().len().to_string();
    let out = json(&[
        "model",
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        case["prompt"].as_str().unwrap(),
        "--temperature",
        "0",
        "--max-new-tokens",
        &n,
        "--json",
    ]);
    assert_eq!(out["prompt_ids"], case["prompt_ids"]);
    // The fixture's greedy ids were made without stopping at EOS; they hold none here.
    assert_eq!(out["completion_ids"], case["greedy_ids"]);
    assert_eq!(out["finish_reason"], "length");
    assert!(out["text"].is_string());
}

#[test]
fn logprobs_json_matches_reference() {
    let dir = fixtures_dir().join("tiny-llama");
    let reference = reference(&dir);
    for case in reference["cases"].as_array().unwrap() {
        let out = json(&[
            "model",
            "logprobs",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            case["prompt"].as_str().unwrap(),
            "--completion",
            case["continuation"].as_str().unwrap(),
            "--json",
        ]);
        assert_eq!(out["completion_ids"], case["continuation_ids"]);
        for (a, b) in floats(&out["logprobs"])
            .iter()
            .zip(floats(&case["continuation_logprobs"]))
        {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
}

#[test]
fn score_json_matches_reference() {
    let dir = fixtures_dir().join("tiny-llama-rm");
    let reference = reference(&dir);
    for pair in reference["pairs"].as_array().unwrap() {
        let out = json(&[
            "model",
            "score",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            pair["prompt"].as_str().unwrap(),
            "--completion",
            pair["completion"].as_str().unwrap(),
            "--json",
        ]);
        assert_eq!(out["ids"], pair["input_ids"]);
        let (a, b) = (
            out["score"].as_f64().unwrap(),
            pair["score"].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
}

#[test]
fn info_reports_the_architecture() {
    let dir = fixtures_dir().join("tiny-llama");
    let out = json(&["model", "info", "--model", dir.to_str().unwrap(), "--json"]);
    assert_eq!(out["architecture"], "LlamaForCausalLM");
    assert_eq!(out["vocab_size"], 512);
    assert_eq!(out["context_length"], 512);
    assert_eq!(out["dtype"], "float32");
    // 512*64 embeddings + lm_head, 2 layers, final norm.
    let layer = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 64 * 128 + 2 * 64;
    assert_eq!(out["parameters"], 2 * 512 * 64 + 2 * layer + 64);
}

#[test]
fn errors_go_to_stderr_with_a_failing_exit() {
    let out = rlhf(&["model", "info", "--model", "/no/such/model", "--json"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "nothing on stdout");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/no/such/model"), "{err}");

    let rm = fixtures_dir().join("tiny-llama-rm");
    let out = rlhf(&[
        "model",
        "generate",
        "--model",
        rm.to_str().unwrap(),
        "--prompt",
        "x",
        "--json",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("causal LM"), "{err}");
}
