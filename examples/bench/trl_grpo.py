"""TRL's GRPOTrainer on CPU on the workload of `rlhf bench grpo`, for a side-by-side table.

Same checkpoint, same prompts, same reward (share of the byte `a` in the completion), same
shape (prompts x generations x max new tokens per step), beta 0, temperature 1, lr 1e-6, one
optimizer step per GRPO step. Prints one JSON object like `rlhf bench grpo --json`.

    python examples/bench/trl_grpo.py --model DIR [--threads 1] [--steps 5] [--warmup 1]
    python examples/bench/trl_grpo.py --make-model DIR --tokenizer-from FIXTURE  # the ~3M Llama

Needs: pip install torch transformers trl datasets (see examples/bench/README.md).
"""

import argparse
import json
import resource
import time


def byte_share(completions, **_):
    out = []
    for c in completions:
        text = c if isinstance(c, str) else c[-1]["content"]
        data = text.encode()
        out.append(data.count(b"a") / len(data) if data else 0.0)
    return out


def make_model(out, tokenizer_from):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    import torch

    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"made": out, "parameters": n}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    p.add_argument("--make-model")
    p.add_argument("--tokenizer-from")
    a = p.parse_args()
    if a.make_model:
        return make_model(a.make_model, a.tokenizer_from)

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    total = a.warmup + a.steps
    prompts = [
        f"Write a short story about the number {i}. Once upon a time" for i in range(a.prompts)
    ]
    dataset = Dataset.from_dict({"prompt": prompts * (total + 1)})

    class Timer(TrainerCallback):
        def __init__(self):
            self.seconds, self.started = [], None

        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.seconds.append(time.perf_counter() - self.started)

    timer = Timer()
    config = GRPOConfig(
        output_dir="/tmp/trl-grpo-bench",
        per_device_train_batch_size=a.prompts * a.samples,
        gradient_accumulation_steps=1,
        num_generations=a.samples,
        max_completion_length=a.max_new_tokens,
        beta=0.0,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        gradient_checkpointing=False,
        temperature=1.0,
        max_steps=total,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        shuffle_dataset=False,
    )
    tok = AutoTokenizer.from_pretrained(a.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=byte_share,
        args=config,
        train_dataset=dataset,
        processing_class=tok,
        callbacks=[timer],
    )
    trainer.train()
    lengths = [
        h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h
    ]
    measured = timer.seconds[a.warmup :]
    measured_lengths = lengths[a.warmup :] if len(lengths) >= total else lengths
    tokens = sum(l * a.prompts * a.samples for l in measured_lengths)
    print(
        json.dumps(
            {
                "system": "trl",
                "threads": a.threads or torch.get_num_threads(),
                "model": a.model,
                "prompts": a.prompts,
                "samples": a.samples,
                "max_new_tokens": a.max_new_tokens,
                "steps": a.steps,
                "warmup": a.warmup,
                "seconds_per_step": sum(measured) / len(measured),
                "step_seconds": measured,
                "generated_tokens_per_s": tokens / sum(measured),
                "mean_completion_tokens": sum(measured_lengths) / max(len(measured_lengths), 1),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6,
            }
        )
    )


if __name__ == "__main__":
    main()
