//! `rlhf logs` end to end: a job on pool workers (`--launcher static`, workers logging JSON)
//! whose logs are followed through the coordinator's `Logs` stream while it runs, an `rlhf run`
//! output folder read directly, and an unknown job.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rlhf_tests::cluster::{Agent, cli, coordinator, embedded_store, job, status, submit};
use rlhf_tests::{Stopped, bin, tiny_job, wait_for};

/// Steps of the followed job.
const STEPS: u64 = 12;

/// The sources of every job of the tiny fixtures (one reward server, learner and actor).
const SOURCES: [&str; 4] = ["controller", "reward-0", "learner-0", "actor-0"];

/// The pid of job `id`'s learner process on its pool worker.
fn learner_pid(url: &str, id: &str) -> u32 {
    let workers: Vec<serde_json::Value> =
        serde_json::from_slice(&cli(url, &["workers", "--json"]).stdout).unwrap();
    let name = format!("{id}/learner-0");
    workers
        .iter()
        .flat_map(|w| w["assignments"].as_array().unwrap().iter())
        .find(|a| a["id"] == name.as_str())
        .and_then(|a| a["pid"].as_u64())
        .unwrap_or_else(|| panic!("no pid for {name}: {workers:#?}")) as u32
}

/// `[source] text` → (source, text).
fn split(line: &str) -> (&str, &str) {
    line.strip_prefix('[')
        .and_then(|l| l.split_once("] "))
        .unwrap_or_else(|| panic!("no `[source] ` prefix: {line}"))
}

/// The printed lines of each source, in order.
fn by_source(lines: &[String]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in lines {
        let (source, text) = split(line);
        out.entry(source.to_string())
            .or_default()
            .push(text.to_string());
    }
    out
}

/// `rlhf logs ARGS` (asserts success); its stdout lines.
fn logs(url: &str, args: &[&str]) -> Vec<String> {
    let args: Vec<&str> = ["logs"].into_iter().chain(args.iter().copied()).collect();
    let out = cli(url, &args);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The lines of `<run>/logs/<source>.log`.
fn file_lines(run: &Path, source: &str) -> Vec<String> {
    std::fs::read_to_string(run.join("logs").join(format!("{source}.log")))
        .unwrap_or_else(|e| panic!("{source}.log: {e}"))
        .lines()
        .map(str::to_string)
        .collect()
}

/// `rlhf logs ARGS` started in the background: its stdout lines as they come, and the child.
fn follow(url: &str, args: &[&str]) -> (Child, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new(bin("rlhf"))
        .arg("logs")
        .args(args)
        .env("RLHF_COORDINATOR", url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            sink.lock().unwrap().push(line.unwrap());
        }
    });
    (child, lines)
}

/// Waits for a background `rlhf logs` to end by itself; asserts it succeeded.
fn wait_exit(child: &mut Child, within: Duration) {
    let mut code = None;
    wait_for("`rlhf logs -f` to exit", within, || {
        code = child.try_wait().unwrap();
        code.is_some()
    });
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(code.unwrap().success(), "rlhf logs -f failed: {err}");
}

