//! The learner's maths against TRL's own numbers: every case of `RLHF_GOLDEN_RL` (default
//! `../shared/fixtures/golden_rl.json`) and of every `*.json` file in `tests/golden/` (same
//! format, made by `tests/golden/make_golden.py`). A case kind, or a parameter value, this file
//! does not know fails the test.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use rlhf_learner::algo::grpo::{
    AdvantageScale, MultiObjective, consecutive_groups, multi_objective_advantages,
};
use rlhf_learner::algo::kl::{KlController, KlEstimator};
use rlhf_learner::algo::policy_loss::{
    Aggregation, KlLoss, Normalisation, PolicyBatch, PolicyLossConfig, RatioLevel, policy_loss,
};
use rlhf_learner::algo::ppo::{
    AdvantageOptions, kl_rewards, last_valid_index, masked_gae, ppo_advantages, sequence_kl_mean,
    value_loss,
};
use rlhf_learner::algo::stats::{masked_mean, masked_var, masked_whiten, nanstd};
use rlhf_model::burn::module::Module;
use rlhf_model::burn::tensor::{Device, Int, Tensor, TensorData};
use rlhf_model::host::to_vec;
use rlhf_model::logprobs::logprobs_and_entropy;
use rlhf_model::testing::fixtures_dir;
use rlhf_model::{Model, device};
use serde_json::Value;

const TOL: f64 = 1e-5;

fn golden_path() -> PathBuf {
    std::env::var_os("RLHF_GOLDEN_RL")
        .map(PathBuf::from)
        .unwrap_or_else(|| fixtures_dir().join("golden_rl.json"))
}

/// The shared file, then every `*.json` of `tests/golden/` in name order.
fn golden_files() -> Vec<PathBuf> {
    let extra = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&extra)
        .unwrap_or_else(|e| panic!("{}: {e}", extra.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    assert!(!files.is_empty(), "{}: no golden files", extra.display());
    files.sort();
    files.insert(0, golden_path());
    files
}

// ---------- JSON helpers (null is NaN) ----------

fn num(v: &Value) -> f64 {
    v.as_f64()
        .or(v.as_bool().map(|b| b as u8 as f64))
        .unwrap_or(f64::NAN)
}

fn vec1(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("array expected: {v}"))
        .iter()
        .map(|x| num(x) as f32)
        .collect()
}

fn vec2(v: &Value) -> (Vec<f32>, usize, usize) {
    let rows = v
        .as_array()
        .unwrap_or_else(|| panic!("2-d array expected: {v}"));
    let width = rows[0].as_array().unwrap().len();
    (rows.iter().flat_map(vec1).collect(), rows.len(), width)
}

fn vec3(v: &Value) -> (Vec<f32>, [usize; 3]) {
    let a = v.as_array().unwrap();
    let b = a[0].as_array().unwrap();
    let c = b[0].as_array().unwrap();
    let flat = a
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().flat_map(vec1))
        .collect();
    (flat, [a.len(), b.len(), c.len()])
}

fn close(what: &str, got: f64, want: f64) {
    let ok = (got.is_nan() && want.is_nan()) || (got - want).abs() <= TOL * want.abs().max(1.0);
    assert!(ok, "{what}: got {got}, want {want}");
}

fn close_all(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        close(&format!("{what}[{i}]"), *g as f64, *w as f64);
    }
}

fn dev() -> Device {
    device::inference_device().unwrap().autodiff()
}

fn t2(values: &[f32], rows: usize, cols: usize) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values.to_vec(), [rows, cols]), &dev())
}

fn tracked(values: &[f32], rows: usize, cols: usize) -> Tensor<2> {
    t2(values, rows, cols).require_grad()
}

// ---------- the cases ----------

#[test]
fn every_golden_case_matches_trl() {
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut names = HashSet::new();
    for path in golden_files() {
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let golden: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
        let cases = golden["cases"]
            .as_array()
            .unwrap_or_else(|| panic!("{}: no `cases` array", path.display()));
        assert!(!cases.is_empty(), "{}: no cases", path.display());
        for case in cases {
            let kind = case["kind"].as_str().expect("case kind");
            let name = case["name"].as_str().expect("case name");
            assert!(
                names.insert(name.to_string()),
                "case name {name} is not unique"
            );
            run_case(kind, name, case);
            *counts.entry(kind.to_string()).or_default() += 1;
        }
        eprintln!("{}: {} cases", path.display(), cases.len());
    }
    eprintln!("checked golden cases: {counts:?}");
}

