//! Generation behaviour on the fixture model: seeds, batching, stop conditions, log-probs.

use rlhf_model::logprobs::rows_to_host;
use rlhf_model::testing::fixtures_dir;
use rlhf_model::{
    FinishReason, GenerationParams, GenerationRequest, Model, SamplingParams, Tokenizer, device,
};

fn fixture() -> (Model, Tokenizer) {
    let dir = fixtures_dir().join("tiny-llama");
    let model = Model::load(&dir, &device::inference_device().unwrap()).unwrap();
    (model, Tokenizer::from_dir(&dir).unwrap())
}

fn request(tok: &Tokenizer, text: &str, params: GenerationParams) -> GenerationRequest {
    GenerationRequest {
        prompt: tok.encode(text, true).unwrap(),
        params,
    }
}

fn sampled(seed: u64, max_new_tokens: usize) -> GenerationParams {
    GenerationParams {
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: 50,
            top_p: 0.95,
        },
        max_new_tokens,
        seed,
        ignore_eos: true,
        ..Default::default()
    }
}

#[test]
fn same_seed_same_tokens_alone_or_in_a_batch() {
    let (model, tok) = fixture();
    let target = request(&tok, "Once upon a time", sampled(42, 24));
    let alone = model.generate(std::slice::from_ref(&target), None).unwrap();
    let again = model.generate(std::slice::from_ref(&target), None).unwrap();
    assert_eq!(alone, again, "same seed, same tokens");

    let others = [
        request(&tok, "A", sampled(1, 5)),
        request(
            &tok,
            "A much longer prompt that pads the target on the left",
            sampled(2, 30),
        ),
    ];
    let batch = vec![others[0].clone(), target.clone(), others[1].clone()];
    let together = model.generate(&batch, None).unwrap();
    assert_eq!(
        together[1].tokens, alone[0].tokens,
        "batch neighbours change nothing"
    );

    let other_seed = request(&tok, "Once upon a time", sampled(43, 24));
    let different = model.generate(&[other_seed], None).unwrap();
    assert_ne!(
        different[0].tokens, alone[0].tokens,
        "another seed samples differently"
    );
}

#[test]
fn sampled_logprobs_agree_with_a_forward_pass() {
    let (model, tok) = fixture();
    let params = GenerationParams {
        sampling: SamplingParams {
            temperature: 0.7,
            top_k: 0,
            top_p: 1.0,
        },
        ..sampled(5, 16)
    };
    let req = request(&tok, "The quick brown fox", params);
    let out = model.generate(std::slice::from_ref(&req), None).unwrap();
    let scored = model
        .completion_logprobs(&[(&req.prompt, &out[0].tokens)], 0.7)
        .unwrap();
    let recomputed = rows_to_host(scored.logprobs, &[out[0].tokens.len()]);
    for (a, b) in out[0].logprobs.iter().zip(&recomputed[0]) {
        assert!(
            (a - b).abs() < 1e-4,
            "behaviour log-prob {a} vs forward pass {b}"
        );
    }
}

