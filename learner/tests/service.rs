//! The learner as a real process on loopback: push, step, stream weights, checkpoints.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use rlhf_learner::Engine;
use rlhf_learner::algo::transform::Transform;
use rlhf_learner::collective::Solo;
use rlhf_proto::process::ServiceProcess;
use rlhf_proto::v1;
use rlhf_proto::v1::learner_service_client::LearnerServiceClient;
use rlhf_proto::weights::Assembler;
use tonic::Code;

fn start(config: &std::path::Path, extra: &[&str]) -> ServiceProcess {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_learner"));
    cmd.args([
        "--config",
        config.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ])
    .args(extra)
    .env("RUST_LOG", "warn");
    ServiceProcess::spawn(cmd, Duration::from_secs(60)).expect("learner starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_step_stream_checkpoint_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = tiny_policy(tmp.path(), 3);
    let out = tmp.path().join("out");
    let config = config(&policy, &out, &[("target", Transform::Identity, 1.0)]);
    let config_path = tmp.path().join("learner.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();

    // Rollouts from the initial weights (an in-process engine only generates them).
    let local = Engine::new(config.clone(), Box::new(Solo)).unwrap();
    let ts = rollouts(&local, &policy, &prompts(4), 4, 1, &|c| vec![share(c, 7)]);

    let mut server = start(&config_path, &[]);
    let channel = rlhf_proto::client::endpoint(&server.url(), Default::default())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = LearnerServiceClient::new(channel).max_decoding_message_size(256 << 20);
    let info = client
        .info(v1::LearnerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.step, info.weight_version, info.world_size), (0, 0, 1));
    assert_eq!(info.objectives, vec!["target".to_string()]);

    // A bad trajectory is rejected with a reason; the good ones are accepted.
    let mut pushed: Vec<v1::Trajectory> = ts.iter().map(|t| t.to_proto()).collect();
    let mut bad = pushed[0].clone();
    bad.logprobs.pop();
    pushed.push(bad);
    let reply = client
        .push_rollouts(tokio_stream::iter(pushed))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((reply.accepted, reply.rejected), (16, 1));
    assert!(reply.message.contains("log-probs"), "{}", reply.message);

    // Not enough trajectories: the step times out with a clear status instead of hanging.
    let err = client
        .step(v1::StepRequest {
            step: 1,
            expected_samples: 17,
            timeout_seconds: 0.5,
            data_cursor: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(err.message().contains("16 of 17"), "{}", err.message());

    let report = client
        .step(v1::StepRequest {
            step: 1,
            expected_samples: 16,
            timeout_seconds: 30.0,
            data_cursor: 7,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (report.step, report.weight_version, report.samples),
        (1, 1, 16)
    );
    assert!(report.metrics.contains_key("reward/total") && report.metrics.contains_key("kl/token"));

    // The new weights stream out and differ from the initial ones.
    let mut stream = client
        .stream_weights(v1::WeightsRequest {
            min_version: 1,
            dtype: "float32".into(),
            chunk_bytes: 4096,
            timeout_seconds: 10.0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut assembler = Assembler::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        assembler.push(chunk).unwrap();
    }
    let (version, tensors) = assembler.finish().unwrap();
    assert_eq!(version, 1);
    let initial = local.policy_tensors();
    assert_eq!(tensors.len(), initial.len());
    let first = &tensors[0];
    let values = rlhf_model::dtype::decode(rlhf_model::DType::F32, &first.data);
    assert_ne!(values, initial[0].values, "weights changed after a step");

    // A checkpoint, then a restart that restores it.
    let ckpt = client
        .save_checkpoint(v1::SaveCheckpointRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ckpt.step, 1);
    rlhf_learner::checkpoint::verify(std::path::Path::new(&ckpt.path)).unwrap();
    server.kill();
    let restarted = start(&config_path, &["--resume"]);
    let channel = rlhf_proto::client::endpoint(&restarted.url(), Default::default())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = LearnerServiceClient::new(channel);
    let info = client
        .info(v1::LearnerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.step, info.weight_version), (1, 1));
    let restored = client
        .restore(v1::RestoreRequest {
            path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((restored.step, restored.data_cursor), (1, 7));

    // The same step again is reported as already applied, not trained twice.
    let again = ts.iter().map(|t| t.to_proto()).collect::<Vec<_>>();
    client
        .push_rollouts(tokio_stream::iter(again))
        .await
        .unwrap();
    let report = client
        .step(v1::StepRequest {
            step: 1,
            expected_samples: 16,
            timeout_seconds: 10.0,
            data_cursor: 7,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(report.already_applied);
    assert_eq!(report.weight_version, 1);
}