fn run_case(kind: &str, name: &str, case: &Value) {
    match kind {
        "grpo_advantages" => grpo_advantages(case),
        "grpo_loss" => grpo_loss(case),
        "grpo_end_to_end" => grpo_end_to_end(case),
        "helpers" => helpers(case),
        "ppo_rewards" => ppo_rewards(case),
        "ppo_gae" => ppo_gae(case),
        // trl 0.11 feeds per-token log-probs and value predictions; trl 0.29 logits and the
        // value head's raw output.
        "ppo_loss" if case["inputs"].get("vpred_temp").is_some() => ppo029_loss(case),
        "ppo_loss" => ppo011_loss(case),
        "kl_controller" => kl_controller(case),
        "ppo_rewards_gae" => ppo_rewards_gae(case),
        other => panic!("case {name}: kind `{other}` is not implemented by the learner"),
    }
}

/// TRL's KL estimator names: 0.11 `kl_penalty` (`kl`, `abs`, `mse`, `full`), 0.29 `kl_estimator`
/// (`k1`, `k3`).
fn estimator_named(name: &str, case: &str) -> KlEstimator {
    match name {
        "kl" | "k1" => KlEstimator::K1,
        "mse" | "k2" => KlEstimator::K2,
        "k3" => KlEstimator::K3,
        "abs" => KlEstimator::Abs,
        "full" => panic!(
            "case {case}: kl_penalty `full` needs the full-vocabulary log-probs of both policies; \
             the learner's rewards see only the sampled tokens' log-probs"
        ),
        other => panic!("case {case}: KL estimator `{other}` is not implemented by the learner"),
    }
}

fn grpo_advantages(case: &Value) {
    let p = &case["params"];
    let (per_func, n, funcs) = vec2(&case["inputs"]["rewards_per_func"]);
    let weights = vec1(&p["reward_weights"]);
    assert_eq!(weights.len(), funcs, "one weight per reward function");
    let scale = match p["scale_rewards"].as_str().unwrap() {
        "group" => AdvantageScale::Group,
        "batch" => AdvantageScale::Batch,
        "none" => AdvantageScale::None,
        other => panic!("scale_rewards {other}"),
    };
    // TRL's default when a case does not say.
    let aggregation = match p["multi_objective_aggregation"]
        .as_str()
        .unwrap_or("sum_then_normalize")
    {
        "sum_then_normalize" => MultiObjective::SumThenNormalize,
        "normalize_then_sum" => MultiObjective::NormalizeThenSum,
        other => panic!("multi_objective_aggregation {other}"),
    };
    let groups = consecutive_groups(n, p["num_generations"].as_u64().unwrap() as usize);
    let got = multi_objective_advantages(
        &per_func,
        &weights,
        &groups,
        aggregation,
        scale,
        num(&p["std_epsilon"]),
    );
    close_all(
        case["name"].as_str().unwrap(),
        &got,
        &vec1(&case["outputs"]["advantages"]),
    );
}

fn loss_config(p: &Value) -> (PolicyLossConfig, Normalisation, Option<f64>) {
    let aggregation = match p["loss_type"].as_str().unwrap() {
        "grpo" => Aggregation::Grpo,
        "bnpo" => Aggregation::Bnpo,
        "dapo" => Aggregation::Dapo,
        "dr_grpo" => Aggregation::DrGrpo,
        other => panic!("loss_type {other} not supported"),
    };
    let ratio_level = match p["importance_sampling_level"].as_str().unwrap_or("token") {
        "token" => RatioLevel::Token,
        "sequence" => RatioLevel::Sequence,
        other => panic!("importance_sampling_level {other}"),
    };
    let config = PolicyLossConfig {
        aggregation,
        eps_low: num(&p["epsilon_low"]),
        eps_high: num(&p["epsilon_high"]),
        delta: p["delta"].as_f64(),
        ratio_level,
        truncated_is: None,
    };
    let gas = p["current_gradient_accumulation_steps"]
        .as_f64()
        .unwrap_or(1.0);
    let norm = Normalisation {
        grad_accumulation: gas,
        dapo_tokens: 0.0,
        max_completion_length: num(&p["max_completion_length"]),
    };
    (config, norm, p["beta"].as_f64())
}

fn kl_term(p: &Value, beta: Option<f64>) -> Option<KlLoss> {
    beta.filter(|b| *b != 0.0).map(|beta| KlLoss {
        beta,
        estimator: KlEstimator::K3,
        ratio_correction: p["use_bias_correction_kl"].as_bool().unwrap_or(false),
    })
}

