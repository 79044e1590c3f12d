//! Secure by default (docs/security.md), with real processes: a coordinator over TLS with a
//! token table, its local workers over TLS too, and the CLI as users run it. Refused requests
//! are refused with the right status and change nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use rlhf_proto::process::ServiceProcess;
use rlhf_tests::cluster::embedded_store;
use rlhf_tests::{bin, metric_steps, tiny_job, tiny_job_with, wait_for};

/// A CA with one certificate for this machine, and a token table.
struct Secrets {
    pki: PathBuf,
    tokens: PathBuf,
}

impl Secrets {
    fn make(root: &Path) -> Secrets {
        let pki = root.join("pki");
        let tokens = root.join("tokens");
        for args in [
            vec!["certs", "--out", pki.to_str().unwrap(), "--name", "node"],
            vec!["certs", "--out", pki.to_str().unwrap(), "--name", "user"],
            vec!["tokens", "--out", tokens.to_str().unwrap()],
        ] {
            let out = Command::new(bin("rlhf")).args(&args).output().unwrap();
            assert!(
                out.status.success(),
                "rlhf {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Secrets { pki, tokens }
    }

    /// A server's environment: the CA and this machine's certificate.
    fn server_env(&self) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("RLHF_TLS_CA", self.pki.join("ca.pem")),
            ("RLHF_TLS_CERT", self.pki.join("node.pem")),
            ("RLHF_TLS_KEY", self.pki.join("node.key")),
        ]
    }

    fn token(&self, role: &str) -> PathBuf {
        self.tokens.join(format!("{role}.token"))
    }
}

/// `rlhf` with none of the test's own security settings (docs/security.md's variables).
fn bare_rlhf() -> Command {
    use rlhf_proto::security::env;
    let mut cmd = Command::new(bin("rlhf"));
    for k in [
        env::TLS_CA,
        env::TLS_CERT,
        env::TLS_KEY,
        env::TLS_CLIENT_AUTH,
        env::TOKEN,
        env::TOKEN_FILE,
        env::INSECURE,
    ] {
        cmd.env_remove(k);
    }
    cmd
}

/// `rlhf [global] coordinator --listen LISTEN` on an embedded store in `state`, with `extra`
/// flags and `env`, and none of the test's own security settings.
fn coordinator_command(
    global: &[&str],
    listen: &str,
    state: &Path,
    env: &[(&str, PathBuf)],
    extra: &[&str],
) -> Command {
    let mut cmd = bare_rlhf();
    cmd.args(global)
        .args([
            "coordinator",
            "--listen",
            listen,
            "--store",
            &embedded_store(state),
        ])
        .arg("--state-dir")
        .arg(state)
        .args(extra)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null());
    cmd
}

/// `rlhf coordinator` on a loopback port with `env` and `extra` flags.
fn coordinator(state: &Path, env: &[(&str, PathBuf)], extra: &[&str]) -> ServiceProcess {
    let mut cmd = coordinator_command(&[], "127.0.0.1:0", state, env, extra);
    cmd.stderr(Stdio::null());
    ServiceProcess::spawn(cmd, Duration::from_secs(60)).expect("the coordinator starts")
}

