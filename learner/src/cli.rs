//! Command-line entry points shared by the `learner` binary and `rlhf`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use rlhf_proto::logging::LogFormat;

use crate::collective::{Collective, Solo, TcpRing};
use crate::config::LearnerConfig;
use crate::engine::Engine;

/// Where and how to run a learner.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Learner configuration (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// gRPC address; port 0 picks a free port (printed on stdout as `listening on ADDR`).
    #[arg(long, default_value = "127.0.0.1:50071")]
    pub listen: SocketAddr,
    /// This process's data-parallel rank (overrides the config).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Comma-separated collective endpoints of every rank, in rank order (overrides the config).
    #[arg(long, value_delimiter = ',')]
    pub peers: Option<Vec<String>>,
    /// Restore the latest checkpoint of the output directory before serving, when one exists.
    #[arg(long)]
    pub resume: bool,
}

/// The `learner` binary's command line.
#[derive(Debug, clap::Parser)]
#[command(
    name = "learner",
    version,
    about = "Train a policy with PPO or GRPO on pushed rollouts"
)]
pub struct BinaryArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    #[arg(long, default_value = "text")]
    pub log_format: LogFormat,
}

/// The collective this rank's configuration asks for.
pub fn collective(p: &crate::config::ParallelConfig) -> Result<Box<dyn Collective>> {
    if p.world_size() == 1 {
        return Ok(Box::new(Solo));
    }
    match p.backend {
        crate::config::CollectiveBackend::Tcp => Ok(Box::new(
            TcpRing::connect(
                p.rank,
                &p.peers,
                Duration::from_secs(120),
                Duration::from_secs(600),
            )
            .context("joining the data-parallel ring")?,
        )),
        crate::config::CollectiveBackend::Nccl => nccl(p),
    }
}

#[cfg(feature = "nccl")]
fn nccl(p: &crate::config::ParallelConfig) -> Result<Box<dyn Collective>> {
    let hex_id =
        std::env::var("RLHF_NCCL_ID").context("parallel.backend = \"nccl\" needs RLHF_NCCL_ID")?;
    let bytes = hex::decode(hex_id.trim()).context("RLHF_NCCL_ID is not hex")?;
    let id: [u8; 128] = bytes.try_into().map_err(|b: Vec<u8>| {
        anyhow::anyhow!("RLHF_NCCL_ID holds {} bytes, NCCL ids have 128", b.len())
    })?;
    Ok(Box::new(crate::nccl::NcclRing::new(
        p.device,
        p.rank,
        p.world_size(),
        id,
    )?))
}

#[cfg(not(feature = "nccl"))]
fn nccl(_p: &crate::config::ParallelConfig) -> Result<Box<dyn Collective>> {
    anyhow::bail!("parallel.backend = \"nccl\": this learner was built without the `nccl` feature")
}

/// How long open connections may keep the server up once the engine has stopped (and
/// checkpointed) after SIGTERM; a client stream that stays open longer is cut.
const DRAIN: Duration = Duration::from_secs(10);

/// Builds the engine (joining the collective when there are several ranks), prints the ready
/// line and serves until Ctrl-C / SIGTERM. Then `Step` calls not started are refused, a running
/// step finishes, rank 0 checkpoints the last applied step unless a checkpoint of it exists, and
/// the function returns `Ok` (exit status 0) once that is done.
pub fn serve_blocking(args: ServeArgs) -> Result<()> {
    let mut config = LearnerConfig::from_file(&args.config)?;
    if let Some(rank) = args.rank {
        config.parallel.rank = rank;
    }
    if let Some(peers) = args.peers {
        config.parallel.peers = peers;
    }
    config.validate().map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let resume = args.resume;
        let engine = tokio::task::spawn_blocking(move || -> Result<Engine> {
            let collective = collective(&config.parallel)?;
            let mut engine = Engine::new(config, collective)?;
            if resume {
                resume_latest(&mut engine)?;
            }
            Ok(engine)
        })
        .await??;
        let learner = crate::server::start(engine);
        let stopper = learner.stopper();
        println!(
            "{}{}",
            rlhf_proto::process::READY_PREFIX,
            listener.local_addr()?
        );
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let server = crate::server::serve(learner, listener, async move {
            let mut stop_rx = stop_rx;
            let _ = stop_rx.wait_for(|s| *s).await;
        });
        tokio::pin!(server);
        tokio::select! {
            served = &mut server => {
                return served.context("the learner service stopped");
            }
            () = rlhf_proto::service::shutdown_signal() => {}
        }
        tracing::info!("stop signal: finishing a running step, then checkpointing");
        stop_tx.send_replace(true);
        let (engine_done, engine_done_rx) = tokio::sync::oneshot::channel::<()>();
        let stop = async move {
            let stopped = stopper.stop().await;
            let _ = engine_done.send(());
            stopped
        };
        let drain = async move {
            tokio::select! {
                served = &mut server => served,
                () = async {
                    let _ = engine_done_rx.await;
                    tokio::time::sleep(DRAIN).await;
                } => {
                    tracing::warn!("connections still open {DRAIN:?} after the engine stopped; exiting");
                    Ok(())
                }
            }
        };
        let (served, stopped) = tokio::join!(drain, stop);
        match stopped.context("checkpointing on the way out")? {
            Some(path) => tracing::info!(path = %path.display(), "checkpoint written; stopped"),
            None => tracing::info!("nothing new to checkpoint; stopped"),
        }
        served.context("the learner service")
    })
}

/// `--resume`: restores the newest checkpoint of the output folder, or says loudly that there
/// is none (training then starts from the initial policy at step 0).
fn resume_latest(engine: &mut Engine) -> Result<()> {
    let root = engine.config.output_dir.join("checkpoints");
    match crate::checkpoint::latest(&root) {
        Some(path) => {
            crate::checkpoint::verify(&path)?;
            engine
                .load_state(&path)
                .with_context(|| format!("resuming from {}", path.display()))?;
            tracing::info!(path = %path.display(), step = engine.step(), "resumed");
        }
        None => tracing::warn!(
            folder = %root.display(),
            "--resume: no checkpoint found; starting from the initial policy at step 0"
        ),
    }
    Ok(())
}