fn check_metrics(
    name: &str,
    got: &rlhf_learner::algo::policy_loss::PolicyMetrics,
    entropy: f64,
    want: &Value,
) {
    let pairs = [
        ("clip_ratio/low_mean", got.clip_low_mean),
        ("clip_ratio/high_mean", got.clip_high_mean),
        ("clip_ratio/region_mean", got.clip_region_mean),
        ("clip_ratio/low_min", got.clip_low_min),
        ("clip_ratio/high_max", got.clip_high_max),
        ("entropy", entropy),
    ];
    for (key, value) in pairs {
        if let Some(w) = want.get(key) {
            close(&format!("{name} {key}"), value, num(w));
        }
    }
    match (want.get("kl"), got.kl) {
        (Some(w), Some(k)) => close(&format!("{name} kl"), k, num(w)),
        (None, None) => {}
        (w, k) => panic!("{name}: kl metric presence differs: want {w:?}, got {k:?}"),
    }
}

fn grpo_loss(case: &Value) {
    let name = case["name"].as_str().unwrap();
    let (p, i, o) = (&case["params"], &case["inputs"], &case["outputs"]);
    let (logp, b, t) = vec2(&i["per_token_logps"]);
    let (mask, _, _) = vec2(&i["completion_mask"]);
    let (entropies, _, _) = vec2(&i["entropies"]);
    let adv = vec1(&i["advantages"]);
    let (config, mut norm, beta) = loss_config(p);
    let num_items = num(&i["num_items_in_batch"]);
    norm.dapo_tokens = num_items / num(&p["num_processes"]) * norm.grad_accumulation
        / num(&p["steps_per_generation"]);

    let logp_t = tracked(&logp, b, t);
    let old = match i.get("old_per_token_logps").filter(|v| !v.is_null()) {
        Some(v) => t2(&vec2(v).0, b, t),
        None => logp_t.clone().detach(),
    };
    let ref_logp = i
        .get("ref_per_token_logps")
        .filter(|v| !v.is_null())
        .map(|v| t2(&vec2(v).0, b, t));
    let batch = PolicyBatch {
        logp: logp_t.clone(),
        old_logp: old,
        ref_logp,
        mask: t2(&mask, b, t),
        advantages: t2(&adv, b, 1),
    };
    let (loss, metrics) = policy_loss(&batch, &config, kl_term(p, beta), &norm);
    close(
        &format!("{name} loss"),
        to_vec(loss.clone())[0] as f64,
        num(&o["loss"]),
    );
    let grads = loss.backward();
    let grad = to_vec(logp_t.grad(&grads).expect("gradient reaches the log-probs"));
    close_all(
        &format!("{name} grad"),
        &grad,
        &vec2(&o["grad_per_token_logps"]).0,
    );
    let entropy = masked_mean(&entropies, &mask);
    check_metrics(name, &metrics, entropy, &o["metrics"]);
}

