//! The actor as a real process on loopback: greedy equals the reference, seeds are batch
//! independent, 32+ concurrent requests under continuous batching, live weight updates (good and
//! bad), cancellation, scoring and pushing to in-test reward and learner servers, summaries.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rlhf_model::testing::{fixtures_dir, reference};
use rlhf_model::{DType, Model, device};
use rlhf_proto::client::ActorClient;
use rlhf_proto::process::ServiceProcess;
use rlhf_proto::v1;
use rlhf_proto::weights::{WireTensor, to_chunks};
use rlhf_tests::http_get;
use tonic::{Code, Request, Response, Status, Streaming};

fn start(extra: &[&str]) -> ServiceProcess {
    let model = fixtures_dir().join("tiny-llama");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_actor"));
    cmd.args([
        "--model",
        model.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ])
    .args(extra)
    .env("RUST_LOG", "warn");
    ServiceProcess::spawn(cmd, Duration::from_secs(60)).expect("actor starts")
}

async fn client(p: &ServiceProcess) -> ActorClient {
    rlhf_proto::client::actor(&p.url(), Default::default()).unwrap()
}

fn text_prompt(id: &str, text: &str) -> v1::PromptInput {
    v1::PromptInput {
        id: id.into(),
        content: Some(v1::prompt_input::Content::Text(text.into())),
        metadata: Default::default(),
    }
}

fn sampling(n: u32, temperature: f32, max_new_tokens: u32, seed: u64) -> v1::SamplingParams {
    v1::SamplingParams {
        samples_per_prompt: n,
        temperature,
        top_k: 0,
        top_p: 1.0,
        max_new_tokens,
        stop: vec![],
        stop_token_ids: vec![],
        seed,
        ignore_eos: true,
    }
}

fn request(prompts: Vec<v1::PromptInput>, s: v1::SamplingParams) -> v1::GenerateRequest {
    v1::GenerateRequest {
        job_id: "test".into(),
        step: 1,
        prompts,
        sampling: Some(s),
        min_weight_version: 0,
        reward_addresses: vec![],
        learner_addresses: vec![],
        reward_timeout_seconds: 0.0,
        summaries_only: false,
    }
}

