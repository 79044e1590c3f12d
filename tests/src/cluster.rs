//! Helpers for tests of `rlhf coordinator`: start one, run the cluster CLI against it, submit
//! jobs and wait for their states.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use rlhf_proto::process::ServiceProcess;

use crate::{bin, metric_steps, tiny_job, wait_for};

/// The `--store` URL of an embedded store in `state` (`state/store.json`).
pub fn embedded_store(state: &Path) -> String {
    format!("embedded:{}", state.join("store.json").display())
}

/// `rlhf coordinator` on a free loopback port with `store`, `state_dir` and `name`, plus `extra`
/// arguments.
pub fn coordinator(store: &str, state_dir: &Path, name: &str, extra: &[&str]) -> ServiceProcess {
    coordinator_with(store, state_dir, name, extra, &[])
}

/// [`coordinator`] with extra environment variables.
pub fn coordinator_with(
    store: &str,
    state_dir: &Path,
    name: &str,
    extra: &[&str],
    env: &[(&str, String)],
) -> ServiceProcess {
    let mut cmd = Command::new(bin("rlhf"));
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd.args(["coordinator", "--listen", "127.0.0.1:0", "--store", store])
        .arg("--state-dir")
        .arg(state_dir)
        .args(["--name", name])
        .args(extra)
        .stderr(Stdio::null());
    ServiceProcess::spawn(cmd, Duration::from_secs(60)).expect("the coordinator starts")
}

/// `rlhf ARGS` against the coordinator at `url`; asserts success.
pub fn cli(url: &str, args: &[&str]) -> Output {
    let out = Command::new(bin("rlhf"))
        .args(args)
        .env("RLHF_COORDINATOR", url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rlhf {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A tiny job in its own folder; `steps` and `priority` set, `extra` TOML appended.
pub fn job(root: &Path, name: &str, steps: u64, priority: i32, extra: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let path = tiny_job(&dir, name, extra);
    let text = std::fs::read_to_string(&path).unwrap();
    let text = format!(
        "priority = {priority}\n{}",
        text.replace("steps = 3", &format!("steps = {steps}"))
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Submits from the job file's folder (a relative path, as users type it); returns the job id.
pub fn submit(url: &str, job: &Path) -> String {
    let out = Command::new(bin("rlhf"))
        .args(["submit", job.file_name().unwrap().to_str().unwrap()])
        .current_dir(job.parent().unwrap())
        .env("RLHF_COORDINATOR", url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// When the job first entered `state` (unix seconds).
pub fn entered(info: &serde_json::Value, state: &str) -> f64 {
    info["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["state"] == state)
        .and_then(|h| h["at"].as_f64())
        .unwrap_or_else(|| panic!("never {state}: {info}"))
}

/// The reason the job first entered `placing` with (which workers it was placed on).
pub fn placing_reason(info: &serde_json::Value) -> String {
    info["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["state"] == "placing")
        .and_then(|h| h["reason"].as_str())
        .unwrap_or_else(|| panic!("never placing: {info}"))
        .to_string()
}

/// `rlhf status ID --json`.
pub fn status(url: &str, id: &str) -> serde_json::Value {
    let out = cli(url, &["status", id, "--json"]);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits until job `id` is in `state`, failing fast if it failed instead.
pub fn wait_state(url: &str, id: &str, state: &str, within: Duration) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    wait_for(&format!("{id} to be {state}"), within, || {
        last = status(url, id);
        assert!(
            !(last["state"] == "failed" && state != "failed"),
            "{id} failed: {last}"
        );
        last["state"] == state
    });
    last
}

/// Kills the coordinator running `id` (a job of `total` steps) after its second step, starts
/// `next`, and checks the job finishes, resumed from its checkpoint, with every step applied once.
pub fn survives_coordinator_death(
    url: &str,
    id: &str,
    mut first: ServiceProcess,
    total: u64,
    next: impl FnOnce() -> ServiceProcess,
) {
    wait_for("two steps", Duration::from_secs(120), || {
        status(url, id)["last_step"].as_u64().unwrap_or(0) >= 2
    });
    let out = PathBuf::from(status(url, id)["output_dir"].as_str().unwrap());
    first.kill();
    let second = next();
    let done = wait_state(&second.url(), id, "succeeded", Duration::from_secs(240));
    assert!(
        done["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["reason"]
                .as_str()
                .unwrap()
                .contains("resuming from the last checkpoint")),
        "{done}"
    );
    // No step twice. The metrics line of the step in flight when the coordinator died can be
    // missing: the learner applied and checkpointed it, its line was the dead process's to write.
    let steps = metric_steps(&out);
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    assert_eq!(steps.last(), Some(&total), "{steps:?}");
    assert!(steps.len() as u64 >= total - 1, "{steps:?}");
}

/// A coordinator with the `static` launcher (workers register themselves), plus `extra`.
pub fn pool_coordinator(store: &str, state: &Path, name: &str, extra: &[&str]) -> ServiceProcess {
    let args: Vec<&str> = ["--launcher", "static"]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    coordinator(store, state, name, &args)
}

/// A pool worker process (`rlhf worker --role ROLE --coordinator URL --node NODE`), killed on
/// drop. It does not inherit the test's `RLHF_DEVICE` or `CUDA_VISIBLE_DEVICES`.
pub struct Agent(std::process::Child);

impl Agent {
    pub fn start(url: &str, role: &str, node: &str) -> Agent {
        Agent::start_with(url, role, node, &[], &[])
    }

    /// With extra arguments (e.g. `--devices cuda:3`) and environment variables.
    pub fn start_with(
        url: &str,
        role: &str,
        node: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let child = Command::new(bin("rlhf"))
            .args([
                "worker",
                "--role",
                role,
                "--coordinator",
                url,
                "--node",
                node,
            ])
            .args(extra)
            .env_remove("RLHF_DEVICE")
            .env_remove("CUDA_VISIBLE_DEVICES")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Agent(child)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The pool's workers (`rlhf workers --json`).
pub fn workers(url: &str) -> Vec<serde_json::Value> {
    serde_json::from_slice(&cli(url, &["workers", "--json"]).stdout).unwrap()
}

/// The worker running assignment `<job>/<name>`, and that assignment.
pub fn assignment(
    url: &str,
    job: &str,
    name: &str,
) -> Option<(serde_json::Value, serde_json::Value)> {
    let id = format!("{job}/{name}");
    workers(url).into_iter().find_map(|w| {
        let a = w["assignments"]
            .as_array()?
            .iter()
            .find(|a| a["id"] == id.as_str())
            .cloned()?;
        Some((w, a))
    })
}
