//! `rlhf coordinator` end to end: real coordinator, worker and etcd processes on loopback, jobs
//! submitted and followed through the CLI. A shared pool run by priority, cancel, a restarted
//! coordinator resuming its jobs (embedded store), and a standby taking over (etcd store).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rlhf_proto::process::ServiceProcess;
use rlhf_tests::cluster::{
    cli, embedded_store, entered, job, status, submit, survives_coordinator_death, wait_state,
};
use rlhf_tests::{Etcd, bin, wait_for};

fn coordinator(store: &str, state_dir: &Path, slots: usize, name: &str) -> ServiceProcess {
    rlhf_tests::cluster::coordinator(store, state_dir, name, &["--slots", &slots.to_string()])
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

#[test]
fn jobs_share_the_pool_by_priority_and_cancel_frees_workers() {
    let dir = tempfile::tempdir().unwrap();
    let store = embedded_store(&dir.path().join("state"));
    let c = coordinator(&store, &dir.path().join("state"), 1, "c1");
    let url = c.url();

    let long = submit(&url, &job(dir.path(), "long", 200, 0, ""));
    wait_for(
        "the long job's first step",
        Duration::from_secs(120),
        || status(&url, &long)["last_step"].as_u64().unwrap_or(0) >= 1,
    );
    // The slot is taken: these wait, and the higher priority goes first.
    let low = submit(&url, &job(dir.path(), "low", 2, 0, ""));
    let high = submit(&url, &job(dir.path(), "high", 2, 5, ""));
    assert_eq!(status(&url, &low)["state"], "queued");
    assert_eq!(status(&url, &high)["state"], "queued");

    let long_dir = PathBuf::from(status(&url, &long)["output_dir"].as_str().unwrap());
    let workers: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(long_dir.join("workers/endpoints.json")).unwrap(),
    )
    .unwrap();
    let pids: Vec<u32> = workers
        .iter()
        .map(|w| w["pid"].as_u64().unwrap() as u32)
        .collect();
    assert!(!pids.is_empty() && pids.iter().all(|p| alive(*p)));
    cli(&url, &["cancel", &long]);
    let cancelled = wait_state(&url, &long, "cancelled", Duration::from_secs(120));
    assert!(cancelled["last_step"].as_u64().unwrap() < 200);
    wait_for(
        "the cancelled job's workers to exit",
        Duration::from_secs(30),
        || pids.iter().all(|p| !alive(*p)),
    );

    let high_done = wait_state(&url, &high, "succeeded", Duration::from_secs(240));
    let low_done = wait_state(&url, &low, "succeeded", Duration::from_secs(240));
    assert!(
        entered(&high_done, "placing") < entered(&low_done, "placing"),
        "priority 5 starts before priority 0"
    );
    assert!(
        entered(&low_done, "placing") >= entered(&high_done, "succeeded"),
        "one slot: the second job waits for the first"
    );
    let listed = String::from_utf8(cli(&url, &["jobs"]).stdout).unwrap();
    for id in [&long, &low, &high] {
        assert!(listed.contains(id.as_str()), "{listed}");
    }
    // A finished job cannot be cancelled; an unknown one is named.
    let again = Command::new(bin("rlhf"))
        .args(["cancel", &high, "--coordinator", &url])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already succeeded"));
    let unknown = Command::new(bin("rlhf"))
        .args(["status", "nope-1", "--coordinator", &url])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no job `nope-1`"));
}

#[test]
fn a_flood_of_submits_is_refused_past_the_job_bound_and_an_oversized_file_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = embedded_store(&dir.path().join("state"));
    let state = dir.path().join("state");
    // No workers: every job waits to be placed, none ends.
    let c = rlhf_tests::cluster::pool_coordinator(&store, &state, "c1", &["--max-jobs", "3"]);
    let submit_one = |name: &str| {
        let path = job(dir.path(), name, 3, 0, "");
        Command::new(bin("rlhf"))
            .args(["submit", path.to_str().unwrap(), "--coordinator", &c.url()])
            .output()
            .unwrap()
    };
    let ids: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|name| {
            let out = submit_one(name);
            assert!(out.status.success());
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        })
        .collect();
    let out = submit_one("d");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("3 jobs are queued or running") && err.contains("--max-jobs 3"),
        "{err}"
    );
    // A cancelled job makes room again.
    cli(&c.url(), &["cancel", &ids[0]]);
    wait_state(&c.url(), &ids[0], "cancelled", Duration::from_secs(30));
    assert!(submit_one("e").status.success());
    // A job file of more than 1 MiB is refused before it is parsed.
    let huge = dir.path().join("huge.toml");
    std::fs::write(&huge, format!("# {}\n", "x".repeat(2 << 20))).unwrap();
    let out = Command::new(bin("rlhf"))
        .args(["submit", huge.to_str().unwrap(), "--coordinator", &c.url()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("spec_toml"), "{err}");
}

