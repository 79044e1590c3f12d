//! `rlhf coordinator` and the commands that talk to one: `submit`, `jobs`, `status`, `logs`,
//! `cancel`, `workers` (address from `--coordinator` or `RLHF_COORDINATOR`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use rlhf_proto::client::{Timeouts, channel};
use rlhf_proto::v1;
use rlhf_proto::v1::job_service_client::JobServiceClient;
use rlhf_proto::v1::worker_service_client::WorkerServiceClient;
use tonic::transport::Channel;

use crate::service::{Coordinator, LauncherKind, Settings, default_state_dir, serve};
use crate::slurm::Slurm;
use crate::store::AnyStore;

#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// Address to serve the job API on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:50070")]
    pub listen: String,
    /// `embedded:PATH` (one machine; state persisted to PATH) or `etcd://HOST:PORT[,HOST:PORT]`.
    #[arg(long)]
    pub store: String,
    /// Where jobs without an `output_dir` write (`<state-dir>/runs/<id>`).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Jobs run at once (default: 1 with the local launcher, whose jobs share this machine;
    /// 64 with the pool launchers, whose jobs are limited by the workers' capacity).
    #[arg(long)]
    pub slots: Option<usize>,
    /// This coordinator's name in the election (default: host and pid).
    #[arg(long)]
    pub name: Option<String>,
    /// Where jobs' workers come from: `local` (child processes here), `static` (workers that
    /// registered with `rlhf worker --role R --coordinator URL`, on any machine) or `slurm`
    /// (as `static`, and the workers a job lacks are submitted with sbatch).
    #[arg(long, value_enum, default_value = "local")]
    pub launcher: LauncherKind,
    /// Seconds a pool worker stays registered without a heartbeat (at least 2). When one is
    /// gone, its processes are replaced on other workers.
    #[arg(long, default_value_t = 10.0)]
    pub worker_ttl: f64,
    /// Where workers reach this coordinator (default: `http://HOST:PORT` of `--listen`, with
    /// this machine's name when listening on every interface).
    #[arg(long)]
    pub advertise_url: Option<String>,
    /// `slurm` launcher: an `#SBATCH` option for the worker jobs (repeatable), e.g.
    /// `--slurm-option=--partition=gpu`.
    #[arg(long = "slurm-option", allow_hyphen_values = true)]
    pub slurm_options: Vec<String>,
    /// `slurm` launcher: seconds a Slurm-started worker waits idle before it exits (ending
    /// its allocation).
    #[arg(long, default_value_t = 120)]
    pub slurm_idle_exit: u64,
}

/// Where the coordinator is.
#[derive(Debug, Args)]
pub struct Target {
    /// The coordinator's address.
    #[arg(
        long,
        env = "RLHF_COORDINATOR",
        default_value = "http://127.0.0.1:50070"
    )]
    pub coordinator: String,
}

impl Target {
    fn client(&self) -> Result<JobServiceClient<Channel>> {
        Ok(JobServiceClient::new(self.channel()?))
    }

    fn channel(&self) -> Result<Channel> {
        channel(
            &self.coordinator,
            Timeouts {
                connect: Duration::from_secs(5),
                request: Duration::from_secs(30),
            },
        )
        .with_context(|| format!("coordinator address {}", self.coordinator))
    }
}

fn status_error(e: tonic::Status, coordinator: &str) -> anyhow::Error {
    match e.code() {
        tonic::Code::Unavailable => {
            anyhow::anyhow!("coordinator {coordinator} is unreachable: {}", e.message())
        }
        _ => anyhow::anyhow!("{}", e.message()),
    }
}