/// `rlhf ARGS` as a user with `env` (no security settings from the test's own environment).
fn rlhf(url: &str, env: &[(&str, PathBuf)], args: &[&str], dir: Option<&Path>) -> Output {
    let mut cmd = bare_rlhf();
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    cmd.args(args)
        .env("RLHF_COORDINATOR", url)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn job_count(url: &str, env: &[(&str, PathBuf)]) -> usize {
    let out = rlhf(url, env, &["jobs"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).lines().count() - 1
}

#[test]
fn tokens_decide_who_may_read_submit_and_cancel_and_the_job_runs_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = Secrets::make(dir.path());
    let state = dir.path().join("state");
    let table = secrets.tokens.join("tokens");
    let c = coordinator(
        &state,
        &secrets.server_env(),
        &["--tokens", table.to_str().unwrap()],
    );
    let url = c.url();
    let ca = ("RLHF_TLS_CA", secrets.pki.join("ca.pem"));
    let as_role = |role: &str| vec![ca.clone(), ("RLHF_TOKEN_FILE", secrets.token(role))];
    let job = tiny_job(dir.path(), "secure", "");
    let job_dir = job.parent().unwrap();

    // No token, or one the coordinator does not know: UNAUTHENTICATED, nothing submitted.
    let out = rlhf(&url, std::slice::from_ref(&ca), &["jobs"], None);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no bearer token"), "{}", stderr(&out));
    let stranger = dir.path().join("stranger.token");
    std::fs::write(&stranger, "0123456789abcdef0123456789abcdef\n").unwrap();
    let out = rlhf(
        &url,
        &[ca.clone(), ("RLHF_TOKEN_FILE", stranger)],
        &["submit", "job.toml"],
        Some(job_dir),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not one this server accepts"),
        "{}",
        stderr(&out)
    );
    // A read token reads but may not submit; the join token may not submit either.
    for role in ["read", "join"] {
        let out = rlhf(&url, &as_role(role), &["submit", "job.toml"], Some(job_dir));
        assert!(!out.status.success(), "a {role} token submitted");
        assert!(
            stderr(&out).contains(&format!("a {role} token may not call this method")),
            "{}",
            stderr(&out)
        );
    }
    assert_eq!(
        job_count(&url, &as_role("read")),
        0,
        "refused submissions left nothing behind"
    );

    // The submit token submits; the job runs on local workers that serve TLS and check the
    // cluster's join token, driven by the coordinator presenting it.
    let out = rlhf(
        &url,
        &as_role("submit"),
        &["submit", "job.toml"],
        Some(job_dir),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let out = rlhf(&url, &as_role("read"), &["cancel", &id], None);
    assert!(!out.status.success(), "a read token cancelled");
    let status = |env: &[(&str, PathBuf)]| -> serde_json::Value {
        let out = rlhf(&url, env, &["status", &id, "--json"], None);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    wait_for("the job to succeed", Duration::from_secs(300), || {
        let s = status(&as_role("read"));
        assert_ne!(s["state"], "failed", "{s}");
        assert_ne!(s["state"], "cancelled", "a refused cancel cancelled: {s}");
        s["state"] == "succeeded"
    });
    let run = PathBuf::from(status(&as_role("read"))["output_dir"].as_str().unwrap());
    assert_eq!(metric_steps(&run), vec![1, 2, 3]);

    // A plaintext client cannot talk to the TLS coordinator, token or not.
    let out = rlhf(
        &url,
        &[("RLHF_TOKEN_FILE", secrets.token("read"))],
        &["jobs"],
        None,
    );
    assert!(!out.status.success(), "a plaintext client was answered");
    assert!(
        stderr(&out).contains("give its CA with --tls-ca"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn mutual_tls_refuses_a_client_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = Secrets::make(dir.path());
    let state = dir.path().join("state");
    let mut env = secrets.server_env();
    env.push(("RLHF_TLS_CLIENT_AUTH", "1".into()));
    let c = coordinator(&state, &env, &[]);
    let url = c.url();
    let ca = ("RLHF_TLS_CA", secrets.pki.join("ca.pem"));
    let out = rlhf(&url, std::slice::from_ref(&ca), &["jobs"], None);
    assert!(
        !out.status.success(),
        "answered a client without a certificate"
    );
    let with_cert = [
        ca,
        ("RLHF_TLS_CERT", secrets.pki.join("user.pem")),
        ("RLHF_TLS_KEY", secrets.pki.join("user.key")),
    ];
    let out = rlhf(&url, &with_cert, &["jobs"], None);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_job_may_touch_only_the_allowed_directories() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let jobs = dir.path().join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    let fixtures = rlhf_tests::fixtures();
    let c = coordinator(
        &state,
        &[],
        &[
            "--allow-path",
            jobs.to_str().unwrap(),
            "--allow-path",
            fixtures.to_str().unwrap(),
        ],
    );
    let url = c.url();
    for d in ["etc", "linked", "fine"] {
        std::fs::create_dir_all(jobs.join(d)).unwrap();
    }
    let submit = |job: &Path| {
        rlhf(
            &url,
            &[],
            &["submit", "job.toml"],
            Some(job.parent().unwrap()),
        )
    };
    let etc = tiny_job_with(&jobs.join("etc"), "etc", &[("output_dir", "/etc".into())]);
    let out = submit(&etc);
    assert!(!out.status.success(), "a job writing to /etc was accepted");
    assert!(
        stderr(&out).contains("output_dir: /etc is outside"),
        "{}",
        stderr(&out)
    );
    // A symlink inside an allowed directory that leads out of it does not let the job out.
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    rlhf_tests::write_prompts(&outside.join("p.jsonl"), "p", 4);
    std::os::unix::fs::symlink(&outside, jobs.join("escape")).unwrap();
    let linked = tiny_job_with(
        &jobs.join("linked"),
        "linked",
        &[("data.prompts", "../escape/p.jsonl".into())],
    );
    let out = submit(&linked);
    assert!(
        !out.status.success(),
        "a path through a symlink out was accepted"
    );
    assert!(stderr(&out).contains("data.prompts"), "{}", stderr(&out));
    assert_eq!(job_count(&url, &[]), 0);
    // Inside the allowed directories the same job is accepted.
    let fine = tiny_job(&jobs.join("fine"), "fine", "");
    let out = submit(&fine);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn listening_beyond_loopback_needs_tls_tokens_and_allowed_paths_or_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let start = |env: &[(&str, PathBuf)], extra: &[&str]| -> Output {
        coordinator_command(&[], "0.0.0.0:0", &state, env, extra)
            .output()
            .unwrap()
    };
    let out = start(&[], &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("refusing to listen on 0.0.0.0:0"), "{err}");
    assert!(
        err.contains("TLS") && err.contains("tokens") && err.contains("--insecure"),
        "{err}"
    );
    assert!(
        out.stdout.is_empty(),
        "it printed a ready line: it listened"
    );
    // With TLS and tokens it still wants to know which paths jobs may use.
    let secrets = Secrets::make(dir.path());
    let table = secrets.tokens.join("tokens");
    let out = start(
        &secrets.server_env(),
        &["--tokens", table.to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("without --allow-path"),
        "{}",
        stderr(&out)
    );
    // A pool worker advertising a non-loopback address refuses too.
    let out = bare_rlhf()
        .args([
            "worker",
            "--role",
            "actor",
            "--coordinator",
            "http://127.0.0.1:9",
            "--advertise",
            "0.0.0.0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--advertise 0.0.0.0: refusing to listen"),
        "{}",
        stderr(&out)
    );
    // `--insecure` starts, and says what it exposes.
    let mut cmd = coordinator_command(&["--insecure"], "0.0.0.0:0", &state, &[], &[]);
    cmd.env("RUST_LOG", "warn")
        .stderr(std::fs::File::create(dir.path().join("insecure.log")).unwrap());
    let mut insecure =
        ServiceProcess::spawn(cmd, Duration::from_secs(60)).expect("--insecure starts");
    wait_for("the warning", Duration::from_secs(10), || {
        std::fs::read_to_string(dir.path().join("insecure.log"))
            .unwrap()
            .contains("--insecure: serving beyond loopback without TLS and tokens")
    });
    insecure.kill();
}

#[test]
fn a_broken_security_setting_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[(&str, &str)], &str); 4] = [
        (
            &[("RLHF_TLS_CA", "/nonexistent/ca.pem")],
            "RLHF_TLS_CA /nonexistent/ca.pem",
        ),
        (
            &[("RLHF_TLS_CERT", "/x.pem")],
            "RLHF_TLS_CERT and RLHF_TLS_KEY go together",
        ),
        (
            &[("RLHF_TOKEN", "short")],
            "the token (RLHF_TOKEN/RLHF_TOKEN_FILE) is 5 characters long",
        ),
        (&[("RLHF_INSECURE", "yes")], "RLHF_INSECURE=\"yes\""),
    ];
    for (env, want) in cases {
        let out = Command::new(bin("rlhf"))
            .args(["jobs"])
            .current_dir(dir.path())
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{env:?}");
        assert!(stderr(&out).contains(want), "{env:?}: {}", stderr(&out));
    }
    let table = dir.path().join("tokens");
    std::fs::write(
        &table,
        "read 0123456789abcdef0123\nadmin 0123456789abcdef0124\n",
    )
    .unwrap();
    let out = Command::new(bin("rlhf"))
        .args([
            "coordinator",
            "--store",
            "embedded:/nonexistent/x",
            "--tokens",
            table.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(":2: unknown role `admin`"),
        "{}",
        stderr(&out)
    );
}
