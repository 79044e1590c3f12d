//! The coordinator on a port: the job and worker APIs, health, reflection and `/metrics`, and
//! the leader loop.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rlhf_proto::client::limits;
use rlhf_proto::v1::job_service_server::JobServiceServer;
use rlhf_proto::v1::worker_service_server::WorkerServiceServer;

use super::coordinator::{Coordinator, LauncherKind, Settings};
use super::jobs_api::JobApi;
use super::workers_api::WorkerApi;
use crate::allow::AllowedPaths;
use crate::slurm::Slurm;
use crate::store::AnyStore;

/// A coordinator as `rlhf coordinator` starts it (the flags, documented there).
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    /// `embedded:PATH` or `etcd://HOST:PORT[,HOST:PORT]`.
    pub store: String,
    pub state_dir: Option<PathBuf>,
    pub slots: Option<usize>,
    pub name: Option<String>,
    pub launcher: LauncherKind,
    /// Seconds.
    pub worker_ttl: f64,
    pub advertise_url: Option<String>,
    pub slurm_options: Vec<String>,
    /// Seconds.
    pub slurm_idle_exit: u64,
    /// `--allow-path`: where submitted jobs may read and write (empty: anywhere, allowed only
    /// on loopback or with `--insecure`).
    pub allow_paths: Vec<PathBuf>,
    /// Jobs not yet ended it holds at most.
    pub max_jobs: usize,
}

/// Opens the store, binds `listen` (printing the ready line on stdout), and serves until the
/// process is stopped.
pub async fn run(args: Config) -> Result<()> {
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
    // Checked before binding, so that a refused address is never listened on, not even briefly.
    let security = rlhf_proto::security::current();
    let addrs: Vec<_> = tokio::net::lookup_host(&args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?
        .collect();
    for addr in &addrs {
        security.check_listen(*addr).map_err(anyhow::Error::msg)?;
    }
    let allowed = if args.allow_paths.is_empty() {
        if let Some(open) = addrs.iter().find(|a| !a.ip().is_loopback())
            && !security.insecure
        {
            anyhow::bail!(
                "refusing to listen on {open} (beyond loopback) without --allow-path: a submitted job could read and write any path this process can. \
                 Give the directories jobs may use (--allow-path DIR, repeatable), or start with --insecure"
            );
        }
        AllowedPaths::any()
    } else {
        AllowedPaths::only(&args.allow_paths)
            .and_then(|a| a.with(&state_dir))
            .map_err(anyhow::Error::msg)?
    };
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
            rlhf_proto::process::host_name()
        } else {
            address.ip().to_string()
        };
        let scheme = if security.tls_on() { "https" } else { "http" };
        format!("{scheme}://{host}:{}", address.port())
    });
    // A Slurm worker that leaves before a lost worker's lease ends is not there to replace it.
    if args.launcher == LauncherKind::Slurm
        && Duration::from_secs(args.slurm_idle_exit) <= worker_ttl
    {
        anyhow::bail!(
            "--slurm-idle-exit {} is not longer than --worker-ttl {}: Slurm-started workers would leave before a lost worker's lease ends, when the job needs them",
            args.slurm_idle_exit,
            args.worker_ttl
        );
    }
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
        allowed,
        max_jobs: args.max_jobs.max(1),
    };
    let c = Coordinator::new(store, settings);
    serve(c, name, listener).await
}

/// Serves the job API on `listener` and, once elected, runs jobs.
pub async fn serve(
    coordinator: Arc<Coordinator>,
    name: String,
    listener: tokio::net::TcpListener,
) -> Result<()> {
    let jobs = JobServiceServer::new(JobApi(coordinator.clone()))
        .max_decoding_message_size(limits::CONTROL)
        .max_encoding_message_size(limits::REPLY);
    let workers = WorkerServiceServer::new(WorkerApi(coordinator.pool.clone()))
        .max_decoding_message_size(limits::CONTROL)
        .max_encoding_message_size(limits::REPLY);
    let names = vec![
        <JobServiceServer<JobApi> as tonic::server::NamedService>::NAME,
        <WorkerServiceServer<WorkerApi> as tonic::server::NamedService>::NAME,
    ];
    let host = rlhf_proto::service::ServiceHost::new(
        tonic::service::Routes::new(jobs).add_service(workers),
        names,
        coordinator.metrics.registry.clone(),
    );
    let refresher = coordinator.clone();
    tokio::spawn(async move {
        loop {
            if let Err(e) = refresher.refresh_metrics().await {
                tracing::debug!("refreshing metrics: {e:#}");
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    let leader = tokio::spawn(coordinator.lead(name));
    tokio::select! {
        served = host.serve(listener, rlhf_proto::service::shutdown_signal()) => served?,
        led = leader => led.map_err(|e| anyhow::anyhow!("scheduler task: {e}"))??,
    }
    Ok(())
}

/// Where a coordinator keeps state by default.
pub fn default_state_dir() -> PathBuf {
    Path::new("runs").join("coordinator")
}