pub fn coordinator(args: CoordinatorArgs) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let store = AnyStore::open(&args.store).await?;
        // Absolute: job outputs under it are named in assignments that other machines read.
        let state_dir = std::path::absolute(args.state_dir.unwrap_or_else(default_state_dir))
            .context("locating the state directory")?;
        std::fs::create_dir_all(&state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let name = args.name.unwrap_or_else(|| {
            format!(
                "{}-{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into()),
                std::process::id()
            )
        });
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        println!(
            "{}{}",
            rlhf_proto::process::READY_PREFIX,
            listener.local_addr()?
        );
        let worker_ttl = Duration::try_from_secs_f64(args.worker_ttl)
            .ok()
            .filter(|t| !t.is_zero() && *t <= Duration::from_secs(86_400))
            .with_context(|| {
                format!(
                    "--worker-ttl {}: expected 0 < seconds ≤ 86400",
                    args.worker_ttl
                )
            })?;
        let address = listener.local_addr()?;
        let advertise = args.advertise_url.clone().unwrap_or_else(|| {
            let host = if address.ip().is_unspecified() {
                crate::cli::worker::host_name()
            } else {
                address.ip().to_string()
            };
            format!("http://{host}:{}", address.port())
        });
        let slurm = (args.launcher == LauncherKind::Slurm)
            .then(|| -> Result<Slurm> {
                Ok(Slurm {
                    coordinator_url: advertise,
                    rlhf: std::env::current_exe().context("locating the rlhf binary")?,
                    options: args.slurm_options.clone(),
                    dir: state_dir.join("slurm"),
                    idle_exit: Duration::from_secs(args.slurm_idle_exit),
                })
            })
            .transpose()?;
        let settings = Settings {
            launcher: args.launcher,
            state_dir,
            slots: args.slots.unwrap_or(match args.launcher {
                LauncherKind::Local => 1,
                LauncherKind::Static | LauncherKind::Slurm => 64,
            }),
            worker_ttl,
            slurm,
        };
        let c = Coordinator::new(store, settings);
        serve(c, name, listener).await
    })
}

fn block<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Runtime::new()?.block_on(f)
}

pub fn submit(target: Target, job: PathBuf) -> Result<()> {
    let text =
        std::fs::read_to_string(&job).with_context(|| format!("reading {}", job.display()))?;
    let base = std::path::absolute(&job)
        .with_context(|| format!("locating {}", job.display()))?
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    block(async {
        let info = target
            .client()?
            .submit(v1::SubmitJobRequest {
                spec_toml: text,
                base_dir: base.display().to_string(),
            })
            .await
            .map_err(|e| status_error(e, &target.coordinator))?
            .into_inner();
        println!("{}", info.id);
        eprintln!(
            "submitted {} ({}); output in {}",
            info.id, info.state, info.output_dir
        );
        Ok(())
    })
}

fn when(unix: f64) -> String {
    let ago = crate::state::now() - unix;
    match ago {
        a if a < 120.0 => format!("{a:.0}s ago"),
        a if a < 7200.0 => format!("{:.0}m ago", a / 60.0),
        a => format!("{:.1}h ago", a / 3600.0),
    }
}

pub fn jobs(target: Target) -> Result<()> {
    block(async {
        let list = target
            .client()?
            .list(v1::ListJobsRequest {})
            .await
            .map_err(|e| status_error(e, &target.coordinator))?
            .into_inner();
        println!(
            "{:<28} {:<12} {:>9} {:>8}  submitted",
            "JOB", "STATE", "STEP", "PRIORITY"
        );
        for j in list.jobs {
            let submitted = j.history.first().map_or(String::new(), |h| when(h.at_unix));
            println!(
                "{:<28} {:<12} {:>9} {:>8}  {submitted}",
                j.id,
                j.state,
                format!("{}/{}", j.last_step, j.total_steps),
                j.priority
            );
        }
        Ok(())
    })
}

fn print_history(info: &v1::JobInfo) {
    for h in &info.history {
        println!("  {:<12} {:>10}  {}", h.state, when(h.at_unix), h.reason);
    }
}

pub fn status(target: Target, id: String, json: bool) -> Result<()> {
    block(async {
        let info = target
            .client()?
            .get(v1::GetJobRequest { id })
            .await
            .map_err(|e| status_error(e, &target.coordinator))?
            .into_inner();
        if json {
            let history: Vec<_> = info
                .history
                .iter()
                .map(|h| serde_json::json!({"state": h.state, "at": h.at_unix, "reason": h.reason}))
                .collect();
            println!(
                "{}",
                serde_json::json!({
                    "id": info.id, "name": info.name, "state": info.state,
                    "priority": info.priority, "last_step": info.last_step,
                    "total_steps": info.total_steps, "output_dir": info.output_dir,
                    "history": history, "metrics": info.metrics,
                    "waiting": info.waiting,
                })
            );
            return Ok(());
        }
        println!("job {} ({}): {}", info.id, info.name, info.state);
        println!(
            "step {}/{}, priority {}, output {}",
            info.last_step, info.total_steps, info.priority, info.output_dir
        );
        if !info.waiting.is_empty() {
            println!("{}", info.waiting);
        }
        print_history(&info);
        let mut metrics: Vec<_> = info
            .metrics
            .iter()
            .filter(|(k, _)| k.starts_with("reward/") || k.starts_with("kl/"))
            .collect();
        metrics.sort_by(|a, b| a.0.cmp(b.0));
        for (k, v) in metrics {
            println!("  {k} = {v:.4}");
        }
        Ok(())
    })
}

