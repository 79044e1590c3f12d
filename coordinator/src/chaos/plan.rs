//! The seeded fault plan of a chaos run: which fault, at which step, for how long. Pure: the
//! same seed, fault count and job give the same plan.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// A process of the job's cluster a fault hits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "role", content = "index")]
pub enum Target {
    Actor(usize),
    Learner(usize),
    Reward(usize),
    Coordinator,
    /// A pool worker with every process it runs: a machine lost.
    Worker(usize),
}

impl Target {
    /// The assignment name of a service process (`actor-0`), None for the others.
    pub fn assignment(&self) -> Option<String> {
        match self {
            Target::Actor(i) => Some(format!("actor-{i}")),
            Target::Learner(i) => Some(format!("learner-{i}")),
            Target::Reward(i) => Some(format!("reward-{i}")),
            Target::Coordinator | Target::Worker(_) => None,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Coordinator => write!(f, "coordinator"),
            Target::Worker(i) => write!(f, "worker-{i}"),
            t => write!(f, "{}", t.assignment().unwrap_or_default()),
        }
    }
}

/// How a fault hits its target.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Action {
    /// SIGKILL.
    Kill,
    /// SIGSTOP, then SIGCONT after this many seconds.
    Pause { seconds: f64 },
}

/// One planned fault: hits `target` once the job has recorded `after_step`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fault {
    pub after_step: u64,
    pub target: Target,
    pub action: Action,
}

/// The job's processes a plan may hit.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub steps: u64,
    pub actors: usize,
    pub learner_ranks: usize,
    pub reward_replicas: usize,
    /// Pool workers (one per process of the job).
    pub workers: usize,
}

/// Pauses last at most this long: shorter than the coordinator's lease timer (4 s), so a paused
/// coordinator resumes as the leader, and far shorter than any step timeout.
pub const MAX_PAUSE_SECONDS: f64 = 3.0;

/// `count` faults over the steps of `shape`, at most one per step, after step 1 and before the
/// last (a fault needs a running job on both sides), in step order. Fewer when the job has
/// fewer steps than that.
pub fn plan(seed: u64, count: usize, shape: Shape) -> Vec<Fault> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let first = 1;
    let last = shape.steps.saturating_sub(2);
    let mut steps: Vec<u64> = (first..=last).collect();
    // A partial Fisher-Yates shuffle picks distinct steps.
    let n = count.min(steps.len());
    for i in 0..n {
        let j = rng.random_range(i..steps.len());
        steps.swap(i, j);
    }
    let mut chosen = steps[..n].to_vec();
    chosen.sort_unstable();
    chosen
        .into_iter()
        .map(|after_step| {
            let target = match rng.random_range(0..5u32) {
                0 => Target::Actor(rng.random_range(0..shape.actors.max(1))),
                1 => Target::Learner(rng.random_range(0..shape.learner_ranks.max(1))),
                2 => Target::Reward(rng.random_range(0..shape.reward_replicas.max(1))),
                3 => Target::Coordinator,
                _ => Target::Worker(rng.random_range(0..shape.workers.max(1))),
            };
            // A worker is a machine: it is lost, never paused.
            let pause = !matches!(target, Target::Worker(_)) && rng.random_bool(0.3);
            let action = if pause {
                let tenths = rng.random_range(5..=(MAX_PAUSE_SECONDS * 10.0) as u32);
                Action::Pause {
                    seconds: f64::from(tenths) / 10.0,
                }
            } else {
                Action::Kill
            };
            Fault {
                after_step,
                target,
                action,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: Shape = Shape {
        steps: 30,
        actors: 2,
        learner_ranks: 1,
        reward_replicas: 1,
        workers: 4,
    };

    #[test]
    fn a_plan_is_its_seed_s_bounded_and_in_step_order() {
        let a = plan(7, 6, SHAPE);
        assert_eq!(a, plan(7, 6, SHAPE));
        assert_ne!(a, plan(8, 6, SHAPE));
        assert_eq!(a.len(), 6);
        assert!(a.windows(2).all(|w| w[0].after_step < w[1].after_step));
        assert!(a.iter().all(|f| (1..=28).contains(&f.after_step)));
        // More faults than steps to put them on: one per step.
        let short = Shape { steps: 5, ..SHAPE };
        assert_eq!(plan(1, 10, short).len(), 3);
        assert!(plan(1, 3, Shape { steps: 2, ..SHAPE }).is_empty());
    }

    #[test]
    fn targets_exist_and_pauses_are_short_and_never_of_a_worker() {
        let many = (0..200).flat_map(|seed| plan(seed, 20, SHAPE));
        let mut kinds = std::collections::BTreeSet::new();
        for f in many {
            match f.target {
                Target::Actor(i) => assert!(i < 2),
                Target::Learner(i) | Target::Reward(i) => assert_eq!(i, 0),
                Target::Worker(i) => {
                    assert!(i < 4);
                    assert_eq!(f.action, Action::Kill);
                }
                Target::Coordinator => {}
            }
            if let Action::Pause { seconds } = f.action {
                assert!((0.5..=MAX_PAUSE_SECONDS).contains(&seconds));
            }
            kinds.insert(
                format!("{}", f.target)
                    .split('-')
                    .next()
                    .unwrap()
                    .to_string(),
            );
        }
        assert_eq!(kinds.len(), 5, "every kind of target is drawn: {kinds:?}");
    }
}
