//! Command-line entry points shared by the `reward-server` binary and `rlhf reward …`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use rlhf_proto::logging::LogFormat;

use crate::config::RewardConfig;

/// Where to serve a reward configuration.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Reward configuration (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
}

/// The `reward-server` binary's command line.
#[derive(Debug, clap::Parser)]
#[command(
    name = "reward-server",
    version,
    about = "Serve reward objectives over gRPC"
)]
pub struct BinaryArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Log line format on stderr.
    #[arg(long, default_value = "text")]
    pub log_format: LogFormat,
}

/// Loads the configuration and its models, prints `listening on ADDR` on stdout once ready, and
/// serves until Ctrl-C / SIGTERM.
pub fn serve_blocking(args: ServeArgs) -> anyhow::Result<()> {
    let config = RewardConfig::from_file(&args.config)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let timeout = config.batching.request_timeout();
        let scorer = tokio::task::spawn_blocking(move || crate::server::load(&config)).await??;
        println!("listening on {}", listener.local_addr()?);
        crate::server::serve(
            scorer,
            timeout,
            listener,
            rlhf_proto::service::shutdown_signal(),
        )
        .await
    })
}
