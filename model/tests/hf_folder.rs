//! Saved model folders against the Hugging Face conventions (`rlhf_model::hf::check_folder`).
//!
//! The checker is validated on folders transformers wrote itself (every fixture passes), then
//! every model the crate saves from a fixture must pass and hold the same config keys, tensor
//! names, shapes and dtypes as the fixture, and deliberately broken folders must fail with a
//! message naming what is wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use rlhf_model::hf::{check_folder, tensor_index};
use rlhf_model::testing::{crate_fixtures_dir, fixtures_dir};
use rlhf_model::{DType, HeadKind, LlamaDims, Model, ModelConfig, SaveOptions, device};
use serde_json::{Value, json};

/// Every model folder (with a `config.json`) under both fixture roots.
fn model_folders() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = [fixtures_dir(), crate_fixtures_dir()]
        .iter()
        .flat_map(|root| std::fs::read_dir(root).unwrap().map(|e| e.unwrap().path()))
        .filter(|d| d.join("config.json").is_file())
        .collect();
    dirs.sort();
    dirs
}

fn config_json(dir: &Path) -> serde_json::Map<String, Value> {
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Folders whose config.json names a causal-LM architecture (read raw, so a folder the crate
/// cannot parse is not filtered out but fails the test).
fn causal_lm_folders() -> Vec<PathBuf> {
    let dirs: Vec<PathBuf> = model_folders()
        .into_iter()
        .filter(|d| {
            config_json(d)["architectures"][0]
                .as_str()
                .is_some_and(|a| a.ends_with("ForCausalLM"))
        })
        .collect();
    assert!(
        dirs.len() >= 3,
        "expected tiny-llama, tiny-qwen2 and tiny-mistral at least: {dirs:?}"
    );
    dirs
}

fn dev() -> rlhf_model::burn::tensor::Device {
    device::inference_device().unwrap()
}

fn assert_passes(dir: &Path) {
    if let Err(problems) = check_folder(dir) {
        panic!(
            "{}: {} problem(s):\n  {}",
            dir.display(),
            problems.len(),
            problems.join("\n  ")
        );
    }
}

/// Fails unless the check fails with a problem that contains every one of `needles`.
fn assert_fails_with(dir: &Path, needles: &[&str]) {
    let problems = check_folder(dir).expect_err("a broken folder must fail the check");
    assert!(
        problems
            .iter()
            .any(|p| needles.iter().all(|n| p.contains(n))),
        "no problem mentions {needles:?}; problems:\n  {}",
        problems.join("\n  ")
    );
}

fn files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

type Layout = BTreeMap<String, (String, Vec<usize>)>;

fn layout(dir: &Path) -> Layout {
    tensor_index(dir)
        .unwrap_or_else(|p| panic!("{}: {p:?}", dir.display()))
        .into_iter()
        .map(|(name, t)| (name, (t.dtype, t.shape)))
        .collect()
}

fn save(model: &Model, dir: &Path, dtype: DType, source: &Path) {
    let options = SaveOptions {
        dtype,
        ..Default::default()
    };
    model.save_with_tokenizer(dir, &options, source).unwrap();
}

#[test]
fn folders_transformers_wrote_pass_the_check() {
    for dir in model_folders() {
        assert_passes(&dir);
    }
}

#[test]
fn saved_models_pass_and_match_what_transformers_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    for source in causal_lm_folders() {
        let model = Model::load(&source, &dev()).unwrap();
        let out = tmp.path().join(source.file_name().unwrap());
        save(&model, &out, DType::F32, &source);
        assert_passes(&out);
        let name = source.display();

        let keys = |d: &Path| config_json(d).keys().cloned().collect::<BTreeSet<_>>();
        assert_eq!(keys(&out), keys(&source), "{name}: config.json keys");
        assert_eq!(
            layout(&out),
            layout(&source),
            "{name}: tensor names, dtypes, shapes"
        );

        // Every file transformers wrote (tokenizer files, special_tokens_map.json where the
        // source had one, generation_config.json) is there, unchanged.
        let mut wanted = files(&source);
        wanted.remove("reference.json");
        assert_eq!(files(&out), wanted, "{name}: files");
        for file in &wanted {
            if file != "config.json" && !file.ends_with(".safetensors") {
                assert_eq!(
                    std::fs::read(out.join(file)).unwrap(),
                    std::fs::read(source.join(file)).unwrap(),
                    "{name}: {file}"
                );
            }
        }
        // The values of the config too, where the crate reads them.
        let (a, b) = (config_json(&out), config_json(&source));
        for key in [
            "architectures",
            "model_type",
            "vocab_size",
            "hidden_size",
            "num_key_value_heads",
            "head_dim",
            "tie_word_embeddings",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "dtype",
            "rope_parameters",
            "sliding_window",
        ] {
            assert_eq!(a.get(key), b.get(key), "{name}: config.json `{key}`");
        }
    }
}

#[test]
fn saved_models_pass_in_every_dtype_sharded_and_with_other_heads() {
    let tmp = tempfile::tempdir().unwrap();
    for source in causal_lm_folders() {
        let model = Model::load(&source, &dev()).unwrap();
        let stem = source.file_name().unwrap().to_string_lossy().into_owned();
        for dtype in [DType::BF16, DType::F16] {
            let out = tmp.path().join(format!("{stem}-{dtype}"));
            save(&model, &out, dtype, &source);
            assert_passes(&out);
            let json = config_json(&out);
            assert_eq!(json["dtype"], dtype.torch_name());
            let st = if dtype == DType::BF16 { "BF16" } else { "F16" };
            assert!(
                layout(&out).values().all(|(d, _)| d == st),
                "{stem} {dtype}"
            );
        }
        let out = tmp.path().join(format!("{stem}-sharded"));
        let options = SaveOptions {
            dtype: DType::F32,
            max_shard_bytes: 100_000,
        };
        model.save_with_tokenizer(&out, &options, &source).unwrap();
        assert!(out.join("model.safetensors.index.json").is_file());
        assert_passes(&out);
        assert_eq!(layout(&out), layout(&source), "{stem}: sharded layout");

        for head in [HeadKind::Score, HeadKind::Value] {
            let out = tmp.path().join(format!("{stem}-{head:?}"));
            let rm = Model::load_with_head(&source, head, &dev(), 3).unwrap();
            save(&rm, &out, DType::F32, &source);
            assert_passes(&out);
            let names: BTreeSet<String> = layout(&out).into_keys().collect();
            assert!(names.contains("score.weight") && !names.contains("lm_head.weight"));
            assert_eq!(names.contains("score.bias"), head == HeadKind::Value);
        }
    }
}

#[test]
fn a_fresh_model_gets_a_complete_folder() {
    let config = ModelConfig::llama(LlamaDims {
        vocab_size: 512,
        hidden_size: 32,
        intermediate_size: 64,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        max_position_embeddings: 128,
        tie_word_embeddings: true,
        bos_token_id: 0,
        eos_token_id: 1,
        pad_token_id: 2,
    });
    let model = Model::init(&config, &dev(), 5);
    let tmp = tempfile::tempdir().unwrap();
    // A tokenizer folder without generation_config.json, as the quickstart's is.
    let tok = tmp.path().join("tokenizer");
    std::fs::create_dir_all(&tok).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures_dir().join("tiny-llama").join(f), tok.join(f)).unwrap();
    }
    let out = tmp.path().join("fresh");
    save(&model, &out, DType::F32, &tok);
    assert_passes(&out);
    let generation: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("generation_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        generation,
        json!({"_from_model_config": true, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2})
    );
    let names: BTreeSet<String> = layout(&out).into_keys().collect();
    assert!(!names.contains("lm_head.weight"), "tied: no lm_head");
    let json = config_json(&out);
    assert_eq!(json["dtype"], "float32");
    assert_eq!(json["torch_dtype"], "float32");
}

