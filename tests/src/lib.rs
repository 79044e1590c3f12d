//! Helpers for the end-to-end tests in `tests/tests/`: the workspace's binaries, job files on
//! the fixtures, and reading a run's outputs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub mod cluster;
pub mod netns;

/// A binary of the workspace (`rlhf`, `actor`, ...), built by `cargo test --workspace` next to
/// this test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/..");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: run the tests with `cargo test --workspace` so every binary is built",
        path.display()
    );
    path
}

/// The reference fixtures folder (`RLHF_FIXTURES_DIR`, else `../shared/fixtures`).
pub fn fixtures() -> PathBuf {
    let dir = std::env::var_os("RLHF_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"));
    assert!(dir.is_dir(), "fixtures folder {} not found", dir.display());
    dir
}

/// Writes `n` prompts to `path` as JSONL.
pub fn write_prompts(path: &Path, prefix: &str, n: usize) {
    let lines: Vec<String> = (0..n)
        .map(|i| serde_json::json!({"id": format!("{prefix}{i}"), "prompt": format!("Tell me about topic {i}:")}).to_string())
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// A small job on the tiny fixtures: a reward model (log-sigmoid) and a rule (identity).
pub fn tiny_job(dir: &Path, name: &str, extra: &str) -> PathBuf {
    write_prompts(&dir.join("prompts.jsonl"), "p", 12);
    write_prompts(&dir.join("eval.jsonl"), "e", 4);
    let f = fixtures();
    let text = format!(
        r#"
name = "{name}"
output_dir = "{out}"
seed = 3

[policy]
model = "{policy}"

[data]
prompts = "prompts.jsonl"
eval_prompts = "eval.jsonl"

[[objective]]
name = "rm"
kind = "model"
model = "{rm}"
transform = "log_sigmoid"

[[objective]]
name = "short"
kind = "rule"
verifier = "regex"
pattern = "^.{{0,30}}$"
transform = "identity"
weight = 0.5

[rollout]
steps = 3
prompts_per_step = 4
samples_per_prompt = 4
max_new_tokens = 16

[learner.optim]
lr = 1e-4
micro_batch = 16

[learner.checkpoint]
every_steps = 1
keep = 3

[evaluation]
every_steps = 2
{extra}
"#,
        out = dir.join("run").display(),
        policy = f.join("tiny-llama").display(),
        rm = f.join("tiny-llama-rm").display(),
    );
    let path = dir.join("job.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The `step` of every line of a run's `metrics.jsonl`.
pub fn metric_steps(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// A run's job record (`job.json`).
pub fn job_record(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("job.json")).unwrap()).unwrap()
}

/// The pid of a worker from `workers/endpoints.json`.
pub fn worker_pid(run: &Path, role: &str, index: usize) -> u32 {
    let all: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(run.join("workers/endpoints.json")).unwrap())
            .unwrap();
    all.iter()
        .find(|w| w["role"] == role && w["index"] == index)
        .and_then(|w| w["pid"].as_u64())
        .unwrap_or_else(|| panic!("no {role} {index} in endpoints.json")) as u32
}

/// Waits until `f` holds (polling), panicking after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends a signal to a process (`kill -SIG pid`).
pub fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig} {pid}");
}

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real etcd (Debian's `etcd-server`) on free loopback ports with a temporary data directory;
/// killed on drop.
pub struct Etcd {
    child: std::process::Child,
    /// `127.0.0.1:PORT` of its client endpoint.
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    pub fn start() -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = std::process::Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(dir.path())
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("`etcd` on PATH (Debian: apt-get install etcd-server; .ci/run does)");
        Etcd {
            child,
            endpoint: format!("127.0.0.1:{client}"),
            _dir: dir,
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 GET (the services' `/metrics`), without an HTTP client dependency;
/// asserts a 200 answer and returns the whole response.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// [`tiny_job`] with some of its values replaced: each `("table.key", value)` sets one dotted
/// path (tables are created as needed), so a test changes exactly what it is about.
pub fn tiny_job_with(dir: &Path, name: &str, edits: &[(&str, toml::Value)]) -> PathBuf {
    let path = tiny_job(dir, name, "");
    let mut doc: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    for (dotted, value) in edits {
        let mut keys: Vec<&str> = dotted.split('.').collect();
        let last = keys.pop().unwrap();
        let mut table = &mut doc;
        for k in keys {
            table = table
                .entry(k)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .unwrap_or_else(|| panic!("{dotted}: `{k}` is not a table"));
        }
        table.insert(last.to_string(), value.clone());
    }
    std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
    path
}

/// Every line of a run's `metrics.jsonl`.
pub fn metric_lines(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Runs `rlhf ARGS` to its end; panics with its stderr when it fails.
pub fn rlhf_ok(args: &[&str]) -> String {
    let out = std::process::Command::new(bin("rlhf"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("rlhf starts");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "rlhf {args:?} failed:\n{err}");
    err
}

/// An actor's `Info` (None when it does not answer within 2 s).
pub fn actor_info(address: &str) -> Option<rlhf_proto::v1::ActorInfo> {
    use rlhf_proto::client::Timeouts;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    runtime.block_on(async {
        let timeouts = Timeouts::request(Duration::from_secs(2));
        let mut c = rlhf_proto::client::actor(address, timeouts).ok()?;
        c.info(rlhf_proto::v1::ActorInfoRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    })
}

/// A process stopped (SIGSTOP) until this is dropped (SIGCONT), also by a failing assertion.
pub struct Stopped(u32);

impl Stopped {
    pub fn new(pid: u32) -> Stopped {
        signal(pid, "STOP");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}