#[test]
fn finish_reasons_and_stop_conditions() {
    let (model, tok) = fixture();
    let greedy = |max_new_tokens| GenerationParams {
        sampling: SamplingParams::greedy(),
        max_new_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    let base = model
        .generate(&[request(&tok, "Hello world", greedy(12))], None)
        .unwrap()
        .remove(0);
    assert_eq!(base.tokens.len(), 12);
    assert_eq!(base.finish_reason, FinishReason::Length);

    // Stop on a token id: the fourth greedy token.
    let stop_id = base.tokens[3];
    let first = base.tokens.iter().position(|&t| t == stop_id).unwrap();
    let params = GenerationParams {
        stop_token_ids: vec![stop_id],
        ..greedy(12)
    };
    let out = model
        .generate(&[request(&tok, "Hello world", params)], None)
        .unwrap()
        .remove(0);
    assert_eq!(out.tokens, base.tokens[..=first]);
    assert_eq!(out.finish_reason, FinishReason::Stop);

    // Stop on a string: the decoded text of the first few tokens.
    let text = tok.decode(&base.tokens[..5], true).unwrap();
    let needle: String = text
        .chars()
        .rev()
        .take(2)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let params = GenerationParams {
        stop_strings: vec![needle.clone()],
        ..greedy(12)
    };
    let out = model
        .generate(&[request(&tok, "Hello world", params.clone())], Some(&tok))
        .unwrap()
        .remove(0);
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert!(out.tokens.len() <= 5);
    assert!(tok.decode(&out.tokens, true).unwrap().contains(&needle));
    // Without a tokenizer, stop strings are an error, not silently ignored.
    let err = model
        .generate(&[request(&tok, "Hello world", params)], None)
        .unwrap_err();
    assert!(err.to_string().contains("tokenizer"), "{err}");
}

#[test]
fn invalid_requests_name_the_request() {
    let (model, tok) = fixture();
    let ok = request(&tok, "hi", GenerationParams::default());
    let empty = GenerationRequest {
        prompt: vec![],
        params: GenerationParams::default(),
    };
    let err = model
        .generate(&[ok.clone(), empty], None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("request 1") && err.contains("empty"), "{err}");
    let bad_id = GenerationRequest {
        prompt: vec![0, 100_000],
        params: GenerationParams::default(),
    };
    let err = model.generate(&[bad_id], None).unwrap_err().to_string();
    assert!(
        err.contains("100000") && err.contains("vocabulary"),
        "{err}"
    );
    let too_long = GenerationRequest {
        prompt: vec![5; 600],
        params: GenerationParams::default(),
    };
    let err = model.generate(&[too_long], None).unwrap_err().to_string();
    assert!(err.contains("context length"), "{err}");
}

/// Logits of the last position of row 0, for a batch of `b` rows of `len` tokens.
fn first_row_logits(model: &Model, len: usize, b: usize) -> Vec<u32> {
    let rows: Vec<Vec<u32>> = (0..b)
        .map(|k| {
            (0..len as u32)
                .map(|i| 5 + (i * 7 + k as u32 * 13) % 400)
                .collect()
        })
        .collect();
    let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let batch = rlhf_model::batch::TokenBatch::left_padded(&refs, 2).unwrap();
    let (h, _) = model.hidden_states(&batch, None, false);
    let [bb, t, hh] = h.dims();
    let v = model.config.vocab_size;
    rlhf_model::host::to_vec(model.lm_logits(h.slice([0..bb, t - 1..t, 0..hh])))[..v]
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn a_rows_logits_do_not_depend_on_the_batch_bitwise() {
    let (mut fixture, _) = fixture();
    fixture.batch_invariant = true;
    let mut wider = Model::init(
        &rlhf_model::ModelConfig::llama(rlhf_model::LlamaDims {
            vocab_size: 2048,
            hidden_size: 256,
            intermediate_size: 688,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 4,
            max_position_embeddings: 128,
            tie_word_embeddings: false,
            bos_token_id: 0,
            eos_token_id: 1,
            pad_token_id: 2,
        }),
        &device::inference_device().unwrap(),
        3,
    );
    wider.batch_invariant = true;
    for model in [&fixture, &wider] {
        for len in [1, 3, 8] {
            let alone = first_row_logits(model, len, 1);
            for b in [2, 3, 5, 8, 9, 17, 40] {
                assert!(
                    first_row_logits(model, len, b) == alone,
                    "hidden {}: row 0 of {b} rows of {len} tokens differs from the row alone",
                    model.config.hidden_size
                );
            }
        }
    }
}

#[test]
fn sequences_joining_a_running_batch_generate_what_they_generate_alone() {
    let (mut model, tok) = fixture();
    model.batch_invariant = true;
    let texts = [
        "A",
        "The quick brown fox",
        "Once upon a time there was",
        "Hello",
        "tabs\tand\nnewlines",
        "x y z",
    ];
    let requests: Vec<GenerationRequest> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| request(&tok, t, sampled(100 + i as u64, 6 + 3 * i)))
        .collect();
    let alone: Vec<rlhf_model::Generation> = requests
        .iter()
        .map(|r| {
            model
                .generate(std::slice::from_ref(r), None)
                .unwrap()
                .remove(0)
        })
        .collect();

    let mut batch = rlhf_model::DecodeBatch::new();
    let mut got: Vec<Option<rlhf_model::Generation>> = vec![None; requests.len()];
    let mut next = 0;
    let mut steps = 0;
    while got.iter().any(Option::is_none) {
        // Two new sequences join every third step, while others are mid-way.
        if steps % 3 == 0 && next < requests.len() {
            let joining: Vec<(u64, GenerationRequest)> = (next..(next + 2).min(requests.len()))
                .map(|i| (i as u64, requests[i].clone()))
                .collect();
            next += joining.len();
            batch.admit(&model, joining, None).unwrap();
        }
        for f in batch.step(&model, None).unwrap() {
            got[f.id as usize] = Some(f.generation);
        }
        steps += 1;
        assert!(steps < 200, "generation did not finish");
    }
    for (i, (a, b)) in alone.iter().zip(&got).enumerate() {
        // Tokens and log-probs, bit for bit.
        assert_eq!(
            Some(a),
            b.as_ref(),
            "sequence {i} changed when it shared a running batch"
        );
    }
    assert_eq!(batch.cache_tokens(), 0, "the cache empties with the batch");
}