#[test]
fn saving_without_a_tokenizer_is_an_error() {
    let model = Model::load(&fixtures_dir().join("tiny-llama"), &dev()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let err = model
        .save_with_tokenizer(&tmp.path().join("out"), &SaveOptions::default(), tmp.path())
        .unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn config_fields_changed_in_code_reach_config_json() {
    let source = fixtures_dir().join("tiny-llama");
    let mut model = Model::load(&source, &dev()).unwrap();
    model.config.eos_token_ids = vec![1, 2];
    model.config.rope.theta = 5e5;
    let tmp = tempfile::tempdir().unwrap();
    save(&model, tmp.path(), DType::F32, &source);
    let json = config_json(tmp.path());
    assert_eq!(json["eos_token_id"], json!([1, 2]));
    assert_eq!(json["rope_parameters"]["rope_theta"], json!(5e5));
    assert_eq!(json["rope_theta"], json!(5e5));
    assert_passes(tmp.path());
}

// ---- Broken folders -----------------------------------------------------------------------

/// Owned tensors of a safetensors file, rewritten with `edit`.
fn rewrite(
    file: &Path,
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    safetensors::serialize_to_file(views, metadata, file).unwrap();
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let mut map: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut map);
    std::fs::write(path, serde_json::to_string_pretty(&map).unwrap()).unwrap();
}

/// A fresh, passing save of the fixture `name` in `tmp/label`.
fn good_copy(tmp: &Path, name: &str, label: &str) -> PathBuf {
    let source = fixtures_dir().join(name);
    let out = tmp.join(label);
    save(
        &Model::load(&source, &dev()).unwrap(),
        &out,
        DType::F32,
        &source,
    );
    assert_passes(&out);
    out
}

#[test]
fn a_renamed_tensor_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = good_copy(tmp.path(), "tiny-llama", "renamed");
    rewrite(&dir.join("model.safetensors"), |t| {
        let up = t
            .iter_mut()
            .find(|t| t.0 == "model.layers.1.mlp.up_proj.weight")
            .unwrap();
        up.0 = "model.layers.1.mlp.upproj.weight".into();
    });
    assert_fails_with(&dir, &["model.layers.1.mlp.up_proj.weight", "missing"]);
    assert_fails_with(
        &dir,
        &["model.layers.1.mlp.upproj.weight", "not a parameter"],
    );
}

