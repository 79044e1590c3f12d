//! The reward server as a real process on loopback: fixture scores, dynamic batching under many
//! concurrent clients, queue limits, deadlines, remote objectives and a remote that dies.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rlhf_model::testing::{fixture_models, reference};
use rlhf_model::{HeadKind, ModelConfig};
use rlhf_proto::client::RewardClient;
use rlhf_proto::process::ServiceProcess;
use rlhf_proto::v1;
use rlhf_tests::http_get;
use serde_json::Value;
use tonic::Code;

fn reward_models() -> Vec<PathBuf> {
    let dirs: Vec<PathBuf> = fixture_models()
        .into_iter()
        .filter(|d| ModelConfig::from_path(d).unwrap().architecture.head == HeadKind::Score)
        .collect();
    assert!(!dirs.is_empty(), "no reward-model fixtures");
    dirs
}

fn start(dir: &Path, config: &str) -> ServiceProcess {
    let path = dir.join(format!("rewards-{}.toml", rand_suffix()));
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reward-server"));
    cmd.args([
        "--config",
        path.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ])
    .env("RUST_LOG", "warn");
    ServiceProcess::spawn(cmd, Duration::from_secs(60)).expect("reward server starts")
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

async fn client(server: &ServiceProcess) -> RewardClient {
    rlhf_proto::client::reward(&server.url(), Default::default()).unwrap()
}

fn text_sample(prompt: &str, completion: &str) -> v1::Sample {
    v1::Sample {
        prompt: Some(v1::sample::Prompt::PromptText(prompt.into())),
        completion: Some(v1::sample::Completion::CompletionText(completion.into())),
        metadata: Default::default(),
    }
}

fn pairs(reference: &Value) -> Vec<(String, String, f32)> {
    reference["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["prompt"].as_str().unwrap().to_string(),
                p["completion"].as_str().unwrap().to_string(),
                p["score"].as_f64().unwrap() as f32,
            )
        })
        .collect()
}

fn model_config(model: &Path, batching: &str) -> String {
    format!(
        "{batching}\n[[objective]]\nname = \"rm\"\nkind = \"model\"\nmodel = \"{}\"\n",
        model.display()
    )
}

