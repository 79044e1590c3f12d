//! The `local` launcher: a job's workers as child `rlhf worker` processes on this machine.
//!
//! Each worker gets its configuration file in `<job out>/workers/`, logs to
//! `<job out>/logs/<role>-<i>.log`, binds a free loopback port and reports it on its ready line.
//! `workers/endpoints.json` lists them (role, index, address, pid, device). Children are killed
//! when the cluster is dropped.
//!
//! What dies is started again through [`LocalSupervisor`]: a dead reward replica is respawned
//! with its command (the controller asks before each step and after scoring failed); a dead
//! learner rank takes the whole data-parallel ring down with it (the survivors are killed) and
//! every rank is started again from the last checkpoint, on the same ring ports.
//!
//! Devices: with `[resources] devices`, each process is given one through `RLHF_DEVICE`
//! ([`device_for`]: learner ranks first, then actors, then reward replicas, each the next
//! entry, wrapping around). Without, the processes inherit this process's `RLHF_DEVICE`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use rlhf_learner::config::ParallelConfig;
use rlhf_proto::process::ServiceProcess;
use tokio::sync::Mutex;

use crate::controller::{Endpoints, Supervisor};
use crate::job::{JobSpec, ResourcesSpec};

use rlhf_proto::process::{READY_TIMEOUT, free_ports, worker_process};

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

    /// The configuration file it is started with (`--config PATH`), if any.
    pub fn config(&self) -> Option<PathBuf> {
        let at = self.args.iter().position(|a| a == "--config")?;
        self.args.get(at + 1).map(PathBuf::from)
    }
}

/// Writes the job's worker configuration files into `<out>/workers/` and returns the command of
/// every worker: the reward replicas, the learner ranks in order (`peers`: their ring addresses
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
    // Every replica serves the same configuration.
    let mut commands: Vec<WorkerCommand> = (0..job.resources.reward_replicas)
        .map(|i| WorkerCommand {
            role: "reward",
            index: i,
            args: vec!["--config".into(), path_arg(&rewards)],
        })
        .collect();
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

/// Rewrites the ring addresses (`[parallel] peers`) of a learner configuration written by
/// [`worker_commands`] (a rank moved to another worker, whose collective port differs).
pub fn set_ring_peers(config: &Path, peers: &[String]) -> Result<()> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let mut table: toml::Table = text
        .parse()
        .with_context(|| format!("{}: not TOML", config.display()))?;
    let parallel = table
        .entry("parallel")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(parallel) = parallel else {
        bail!("{}: `parallel` is not a table", config.display());
    };
    parallel.insert(
        "peers".into(),
        toml::Value::Array(peers.iter().cloned().map(toml::Value::String).collect()),
    );
    crate::job::write_atomic(config, toml::to_string(&table)?.as_bytes())
        .with_context(|| format!("writing {}", config.display()))
}

/// What is wrong with one entry of `[resources] devices`, if anything: an entry is `cpu` or
/// `cuda:N` (N the GPU's number on this machine), the values `RLHF_DEVICE` takes.
pub fn device_problem(device: &str) -> Option<String> {
    let ok = device == "cpu"
        || device
            .strip_prefix("cuda:")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    (!ok).then(|| format!("`{device}` is not a device (expected `cpu` or `cuda:N`, e.g. `cuda:0`)"))
}

/// Every problem of `[resources] devices`, each naming its entry
/// (`resources.devices[1]: ...`), for the job's validation.
pub fn devices_problems(devices: &[String]) -> Vec<String> {
    devices
        .iter()
        .enumerate()
        .filter_map(|(i, d)| device_problem(d).map(|p| format!("resources.devices[{i}]: {p}")))
        .collect()
}

/// The device of one of a job's processes: the learner ranks take the first entries of
/// `devices`, then the actors, then the reward replicas, each the next entry, wrapping around
/// (`devices[position % len]`). `None` when `devices` is empty.
pub fn device_for(resources: &ResourcesSpec, role: &str, index: usize) -> Option<String> {
    if resources.devices.is_empty() {
        return None;
    }
    let position = match role {
        "learner" => index,
        "actor" => resources.learner_ranks + index,
        _ => resources.learner_ranks + resources.actors + index,
    };
    Some(resources.devices[position % resources.devices.len()].clone())
}

/// One running worker of a local cluster.
struct LocalWorker {
    command: WorkerCommand,
    /// Its `RLHF_DEVICE`, if the job names devices.
    device: Option<String>,
    process: ServiceProcess,
}

/// A job's running workers.
pub struct LocalCluster {
    exe: PathBuf,
    out: PathBuf,
    /// The reward replicas, the learner ranks in order, then the actors.
    workers: Vec<LocalWorker>,
}

/// A process to start: its command and device.
type Planned = (WorkerCommand, Option<String>);