#[test]
fn a_missing_tokenizer_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = good_copy(tmp.path(), "tiny-llama", "no-tokenizer");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    assert_fails_with(&dir, &["tokenizer.json is missing"]);
    let dir = good_copy(tmp.path(), "tiny-llama", "no-tokenizer-config");
    std::fs::remove_file(dir.join("tokenizer_config.json")).unwrap();
    assert_fails_with(&dir, &["tokenizer_config.json is missing"]);
    let dir = good_copy(tmp.path(), "tiny-llama", "no-generation-config");
    std::fs::remove_file(dir.join("generation_config.json")).unwrap();
    assert_fails_with(&dir, &["generation_config.json is missing"]);
}

#[test]
fn a_dtype_that_disagrees_with_the_config_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = good_copy(tmp.path(), "tiny-llama", "says-bf16");
    edit_json(&dir.join("config.json"), |c| {
        c.insert("dtype".into(), json!("bfloat16"));
        c.insert("torch_dtype".into(), json!("bfloat16"));
    });
    assert_fails_with(&dir, &["not BF16", "bfloat16"]);

    // One tensor stored in another dtype.
    let dir = good_copy(tmp.path(), "tiny-llama", "one-f16");
    rewrite(&dir.join("model.safetensors"), |t| {
        let norm = t.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
        let values: Vec<f32> = norm
            .3
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        norm.1 = safetensors::Dtype::F16;
        norm.3 = values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
            .collect();
    });
    assert_fails_with(&dir, &["model.norm.weight", "F16", "float32"]);

    // dtype and torch_dtype disagreeing.
    let dir = good_copy(tmp.path(), "tiny-llama", "two-dtypes");
    edit_json(&dir.join("config.json"), |c| {
        c.insert("torch_dtype".into(), json!("float16"));
    });
    assert_fails_with(&dir, &["`dtype`", "torch_dtype"]);
}

#[test]
fn lm_head_with_tied_embeddings_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = good_copy(tmp.path(), "tiny-qwen2", "tied-with-head");
    rewrite(&dir.join("model.safetensors"), |t| {
        let embed = t
            .iter()
            .find(|t| t.0 == "model.embed_tokens.weight")
            .unwrap()
            .clone();
        t.push(("lm_head.weight".into(), embed.1, embed.2, embed.3));
    });
    assert_fails_with(&dir, &["lm_head.weight", "tie_word_embeddings is true"]);
}

#[test]
fn qwen2_without_qkv_biases_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = good_copy(tmp.path(), "tiny-qwen2", "no-bias");
    rewrite(&dir.join("model.safetensors"), |t| {
        t.retain(|t| t.0 != "model.layers.0.self_attn.k_proj.bias")
    });
    assert_fails_with(
        &dir,
        &["model.layers.0.self_attn.k_proj.bias", "missing", "Qwen2"],
    );
}

