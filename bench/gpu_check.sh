#!/usr/bin/env bash
# The prepared GPU check: one run, all figures side by side in one process per workload.
# Usage on a GPU machine (repo root, .venv carried or built by scripts/bootstrap):
#   bash bench/gpu_check.sh            # writes JSON to ${OUT:-bench/out}/gpu_*.json
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_info.txt"

# 1. Stage 2 on ViT-B-32 (random weights: speed does not depend on values): our data path at batch 256
#    (bf16, compiled forward) vs the reference regime (fp32, no TF32, per-image PIL views, 4 workers,
#    batch 50); text classifier at paper scale; classify throughput and latency.
timeout 420 "$PY" bench/speed.py --model ViT-B-32::random --classes 10 --images 2048 \
  --source-width 500 --source-height 375 --decode-workers 16 \
  --batch 256 --steps 40 --warmup 5 --compile \
  --ref-batch 50 --ref-steps 30 --ref-workers 4 \
  --text-sentences 130000 --text-classes 1000 --text-steps 3000 \
  --classify-batch 256 --classify-reps 20 --latency-reps 100 \
  --out "$OUT/gpu_speed.json" 2>&1 | tail -n 60

# 2. The same without torch.compile (what a user gets by default)
timeout 150 "$PY" bench/speed.py --model ViT-B-32::random --images 1024 --batch 256 --steps 30 --warmup 3 \
  --ref-steps 10 --ref-workers 4 --skip text --skip classify --out "$OUT/gpu_speed_nocompile.json" 2>&1 | tail -n 25

# 3. The service over HTTP against its limit (issue 11): the embedded service on the GPU (API and
#    worker), single-image latency, batched and concurrent throughput, each beside the adapted
#    model's own encoder measured in the same run; and memory with 1/10/100 adapted ViT-B-32 models.
timeout 420 "$PY" -m bench.serve --device cuda --threads 4 --batch 256 --seconds 15 \
  --out "$OUT/gpu_serve.json" 2>&1 | tail -n 30
