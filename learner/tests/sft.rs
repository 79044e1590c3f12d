//! Supervised fine-tuning lowers the NLL of the responses and saves a loadable model.

use std::io::Write;

use rlhf_learner::sft::{SftOptions, train_sft};
use rlhf_model::testing::fixtures_dir;
use rlhf_model::{Model, Tokenizer, device};

#[test]
fn sft_learns_the_responses() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("sft.jsonl");
    let mut f = std::fs::File::create(&data).unwrap();
    let topics = ["tea", "rain", "maps", "snow", "bread", "stars"];
    for i in 0..120 {
        let t = topics[i % topics.len()];
        let line = serde_json::json!({"prompt": format!("Write about {t}:"), "response": format!(" {t} is lovely.")});
        writeln!(f, "{line}").unwrap();
    }
    writeln!(f, "{{\"prompt\": 3}}").unwrap();
    let opts = SftOptions {
        model: fixtures_dir().join("tiny-llama"),
        data: data.clone(),
        out: tmp.path().join("sft"),
        epochs: 3,
        lr: 3e-3,
        batch_size: 16,
        max_length: None,
        eval_fraction: 0.1,
        seed: 0,
        weight_decay: 0.0,
        skip_invalid: true,
        dtype: None,
        quiet: true,
    };
    let report = train_sft(&opts).unwrap();
    let (first, last) = (
        report[0].eval_nll.unwrap(),
        report.last().unwrap().eval_nll.unwrap(),
    );
    assert!(last < 0.5 * first, "held-out NLL {first:.3} -> {last:.3}");

    let model = Model::load(&opts.out, &device::inference_device().unwrap()).unwrap();
    let tok = Tokenizer::from_dir(&opts.out).unwrap();
    let prompt = tok.encode("Write about tea:", true).unwrap();
    let response = tok.encode(" tea is lovely.", false).unwrap();
    let lp = model
        .completion_logprobs(&[(&prompt, &response)], 1.0)
        .unwrap();
    let mean = rlhf_model::host::to_vec(lp.logprobs.sum())[0] / response.len() as f32;
    assert!(
        mean > -1.0,
        "the learned response is likely: mean log-prob {mean}"
    );

    let strict = SftOptions {
        skip_invalid: false,
        out: tmp.path().join("sft2"),
        ..opts
    };
    let err = train_sft(&strict).unwrap_err().to_string();
    assert!(err.contains("sft.jsonl:121"), "{err}");
}