fn grpo_end_to_end(case: &Value) {
    let name = case["name"].as_str().unwrap();
    let (p, i, o) = (&case["params"], &case["inputs"], &case["outputs"]);
    let dir = fixtures_dir().join(p["model"].as_str().unwrap());
    let model = Model::load(&dir, &dev()).unwrap();
    let (prompt_ids, b, pw) = vec2(&i["prompt_ids"]);
    let (prompt_mask, _, _) = vec2(&i["prompt_mask"]);
    let (completion_ids, _, t) = vec2(&i["completion_ids"]);
    let (mask, _, _) = vec2(&i["completion_mask"]);
    let rows: Vec<(Vec<u32>, Vec<u32>)> = (0..b)
        .map(|r| {
            let prompt = (0..pw)
                .filter(|&c| prompt_mask[r * pw + c] > 0.0)
                .map(|c| prompt_ids[r * pw + c] as u32)
                .collect();
            let completion = (0..t)
                .filter(|&c| mask[r * t + c] > 0.0)
                .map(|c| completion_ids[r * t + c] as u32)
                .collect();
            (prompt, completion)
        })
        .collect();
    let pairs: Vec<(&[u32], &[u32])> = rows
        .iter()
        .map(|(a, c)| (a.as_slice(), c.as_slice()))
        .collect();
    let out = model
        .completion_logprobs(&pairs, num(&p["temperature"]))
        .unwrap();
    assert_eq!(
        out.logprobs.dims(),
        [b, t],
        "completions fill the fixture's width"
    );
    let got_logp = to_vec(out.logprobs.clone());
    let got_entropy = to_vec(out.entropy.clone());
    let (want_logp, _, _) = vec2(&o["per_token_logps"]);
    let (want_entropy, _, _) = vec2(&o["entropies"]);
    for k in (0..b * t).filter(|&k| mask[k] > 0.0) {
        close(
            &format!("{name} logp[{k}]"),
            got_logp[k] as f64,
            want_logp[k] as f64,
        );
        close(
            &format!("{name} entropy[{k}]"),
            got_entropy[k] as f64,
            want_entropy[k] as f64,
        );
    }

    let (config, mut norm, beta) = loss_config(p);
    if let Some(items) = i.get("num_items_in_batch") {
        norm.dapo_tokens = num(items) / num(&p["num_processes"]) * norm.grad_accumulation
            / num(&p["steps_per_generation"]);
    }
    // With beta = 0 TRL computes no reference log-probs; a case may then leave them out.
    let ref_logp = i
        .get("ref_per_token_logps")
        .filter(|v| !v.is_null())
        .map(|v| t2(&vec2(v).0, b, t));
    assert!(
        ref_logp.is_some() || beta.unwrap_or(0.0) == 0.0,
        "{name}: beta != 0 needs ref_per_token_logps"
    );
    let batch = PolicyBatch {
        logp: out.logprobs,
        old_logp: t2(&vec2(&i["old_per_token_logps"]).0, b, t),
        ref_logp,
        mask: t2(&mask, b, t),
        advantages: t2(&vec1(&i["advantages"]), b, 1),
    };
    let (loss, metrics) = policy_loss(&batch, &config, kl_term(p, beta), &norm);
    close(
        &format!("{name} loss"),
        to_vec(loss.clone())[0] as f64,
        num(&o["loss"]),
    );
    let entropy = masked_mean(&got_entropy, &mask);
    check_metrics(name, &metrics, entropy, &o["metrics"]);

    let grads = loss.backward();
    let host = rlhf_model::optim::grads_to_host(&model, &grads);
    let want = o["param_grads"].as_array().unwrap();
    assert_eq!(host.len(), want.len(), "{name}: one gradient per parameter");
    for w in want {
        let pname = w["name"].as_str().unwrap();
        let g = host
            .iter()
            .find(|g| g.name == pname)
            .unwrap_or_else(|| panic!("no gradient for {pname}"));
        let l2 = g
            .values
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let sum: f64 = g.values.iter().map(|&v| v as f64).sum();
        close(&format!("{name} {pname} l2"), l2, num(&w["l2"]));
        close(&format!("{name} {pname} sum"), sum, num(&w["sum"]));
        close_all(
            &format!("{name} {pname} first8"),
            &g.values[..8.min(g.values.len())],
            &vec1(&w["first8"]),
        );
    }
    let _ = model.valid();
}

fn helpers(case: &Value) {
    let name = case["name"].as_str().unwrap();
    let (i, o) = (&case["inputs"], &case["outputs"]);
    if let Some(x) = i.get("x") {
        let (x, rows, cols) = vec2(x);
        let (mask, _, _) = vec2(&i["mask"]);
        close(
            &format!("{name} masked_mean"),
            masked_mean(&x, &mask),
            num(&o["masked_mean"]),
        );
        close(
            &format!("{name} masked_var_unbiased"),
            masked_var(&x, &mask, true),
            num(&o["masked_var_unbiased"]),
        );
        if let Some(w) = o.get("masked_var_biased") {
            close(
                &format!("{name} masked_var_biased"),
                masked_var(&x, &mask, false),
                num(w),
            );
        }
        close_all(
            &format!("{name} whiten shift"),
            &masked_whiten(&x, &mask, true),
            &vec2(&o["masked_whiten_shift_mean_true"]).0,
        );
        close_all(
            &format!("{name} whiten keep"),
            &masked_whiten(&x, &mask, false),
            &vec2(&o["masked_whiten_shift_mean_false"]).0,
        );
        if let Some(w) = o.get("masked_mean_axis1") {
            let per_row: Vec<f32> = (0..rows)
                .map(|r| {
                    masked_mean(
                        &x[r * cols..(r + 1) * cols],
                        &mask[r * cols..(r + 1) * cols],
                    ) as f32
                })
                .collect();
            close_all(&format!("{name} masked_mean axis 1"), &per_row, &vec1(w));
        }
        if let Some(w) = o.get("whiten_shift_mean_true") {
            let ones = vec![1.0; x.len()];
            close_all(
                &format!("{name} whiten"),
                &masked_whiten(&x, &ones, true),
                &vec2(w).0,
            );
        }
    }
    if let Some(logits) = i.get("logits") {
        let (values, shape) = vec3(logits);
        let labels = i.get("labels").or(i.get("index")).expect("labels or index");
        let (ids, b, t) = vec2(labels);
        let logits = Tensor::<3>::from_data(TensorData::new(values, shape), &dev());
        let ids: Vec<i64> = ids.iter().map(|&v| v as i64).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, t]), &dev());
        let (lp, ent) = logprobs_and_entropy(logits, ids);
        let lp_key = if o.get("selective_log_softmax").is_some() {
            "selective_log_softmax"
        } else {
            "logprobs_from_logits"
        };
        close_all(
            &format!("{name} {lp_key}"),
            &to_vec(lp),
            &vec2(&o[lp_key]).0,
        );
        close_all(
            &format!("{name} entropy"),
            &to_vec(ent),
            &vec2(&o["entropy_from_logits"]).0,
        );
    }
    if let Some(x) = i.get("nanstd_x") {
        close(
            &format!("{name} nanstd"),
            nanstd(&vec1(x)),
            num(&o["nanstd_x"]),
        );
        let (x2, rows, cols) = vec2(&i["nanstd_x2d"]);
        let per_row: Vec<f32> = (0..rows)
            .map(|r| nanstd(&x2[r * cols..(r + 1) * cols]) as f32)
            .collect();
        close_all(
            &format!("{name} nanstd dim 1"),
            &per_row,
            &vec1(&o["nanstd_x2d_dim1"]),
        );
    }
}

