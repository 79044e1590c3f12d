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

    // The same step again is reported as already applied, not trained twice, and with the
    // report it had (kept in the checkpoint): a caller that lost the reply still records it.
    let again = ts.iter().map(|t| t.to_proto()).collect::<Vec<_>>();
    client
        .push_rollouts(tokio_stream::iter(again))
        .await
        .unwrap();
    let repeated = client
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
    assert!(repeated.already_applied);
    assert_eq!(
        (repeated.weight_version, repeated.samples, repeated.tokens),
        (1, report.samples, report.tokens)
    );
    assert_eq!(repeated.metrics, report.metrics);
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

/// Pushes `ts` and checks that all were accepted.
async fn push(client: &mut LearnerClient, ts: Vec<v1::Trajectory>) {
    let n = ts.len() as u64;
    let reply = client
        .push_rollouts(tokio_stream::iter(ts))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (reply.accepted, reply.rejected),
        (n, 0),
        "{}",
        reply.message
    );
}

async fn step(client: &mut LearnerClient, step: u64, expected: u64, last: bool) -> v1::StepReport {
    client
        .step(v1::StepRequest {
            step,
            expected_samples: expected,
            timeout_seconds: 30.0,
            data_cursor: step,
            last_round: last,
        })
        .await
        .unwrap()
        .into_inner()
}

/// Groups `prefix0..` of `step`, the first `informative` of them informative.
fn groups(step: u64, prefix: &str, n: usize, informative: usize) -> Vec<v1::Trajectory> {
    (0..n)
        .flat_map(|k| wire_group(step, &format!("{prefix}{k}"), k < informative))
        .collect()
}

fn metric(r: &v1::StepReport, key: &str) -> f64 {
    *r.metrics
        .get(key)
        .unwrap_or_else(|| panic!("no metric {key}: {:?}", r.metrics))
}

