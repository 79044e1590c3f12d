//! Data-parallel ranks compute the single-rank update; a restored run continues exactly like an
//! uninterrupted one; a corrupted checkpoint is refused; a learner process stopped by SIGTERM
//! checkpoints its last step and a restart resumes there.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use common::*;
use rlhf_learner::algo::kl::KlController;
use rlhf_learner::algo::transform::Transform;
use rlhf_learner::collective::{Solo, TcpRing};
use rlhf_learner::{Engine, checkpoint};
use rlhf_proto::process::ServiceProcess;
use rlhf_proto::v1;

fn free_ports(n: usize) -> Vec<String> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect()
}

fn target(c: &[u32]) -> Vec<f32> {
    vec![share(c, 7)]
}

fn params(engine: &Engine) -> Vec<(String, Vec<f32>)> {
    engine
        .policy_tensors()
        .into_iter()
        .map(|t| (t.name, t.values))
        .collect()
}

#[test]
fn two_ranks_match_one_rank_and_each_other() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = tiny_policy(tmp.path(), 5);
    let mut base = config(
        &policy,
        &tmp.path().join("out"),
        &[("target", Transform::Identity, 1.0)],
    );
    base.kl.controller = KlController::Fixed { value: 0.04 };
    base.optim.micro_batch = 8;
    base.optim.minibatches = 2;

    let single = {
        let mut e = Engine::new(base.clone(), Box::new(Solo)).unwrap();
        let ts = rollouts(&e, &policy, &prompts(8), 8, 1, &target);
        let out = e.train_step(1, ts.clone(), 1).unwrap();
        (params(&e), out, ts)
    };
    let (single_params, single_out, trajectories) = single;

    let peers = free_ports(2);
    let handles: Vec<_> = (0..2)
        .map(|rank| {
            let (mut c, peers, ts) = (base.clone(), peers.clone(), trajectories.clone());
            c.parallel.rank = rank;
            c.parallel.peers = peers.clone();
            std::thread::spawn(move || {
                let ring = TcpRing::connect(
                    rank,
                    &peers,
                    Duration::from_secs(20),
                    Duration::from_secs(60),
                )
                .unwrap();
                let mut e = Engine::new(c, Box::new(ring)).unwrap();
                let out = e.train_step(1, ts, 1).unwrap();
                (params(&e), out)
            })
        })
        .collect();
    let ranks: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();

    // Identical to each other, bit for bit.
    for ((n0, v0), (n1, v1)) in ranks[0].0.iter().zip(&ranks[1].0) {
        assert_eq!(n0, n1);
        let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(v0), bits(v1), "rank 0 and 1 differ in {n0}");
    }
    // The same update as one rank with the whole batch, within float tolerance.
    let mut max_diff = 0.0f32;
    for ((name, a), (_, b)) in single_params.iter().zip(&ranks[0].0) {
        for (x, y) in a.iter().zip(b) {
            let d = (x - y).abs();
            max_diff = max_diff.max(d);
            assert!(d < 1e-5, "{name}: 1 rank {x} vs 2 ranks {y}");
        }
    }
    // The step really changed the weights (so the comparison means something).
    let fresh = Engine::new(base, Box::new(Solo)).unwrap();
    let moved = params(&fresh)
        .iter()
        .zip(&single_params)
        .any(|((_, a), (_, b))| a != b);
    assert!(moved, "the step changed nothing");
    for key in ["kl/token", "reward/total", "train/loss"] {
        let (a, b) = (single_out.metrics[key], ranks[0].1.metrics[key]);
        assert!(
            (a - b).abs() < 1e-4 * a.abs().max(1.0),
            "{key}: 1 rank {a} vs 2 ranks {b} (max param diff {max_diff})"
        );
    }
}

#[test]
fn restore_continues_exactly_and_corruption_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = tiny_policy(tmp.path(), 6);
    let mut c = config(
        &policy,
        &tmp.path().join("out"),
        &[("target", Transform::Identity, 1.0)],
    );
    c.kl.controller = KlController::Adaptive {
        value: 0.05,
        target: 2.0,
        horizon: 100.0,
    };
    c.grpo.dynamic_sampling = true;
    c.optim.minibatches = 2;
    c.optim.warmup_steps = 2;
    c.optim.schedule = rlhf_model::optim::Decay::Cosine;
    c.optim.total_steps = 20;
    let root = c.output_dir.join("checkpoints");

    // Uninterrupted: steps 1..=5, checkpoint after step 3.
    let mut a = Engine::new(c.clone(), Box::new(Solo)).unwrap();
    let (_, first) = run(&mut a, &policy, 1..=3, &prompts(6), 4, &target);
    let ckpt = checkpoint::write(&root, a.step(), |dir| a.save_state(dir)).unwrap();
    let (_, rest_a) = run(&mut a, &policy, 4..=5, &prompts(6), 4, &target);
    assert_eq!(first.len(), 3);

    // Stopped after step 3 and restored in a new engine.
    let mut b = Engine::new(c.clone(), Box::new(Solo)).unwrap();
    checkpoint::verify(&ckpt).unwrap();
    b.load_state(&ckpt).unwrap();
    assert_eq!((b.step(), b.version(), b.data_cursor()), (3, 3, 3));
    let (_, rest_b) = run(&mut b, &policy, 4..=5, &prompts(6), 4, &target);
    for (x, y) in rest_a.iter().zip(&rest_b) {
        assert_eq!(
            x.metrics.keys().collect::<Vec<_>>(),
            y.metrics.keys().collect::<Vec<_>>()
        );
        for (k, v) in &x.metrics {
            if k.starts_with("time/") || k == "tokens/trained_per_s" {
                continue;
            }
            assert_eq!(
                v.to_bits(),
                y.metrics[k].to_bits(),
                "step {}: {k} {v} vs {}",
                x.step,
                y.metrics[k]
            );
        }
    }
    assert_eq!(params(&a), params(&b), "final weights identical");

    // A step already applied is not applied twice.
    let again = b.train_step(5, Vec::new(), 5).unwrap();
    assert!(again.already_applied);

    // Corruption is refused, naming the file.
    let weights = ckpt.join("policy/model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0xff;
    std::fs::write(&weights, bytes).unwrap();
    let err = checkpoint::verify(&ckpt).unwrap_err().to_string();
    assert!(err.contains("policy/model.safetensors"), "{err}");
}

