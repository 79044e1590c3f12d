//! The actor as a real process on loopback: greedy equals the reference, seeds are batch
//! independent, 32+ concurrent requests under continuous batching, live weight updates (good and
//! bad), cancellation, scoring and pushing to in-test reward and learner servers, summaries.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    scaled(scale, DType::BF16)
}

/// The fixture's weights with every value scaled, encoded as `dtype` (F32 at scale 1: the
/// fixture's own weights, bit for bit).
fn scaled(scale: f32, dtype: DType) -> Vec<WireTensor> {
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
            dtype: match dtype {
                DType::F32 => v1::DType::F32,
                DType::BF16 => v1::DType::Bf16,
                DType::F16 => v1::DType::F16,
            },
            shape: t.shape.iter().map(|&d| d as u64).collect(),
            data: rlhf_model::dtype::encode(
                dtype,
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

/// One objective: the completion's length in characters.
fn length_scores(samples: &[v1::Sample]) -> Vec<v1::SampleScores> {
    samples
        .iter()
        .map(|s| match &s.completion {
            Some(v1::sample::Completion::CompletionText(t)) => v1::SampleScores {
                values: vec![t.chars().count() as f32],
            },
            _ => v1::SampleScores { values: vec![-1.0] },
        })
        .collect()
}

/// An in-test reward server: one objective, the completion's length in characters.
struct LengthReward;

#[tonic::async_trait]
impl v1::reward_service_server::RewardService for LengthReward {
    async fn score(
        &self,
        r: Request<v1::ScoreRequest>,
    ) -> Result<Response<v1::ScoreReply>, Status> {
        let scores = length_scores(&r.into_inner().samples);
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

/// Behaviour log-probs under top-k / top-p are the tokens' log-probs under the full softmax at
/// the sampling temperature, as the learner recomputes them (not the truncated, renormalised
/// distribution they were drawn from).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn truncated_sampling_returns_full_softmax_logprobs() {
    let actor = start(&[]);
    let mut c = client(&actor).await;
    let temperature = 0.7;
    let mut s = sampling(4, temperature, 16, 21);
    s.top_k = 5;
    s.top_p = 0.8;
    let r = request(
        vec![
            text_prompt("a", "The quick brown fox"),
            text_prompt("b", "Once upon a time"),
        ],
        s,
    );
    let out = collect(&mut c, r).await.unwrap();
    assert_eq!(out.len(), 8);
    let model = Model::load(
        &fixtures_dir().join("tiny-llama"),
        &device::inference_device().unwrap(),
    )
    .unwrap();
    let pairs: Vec<(&[u32], &[u32])> = out
        .iter()
        .map(|c| (c.prompt_ids.as_slice(), c.token_ids.as_slice()))
        .collect();
    let lens: Vec<usize> = out.iter().map(|c| c.token_ids.len()).collect();
    let scored = model
        .completion_logprobs(&pairs, temperature as f64)
        .unwrap();
    let full = rlhf_model::logprobs::rows_to_host(scored.logprobs, &lens);
    for (comp, recomputed) in out.iter().zip(&full) {
        assert_eq!(comp.logprobs.len(), recomputed.len());
        for (t, (a, b)) in comp.logprobs.iter().zip(recomputed).enumerate() {
            assert!(
                (a - b).abs() < 1e-4,
                "{}#{} token {t}: behaviour log-prob {a}, full log-softmax at T={temperature} {b}",
                comp.prompt_id,
                comp.sample_index
            );
        }
    }
}

/// An in-test reward server replica (length reward) on its own runtime, so that killing it
/// drops its connections mid-call, as a dead process does.
struct Replica {
    address: String,
    /// (prompt, completion) of every call it answered.
    answered: Arc<Mutex<Vec<(String, String)>>>,
    /// Score calls it received, answered or not.
    received: Arc<AtomicUsize>,
    /// Told when a call arrives that it will never answer.
    hung: Arc<tokio::sync::Notify>,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Which Score calls a [`Replica`] answers; the others it holds forever (a stopped process).
#[derive(Clone, Copy, PartialEq)]
enum Answers {
    All,
    None,
}

#[derive(Clone)]
struct ReplicaReward {
    answers: Answers,
    answered: Arc<Mutex<Vec<(String, String)>>>,
    received: Arc<AtomicUsize>,
    hung: Arc<tokio::sync::Notify>,
}

fn text_of_prompt(s: &v1::Sample) -> String {
    match &s.prompt {
        Some(v1::sample::Prompt::PromptText(t)) => t.clone(),
        other => panic!("the actor sends text prompts as text, got {other:?}"),
    }
}

#[tonic::async_trait]
impl v1::reward_service_server::RewardService for ReplicaReward {
    async fn score(
        &self,
        r: Request<v1::ScoreRequest>,
    ) -> Result<Response<v1::ScoreReply>, Status> {
        self.received.fetch_add(1, Ordering::SeqCst);
        let hold = match self.answers {
            Answers::All => false,
            Answers::None => true,
        };
        if hold {
            self.hung.notify_one();
            std::future::pending::<()>().await;
        }
        let samples = r.into_inner().samples;
        let scores = length_scores(&samples);
        let mut answered = self.answered.lock().unwrap();
        for s in &samples {
            let completion = match &s.completion {
                Some(v1::sample::Completion::CompletionText(t)) => t.clone(),
                other => panic!("completions are scored as text, got {other:?}"),
            };
            answered.push((text_of_prompt(s), completion));
        }
        Ok(Response::new(v1::ScoreReply { scores }))
    }

    async fn describe(
        &self,
        _r: Request<v1::DescribeRequest>,
    ) -> Result<Response<v1::DescribeReply>, Status> {
        Err(Status::unimplemented("not needed by the actor"))
    }
}

impl Replica {
    fn start(answers: Answers) -> Replica {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let service = ReplicaReward {
            answers,
            answered: Arc::default(),
            received: Arc::default(),
            hung: Arc::default(),
        };
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        let served = service.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let server = tonic::transport::Server::builder()
                    .add_service(v1::reward_service_server::RewardServiceServer::new(served))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
                tokio::select! {
                    _ = server => {}
                    _ = killed => {}
                }
            });
            // Dropping the runtime drops every connection task: open calls break.
            drop(runtime);
        });
        Replica {
            address,
            answered: service.answered,
            received: service.received,
            hung: service.hung,
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    /// Stops the replica abruptly: listener and connections close, calls in flight break.
    fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }

    fn answered(&self) -> Vec<(String, String)> {
        self.answered.lock().unwrap().clone()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The (prompt, completion) texts of `out`, sorted, with `prompts` mapping prompt ids to texts.
fn scored_pairs(out: &[v1::Completion], prompts: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = out
        .iter()
        .map(|c| {
            let (_, text) = prompts.iter().find(|(id, _)| *id == c.prompt_id).unwrap();
            (text.to_string(), c.text.clone())
        })
        .collect();
    pairs.sort();
    pairs
}

/// Every completion is scored with the length reward, and the replicas answered exactly one
/// Score call per completion between them.
fn assert_scored_exactly_once(
    out: &[v1::Completion],
    prompts: &[(&str, &str)],
    replicas: &[&Replica],
) {
    for c in out {
        assert!(c.scored, "{}#{} not scored", c.prompt_id, c.sample_index);
        assert_eq!(c.rewards, vec![c.text.chars().count() as f32]);
    }
    let mut answered: Vec<(String, String)> = replicas.iter().flat_map(|r| r.answered()).collect();
    answered.sort();
    assert_eq!(
        answered,
        scored_pairs(out, prompts),
        "one answered call per completion"
    );
}

const REPLICA_PROMPTS: [(&str, &str); 2] = [("a", "Hello"), ("b", "World")];

fn replica_request(replicas: &[&Replica], samples: u32) -> v1::GenerateRequest {
    let mut r = request(
        REPLICA_PROMPTS
            .iter()
            .map(|(id, text)| text_prompt(id, text))
            .collect(),
        sampling(samples, 1.0, 8, 9),
    );
    r.reward_addresses = replicas.iter().map(|r| r.address.clone()).collect();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn score_calls_are_spread_over_every_reward_replica() {
    let (a, b) = (Replica::start(Answers::All), Replica::start(Answers::All));
    let actor = start(&[]);
    let mut c = client(&actor).await;
    let out = collect(&mut c, replica_request(&[&a, &b], 4))
        .await
        .unwrap();
    assert_eq!(out.len(), 8);
    assert_scored_exactly_once(&out, &REPLICA_PROMPTS, &[&a, &b]);
    let (na, nb) = (a.answered().len(), b.answered().len());
    assert!(na > 0 && nb > 0, "both replicas score: {na} and {nb}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reward_replica_killed_mid_request_hands_its_calls_to_the_other() {
    // The actor's first Score call goes to `a` (nothing in flight: the first replica's turn);
    // `a` holds every call it gets until it is killed (so no answer of its can be lost in the
    // kill, which would rightly be scored again elsewhere).
    let (mut a, b) = (Replica::start(Answers::None), Replica::start(Answers::All));
    let actor = start(&[]);
    let mut c = client(&actor).await;
    let mut r = replica_request(&[&a, &b], 6);
    // Far beyond the test's deadline: only the broken connection can move the held call.
    r.reward_timeout_seconds = 3600.0;
    let running = tokio::spawn(async move { collect(&mut c, r).await });
    tokio::time::timeout(Duration::from_secs(120), a.hung.notified())
        .await
        .expect("the actor's first Score call reaches replica `a`");
    a.kill();
    let out = tokio::time::timeout(Duration::from_secs(120), running)
        .await
        .expect("the call held by the killed replica moves to the other")
        .unwrap()
        .unwrap();
    assert_eq!(out.len(), 12);
    assert!(a.answered().is_empty());
    // The calls `a` held when it died are scored once, on `b`, like the others.
    assert_scored_exactly_once(&out, &REPLICA_PROMPTS, &[&a, &b]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_reward_replica_times_out_and_the_other_scores() {
    // `a` accepts calls and never answers (a stopped process).
    let (a, b) = (Replica::start(Answers::None), Replica::start(Answers::All));
    let actor = start(&[]);
    let mut c = client(&actor).await;
    let mut r = replica_request(&[&a, &b], 2);
    r.reward_timeout_seconds = 1.0;
    let out = collect(&mut c, r).await.unwrap();
    assert_eq!(out.len(), 4);
    assert!(
        a.received.load(Ordering::SeqCst) >= 1,
        "the actor's first call goes to the first replica"
    );
    assert!(a.answered().is_empty());
    assert_scored_exactly_once(&out, &REPLICA_PROMPTS, &[&a, &b]);

    // When every replica fails its attempts, the request fails, naming them.
    let mut r = replica_request(&[&a, &b], 1);
    r.reward_addresses = vec!["http://127.0.0.1:9".into(), "http://127.0.0.1:11".into()];
    let err = collect(&mut client(&actor).await, r).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().starts_with(
            "reward servers http://127.0.0.1:9, http://127.0.0.1:11: every replica failed"
        ),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_last_weight_update_wins_even_at_a_lower_version() {
    let actor = start(&[]);
    let mut c = client(&actor).await;
    let probe = request(
        vec![text_prompt("p", "The quick brown fox")],
        sampling(1, 0.0, 12, 0),
    );
    let original = collect(&mut c, probe.clone()).await.unwrap();
    let updater = c.clone();
    let update = |chunks: Vec<v1::WeightChunk>| {
        let mut c = updater.clone();
        async move {
            c.update_weights(tokio_stream::iter(chunks))
                .await
                .unwrap()
                .into_inner()
                .version
        }
    };

    assert_eq!(update(perturbed_chunks(3, 1.5)).await, 3);
    let policy = collect(&mut c, probe.clone()).await.unwrap();
    assert_eq!(policy[0].weight_version, 3);
    assert_ne!(policy[0].token_ids, original[0].token_ids);

    // The reference policy (the fixture's own weights) as version 0 replaces version 3.
    assert_eq!(
        update(to_chunks(&scaled(1.0, DType::F32), 0, 3000)).await,
        0
    );
    let info = c.info(v1::ActorInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.weight_version, 0);
    let reference = collect(&mut c, probe.clone()).await.unwrap();
    assert_eq!(reference[0].weight_version, 0);
    assert_eq!(
        reference[0].token_ids, original[0].token_ids,
        "version 0 is in use"
    );

    // A request for version 1 or later waits until the policy is back.
    let mut later = probe.clone();
    later.min_weight_version = 1;
    let mut waiting_client = client(&actor).await;
    let waiting = tokio::spawn(async move { collect(&mut waiting_client, later).await });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = c.info(v1::ActorInfoRequest {}).await.unwrap().into_inner();
        if info.waiting_sequences == 1 {
            assert_eq!(info.running_sequences, 0, "{info:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the request never queued: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!waiting.is_finished(), "it does not run on version 0");
    assert_eq!(update(perturbed_chunks(1, 1.5)).await, 1);
    let out = waiting.await.unwrap().unwrap();
    assert_eq!(out[0].weight_version, 1);
    assert_eq!(
        out[0].token_ids, policy[0].token_ids,
        "the policy's weights again"
    );
}
