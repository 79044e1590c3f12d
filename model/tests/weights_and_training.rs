//! Checkpoint round trips (f32/bf16/f16, single file and sharded), head conversion, the errors a
//! user sees for broken checkpoints, and training under autodiff.

use std::path::Path;

use rlhf_model::optim::{AdamWConfig, LrSchedule, Trainer};
use rlhf_model::testing::fixtures_dir;
use rlhf_model::{DType, HeadKind, LlamaDims, Model, ModelConfig, SaveOptions, device};

fn tiny_llama() -> std::path::PathBuf {
    fixtures_dir().join("tiny-llama")
}

fn bits(model: &Model) -> Vec<(String, Vec<u32>)> {
    model
        .named_tensors()
        .into_iter()
        .map(|t| (t.name, t.values.iter().map(|v| v.to_bits()).collect()))
        .collect()
}

fn file_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn load_save_load_is_bit_exact_in_every_dtype_and_layout() {
    let dev = device::inference_device().unwrap();
    let original = Model::load(&tiny_llama(), &dev).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for max_shard_bytes in [usize::MAX, 40_000] {
            let opts = SaveOptions {
                dtype,
                max_shard_bytes,
            };
            let a = tmp.path().join(format!("{dtype}-{max_shard_bytes}-a"));
            let b = tmp.path().join(format!("{dtype}-{max_shard_bytes}-b"));
            original.save(&a, &opts).unwrap();
            let sharded = a.join("model.safetensors.index.json").exists();
            assert_eq!(sharded, max_shard_bytes != usize::MAX, "{dtype}: sharding");
            let once = Model::load(&a, &dev).unwrap();
            assert_eq!(once.config.dtype, dtype);
            once.save(&b, &opts).unwrap();
            let twice = Model::load(&b, &dev).unwrap();
            assert_eq!(
                bits(&once),
                bits(&twice),
                "{dtype}: values after a second round trip"
            );
            assert_eq!(file_bytes(&a), file_bytes(&b), "{dtype}: file bytes");
            if dtype == DType::F32 {
                assert_eq!(
                    bits(&original),
                    bits(&once),
                    "f32 round trip changes nothing"
                );
            }
        }
    }
}

#[test]
fn saved_config_is_a_transformers_config() {
    let dev = device::inference_device().unwrap();
    let model = Model::load(&tiny_llama(), &dev).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    model
        .save(
            tmp.path(),
            &SaveOptions {
                dtype: DType::BF16,
                ..Default::default()
            },
        )
        .unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(json["architectures"][0], "LlamaForCausalLM");
    assert_eq!(json["torch_dtype"], "bfloat16");
    assert_eq!(json["num_key_value_heads"], 2);
    // Keys we do not use survive.
    assert_eq!(json["initializer_range"], 0.02);
}

#[test]
fn causal_lm_becomes_a_reward_model_and_a_critic() {
    let dev = device::inference_device().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for head in [HeadKind::Score, HeadKind::Value] {
        let rm = Model::load_with_head(&tiny_llama(), head, &dev, 7).unwrap();
        assert_eq!(rm.head(), head);
        assert!(rm.lm_head.is_none() && rm.score.is_some());
        let dir = tmp.path().join(format!("{head:?}"));
        rm.save(&dir, &SaveOptions::default()).unwrap();
        let again = Model::load(&dir, &dev).unwrap();
        assert_eq!(again.head(), head);
        assert_eq!(bits(&rm), bits(&again));
    }
}

#[test]
fn broken_checkpoints_give_errors_that_name_the_problem() {
    let dev = device::inference_device().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let model = Model::load(&tiny_llama(), &dev).unwrap();
    model.save(tmp.path(), &SaveOptions::default()).unwrap();

    // A config that says one layer more than the weights hold.
    let cfg_path = tmp.path().join("config.json");
    let original = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        original.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3"),
    )
    .unwrap();
    let err = Model::load(tmp.path(), &dev).unwrap_err().to_string();
    assert!(
        err.contains("missing tensors") && err.contains("model.layers.2."),
        "{err}"
    );

    // A config with fewer layers: the extra tensors are unexpected.
    std::fs::write(
        &cfg_path,
        original.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1"),
    )
    .unwrap();
    let err = Model::load(tmp.path(), &dev).unwrap_err().to_string();
    assert!(
        err.contains("unexpected tensors") && err.contains("model.layers.1."),
        "{err}"
    );

    // Wrong hidden size: a shape error naming the tensor.
    std::fs::write(
        &cfg_path,
        original.replace("\"intermediate_size\": 128", "\"intermediate_size\": 96"),
    )
    .unwrap();
    let err = Model::load(tmp.path(), &dev).unwrap_err().to_string();
    assert!(
        err.contains("mlp.") && err.contains("expected shape"),
        "{err}"
    );

    // Unknown architecture.
    std::fs::write(
        &cfg_path,
        original.replace("LlamaForCausalLM", "GPTNeoXForCausalLM"),
    )
    .unwrap();
    let err = Model::load(tmp.path(), &dev).unwrap_err().to_string();
    assert!(
        err.contains("GPTNeoXForCausalLM") && err.contains("not supported"),
        "{err}"
    );

    // Truncated weights file.
    std::fs::write(&cfg_path, &original).unwrap();
    let weights = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = Model::load(tmp.path(), &dev).unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );

    // No weights at all.
    std::fs::remove_file(&weights).unwrap();
    let err = Model::load(tmp.path(), &dev).unwrap_err().to_string();
    assert!(err.contains("no model.safetensors"), "{err}");
}

#[test]
fn a_tiny_model_fits_a_fixed_batch() {
    let config = ModelConfig::llama(LlamaDims {
        vocab_size: 64,
        hidden_size: 32,
        intermediate_size: 64,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        bos_token_id: 0,
        eos_token_id: 1,
        pad_token_id: 2,
    });
    let dev = device::training_device().unwrap();
    let mut model = Model::init(&config, &dev, 1);
    let prompts: [&[u32]; 3] = [&[0, 10, 11], &[0, 20], &[0, 30, 31, 32]];
    let completions: [&[u32]; 3] = [&[12, 13, 14, 1], &[21, 22, 1], &[33, 1]];
    let pairs: Vec<(&[u32], &[u32])> = prompts
        .iter()
        .copied()
        .zip(completions.iter().copied())
        .collect();
    let nll = |model: &Model| {
        let out = model.completion_logprobs(&pairs, 1.0).unwrap();
        out.logprobs.sum().neg() / out.mask.sum()
    };
    let start: f32 = nll(&model).into_scalar();
    let schedule = LrSchedule::constant(1e-2);
    let mut trainer = Trainer::new(AdamWConfig::default(), schedule, Some(1.0));
    for _ in 0..40 {
        let loss = nll(&model).reshape([1]);
        model = trainer.step(model, loss).0;
    }
    let end: f32 = nll(&model).into_scalar();
    assert!(
        end < 0.2 * start,
        "loss should fall well below its start: {start} -> {end}"
    );
}
