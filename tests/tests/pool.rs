//! The worker pool end to end: `rlhf coordinator --launcher static` with `rlhf worker --role R
//! --coordinator URL` processes that register themselves, on loopback, with both stores. Jobs
//! wait for workers, run on them, survive a killed learner process and a killed actor worker,
//! and give the workers back when they end.

use std::path::PathBuf;
use std::time::Duration;

use rlhf_tests::cluster::{
    Agent, assignment, cli, embedded_store, entered, job, placing_reason, pool_coordinator, status,
    submit, survives_coordinator_death, wait_state, workers,
};
use rlhf_tests::{Etcd, metric_steps, signal, wait_for};

/// The job-file lines that make a tiny job PPO with a critic.
const PPO: &str = "[learner]\nalgorithm = \"ppo\"\n[learner.ppo]\ncritic_lr = 1e-4\n";

fn step(url: &str, id: &str) -> u64 {
    status(url, id)["last_step"].as_u64().unwrap_or(0)
}

#[test]
fn a_grpo_job_waits_for_workers_runs_on_them_and_frees_them_with_etcd() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let store = format!("etcd://{}", etcd.endpoint);
    let c = pool_coordinator(&store, &dir.path().join("state"), "c1", &[]);
    let url = c.url();

    // Submitted before any worker registered: it waits, and says for what.
    let id = submit(
        &url,
        &job(dir.path(), "pooled", 3, 0, "[resources]\nactors = 2\n"),
    );
    wait_for("the waiting note", Duration::from_secs(30), || {
        let s = status(&url, &id);
        s["state"] == "queued"
            && s["waiting"]
                .as_str()
                .unwrap()
                .contains("needs 2 actor, 1 learner, 1 reward")
    });

    let _pool = [
        Agent::start(&url, "reward", "n1"),
        Agent::start(&url, "learner", "n1"),
        Agent::start(&url, "actor", "n2"),
        Agent::start(&url, "actor", "n3"),
    ];
    let done = wait_state(&url, &id, "succeeded", Duration::from_secs(300));
    let placed = placing_reason(&done);
    for node in ["n1-reward-1", "n1-learner-1", "n2-actor-1", "n3-actor-1"] {
        assert!(placed.contains(node), "{placed}");
    }
    let out = PathBuf::from(done["output_dir"].as_str().unwrap());
    assert_eq!(metric_steps(&out), vec![1, 2, 3]);

    // Every worker is listed, with its role and node, and free again.
    wait_for(
        "the workers to be released",
        Duration::from_secs(30),
        || {
            workers(&url)
                .iter()
                .all(|w| w["assignments"].as_array().unwrap().is_empty())
        },
    );
    let listed = workers(&url);
    assert_eq!(listed.len(), 4, "{listed:?}");
    assert!(
        listed
            .iter()
            .any(|w| w["role"] == "learner" && w["node"] == "n1")
    );
    // The coordinator's /metrics (refreshed from the store every 2 s).
    let expected = [
        "rlhf_coordinator_active 1",
        "rlhf_coordinator_jobs{state=\"succeeded\"} 1",
        "rlhf_coordinator_workers{role=\"actor\"} 2",
        "rlhf_coordinator_free_slots{role=\"learner\"} 1",
    ];
    wait_for("the coordinator's metrics", Duration::from_secs(10), || {
        let metrics = rlhf_tests::http_get(c.address, "/metrics");
        expected.iter().all(|line| metrics.contains(line))
    });
    let table = String::from_utf8(cli(&url, &["workers"]).stdout).unwrap();
    assert!(
        table.contains("n2-actor-1") && table.contains("0/1"),
        "{table}"
    );

    // Two jobs, one pool that holds one gang: the second waits until a cancel frees it.
    let long = submit(
        &url,
        &job(dir.path(), "long", 500, 0, "[resources]\nactors = 2\n"),
    );
    wait_for(
        "the long job's first step",
        Duration::from_secs(120),
        || step(&url, &long) >= 1,
    );
    let short = submit(&url, &job(dir.path(), "short", 2, 0, ""));
    wait_for("the short job to wait", Duration::from_secs(30), || {
        status(&url, &short)["waiting"]
            .as_str()
            .unwrap()
            .contains("free now: 0 actor, 0 learner, 0 reward")
    });
    cli(&url, &["cancel", &long]);
    let cancelled = wait_state(&url, &long, "cancelled", Duration::from_secs(120));
    assert!(cancelled["last_step"].as_u64().unwrap() < 500);
    let short_done = wait_state(&url, &short, "succeeded", Duration::from_secs(240));
    assert!(entered(&short_done, "placing") >= entered(&cancelled, "cancelled") - 1.0);
}

