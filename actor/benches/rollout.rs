//! Rollout throughput: continuous batching vs a static batch, and weight-update bandwidth.
//!
//! `cargo bench --workspace --bench rollout [-- --quick]`
//!
//! P prompts × 8 samples (P = 1, 8, 64), each sample with its own max_new_tokens between 8 and
//! 64 (ignore EOS), at most 64 sequences decoding together. Continuous batching: the actor's
//! engine admits a waiting sequence as soon as a slot frees. Static: batches of 64 sequences,
//! each running until its longest sequence ends before the next batch starts. Then a full
//! weight update of the ~25M model through `UpdateWeights` over loopback gRPC, in MB/s.
//! Reported, never asserted.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use rlhf_actor::engine::{Command, Job, Limits, RequestHandle, start};
use rlhf_model::testing::fixtures_dir;
use rlhf_model::{
    DType, GenerationParams, GenerationRequest, LlamaDims, Model, ModelConfig, SamplingParams,
    Tokenizer, device,
};
use rlhf_proto::v1;
use rlhf_proto::weights::{WireTensor, to_chunks};

const SLOTS: usize = 64;

fn workload(prompts: usize, vocab: usize) -> Vec<GenerationRequest> {
    (0..prompts)
        .flat_map(|p| {
            (0..8).map(move |j| {
                let prompt: Vec<u32> = (0..4 + p % 13)
                    .map(|i| (3 + (p * 31 + i * 7) % (vocab - 3)) as u32)
                    .collect();
                GenerationRequest {
                    prompt,
                    params: GenerationParams {
                        sampling: SamplingParams::default(),
                        max_new_tokens: 8 + (p * 8 + j) * 37 % 57,
                        seed: (p * 8 + j) as u64,
                        ignore_eos: true,
                        ..Default::default()
                    },
                }
            })
        })
        .collect()
}

fn continuous(
    model: &Model,
    requests: &[GenerationRequest],
    runtime: &tokio::runtime::Runtime,
) -> (f64, usize) {
    let mut m = model.clone();
    m.batch_invariant = true;
    let engine = start(
        m,
        None,
        Limits {
            max_sequences: SLOTS,
            max_kv_tokens: usize::MAX,
        },
        0,
    );
    let started = Instant::now();
    let (out, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handle = Arc::new(RequestHandle {
        min_version: 0,
        out,
        cancelled: AtomicBool::new(false),
    });
    let jobs = requests
        .iter()
        .enumerate()
        .map(|(i, r)| Job {
            request: handle.clone(),
            sample_index: i as u32,
            prompt: r.prompt.clone(),
            params: r.params.clone(),
        })
        .collect();
    engine.commands.send(Command::Enqueue(jobs)).unwrap();
    let tokens = runtime.block_on(async {
        let mut tokens = 0;
        for _ in 0..requests.len() {
            tokens += rx.recv().await.unwrap().unwrap().generation.tokens.len();
        }
        tokens
    });
    (started.elapsed().as_secs_f64(), tokens)
}

fn static_batches(model: &Model, requests: &[GenerationRequest]) -> (f64, usize) {
    let mut m = model.clone();
    m.batch_invariant = true;
    let started = Instant::now();
    let mut tokens = 0;
    for chunk in requests.chunks(SLOTS) {
        tokens += m
            .generate(chunk, None)
            .unwrap()
            .iter()
            .map(|g| g.tokens.len())
            .sum::<usize>();
    }
    (started.elapsed().as_secs_f64(), tokens)
}

fn llama_3m() -> ModelConfig {
    ModelConfig::llama(LlamaDims {
        vocab_size: 2048,
        hidden_size: 256,
        intermediate_size: 688,
        num_layers: 4,
        num_heads: 4,
        num_kv_heads: 4,
        max_position_embeddings: 512,
        tie_word_embeddings: true,
        bos_token_id: 0,
        eos_token_id: 1,
        pad_token_id: 2,
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let arg = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let only_model = arg("--model");
    let only_prompts: Option<usize> = arg("--prompts").map(|p| p.parse().expect("--prompts N"));
    let skip_update = args.iter().any(|a| a == "--no-update");
    let dev = device::inference_device().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let models = [
        (
            "tiny-llama",
            Model::load(&fixtures_dir().join("tiny-llama"), &dev).unwrap(),
        ),
        ("llama-3m", Model::init(&llama_3m(), &dev, 0)),
    ];
    println!(
        "{:<12} {:>8} {:>10} {:>18} {:>18} {:>8}",
        "model", "prompts", "sequences", "continuous tok/s", "static tok/s", "ratio"
    );
    for (name, model) in &models {
        if only_model.as_deref().is_some_and(|m| m != *name) {
            continue;
        }
        for prompts in [1usize, 8, 64] {
            if (quick && prompts == 64) || only_prompts.is_some_and(|p| p != prompts) {
                continue;
            }
            let requests = workload(prompts, model.config.vocab_size);
            let (c_secs, c_tokens) = continuous(model, &requests, &runtime);
            let (s_secs, s_tokens) = static_batches(model, &requests);
            assert_eq!(c_tokens, s_tokens);
            let (c, s) = (c_tokens as f64 / c_secs, s_tokens as f64 / s_secs);
            println!(
                "{name:<12} {prompts:>8} {:>10} {c:>18.0} {s:>18.0} {:>8.2}",
                requests.len(),
                c / s
            );
        }
    }

    if skip_update {
        return;
    }
    // Weight updates of the 25M model over loopback gRPC.
    let config = ModelConfig::llama(LlamaDims {
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
    });
    let model = Model::init(&config, &dev, 0);
    let tensors = model.named_tensors();
    let tmp = tempfile::tempdir().unwrap();
    model.save(tmp.path(), &Default::default()).unwrap();
    rlhf_model::tokenizer::copy_tokenizer_files(&fixtures_dir().join("tiny-llama"), tmp.path())
        .unwrap();
    let tokenizer = Tokenizer::from_dir(tmp.path()).unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let engine = start(model.clone(), None, Limits { max_sequences: 8, max_kv_tokens: 1 << 20 }, 0);
        let actor = rlhf_actor::service::Actor::new(engine, config.clone(), tokenizer, tmp.path().to_path_buf(), 8, rlhf_actor::metrics::Metrics::new());
        tokio::spawn(rlhf_actor::service::serve(actor, listener, std::future::pending()));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut client = rlhf_proto::client::actor(&addr, Default::default()).unwrap();
        for (dtype, wire) in [(DType::F32, v1::DType::F32), (DType::BF16, v1::DType::Bf16)] {
            let wire_tensors: Vec<WireTensor> = tensors
                .iter()
                .map(|t| WireTensor {
                    name: t.name.clone(),
                    dtype: wire,
                    shape: t.shape.iter().map(|&d| d as u64).collect(),
                    data: rlhf_model::dtype::encode(dtype, &t.values),
                })
                .collect();
            let mb = wire_tensors.iter().map(|t| t.data.len()).sum::<usize>() as f64 / 1e6;
            let mut best = f64::MAX;
            for version in 1..=3u64 {
                let chunks = to_chunks(&wire_tensors, version, 1 << 20);
                let started = Instant::now();
                client.update_weights(tokio_stream::iter(chunks)).await.unwrap();
                best = best.min(started.elapsed().as_secs_f64());
            }
            println!("weight update, llama-25m, {dtype}: {mb:.0} MB in {best:.3} s = {:.0} MB/s (chunking, gRPC, checksum, checks, swap)", mb / best);
        }
    });
}