pub fn cancel(target: Target, id: String) -> Result<()> {
    block(async {
        let info = target
            .client()?
            .cancel(v1::CancelJobRequest { id })
            .await
            .map_err(|e| status_error(e, &target.coordinator))?
            .into_inner();
        if info.state == "cancelled" {
            eprintln!("{} cancelled", info.id);
        } else {
            eprintln!(
                "{}: stopping after its current step (checkpointed)",
                info.id
            );
        }
        Ok(())
    })
}

/// The job's history and where its worker logs are; `follow` streams its events until it ends.
pub fn logs(target: Target, id: String, follow: bool) -> Result<()> {
    block(async {
        let mut client = target.client()?;
        let info = client
            .get(v1::GetJobRequest { id: id.clone() })
            .await
            .map_err(|e| status_error(e, &target.coordinator))?
            .into_inner();
        println!(
            "job {}: worker logs in {}/logs/, metrics in {}/metrics.jsonl",
            info.id, info.output_dir, info.output_dir
        );
        let ended = ["succeeded", "failed", "cancelled"].contains(&info.state.as_str());
        if !follow || ended {
            print_history(&info);
        }
        if !follow
            || info.state == "succeeded"
            || info.state == "failed"
            || info.state == "cancelled"
        {
            return Ok(());
        }
        let mut events = client
            .watch(v1::WatchJobRequest { id })
            .await
            .map_err(|e| status_error(e, &target.coordinator))?
            .into_inner();
        while let Some(event) = events
            .message()
            .await
            .map_err(|e| status_error(e, &target.coordinator))?
        {
            match event.event {
                Some(v1::job_event::Event::State(s)) => println!("  {:<12} {}", s.state, s.reason),
                Some(v1::job_event::Event::Step(s)) => {
                    let total = s.metrics.get("reward/total").copied().unwrap_or(f64::NAN);
                    let kl = s.metrics.get("kl/sequence").copied().unwrap_or(f64::NAN);
                    println!(
                        "  step {}/{}  reward {total:.4}  kl {kl:.4}",
                        s.step, s.total
                    );
                }
                None => {}
            }
        }
        Ok(())
    })
}

/// The registered workers and what they run.
pub fn workers(target: Target, json: bool) -> Result<()> {
    block(async {
        let list = WorkerServiceClient::new(target.channel()?)
            .list_workers(v1::ListWorkersRequest {})
            .await
            .map_err(|e| status_error(e, &target.coordinator))?
            .into_inner();
        if json {
            let workers: Vec<_> = list
                .workers
                .iter()
                .map(|w| {
                    let assignments: Vec<_> = w
                        .assignments
                        .iter()
                        .map(|a| serde_json::json!({"id": a.id, "generation": a.generation, "state": a.state, "url": a.url, "detail": a.detail, "pid": a.pid}))
                        .collect();
                    serde_json::json!({
                        "id": w.id, "role": w.role, "node": w.node, "address": w.address,
                        "devices": w.devices, "capacity": w.capacity,
                        "registered": w.registered_unix, "last_heartbeat": w.last_heartbeat_unix,
                        "assignments": assignments,
                    })
                })
                .collect();
            println!("{}", serde_json::Value::Array(workers));
            return Ok(());
        }
        println!(
            "{:<28} {:<8} {:<16} {:>5}  {:<12} ASSIGNMENTS",
            "WORKER", "ROLE", "ADDRESS", "USED", "SEEN"
        );
        for w in list.workers {
            let assignments: Vec<String> = w
                .assignments
                .iter()
                .map(|a| format!("{} ({})", a.id, a.state))
                .collect();
            println!(
                "{:<28} {:<8} {:<16} {:>5}  {:<12} {}",
                w.id,
                w.role,
                w.address,
                format!("{}/{}", w.assignments.len(), w.capacity),
                when(w.last_heartbeat_unix),
                assignments.join(", ")
            );
        }
        Ok(())
    })
}
