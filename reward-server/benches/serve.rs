//! Reward-server throughput and latency, dynamic batching on vs off.
//!
//! `cargo bench --workspace --bench serve [-- --seconds S]`
//!
//! Two reward models are served in-process on loopback: a ~25M-parameter one (hidden 512,
//! 8 layers, vocab 32000, random weights: speed does not depend on the values) and the tiny
//! fixture (0.1M). 1, 8 and 64 concurrent clients each send one-sample requests (about 20
//! tokens) back to back for S seconds (default 6). Prints samples/s and p50/p99 request latency.
//! Reported, never asserted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rlhf_model::testing::fixtures_dir;
use rlhf_model::{HeadKind, LlamaDims, Model, ModelConfig, SaveOptions, device};
use rlhf_proto::v1;
use rlhf_reward::RewardConfig;

fn reward_model(dir: &std::path::Path) {
    let config = ModelConfig::llama(LlamaDims {
        vocab_size: 32000,
        hidden_size: 512,
        intermediate_size: 1376,
        num_layers: 8,
        num_heads: 8,
        num_kv_heads: 8,
        max_position_embeddings: 2048,
        tie_word_embeddings: false,
        bos_token_id: 0,
        eos_token_id: 1,
        pad_token_id: 2,
    })
    .with_head(HeadKind::Score);
    let model = Model::init(&config, &device::inference_device().unwrap(), 0);
    model.save(dir, &SaveOptions::default()).unwrap();
    rlhf_model::tokenizer::copy_tokenizer_files(&fixtures_dir().join("tiny-llama"), dir).unwrap();
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

async fn run(addr: String, clients: usize, seconds: f64) -> (f64, f64, f64) {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let addr = addr.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = rlhf_proto::client::reward(&addr, Default::default()).unwrap();
            let mut latencies = Vec::new();
            let mut i = 0;
            while Instant::now() < until {
                let sample = v1::Sample {
                    prompt: Some(v1::sample::Prompt::PromptText(format!(
                        "Client {c} asks question {i}:"
                    ))),
                    completion: Some(v1::sample::Completion::CompletionText(
                        " a short answer".into(),
                    )),
                    metadata: Default::default(),
                };
                let started = Instant::now();
                client
                    .score(v1::ScoreRequest {
                        samples: vec![sample],
                    })
                    .await
                    .unwrap();
                latencies.push(started.elapsed().as_secs_f64());
                i += 1;
            }
            latencies
        }));
    }
    let started = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    (
        all.len() as f64 / elapsed,
        percentile(&all, 0.5),
        percentile(&all, 0.99),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds: f64 = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .map_or(6.0, |s| s.parse().expect("--seconds N"));
    let tmp = tempfile::tempdir().unwrap();
    let big = tmp.path().join("rm-25m");
    reward_model(&big);
    let tiny = fixtures_dir().join("tiny-llama-rm");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "{:<10} {:<10} {:>8} {:>12} {:>10} {:>10}",
        "model", "batching", "clients", "samples/s", "p50 ms", "p99 ms"
    );
    for (name, model_dir) in [("rm-25m", &big), ("tiny-rm", &tiny)] {
        for batching in ["on", "off"] {
            let batch = if batching == "on" {
                "max_batch_size = 64\nmax_wait_ms = 0"
            } else {
                "max_batch_size = 1\nmax_wait_ms = 0"
            };
            let text = format!(
                "[batching]\n{batch}\nqueue_capacity = 1024\n[[objective]]\nname = \"rm\"\nkind = \"model\"\nmodel = \"{}\"\n",
                model_dir.display()
            );
            let config = RewardConfig::from_toml(&text, &tmp.path().join("bench.toml")).unwrap();
            let scorer = Arc::new(
                rlhf_reward::Scorer::build(&config, rlhf_reward::metrics::Metrics::new()).unwrap(),
            );
            for clients in [1, 8, 64] {
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                let (rate, p50, p99) = runtime.block_on(async {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                    let addr = format!("http://{}", listener.local_addr().unwrap());
                    let server = tokio::spawn(rlhf_reward::server::serve(
                        scorer.clone(),
                        Duration::from_secs(120),
                        listener,
                        async {
                            let _ = rx.await;
                        },
                    ));
                    let result = run(addr, clients, seconds).await;
                    let _ = tx.send(());
                    let _ = server.await;
                    result
                });
                println!(
                    "{:<10} {:<10} {:>8} {:>12.1} {:>10.1} {:>10.1}",
                    name,
                    batching,
                    clients,
                    rate,
                    p50 * 1e3,
                    p99 * 1e3
                );
            }
        }
    }
}