fn dynamic_metrics(r: &v1::StepReport) -> [f64; 6] {
    [
        "groups",
        "informative_groups",
        "carried_in",
        "carried_out",
        "dropped_groups",
        "trained_groups",
    ]
    .map(|k| metric(r, &format!("dynamic_sampling/{k}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_sampling_asks_for_rounds_trains_a_short_last_round_and_carries_the_surplus() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = tiny_policy(tmp.path(), 8);
    let mut config = config(
        &policy,
        &tmp.path().join("out"),
        &[("target", Transform::Identity, 1.0)],
    );
    config.grpo.dynamic_sampling = true;
    let config_path = tmp.path().join("learner.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
    let mut first = start(&config_path, &[]);
    let mut c = learner_client(&first);

    // Step 1, round 1: 4 groups (the step's target), 1 informative: 3 missing, nothing trained.
    push(&mut c, groups(1, "a", 4, 1)).await;
    let r = step(&mut c, 1, 8, false).await;
    assert_eq!(
        (
            r.missing_groups,
            r.weight_version,
            r.samples,
            r.already_applied
        ),
        (3, 0, 8, false)
    );
    assert_eq!(metric(&r, "dynamic_sampling/groups"), 4.0);
    assert_eq!(metric(&r, "dynamic_sampling/informative_groups"), 1.0);
    // Asking again counts nothing twice, and the trajectories stay buffered.
    let again = step(&mut c, 1, 8, false).await;
    assert_eq!((again.missing_groups, again.samples), (3, 8));
    let info = c
        .info(v1::LearnerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (info.step, info.weight_version, info.buffered_trajectories),
        (0, 0, 8)
    );

    // Round 2 of the same step: 2 more informative groups. The target stays the first
    // round's 4 groups, not the 8 the step now has.
    push(&mut c, groups(1, "b", 4, 2)).await;
    let r = step(&mut c, 1, 16, false).await;
    assert_eq!((r.missing_groups, r.weight_version, r.samples), (1, 0, 16));
    assert_eq!(metric(&r, "dynamic_sampling/groups"), 4.0);

    // Round 3: 4 informative groups, 7 in all: 4 trained (a0 b0 b1 c0, in group order), 3
    // carried (c1 c2 c3), the 5 uninformative ones dropped.
    push(&mut c, groups(1, "c", 4, 4)).await;
    let r = step(&mut c, 1, 24, false).await;
    assert_eq!((r.missing_groups, r.weight_version, r.samples), (0, 1, 24));
    assert_eq!(dynamic_metrics(&r), [4.0, 7.0, 0.0, 3.0, 5.0, 4.0]);
    let info = c
        .info(v1::LearnerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.step, info.buffered_trajectories), (1, 0));
    let r = step(&mut c, 1, 24, false).await;
    assert!(r.already_applied && r.weight_version == 1, "{r:?}");

    // The carry is in the checkpoint, exactly as pushed.
    let ckpt = c
        .save_checkpoint(v1::SaveCheckpointRequest::default())
        .await
        .unwrap()
        .into_inner();
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(std::path::Path::new(&ckpt.path).join("state.json")).unwrap(),
    )
    .unwrap();
    let carried: Vec<rlhf_learner::trajectory::Trajectory> =
        serde_json::from_value(state["carry"].clone()).unwrap();
    let expected: Vec<rlhf_learner::trajectory::Trajectory> = groups(1, "c", 4, 4)
        .into_iter()
        .filter(|t| t.group_id != "c0")
        .map(|t| rlhf_learner::trajectory::Trajectory::from_proto(t, 1, VOCAB).unwrap())
        .collect();
    assert_eq!(carried, expected);

    // Step 2 has no informative group of its own: the 3 carried ones fall 1 short, and the
    // last round trains on them alone.
    push(&mut c, groups(2, "d", 4, 0)).await;
    let r = step(&mut c, 2, 8, false).await;
    assert_eq!((r.missing_groups, r.weight_version), (1, 1));
    assert_eq!(metric(&r, "dynamic_sampling/carried_in"), 3.0);
    let uninterrupted = step(&mut c, 2, 8, true).await;
    assert_eq!(
        (uninterrupted.missing_groups, uninterrupted.weight_version),
        (0, 2)
    );
    assert_eq!(
        dynamic_metrics(&uninterrupted),
        [4.0, 0.0, 3.0, 0.0, 4.0, 3.0]
    );
    first.kill();

    // Restarted from step 1's checkpoint, the learner has the same carry: step 2 comes out
    // the same, bit for bit.
    let restarted = start(&config_path, &["--resume"]);
    let mut c = learner_client(&restarted);
    let info = c
        .info(v1::LearnerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.step, info.weight_version), (1, 1));
    push(&mut c, groups(2, "d", 4, 0)).await;
    let resumed = step(&mut c, 2, 8, true).await;
    assert_eq!(resumed.weight_version, 2);
    let timing = |k: &String| k.starts_with("time/") || k.as_str() == "tokens/trained_per_s";
    let keys = |r: &v1::StepReport| {
        let mut k: Vec<String> = r.metrics.keys().filter(|k| !timing(k)).cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&resumed), keys(&uninterrupted));
    for k in keys(&uninterrupted) {
        let (a, b) = (uninterrupted.metrics[&k], resumed.metrics[&k]);
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "{k}: {a} uninterrupted, {b} restored"
        );
    }
}

/// The tiny-llama fixture (config, weights and tokenizer of a real HF checkpoint).
fn fixture_policy() -> std::path::PathBuf {
    rlhf_model::testing::fixtures_dir().join("tiny-llama")
}

/// Trajectories of `step` for the fixture's vocabulary: `n` informative groups of two.
fn fixture_rollouts(step: u64, n: usize) -> Vec<v1::Trajectory> {
    (0..n)
        .flat_map(|k| {
            let mut g = wire_group(step, &format!("p{k}"), true);
            for t in &mut g {
                t.prompt_ids = vec![0, 100 + k as u32, 200, 300];
                t.completion_ids = t.completion_ids.iter().map(|&x| x * 37 % 512).collect();
            }
            g
        })
        .collect()
}

