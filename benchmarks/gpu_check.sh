#!/usr/bin/env bash
# One GPU, at most 5 minutes: GPT-2 small (124M-class) trained by the real train stage in bf16,
# compiled, with fused flash attention (scaled_dot_product_attention picks the kernel: cuDNN's on an
# H200 with torch 2.11); prints tokens/s, MFU against the GPU's bf16 peak and the attention kernels,
# then runs the GPU-marked tests. Results: benchmarks/GPU_RESULTS.md.
#
#   bash benchmarks/gpu_check.sh            # from the project root, torch with CUDA installed
#                                           # (make install TORCH=torch), lmforge importable
# Environment: STEPS (default 60 optimizer steps), BATCH (micro-batch, default 16 x 1024 tokens),
# PYTHON (default python3, else python: a bare machine may have no `python`).
# Writes its work under $OUT (or a temporary directory) and everything it measures to stdout.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${OUT:-$(mktemp -d)}/gpu_check"
STEPS="${STEPS:-60}"
BATCH="${BATCH:-16}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" MLFLOW_DISABLE_TELEMETRY=true
mkdir -p "$WORK"
cd "$ROOT"

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 60 "$PYTHON" -m lmforge info --probe-seconds 2

# The default corpus with a BPE vocabulary (4096), token files under $WORK.
PATHS=(paths.prepared="$WORK/prepared" paths.vocab="$WORK/vocab" paths.tokens="$WORK/tokens"
       paths.model="$WORK/gpt" paths.checkpoints="$WORK/checkpoints" paths.reports="$WORK/reports"
       tokenizer=bpe tracking.uri="sqlite:///$WORK/mlflow.db" tracking.log_model=false)
echo "== data (prepare, vocab, tokenize)"
timeout 120 "$PYTHON" pipelines/prepare.py "${PATHS[@]}"
timeout 120 "$PYTHON" pipelines/vocab.py "${PATHS[@]}"
timeout 120 "$PYTHON" pipelines/tokenize.py "${PATHS[@]}"

echo "== train: model=gpt2-small trainer=gpu (bf16-mixed, compile, flash attention), $STEPS steps"
timeout 240 "$PYTHON" pipelines/train.py "${PATHS[@]}" model=gpt2-small trainer=gpu trainer.devices=1 \
    trainer.precision=auto train.max_steps="$STEPS" train.batch_size="$BATCH" train.eval_interval="$STEPS" \
    train.eval_iters=5 train.log_every=10 train.checkpoint_every=100000

"$PYTHON" - "$WORK/gpt" <<'EOF'
import json, re, sys
import torch
from torch.profiler import ProfilerActivity, profile
from lmforge.model.directory import load_model_dir
from lmforge.training.hardware import peak_flops, resolve_precision

loaded = load_model_dir(sys.argv[1])
training = json.load(open(f"{sys.argv[1]}/config.json"))["training"]
tps = training["tokens_per_second"]  # the run's mean over timed steps (compilation and validation excluded)
flops = loaded.model.flops_per_token()
peak = peak_flops(torch.device("cuda", 0))
print(f"gpt2-small: {loaded.model.num_params() / 1e6:.1f}M parameters, {training['steps']} steps, "
      f"{tps:,.0f} tokens/s on {torch.cuda.get_device_name(0)}")
print(f"MFU: {flops * tps / peak:.1%} of {peak / 1e12:.0f} TFLOP/s bf16" if peak else "MFU: unknown peak for this GPU")
trainer = loaded.train_config().trainer
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), trainer.compile {trainer.compile}, precision "
      f"{trainer.precision} -> {resolve_precision(trainer.precision, trainer.accelerator)}")

# Which kernel scaled_dot_product_attention runs for this model's shapes (one forward and backward
# under bf16 autocast, as in training; torch.compile keeps the same SDPA backend choice).
model = loaded.model.to("cuda").train()
x = torch.randint(0, model.config.vocab_size, (2, model.config.block_size), device="cuda")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, torch.autocast("cuda", dtype=torch.bfloat16):
    model(x, x)[1].backward()
attention = sorted({e.key for e in prof.key_averages()
                    if re.search(r"flash|fmha|attention|sdp|cudnn", e.key, re.I) and not e.key.startswith("autograd::")})
print("attention kernels:", "; ".join(k[:100] for k in attention) or "none found")
EOF

# Only the files that hold GPU tests: collecting all of tests/ imports the test extra (Ray, gguf, the
# OpenAI client), which a GPU machine set up to train need not have.
echo "== GPU-marked tests"
timeout 120 "$PYTHON" -m pytest -q -m gpu $(grep -rl "pytest.mark.gpu" tests --include="test_*.py")