fn ppo_rewards(case: &Value) {
    let name = case["name"].as_str().unwrap();
    let (p, i, o) = (&case["params"], &case["inputs"], &case["outputs"]);
    let estimator = estimator_named(p["kl_penalty"].as_str().expect("kl_penalty"), name);
    let (logp, _, width) = vec2(&i["logprobs"]);
    let (ref_logp, _, _) = vec2(&i["ref_logprobs"]);
    let (mask, _, _) = vec2(&i["masks"]);
    let last = last_valid_index(&mask, width);
    let out = kl_rewards(
        &vec1(&i["scores"]),
        &logp,
        &ref_logp,
        width,
        &last,
        num(&p["kl_coef"]),
        estimator,
    );
    close_all(
        &format!("{name} rewards"),
        &out.rewards,
        &vec2(&o["rewards"]).0,
    );
    close_all(
        &format!("{name} non_score"),
        &out.non_score,
        &vec2(&o["non_score_rewards"]).0,
    );
    close_all(&format!("{name} kls"), &out.kl, &vec2(&o["kls"]).0);
    close(
        &format!("{name} controller kl"),
        sequence_kl_mean(&out.kl, &mask, width),
        num(&o["objective_kl_for_controller"]),
    );
}

fn ppo_gae(case: &Value) {
    let name = case["name"].as_str().unwrap();
    let (p, i, o) = (&case["params"], &case["inputs"], &case["outputs"]);
    let (values, _, width) = vec2(&i["values"]);
    let (rewards, _, _) = vec2(&i["rewards"]);
    let (mask, _, _) = vec2(&i["mask"]);
    let (masked_values, out) = masked_gae(
        &values,
        &rewards,
        &mask,
        width,
        num(&p["gamma"]),
        num(&p["lam"]),
        p["whiten_rewards"].as_bool().unwrap(),
    );
    close_all(
        &format!("{name} values"),
        &masked_values,
        &vec2(&o["values_masked"]).0,
    );
    close_all(
        &format!("{name} advantages"),
        &out.advantages,
        &vec2(&o["advantages"]).0,
    );
    close_all(
        &format!("{name} returns"),
        &out.returns,
        &vec2(&o["returns"]).0,
    );
}

