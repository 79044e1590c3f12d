#!/usr/bin/env bash
# GRPO side by side, one run: `rlhf bench grpo` vs TRL's GRPOTrainer with 1 torch thread and with
# torch's default, on the tiny fixture and a ~3M Llama (made by trl_grpo.py --make-model).
# Needs a release build and a Python with torch, transformers, trl, datasets:
#   python -m venv .venv-trl && .venv-trl/bin/pip install torch transformers trl datasets
#   PYTHON=.venv-trl/bin/python bash examples/bench/compare.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
rlhf=${RLHF:-target/release/rlhf}
fixtures=${RLHF_FIXTURES_DIR:-../shared/fixtures}
models=${BENCH_MODELS:-target/bench-models}
out=${1:-target/bench-grpo.jsonl}
[ -d "$models/llama-3m" ] || "$python" examples/bench/trl_grpo.py --make-model "$models/llama-3m" --tokenizer-from "$fixtures/tiny-llama"
: > "$out"
for model in "$fixtures/tiny-llama" "$models/llama-3m"; do
  "$rlhf" bench grpo --model "$model" --json 2>/dev/null >> "$out"
  "$python" examples/bench/trl_grpo.py --model "$model" --threads 1 2>/dev/null | tail -1 >> "$out"
  "$python" examples/bench/trl_grpo.py --model "$model" 2>/dev/null | tail -1 >> "$out"
done
"$python" - "$out" <<'PY'
import json, sys
print("| model | system | s/step | generated tok/s | peak memory MB |")
print("|---|---|---|---|---|")
for line in open(sys.argv[1]):
    d = json.loads(line)
    system = d["system"] if d["system"] == "rlhf" else f"TRL, {d['threads']} thread(s)"
    print(f"| {d['model'].rstrip('/').split('/')[-1]} | {system} | {d['seconds_per_step']:.3f} | {d['generated_tokens_per_s']:,.0f} | {d['peak_rss_mb']:,.0f} |")
PY
