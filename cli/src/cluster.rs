//! `rlhf coordinator` and the commands that talk to one: `submit`, `jobs`, `status`, `logs`,
//! `cancel`, `workers` (address from `--coordinator` or `RLHF_COORDINATOR`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use rlhf_coordinator::logs::{self, StreamOptions};
use rlhf_coordinator::service::LauncherKind;
use rlhf_proto::client::{JobsClient, Timeouts, WorkersClient};
use rlhf_proto::error::Failure;
use rlhf_proto::v1;

use crate::runtime::block_on as block;

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
    /// The tokens this coordinator accepts: `ROLE TOKEN` per line (`rlhf tokens` makes one;
    /// docs/security.md). Its `join` token is what it presents to the services it drives.
    #[arg(long, env = "RLHF_TOKENS_FILE", value_name = "FILE")]
    pub tokens: Option<PathBuf>,
    /// A directory submitted jobs may read and write under (repeatable; symlinks resolved).
    /// Without one, jobs may use any path: allowed only when listening on loopback or with
    /// `--insecure`.
    #[arg(long = "allow-path", value_name = "DIR")]
    pub allow_paths: Vec<PathBuf>,
    /// Jobs not yet ended (queued, placing, running) the coordinator holds at most; a submit
    /// beyond it gets RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = rlhf_coordinator::service::DEFAULT_MAX_JOBS)]
    pub max_jobs: usize,
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
    const TIMEOUTS: Timeouts = Timeouts {
        connect: Duration::from_secs(5),
        request: Duration::from_secs(30),
    };

    fn client(&self) -> Result<JobsClient> {
        rlhf_proto::client::jobs(&self.coordinator, Self::TIMEOUTS)
            .with_context(|| format!("coordinator address {}", self.coordinator))
    }

    fn workers(&self) -> Result<WorkersClient> {
        rlhf_proto::client::workers(&self.coordinator, Self::TIMEOUTS)
            .with_context(|| format!("coordinator address {}", self.coordinator))
    }
}

/// A failed call, said the way the shared classification judges it.
fn status_error(e: tonic::Status, coordinator: &str) -> anyhow::Error {
    // A TLS server and a plaintext client (or the reverse) see only a broken connection or an
    // HTTP/2 protocol error; say which setting to look at.
    let hint = if rlhf_proto::security::current().tls_on() {
        " (this client speaks TLS: the coordinator must serve TLS with a certificate for this address signed by RLHF_TLS_CA)"
    } else {
        " (this client speaks plaintext: if the coordinator serves TLS, give its CA with --tls-ca or RLHF_TLS_CA)"
    };
    match Failure::of(&e) {
        Failure::Unreachable => {
            anyhow::anyhow!(
                "coordinator {coordinator} is unreachable: {}{hint}",
                e.message()
            )
        }
        _ if e.message().starts_with("h2 protocol error") => {
            anyhow::anyhow!("coordinator {coordinator}: {}{hint}", e.message())
        }
        Failure::Unavailable
        | Failure::Overloaded
        | Failure::TimedOut
        | Failure::Rejected
        | Failure::Internal => anyhow::anyhow!("{}", e.message()),
    }
}

/// Installs the coordinator's token table as the process's security configuration, and hands
/// its `join` token to the local launcher's workers through the environment.
fn install_tokens(file: &std::path::Path) -> Result<()> {
    use rlhf_proto::security::{self, Security, TokenTable, env};
    let text =
        std::fs::read_to_string(file).with_context(|| format!("--tokens {}", file.display()))?;
    let table =
        TokenTable::parse(&text, &file.display().to_string()).map_err(anyhow::Error::msg)?;
    let own_token = [env::TOKEN, env::TOKEN_FILE]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|t| !t.is_empty()));
    if !own_token && let Some(join) = table.join_token() {
        // SAFETY: `rlhf coordinator` calls this before it starts its runtime's threads.
        unsafe { std::env::set_var(env::TOKEN, join) };
    }
    let security = Security::from_env()
        .map_err(anyhow::Error::msg)?
        .with_table(table);
    if !security::install(security) {
        anyhow::bail!("internal: the security configuration was read before --tokens was");
    }
    Ok(())
}