fn ppo011_loss(case: &Value) {
    let name = case["name"].as_str().unwrap();
    let (p, i, o) = (&case["params"], &case["inputs"], &case["outputs"]);
    let (logprobs, b, t) = vec2(&i["logprobs"]);
    let (old, _, _) = vec2(&i["old_logprobs"]);
    let (values, _, _) = vec2(&i["values"]);
    let (vpreds, _, _) = vec2(&i["vpreds"]);
    let (mask, _, _) = vec2(&i["mask"]);
    let (adv, _, _) = vec2(&i["advantages"]);
    let (returns, _, _) = vec2(&i["returns"]);
    let clip = num(&p["cliprange"]);
    let config = PolicyLossConfig {
        aggregation: Aggregation::Bnpo,
        eps_low: clip,
        eps_high: clip,
        ..Default::default()
    };
    let norm = Normalisation {
        grad_accumulation: 1.0,
        dapo_tokens: 1.0,
        max_completion_length: t as f64,
    };
    let logp_t = tracked(&logprobs, b, t);
    let vpred_t = tracked(&vpreds, b, t);
    let batch = PolicyBatch {
        logp: logp_t.clone(),
        old_logp: t2(&old, b, t),
        ref_logp: None,
        mask: t2(&mask, b, t),
        advantages: t2(&adv, b, t),
    };
    let (pg, pm) = policy_loss(&batch, &config, None, &norm);
    let (vf, vf_clipfrac) = value_loss(
        vpred_t.clone(),
        t2(&values, b, t),
        t2(&returns, b, t),
        t2(&mask, b, t),
        num(&p["cliprange_value"]),
    );
    let vf_coef = num(&p["vf_coef"]);
    let total = pg.clone() + vf.clone() * vf_coef;
    close(
        &format!("{name} pg_loss"),
        to_vec(pg.clone())[0] as f64,
        num(&o["pg_loss"]),
    );
    close(
        &format!("{name} vf*coef"),
        to_vec(vf.clone())[0] as f64 * vf_coef,
        num(&o["vf_loss_times_vf_coef"]),
    );
    let grads = total.clone().backward();
    close_all(
        &format!("{name} grad logprobs"),
        &to_vec(logp_t.grad(&grads).unwrap()),
        &vec2(&o["grad_logprobs"]).0,
    );
    close_all(
        &format!("{name} grad vpreds"),
        &to_vec(vpred_t.grad(&grads).unwrap()),
        &vec2(&o["grad_vpreds"]).0,
    );

    let (logits, shape) = vec3(&i["logits"]);
    let ent: Vec<f32> = {
        let logits = Tensor::<3>::from_data(TensorData::new(logits, shape), &dev());
        let zeros = Tensor::<2, Int>::zeros([shape[0], shape[1]], &dev());
        to_vec(logprobs_and_entropy(logits, zeros).1)
    };
    let diff: Vec<f32> = logprobs.iter().zip(&old).map(|(a, b)| a - b).collect();
    let sq: Vec<f32> = diff.iter().map(|d| d * d).collect();
    let neg: Vec<f32> = diff.iter().map(|d| -d).collect();
    let err: Vec<f32> = vpreds
        .iter()
        .zip(&returns)
        .map(|(v, r)| (v - r).powi(2))
        .collect();
    let s = &o["stats"];
    let expect = [
        ("loss/policy", to_vec(pg)[0] as f64),
        ("loss/value", to_vec(vf)[0] as f64),
        ("loss/total", to_vec(total)[0] as f64),
        ("policy/entropy", masked_mean(&ent, &mask)),
        ("policy/approxkl", 0.5 * masked_mean(&sq, &mask)),
        ("policy/policykl", masked_mean(&neg, &mask)),
        ("policy/clipfrac", pm.clip_region_mean),
        ("policy/advantages_mean", masked_mean(&adv, &mask)),
        ("returns/mean", masked_mean(&returns, &mask)),
        ("returns/var", masked_var(&returns, &mask, true)),
        ("val/vpred", masked_mean(&vpreds, &mask)),
        ("val/error", masked_mean(&err, &mask)),
        ("val/clipfrac", vf_clipfrac),
        ("val/mean", masked_mean(&values, &mask)),
        ("val/var", masked_var(&values, &mask, true)),
    ];
    for (key, value) in expect {
        close(&format!("{name} {key}"), value, num(&s[key]));
    }
}

