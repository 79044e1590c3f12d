//! `rlhf chaos JOB.toml --faults N --seed S [--json]`: the job clean and under seeded faults,
//! compared (the work is `rlhf_coordinator::chaos`).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use rlhf_coordinator::chaos::{self, ChaosOptions};

#[derive(Debug, clap::Args)]
pub struct ChaosArgs {
    /// The job file (sync rollouts).
    pub job: PathBuf,
    /// How many faults to inject (at most one per step, between the first and the last).
    #[arg(long, default_value_t = 5)]
    pub faults: usize,
    /// Seeds the fault plan: which process, after which step, killed or paused how long.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Run this many steps instead of the job's `rollout.steps`.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Where the cluster's logs and both runs go.
    #[arg(long, default_value = "chaos")]
    pub out: PathBuf,
    /// The largest weight difference accepted (0: bit-identical).
    #[arg(long, default_value_t = 0.0)]
    pub max_weight_diff: f64,
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs the experiment; fails (after the report) when a fault changed what matters.
pub fn run(args: ChaosArgs) -> Result<()> {
    let options = ChaosOptions {
        job: args.job,
        faults: args.faults,
        seed: args.seed,
        out: args.out,
        steps: args.steps,
        exe: rlhf_proto::process::self_exe().context("locating the rlhf binary")?,
    };
    let report = chaos::run(&options)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.summary());
    }
    if !report.passed(args.max_weight_diff) {
        bail!(
            "the faults changed the run (see the report; logs in {})",
            options.out.display()
        );
    }
    Ok(())
}