async fn score(
    client: &mut RewardClient,
    samples: Vec<v1::Sample>,
) -> Result<Vec<Vec<f32>>, tonic::Status> {
    let reply = client.score(v1::ScoreRequest { samples }).await?;
    Ok(reply
        .into_inner()
        .scores
        .into_iter()
        .map(|s| s.values)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fixture_scores_over_grpc_and_describe() {
    let tmp = tempfile::tempdir().unwrap();
    for model in reward_models() {
        let config = format!(
            "{}\n[[objective]]\nname = \"polite\"\nkind = \"rule\"\nverifier = \"forbidden_words\"\nwords = [\"dog\"]\nmode = \"any\"\n",
            model_config(&model, "")
        );
        let server = start(tmp.path(), &config);
        let mut c = client(&server).await;
        let described = c
            .describe(v1::DescribeRequest {})
            .await
            .unwrap()
            .into_inner();
        let names: Vec<&str> = described
            .objectives
            .iter()
            .map(|o| o.name.as_str())
            .collect();
        assert_eq!(names, ["rm", "polite"]);
        assert_eq!(described.objectives[0].kind, "model");
        assert_eq!(described.objectives[0].content_hash.len(), 64);

        let reference = reference(&model);
        let cases = pairs(&reference);
        let samples = cases.iter().map(|(p, c, _)| text_sample(p, c)).collect();
        let values = score(&mut c, samples).await.unwrap();
        for ((p, comp, want), got) in cases.iter().zip(&values) {
            assert!(
                (got[0] - want).abs() < 1e-4,
                "{p:?}+{comp:?}: {} vs {want}",
                got[0]
            );
            let has_dog = comp
                .to_lowercase()
                .split(|ch: char| !ch.is_alphanumeric())
                .any(|w| w == "dog");
            assert_eq!(got[1], if has_dog { 0.0 } else { 1.0 });
        }

        // Prometheus text on the same port.
        let body = http_get(server.address, "/metrics");
        assert!(body.contains("rlhf_reward_requests_total"), "{body}");
        assert!(body.contains("rlhf_reward_batch_size_bucket"), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_get_unbatched_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let model = &reward_models()[0];
    let batched = start(
        tmp.path(),
        &model_config(model, "[batching]\nmax_batch_size = 64\nmax_wait_ms = 20\n"),
    );
    let unbatched = start(
        tmp.path(),
        &model_config(model, "[batching]\nmax_batch_size = 1\nmax_wait_ms = 0\n"),
    );

    // 64 clients, each with its own samples of different lengths.
    let words = [
        "alpha",
        "beta gamma",
        "delta epsilon zeta",
        "eta",
        "theta iota kappa lambda mu",
    ];
    let requests: Vec<Vec<v1::Sample>> = (0..64)
        .map(|i| {
            (0..1 + i % 3)
                .map(|j| {
                    text_sample(
                        &format!("Question {i}:"),
                        &format!(" {} {j}", words[(i + j) % words.len()].repeat(1 + i % 4)),
                    )
                })
                .collect()
        })
        .collect();
    let mut tasks = Vec::new();
    for samples in requests.clone() {
        let mut c = client(&batched).await;
        tasks.push(tokio::spawn(async move {
            score(&mut c, samples).await.unwrap()
        }));
    }
    let mut reference = client(&unbatched).await;
    for (samples, task) in requests.into_iter().zip(tasks) {
        let got = task.await.unwrap();
        for (sample, value) in samples.into_iter().zip(got) {
            let alone = score(&mut reference, vec![sample]).await.unwrap();
            assert!(
                (alone[0][0] - value[0]).abs() < 1e-5,
                "batched {} vs alone {}",
                value[0],
                alone[0][0]
            );
        }
    }
    // The batched server really batched.
    let metrics = http_get(batched.address, "/metrics");
    let count = metric(&metrics, "rlhf_reward_batch_size_count");
    let sum = metric(&metrics, "rlhf_reward_batch_size_sum");
    assert!(
        sum / count > 1.5,
        "mean batch size {} should exceed 1.5",
        sum / count
    );
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_queue_is_resource_exhausted_and_deadlines_hold() {
    let tmp = tempfile::tempdir().unwrap();
    let model = &reward_models()[0];
    let server = start(
        tmp.path(),
        &model_config(
            model,
            "[batching]\nmax_batch_size = 8\nmax_wait_ms = 0\nqueue_capacity = 1\n",
        ),
    );
    let long = "word ".repeat(80);
    let big: Vec<v1::Sample> = (0..256)
        .map(|i| text_sample(&format!("{i} "), &long))
        .collect();
    let mut tasks = Vec::new();
    for _ in 0..24 {
        let mut c = client(&server).await;
        let samples = big.clone();
        tasks.push(tokio::spawn(async move {
            score(&mut c, samples).await.map(|v| v.len())
        }));
    }
    let mut exhausted = 0;
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(n) => {
                assert_eq!(n, 256);
                ok += 1;
            }
            Err(s) if s.code() == Code::ResourceExhausted => exhausted += 1,
            Err(s) => panic!("unexpected status {s:?}"),
        }
    }
    assert!(ok >= 1, "some requests are served");
    assert!(exhausted >= 1, "a full queue refuses at once ({ok} ok)");

    // A deadline far shorter than the work: DEADLINE_EXCEEDED, promptly.
    let mut c = client(&server).await;
    let mut request = tonic::Request::new(v1::ScoreRequest {
        samples: big.iter().cycle().take(1024).cloned().collect(),
    });
    request.set_timeout(Duration::from_millis(50));
    let started = Instant::now();
    let err = c.score(request).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_requests_name_the_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let model = &reward_models()[0];
    let config = format!(
        "tokenizer = \"{}\"\n{}\n[[objective]]\nname = \"math\"\nkind = \"rule\"\nverifier = \"exact_answer\"\n",
        model.display(),
        model_config(model, "")
    );
    let server = start(tmp.path(), &config);
    let mut c = client(&server).await;
    let meta = |a: &str| {
        [("answer".to_string(), a.to_string())]
            .into_iter()
            .collect()
    };
    let ok = v1::Sample {
        metadata: meta("4"),
        ..text_sample("2+2=", " 4")
    };

    let err = score(&mut c, vec![]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let no_completion = v1::Sample {
        completion: None,
        ..ok.clone()
    };
    let err = score(&mut c, vec![ok.clone(), no_completion])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("sample 1") && err.message().contains("completion"),
        "{}",
        err.message()
    );

    let bad_ids = v1::Sample {
        completion: Some(v1::sample::Completion::CompletionIds(v1::TokenIds {
            ids: vec![5, 99_999],
        })),
        ..ok.clone()
    };
    let err = score(&mut c, vec![ok.clone(), ok.clone(), bad_ids])
        .await
        .unwrap_err();
    assert!(
        err.message().contains("sample 2") && err.message().contains("99999"),
        "{}",
        err.message()
    );

    let too_long = text_sample("x", &"long text ".repeat(400));
    let err = score(&mut c, vec![ok.clone(), too_long]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("sample 1") && err.message().contains("context length"),
        "{}",
        err.message()
    );

    let no_answer = text_sample("2+2=", " 4");
    let err = score(&mut c, vec![no_answer]).await.unwrap_err();
    assert!(
        err.message().contains("sample 0") && err.message().contains("`answer`"),
        "{}",
        err.message()
    );

    // Token ids decode through the configured tokenizer: same values as the text.
    let tok = rlhf_model::Tokenizer::from_dir(model).unwrap();
    let by_ids = v1::Sample {
        completion: Some(v1::sample::Completion::CompletionIds(v1::TokenIds {
            ids: tok.encode(" 4", false).unwrap(),
        })),
        ..ok.clone()
    };
    let a = score(&mut c, vec![ok]).await.unwrap();
    let b = score(&mut c, vec![by_ids]).await.unwrap();
    assert!((a[0][0] - b[0][0]).abs() < 1e-5, "{a:?} vs {b:?}");
    assert_eq!((a[0][1], b[0][1]), (1.0, 1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn remote_objective_and_a_remote_that_dies() {
    let tmp = tempfile::tempdir().unwrap();
    let model = &reward_models()[0];
    let mut backend = start(
        tmp.path(),
        &model_config(model, "[batching]\nmax_batch_size = 16\n"),
    );
    let front_config = format!(
        "[[objective]]\nname = \"far\"\nkind = \"remote\"\naddress = \"{}\"\nobjective = \"rm\"\ntimeout_ms = 60000\n",
        backend.url()
    );
    let front = start(tmp.path(), &front_config);
    let mut front_client = client(&front).await;
    let mut backend_client = client(&backend).await;

    let samples: Vec<v1::Sample> = (0..5)
        .map(|i| text_sample("Hello", &format!(" world {i}")))
        .collect();
    let via_remote = score(&mut front_client, samples.clone()).await.unwrap();
    let direct = score(&mut backend_client, samples).await.unwrap();
    assert_eq!(via_remote, direct);

    // A long request, then the remote is killed mid-way: an error, not a hang.
    let long = "the quick brown fox jumps over the lazy dog ".repeat(8);
    let heavy: Vec<v1::Sample> = (0..3000)
        .map(|i| text_sample(&format!("{i}"), &long))
        .collect();
    let task = tokio::spawn(async move {
        let started = Instant::now();
        (score(&mut front_client, heavy).await, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !task.is_finished(),
        "the heavy request should still be running when the remote dies"
    );
    backend.kill();
    let (result, elapsed) = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("no hang")
        .unwrap();
    let err = result.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("far"),
        "names the objective: {}",
        err.message()
    );
    assert!(elapsed < Duration::from_secs(20));
}

/// An ensemble objective over the wire: each aggregation of its members' scores, computed here
/// from the members served alone (one of them checked against transformers' fixture scores).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ensembles_aggregate_their_members_scores_over_grpc() {
    let tmp = tempfile::tempdir().unwrap();
    let a = reward_models().remove(0);
    // A second member of the same shape with other weights, so the aggregations differ.
    let b = tmp.path().join("rm-b");
    let config = ModelConfig::from_path(&a).unwrap();
    let device = rlhf_model::device::inference_device().unwrap();
    let options = rlhf_model::SaveOptions {
        dtype: rlhf_model::DType::F32,
        ..Default::default()
    };
    rlhf_model::Model::init(&config, &device, 5)
        .save_with_tokenizer(&b, &options, &a)
        .unwrap();
    let (a_path, b_path) = (a.display(), b.display());
    let mut text = format!(
        "[[objective]]\nname = \"a\"\nkind = \"model\"\nmodel = \"{a_path}\"\n\
         [[objective]]\nname = \"b\"\nkind = \"model\"\nmodel = \"{b_path}\"\n"
    );
    for (name, aggregation) in [
        ("mean", "aggregation = \"mean\""),
        ("median", "aggregation = \"median\""),
        ("min", "aggregation = \"min\""),
        ("cautious", "aggregation = \"mean_minus_std\"\nlambda = 0.5"),
    ] {
        text.push_str(&format!(
            "[[objective]]\nname = \"{name}\"\nkind = \"model\"\nmodels = [\"{a_path}\", \"{b_path}\"]\n{aggregation}\n"
        ));
    }
    let server = start(tmp.path(), &text);
    let mut c = client(&server).await;
    let cases = pairs(&reference(&a));
    let samples = cases
        .iter()
        .map(|(p, comp, _)| text_sample(p, comp))
        .collect();
    let values = score(&mut c, samples).await.unwrap();
    let mut differ = 0;
    for ((p, comp, want), v) in cases.iter().zip(&values) {
        let (sa, sb) = (v[0] as f64, v[1] as f64);
        assert!(
            (sa - *want as f64).abs() < 1e-4,
            "{p:?}+{comp:?}: {sa} vs {want}"
        );
        let mean = (sa + sb) / 2.0;
        // Two members: the median is their mean, the population std is |a - b| / 2.
        let expected = [mean, mean, sa.min(sb), mean - 0.5 * (sa - sb).abs() / 2.0];
        for (k, want) in expected.iter().enumerate() {
            let got = v[2 + k] as f64;
            assert!(
                (got - want).abs() < 1e-4,
                "objective {k} of {p:?}: {got} vs {want}"
            );
        }
        if (sa - sb).abs() > 1e-3 {
            differ += 1;
        }
    }
    assert!(
        differ > 0,
        "the members must disagree for the test to mean anything"
    );
}