fn ppo029_loss(case: &Value) {
    let name = case["name"].as_str().unwrap();
    let (p, i, o) = (&case["params"], &case["inputs"], &case["outputs"]);
    let (logits, [b, t1, v]) = vec3(&i["logits"]);
    let t = t1 - 1;
    let (responses, _, _) = vec2(&i["responses"]);
    let (pad, _, _) = vec2(&i["padding_mask"]);
    let (pad_p1, _, _) = vec2(&i["padding_mask_p1"]);
    let (old, _, _) = vec2(&i["old_logprobs"]);
    let (values, _, _) = vec2(&i["values"]);
    let (returns, _, _) = vec2(&i["returns"]);
    let (adv, _, _) = vec2(&i["advantages"]);
    // The value head's output, [b, t + 1] (its last, unit dimension squeezed in the fixture).
    let (vpred_raw, _, _) = vec2(&i["vpred_temp"]);
    const INVALID: f32 = 1.0;

    let logits_t =
        Tensor::<3>::from_data(TensorData::new(logits, [b, t1, v]), &dev()).require_grad();
    let scaled = logits_t.clone().slice([0..b, 0..t, 0..v]) / (num(&p["temperature"]) + 1e-7);
    let ids: Vec<i64> = responses.iter().map(|&x| x as i64).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, t]), &dev());
    let (new_logp, entropy) = logprobs_and_entropy(scaled, ids);
    let valid = t2(&pad.iter().map(|m| 1.0 - m).collect::<Vec<_>>(), b, t);
    let valid_p1 = t2(&pad_p1.iter().map(|m| 1.0 - m).collect::<Vec<_>>(), b, t);
    // INVALID_LOGPROB under padding: new = logp * valid + INVALID * pad.
    let new_logp = new_logp * valid.clone() + t2(&pad, b, t) * INVALID;
    let vpred_t = tracked(&vpred_raw, b, t1);
    let vpred = vpred_t.clone().slice([0..b, 0..t]) * valid_p1.clone();

    let clip = num(&p["cliprange"]);
    let config = PolicyLossConfig {
        aggregation: Aggregation::Bnpo,
        eps_low: clip,
        eps_high: clip,
        ..Default::default()
    };
    let norm = Normalisation {
        grad_accumulation: 1.0,
        dapo_tokens: 1.0,
        max_completion_length: t as f64,
    };
    let batch = PolicyBatch {
        logp: new_logp.clone(),
        old_logp: t2(&old, b, t),
        ref_logp: None,
        mask: valid.clone(),
        advantages: t2(&adv, b, t),
    };
    let (pg, pm) = policy_loss(&batch, &config, None, &norm);
    let (vf, vf_clipfrac) = value_loss(
        vpred.clone(),
        t2(&values, b, t),
        t2(&returns, b, t),
        valid_p1,
        num(&p["cliprange_value"]),
    );
    let loss = pg.clone() + vf.clone() * num(&p["vf_coef"]);

    close_all(
        &format!("{name} new_logprobs"),
        &to_vec(new_logp.clone()),
        &vec2(&o["new_logprobs"]).0,
    );
    close_all(
        &format!("{name} vpred"),
        &to_vec(vpred.clone()),
        &vec2(&o["vpred"]).0,
    );
    close_all(
        &format!("{name} entropy"),
        &to_vec(entropy),
        &vec2(&o["entropy"]).0,
    );
    let ratio: Vec<f32> = to_vec(new_logp.clone())
        .iter()
        .zip(&old)
        .map(|(n, o)| (n - o).exp())
        .collect();
    close_all(&format!("{name} ratio"), &ratio, &vec2(&o["ratio"]).0);
    close(
        &format!("{name} pg_loss"),
        to_vec(pg)[0] as f64,
        num(&o["pg_loss"]),
    );
    close(
        &format!("{name} vf_loss"),
        to_vec(vf)[0] as f64,
        num(&o["vf_loss"]),
    );
    close(
        &format!("{name} loss"),
        to_vec(loss.clone())[0] as f64,
        num(&o["loss"]),
    );
    close(
        &format!("{name} pg_clipfrac"),
        pm.clip_region_mean,
        num(&o["pg_clipfrac"]),
    );
    close(
        &format!("{name} vf_clipfrac"),
        vf_clipfrac,
        num(&o["vf_clipfrac"]),
    );
    let diff2: Vec<f32> = to_vec(new_logp)
        .iter()
        .zip(&old)
        .map(|(n, o)| (n - o).powi(2))
        .collect();
    let ones = vec![1.0; diff2.len()];
    close(
        &format!("{name} approxkl"),
        0.5 * masked_mean(&diff2, &ones),
        num(&o["approxkl"]),
    );
    let grads = loss.backward();
    close_all(
        &format!("{name} grad logits"),
        &to_vec(logits_t.grad(&grads).unwrap()),
        &vec3(&o["grad_logits"]).0,
    );
    close_all(
        &format!("{name} grad vpred"),
        &to_vec(vpred_t.grad(&grads).unwrap()),
        &vec2(&o["grad_vpred_temp"]).0,
    );
}

fn kl_controller(case: &Value) {
    let name = case["name"].as_str().unwrap();
    let p = &case["params"];
    let init = num(&p["init_kl_coef"]);
    let mut adaptive = KlController::Adaptive {
        value: init,
        target: num(&p["target"]),
        horizon: num(&p["horizon"]),
    };
    let mut fixed = KlController::Fixed { value: init };
    let updates = case["inputs"]["updates_current_nsteps"].as_array().unwrap();
    let want = vec1(&case["outputs"]["adaptive_values_after"]);
    for (k, u) in updates.iter().enumerate() {
        let (current, n) = (num(&u[0]), u[1].as_u64().unwrap());
        adaptive.update(current, n);
        fixed.update(current, n);
        close(
            &format!("{name} update {k}"),
            adaptive.value(),
            want[k] as f64,
        );
    }
    close(
        &format!("{name} fixed"),
        fixed.value(),
        num(&case["outputs"]["fixed_value_after_all"]),
    );
}

