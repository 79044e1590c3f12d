#!/usr/bin/env python3
"""Makes learner/tests/golden/trl_extra.json with TRL's own code (see README.md here).

    python make_golden.py --fixtures /work/shared/fixtures \
        --trl011-wheel trl-0.11.4-py3-none-any.whl --trl029-wheel trl-0.29.1-py3-none-any.whl \
        --out trl_extra.json

Needs torch, transformers and trl 1.16 installed (GRPO cases call the installed GRPOTrainer).
TRL 1.x has no PPO trainer, so the PPO cases run the code of the two older wheels, read from the
wheel files (pip download --no-deps trl==0.11.4 / trl==0.29.1): the functions named below are
extracted from the wheel's source with `ast` and exec'd unchanged; nothing is reimplemented.
"""

import argparse
import ast
import hashlib
import json
import math
import os
import random
import textwrap
import types
import typing
import warnings
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
import transformers
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer


def clean(x):
    """JSON-safe: tensors to lists, NaN to null."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().tolist()
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---------------------------------------------------------------- code from the TRL wheels


def wheel_source(wheel, member):
    with zipfile.ZipFile(wheel) as z:
        return z.read(member).decode()


def extract_function(source, name, cls=None):
    """The exact source text of a module-level function, or a method of `cls`."""
    tree = ast.parse(source)
    scope = tree.body
    if cls is not None:
        scope = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
    node = next(n for n in scope if isinstance(n, ast.FunctionDef) and n.name == name)
    return textwrap.dedent(ast.get_source_segment(source, node, padded=True))


def load_functions(source, names, namespace, cls=None):
    for name in names:
        exec(extract_function(source, name, cls), namespace)
    return namespace


def extract_block(source, first, last):
    """The lines from the one starting with `first` to the one starting with `last`, dedented."""
    lines = source.splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip().startswith(first))
    end = next(i for i in range(start, len(lines)) if lines[i].strip().startswith(last))
    return textwrap.dedent("\n".join(lines[start : end + 1]))


# ---------------------------------------------------------------- PPO, trl 0.11.4


def ppo011_cases(wheel):
    src = wheel_source(wheel, "trl/trainer/ppo_trainer.py")
    core = wheel_source(wheel, "trl/core.py")
    ns = {"torch": torch, "F": F, "np": np, "warnings": warnings}
    ns.update({n: getattr(typing, n) for n in ["Callable", "List", "Optional", "Union"]})  # its imports
    load_functions(core, ["masked_mean"], ns)
    load_functions(src, ["compute_rewards", "_kl_penalty", "record_step_stats"], ns, cls="PPOTrainer")

    g = torch.Generator().manual_seed(11)
    b, t = 4, 7
    logprobs = (-4 * torch.rand(b, t, generator=g)).round(decimals=4)
    ref_logprobs = (logprobs + 0.6 * (torch.rand(b, t, generator=g) - 0.5)).round(decimals=4)
    masks = torch.tensor(
        [[0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0, 0]]
    )
    scores = torch.tensor([1.5, -0.5, 0.25, 2.0])
    cases = []
    for penalty in ["kl", "abs", "mse"]:
        kl_coef = 0.2
        trainer = types.SimpleNamespace(
            config=types.SimpleNamespace(kl_penalty=penalty), kl_ctl=types.SimpleNamespace(value=kl_coef)
        )
        for name in ["compute_rewards", "_kl_penalty", "record_step_stats"]:
            setattr(trainer, name, types.MethodType(ns[name], trainer))
        rewards, non_score, kls = trainer.compute_rewards(scores, logprobs, ref_logprobs, masks)
        # record_step_stats gives `objective/kl`, the value the adaptive controller is updated with;
        # the other arguments only feed other statistics.
        stats = trainer.record_step_stats(
            kl_coef=kl_coef,
            masks=masks,
            kls=kls,
            logprobs=logprobs,
            ref_logprobs=ref_logprobs,
            non_score_reward=non_score,
            scores=scores,
            queries=[torch.zeros(3)] * b,
            responses=[torch.zeros(t)] * b,
            train_stats={"val/error": torch.tensor([1.0]), "returns/var": torch.tensor([1.0])},
        )
        cases.append(
            {
                "name": f"trl011_compute_rewards_{penalty}",
                "kind": "ppo_rewards",
                "description": (
                    f"kl_penalty = {penalty!r}: per-token reward = -kl_coef * _kl_penalty(logprob, ref_logprob) "
                    "('kl': logp - ref, 'abs': |logp - ref|, 'mse': 0.5 (logp - ref)^2); the score is added at "
                    "the last position where mask == 1; the KL itself is not masked. "
                    "objective_kl_for_controller = record_step_stats' objective/kl: mean over rows of sum(kls * mask)."
                ),
                "source": "trl 0.11.4 PPOTrainer.compute_rewards / _kl_penalty / record_step_stats, "
                "exec'd from the wheel on a minimal object (config.kl_penalty, kl_ctl.value)",
                "params": {"kl_penalty": penalty, "kl_coef": kl_coef},
                "inputs": {
                    "scores": scores,
                    "logprobs": logprobs,
                    "ref_logprobs": ref_logprobs,
                    "masks": masks,
                },
                "outputs": {
                    "rewards": rewards,
                    "non_score_rewards": non_score,
                    "kls": kls,
                    "objective_kl_for_controller": float(stats["objective/kl"]),
                },
            }
        )
    return cases


# ---------------------------------------------------------------- PPO, trl 0.29.1


def ppo029_cases(wheel):
    src = wheel_source(wheel, "trl/experimental/ppo/ppo_trainer.py")
    utils = wheel_source(wheel, "trl/experimental/utils.py")
    ns = {"torch": torch}
    load_functions(utils, ["first_true_indices"], ns)
    load_functions(src, ["truncate_response", "masked_mean", "masked_var", "masked_whiten"], ns)
    # Response processing 3 to the end of step 6 of PPOTrainer.train, verbatim.
    block = extract_block(
        src, "contain_eos_token = torch.any(", "advantages = torch.masked_fill(advantages, padding_mask, 0)"
    )
    invalid = float(ast.literal_eval(next(l.split("=")[1] for l in src.splitlines() if l.startswith("INVALID_LOGPROB"))))

    eos, pad = 1, 2
    raw = torch.tensor(
        [
            [5, 6, 7, 1, 9, 9],  # EOS at 3, tokens after it are truncated to pad
            [5, 6, 7, 3, 4, 6],  # no EOS, fills the window
            [1, 9, 9, 9, 9, 9],  # EOS first
            [5, 1, 2, 2, 2, 2],
            [8, 8, 8, 8, 1, 2],  # EOS at T-2: the score lands on the last position
            [4, 3, 1, 2, 2, 2],
            [7, 7, 7, 7, 7, 1],  # EOS at T-1: the score lands on the EOS itself
            [3, 3, 2, 2, 2, 2],  # no EOS, padded
        ]
    )
    b, t = raw.shape
    g = torch.Generator().manual_seed(29)
    logprobs_raw = (-4 * torch.rand(b, t, generator=g)).round(decimals=4)
    ref_raw = (logprobs_raw + 0.8 * (torch.rand(b, t, generator=g) - 0.5)).round(decimals=4)
    values_raw = (2 * torch.rand(b, t, generator=g) - 1).round(decimals=4)
    scores_raw = torch.tensor([1.5, -0.5, 0.25, 2.0, 0.75, -1.25, 1.0, 0.5])

    cases = []
    settings = [
        ("k1", True, 1.0, 0.95, None),
        ("k3", True, 0.99, 0.9, 1.0),
        ("k3", False, 1.0, 0.95, 1.0),
    ]
    for estimator, whiten, gamma, lam, eos_pen in settings:
        postprocessed = ns["truncate_response"](eos, pad, raw)
        sequence_lengths = ns["first_true_indices"](postprocessed == pad) - 1
        args = types.SimpleNamespace(
            kl_estimator=estimator,
            kl_coef=0.05,
            whiten_rewards=whiten,
            gamma=gamma,
            lam=lam,
            missing_eos_penalty=eos_pen,
        )
        this = types.SimpleNamespace(
            args=args, processing_class=types.SimpleNamespace(eos_token_id=eos, pad_token_id=pad)
        )
        env = dict(ns)
        env.update(
            self=this,
            args=args,
            INVALID_LOGPROB=invalid,
            empty_cache=lambda: None,
            responses=postprocessed.clone(),
            postprocessed_responses=postprocessed.clone(),
            sequence_lengths=sequence_lengths.clone(),
            logprobs=logprobs_raw.clone(),
            ref_logprobs=ref_raw.clone(),
            values=values_raw.clone(),
            scores=scores_raw.clone(),
        )
        exec(block, env)
        cases.append(
            {
                "name": f"trl029_rewards_gae_{estimator}_whiten{int(whiten)}_gamma{gamma}_lam{lam}_eospen{eos_pen}",
                "kind": "ppo_rewards_gae",
                "description": (
                    "responses truncated after the first EOS by truncate_response; sequence_length = "
                    "first_true_indices(response == pad) - 1; then PPOTrainer.train from 'Response Processing 3' "
                    "to the advantage whitening, verbatim: missing-EOS penalty, padding masks, INVALID_LOGPROB "
                    "fill, kl = -logr (k1) or exp(logr) - 1 - logr (k3), score at actual_end, "
                    "rewards whitened over ~padding_mask_p1 keeping the mean when whiten_rewards, then zeroed "
                    "under padding_mask_p1, GAE, advantages whitened over ~padding_mask."
                ),
                "source": "trl 0.29.1 trl/experimental/ppo/ppo_trainer.py PPOTrainer.train (inline block, exec'd "
                "verbatim from the wheel) with truncate_response / first_true_indices / masked_whiten of the wheel",
                "params": {
                    "kl_estimator": estimator,
                    "kl_coef": args.kl_coef,
                    "whiten_rewards": whiten,
                    "gamma": gamma,
                    "lam": lam,
                    "missing_eos_penalty": eos_pen,
                    "eos_token_id": eos,
                    "pad_token_id": pad,
                    "INVALID_LOGPROB": invalid,
                },
                "inputs": {
                    "responses": postprocessed,
                    "sequence_lengths": sequence_lengths,
                    "logprobs": logprobs_raw,
                    "ref_logprobs": ref_raw,
                    "values": values_raw,
                    "scores": scores_raw,
                },
                "outputs": {
                    key: env[key]
                    for key in [
                        "contain_eos_token",
                        "scores",
                        "padding_mask",
                        "padding_mask_p1",
                        "logprobs",
                        "ref_logprobs",
                        "values",
                        "kl",
                        "non_score_reward",
                        "actual_end",
                        "rewards",
                        "advantages",
                        "returns",
                    ]
                },
            }
        )
    return cases


# ---------------------------------------------------------------- GRPO, the installed trl 1.16


def grpo_trainer(model_dir, **overrides):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reward_funcs = overrides.pop("reward_funcs")
    args = GRPOConfig(
        output_dir="/tmp/make_golden_grpo",
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        seed=0,
        bf16=False,  # TRL's default is bf16 autocast; the fixtures are float32
        fp16=False,
        **overrides,
    )
    dataset = Dataset.from_dict({"prompt": ["unused"] * args.per_device_train_batch_size})
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    return trainer


def multi_objective_cases(model_dir):
    nan = float("nan")
    # rewards_per_func[i][f]; None from a reward function is NaN. Group 0: function b has a
    # much larger spread; group 1: sample 5 misses function b, sample 7 is unscorable, function a
    # is constant.
    per_func = [
        [1.0, 10.0],
        [0.0, -10.0],
        [1.0, 0.0],
        [0.0, 4.0],
        [1.0, 0.5],
        [1.0, nan],
        [1.0, 2.0],
        [nan, nan],
    ]
    weights = [1.0, 0.5]
    num_generations = 4
    cases = []
    for aggregation, scale in [("normalize_then_sum", "group"), ("sum_then_normalize", "group"), ("normalize_then_sum", "none")]:

        def make(k):
            def reward(completions, **kwargs):
                return [None if math.isnan(row[k]) else row[k] for row in per_func]

            reward.__name__ = f"fixed_reward_{k}"
            return reward

        trainer = grpo_trainer(
            model_dir,
            reward_funcs=[make(0), make(1)],
            reward_weights=weights,
            multi_objective_aggregation=aggregation,
            scale_rewards=scale,
            num_generations=num_generations,
            per_device_train_batch_size=len(per_func),
            max_completion_length=4,
            beta=0.0,
        )
        prompts = ["hello world", "the cat sat"]
        inputs = [{"prompt": prompts[i // num_generations]} for i in range(len(per_func))]
        with torch.no_grad():
            out = trainer._generate_and_score_completions(inputs)
        cases.append(
            {
                "name": f"trl116_grpo_adv_two_funcs_{aggregation}_scale_{scale}",
                "kind": "grpo_advantages",
                "description": (
                    f"two reward functions, reward_weights {weights}, multi_objective_aggregation {aggregation!r}, "
                    f"scale_rewards {scale!r} (unused by normalize_then_sum); None rewards (null) are NaN; "
                    "sample 7 is unscorable."
                ),
                "source": f"trl {trl.__version__} GRPOTrainer._generate_and_score_completions (real generation on "
                "tiny-llama; reward functions return the fixed values below)",
                "params": {
                    "num_generations": num_generations,
                    "num_prompts": len(prompts),
                    "scale_rewards": scale,
                    "multi_objective_aggregation": aggregation,
                    "reward_weights": weights,
                    "std_epsilon": 1e-4,
                    "std": "unbiased (Bessel), trl.trainer.utils.nanstd",
                },
                "inputs": {
                    "rewards_per_func": per_func,
                    "layout": "row i belongs to prompt i // num_generations; rewards_per_func[i][f]",
                },
                "outputs": {"advantages": out["advantages"]},
            }
        )
    return cases


def end_to_end_cases(model_dir, shared_case):
    base = shared_case["inputs"]
    prompt_ids = torch.tensor(base["prompt_ids"])
    prompt_mask = torch.tensor(base["prompt_mask"])
    completion_ids = torch.tensor(base["completion_ids"])
    completion_mask = torch.tensor(base["completion_mask"])
    b, t = completion_ids.shape
    cases = []
    for loss_type, temperature in [("grpo", 1.0), ("dapo", 0.7)]:
        torch.manual_seed(0)
        trainer = grpo_trainer(
            model_dir,
            reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
            beta=0.0,
            loss_type=loss_type,
            temperature=temperature,
            num_generations=2,
            per_device_train_batch_size=b,
            max_completion_length=t,
            epsilon=0.2,
        )
        trainer.current_gradient_accumulation_steps = 1
        model = trainer.model
        model.train()
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        with torch.no_grad():
            logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, t, compute_entropy=True
            )
        g = torch.Generator().manual_seed(7 if loss_type == "grpo" else 8)
        old = ((logps + 0.6 * (torch.rand(b, t, generator=g) - 0.5)) * completion_mask).round(decimals=4)
        advantages = torch.tensor([1.2, -0.4, 0.7, -1.5])
        inputs = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "advantages": advantages,
            "old_per_token_logps": old,
        }
        params_extra = {}
        if loss_type == "dapo":
            inputs["num_items_in_batch"] = completion_mask.sum().float()
            params_extra = {
                "num_processes": trainer.accelerator.num_processes,
                "steps_per_generation": trainer.args.steps_per_generation,
            }
        for v in trainer._metrics["train"].values():
            v.clear()
        model.zero_grad()
        loss = trainer._compute_loss(model, inputs)
        loss.backward()
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
        param_grads = []
        for name, p in model.named_parameters():
            grad = p.grad.detach().flatten().double()
            param_grads.append(
                {
                    "name": name,
                    "shape": list(p.shape),
                    "l2": float(grad.norm()),
                    "sum": float(grad.sum()),
                    "first8": grad[:8].tolist(),
                }
            )
        inputs_json = {k: v for k, v in inputs.items()}
        cases.append(
            {
                "name": f"trl116_grpo_e2e_{loss_type}_beta0_temp{temperature}",
                "kind": "grpo_end_to_end",
                "description": (
                    "tiny-llama checkpoint, beta = 0: no reference log-probs at all (TRL skips the reference "
                    "model and the KL term, and logs no kl metric). Prompts and completions are those of the "
                    f"shared case {shared_case['name']}; policy log-probs and entropies from "
                    "_get_per_token_logps_and_entropies at this temperature; old log-probs = those + fixed "
                    "noise; loss via _compute_loss (model in train mode, current_gradient_accumulation_steps = 1, "
                    "bf16 = False so nothing is autocast); gradients of the loss w.r.t. every parameter (float32)."
                ),
                "source": f"trl {trl.__version__} GRPOTrainer._get_per_token_logps_and_entropies + _compute_loss; "
                f"transformers {transformers.__version__}, torch {torch.__version__}",
                "params": {
                    "model": os.path.basename(model_dir.rstrip("/")),
                    "model_safetensors_sha256": sha256(os.path.join(model_dir, "model.safetensors")),
                    "loss_type": loss_type,
                    "beta": 0.0,
                    "temperature": temperature,
                    "epsilon_low": trainer.epsilon_low,
                    "epsilon_high": trainer.epsilon_high,
                    "use_bias_correction_kl": trainer.args.use_bias_correction_kl,
                    "max_completion_length": t,
                    "current_gradient_accumulation_steps": 1,
                    **params_extra,
                },
                "inputs": inputs_json,
                "outputs": {
                    "per_token_logps": logps,
                    "entropies": entropies,
                    "loss": float(loss),
                    "metrics": metrics,
                    "param_grads": param_grads,
                },
            }
        )
    return cases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", required=True)
    ap.add_argument("--trl011-wheel", required=True)
    ap.add_argument("--trl029-wheel", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    model_dir = os.path.join(a.fixtures, "tiny-llama")
    with open(os.path.join(a.fixtures, "golden_rl.json")) as f:
        shared = json.load(f)
    shared_e2e = next(c for c in shared["cases"] if c["kind"] == "grpo_end_to_end")

    cases = []
    cases += end_to_end_cases(model_dir, shared_e2e)
    cases += multi_objective_cases(model_dir)
    cases += ppo011_cases(a.trl011_wheel)
    cases += ppo029_cases(a.trl029_wheel)
    doc = {
        "made_by": "learner/tests/golden/make_golden.py",
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "trl_0.11.4_wheel_sha256": sha256(a.trl011_wheel),
            "trl_0.29.1_wheel_sha256": sha256(a.trl029_wheel),
        },
        "cases": clean(cases),
    }
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
        f.write("\n")
    print(f"wrote {len(cases)} cases to {a.out}")


if __name__ == "__main__":
    main()
