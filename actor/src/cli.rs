//! Command-line entry points shared by the `actor` binary and `rlhf worker --role actor`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use rlhf_model::{Model, Tokenizer, device};
use rlhf_proto::logging::LogFormat;

use crate::engine::{Limits, start};
use crate::metrics::Metrics;
use crate::service::{Actor, serve};

/// Where and how to run an actor.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Policy model folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// gRPC address; port 0 picks a free port (printed on stdout as `listening on ADDR`).
    #[arg(long, default_value = "127.0.0.1:50061")]
    pub listen: SocketAddr,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 64)]
    pub max_sequences: usize,
    /// KV-cache budget: prompt + max-new tokens over all running sequences.
    #[arg(long, default_value_t = 1 << 16)]
    pub max_kv_tokens: usize,
}

/// The `actor` binary's command line.
#[derive(Debug, clap::Parser)]
#[command(
    name = "actor",
    version,
    about = "Generate rollouts with continuous batching"
)]
pub struct BinaryArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    #[arg(long, default_value = "text")]
    pub log_format: LogFormat,
}

/// Loads the model, prints the ready line and serves until Ctrl-C / SIGTERM.
pub fn serve_blocking(args: ServeArgs) -> Result<()> {
    if args.max_sequences == 0 || args.max_kv_tokens == 0 {
        anyhow::bail!("--max-sequences and --max-kv-tokens must be at least 1");
    }
    let mut model = Model::load(&args.model, &device::inference_device()?)
        .with_context(|| format!("loading {}", args.model.display()))?;
    // Seeded samples must not depend on what shares the batch.
    model.batch_invariant = true;
    let tokenizer = Tokenizer::from_dir(&args.model)?;
    let config = model.config.clone();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let limits = Limits {
            max_sequences: args.max_sequences,
            max_kv_tokens: args.max_kv_tokens,
        };
        let engine = start(model, Some(tokenizer.clone()), limits, 0);
        let metrics = Metrics::new();
        metrics.follow(
            engine.gauges.clone(),
            args.max_sequences,
            Duration::from_millis(500),
        );
        let actor = Actor::new(
            engine,
            config,
            tokenizer,
            args.model.clone(),
            args.max_sequences,
            metrics,
        );
        println!(
            "{}{}",
            rlhf_proto::process::READY_PREFIX,
            listener.local_addr()?
        );
        serve(actor, listener, rlhf_proto::service::shutdown_signal()).await
    })
}
