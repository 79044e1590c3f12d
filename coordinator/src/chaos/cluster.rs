//! The chaos run's cluster on this machine: a coordinator (embedded store, `static` launcher,
//! on a fixed loopback port) and one pool worker per process of the job, each a real process
//! of the `rlhf` binary. It heals the way a cluster manager would: a coordinator or worker that
//! died is started again (the coordinator on the same port, from its store; a worker as a new
//! registration), everything else is the system's own recovery.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use rlhf_proto::client::Timeouts;
use rlhf_proto::process::ServiceProcess;
use rlhf_proto::v1;

/// How long one call to the coordinator may take.
const CALL: Duration = Duration::from_secs(5);
/// The workers' lease: a lost worker is noticed within it.
const WORKER_TTL_SECONDS: &str = "3";

struct Worker {
    role: &'static str,
    child: Child,
}

pub struct Cluster {
    exe: PathBuf,
    dir: PathBuf,
    port: u16,
    coordinator: Option<ServiceProcess>,
    workers: Vec<Worker>,
    rt: tokio::runtime::Runtime,
}

/// Sends `signal` (`KILL`, `STOP`, `CONT`) to `pid`; whether it was delivered.
pub fn signal(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Cluster {
    /// Starts the coordinator and one worker per role in `roles`, logging under `dir`.
    pub fn start(exe: &Path, dir: &Path, roles: &[&'static str]) -> Result<Cluster> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut cluster = Cluster {
            exe: exe.to_path_buf(),
            dir: dir.to_path_buf(),
            port: free_port()?,
            coordinator: None,
            workers: Vec::new(),
            rt,
        };
        cluster.start_coordinator()?;
        for (i, role) in roles.iter().enumerate() {
            let child = cluster.spawn_worker(i, role)?;
            cluster.workers.push(Worker { role, child });
        }
        Ok(cluster)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self, name: &str) -> Result<std::fs::File> {
        let path = self.dir.join(format!("{name}.log"));
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))
    }

    fn start_coordinator(&mut self) -> Result<()> {
        let store = format!("embedded:{}", self.dir.join("state/store.json").display());
        let mut last = None;
        // The port of a killed coordinator is free again at once; a moment's retry covers the
        // rest (its lock file is released with the process).
        for _ in 0..20 {
            let mut cmd = Command::new(&self.exe);
            cmd.args(["coordinator", "--listen"])
                .arg(format!("127.0.0.1:{}", self.port))
                .args(["--store", &store, "--state-dir"])
                .arg(self.dir.join("state"))
                .args(["--launcher", "static", "--name", "chaos", "--slots", "1"])
                .args(["--worker-ttl", WORKER_TTL_SECONDS])
                .stderr(self.log("coordinator")?);
            match ServiceProcess::spawn(cmd, Duration::from_secs(60)) {
                Ok(p) => {
                    self.coordinator = Some(p);
                    return Ok(());
                }
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
        }
        Err(anyhow!(
            "the chaos coordinator did not start: {} (log: {})",
            last.map(|e| e.to_string()).unwrap_or_default(),
            self.dir.join("coordinator.log").display()
        ))
    }

    /// `rlhf worker --role ROLE --node chaos-<i>`: its node label names it in the pool.
    fn spawn_worker(&self, i: usize, role: &str) -> Result<Child> {
        Command::new(&self.exe)
            .args(["worker", "--role", role, "--coordinator", &self.url()])
            .args(["--node", &node(i)])
            .env_remove("RLHF_DEVICE")
            .stdout(Stdio::null())
            .stderr(self.log(&format!("worker-{i}"))?)
            .spawn()
            .with_context(|| format!("starting worker {i} ({role})"))
    }

    /// Starts again whatever died (the coordinator, workers); what it restarted.
    pub fn heal(&mut self) -> Result<Vec<String>> {
        let mut healed = Vec::new();
        if self.coordinator.as_mut().is_none_or(|c| c.has_exited()) {
            self.coordinator = None;
            self.start_coordinator()?;
            healed.push("coordinator".to_string());
        }
        for i in 0..self.workers.len() {
            if self.workers[i].child.try_wait()?.is_some() {
                let child = self.spawn_worker(i, self.workers[i].role)?;
                self.workers[i].child = child;
                healed.push(format!("worker-{i}"));
            }
        }
        Ok(healed)
    }

    pub fn coordinator_pid(&self) -> Option<u32> {
        self.coordinator.as_ref().map(ServiceProcess::id)
    }

    pub fn worker_pid(&self, i: usize) -> Option<u32> {
        self.workers.get(i).map(|w| w.child.id())
    }

    /// Kills the coordinator process now (it is started again by [`Cluster::heal`]).
    pub fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            c.kill();
        }
    }

    fn call<T>(&self, f: impl AsyncFnOnce(String) -> Result<T, tonic::Status>) -> Result<T> {
        let url = self.url();
        self.rt
            .block_on(async move { tokio::time::timeout(CALL, f(url)).await })
            .map_err(|_| anyhow!("the coordinator did not answer within {CALL:?}"))?
            .map_err(|s| anyhow!("{}", s.message()))
    }

    pub fn submit(&self, spec_toml: String, base_dir: &Path) -> Result<v1::JobInfo> {
        let base_dir = base_dir.display().to_string();
        self.call(async move |url| {
            let mut c = rlhf_proto::client::jobs(&url, Timeouts::request(CALL))
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let r = v1::SubmitJobRequest {
                spec_toml,
                base_dir,
            };
            Ok(c.submit(r).await?.into_inner())
        })
    }

    pub fn job(&self, id: &str) -> Result<v1::JobInfo> {
        let id = id.to_string();
        self.call(async move |url| {
            let mut c = rlhf_proto::client::jobs(&url, Timeouts::request(CALL))
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            Ok(c.get(v1::GetJobRequest { id }).await?.into_inner())
        })
    }

    fn workers(&self) -> Result<Vec<v1::WorkerInfo>> {
        self.call(async move |url| {
            let mut c = rlhf_proto::client::workers(&url, Timeouts::request(CALL))
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            Ok(c.list_workers(v1::ListWorkersRequest {})
                .await?
                .into_inner()
                .workers)
        })
    }

    /// The pid of the job's process `name` (e.g. `actor-0`) once it runs.
    pub fn assignment_pid(&self, job: &str, name: &str) -> Option<u32> {
        let id = format!("{job}/{name}");
        self.workers().ok()?.into_iter().find_map(|w| {
            w.assignments
                .iter()
                .find(|a| a.id == id && a.pid > 1 && a.state == "ready")
                .map(|a| a.pid)
        })
    }

    /// The pids of the processes worker `i` runs.
    pub fn processes_of_worker(&self, i: usize) -> Vec<u32> {
        let node = node(i);
        let workers = self.workers().unwrap_or_default();
        workers
            .iter()
            .filter(|w| w.node == node)
            .flat_map(|w| w.assignments.iter().map(|a| a.pid).filter(|&p| p > 1))
            .collect()
    }
}

fn node(i: usize) -> String {
    format!("chaos-{i}")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let orphans: Vec<u32> = (0..self.workers.len())
            .flat_map(|i| self.processes_of_worker(i))
            .collect();
        for w in &mut self.workers {
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
        for pid in orphans {
            signal(pid, "KILL");
        }
        self.kill_coordinator();
    }
}