/// The learner binary on `config`, its stderr (the log) going to `log`.
fn learner_process(
    config: &std::path::Path,
    log: &std::path::Path,
    extra: &[&str],
) -> ServiceProcess {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_learner"));
    cmd.args([
        "--config",
        config.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ])
    .args(extra)
    .env("RUST_LOG", "info")
    .stderr(std::fs::File::create(log).unwrap());
    ServiceProcess::spawn(cmd, Duration::from_secs(60)).expect("learner starts")
}

fn client(p: &ServiceProcess) -> rlhf_proto::client::LearnerClient {
    rlhf_proto::client::learner(
        &p.url(),
        rlhf_proto::client::Timeouts::request(Duration::from_secs(120)),
    )
    .unwrap()
}

fn step_request(step: u64, expected: u64) -> v1::StepRequest {
    v1::StepRequest {
        step,
        expected_samples: expected,
        timeout_seconds: 300.0,
        data_cursor: step,
        last_round: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_checkpoints_the_last_step_and_a_restart_resumes_there() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = tiny_policy(tmp.path(), 9);
    let config = config(
        &policy,
        &tmp.path().join("out"),
        &[("target", Transform::Identity, 1.0)],
    );
    // The defaults checkpoint every 5 steps: steps 1 and 2 are not checkpointed by themselves.
    assert_eq!(config.checkpoint.every_steps, 5);
    // Long enough steps that the signal is likely to come while step 2 trains.
    let mut config = config;
    config.optim.epochs = 700;
    let root = config.output_dir.join("checkpoints");
    let config_path = tmp.path().join("learner.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
    let log = tmp.path().join("learner.log");

    // `--resume` without a checkpoint says so, and starts at step 0.
    let mut server = learner_process(&config_path, &log, &["--resume"]);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("WARN") && text.contains("no checkpoint found"),
        "{text}"
    );
    let mut c = client(&server);
    let info = c
        .info(v1::LearnerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.step, 0);

    let push = |mut c: rlhf_proto::client::LearnerClient, ts: Vec<v1::Trajectory>| async move {
        let r = c
            .push_rollouts(tokio_stream::iter(ts))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.rejected, 0, "{}", r.message);
    };
    push(
        c.clone(),
        [wire_group(1, "a", true), wire_group(1, "b", true)].concat(),
    )
    .await;
    let r = c.step(step_request(1, 4)).await.unwrap().into_inner();
    assert_eq!((r.step, r.weight_version), (1, 1));
    assert!(
        checkpoint::latest(&root).is_none(),
        "no checkpoint before SIGTERM"
    );

    // Step 2 has its trajectories (it may be training when the signal comes); step 3 waits for
    // trajectories that never come.
    push(
        c.clone(),
        [wire_group(2, "a", true), wire_group(2, "b", true)].concat(),
    )
    .await;
    let mut c2 = c.clone();
    let running = tokio::spawn(async move { c2.step(step_request(2, 4)).await });
    let mut c3 = c.clone();
    let waiting = tokio::spawn(async move { c3.step(step_request(3, 1000)).await });
    // Let both calls reach the learner (either outcome of step 2 is checked below).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    // It exits by itself, with status 0.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let exit = loop {
        if let Some(s) = server.exit_status() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the learner did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        exit.code(),
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    // The waiting step was abandoned (not held until its 300 s timeout).
    let waited = waiting.await.unwrap();
    assert!(waited.is_err(), "{waited:?}");
    // The running step finished and is in the checkpoint, or never started and is not.
    let last = match running.await.unwrap() {
        Ok(r) => {
            let r = r.into_inner();
            assert_eq!((r.step, r.weight_version), (2, 2));
            2
        }
        Err(status) => {
            assert!(
                status.message().contains("shutting down")
                    || status.code() == tonic::Code::Unavailable,
                "{status:?}"
            );
            1
        }
    };
    let latest = checkpoint::latest(&root).expect("a checkpoint written on SIGTERM");
    checkpoint::verify(&latest).unwrap();
    assert_eq!(latest, root.join(checkpoint::name(last)));

    // A restart resumes at that step.
    let restarted = learner_process(
        &config_path,
        &tmp.path().join("restarted.log"),
        &["--resume"],
    );
    let mut c = client(&restarted);
    let info = c
        .info(v1::LearnerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.step, info.weight_version), (last, last));
}