type ConfigMap = serde_json::Map<String, Value>;

#[test]
fn config_problems_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let case = |label: &str, edit: &dyn Fn(&mut ConfigMap), needles: &[&str]| {
        let dir = good_copy(tmp.path(), "tiny-llama", label);
        edit_json(&dir.join("config.json"), edit);
        assert_fails_with(&dir, needles);
    };
    case(
        "no-rope-theta",
        &|c| {
            c.remove("rope_theta");
            c.remove("rope_parameters");
        },
        &["`rope_theta`", "missing"],
    );
    case(
        "string-size",
        &|c| {
            c.insert("hidden_size".into(), json!("64"));
        },
        &["`hidden_size`", "positive integer"],
    );
    case(
        "wrong-model-type",
        &|c| {
            c.insert("model_type".into(), json!("qwen2"));
        },
        &["`model_type`", "llama"],
    );
    case(
        "no-tie",
        &|c| {
            c.remove("tie_word_embeddings");
        },
        &["`tie_word_embeddings`", "missing"],
    );
    case(
        "no-kv-heads",
        &|c| {
            c.remove("num_key_value_heads");
        },
        &["`num_key_value_heads`", "missing"],
    );
    case(
        "eos-out-of-vocab",
        &|c| {
            c.insert("eos_token_id".into(), json!(512));
        },
        &["`eos_token_id`", "vocab_size"],
    );
    case(
        "bad-arch",
        &|c| {
            c.insert("architectures".into(), json!(["GPT2LMHeadModel"]));
        },
        &["`architectures`", "GPT2LMHeadModel"],
    );
    case(
        "bigger-mlp",
        &|c| {
            c.insert("intermediate_size".into(), json!(256));
        },
        &[
            "model.layers.0.mlp.up_proj.weight",
            "[128, 64]",
            "[256, 64]",
        ],
    );
}

#[test]
fn tokenizer_problems_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = good_copy(tmp.path(), "tiny-llama", "eos-mismatch");
    edit_json(&dir.join("tokenizer_config.json"), |c| {
        c.insert("eos_token".into(), json!("<|pad|>"));
    });
    assert_fails_with(&dir, &["eos_token", "generation would not stop"]);
    assert_fails_with(&dir, &["special_tokens_map.json", "eos_token"]);

    let dir = good_copy(tmp.path(), "tiny-llama", "unknown-token");
    edit_json(&dir.join("tokenizer_config.json"), |c| {
        c.insert("bos_token".into(), json!("<s>"));
    });
    assert_fails_with(&dir, &["`bos_token`", "\"<s>\"", "not a token"]);
}

#[test]
fn weight_file_problems_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let source = fixtures_dir().join("tiny-llama");
    let model = Model::load(&source, &dev()).unwrap();
    let dir = tmp.path().join("sharded");
    let options = SaveOptions {
        dtype: DType::F32,
        max_shard_bytes: 100_000,
    };
    model.save_with_tokenizer(&dir, &options, &source).unwrap();
    assert_passes(&dir);
    edit_json(&dir.join("model.safetensors.index.json"), |c| {
        let map = c["weight_map"].as_object_mut().unwrap();
        let first = map["model.embed_tokens.weight"]
            .as_str()
            .unwrap()
            .to_string();
        let other = map
            .values()
            .map(|v| v.as_str().unwrap().to_string())
            .find(|f| *f != first)
            .unwrap();
        map.insert("model.embed_tokens.weight".into(), json!(other));
    });
    // The shard that held it may now be listed for nothing and go unread: either way the
    // problem names the tensor and the weight map.
    assert_fails_with(&dir, &["`model.embed_tokens.weight`", "weight_map"]);

    let dir = good_copy(tmp.path(), "tiny-llama", "no-weights");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert_fails_with(&dir, &["no model.safetensors"]);

    let dir = good_copy(tmp.path(), "tiny-llama", "tf-format");
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<_> = st.tensors();
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "tf".to_string(),
    )]));
    safetensors::serialize_to_file(views, metadata, &file.with_extension("tmp")).unwrap();
    std::fs::rename(file.with_extension("tmp"), &file).unwrap();
    assert_fails_with(&dir, &["__metadata__.format", "\"tf\""]);

    let dir = good_copy(tmp.path(), "tiny-llama", "truncated");
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    assert_fails_with(&dir, &["model.safetensors", "data_offsets"]);
}

