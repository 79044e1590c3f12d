//! The `local` launcher: a job's workers as child `rlhf worker` processes on this machine.
//!
//! Each worker gets its configuration file in `<job out>/workers/`, logs to
//! `<job out>/logs/<role>-<i>.log`, binds a free loopback port and reports it on its ready line.
//! Children are killed when the cluster is dropped.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use rlhf_learner::config::ParallelConfig;
use rlhf_proto::process::ServiceProcess;
use tokio::sync::Mutex;

use crate::controller::{Endpoints, Supervisor};
use crate::job::JobSpec;

use rlhf_proto::process::{READY_TIMEOUT, free_ports, worker_process};

/// A job's running workers.
pub struct LocalCluster {
    exe: PathBuf,
    out: PathBuf,
    pub reward: ServiceProcess,
    pub learners: Vec<ServiceProcess>,
    pub actors: Vec<ServiceProcess>,
    learner_commands: Vec<WorkerCommand>,
    peers: Vec<String>,
}

/// One worker process of a job, as any launcher starts it:
/// `rlhf worker --role ROLE -- ARGS --listen HOST:0`.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerCommand {
    /// `reward`, `learner` or `actor`.
    pub role: &'static str,
    /// Rank for learners, replica number otherwise.
    pub index: usize,
    pub args: Vec<String>,
}

impl WorkerCommand {
    /// `role-index`: the name of its log file and of its assignment.
    pub fn name(&self) -> String {
        format!("{}-{}", self.role, self.index)
    }

    /// The same learner, restoring its latest checkpoint.
    pub fn resuming(&self) -> WorkerCommand {
        let mut c = self.clone();
        if c.role == "learner" && !c.args.iter().any(|a| a == "--resume") {
            c.args.push("--resume".into());
        }
        c
    }
}

/// Writes the job's worker configuration files into `<out>/workers/` and returns the command of
/// every worker: the reward server, the learner ranks in order (`peers`: their ring addresses
/// when there are several), then the actors. With `resume`, learners restore their latest
/// checkpoint.
pub fn worker_commands(
    job: &JobSpec,
    resume: bool,
    peers: &[String],
) -> Result<Vec<WorkerCommand>> {
    let out = job.output_dir();
    let workers = out.join("workers");
    std::fs::create_dir_all(&workers).context("creating the workers folder")?;
    std::fs::create_dir_all(out.join("logs")).context("creating the logs folder")?;
    let path_arg = |p: &Path| p.display().to_string();
    let rewards = workers.join("rewards.toml");
    std::fs::write(&rewards, job.reward_config_text()).context("writing rewards.toml")?;
    let mut commands = vec![WorkerCommand {
        role: "reward",
        index: 0,
        args: vec!["--config".into(), path_arg(&rewards)],
    }];
    for rank in 0..job.resources.learner_ranks {
        let parallel = ParallelConfig {
            rank,
            peers: peers.to_vec(),
            ..Default::default()
        };
        let config = job.learner_config(&out.join("learner"), &parallel);
        let path = workers.join(format!("learner-{rank}.toml"));
        std::fs::write(
            &path,
            toml::to_string(&config).context("serialising the learner config")?,
        )
        .with_context(|| format!("writing {}", path.display()))?;
        let command = WorkerCommand {
            role: "learner",
            index: rank,
            args: vec!["--config".into(), path_arg(&path)],
        };
        commands.push(if resume { command.resuming() } else { command });
    }
    let model = job.policy.model.display().to_string();
    let max_seq = job.resources.max_sequences.to_string();
    for i in 0..job.resources.actors {
        commands.push(WorkerCommand {
            role: "actor",
            index: i,
            args: vec![
                "--model".into(),
                model.clone(),
                "--max-sequences".into(),
                max_seq.clone(),
            ],
        });
    }
    Ok(commands)
}

impl LocalCluster {
    /// Starts the reward server(s), learner ranks and actors of `job` (`exe` is the `rlhf`
    /// binary). With `resume`, learners restore their latest checkpoint.
    pub fn launch(job: &JobSpec, exe: &Path, resume: bool) -> Result<LocalCluster> {
        let out = job.output_dir();
        let ranks = job.resources.learner_ranks;
        let peers = if ranks > 1 {
            free_ports("127.0.0.1", ranks)?
                .iter()
                .map(ToString::to_string)
                .collect()
        } else {
            Vec::new()
        };
        let commands = worker_commands(job, resume, &peers)?;
        let of = |role: &str| -> Vec<WorkerCommand> {
            commands
                .iter()
                .filter(|c| c.role == role)
                .cloned()
                .collect()
        };
        let reward = of("reward").remove(0);
        let mut cluster = LocalCluster {
            exe: exe.to_path_buf(),
            out: out.clone(),
            reward: spawn(exe, &out, &reward)?,
            learners: Vec::new(),
            actors: Vec::new(),
            learner_commands: of("learner"),
            peers,
        };
        // Ranks wait for each other to form the ring, so they start together.
        let handles: Vec<_> = cluster
            .learner_commands
            .iter()
            .map(|command| {
                let (exe, out, command) = (cluster.exe.clone(), out.clone(), command.clone());
                std::thread::spawn(move || spawn(&exe, &out, &command))
            })
            .collect();
        for h in handles {
            cluster.learners.push(
                h.join()
                    .map_err(|_| anyhow::anyhow!("a launcher thread panicked"))??,
            );
        }
        for actor in of("actor") {
            cluster.actors.push(spawn(exe, &out, &actor)?);
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
            rewards: vec![self.reward.url()],
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
        let p = spawn(
            &self.exe,
            &self.out,
            &self.learner_commands[rank].resuming(),
        )?;
        let url = p.url();
        self.learners[rank] = p;
        self.write_endpoints()?;
        Ok(url)
    }
}

/// Starts `rlhf worker --role ROLE -- ARGS --listen 127.0.0.1:0`, logging to
/// `<out>/logs/<role>-<index>.log`.
fn spawn(exe: &Path, out: &Path, command: &WorkerCommand) -> Result<ServiceProcess> {
    let log_path = out.join("logs").join(format!("{}.log", command.name()));
    let mut cmd = worker_process(exe, command.role, &command.args, &log_path, "127.0.0.1")?;
    // Its own process group: a Ctrl-C at the terminal reaches `rlhf run` (which checkpoints and
    // stops the workers itself), not the workers directly.
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    ServiceProcess::spawn(cmd, READY_TIMEOUT)
        .with_context(|| format!("starting {} (log: {})", command.name(), log_path.display()))
}

/// The local launcher as the controller's supervisor.
pub struct LocalSupervisor(pub Arc<Mutex<LocalCluster>>);

#[tonic::async_trait]
impl Supervisor for LocalSupervisor {
    async fn replace_learners(&self) -> Result<Vec<String>> {
        let cluster = self.0.clone();
        tokio::task::spawn_blocking(move || cluster.blocking_lock().relaunch_learner(0))
            .await?
            .map(|a| vec![a])
    }

    async fn new_actors(&self) -> Vec<String> {
        Vec::new()
    }

    async fn rewards(&self) -> Result<Option<Vec<String>>> {
        Ok(None)
    }
}
