//! Checked against Hugging Face: every model folder of the fixtures (RLHF_FIXTURES_DIR, and the
//! crate's own model/tests/fixtures) must give transformers' logits, log-probs, entropies, greedy
//! ids, scores and token ids.
//!
//! Data-driven: the tests iterate over whatever folders and cases they find, so they run
//! unchanged on any fixture set of the same format. Each test then checks that it covered every
//! folder whose reference.json holds its kind of data, found by listing the folders again without
//! any other filter: a folder skipped by mistake (a config read as the wrong head, a filter that
//! is too strict) fails the test instead of passing it vacuously.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rlhf_model::batch::TokenBatch;
use rlhf_model::host::to_vec;
use rlhf_model::logprobs::rows_to_host;
use rlhf_model::testing::{all_fixture_models, crate_fixtures_dir, fixtures_dir, reference};
use rlhf_model::{
    GenerationParams, GenerationRequest, HeadKind, Model, ModelConfig, SamplingParams, Tokenizer,
    device,
};
use serde_json::Value;

const TOL: f32 = 1e-4;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array, found {v}"))
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array, found {v}"))
        .iter()
        .map(|x| x.as_u64().expect("token id") as u32)
        .collect()
}

fn assert_close(what: &str, ours: &[f32], theirs: &[f32]) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    let (i, diff) = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .enumerate()
        .fold((0, 0.0f32), |m, (i, d)| if d > m.1 { (i, d) } else { m });
    assert!(
        diff <= TOL,
        "{what}: max |ours - reference| = {diff} at index {i} (ours {}, reference {})",
        ours[i],
        theirs[i]
    );
}

/// Every folder with a `reference.json` whose top level has `key` (`cases` for causal LMs,
/// `pairs` for reward models, `tokenizer_check` for all), under both fixture roots.
fn folders_with(key: &str) -> BTreeSet<PathBuf> {
    [fixtures_dir(), crate_fixtures_dir()]
        .iter()
        .flat_map(|root| std::fs::read_dir(root).unwrap().map(|e| e.unwrap().path()))
        .filter(|d| d.join("reference.json").is_file() && reference(d).get(key).is_some())
        .collect()
}

/// Fails unless `tested` is every folder whose reference.json has `key`.
fn assert_covered(test: &str, key: &str, tested: &BTreeSet<PathBuf>) {
    let expected = folders_with(key);
    assert!(!expected.is_empty(), "{test}: no fixture has `{key}`");
    assert_eq!(
        tested, &expected,
        "{test}: the folders tested differ from the folders whose reference.json has `{key}`"
    );
}

fn models_with_head(head: HeadKind) -> Vec<PathBuf> {
    all_fixture_models()
        .into_iter()
        .filter(|d| {
            ModelConfig::from_path(d)
                .expect("config.json")
                .architecture
                .head
                == head
        })
        .collect()
}

