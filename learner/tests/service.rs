//! The learner as a real process on loopback: push, step, stream weights, checkpoints, and
//! publishing weights to actors (small in-test rollout services).

mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rlhf_learner::Engine;
use rlhf_learner::algo::transform::Transform;
use rlhf_learner::collective::Solo;
use rlhf_proto::client::{LearnerClient, Timeouts};
use rlhf_proto::process::ServiceProcess;
use rlhf_proto::v1;
use rlhf_proto::v1::rollout_service_server::{RolloutService, RolloutServiceServer};
use rlhf_proto::weights::Assembler;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Request, Response, Status, Streaming};

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

fn learner_client(server: &ServiceProcess) -> LearnerClient {
    rlhf_proto::client::learner(&server.url(), Timeouts::request(Duration::from_secs(120))).unwrap()
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
    let mut client = learner_client(&server);
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
            last_round: true,
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
            last_round: true,
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
        .save_checkpoint(v1::SaveCheckpointRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ckpt.step, 1);
    rlhf_learner::checkpoint::verify(std::path::Path::new(&ckpt.path)).unwrap();
    server.kill();
    let restarted = start(&config_path, &["--resume"]);
    let mut client = learner_client(&restarted);
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
            last_round: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(report.already_applied);
    assert_eq!(report.weight_version, 1);
}

/// A rollout service for tests: records the chunks of every weight update it is sent, or, when
/// `stall`, never answers one.
#[derive(Clone, Default)]
struct TestActor {
    received: Arc<Mutex<Vec<v1::WeightChunk>>>,
    stall: bool,
}

#[tonic::async_trait]
impl RolloutService for TestActor {
    type GenerateStream = tokio_stream::Empty<Result<v1::Completion, Status>>;

    async fn generate(
        &self,
        _request: Request<v1::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        Err(Status::unimplemented("a test actor does not generate"))
    }

    async fn update_weights(
        &self,
        request: Request<Streaming<v1::WeightChunk>>,
    ) -> Result<Response<v1::UpdateWeightsReply>, Status> {
        if self.stall {
            std::future::pending::<()>().await;
        }
        let mut stream = request.into_inner();
        let mut reply = v1::UpdateWeightsReply::default();
        while let Some(chunk) = stream.message().await? {
            reply.version = chunk.version;
            reply.bytes += chunk.data.len() as u64;
            reply.tensors += u32::from(chunk.offset == 0 && !chunk.last);
            self.received.lock().unwrap().push(chunk);
        }
        Ok(Response::new(reply))
    }

    async fn info(
        &self,
        _request: Request<v1::ActorInfoRequest>,
    ) -> Result<Response<v1::ActorInfo>, Status> {
        Err(Status::unimplemented("a test actor has no info"))
    }
}

/// Serves `actor` on a free loopback port; returns its `host:port`.
async fn serve_actor(actor: TestActor) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RolloutServiceServer::new(actor))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_weights_reaches_live_actors_and_reports_dead_and_stalled_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = tiny_policy(tmp.path(), 5);
    let config = config(
        &policy,
        &tmp.path().join("out"),
        &[("target", Transform::Identity, 1.0)],
    );
    let config_path = tmp.path().join("learner.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
    let server = start(&config_path, &[]);
    let mut client = learner_client(&server);

    let live = TestActor::default();
    let received = live.received.clone();
    let live = serve_actor(live).await;
    let stalled = serve_actor(TestActor {
        stall: true,
        ..TestActor::default()
    })
    .await;
    // Bound, then dropped: nothing listens there.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();

    let timeout = 3.0;
    let request = |min_version, dtype: &str, addresses: Vec<String>| v1::PublishWeightsRequest {
        min_version,
        dtype: dtype.into(),
        chunk_bytes: 4096,
        timeout_seconds: timeout,
        actor_addresses: addresses,
        reference: false,
    };
    let started = Instant::now();
    let reply = client
        .publish_weights(request(
            0,
            "bfloat16",
            vec![live.clone(), dead.clone(), stalled.clone()],
        ))
        .await
        .unwrap()
        .into_inner();
    let elapsed = started.elapsed();
    assert_eq!(reply.version, 0);
    let addresses: Vec<&str> = reply.actors.iter().map(|a| a.address.as_str()).collect();
    assert_eq!(
        addresses,
        [&live, &dead, &stalled],
        "one update per actor, in request order"
    );
    let [l, d, s] = &reply.actors[..] else {
        unreachable!("three actors checked above")
    };
    assert!(l.ok && l.error.is_empty() && !l.unreachable, "{l:?}");
    assert!(!d.ok && d.unreachable && !d.error.is_empty(), "{d:?}");
    assert!(
        !s.ok && !s.unreachable && s.timed_out && !s.error.is_empty(),
        "{s:?}"
    );
    assert!(!d.timed_out && !l.timed_out, "{d:?} {l:?}");
    // Neither the dead nor the stalled actor held up the live one or the call.
    assert!(l.seconds < timeout, "{l:?}");
    assert!(
        elapsed < Duration::from_secs_f64(timeout + 2.0),
        "PublishWeights took {elapsed:?} with a {timeout} s deadline per actor"
    );

    // The live actor got every chunk of the version, in order, in bfloat16: exactly what
    // StreamWeights serves for the same request.
    let mut stream = client
        .stream_weights(v1::WeightsRequest {
            min_version: 0,
            dtype: "bfloat16".into(),
            chunk_bytes: 4096,
            timeout_seconds: 10.0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut streamed = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        streamed.push(chunk);
    }
    let got = received.lock().unwrap().clone();
    assert_eq!(got, streamed);
    let (last, tensors) = got.split_last().unwrap();
    assert!(last.last && !tensors.is_empty());
    assert!(
        tensors
            .iter()
            .all(|c| c.version == 0 && c.dtype == v1::DType::Bf16 as i32)
    );
    assert_eq!(
        l.bytes,
        got.iter().map(|c| c.data.len() as u64).sum::<u64>()
    );
    let mut assembler = Assembler::new();
    for chunk in got {
        assembler.push(chunk).unwrap();
    }
    assert_eq!(assembler.finish().unwrap().0, 0);

    // A version that does not come and a dtype that does not exist fail the call itself.
    let err = client
        .publish_weights(v1::PublishWeightsRequest {
            timeout_seconds: 0.5,
            ..request(5, "float32", vec![live.clone()])
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let err = client
        .publish_weights(request(0, "int8", vec![live]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}