fn ppo_rewards_gae(case: &Value) {
    let name = case["name"].as_str().unwrap();
    let (p, i, o) = (&case["params"], &case["inputs"], &case["outputs"]);
    let (responses, b, t) = vec2(&i["responses"]);
    let seq_len: Vec<i64> = i["sequence_lengths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let eos = num(&p["eos_token_id"]) as f32;
    const INVALID: f32 = 1.0;
    let contains_eos: Vec<bool> = (0..b)
        .map(|r| responses[r * t..(r + 1) * t].contains(&eos))
        .collect();
    let mut scores = vec1(&i["scores"]);
    if let Some(penalty) = p["missing_eos_penalty"].as_f64() {
        for (s, has) in scores.iter_mut().zip(&contains_eos) {
            if !has {
                *s -= penalty as f32;
            }
        }
    }
    let pad = |r: usize, c: usize, extra: i64| (c as i64) > seq_len[r] + extra;
    let padding: Vec<f32> = (0..b * t)
        .map(|k| pad(k / t, k % t, 0) as u8 as f32)
        .collect();
    let padding_p1: Vec<f32> = (0..b * t)
        .map(|k| pad(k / t, k % t, 1) as u8 as f32)
        .collect();
    let fill = |x: Vec<f32>, m: &[f32], v: f32| -> Vec<f32> {
        x.iter()
            .zip(m)
            .map(|(&x, &m)| if m > 0.0 { v } else { x })
            .collect()
    };
    let logp = fill(vec2(&i["logprobs"]).0, &padding, INVALID);
    let ref_logp = fill(vec2(&i["ref_logprobs"]).0, &padding, INVALID);
    let values = fill(vec2(&i["values"]).0, &padding_p1, 0.0);
    let estimator = estimator_named(p["kl_estimator"].as_str().expect("kl_estimator"), name);
    // The score lands one past the last response token when that is inside the window.
    let actual_end: Vec<usize> = seq_len
        .iter()
        .map(|&l| {
            if l + 1 < t as i64 {
                (l + 1) as usize
            } else {
                l.max(0) as usize
            }
        })
        .collect();
    let out = kl_rewards(
        &scores,
        &logp,
        &ref_logp,
        t,
        &actual_end,
        num(&p["kl_coef"]),
        estimator,
    );
    // What `prepare_ppo` calls, with TRL's two masks: rewards are whitened over the response
    // and its score position (~padding_mask_p1), advantages over the response (~padding_mask).
    let valid_p1: Vec<f32> = padding_p1.iter().map(|m| 1.0 - m).collect();
    let valid: Vec<f32> = padding.iter().map(|m| 1.0 - m).collect();
    let options = AdvantageOptions {
        gamma: num(&p["gamma"]),
        lambda: num(&p["lam"]),
        whiten_rewards: p["whiten_rewards"].as_bool().expect("whiten_rewards"),
        whiten_advantages: true,
    };
    let g = ppo_advantages(&values, &out.rewards, &valid_p1, &valid, t, &options)
        .unwrap_or_else(|e| panic!("{name}: {e}"));

    let flags = |v: &[bool]| v.iter().map(|&b| b as u8 as f32).collect::<Vec<_>>();
    close_all(
        &format!("{name} contain_eos"),
        &flags(&contains_eos),
        &vec1(&o["contain_eos_token"]),
    );
    close_all(&format!("{name} scores"), &scores, &vec1(&o["scores"]));
    close_all(
        &format!("{name} padding_mask"),
        &padding,
        &vec2(&o["padding_mask"]).0,
    );
    close_all(
        &format!("{name} padding_mask_p1"),
        &padding_p1,
        &vec2(&o["padding_mask_p1"]).0,
    );
    close_all(&format!("{name} logprobs"), &logp, &vec2(&o["logprobs"]).0);
    close_all(
        &format!("{name} ref_logprobs"),
        &ref_logp,
        &vec2(&o["ref_logprobs"]).0,
    );
    close_all(&format!("{name} values"), &values, &vec2(&o["values"]).0);
    close_all(&format!("{name} kl"), &out.kl, &vec2(&o["kl"]).0);
    close_all(
        &format!("{name} non_score"),
        &out.non_score,
        &vec2(&o["non_score_reward"]).0,
    );
    let end: Vec<f32> = actual_end.iter().map(|&e| e as f32).collect();
    close_all(&format!("{name} actual_end"), &end, &vec1(&o["actual_end"]));
    close_all(
        &format!("{name} rewards"),
        &g.rewards,
        &vec2(&o["rewards"]).0,
    );
    close_all(
        &format!("{name} advantages"),
        &g.advantages,
        &vec2(&o["advantages"]).0,
    );
    close_all(
        &format!("{name} returns"),
        &g.returns,
        &vec2(&o["returns"]).0,
    );
}