impl LocalCluster {
    /// Starts the reward replicas, learner ranks and actors of `job` (`exe` is the `rlhf`
    /// binary), all at once (ranks wait for each other to form their ring). With `resume`,
    /// learners restore their latest checkpoint.
    pub fn launch(job: &JobSpec, exe: &Path, resume: bool) -> Result<LocalCluster> {
        let problems = devices_problems(&job.resources.devices);
        if !problems.is_empty() {
            bail!("{}", problems.join("; "));
        }
        let ranks = job.resources.learner_ranks;
        let peers = if ranks > 1 {
            free_ports("127.0.0.1", ranks)?
                .iter()
                .map(ToString::to_string)
                .collect()
        } else {
            Vec::new()
        };
        let planned: Vec<Planned> = worker_commands(job, resume, &peers)?
            .into_iter()
            .map(|c| {
                let device = device_for(&job.resources, c.role, c.index);
                (c, device)
            })
            .collect();
        let out = job.output_dir();
        let processes = spawn_all(exe, &out, &planned)?;
        let cluster = LocalCluster {
            exe: exe.to_path_buf(),
            out,
            workers: planned
                .into_iter()
                .zip(processes)
                .map(|((command, device), process)| LocalWorker {
                    command,
                    device,
                    process,
                })
                .collect(),
        };
        cluster.write_endpoints()?;
        Ok(cluster)
    }

    /// `workers/endpoints.json`: role, index, address, pid and device of every worker (for
    /// people and tests), replaced atomically.
    fn write_endpoints(&self) -> Result<()> {
        let all: Vec<serde_json::Value> = self
            .workers
            .iter()
            .map(|w| {
                serde_json::json!({
                    "role": w.command.role,
                    "index": w.command.index,
                    "address": w.process.url(),
                    "pid": w.process.id(),
                    "device": w.device,
                })
            })
            .collect();
        let path = self.out.join("workers").join("endpoints.json");
        crate::job::write_atomic(&path, serde_json::to_string_pretty(&all)?.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }

    fn urls(&self, role: &str) -> Vec<String> {
        self.workers
            .iter()
            .filter(|w| w.command.role == role)
            .map(|w| w.process.url())
            .collect()
    }

    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            actors: self.urls("actor"),
            learners: self.urls("learner"),
            rewards: self.urls("reward"),
        }
    }

    /// Starts every learner rank again, restoring the latest checkpoint; returns their
    /// addresses in rank order. The ranks still running are killed first (a data-parallel ring
    /// with a dead rank cannot go on); they all start together on the ring's old ports.
    pub fn relaunch_learners(&mut self) -> Result<Vec<String>> {
        let ranks: Vec<usize> = (0..self.workers.len())
            .filter(|&i| self.workers[i].command.role == "learner")
            .collect();
        for &i in &ranks {
            // SIGKILL and reaped: its ports (gRPC, ring) are free once this returns.
            self.workers[i].process.kill();
            self.workers[i].command = self.workers[i].command.resuming();
        }
        let planned: Vec<Planned> = ranks
            .iter()
            .map(|&i| {
                (
                    self.workers[i].command.clone(),
                    self.workers[i].device.clone(),
                )
            })
            .collect();
        let fresh = spawn_all(&self.exe, &self.out, &planned)?;
        for (&i, process) in ranks.iter().zip(fresh) {
            self.workers[i].process = process;
        }
        self.write_endpoints()?;
        Ok(self.urls("learner"))
    }

    /// Starts again every reward replica whose process exited; whether there was any.
    pub fn restart_dead_rewards(&mut self) -> Result<bool> {
        let mut dead = Vec::new();
        for (i, w) in self.workers.iter_mut().enumerate() {
            if w.command.role != "reward" {
                continue;
            }
            if let Some(status) = w.process.exit_status() {
                tracing::warn!("{} exited ({status}); starting it again", w.command.name());
                dead.push(i);
            }
        }
        if dead.is_empty() {
            return Ok(false);
        }
        let planned: Vec<Planned> = dead
            .iter()
            .map(|&i| {
                (
                    self.workers[i].command.clone(),
                    self.workers[i].device.clone(),
                )
            })
            .collect();
        let fresh = spawn_all(&self.exe, &self.out, &planned)
            .context("restarting a reward server that died")?;
        for (&i, process) in dead.iter().zip(fresh) {
            self.workers[i].process = process;
        }
        self.write_endpoints()?;
        Ok(true)
    }
}

/// Starts every planned process at once (one thread each); their processes in order, or the
/// first error (the ones that did start are killed).
fn spawn_all(exe: &Path, out: &Path, planned: &[Planned]) -> Result<Vec<ServiceProcess>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = planned
            .iter()
            .map(|(command, device)| {
                scope.spawn(move || spawn(exe, out, command, device.as_deref()))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow!("a launcher thread panicked"))?
            })
            .collect()
    })
}

