//! `rlhf worker`, in two modes:
//! - `rlhf worker --role actor|learner|reward -- ARGS`: one service process, as the launchers
//!   start them. The arguments after `--` are those of the role's own binary (`actor`,
//!   `learner`, `reward-server`).
//! - `rlhf worker --role ROLE --coordinator URL`: a pool worker (the `static` launcher: started by
//!   Kubernetes, a Slurm step, or by hand on any machine). It registers with the coordinator and
//!   heartbeats; each heartbeat returns the assignments it should run, which it starts as
//!   child service processes of the first mode (bound to `--advertise`), restarts when their
//!   generation changes, and stops when they are taken away.

use anyhow::{Result, bail};
use clap::{Args, Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    Actor,
    Learner,
    Reward,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[arg(long, value_enum)]
    role: Role,
    /// Join the pool of this coordinator (e.g. `http://10.0.0.1:50070`; several, comma
    /// separated, to follow a failover to a standby) instead of serving one process.
    #[arg(long)]
    coordinator: Option<String>,
    /// Pool worker: this machine's name (default: the host name).
    #[arg(long)]
    node: Option<String>,
    /// Pool worker: the host its services bind and are reached on (this machine's address or
    /// name as the coordinator and the other workers see it; a name is resolved to its IP).
    #[arg(long, default_value = "127.0.0.1")]
    advertise: String,
    /// Pool worker: assignments it runs at once.
    #[arg(long, default_value_t = 1)]
    capacity: u32,
    /// Pool worker: exit after this many seconds without an assignment (Slurm-started
    /// workers, so their allocation ends with the job).
    #[arg(long, value_name = "SECS")]
    exit_when_idle: Option<u64>,
    /// Pool worker: devices it shares out, one per process while there are enough: `cpu`, or
    /// `cuda:ID` (a GPU number or UUID; the process sees that GPU alone, as `cuda:0`:
    /// `CUDA_VISIBLE_DEVICES=ID RLHF_DEVICE=cuda:0`), e.g. `cuda:0,cuda:1`.
    #[arg(long, value_delimiter = ',')]
    devices: Vec<String>,
    /// The role's own arguments (see `actor --help`, `learner --help`, `reward-server --help`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Actor => "actor",
            Role::Learner => "learner",
            Role::Reward => "reward",
        }
    }
}

#[derive(Debug, Parser)]
struct ActorArgs {
    #[command(flatten)]
    serve: rlhf_actor::cli::ServeArgs,
}

#[derive(Debug, Parser)]
struct LearnerArgs {
    #[command(flatten)]
    serve: rlhf_learner::cli::ServeArgs,
}

#[derive(Debug, Parser)]
struct RewardArgs {
    #[command(flatten)]
    serve: rlhf_reward::cli::ServeArgs,
}

/// Exits when the parent process goes away (the launcher died without stopping us).
#[cfg(unix)]
fn exit_with_parent() {
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(std::time::Duration::from_millis(500));
            if std::os::unix::process::parent_id() != parent {
                tracing::warn!("the launching process is gone; exiting");
                std::process::exit(0);
            }
        }
    });
}

/// A pool worker's services listen on `--advertise`: beyond loopback they need TLS and the
/// cluster's token (or `--insecure`), and a worker that cannot start them says so now rather
/// than at its first assignment.
fn refuse_insecure_advertise(advertise: &str) -> Result<()> {
    use std::net::ToSocketAddrs;
    let addr = (advertise, 0)
        .to_socket_addrs()
        .map_err(|e| anyhow::anyhow!("--advertise {advertise}: {e}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("--advertise {advertise}: resolves to no address"))?;
    rlhf_proto::security::current()
        .check_listen(addr)
        .map_err(|e| anyhow::anyhow!("--advertise {advertise}: {e}"))
}

pub fn run(w: WorkerArgs) -> Result<()> {
    if let Some(coordinator) = &w.coordinator {
        if !w.args.is_empty() {
            bail!(
                "a pool worker (--coordinator) takes no role arguments: its assignments carry them (got {:?})",
                w.args
            );
        }
        refuse_insecure_advertise(&w.advertise)?;
        let node = match &w.node {
            Some(node) => node.clone(),
            None => rlhf_proto::process::host_name(),
        };
        let register = rlhf_proto::v1::RegisterWorkerRequest {
            role: w.role.as_str().into(),
            node,
            address: w.advertise.clone(),
            devices: w.devices.clone(),
            capacity: w.capacity,
            collective_ports: Vec::new(),
        };
        let idle = w.exit_when_idle.map(std::time::Duration::from_secs);
        return crate::runtime::block_on(rlhf_worker::run(coordinator, register, idle));
    }
    #[cfg(unix)]
    exit_with_parent();
    let argv = std::iter::once(format!("rlhf worker --role {}", w.role.as_str())).chain(w.args);
    match w.role {
        Role::Actor => rlhf_actor::cli::serve_blocking(ActorArgs::try_parse_from(argv)?.serve),
        Role::Learner => {
            rlhf_learner::cli::serve_blocking(LearnerArgs::try_parse_from(argv)?.serve)
        }
        Role::Reward => rlhf_reward::cli::serve_blocking(RewardArgs::try_parse_from(argv)?.serve),
    }
}
