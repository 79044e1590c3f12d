//! The `local` launcher: a job's workers as child `rlhf worker` processes on this machine.
//!
//! Each worker gets its configuration file in `<job out>/workers/`, logs to
//! `<job out>/logs/<role>-<i>.log`, binds a free loopback port and reports it on its ready line.
//! Children are killed when the cluster is dropped.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rlhf_learner::config::ParallelConfig;
use rlhf_proto::process::ServiceProcess;
use tokio::sync::Mutex;

use crate::controller::{Endpoints, Supervisor};
use crate::job::JobSpec;

const READY: Duration = Duration::from_secs(300);

/// A job's running workers.
pub struct LocalCluster {
    exe: PathBuf,
    out: PathBuf,
    pub reward: ServiceProcess,
    pub learners: Vec<ServiceProcess>,
    pub actors: Vec<ServiceProcess>,
    learner_configs: Vec<PathBuf>,
    peers: Vec<String>,
}

fn free_ports(n: usize) -> Result<Vec<String>> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    Ok(listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<std::io::Result<_>>()?)
}

impl LocalCluster {
    /// Starts the reward server(s), learner ranks and actors of `job` (`exe` is the `rlhf`
    /// binary). With `resume`, learners restore their latest checkpoint.
    pub fn launch(job: &JobSpec, exe: &Path, resume: bool) -> Result<LocalCluster> {
        let out = job.output_dir();
        let workers = out.join("workers");
        std::fs::create_dir_all(&workers).context("creating the workers folder")?;
        std::fs::create_dir_all(out.join("logs")).context("creating the logs folder")?;
        let rewards = workers.join("rewards.toml");
        std::fs::write(&rewards, job.reward_config_text()).context("writing rewards.toml")?;

        let ranks = job.resources.learner_ranks;
        let peers = if ranks > 1 {
            free_ports(ranks)?
        } else {
            Vec::new()
        };
        let mut learner_configs = Vec::new();
        for rank in 0..ranks {
            let parallel = ParallelConfig {
                rank,
                peers: peers.clone(),
                ..Default::default()
            };
            let config = job.learner_config(&out.join("learner"), &parallel);
            let path = workers.join(format!("learner-{rank}.toml"));
            std::fs::write(
                &path,
                toml::to_string(&config).context("serialising the learner config")?,
            )?;
            learner_configs.push(path);
        }
        let mut cluster = LocalCluster {
            exe: exe.to_path_buf(),
            out: out.clone(),
            reward: spawn(
                exe,
                &out,
                "reward-0",
                &["reward", "--config", rewards.to_str().unwrap_or_default()],
            )?,
            learners: Vec::new(),
            actors: Vec::new(),
            learner_configs,
            peers,
        };
        // Ranks wait for each other to form the ring, so they start together.
        let handles: Vec<_> = (0..ranks)
            .map(|rank| {
                let (exe, out, config) = (
                    cluster.exe.clone(),
                    out.clone(),
                    cluster.learner_configs[rank].clone(),
                );
                std::thread::spawn(move || learner_process(&exe, &out, rank, &config, resume))
            })
            .collect();
        for h in handles {
            cluster.learners.push(
                h.join()
                    .map_err(|_| anyhow::anyhow!("a launcher thread panicked"))??,
            );
        }
        let model = job.policy.model.display().to_string();
        let max_seq = job.resources.max_sequences.to_string();
        for i in 0..job.resources.actors {
            cluster.actors.push(spawn(
                exe,
                &out,
                &format!("actor-{i}"),
                &["actor", "--model", &model, "--max-sequences", &max_seq],
            )?);
        }
        cluster.write_endpoints()?;
        Ok(cluster)
    }

    /// `workers/endpoints.json`: role, address and pid of every worker (for people and tests).
    fn write_endpoints(&self) -> Result<()> {
        let entry = |role: &str, i: usize, p: &ServiceProcess| serde_json::json!({"role": role, "index": i, "address": p.url(), "pid": p.id()});
        let mut all = vec![entry("reward", 0, &self.reward)];
        all.extend(
            self.learners
                .iter()
                .enumerate()
                .map(|(i, p)| entry("learner", i, p)),
        );
        all.extend(
            self.actors
                .iter()
                .enumerate()
                .map(|(i, p)| entry("actor", i, p)),
        );
        let path = self.out.join("workers").join("endpoints.json");
        std::fs::write(&path, serde_json::to_string_pretty(&all)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            actors: self.actors.iter().map(ServiceProcess::url).collect(),
            learners: self.learners.iter().map(ServiceProcess::url).collect(),
            reward: self.reward.url(),
        }
    }

    /// Starts learner `rank` again (restoring the latest checkpoint); returns its address.
    pub fn relaunch_learner(&mut self, rank: usize) -> Result<String> {
        if !self.peers.is_empty() {
            anyhow::bail!(
                "relaunching one rank of a data-parallel learner is not supported by the local launcher; restart the job with --resume"
            );
        }
        self.learners[rank].kill();
        let p = learner_process(
            &self.exe,
            &self.out,
            rank,
            &self.learner_configs[rank],
            true,
        )?;
        let url = p.url();
        self.learners[rank] = p;
        self.write_endpoints()?;
        Ok(url)
    }
}

fn learner_process(
    exe: &Path,
    out: &Path,
    rank: usize,
    config: &Path,
    resume: bool,
) -> Result<ServiceProcess> {
    let mut args = vec!["learner", "--config", config.to_str().unwrap_or_default()];
    if resume {
        args.push("--resume");
    }
    spawn(exe, out, &format!("learner-{rank}"), &args)
}

/// Starts `rlhf worker --role ROLE -- ARGS --listen 127.0.0.1:0`, logging to a file.
fn spawn(exe: &Path, out: &Path, name: &str, role_and_args: &[&str]) -> Result<ServiceProcess> {
    let log_path = out.join("logs").join(format!("{name}.log"));
    let log = File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("worker")
        .arg("--role")
        .arg(role_and_args[0])
        .arg("--");
    cmd.args(&role_and_args[1..])
        .args(["--listen", "127.0.0.1:0"]);
    cmd.stderr(log);
    // Its own process group: a Ctrl-C at the terminal reaches `rlhf run` (which checkpoints and
    // stops the workers itself), not the workers directly.
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    ServiceProcess::spawn(cmd, READY)
        .with_context(|| format!("starting {name} (log: {})", log_path.display()))
}

/// The local launcher as the controller's supervisor.
pub struct LocalSupervisor(pub Arc<Mutex<LocalCluster>>);

#[tonic::async_trait]
impl Supervisor for LocalSupervisor {
    async fn replace_learner(&self, rank: usize) -> Result<String> {
        let cluster = self.0.clone();
        tokio::task::spawn_blocking(move || cluster.blocking_lock().relaunch_learner(rank)).await?
    }

    async fn new_actors(&self) -> Vec<String> {
        Vec::new()
    }
}
