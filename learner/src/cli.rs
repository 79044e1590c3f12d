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

/// Builds the engine (joining the ring when there are several ranks), prints the ready line and
/// serves until Ctrl-C / SIGTERM.
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
            let collective: Box<dyn Collective> = if config.parallel.world_size() > 1 {
                Box::new(
                    TcpRing::connect(
                        config.parallel.rank,
                        &config.parallel.peers,
                        Duration::from_secs(120),
                        Duration::from_secs(600),
                    )
                    .context("joining the data-parallel ring")?,
                )
            } else {
                Box::new(Solo)
            };
            let mut engine = Engine::new(config, collective)?;
            if resume {
                let root = engine.config.output_dir.join("checkpoints");
                if let Some(path) = crate::checkpoint::latest(&root) {
                    crate::checkpoint::verify(&path)?;
                    engine.load_state(&path)?;
                    tracing::info!(path = %path.display(), step = engine.step(), "resumed");
                }
            }
            Ok(engine)
        })
        .await??;
        let learner = crate::server::start(engine);
        println!(
            "{}{}",
            rlhf_proto::process::READY_PREFIX,
            listener.local_addr()?
        );
        crate::server::serve(learner, listener, rlhf_proto::service::shutdown_signal()).await
    })
}
