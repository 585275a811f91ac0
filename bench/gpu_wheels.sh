#!/usr/bin/env bash
# Wheels for the GPU check (bench/gpu_check.sh), fetched HERE, where the package registry can be reached.
# The lent nvidia-h200 machine has Python 3.12.3 with torch, torchvision and many packages
# (/work/.library/device/KINDS.md) but reaches no registry; what our code needs beyond that travels
# as wheels in .whl/ (ignored by git; `carry: [".whl"]`), and gpu_check.sh installs them to /tmp/site.
#   bash bench/gpu_wheels.sh      # -> .whl/*.whl, their total size, and a dependency-closure check
# Pins: the versions in this repo's .venv (pip freeze) when these were chosen. Left out on purpose:
# what the device image already has (one version of each, or the install and imports clash), and
# psycopg / boto3 (only for `bench.serve --stack` with Postgres, and S3 storage: neither runs there).
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=.whl
PY=${PY:-python3}

WHEELS=(
  # the library: open_clip + kornia + the LLM client (lafter/llm.py imports openai at module level)
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
  kornia==0.9.0 kornia_rs==0.2.0
  openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0 sniffio==1.3.1
  # the API: fastapi, pydantic, uvicorn[standard], uploads
  fastapi==0.165.0 starlette==1.10.0 opentelemetry-api==1.45.2
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  pydantic-settings==2.16.3 python-dotenv==1.2.4 python-multipart==0.0.34
  uvicorn==0.54.0 httptools==0.9.0 watchfiles==1.3.0 websockets==17.4
  # the database (SQLAlchemy 2.1 needs greenlet only for its asyncio extra, which we do not use)
  SQLAlchemy==2.1.9 alembic==1.20.1 Mako==1.4.3
  # the worker: celery[redis]
  celery==5.7.0 kombu==5.7.0 billiard==4.3.2 vine==5.1.0 amqp==5.4.2 redis==7.4.1
  click-didyoumean==0.3.1 click-repl==0.4.1 click-plugins==1.1.1.2 prompt_toolkit==3.0.53
  tzlocal==5.4.5 tzdata==2026.6
)

rm -rf "$WHL"  # one version of each: two of one package stop the install there
mkdir -p "$WHL"
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux1_x86_64 any; do
  plat+=(--platform "$p")
done
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp "${plat[@]}" -d "$WHL" "${WHEELS[@]}" \
  2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)

ls -l "$WHL" | awk 'NR > 1 { printf "%9d  %s\n", $5, $9 }'
whl_bytes=$(du -cb "$WHL"/*.whl | tail -1 | cut -f1)
tree_bytes=$(git ls-files -z -co --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "wheels: $(ls "$WHL"/*.whl | wc -l) files, $((whl_bytes / 1024)) KiB; working tree $((tree_bytes / 1024)) KiB;" \
  "together $(((whl_bytes + tree_bytes) / 1048576)) MiB of the 64 MiB a device call may carry"
if ((whl_bytes + tree_bytes > 48 * 1048576)); then
  echo "too close to the 64 MiB limit" >&2
  exit 1
fi

# Dependency closure, as the device will see it (Python 3.12, Linux x86_64): from the project's
# requirements (pyproject.toml, [service] included), every requirement must be met by a wheel here
# or by a package the device image has. Prints what is missing, wheels nothing needs, and the
# requirements left to the device's own versions (which this machine cannot see).
"$PY" - "$WHL" <<'EOF'
import re, sys, tomllib, zipfile
from email.parser import Parser
from pathlib import Path
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name as cn
    from packaging.version import Version
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name as cn
    from pip._vendor.packaging.version import Version

# KINDS.md, "Python packages already there", nvidia-h200, read on 2026-11-17 (versions where it gives them)
DEVICE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"""
DEVICE = {cn(n): None for n in DEVICE.split()}
DEVICE.update({"huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0", "torch": "2.11.0",
               "torchvision": "0.26.0", "triton": "3.6.0", "tokenizers": "0.23.2", "transformers": "5.17.0"})
SKIP = {"psycopg", "boto3"}  # --stack (Postgres) and S3 storage only: not run on the device
# carried though no metadata asks for it on Linux: zoneinfo's fallback (celery's time zones) where the
# image has no /usr/share/zoneinfo
ALSO = {"tzdata"}
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "os_name": "posix", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "platform_python_implementation": "CPython",
       "implementation_name": "cpython", "platform_release": "", "platform_version": "",
       "implementation_version": "3.12.3"}

wheels = {}
for w in sorted(Path(sys.argv[1]).glob("*.whl")):
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        m = Parser().parsestr(z.read(meta).decode())
    name = cn(m["Name"])
    if name in wheels:
        print(f"TWO VERSIONS of {name}: {wheels[name][0]} and {m['Version']}")
    wheels[name] = (m["Version"], m.get_all("Requires-Dist") or [])

py = tomllib.loads(Path("pyproject.toml").read_text())["project"]
roots = [Requirement(r) for r in py["dependencies"] + py["optional-dependencies"]["service"]]
problems, on_device, reached, seen = [], {}, set(), set()
todo = [(r, "pyproject.toml") for r in roots if cn(r.name) not in SKIP]
while todo:
    req, by = todo.pop()
    name = cn(req.name)
    have = wheels[name][0] if name in wheels else DEVICE.get(name, "MISSING")
    if have == "MISSING":
        problems.append(f"MISSING {req} (needed by {by}): neither a wheel here nor on the device")
        continue
    if req.specifier:  # every requirement, not only the first one met for a name
        if name not in wheels:
            on_device.setdefault(name, set()).add(f"{req.specifier} ({by})")
        if have and not req.specifier.contains(Version(have), prereleases=True):
            problems.append(f"{by} needs {req}, {'the wheel' if name in wheels else 'the device'} has {have}")
    if name not in wheels or (name, frozenset(req.extras)) in seen:
        continue
    seen.add((name, frozenset(req.extras)))
    reached.add(name)
    for r in map(Requirement, wheels[name][1]):
        if r.marker is None or any(r.marker.evaluate(dict(ENV, extra=e)) for e in ("", *req.extras)):
            todo.append((r, name))
for name in sorted(set(wheels) - reached - ALSO):
    problems.append(f"UNNEEDED wheel {name} {wheels[name][0]}: nothing requires it")
print(f"closure: {len(reached)} of {len(wheels)} wheels reached from pyproject.toml, "
      f"{len(on_device)} device packages with version bounds")
for name in sorted(on_device):
    have = DEVICE[name] or "version not listed"
    print(f"  device {name} ({have}) must meet: {', '.join(sorted(on_device[name]))}")
print("\n".join(problems) if problems else "closure: complete, nothing missing")
sys.exit(1 if problems else 0)
EOF
