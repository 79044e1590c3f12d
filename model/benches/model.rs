//! Model throughput on the compute device (`RLHF_DEVICE`, default flex CPU).
//!
//! `cargo bench -p rlhf-model --bench model [-- --quick] [-- --only NAME]`
//!
//! For each model (the tiny-llama fixture and a ~25M-parameter Llama), prints:
//! forward tokens/s (no grad), forward+backward tokens/s (autodiff, mean log-prob loss), and
//! generation tokens/s with the KV cache at batch 1 and 32. Each number is the median of
//! several timed repetitions after a warm-up. Numbers are reported, never asserted.

use std::time::Instant;

use rlhf_model::testing::fixtures_dir;
use rlhf_model::{
    GenerationParams, GenerationRequest, LlamaDims, Model, ModelConfig, SamplingParams, device,
};

struct Workload {
    name: &'static str,
    model: Model,
    train_model: Model,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Median seconds of `f` over `reps` runs after one warm-up run.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn synthetic_pairs(
    vocab: usize,
    batch: usize,
    prompt: usize,
    completion: usize,
) -> Vec<(Vec<u32>, Vec<u32>)> {
    (0..batch)
        .map(|b| {
            let tok = |i: usize| (3 + (b * 7919 + i * 104729) % (vocab - 3)) as u32;
            (
                (0..prompt).map(tok).collect(),
                (prompt..prompt + completion).map(tok).collect(),
            )
        })
        .collect()
}

fn bench(w: &Workload, quick: bool) {
    let reps = if quick { 2 } else { 5 };
    let vocab = w.model.config.vocab_size;
    let (batch, prompt, completion) = (8, 64, 64);
    let data = synthetic_pairs(vocab, batch, prompt, completion);
    let pairs: Vec<(&[u32], &[u32])> = data
        .iter()
        .map(|(p, c)| (p.as_slice(), c.as_slice()))
        .collect();
    let tokens = (batch * (prompt + completion)) as f64;

    let fwd = time(reps, || {
        let out = w.model.completion_logprobs(&pairs, 1.0).unwrap();
        let _ = out.logprobs.into_data();
    });
    let fwd_bwd = time(reps, || {
        let out = w.train_model.completion_logprobs(&pairs, 1.0).unwrap();
        let loss = out.logprobs.sum().neg();
        let _grads = loss.backward();
    });
    println!(
        "{:<12} forward           {:>10.0} tokens/s  ({batch}x{} tokens, {:.3} s)",
        w.name,
        tokens / fwd,
        prompt + completion,
        fwd
    );
    println!(
        "{:<12} forward+backward  {:>10.0} tokens/s  ({:.3} s)",
        w.name,
        tokens / fwd_bwd,
        fwd_bwd
    );
    for gen_batch in [1usize, 32] {
        let new_tokens = if quick { 16 } else { 64 };
        let prompts = synthetic_pairs(vocab, gen_batch, 16, 0);
        let requests: Vec<GenerationRequest> = prompts
            .into_iter()
            .enumerate()
            .map(|(i, (p, _))| GenerationRequest {
                prompt: p,
                params: GenerationParams {
                    sampling: SamplingParams::default(),
                    max_new_tokens: new_tokens,
                    seed: i as u64,
                    ignore_eos: true,
                    ..Default::default()
                },
            })
            .collect();
        let secs = time(reps, || {
            let out = w.model.generate(&requests, None).unwrap();
            assert!(out.iter().all(|g| g.tokens.len() == new_tokens));
        });
        println!(
            "{:<12} generate batch {:<3} {:>9.0} tokens/s  ({} new tokens each, {:.3} s)",
            w.name,
            gen_batch,
            (gen_batch * new_tokens) as f64 / secs,
            new_tokens,
            secs
        );
    }
}

fn llama_25m() -> ModelConfig {
    ModelConfig::llama(LlamaDims {
        vocab_size: 32000,
        hidden_size: 512,
        intermediate_size: 1376,
        num_layers: 8,
        num_heads: 8,
        num_kv_heads: 8,
        max_position_embeddings: 2048,
        tie_word_embeddings: true,
        bos_token_id: 1,
        eos_token_id: 2,
        pad_token_id: 0,
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    let backend = device::Backend::from_env().expect("RLHF_DEVICE");
    let dev = backend.device().expect("device");
    let train_dev = dev.clone().autodiff();
    println!(
        "device: {backend:?}, threads: {}",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    let fixture = fixtures_dir().join("tiny-llama");
    let mut workloads = Vec::new();
    if only.as_deref().is_none_or(|o| o == "tiny-llama") {
        workloads.push(Workload {
            name: "tiny-llama",
            model: Model::load(&fixture, &dev).unwrap(),
            train_model: Model::load(&fixture, &train_dev).unwrap(),
        });
    }
    if only.as_deref().is_none_or(|o| o == "llama-25m") {
        let config = llama_25m();
        println!(
            "llama-25m: {:.1}M parameters ({:.1}M without embeddings)",
            config.num_parameters() as f64 / 1e6,
            (config.num_parameters() - config.vocab_size * config.hidden_size) as f64 / 1e6
        );
        workloads.push(Workload {
            name: "llama-25m",
            model: Model::init(&config, &dev, 0),
            train_model: Model::init(&config, &train_dev, 0),
        });
    }
    for w in &workloads {
        bench(w, quick);
    }
}