/// Waits until `f` holds; on timeout, fails with the job's status and the pool's state.
fn wait_or_dump(url: &str, id: &str, what: &str, within: Duration, f: &mut dyn FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !f() {
        if std::time::Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}\njob: {}\nworkers: {:#?}",
                status(url, id),
                workers(url)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A pool with a short worker lease (a lost worker is noticed within a few steps of a tiny
/// job): reward and learner workers on n1 and an actor worker on n2 that stay, and an actor
/// worker on n3 that the test loses.
fn pool_losing_an_actor(
    dir: &std::path::Path,
) -> (rlhf_proto::process::ServiceProcess, [Agent; 3], Agent) {
    let state = dir.join("state");
    let c = pool_coordinator(
        &embedded_store(&state),
        &state,
        "c1",
        &["--worker-ttl", "3"],
    );
    let url = c.url();
    let stable = [
        Agent::start(&url, "reward", "n1"),
        Agent::start(&url, "learner", "n1"),
        Agent::start(&url, "actor", "n2"),
    ];
    let doomed = Agent::start(&url, "actor", "n3");
    (c, stable, doomed)
}

/// Loses `doomed` (actor-1's worker), starts a spare actor worker on n4 and waits until it
/// serves actor-1; returns the spare and its actor's address.
fn replace_actor_1(
    url: &str,
    id: &str,
    doomed: Agent,
    wait: &dyn Fn(&str, &mut dyn FnMut() -> bool),
) -> (Agent, String) {
    let (lost, _) = assignment(url, id, "actor-1").expect("actor-1 is placed");
    drop(doomed);
    let spare = Agent::start(url, "actor", "n4");
    let mut address = String::new();
    wait("the spare worker to take actor-1", &mut || {
        assignment(url, id, "actor-1").is_some_and(|(w, a)| {
            address = a["url"].as_str().unwrap_or_default().to_string();
            w["id"] != lost["id"] && w["node"] == "n4" && a["state"] == "ready"
        })
    });
    (spare, address)
}

#[test]
fn a_ppo_job_on_pool_workers_survives_a_killed_learner_and_a_lost_actor_worker() {
    const STEPS: u64 = 80;
    let dir = tempfile::tempdir().unwrap();
    let (c, _stable, doomed) = pool_losing_an_actor(dir.path());
    let url = c.url();
    let ppo = format!("{PPO}[resources]\nactors = 2\n");
    let id = submit(&url, &job(dir.path(), "ppo-pool", STEPS, 0, &ppo));
    let wait = |what: &str, f: &mut dyn FnMut() -> bool| {
        wait_or_dump(&url, &id, what, Duration::from_secs(120), f)
    };
    wait("step 2", &mut || step(&url, &id) >= 2);

    // The learner process is killed (its worker lives): it is restarted from its checkpoint.
    let (_, learner) = assignment(&url, &id, "learner-0").expect("the learner is placed");
    let generation = learner["generation"].as_u64().unwrap();
    assert!(step(&url, &id) < STEPS / 2, "the job must still be running");
    signal(learner["pid"].as_u64().unwrap() as u32, "KILL");
    wait("the learner's restart", &mut || {
        assignment(&url, &id, "learner-0")
            .is_some_and(|(_, a)| a["generation"] == generation + 1 && a["state"] == "ready")
    });

    // The actor worker on n3 dies with its process: the other actor takes its prompts, and a
    // worker that registers later is given the assignment, the weights, and joins.
    let at = step(&url, &id);
    wait("a step after the learner's restart", &mut || {
        step(&url, &id) > at
    });
    let _spare = replace_actor_1(&url, &id, doomed, &wait);

    let done = wait_state(&url, &id, "succeeded", Duration::from_secs(400));
    let out = PathBuf::from(done["output_dir"].as_str().unwrap());
    // Every step once, in order: none lost, none applied twice.
    assert_eq!(metric_steps(&out), (1..=STEPS).collect::<Vec<u64>>());
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("critic/value_loss"));
}

#[test]
fn an_async_job_on_pool_workers_takes_in_a_replacement_actor() {
    const STEPS: u64 = 80;
    let dir = tempfile::tempdir().unwrap();
    let (c, _stable, doomed) = pool_losing_an_actor(dir.path());
    let url = c.url();
    let path = job(
        dir.path(),
        "async-pool",
        STEPS,
        0,
        "[resources]\nactors = 2\n",
    );
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "max_new_tokens = 16",
        "max_new_tokens = 16\nmode = \"async\"\nmax_staleness = 2",
    );
    std::fs::write(&path, text).unwrap();
    let id = submit(&url, &path);
    let wait = |what: &str, f: &mut dyn FnMut() -> bool| {
        wait_or_dump(&url, &id, what, Duration::from_secs(120), f)
    };
    wait("step 2", &mut || step(&url, &id) >= 2);
    let (_spare, address) = replace_actor_1(&url, &id, doomed, &wait);
    // It joins the pipelined generation: it gets weights and generates for later steps.
    wait("the replacement actor to generate", &mut || {
        rlhf_tests::actor_info(&address)
            .is_some_and(|i| i.generated_tokens > 0 && i.weight_version > 0)
    });
    assert!(step(&url, &id) < STEPS, "the job must still be running");
    let done = wait_state(&url, &id, "succeeded", Duration::from_secs(400));
    let out = PathBuf::from(done["output_dir"].as_str().unwrap());
    assert_eq!(metric_steps(&out), (1..=STEPS).collect::<Vec<u64>>());
}

#[test]
fn data_parallel_learner_ranks_form_their_ring_across_pool_workers() {
    let dir = tempfile::tempdir().unwrap();
    let store = embedded_store(&dir.path().join("state"));
    let c = pool_coordinator(&store, &dir.path().join("state"), "c1", &[]);
    let url = c.url();
    let _pool = [
        Agent::start(&url, "reward", "n1"),
        Agent::start(&url, "learner", "n1"),
        Agent::start(&url, "learner", "n2"),
        Agent::start(&url, "actor", "n3"),
    ];
    let id = submit(
        &url,
        &job(dir.path(), "ring", 3, 0, "[resources]\nlearner_ranks = 2\n"),
    );
    let done = wait_state(&url, &id, "succeeded", Duration::from_secs(300));
    let out = PathBuf::from(done["output_dir"].as_str().unwrap());
    assert_eq!(metric_steps(&out), vec![1, 2, 3]);
    // Each rank's config names both ranks' ring addresses: a port each learner worker offered.
    let config: toml::Table = std::fs::read_to_string(out.join("workers/learner-1.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let peers = config["parallel"]["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 2, "{peers:?}");
    assert_ne!(peers[0], peers[1]);
}

#[test]
fn a_job_waiting_to_be_placed_again_is_cancelled_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let store = embedded_store(&state);
    let mut first = pool_coordinator(&store, &state, "c1", &[]);
    let url = first.url();
    let pool = [
        Agent::start(&url, "reward", "n1"),
        Agent::start(&url, "learner", "n1"),
        Agent::start(&url, "actor", "n2"),
    ];
    let id = submit(&url, &job(dir.path(), "orphan", 500, 0, ""));
    wait_for("step 1", Duration::from_secs(120), || step(&url, &id) >= 1);
    // The coordinator and its workers die; a new coordinator finds the job with no one to run it
    // and nowhere to place it.
    first.kill();
    drop(pool);
    let second = pool_coordinator(&store, &state, "c2", &[]);
    let url = second.url();
    wait_for(
        "the orphan to wait for workers",
        Duration::from_secs(60),
        || {
            let s = status(&url, &id);
            s["state"] == "placing" && s["waiting"].as_str().unwrap().contains("needs")
        },
    );
    cli(&url, &["cancel", &id]);
    let cancelled = wait_state(&url, &id, "cancelled", Duration::from_secs(10));
    assert!(cancelled["last_step"].as_u64().unwrap() < 500);
}

// The `slurm` launcher (pool placement plus sbatch for the missing workers) is tested against a
// real Slurm in tests/slurm.rs; every case the stand-in scripts here covered (the script's
// contents, a batch job that ends before its workers start) a real Slurm produces too.

#[test]
fn a_ppo_job_on_pool_workers_follows_a_standby_coordinator_that_takes_over_with_etcd() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let store = format!("etcd://{}", etcd.endpoint);
    let state = dir.path().join("state");
    let ttl = ["--worker-ttl", "4"];
    let active = pool_coordinator(&store, &state, "active", &ttl);
    let standby = pool_coordinator(&store, &state, "standby", &ttl);
    let both = format!("{},{}", active.url(), standby.url());
    let _pool = [
        Agent::start(&both, "reward", "n1"),
        Agent::start(&both, "learner", "n1"),
        Agent::start(&both, "actor", "n2"),
    ];
    let url = standby.url();
    let id = submit(&url, &job(dir.path(), "failover", 40, 0, PPO));
    survives_coordinator_death(&url, &id, active, 40, move || standby);
}