fn load(dir: &Path) -> Model {
    Model::load(dir, &device::inference_device().unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// Logits of the last column of a hand-built batch.
fn last_logits(model: &Model, batch: &TokenBatch) -> Vec<Vec<f32>> {
    let (hidden, _) = model.hidden_states(batch, None, false);
    let [b, t, h] = hidden.dims();
    let logits = model.lm_logits(hidden.slice([0..b, t - 1..t, 0..h]));
    let v = model.config.vocab_size;
    rows_to_host(logits.reshape([b, v]), &vec![v; b])
}

#[test]
fn causal_lm_logits_logprobs_entropy_match_transformers() {
    let dirs = models_with_head(HeadKind::CausalLm);
    let mut tested = BTreeSet::new();
    for dir in dirs {
        tested.insert(dir.clone());
        let model = load(&dir);
        let reference = reference(&dir);
        let cases = reference["cases"].as_array().expect("cases");
        assert!(!cases.is_empty());
        for case in cases {
            let name = format!(
                "{} {:?}",
                dir.display(),
                case["prompt"].as_str().unwrap_or("")
            );
            let prompt = ids(&case["prompt_ids"]);
            let completion = ids(&case["continuation_ids"]);

            let batch = TokenBatch::left_padded(&[&prompt], 0).unwrap();
            let logits = last_logits(&model, &batch);
            assert_close(
                &format!("{name}: logits_last"),
                &logits[0],
                &floats(&case["logits_last"]),
            );

            for (field, temperature) in [
                ("continuation_logprobs", 1.0),
                ("continuation_logprobs_temp0.7", 0.7),
            ] {
                let out = model
                    .completion_logprobs(&[(&prompt, &completion)], temperature)
                    .unwrap();
                let lens = out.layout.completion_lens.clone();
                let ours = rows_to_host(out.logprobs, &lens);
                assert_close(&format!("{name}: {field}"), &ours[0], &floats(&case[field]));
                if temperature == 1.0 {
                    let entropy = rows_to_host(out.entropy, &lens);
                    assert_close(
                        &format!("{name}: entropy"),
                        &entropy[0],
                        &floats(&case["continuation_entropy"]),
                    );
                }
            }
        }
    }
    assert_covered("logits", "cases", &tested);
}

#[test]
fn batched_logprobs_equal_one_at_a_time() {
    let mut tested = BTreeSet::new();
    for dir in models_with_head(HeadKind::CausalLm) {
        tested.insert(dir.clone());
        let model = load(&dir);
        let reference = reference(&dir);
        let cases = reference["cases"].as_array().unwrap();
        let data: Vec<(Vec<u32>, Vec<u32>)> = cases
            .iter()
            .map(|c| (ids(&c["prompt_ids"]), ids(&c["continuation_ids"])))
            .collect();
        // Uneven completions too: cut each continuation to a different length.
        let pairs: Vec<(&[u32], &[u32])> = data
            .iter()
            .enumerate()
            .map(|(i, (p, c))| (p.as_slice(), &c[..c.len() - i.min(c.len() - 1)]))
            .collect();
        let batched = model.completion_logprobs(&pairs, 1.0).unwrap();
        let lens = batched.layout.completion_lens.clone();
        let batched = rows_to_host(batched.logprobs, &lens);
        for (i, pair) in pairs.iter().enumerate() {
            let alone = model.completion_logprobs(&[*pair], 1.0).unwrap();
            let alone = rows_to_host(alone.logprobs, &[pair.1.len()]);
            assert_close(
                &format!("{} pair {i}", dir.display()),
                &batched[i],
                &alone[0],
            );
        }
    }
    assert_covered("batched log-probs", "cases", &tested);
}

#[test]
fn greedy_generation_matches_transformers() {
    let mut tested = BTreeSet::new();
    for dir in models_with_head(HeadKind::CausalLm) {
        tested.insert(dir.clone());
        let model = load(&dir);
        let reference = reference(&dir);
        let cases = reference["cases"].as_array().unwrap();
        let requests: Vec<GenerationRequest> = cases
            .iter()
            .map(|c| GenerationRequest {
                prompt: ids(&c["prompt_ids"]),
                params: GenerationParams {
                    sampling: SamplingParams::greedy(),
                    max_new_tokens: ids(&c["greedy_ids"]).len(),
                    ignore_eos: true,
                    ..Default::default()
                },
            })
            .collect();
        // All prompts in one batch (different lengths, left-padded, KV cache) ...
        let batched = model.generate(&requests, None).unwrap();
        for (case, (req, out)) in cases.iter().zip(requests.iter().zip(&batched)) {
            assert_eq!(
                out.tokens,
                ids(&case["greedy_ids"]),
                "{}: batched greedy ids",
                dir.display()
            );
            // ... and each alone.
            let alone = model.generate(std::slice::from_ref(req), None).unwrap();
            assert_eq!(
                alone[0].tokens,
                out.tokens,
                "{}: greedy alone vs batched",
                dir.display()
            );
        }
    }
    assert_covered("greedy", "cases", &tested);
}

#[test]
fn left_padded_batch_equals_unpadded_prompts() {
    let mut tested = BTreeSet::new();
    for dir in models_with_head(HeadKind::CausalLm) {
        tested.insert(dir.clone());
        let model = load(&dir);
        let reference = reference(&dir);
        let lp = &reference["left_padded_batch"];
        let rows: Vec<Vec<u32>> = lp["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        let masks: Vec<Vec<u32>> = lp["attention_mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        let positions: Vec<Vec<u32>> = lp["position_ids_from_mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        let batch = TokenBatch {
            batch: rows.len(),
            seq: rows[0].len(),
            tokens: rows.concat(),
            positions: positions.concat().into_iter().map(|p| p as usize).collect(),
            valid: masks.concat().into_iter().map(|m| m == 1).collect(),
        };
        let padded = last_logits(&model, &batch);
        let cases = reference["cases"].as_array().unwrap();
        for (i, case) in cases.iter().enumerate() {
            assert_close(
                &format!("{}: left-padded row {i}", dir.display()),
                &padded[i],
                &floats(&case["logits_last"]),
            );
        }
    }
    assert_covered("left padding", "left_padded_batch", &tested);
}

#[test]
fn reward_model_scores_match_transformers() {
    let dirs = models_with_head(HeadKind::Score);
    let mut tested = BTreeSet::new();
    for dir in dirs {
        tested.insert(dir.clone());
        let model = load(&dir);
        let reference = reference(&dir);
        let pairs = reference["pairs"].as_array().expect("pairs");
        let seqs: Vec<Vec<u32>> = pairs.iter().map(|p| ids(&p["input_ids"])).collect();
        // One at a time, and all together.
        for (p, seq) in pairs.iter().zip(&seqs) {
            let s = to_vec(model.sequence_scores(&[seq]).unwrap());
            let want = p["score"].as_f64().unwrap() as f32;
            assert!(
                (s[0] - want).abs() <= TOL,
                "{}: score {} vs {want}",
                dir.display(),
                s[0]
            );
        }
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let all = to_vec(model.sequence_scores(&refs).unwrap());
        let want: Vec<f32> = pairs
            .iter()
            .map(|p| p["score"].as_f64().unwrap() as f32)
            .collect();
        assert_close(&format!("{}: batched scores", dir.display()), &all, &want);

        // The head at every position of the first pair (causality: each prefix's score).
        let (batch, _) = TokenBatch::prompt_completion(&[(&seqs[0], &[])], 0).unwrap();
        let (hidden, _) = model.hidden_states(&batch, None, false);
        let every = to_vec(model.score_head(hidden));
        assert_close(
            "scores_all_positions",
            &every,
            &floats(&pairs[0]["scores_all_positions"]),
        );

        // The fixture's right-padded batch, laid out exactly as transformers saw it.
        let rp = &reference["right_padded_batch"];
        let rows: Vec<Vec<u32>> = rp["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        let masks: Vec<Vec<u32>> = rp["attention_mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        let width = rows[0].len();
        let batch = TokenBatch {
            batch: rows.len(),
            seq: width,
            tokens: rows.concat(),
            positions: (0..rows.len()).flat_map(|_| 0..width).collect(),
            valid: masks.concat().into_iter().map(|m| m == 1).collect(),
        };
        let (hidden, _) = model.hidden_states(&batch, None, false);
        let every = to_vec(model.score_head(hidden));
        let index = ids(&rp["score_index"]);
        let read: Vec<f32> = index
            .iter()
            .enumerate()
            .map(|(r, &i)| every[r * width + i as usize])
            .collect();
        assert_close("right-padded batch", &read, &floats(&rp["scores"]));
    }
    assert_covered("reward scores", "pairs", &tested);
}

#[test]
fn tokenizers_match_transformers() {
    let mut tested = BTreeSet::new();
    for dir in all_fixture_models() {
        tested.insert(dir.clone());
        let tokenizer = Tokenizer::from_dir(&dir).unwrap();
        let reference = reference(&dir);
        let strings = reference["tokenizer_check"]["strings"]
            .as_array()
            .expect("tokenizer_check");
        assert!(!strings.is_empty());
        for s in strings {
            let text = s["text"].as_str().unwrap();
            let got = tokenizer.encode(text, true).unwrap();
            assert_eq!(got, ids(&s["ids"]), "{}: {text:?}", dir.display());
            if let Some(decoded) = s["decoded"].as_str() {
                assert_eq!(
                    tokenizer.decode(&got, false).unwrap(),
                    decoded,
                    "{}: decode",
                    dir.display()
                );
            }
        }
        for case in reference["cases"].as_array().into_iter().flatten() {
            let prompt = tokenizer
                .encode(case["prompt"].as_str().unwrap(), true)
                .unwrap();
            assert_eq!(prompt, ids(&case["prompt_ids"]), "{}", dir.display());
            if let Some(decoded) = case["decode_check"].as_str() {
                assert_eq!(
                    tokenizer.decode(&prompt, true).unwrap(),
                    decoded,
                    "{}: decode without special tokens",
                    dir.display()
                );
            }
            let cont = tokenizer
                .encode(case["continuation"].as_str().unwrap(), false)
                .unwrap();
            assert_eq!(cont, ids(&case["continuation_ids"]));
        }
        for pair in reference["pairs"].as_array().into_iter().flatten() {
            let got = tokenizer
                .encode(pair["text"].as_str().unwrap(), true)
                .unwrap();
            assert_eq!(got, ids(&pair["input_ids"]), "{}: pair text", dir.display());
        }
    }
    assert_covered("tokenizers", "tokenizer_check", &tested);
}

/// The crate's own fixtures hold the Mistral checkpoint (RLHF_FIXTURES_DIR may point at any
/// fixture set, but Mistral is compared with transformers only through this one).
#[test]
fn crate_fixtures_hold_a_mistral_checkpoint() {
    let archs: BTreeSet<String> = all_fixture_models()
        .iter()
        .filter(|d| d.starts_with(crate_fixtures_dir()))
        .map(|d| ModelConfig::from_path(d).unwrap().architecture.name())
        .collect();
    assert!(
        archs.contains("MistralForCausalLM"),
        "no MistralForCausalLM in {}: {archs:?}",
        crate_fixtures_dir().display()
    );
}