// ---- transformers itself (optional) -------------------------------------------------------

/// Logits of the last position of `ids`, computed by the crate.
fn last_logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    let batch = rlhf_model::batch::TokenBatch::left_padded(&[ids], 0).unwrap();
    let (hidden, _) = model.hidden_states(&batch, None, false);
    let [b, t, h] = hidden.dims();
    let logits = model.lm_logits(hidden.slice([0..b, t - 1..t, 0..h]));
    rlhf_model::host::to_vec(logits)
}

/// Saves every causal-LM fixture (f32 and bf16), a fresh model and a reward model with the
/// crate, then runs model/tests/fixtures/check_hf_load.py on each folder: transformers must load
/// it without missing or unexpected weights and compute the crate's logits / scores.
#[test]
#[ignore = "needs Python with torch and transformers: \
            RLHF_PYTHON=/path/to/python cargo test -p rlhf-model --test hf_folder -- --ignored"]
fn transformers_loads_saved_folders() {
    let python = std::env::var("RLHF_PYTHON")
        .expect("set RLHF_PYTHON to a Python with torch and transformers");
    let script = crate_fixtures_dir().join("check_hf_load.py");
    let tmp = tempfile::tempdir().unwrap();
    let tokenizer_texts = ["The quick brown fox", "Once upon a time, the policy model"];
    let mut folders: Vec<(PathBuf, Model, PathBuf, DType)> = Vec::new();
    for source in causal_lm_folders() {
        for dtype in [DType::F32, DType::BF16] {
            let model = Model::load(&source, &dev()).unwrap();
            let out = tmp.path().join(format!(
                "{}-{dtype}",
                source.file_name().unwrap().to_string_lossy()
            ));
            folders.push((out, model, source.clone(), dtype));
        }
    }
    let llama = fixtures_dir().join("tiny-llama");
    // A model trained from scratch: a config the crate made (as the quickstart's), tied.
    let mut fresh = ModelConfig::llama(LlamaDims {
        vocab_size: 512,
        hidden_size: 64,
        intermediate_size: 96,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 1,
        max_position_embeddings: 256,
        tie_word_embeddings: true,
        bos_token_id: 0,
        eos_token_id: 1,
        pad_token_id: 2,
    });
    // Weights large enough that the logits spread (the default 0.02 gives near-uniform ones).
    fresh.raw.insert("initializer_range".into(), json!(0.3));
    folders.push((
        tmp.path().join("fresh"),
        Model::init(&fresh, &dev(), 11),
        llama.clone(),
        DType::F32,
    ));
    folders.push((
        tmp.path().join("reward"),
        Model::load_with_head(&llama, HeadKind::Score, &dev(), 4).unwrap(),
        llama.clone(),
        DType::F32,
    ));
    for (out, model, source, dtype) in folders {
        save(&model, &out, dtype, &source);
        assert_passes(&out);
        // Compute with the weights as stored (bf16 rounding included).
        let model = Model::load(&out, &dev()).unwrap();
        let tokenizer = rlhf_model::Tokenizer::from_dir(&out).unwrap();
        let cases: Vec<Value> = tokenizer_texts
            .iter()
            .map(|text| {
                let ids = tokenizer.encode(text, true).unwrap();
                match model.head() {
                    HeadKind::CausalLm => {
                        json!({"text": text, "logits_last": last_logits(&model, &ids), "ids": ids})
                    }
                    _ => {
                        let score =
                            rlhf_model::host::to_vec(model.sequence_scores(&[&ids]).unwrap());
                        json!({"text": text, "score": score[0], "ids": ids})
                    }
                }
            })
            .collect();
        let kind = if model.head() == HeadKind::CausalLm {
            "causal_lm"
        } else {
            "score"
        };
        let expected = out.with_extension("expected.json");
        std::fs::write(
            &expected,
            json!({"kind": kind, "tolerance": 1e-4, "cases": cases}).to_string(),
        )
        .unwrap();
        let run = std::process::Command::new(&python)
            .arg(&script)
            .arg(&out)
            .arg(&expected)
            .output()
            .expect("python runs");
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(
            run.status.success(),
            "{}: {stdout}\n{}",
            out.display(),
            String::from_utf8_lossy(&run.stderr)
        );
        eprintln!("{}", stdout.trim());
    }
}