/// Starts `rlhf worker --role ROLE -- ARGS --listen 127.0.0.1:0` with `RLHF_DEVICE=device`
/// (when given), logging to `<out>/logs/<role>-<index>.log`.
fn spawn(
    exe: &Path,
    out: &Path,
    command: &WorkerCommand,
    device: Option<&str>,
) -> Result<ServiceProcess> {
    let log_path = out.join("logs").join(format!("{}.log", command.name()));
    let mut cmd = worker_process(exe, command.role, &command.args, &log_path, "127.0.0.1")?;
    if let Some(device) = device {
        cmd.env("RLHF_DEVICE", device);
    }
    // Its own process group: a Ctrl-C at the terminal reaches `rlhf run` (which checkpoints and
    // stops the workers itself), not the workers directly.
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    ServiceProcess::spawn(cmd, READY_TIMEOUT).with_context(|| {
        let last = last_line(&log_path)
            .map(|l| format!("; its last line: {l}"))
            .unwrap_or_default();
        format!(
            "starting {} (log: {}{last})",
            command.name(),
            log_path.display()
        )
    })
}

/// The last non-empty line of a log file (why a process that failed to start stopped).
fn last_line(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
}

/// The local launcher as the controller's supervisor.
pub struct LocalSupervisor(pub Arc<Mutex<LocalCluster>>);

#[tonic::async_trait]
impl Supervisor for LocalSupervisor {
    async fn replace_learners(&self) -> Result<Vec<String>> {
        let cluster = self.0.clone();
        tokio::task::spawn_blocking(move || cluster.blocking_lock().relaunch_learners()).await?
    }

    async fn new_actors(&self) -> Vec<String> {
        Vec::new()
    }

    async fn rewards(&self) -> Result<Option<Vec<String>>> {
        let cluster = self.0.clone();
        tokio::task::spawn_blocking(move || {
            let mut cluster = cluster.blocking_lock();
            Ok(cluster
                .restart_dead_rewards()?
                .then(|| cluster.urls("reward")))
        })
        .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(ranks: usize, actors: usize, rewards: usize, devices: &[&str]) -> ResourcesSpec {
        ResourcesSpec {
            actors,
            learner_ranks: ranks,
            reward_replicas: rewards,
            devices: devices.iter().map(|d| d.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn devices_go_to_learner_ranks_then_actors_then_reward_replicas_round_robin() {
        let r = resources(2, 2, 2, &["cuda:0", "cuda:1", "cuda:2"]);
        let got: Vec<_> = [
            ("learner", 0),
            ("learner", 1),
            ("actor", 0),
            ("actor", 1),
            ("reward", 0),
            ("reward", 1),
        ]
        .iter()
        .map(|(role, i)| device_for(&r, role, *i).unwrap())
        .collect();
        assert_eq!(
            got,
            ["cuda:0", "cuda:1", "cuda:2", "cuda:0", "cuda:1", "cuda:2"]
        );
        assert_eq!(device_for(&resources(1, 1, 1, &[]), "actor", 0), None);
        let one = resources(1, 3, 1, &["cpu"]);
        assert!((0..3).all(|i| device_for(&one, "actor", i).as_deref() == Some("cpu")));
    }

    #[test]
    fn device_entries_are_cpu_or_cuda_with_a_number() {
        for ok in ["cpu", "cuda:0", "cuda:12"] {
            assert_eq!(device_problem(ok), None, "{ok}");
        }
        for bad in [
            "gpu", "cuda", "cuda:", "cuda:x", "cuda:-1", "CPU", " cpu", "flex",
        ] {
            assert!(device_problem(bad).is_some(), "{bad}");
        }
        let problems = devices_problems(&["cpu".into(), "tpu:0".into()]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("resources.devices[1]: `tpu:0`"),
            "{problems:?}"
        );
    }

    #[test]
    fn ring_peers_are_rewritten_in_a_learner_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("learner-1.toml");
        std::fs::write(
            &path,
            "policy = \"/m\"\n[parallel]\nrank = 1\npeers = [\"a:1\", \"b:2\"]\n",
        )
        .unwrap();
        set_ring_peers(&path, &["a:1".into(), "c:3".into()]).unwrap();
        let table: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
        assert_eq!(table["policy"].as_str(), Some("/m"));
        assert_eq!(table["parallel"]["rank"].as_integer(), Some(1));
        let peers: Vec<&str> = table["parallel"]["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        assert_eq!(peers, ["a:1", "c:3"]);
    }

    #[test]
    fn a_command_names_its_config_file() {
        let c = WorkerCommand {
            role: "learner",
            index: 0,
            args: vec!["--config".into(), "/out/workers/learner-0.toml".into()],
        };
        assert_eq!(
            c.config().as_deref(),
            Some(Path::new("/out/workers/learner-0.toml"))
        );
        assert_eq!(c.resuming().resuming().args.last().unwrap(), "--resume");
        assert_eq!(c.resuming().args.len(), 3);
    }
}