async fn collect(
    c: &mut ActorClient,
    r: v1::GenerateRequest,
) -> Result<Vec<v1::Completion>, Status> {
    let mut stream = c.generate(r).await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await? {
        out.push(m);
    }
    out.sort_by(|a, b| {
        (a.prompt_id.clone(), a.sample_index).cmp(&(b.prompt_id.clone(), b.sample_index))
    });
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn greedy_matches_the_reference_and_seeds_are_batch_independent() {
    let actor = start(&[]);
    let mut c = client(&actor).await;
    let dir = fixtures_dir().join("tiny-llama");
    let reference = reference(&dir);
    for case in reference["cases"].as_array().unwrap() {
        let greedy: Vec<u32> = case["greedy_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let r = request(
            vec![text_prompt("p", case["prompt"].as_str().unwrap())],
            sampling(1, 0.0, greedy.len() as u32, 0),
        );
        let out = collect(&mut c, r).await.unwrap();
        assert_eq!(out[0].token_ids, greedy, "greedy ids over gRPC");
        assert_eq!(out[0].finish_reason, "length");
        assert_eq!(out[0].weight_version, 0);
    }

    // A seeded request alone, then the same request sharing the batch with others.
    let target = request(
        vec![text_prompt("t", "Once upon a time")],
        sampling(4, 1.0, 20, 7),
    );
    let alone = collect(&mut c, target.clone()).await.unwrap();
    let again = collect(&mut c, target.clone()).await.unwrap();
    for (a, b) in alone.iter().zip(&again) {
        assert_eq!(
            (&a.token_ids, &a.logprobs),
            (&b.token_ids, &b.logprobs),
            "same seed, same tokens"
        );
    }
    let mut tasks = Vec::new();
    for k in 0..6 {
        let mut c = client(&actor).await;
        let r = request(
            vec![text_prompt("o", &"noise ".repeat(k + 1))],
            sampling(3, 1.0, 10 + 5 * k as u32, 100 + k as u64),
        );
        tasks.push(tokio::spawn(
            async move { collect(&mut c, r).await.unwrap() },
        ));
    }
    let shared = collect(&mut c, target).await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    for (a, b) in alone.iter().zip(&shared) {
        assert_eq!(
            a.token_ids, b.token_ids,
            "sample {} changed when sharing the batch",
            a.sample_index
        );
        assert_eq!(a.logprobs, b.logprobs);
    }
    let distinct: std::collections::HashSet<&Vec<u32>> =
        alone.iter().map(|c| &c.token_ids).collect();
    assert!(distinct.len() > 1, "samples of one prompt differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_concurrent_requests_equal_their_one_at_a_time_results() {
    let batched = start(&["--max-sequences", "64"]);
    let serial = start(&["--max-sequences", "1"]);
    let words = [
        "a",
        "the cat",
        "hello world again",
        "one two three four five",
        "x",
    ];
    let requests: Vec<v1::GenerateRequest> = (0..36)
        .map(|i| {
            let text = format!("{} {i}", words[i % words.len()].repeat(1 + i % 3));
            request(
                vec![text_prompt(&format!("q{i}"), &text)],
                sampling(1 + (i % 2) as u32, 0.9, 4 + (i % 7) as u32 * 3, i as u64),
            )
        })
        .collect();
    let mut tasks = Vec::new();
    for r in requests.clone() {
        let mut c = client(&batched).await;
        tasks.push(tokio::spawn(
            async move { collect(&mut c, r).await.unwrap() },
        ));
    }
    let mut s = client(&serial).await;
    for (r, t) in requests.into_iter().zip(tasks) {
        let expected_n = r.sampling.as_ref().unwrap().samples_per_prompt as usize;
        let got = t.await.unwrap();
        assert_eq!(got.len(), expected_n, "every completion returned");
        let one = collect(&mut s, r).await.unwrap();
        for (a, b) in got.iter().zip(&one) {
            assert_eq!(
                a.token_ids, b.token_ids,
                "{}#{}",
                a.prompt_id, a.sample_index
            );
        }
    }
    let metrics = http_get(batched.address, "/metrics");
    assert!(
        metrics.contains("rlhf_actor_generated_tokens_total"),
        "{metrics}"
    );
}

/// The fixture's weights with every value scaled, as weight-update chunks.
fn perturbed_chunks(version: u64, scale: f32) -> Vec<v1::WeightChunk> {
    to_chunks(&perturbed(scale), version, 3000)
}

fn perturbed(scale: f32) -> Vec<WireTensor> {
    let model = Model::load(
        &fixtures_dir().join("tiny-llama"),
        &device::inference_device().unwrap(),
    )
    .unwrap();
    let tensors: Vec<WireTensor> = model
        .named_tensors()
        .into_iter()
        .map(|t| WireTensor {
            name: t.name,
            dtype: v1::DType::Bf16,
            shape: t.shape.iter().map(|&d| d as u64).collect(),
            data: rlhf_model::dtype::encode(
                DType::BF16,
                &t.values.iter().map(|v| v * scale).collect::<Vec<_>>(),
            ),
        })
        .collect();
    tensors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weight_updates_mid_stream_and_bad_updates() {
    let actor = start(&[]);
    let mut c = client(&actor).await;
    let probe = request(
        vec![text_prompt("p", "The quick brown fox")],
        sampling(1, 0.0, 12, 0),
    );
    let before = collect(&mut c, probe.clone()).await.unwrap();

    // A long request is running when the update arrives: it finishes on version 0.
    let long = request(vec![text_prompt("long", "Hello")], sampling(8, 1.0, 300, 1));
    let mut long_client = client(&actor).await;
    let running = tokio::spawn(async move { collect(&mut long_client, long).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let reply = c
        .update_weights(tokio_stream::iter(perturbed_chunks(1, 1.5)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.version, 1);
    let old = running.await.unwrap();
    assert!(
        old.iter().all(|x| x.weight_version == 0),
        "sequences that started on version 0 finish on it"
    );
    let after = collect(&mut c, probe.clone()).await.unwrap();
    assert_eq!(after[0].weight_version, 1);
    assert_ne!(
        after[0].token_ids, before[0].token_ids,
        "the perturbed weights change the output"
    );

    // Truncated, corrupt, misnamed and misshapen updates are refused; version 1 keeps serving.
    let mut truncated = perturbed_chunks(2, 2.0);
    truncated.pop();
    let mut corrupt = perturbed_chunks(2, 2.0);
    corrupt[3].data[0] ^= 0x40;
    let mut tensors = perturbed(2.0);
    tensors
        .iter_mut()
        .filter(|t| t.name == "model.norm.weight")
        .for_each(|t| t.name = "model.norm.bias".into());
    let renamed = to_chunks(&tensors, 2, 3000);
    let mut tensors = perturbed(2.0);
    tensors
        .iter_mut()
        .filter(|t| t.name == "model.norm.weight")
        .for_each(|t| t.shape = vec![32, 2]);
    let reshaped = to_chunks(&tensors, 2, 3000);
    let cases = [
        ("truncated", truncated, "final chunk"),
        ("corrupt", corrupt, "checksum"),
        ("renamed", renamed, "unknown tensor"),
        ("reshaped", reshaped, "shape"),
    ];
    for (what, chunks, needle) in cases {
        let err = c
            .update_weights(tokio_stream::iter(chunks))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}");
        assert!(err.message().contains(needle), "{what}: {}", err.message());
    }
    let info = c.info(v1::ActorInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.weight_version, 1);
    let still = collect(&mut c, probe).await.unwrap();
    assert_eq!(still[0].token_ids, after[0].token_ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_whose_client_left_is_cancelled() {
    let actor = start(&[]);
    let mut c = client(&actor).await;
    let r = request(vec![text_prompt("p", "Hello")], sampling(16, 1.0, 400, 3));
    let stream = c.generate(r).await.unwrap().into_inner();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let info = c.info(v1::ActorInfoRequest {}).await.unwrap().into_inner();
    assert!(info.running_sequences > 0, "the request is running");
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = c.info(v1::ActorInfoRequest {}).await.unwrap().into_inner();
        if info.running_sequences == 0 && info.waiting_sequences == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sequences still running after the client left: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An in-test reward server: one objective, the completion's length in characters.
struct LengthReward;

#[tonic::async_trait]
impl v1::reward_service_server::RewardService for LengthReward {
    async fn score(
        &self,
        r: Request<v1::ScoreRequest>,
    ) -> Result<Response<v1::ScoreReply>, Status> {
        let scores = r
            .into_inner()
            .samples
            .into_iter()
            .map(|s| match s.completion {
                Some(v1::sample::Completion::CompletionText(t)) => v1::SampleScores {
                    values: vec![t.chars().count() as f32],
                },
                _ => v1::SampleScores { values: vec![-1.0] },
            })
            .collect();
        Ok(Response::new(v1::ScoreReply { scores }))
    }

    async fn describe(
        &self,
        _r: Request<v1::DescribeRequest>,
    ) -> Result<Response<v1::DescribeReply>, Status> {
        Err(Status::unimplemented("not needed by the actor"))
    }
}

/// An in-test learner that records pushed trajectories.
#[derive(Clone, Default)]
struct RecordingLearner {
    got: Arc<Mutex<Vec<v1::Trajectory>>>,
}

#[tonic::async_trait]
impl v1::learner_service_server::LearnerService for RecordingLearner {
    async fn push_rollouts(
        &self,
        r: Request<Streaming<v1::Trajectory>>,
    ) -> Result<Response<v1::PushReply>, Status> {
        let mut s = r.into_inner();
        let mut n = 0;
        while let Some(t) = s.message().await? {
            self.got.lock().unwrap().push(t);
            n += 1;
        }
        Ok(Response::new(v1::PushReply {
            accepted: n,
            rejected: 0,
            message: String::new(),
        }))
    }
    async fn step(&self, _: Request<v1::StepRequest>) -> Result<Response<v1::StepReport>, Status> {
        Err(Status::unimplemented("not needed by the actor"))
    }
    type StreamWeightsStream = tokio_stream::Empty<Result<v1::WeightChunk, Status>>;
    async fn stream_weights(
        &self,
        _: Request<v1::WeightsRequest>,
    ) -> Result<Response<Self::StreamWeightsStream>, Status> {
        Err(Status::unimplemented("not needed by the actor"))
    }
    async fn publish_weights(
        &self,
        _: Request<v1::PublishWeightsRequest>,
    ) -> Result<Response<v1::PublishWeightsReply>, Status> {
        Err(Status::unimplemented("not needed by the actor"))
    }
    async fn set_reference_rewards(
        &self,
        _: Request<v1::ReferenceRewards>,
    ) -> Result<Response<v1::SetReferenceRewardsReply>, Status> {
        Err(Status::unimplemented("not needed by the actor"))
    }
    async fn save_checkpoint(
        &self,
        _: Request<v1::SaveCheckpointRequest>,
    ) -> Result<Response<v1::CheckpointInfo>, Status> {
        Err(Status::unimplemented("not needed by the actor"))
    }
    async fn restore(
        &self,
        _: Request<v1::RestoreRequest>,
    ) -> Result<Response<v1::RestoreReply>, Status> {
        Err(Status::unimplemented("not needed by the actor"))
    }
    async fn info(
        &self,
        _: Request<v1::LearnerInfoRequest>,
    ) -> Result<Response<v1::LearnerInfo>, Status> {
        Err(Status::unimplemented("not needed by the actor"))
    }
}

/// A reward server (length reward) and a recording learner on one port: its address and what
/// the learner received.
async fn reward_and_learner() -> (std::net::SocketAddr, Arc<Mutex<Vec<v1::Trajectory>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let learner = RecordingLearner::default();
    let recorded = learner.got.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(v1::reward_service_server::RewardServiceServer::new(
                LengthReward,
            ))
            .add_service(v1::learner_service_server::LearnerServiceServer::new(
                learner,
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, recorded)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completions_are_scored_and_pushed_as_they_finish() {
    let (addr, recorded) = reward_and_learner().await;
    let actor = start(&[]);
    let mut c = client(&actor).await;
    let mut r = request(
        vec![text_prompt("a", "Hello"), text_prompt("b", "World")],
        sampling(3, 1.0, 10, 5),
    );
    r.reward_addresses = vec![format!("http://{addr}")];
    r.learner_addresses = vec![format!("http://{addr}")];
    let out = collect(&mut c, r).await.unwrap();
    assert_eq!(out.len(), 6);
    for comp in &out {
        assert!(comp.scored && comp.pushed);
        assert_eq!(comp.rewards, vec![comp.text.chars().count() as f32]);
        assert_eq!(comp.logprobs.len(), comp.token_ids.len());
        assert_eq!(comp.completion_tokens as usize, comp.token_ids.len());
    }
    let pushed = recorded.lock().unwrap().clone();
    assert_eq!(pushed.len(), 6);
    for t in pushed {
        let comp = out
            .iter()
            .find(|c| c.prompt_id == t.prompt_id && c.sample_index == t.sample_index)
            .unwrap();
        assert_eq!(
            (t.completion_ids.clone(), t.group_id.clone(), t.step),
            (comp.token_ids.clone(), comp.prompt_id.clone(), 1)
        );
        assert_eq!(t.rewards, comp.rewards);
    }

    // An unreachable reward server fails the request after retries, it does not hang.
    let mut r = request(vec![text_prompt("a", "Hello")], sampling(1, 1.0, 4, 5));
    r.reward_addresses = vec!["http://127.0.0.1:9".into()];
    let started = Instant::now();
    let err = collect(&mut c, r).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("reward"), "{}", err.message());
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn summaries_only_streams_counts_and_rewards_without_the_bulk() {
    let (addr, recorded) = reward_and_learner().await;
    let actor = start(&[]);
    let mut c = client(&actor).await;
    // Stop early sometimes (EOS allowed) so the counts differ between samples.
    let mut s = sampling(3, 1.0, 12, 11);
    s.ignore_eos = false;
    let mut r = request(
        vec![text_prompt("a", "Hello"), text_prompt("b", "World")],
        s,
    );
    r.reward_addresses = vec![format!("http://{addr}")];
    let full = collect(&mut c, r.clone()).await.unwrap();

    r.summaries_only = true;
    r.learner_addresses = vec![format!("http://{addr}")];
    let summaries = collect(&mut c, r).await.unwrap();
    assert_eq!(summaries.len(), full.len());
    for (s, f) in summaries.iter().zip(&full) {
        assert_eq!(
            (&s.prompt_id, s.sample_index),
            (&f.prompt_id, f.sample_index)
        );
        assert!(s.token_ids.is_empty() && s.logprobs.is_empty(), "{s:?}");
        assert!(s.prompt_ids.is_empty() && s.text.is_empty(), "{s:?}");
        assert_eq!(
            s.completion_tokens as usize,
            f.token_ids.len(),
            "same seed, same length"
        );
        assert_eq!(f.completion_tokens as usize, f.token_ids.len());
        assert!(s.scored && s.pushed);
        assert_eq!(s.rewards, f.rewards, "scored on the whole text");
        assert_eq!(s.rewards, vec![f.text.chars().count() as f32]);
        assert_eq!(s.finish_reason, f.finish_reason);
        assert!(s.timings.is_some());
    }
    // The learners still get the whole trajectories.
    let pushed = recorded.lock().unwrap().clone();
    assert_eq!(pushed.len(), full.len());
    for t in pushed {
        let f = full
            .iter()
            .find(|c| c.prompt_id == t.prompt_id && c.sample_index == t.sample_index)
            .unwrap();
        assert_eq!(
            (&t.completion_ids, &t.logprobs),
            (&f.token_ids, &f.logprobs)
        );
    }
}