/// Logits of every position of `rows` under `model`.
fn logits(model: &rlhf_model::Model, rows: &[&[u32]]) -> Vec<f32> {
    let batch = rlhf_model::batch::TokenBatch::left_padded(rows, 2).unwrap();
    let (hidden, _) = model.hidden_states(&batch, None, false);
    rlhf_model::host::to_vec(model.lm_logits(hidden))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_checkpoint_exports_a_policy_folder_with_the_learners_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let source = fixture_policy();
    let config = config(
        &source,
        &tmp.path().join("out"),
        &[("target", Transform::Identity, 1.0)],
    );
    let config_path = tmp.path().join("learner.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
    let server = start(&config_path, &[]);
    let mut c = learner_client(&server);
    push(&mut c, fixture_rollouts(1, 2)).await;
    assert_eq!(step(&mut c, 1, 4, true).await.weight_version, 1);

    let export = tmp.path().join("exported");
    for _ in 0..2 {
        // The second export replaces the first.
        let info = c
            .save_checkpoint(v1::SaveCheckpointRequest {
                export_policy_dir: export.display().to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((info.step, info.weight_version), (1, 1));
        assert_eq!(info.policy_dir, export.display().to_string());
        rlhf_learner::checkpoint::verify(std::path::Path::new(&info.path)).unwrap();
    }
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(export.join(f)).unwrap(),
            std::fs::read(source.join(f)).unwrap(),
            "{f} copied from the policy folder"
        );
    }
    assert!(export.join("config.json").is_file() && export.join("model.safetensors").is_file());

    // The folder loads on its own and computes what the learner's weights compute.
    let device = rlhf_model::device::inference_device().unwrap();
    let exported = rlhf_model::Model::load(&export, &device).unwrap();
    rlhf_model::Tokenizer::from_dir(&export).unwrap();
    let mut stream = c
        .stream_weights(v1::WeightsRequest {
            min_version: 1,
            dtype: "float32".into(),
            chunk_bytes: 1 << 16,
            timeout_seconds: 10.0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut assembler = Assembler::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        assembler.push(chunk).unwrap();
    }
    let (version, wire) = assembler.finish().unwrap();
    assert_eq!(version, 1);
    let learner_weights: Vec<rlhf_model::weights::NamedTensor> = wire
        .into_iter()
        .map(|t| rlhf_model::weights::NamedTensor {
            values: rlhf_model::dtype::decode(rlhf_model::DType::F32, &t.data),
            shape: t.shape.iter().map(|&d| d as usize).collect(),
            name: t.name,
        })
        .collect();
    let initial = rlhf_model::Model::load(&source, &device).unwrap();
    let learner = initial.clone().with_tensors(learner_weights).unwrap();
    let rows: [&[u32]; 2] = [&[0, 17, 230, 41, 5], &[0, 300, 12]];
    let got = logits(&exported, &rows);
    assert_eq!(got, logits(&learner, &rows), "exported vs learner logits");
    assert_ne!(got, logits(&initial, &rows), "the step changed the policy");

    // A folder that is not a model folder is not replaced.
    let err = c
        .save_checkpoint(v1::SaveCheckpointRequest {
            export_policy_dir: tmp.path().display().to_string(),
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("not a model folder"),
        "{}",
        err.message()
    );
    assert!(config_path.is_file());
}

/// Serves a real actor of `model_dir` on a free loopback port; returns its `host:port`.
async fn serve_real_actor(model_dir: &std::path::Path) -> String {
    let device = rlhf_model::device::inference_device().unwrap();
    let mut model = rlhf_model::Model::load(model_dir, &device).unwrap();
    model.batch_invariant = true;
    let tokenizer = rlhf_model::Tokenizer::from_dir(model_dir).unwrap();
    let config = model.config.clone();
    let engine = rlhf_actor::engine::start(
        model,
        Some(tokenizer.clone()),
        rlhf_actor::engine::Limits {
            max_sequences: 8,
            max_kv_tokens: 4096,
        },
        0,
    );
    let actor = rlhf_actor::service::Actor::new(
        engine,
        config,
        tokenizer,
        model_dir.to_path_buf(),
        8,
        rlhf_actor::metrics::Metrics::new(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(rlhf_actor::service::serve(
        actor,
        listener,
        std::future::pending(),
    ));
    address
}

/// Sampled completions of the actor (temperature 1, so their log-probs are the model's).
async fn actor_samples(address: &str) -> Vec<v1::Completion> {
    let mut actor =
        rlhf_proto::client::actor(address, Timeouts::request(Duration::from_secs(60))).unwrap();
    let prompts = [vec![0u32, 17, 230, 41], vec![0, 300, 12]]
        .into_iter()
        .enumerate()
        .map(|(i, ids)| v1::PromptInput {
            id: format!("q{i}"),
            content: Some(v1::prompt_input::Content::Ids(v1::TokenIds { ids })),
            metadata: Default::default(),
        })
        .collect();
    let request = v1::GenerateRequest {
        job_id: "test".into(),
        step: 1,
        prompts,
        sampling: Some(v1::SamplingParams {
            samples_per_prompt: 2,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 6,
            stop: vec![],
            stop_token_ids: vec![],
            seed: 11,
            ignore_eos: true,
        }),
        min_weight_version: 0,
        reward_addresses: vec![],
        learner_addresses: vec![],
        reward_timeout_seconds: 0.0,
        summaries_only: false,
    };
    let mut stream = actor.generate(request).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(c) = stream.message().await.unwrap() {
        out.push(c);
    }
    assert_eq!(out.len(), 4);
    out
}

/// The largest difference between the completions' log-probs and `model`'s.
fn logprob_gap(model: &rlhf_model::Model, completions: &[v1::Completion]) -> f32 {
    let pairs: Vec<(&[u32], &[u32])> = completions
        .iter()
        .map(|c| (c.prompt_ids.as_slice(), c.token_ids.as_slice()))
        .collect();
    let lens: Vec<usize> = completions.iter().map(|c| c.token_ids.len()).collect();
    let ours = rlhf_model::logprobs::rows_to_host(
        model.completion_logprobs(&pairs, 1.0).unwrap().logprobs,
        &lens,
    );
    completions
        .iter()
        .zip(&ours)
        .flat_map(|(c, o)| c.logprobs.iter().zip(o).map(|(a, b)| (a - b).abs()))
        .fold(0.0, f32::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_reference_gives_actors_the_reference_policy_as_version_0() {
    let tmp = tempfile::tempdir().unwrap();
    let source = fixture_policy();
    let device = rlhf_model::device::inference_device().unwrap();
    // A reference that differs from the policy (as `[policy] reference` may).
    let initial = rlhf_model::Model::load(&source, &device).unwrap();
    let perturbed: Vec<rlhf_model::weights::NamedTensor> = initial
        .named_tensors()
        .into_iter()
        .map(|mut t| {
            for (i, v) in t.values.iter_mut().enumerate() {
                *v += 0.05 * ((i % 7) as f32 - 3.0);
            }
            t
        })
        .collect();
    let reference = initial.clone().with_tensors(perturbed).unwrap();
    let reference_dir = tmp.path().join("reference");
    reference
        .save_with_tokenizer(&reference_dir, &Default::default(), &source)
        .unwrap();

    // β > 0 keeps the reference resident; β = 0 does not load it, so publishing reads it.
    for beta in [0.04, 0.0] {
        let mut config = config(
            &source,
            &tmp.path().join(format!("out-{beta}")),
            &[("target", Transform::Identity, 1.0)],
        );
        config.reference = Some(reference_dir.clone());
        config.kl.controller = rlhf_learner::algo::kl::KlController::Fixed { value: beta };
        let config_path = tmp.path().join(format!("learner-{beta}.toml"));
        std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
        let server = start(&config_path, &[]);
        let mut c = learner_client(&server);
        let actor = serve_real_actor(&source).await;
        let mut actor_client =
            rlhf_proto::client::actor(&actor, Timeouts::request(Duration::from_secs(30))).unwrap();

        // The actor first runs a trained policy, version 1.
        push(&mut c, fixture_rollouts(1, 2)).await;
        assert_eq!(step(&mut c, 1, 4, true).await.weight_version, 1);
        let publish = |min_version, reference| v1::PublishWeightsRequest {
            min_version,
            dtype: "float32".into(),
            chunk_bytes: 1 << 16,
            timeout_seconds: 30.0,
            actor_addresses: vec![actor.clone()],
            reference,
        };
        let reply = c
            .publish_weights(publish(1, false))
            .await
            .unwrap()
            .into_inner();
        assert!(reply.actors[0].ok, "{:?}", reply.actors[0]);
        let info = actor_client
            .info(v1::ActorInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.weight_version, 1);

        // Then the reference, as version 0 (`min_version` is ignored): the actor takes the
        // lower version and samples from the reference policy.
        let reply = c
            .publish_weights(publish(9, true))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.version, 0);
        assert!(reply.actors[0].ok, "β {beta}: {:?}", reply.actors[0]);
        let info = actor_client
            .info(v1::ActorInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.weight_version, 0, "β {beta}");
        let samples = actor_samples(&actor).await;
        assert!(samples.iter().all(|s| s.weight_version == 0));
        let to_reference = logprob_gap(&reference, &samples);
        let to_policy = logprob_gap(&initial, &samples);
        assert!(
            to_reference < 1e-4 && to_policy > 1e-2,
            "β {beta}: actor vs reference {to_reference}, vs the initial policy {to_policy}"
        );
    }
}
