#!/usr/bin/env bash
# The prepared GPU check: one run, all figures side by side in one process per workload.
#
# On the lent nvidia-h200 (the session's `device` tool): first, here, `bash bench/gpu_wheels.sh`
# (the packages its image lacks, as py3.12 wheels in .whl/), then one call:
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=590)
# On any other GPU machine: `bash bench/gpu_check.sh` (uses .venv/bin/python when there is one).
#
# Budget: a device command may run 600 s, and the session has 15 minutes of device time in all,
# machine start included. Setup (wheels into /tmp/site) ~15 s, step 1 240 s, step 2 80 s,
# step 3 200 s: ~535 s, and no step starts past DEADLINE (560 s) or runs beyond it.
# Writes to ${OUT:-bench/out} (the device hands back $OUT, at most 8 files): gpu_check.log (this
# console), gpu_info.txt, gpu_speed.json, gpu_speed_nocompile.json, gpu_serve.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
DEADLINE=${DEADLINE:-560}
export PYTHONUNBUFFERED=1

# timeout for a step: its budget, or what is left before DEADLINE if less. SIGINT first, so Python
# unwinds (bench.serve stops the service it started in its own session), SIGKILL 10 s later.
step() {
  local budget=$1 left=$((DEADLINE - SECONDS))
  shift
  ((left < budget)) && budget=$left
  if ((left < 20)); then
    echo "== skipped (${left} s left before the ${DEADLINE} s deadline): $*"
    return 0
  fi
  echo "== [${SECONDS} s] timeout ${budget} s: $*"
  timeout -s INT -k 10 "$budget" "$@"
  local rc=$?
  echo "== [${SECONDS} s] exit ${rc}$( ((rc == 124 || rc == 137)) && echo ' (timed out)')"
}

main() {
  # The Python: a .venv made by scripts/bootstrap if there is one, else the machine's python3 (the
  # device's: 3.12 with torch), completed from the wheels that bench/gpu_wheels.sh put in .whl/.
  local PY=python3
  [[ -x .venv/bin/python ]] && PY=.venv/bin/python
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  local need="import open_clip, fastapi, celery, sqlalchemy, kornia"
  if ! "$PY" -c "$need" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    echo "== installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into /tmp/site"
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl || return 1
    export PYTHONPATH=/tmp/site:$PYTHONPATH
  fi
  # Everything the three steps import; a failure here ends the run at once, not 500 s later.
  "$PY" - <<'EOF' || return 1
import importlib.metadata as md, platform, sys
import open_clip, kornia, openai, fastapi, starlette, pydantic, pydantic_settings, python_multipart, uvicorn
import sqlalchemy, alembic, celery, kombu, redis, httpx, torch, torchvision
print("python", platform.python_version(), sys.executable)
print(", ".join(f"{n} {md.version(n)}" for n in (
    "torch", "torchvision", "open_clip_torch", "timm", "kornia", "numpy", "pillow", "fastapi", "starlette",
    "pydantic", "uvicorn", "sqlalchemy", "alembic", "celery", "kombu", "openai", "httpx", "typing_extensions")))
print("cuda", torch.version.cuda, "available:", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
# the carried wheels' requirements against what is installed (the device's own versions are unknown here)
try:
    from packaging.requirements import Requirement
    for d in md.distributions(path=["/tmp/site"]):
        for r in map(Requirement, d.requires or []):
            if r.marker is not None and not r.marker.evaluate({"extra": ""}):
                continue
            try:
                v = md.version(r.name)
            except md.PackageNotFoundError:
                print(f"warning: {d.metadata['Name']} needs {r}: not installed")
                continue
            if not r.specifier.contains(v, prereleases=True):
                print(f"warning: {d.metadata['Name']} needs {r}, found {v}")
except ImportError:
    pass
EOF
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_info.txt"

  # 1. Stage 2 on ViT-B-32 (random weights: speed does not depend on values): our data path at
  #    batch 256 (bf16, compiled forward) vs the reference regime (fp32, no TF32, per-image PIL
  #    views, 4 workers, batch 50); the text classifier at paper scale (130,000 sentences x 1,000
  #    classes; 1,000 steps, not the paper's 3,000: the ratio is per step); classify throughput and
  #    latency. Runs text, classify, then stage 2, so a slow compile costs stage 2 alone (step 2 has it).
  step 240 "$PY" bench/speed.py --model ViT-B-32::random --classes 10 --images 1024 \
    --source-width 500 --source-height 375 --decode-workers 16 \
    --batch 256 --steps 30 --warmup 5 --compile \
    --ref-batch 50 --ref-steps 20 --ref-workers 4 \
    --text-sentences 130000 --text-classes 1000 --text-steps 1000 \
    --classify-batch 256 --classify-reps 20 --latency-reps 100 \
    --out "$OUT/gpu_speed.json"

  # 2. Stage 2 without torch.compile (what a user gets by default)
  step 80 "$PY" bench/speed.py --model ViT-B-32::random --images 1024 --batch 256 --steps 20 --warmup 3 \
    --ref-steps 10 --ref-workers 4 --skip text --skip classify --out "$OUT/gpu_speed_nocompile.json"

  # 3. The service over HTTP against its limit (issue 11): the embedded service on the GPU (API and
  #    worker), single-image latency, batched and concurrent throughput, each beside the adapted
  #    model's own encoder measured in the same run; and memory with 1/10/100 adapted ViT-B-32
  #    models. ViT-B-32 only (the tiny model says nothing about a GPU), 8 s per concurrency level.
  step 200 "$PY" -m bench.serve --device cuda --threads 4 --models vitb32 --batch 256 \
    --concurrency 1 8 32 --seconds 8 --many 1 10 100 --out "$OUT/gpu_serve.json"
  echo "== done in ${SECONDS} s; files in $OUT:"
  ls -l "$OUT"
}

main 2>&1 | tee "$OUT/gpu_check.log"