#[test]
fn invalid_jobs_are_refused_with_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let store = embedded_store(dir.path());
    let c = coordinator(&store, dir.path(), 1, "c1");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "name = \"bad name\"\n[policy]\nmodel = \"nowhere\"\n[data]\nprompts = \"none.jsonl\"\n[[objective]]\nname = \"a\"\n").unwrap();
    let out = Command::new(bin("rlhf"))
        .args(["submit", bad.to_str().unwrap(), "--coordinator", &c.url()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for field in ["name:", "policy.model", "data.prompts"] {
        assert!(err.contains(field), "{err}");
    }
}

#[test]
fn a_restarted_coordinator_resumes_its_jobs_from_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = embedded_store(&dir.path().join("state"));
    let state = dir.path().join("state");
    let first = coordinator(&store, &state, 1, "c1");
    let url = first.url();
    let id = submit(&url, &job(dir.path(), "restart", 8, 0, ""));
    survives_coordinator_death(&url, &id, first, 8, || {
        coordinator(&store, &state, 1, "c1-again")
    });
}

#[test]
fn a_standby_coordinator_takes_over_from_the_active_one_with_etcd() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let store = format!("etcd://{}", etcd.endpoint);
    let state = dir.path().join("state");
    let active = coordinator(&store, &state, 1, "active");
    let standby = coordinator(&store, &state, 1, "standby");
    // Submitted to the standby: any coordinator accepts jobs; the active one runs them.
    let id = submit(&standby.url(), &job(dir.path(), "takeover", 8, 0, ""));
    let url = standby.url();
    survives_coordinator_death(&url, &id, active, 8, move || standby);
}

/// The fencing path: the active coordinator is paused (SIGSTOP) past its lease, a standby takes
/// the job over, and the old one, resumed, finds its lease lost and steps down (exits) instead
/// of running on beside the new leader. The job finishes once, under the standby.
#[test]
fn a_paused_leader_steps_down_when_it_resumes_and_the_standby_finishes_the_job() {
    paused_leader(&[]);
}

/// The same with the old leader's lease timer off: only the fence stops it. Its controller
/// and job-record writes after the takeover are refused (every step is recorded once, by the
/// standby) and it exits with code 3 when its first write or check meets the new leader.
#[test]
fn a_paused_leader_without_its_lease_timer_is_stopped_by_the_fence() {
    paused_leader(&[("RLHF_FAULT_NO_LEASE_TIMER", "1".to_string())]);
}

fn paused_leader(env: &[(&str, String)]) {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let store = format!("etcd://{}", etcd.endpoint);
    let state = dir.path().join("state");
    let mut active =
        rlhf_tests::cluster::coordinator_with(&store, &state, "active", &["--slots", "1"], env);
    let standby = coordinator(&store, &state, 1, "standby");
    let url = standby.url();
    let id = submit(&url, &job(dir.path(), "paused", 10, 0, ""));
    wait_for("two steps", Duration::from_secs(120), || {
        status(&url, &id)["last_step"].as_u64().unwrap_or(0) >= 2
    });
    let out = PathBuf::from(status(&url, &id)["output_dir"].as_str().unwrap());
    // The paused leader's own workers, to clean up after it.
    let endpoints: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("workers/endpoints.json")).unwrap())
            .unwrap();
    let orphans: Vec<u32> = endpoints
        .iter()
        .filter_map(|w| w["pid"].as_u64())
        .map(|p| p as u32)
        .collect();
    rlhf_tests::signal(active.id(), "STOP");
    // The lease (6 s) expires; the standby wins the election and resumes the job.
    wait_for(
        "the standby to resume the job",
        Duration::from_secs(60),
        || {
            status(&url, &id)["history"]
                .as_array()
                .unwrap()
                .iter()
                .any(|h| {
                    h["reason"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("resuming from the last checkpoint")
                })
        },
    );
    rlhf_tests::signal(active.id(), "CONT");
    wait_for(
        "the old leader to step down",
        Duration::from_secs(15),
        || active.has_exited(),
    );
    assert_eq!(active.exit_status().and_then(|s| s.code()), Some(3));
    let done = wait_state(&url, &id, "succeeded", Duration::from_secs(240));
    // Every step once, in order: none lost, none written twice by the two leaders.
    let steps = rlhf_tests::metric_steps(&out);
    assert_eq!(steps, (1..=10).collect::<Vec<u64>>(), "{done}");
    for pid in orphans {
        if alive(pid) {
            rlhf_tests::signal(pid, "KILL");
        }
    }
}