pub fn coordinator(args: CoordinatorArgs) -> Result<()> {
    if let Some(file) = &args.tokens {
        install_tokens(file)?;
    }
    let config = rlhf_coordinator::service::Config {
        listen: args.listen,
        store: args.store,
        state_dir: args.state_dir,
        slots: args.slots,
        name: args.name,
        launcher: args.launcher,
        worker_ttl: args.worker_ttl,
        advertise_url: args.advertise_url,
        slurm_options: args.slurm_options,
        slurm_idle_exit: args.slurm_idle_exit,
        allow_paths: args.allow_paths,
        max_jobs: args.max_jobs,
    };
    crate::runtime::block_on(rlhf_coordinator::service::run(config))
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
    let ago = rlhf_coordinator::state::now() - unix;
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

/// What `rlhf logs` prints.
#[derive(Debug, Clone, Copy)]
pub struct LogsOptions {
    /// Keep printing new lines until the job ends.
    pub follow: bool,
    /// Only the last `tail` lines of each source (0: all).
    pub tail: u32,
    /// JSON log lines as they are.
    pub raw: bool,
}

/// How long `rlhf logs` without `-f` waits for the coordinator's next line (a follower waits
/// as long as the job runs; HTTP/2 keep-alives notice a coordinator that went away).
const LOG_LINE_WAIT: Duration = Duration::from_secs(30);

/// A job's logs, `[source] line` for each line of the controller's and every worker's log:
/// through the coordinator's `Logs` stream, or read here when `job` is an `rlhf run` output
/// folder (one with `job.json`).
pub fn logs(target: Target, job: String, options: LogsOptions) -> Result<()> {
    let folder = PathBuf::from(&job);
    if folder.join("job.json").is_file() {
        return local_logs(folder, options);
    }
    block(async {
        let mut lines = target
            .client()?
            .logs(v1::LogsRequest {
                id: job,
                follow: options.follow,
                tail: options.tail,
            })
            .await
            .map_err(|e| status_error(e, &target.coordinator))?
            .into_inner();
        loop {
            let next = if options.follow {
                lines.message().await
            } else {
                tokio::time::timeout(LOG_LINE_WAIT, lines.message())
                    .await
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "coordinator {} sent no log line for {LOG_LINE_WAIT:?}",
                            target.coordinator
                        )
                    })?
            };
            match next.map_err(|e| status_error(e, &target.coordinator))? {
                Some(l) => print_log_line(&l.source, &l.line, options.raw),
                None => return Ok(()),
            }
        }
    })
}

/// `rlhf logs RUN_DIR`: the logs of an `rlhf run` output folder, followed until its
/// `job.json` says the job ended.
fn local_logs(out: PathBuf, options: LogsOptions) -> Result<()> {
    let record = out.join("job.json");
    let ended = move || {
        let record = record.clone();
        async move {
            let text = tokio::fs::read_to_string(&record)
                .await
                .with_context(|| format!("reading {}", record.display()))?;
            let job: rlhf_coordinator::state::JobRecord = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a job record", record.display()))?;
            Ok(job.state.is_terminal())
        }
    };
    let stream = StreamOptions {
        follow: options.follow,
        tail: options.tail as usize,
    };
    block(async move {
        let (tx, mut rx) = tokio::sync::mpsc::channel(256);
        let reader = tokio::spawn(logs::stream(logs::folder(&out), stream, ended, tx));
        while let Some(l) = rx.recv().await {
            print_log_line(&l.source, &l.line, options.raw);
        }
        reader.await.context("the log reader")?
    })
}

/// `[source] line`, a JSON log line made readable unless `raw`.
fn print_log_line(source: &str, line: &str, raw: bool) {
    match (raw, logs::readable(line)) {
        (false, Some(readable)) => println!("[{source}] {readable}"),
        _ => println!("[{source}] {line}"),
    }
}

/// The registered workers and what they run.
pub fn workers(target: Target, json: bool) -> Result<()> {
    block(async {
        let list = target
            .workers()?
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
