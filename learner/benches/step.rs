//! Learner step time and throughput, and ring all-reduce bandwidth.
//!
//! `cargo bench --workspace --bench step [-- --quick]`
//!
//! A GRPO step of the ~25M-parameter Llama (hidden 512, 8 layers, vocab 32000) on 64 synthetic
//! trajectories (8 prompts × 8 samples, 16 prompt + 32 completion tokens), KL in the loss:
//! seconds per step split into reference forward, policy forward+backward, optimizer and
//! all-reduce, and trained completion tokens/s. Then the all-reduce of a gradient-sized buffer
//! between 2 ranks over loopback TCP, in MB/s of buffer reduced. Reported, never asserted.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use rlhf_learner::Engine;
use rlhf_learner::algo::kl::KlController;
use rlhf_learner::algo::transform::{ObjectiveWeight, QuantileEstimator, Transform};
use rlhf_learner::collective::{Collective, Solo, TcpRing};
use rlhf_learner::config::{LearnerConfig, RewardsConfig};
use rlhf_learner::trajectory::Trajectory;
use rlhf_model::{LlamaDims, Model, ModelConfig, SaveOptions, device};

fn model_25m(dir: &std::path::Path) {
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
    Model::init(&config, &device::inference_device().unwrap(), 0)
        .save(dir, &SaveOptions::default())
        .unwrap();
}

fn trajectories(step: u64) -> Vec<Trajectory> {
    (0..64)
        .map(|i| {
            let tok = |k: usize| (3 + (i * 7919 + k * 104729) % 31990) as u32;
            Trajectory {
                step,
                prompt_id: format!("p{}", i / 8),
                group_id: format!("p{}", i / 8),
                sample_index: (i % 8) as u32,
                prompt_ids: (0..16).map(tok).collect(),
                completion_ids: (16..48).map(tok).collect(),
                logprobs: vec![-10.4; 32],
                weight_version: 0,
                rewards: vec![(i % 8) as f32 / 8.0],
                finish_reason: "length".into(),
            }
        })
        .collect()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let tmp = tempfile::tempdir().unwrap();
    let policy = tmp.path().join("policy");
    model_25m(&policy);
    let mut config: LearnerConfig = toml::from_str(&format!(
        "policy = \"{}\"\noutput_dir = \"{}\"\n[rewards]\nobjectives = []\n[optim]\nlr = 1e-5\nmicro_batch = 8\n",
        policy.display(),
        tmp.path().join("out").display()
    ))
    .unwrap();
    config.rewards = RewardsConfig {
        objectives: vec![ObjectiveWeight {
            name: "r".into(),
            transform: Transform::Identity,
            weight: 1.0,
        }],
        clip: None,
        reference_quantile: 0.85,
        reference_estimator: QuantileEstimator::Empirical,
    };
    config.kl.controller = KlController::Fixed { value: 0.04 };
    let mut engine = Engine::new(config, Box::new(Solo)).unwrap();
    let steps = if quick { 2 } else { 4 };
    println!(
        "GRPO step, llama-25m, 64 trajectories x (16 prompt + 32 completion) tokens, micro-batch 8"
    );
    println!(
        "{:>5} {:>9} {:>10} {:>12} {:>10} {:>10} {:>12}",
        "step", "total s", "ref fwd s", "pol fwd+bwd", "optim s", "reduce s", "tokens/s"
    );
    for step in 1..=steps {
        let out = engine.train_step(step, trajectories(step), step).unwrap();
        let m = &out.metrics;
        println!(
            "{:>5} {:>9.2} {:>10.2} {:>12.2} {:>10.2} {:>10.3} {:>12.0}",
            step,
            out.seconds,
            m["time/reference_s"],
            m["time/policy_fwd_bwd_s"],
            m["time/optimizer_s"],
            m["time/allreduce_s"],
            m["tokens/trained_per_s"]
        );
    }

    // Ring all-reduce bandwidth: a buffer the size of the model's gradients, 2 ranks.
    let n = ModelConfig::from_path(&policy).unwrap().num_parameters();
    let listeners: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    drop(listeners);
    let reps = if quick { 2 } else { 5 };
    let handles: Vec<_> = (0..2)
        .map(|rank| {
            let peers = peers.clone();
            std::thread::spawn(move || {
                let mut ring = TcpRing::connect(
                    rank,
                    &peers,
                    Duration::from_secs(20),
                    Duration::from_secs(120),
                )
                .unwrap();
                let mut buf = vec![rank as f32; n];
                ring.all_reduce_sum(&mut buf).unwrap();
                let started = Instant::now();
                for _ in 0..reps {
                    ring.all_reduce_sum(&mut buf).unwrap();
                }
                started.elapsed().as_secs_f64() / reps as f64
            })
        })
        .collect();
    let secs: Vec<f64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mb = (n * 4) as f64 / 1e6;
    println!(
        "all-reduce, 2 ranks over loopback TCP: {mb:.0} MB buffer in {:.3} s = {:.0} MB/s",
        secs[0],
        mb / secs[0]
    );
}
