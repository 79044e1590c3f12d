//! Reward-model training learns a known preference rule, and its checkpoint serves.

use std::io::Write;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rlhf_model::testing::fixtures_dir;
use rlhf_model::{HeadKind, Model, ModelConfig, device};
use rlhf_reward::train::{TrainOptions, train};

/// Preferences that follow one rule: the chosen answer is polite ("please"/"thanks"), the
/// rejected one rude ("no"/"go away"); topics vary so only the rule separates them.
fn write_preferences(path: &std::path::Path, n: usize, seed: u64) {
    let topics = [
        "cats", "rain", "bread", "rivers", "stars", "music", "trains", "tea", "maps", "snow",
    ];
    let polite = [
        " thanks, happy to help",
        " please enjoy it",
        " thanks a lot",
        " please ask again",
    ];
    let rude = [" no", " go away", " no way", " stop asking"];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut file = std::fs::File::create(path).unwrap();
    for _ in 0..n {
        let topic = topics[rng.random_range(0..topics.len())];
        let prompt = format!("Tell me about {topic}.");
        let chosen = format!(
            " {topic} are fine{}",
            polite[rng.random_range(0..polite.len())]
        );
        let rejected = format!(" {topic} are fine{}", rude[rng.random_range(0..rude.len())]);
        let line = serde_json::json!({"prompt": prompt, "chosen": chosen, "rejected": rejected});
        writeln!(file, "{line}").unwrap();
    }
    writeln!(file, "this line is not JSON").unwrap();
}

#[test]
fn learns_a_known_rule_to_high_held_out_accuracy() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("prefs.jsonl");
    write_preferences(&data, 300, 1);
    let out = tmp.path().join("rm");
    let opts = TrainOptions {
        base: fixtures_dir().join("tiny-llama"),
        data: data.clone(),
        out: out.clone(),
        epochs: 2,
        lr: 3e-3,
        batch_size: 16,
        margin: 0.0,
        center_coef: 0.01,
        eval_fraction: 0.2,
        seed: 3,
        weight_decay: 0.0,
        max_length: None,
        skip_invalid: true,
        dtype: Some("bfloat16".into()),
        quiet: true,
    };
    let report = train(&opts).unwrap();
    assert_eq!(
        report.skipped_lines, 1,
        "the bad line was skipped and counted"
    );
    assert_eq!(report.eval_pairs, 60);
    let accuracy = report.epochs.last().unwrap().eval_accuracy.unwrap();
    assert!(accuracy >= 0.9, "held-out pairwise accuracy {accuracy}");
    assert!(report.epochs[1].train_loss < report.epochs[0].train_loss);

    // The output is an HF sequence-classification checkpoint with its tokenizer.
    let config = ModelConfig::from_path(&out).unwrap();
    assert_eq!(config.architecture.head, HeadKind::Score);
    assert_eq!(config.dtype, rlhf_model::DType::BF16);
    assert!(out.join("tokenizer.json").is_file() && out.join("train_report.json").is_file());
    let rm = Model::load(&out, &device::inference_device().unwrap()).unwrap();
    let tok = rlhf_model::Tokenizer::from_dir(&out).unwrap();
    let good = tok
        .encode("Tell me about tea. tea are fine thanks a lot", true)
        .unwrap();
    let bad = tok
        .encode("Tell me about tea. tea are fine go away", true)
        .unwrap();
    let s = rlhf_model::host::to_vec(rm.sequence_scores(&[&good, &bad]).unwrap());
    assert!(s[0] > s[1], "polite {} should beat rude {}", s[0], s[1]);

    // Without --skip-invalid the bad line is an error with its number.
    let strict = TrainOptions {
        skip_invalid: false,
        out: tmp.path().join("rm2"),
        ..opts
    };
    let err = train(&strict).unwrap_err().to_string();
    assert!(err.contains("prefs.jsonl:301"), "{err}");
}
