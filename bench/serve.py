"""Serving speed of the service, measured against its limit: the model's own image encoder.

``python -m bench.serve`` starts the service the way a user does (``python -m app``: the embedded
mode, SQLite, a worker alongside), trains one adapted model per base model through the public API
(a few steps: the weights do not matter for speed), then measures over real HTTP:

- single-image latency, one client in sequence (p50/p95);
- batched throughput (``--batch`` images per request);
- throughput and latency at 1, 8 and 32 concurrent single-image clients.

Beside each figure it prints the limit measured in the same run, in this process, with the same
number of torch threads as the server: the adapted model's encoder (the prompted tower with the
model's prompts and LayerNorms, i.e. what a classify must compute) on ready tensors, and the ratio.
``--stack`` runs the same against Postgres + Redis with a separate worker process and auth on.

Base models: ``tiny`` (a 32 px, 2-layer ViT from ``tests/assets/tiny-vit.json``, random weights)
and ``vitb32`` (``ViT-B-32::random``: the real architecture at 224 px with seeded random weights;
no download needed). On a 2-core box the client and server share the CPU: read the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "tests" / "assets" / "tiny-vit.json"
BASES = {"tiny": f"{TINY_CONFIG}::random", "vitb32": "ViT-B-32::random"}
# Stage 2 kept to a few steps: this benchmark measures serving, not adaptation.
DEVICE = ["cpu"]  # --device: the server's training and classify device, and the limit's
QUICK_HP: dict[str, Any] = {"text_steps": 5, "epochs": 1, "batch_size": 4, "max_steps": 2}


def _image(seed: int, size: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(1, 1, 3))
    arr = np.clip(base + rng.integers(-40, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Service:
    url: str
    headers: dict[str, str]
    database_url: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def api_pid(self) -> int:
        return self.procs[-1].pid


def _wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited; its log:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise SystemExit(f"the service did not answer {url} within {timeout:.0f} s")


def _psql(sql: str) -> None:
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-qc", sql], check=True)


@contextlib.contextmanager
def service(workdir: Path, threads: int, stack: bool) -> Iterator[Service]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAFTER_")}
    env.update(
        LAFTER_DATA_DIR=str(workdir / "data"),
        LAFTER_ALLOW_RANDOM_WEIGHTS="true",
        LAFTER_LOCAL_MODEL_DIRS=str(TINY_CONFIG.parent),
        LAFTER_MIN_IMAGES_PER_JOB="4",
        LAFTER_TORCH_THREADS=str(threads),
        LAFTER_DEVICE=DEVICE[0],
        LAFTER_API_DEVICE=DEVICE[0],
        LAFTER_LOG_LEVEL="WARNING",
        OMP_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
    )
    headers: dict[str, str] = {}
    db = f"lafter_bench_{os.getpid()}"
    if stack:
        _psql(f'DROP DATABASE IF EXISTS "{db}"')
        _psql(f'CREATE DATABASE "{db}"')
        env.update(
            LAFTER_DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}",
            LAFTER_BROKER_URL="redis://127.0.0.1:6379/9",
            LAFTER_AUTH="on",
        )
        subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            cwd=REPO,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        made = subprocess.run(
            [sys.executable, "-m", "app", "keys", "create", "--owner", "bench"],
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        key = made.stdout.strip().split()[-1]
        headers = {"Authorization": f"Bearer {key}"}
    log = workdir / "service.log"
    out = log.open("wb")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if stack:
            from app.__main__ import worker_command

            procs.append(
                subprocess.Popen(
                    worker_command("gpu", "WARNING"),
                    cwd=REPO,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            cmd = [
                sys.executable,
                "-m",
                "uvicorn",
                "app.main:app",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ]
        else:
            cmd = [sys.executable, "-m", "app", "--port", str(port)]
        api = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        procs.append(api)
        url = f"http://127.0.0.1:{port}"
        _wait_http(f"{url}/healthz", 120, api, log)
        yield Service(
            url, headers, env.get("LAFTER_DATABASE_URL", f"sqlite:///{workdir / 'data' / 'lafter.db'}"), procs
        )
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        if stack:
            with contextlib.suppress(subprocess.CalledProcessError):
                _psql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def train_model(svc: Service, spec: str, size: int) -> dict[str, Any]:
    """One adapted model through the public API: dataset, upload, job, wait."""
    with httpx.Client(base_url=svc.url, headers=svc.headers, timeout=120) as c:
        ds = c.post("/v1/datasets", json={"name": f"bench {spec}"})
        ds.raise_for_status()
        files = [("files", (f"{i}.png", _image(i, size, "PNG"), "image/png")) for i in range(8)]
        up = c.post(f"/v1/datasets/{ds.json()['id']}/images", files=files)
        up.raise_for_status()
        job = c.post(
            "/v1/jobs",
            json={
                "dataset_id": ds.json()["id"],
                "class_names": ["cat", "dog", "bird"],
                "base_model": spec,
                "hyperparameters": QUICK_HP,
            },
        )
        job.raise_for_status()
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            got = c.get(f"/v1/jobs/{job.json()['id']}").json()
            if got["status"] in ("succeeded", "failed", "cancelled"):
                if got["status"] != "succeeded":
                    raise SystemExit(f"the bench job ended {got['status']}: {json.dumps(got)[:2000]}")
                return c.get(f"/v1/models/{got['model_id']}").json()  # type: ignore[no-any-return]
            time.sleep(0.5)
    raise SystemExit("the bench job did not finish in 15 minutes")


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) the process has used: steadier than wall time on a
    shared box, and what a request costs the server whatever else runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _classify(c: httpx.Client, model_id: str, images: list[bytes]) -> float:
    files = [("files", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    t0 = time.perf_counter()
    r = c.post(f"/v1/models/{model_id}/classify", files=files, data={"top_k": "3"})
    elapsed = time.perf_counter() - t0
    if r.status_code != 200:
        raise SystemExit(f"classify answered {r.status_code}: {r.text[:500]}")
    return elapsed


def measure_http(
    svc: Service,
    model_id: str,
    size: int,
    n_single: int,
    batch: int,
    n_batches: int,
    concurrency: list[int],
    seconds: float,
) -> dict[str, Any]:
    jpgs = [_image(1000 + i, size, "JPEG") for i in range(64)]
    out: dict[str, Any] = {}
    with httpx.Client(base_url=svc.url, headers=svc.headers, timeout=120) as c:
        for i in range(5):
            _classify(c, model_id, [jpgs[i]])  # warm: the model is loaded on first use
        cpu0 = _cpu_s(svc.api_pid)
        lat = [_classify(c, model_id, [jpgs[i % 64]]) for i in range(n_single)]
        out["single_ms"] = {
            "p50": 1000 * _pct(lat, 0.5),
            "p95": 1000 * _pct(lat, 0.95),
            "n": n_single,
            "server_cpu_ms": 1000 * (_cpu_s(svc.api_pid) - cpu0) / n_single,
        }
        big = [jpgs[i % 64] for i in range(batch)]
        _classify(c, model_id, big)
        cpu0 = _cpu_s(svc.api_pid)
        took = [_classify(c, model_id, big) for _ in range(n_batches)]
        out["batched_images_per_s"] = batch * n_batches / sum(took)
        out["batched_server_cpu_ms_per_image"] = 1000 * (_cpu_s(svc.api_pid) - cpu0) / (batch * n_batches)
    out["concurrent"] = {}
    for clients in concurrency:
        lats: list[float] = []
        lock = threading.Lock()
        stop = time.monotonic() + seconds

        def run(
            k: int,
            stop: float = stop,
            lats: list[float] = lats,
            lock: threading.Lock = lock,
            step: int = clients,
        ) -> None:
            with httpx.Client(base_url=svc.url, headers=svc.headers, timeout=120) as cc:
                i = k
                while time.monotonic() < stop:
                    t = _classify(cc, model_id, [jpgs[i % 64]])
                    i += step
                    with lock:
                        lats.append(t)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        out["concurrent"][str(clients)] = {
            "images_per_s": len(lats) / wall,
            "p50_ms": 1000 * _pct(lats, 0.5),
            "p95_ms": 1000 * _pct(lats, 0.95),
            "requests": len(lats),
        }
    return out


def measure_encoder(
    spec: str, artifact: bytes | None, threads: int, n_single: int, batch: int
) -> dict[str, Any]:
    """The limit: the encoder a classify of this model must run, on ready tensors, in this process."""
    import torch

    from lafter.artifact import AdaptedModel
    from lafter.backbone import load_backbone
    from lafter.predict import AdaptedClassifier

    torch.set_num_threads(threads)
    os.environ["LAFTER_ALLOW_RANDOM_WEIGHTS"] = "true"
    backbone = load_backbone(spec, device=DEVICE[0])
    s = backbone.image_size
    model = AdaptedClassifier(backbone, AdaptedModel.from_bytes(artifact)) if artifact is not None else None
    out: dict[str, Any] = {}
    cuda = backbone.device.type == "cuda"

    def base(x: torch.Tensor) -> torch.Tensor:
        with backbone.autocast():
            return backbone.visual(x)  # type: ignore[no-any-return]

    for name, forward in (("base", base), ("adapted", model.logits if model else None)):
        if forward is None:
            continue

        def fn(x: torch.Tensor, forward: Any = forward) -> None:
            forward(x)
            if cuda:
                torch.cuda.synchronize()

        with torch.no_grad():
            x1 = torch.randn(1, 3, s, s, device=backbone.device)
            for _ in range(3):
                fn(x1)
            lat, cpu = [], []
            for _ in range(n_single):
                t0, c0 = time.perf_counter(), time.process_time()
                fn(x1)
                lat.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            xb = torch.randn(batch, 3, s, s, device=backbone.device)
            fn(xb)
            reps = 3 if not cuda else 20
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(reps):
                fn(xb)
            out[name] = {
                "single_ms_p50": 1000 * statistics.median(lat),
                "single_cpu_ms": 1000 * statistics.median(cpu),
                "batched_images_per_s": batch * reps / (time.perf_counter() - t0),
                "batched_cpu_ms_per_image": 1000 * (time.process_time() - c0) / (batch * reps),
            }
    return out


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_many(spec: str, counts: list[int], threads: int, classes: int = 10) -> dict[str, Any]:
    """The API's model runtime with 1, 10, 100 adapted models of one base loaded (in this process,
    through the same ``ModelRuntime`` the API uses), and the time to the first prediction of a model
    not loaded yet (its delta read, checked and applied; the base already loaded)."""
    import torch

    from app.core.settings import Settings
    from app.models.runtime import ModelRuntime
    from lafter.artifact import AdaptedModel
    from lafter.prompted import HEAD, LN_PREFIX, PROMPTS, layernorm_names

    torch.set_num_threads(threads)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        allow_random_weights=True,
        local_model_dirs=[TINY_CONFIG.parent],
        adapted_cache_size=max(counts) + 1,
        api_device=DEVICE[0],
    )
    runtime = ModelRuntime(settings)
    rss_before = _rss_mb()
    t0 = time.perf_counter()
    base = runtime.backbone(spec)
    base_load_s = time.perf_counter() - t0
    params = dict(base.visual.named_parameters())
    names = [f"c{i}" for i in range(classes)]

    def delta(seed: int) -> bytes:
        g = torch.Generator().manual_seed(seed)
        tensors = {
            PROMPTS: torch.randn(50, base.width, generator=g) * 0.02,
            HEAD: torch.randn(classes, base.embed_dim, generator=g),
        }
        for name in layernorm_names(base.visual):
            tensors[LN_PREFIX + name] = params[name].detach().clone() + 0.01 * torch.randn(
                params[name].shape, generator=g
            )
        return AdaptedModel(base_spec=base.spec, class_names=names, tensors=tensors).to_bytes()

    x = torch.zeros(1, 3, base.image_size, base.image_size, dtype=torch.uint8)
    out: dict[str, Any] = {"base_load_s": base_load_s, "rss_base_mb": _rss_mb() - rss_before, "loaded": {}}
    # The deltas as the database would hand them over, made before measuring (not the runtime's memory).
    blobs = {i: delta(i) for i in range(max(counts))}
    rss_before += _rss_mb() - rss_before - out["rss_base_mb"]
    first: list[float] = []
    loaded = 0
    for count in sorted(counts):
        while loaded < count:
            t0 = time.perf_counter()
            clf = runtime.adapted_classifier(f"m{loaded}", f"c{loaded}", lambda i=loaded: blobs[i])
            clf.predict_uint8(x)
            first.append(time.perf_counter() - t0)
            loaded += 1
        out["loaded"][str(count)] = {"rss_mb": _rss_mb() - rss_before}
    t0 = time.perf_counter()
    clf.predict_uint8(x)
    out["warm_prediction_ms"] = 1000 * (time.perf_counter() - t0)
    out["first_prediction_ms_p50"] = 1000 * statistics.median(first[1:] or first)
    out["delta_bytes"] = len(blobs[0])
    return out


def _artifact(svc: Service, model: dict[str, Any]) -> bytes | None:
    """The model's delta as the service stored it, read from its database."""
    from sqlalchemy import create_engine, text

    engine = create_engine(svc.database_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                text("SELECT data FROM model_artifacts WHERE model_id = :m"), {"m": model["id"]}
            ).first()
    finally:
        engine.dispose()
    return bytes(row[0]) if row is not None else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(BASES), default=["tiny", "vitb32"])
    p.add_argument("--stack", action="store_true", help="Postgres + Redis + a worker process, auth on")
    p.add_argument("--device", default="cpu", help="cpu or cuda (server and limit alike)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, server and limit alike")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=10.0, help="per concurrency level")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument(
        "--many",
        type=int,
        nargs="*",
        default=[1, 10, 100],
        help="adapted ViT-B-32 models loaded at once for the memory check (none: skip it)",
    )
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "serve.json")
    args = p.parse_args(argv)
    DEVICE[0] = args.device
    results: dict[str, Any] = {"stack": args.stack, "threads": args.threads, "models": {}}
    with tempfile.TemporaryDirectory(prefix="lafter-bench-serve-") as tmp:
        workdir = Path(tmp)
        with service(workdir, args.threads, args.stack) as svc:
            for name in args.models:
                spec = BASES[name]
                size = 32 if name == "tiny" else 224
                heavy = name != "tiny"
                t0 = time.perf_counter()
                model = train_model(svc, spec, size)
                print(
                    f"[{name}] model {model['id']} trained through the API in {time.perf_counter() - t0:.0f} s",
                    flush=True,
                )
                http = measure_http(
                    svc,
                    model["id"],
                    size,
                    n_single=40 if heavy else 300,
                    batch=args.batch,
                    n_batches=3 if heavy else 20,
                    concurrency=args.concurrency,
                    seconds=args.seconds,
                )
                limit = measure_encoder(
                    spec, _artifact(svc, model), args.threads, n_single=20 if heavy else 300, batch=args.batch
                )
                results["models"][name] = {"spec": spec, "http": http, "encoder": limit}
                _report(name, http, limit)
    if args.many:
        many = measure_many(BASES["vitb32"], args.many, args.threads)
        results["many_models"] = many
        one = many["loaded"][str(min(args.many))]["rss_mb"]
        for count, row in many["loaded"].items():
            print(
                f"[many] {count:>3} adapted ViT-B-32 models loaded: {row['rss_mb']:.0f} MB over the process "
                f"({row['rss_mb'] / one:.3f}x one model; the base alone: {many['rss_base_mb']:.0f} MB)"
            )
        print(
            f"[many] first prediction of a model not loaded yet: {many['first_prediction_ms_p50']:.0f} ms p50 "
            f"(a loaded one: {many['warm_prediction_ms']:.0f} ms; delta {many['delta_bytes'] / 1e6:.2f} MB; "
            f"loading the base itself: {many['base_load_s']:.1f} s)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"results: {args.out}")
    return 0


def _report(name: str, http: dict[str, Any], limit: dict[str, Any]) -> None:
    enc = limit.get("adapted", limit["base"])
    s, b = http["single_ms"], http["batched_images_per_s"]
    print(
        f"[{name}] encoder (adapted model, ready tensors): single {enc['single_ms_p50']:.2f} ms p50, "
        f"batched {enc['batched_images_per_s']:.0f} images/s; base encoder single "
        f"{limit['base']['single_ms_p50']:.2f} ms, batched {limit['base']['batched_images_per_s']:.0f} images/s"
    )
    print(
        f"[{name}] HTTP single image: p50 {s['p50']:.2f} ms, p95 {s['p95']:.2f} ms "
        f"({s['p50'] / enc['single_ms_p50']:.2f}x the encoder); server CPU {s['server_cpu_ms']:.2f} ms "
        f"per request ({s['server_cpu_ms'] / enc['single_cpu_ms']:.2f}x the encoder's CPU)"
    )
    bc = http["batched_server_cpu_ms_per_image"]
    print(
        f"[{name}] HTTP batched: {b:.0f} images/s ({b / enc['batched_images_per_s']:.2f}x the encoder); "
        f"server CPU {bc:.3f} ms per image ({enc['batched_cpu_ms_per_image'] / bc:.2f}x the encoder's rate)"
    )
    for clients, row in http["concurrent"].items():
        print(
            f"[{name}] {clients:>2} clients: {row['images_per_s']:.0f} images/s "
            f"({row['images_per_s'] / enc['batched_images_per_s']:.2f}x the batched encoder), "
            f"p50 {row['p50_ms']:.1f} ms, p95 {row['p95_ms']:.1f} ms"
        )


if __name__ == "__main__":
    raise SystemExit(main())