#[test]
fn a_pool_job_s_logs_name_every_source_and_follow_it_to_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let c = coordinator(
        &embedded_store(&state),
        &state,
        "c1",
        &["--launcher", "static"],
    );
    let url = c.url();
    let id = submit(&url, &job(dir.path(), "logged", STEPS, 0, ""));
    let _pool = [
        Agent::start_with(&url, "reward", "n1", &[], &[("RLHF_LOG_FORMAT", "json")]),
        Agent::start_with(&url, "learner", "n1", &[], &[("RLHF_LOG_FORMAT", "json")]),
        Agent::start_with(&url, "actor", "n2", &[], &[("RLHF_LOG_FORMAT", "json")]),
    ];
    wait_for("the first step", Duration::from_secs(240), || {
        status(&url, &id)["last_step"].as_u64().unwrap_or(0) >= 1
    });

    // The learner is stopped (SIGSTOP), so the job cannot end while `-f` starts: it must be
    // following, not reading a finished job.
    let stopped = Stopped::new(learner_pid(&url, &id));
    let at_stop = status(&url, &id);
    let k = at_stop["last_step"].as_u64().unwrap();
    assert!(k + 1 < STEPS, "the job is nearly done already: {at_stop}");
    let (mut child, followed) = follow(&url, &[&id, "-f"]);
    let step_k = format!(" step {k}/{STEPS}");
    wait_for("-f to print what is there", Duration::from_secs(60), || {
        followed.lock().unwrap().iter().any(|l| l.contains(&step_k))
    });
    let last = format!(" step {STEPS}/{STEPS} ");
    assert!(
        !followed.lock().unwrap().iter().any(|l| l.contains(&last)),
        "the job cannot have finished"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "-f must wait for the job"
    );
    drop(stopped);
    // Lines written from now on come, and `-f` ends with the job.
    wait_exit(&mut child, Duration::from_secs(300));
    let done = status(&url, &id);
    assert_eq!(
        done["state"], "succeeded",
        "-f ended before the job: {done}"
    );
    let followed = by_source(&followed.lock().unwrap());
    let controller = &followed["controller"];
    assert!(
        controller.iter().any(|l| l.contains(&last)),
        "{controller:#?}"
    );
    assert!(
        controller
            .last()
            .is_some_and(|l| l.ends_with(" state succeeded: all steps done")),
        "{controller:#?}"
    );
    for source in SOURCES {
        assert!(
            followed.contains_key(source),
            "no {source} in {followed:#?}"
        );
    }

    // The whole logs: the controller first, each of its lines timestamped; the workers'
    // tracing JSON printed readably.
    let run = dir.path().join("logged/run");
    let all = logs(&url, &[&id]);
    assert_eq!(split(&all[0]).0, "controller", "{all:#?}");
    let printed = by_source(&all);
    for source in SOURCES {
        assert!(printed.contains_key(source), "no {source} in {printed:#?}");
    }
    let history = &printed["controller"];
    assert!(
        history[0].ends_with(" state queued: submitted"),
        "{history:#?}"
    );
    assert!(
        history
            .iter()
            .all(|l| l.as_bytes()[10] == b'T' && l[..24].ends_with('Z'))
    );
    assert_eq!(history, &file_lines(&run, "controller"));
    for source in &SOURCES[1..] {
        let lines = &printed[*source];
        assert!(
            lines.iter().all(|l| !l.starts_with('{')) && lines.iter().any(|l| l.contains(" INFO ")),
            "{source}: {lines:#?}"
        );
    }

    // --raw: exactly the files' lines (a worker stopping may still add some at the end).
    let raw = by_source(&logs(&url, &[&id, "--raw"]));
    for source in &SOURCES[1..] {
        let lines = &raw[*source];
        let file = file_lines(&run, source);
        assert!(
            !lines.is_empty() && file.starts_with(lines),
            "{source}: printed {lines:#?}\nfile {file:#?}"
        );
        // (A line a process printed outside tracing would not be JSON.)
        let json: Vec<serde_json::Value> = lines
            .iter()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert!(
            !json.is_empty() && json.iter().all(|v| v["level"].is_string()),
            "{source}: {lines:#?}"
        );
    }

    // --tail: the last lines of each source.
    let tail = by_source(&logs(&url, &[&id, "--tail", "3", "--raw"]));
    let controller = file_lines(&run, "controller");
    assert_eq!(tail["controller"], controller[controller.len() - 3..]);
    for source in &SOURCES[1..] {
        assert!(tail[*source].len() <= 3, "{tail:#?}");
    }
}

#[test]
fn an_rlhf_run_folder_s_logs_are_read_directly() {
    let dir = tempfile::tempdir().unwrap();
    let job = tiny_job(dir.path(), "local", "");
    let run = dir.path().join("run");
    let mut rlhf_run = Command::new(bin("rlhf"))
        .arg("run")
        .arg(&job)
        .arg("--quiet")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the run's controller log", Duration::from_secs(120), || {
        run.join("logs/controller.log").is_file()
    });
    // No coordinator: the folder is read by the CLI, and followed until job.json says done.
    let nowhere = "http://127.0.0.1:9";
    let (mut child, followed) = follow(nowhere, &[run.to_str().unwrap(), "-f"]);
    wait_exit(&mut child, Duration::from_secs(300));
    assert!(rlhf_run.wait().unwrap().success());
    let followed = by_source(&followed.lock().unwrap());
    assert!(
        followed["controller"]
            .last()
            .is_some_and(|l| l.ends_with(" state succeeded: all steps done")),
        "{followed:#?}"
    );

    // The run's workers are gone: every file is complete, and printed as it is (text logs).
    let all = by_source(&logs(nowhere, &[run.to_str().unwrap()]));
    let tail = by_source(&logs(nowhere, &[run.to_str().unwrap(), "--tail", "2"]));
    for source in SOURCES {
        let file = file_lines(&run, source);
        assert!(!file.is_empty(), "{source}: an empty log");
        assert_eq!(all[source], file, "{source}");
        assert_eq!(
            tail[source],
            file[file.len().saturating_sub(2)..],
            "{source}"
        );
    }
    for source in SOURCES {
        assert!(
            followed.contains_key(source),
            "no {source} in {followed:#?}"
        );
    }
}

#[test]
fn an_unknown_job_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(&embedded_store(dir.path()), dir.path(), "c1", &[]);
    let url = c.url();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = runtime.block_on(async {
        let timeouts = rlhf_proto::client::Timeouts::request(Duration::from_secs(30));
        let mut client = rlhf_proto::client::jobs(&url, timeouts).unwrap();
        let request = rlhf_proto::v1::LogsRequest {
            id: "nope-1".into(),
            follow: true,
            tail: 0,
        };
        client.logs(request).await.expect_err("NOT_FOUND")
    });
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert_eq!(status.message(), "no job `nope-1`");
    let out = Command::new(bin("rlhf"))
        .args(["logs", "nope-1", "-f", "--coordinator", &url])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no job `nope-1`"), "{err}");
}
