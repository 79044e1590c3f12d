//! The learner learns: on a toy task (reward = share of a target token in the completion) GRPO
//! and PPO raise the reward within 50 steps; the adaptive controller steers the KL toward its
//! target; and with two objectives combined by log-sigmoid, the weaker one improves first.

mod common;

use common::*;
use rlhf_learner::Engine;
use rlhf_learner::algo::kl::KlController;
use rlhf_learner::algo::transform::Transform;
use rlhf_learner::collective::Solo;
use rlhf_learner::config::Algorithm;

const TARGET: u32 = 7;

fn target_share(c: &[u32]) -> Vec<f32> {
    vec![share(c, TARGET)]
}

fn mean(xs: &[Vec<f32>], k: usize) -> f32 {
    xs.iter().map(|r| r[k]).sum::<f32>() / xs.len() as f32
}

#[test]
fn grpo_raises_the_reward() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = tiny_policy(tmp.path(), 11);
    let mut c = config(
        &policy,
        &tmp.path().join("out"),
        &[("target", Transform::Identity, 1.0)],
    );
    c.kl.controller = KlController::Fixed { value: 0.0 };
    let mut engine = Engine::new(c, Box::new(Solo)).unwrap();
    let (rewards, outcomes) = run(&mut engine, &policy, 1..=40, &prompts(8), 8, &target_share);
    let (first, last) = (mean(&rewards[..5], 0), mean(&rewards[35..], 0));
    assert!(
        last > first + 0.25 && last > 2.0 * first,
        "GRPO: target share {first:.3} -> {last:.3}"
    );
    let m = &outcomes.last().unwrap().metrics;
    for key in [
        "reward/total",
        "reward/target/raw",
        "train/loss",
        "train/grad_norm",
        "train/entropy",
    ] {
        assert!(
            m.get(key).is_some_and(|v| v.is_finite()),
            "metric {key} missing or not finite: {m:?}"
        );
    }
    assert!(
        !m.contains_key("kl/sequence"),
        "β fixed at 0 skips the reference, so no KL is reported: {m:?}"
    );
    assert_eq!(engine.version(), 40);
}

#[test]
fn ppo_with_a_critic_raises_the_reward() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = tiny_policy(tmp.path(), 12);
    let mut c = config(
        &policy,
        &tmp.path().join("out"),
        &[("target", Transform::Identity, 1.0)],
    );
    c.algorithm = Algorithm::Ppo;
    c.kl.controller = KlController::Fixed { value: 0.01 };
    c.ppo.critic_lr = 3e-3;
    c.optim.epochs = 2;
    c.optim.minibatches = 2;
    let mut engine = Engine::new(c, Box::new(Solo)).unwrap();
    let (rewards, outcomes) = run(&mut engine, &policy, 1..=40, &prompts(8), 8, &target_share);
    let (first, last) = (mean(&rewards[..5], 0), mean(&rewards[35..], 0));
    assert!(
        last > first + 0.25 && last > 2.0 * first,
        "PPO: target share {first:.3} -> {last:.3}"
    );
    let m = &outcomes.last().unwrap().metrics;
    assert!(m["critic/value_loss"].is_finite());
}

#[test]
fn adaptive_controller_steers_kl_toward_its_target() {
    // The reward pulls the policy away from the reference without bound. The controller lets β
    // fall while the KL is below target, raises it once the KL overshoots, and the KL settles
    // around the target.
    let tmp = tempfile::tempdir().unwrap();
    let policy = tiny_policy(tmp.path(), 13);
    let target = 4.0;
    let mut c = config(
        &policy,
        &tmp.path().join("out"),
        &[("target", Transform::Identity, 1.0)],
    );
    c.kl.controller = KlController::Adaptive {
        value: 0.05,
        target,
        horizon: 32.0,
    };
    let mut engine = Engine::new(c, Box::new(Solo)).unwrap();
    let (_, outcomes) = run(&mut engine, &policy, 1..=120, &prompts(8), 8, &|c| {
        vec![4.0 * share(c, TARGET)]
    });
    let kl: Vec<f64> = outcomes.iter().map(|o| o.metrics["kl/sequence"]).collect();
    let beta: Vec<f64> = outcomes.iter().map(|o| o.metrics["kl/beta"]).collect();
    let late = kl[90..].iter().sum::<f64>() / 30.0;
    let peak_beta = beta.iter().cloned().fold(0.0, f64::max);
    assert!(peak_beta > 0.2, "β should rise once KL > target: {beta:?}");
    assert!(
        late > target / 2.0 && late < target * 2.0,
        "late KL {late:.3} far from target {target}: {kl:?} beta {beta:?}"
    );
}

#[test]
fn log_sigmoid_improves_the_weaker_objective_first() {
    // Objective a is far below its reference reward, b is already near its own. With raw sums both
    // tokens gain alike; with log-sigmoid the objective furthest below r_ref gets the gradient.
    const A: u32 = 7;
    const B: u32 = 9;
    let reward = |c: &[u32]| vec![10.0 * share(c, A), 10.0 * share(c, B)];
    let gain = |transform: Transform| {
        let tmp = tempfile::tempdir().unwrap();
        let policy = tiny_policy(tmp.path(), 21);
        let mut c = config(
            &policy,
            &tmp.path().join("out"),
            &[("a", transform, 1.0), ("b", transform, 1.0)],
        );
        c.kl.controller = KlController::Fixed { value: 0.0 };
        let mut engine = Engine::new(c, Box::new(Solo)).unwrap();
        let table = (0..8)
            .map(|i| (format!("p{i}"), vec![5.0f32, 0.6]))
            .collect();
        engine
            .set_reference_table(&["a".into(), "b".into()], table)
            .unwrap();
        let (rewards, _) = run(&mut engine, &policy, 1..=15, &prompts(8), 8, &reward);
        let d = |k| mean(&rewards[12..], k) - mean(&rewards[..3], k);
        (d(0), d(1))
    };
    let (ls_a, ls_b) = gain(Transform::LogSigmoid);
    assert!(
        ls_a > ls_b + 0.2,
        "log-sigmoid: weaker objective a gained {ls_a:.3}, b gained {ls_b:.3}"
    );
    let (id_a, id_b) = gain(Transform::Identity);
    assert!(
        (ls_a - ls_b) > (id_a - id_b),
        "log-sigmoid favours the weaker objective more than the raw sum ({ls_a:.3}/{ls_b:.3} vs {id_a:.3}/{id_b:.3})"
    );
}

#[test]
fn a_missing_reference_reward_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = tiny_policy(tmp.path(), 14);
    let c = config(
        &policy,
        &tmp.path().join("out"),
        &[("a", Transform::LogSigmoid, 1.0)],
    );
    let mut engine = Engine::new(c, Box::new(Solo)).unwrap();
    let ts = rollouts(&engine, &policy, &prompts(2), 2, 1, &|c| vec![share(c, 3)]);
    let err = engine.train_step(1, ts, 1).unwrap_err().to_string();
    assert!(err.contains("p0") && err.contains("r_ref"), "{err}");
}
