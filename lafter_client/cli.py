"""``lafter-client`` (also ``python -m lafter_client``): the service from a shell. JSON on stdout,
progress and errors on stderr; exit status 1 on an error or a job that did not succeed.

    lafter-client adapt ./photos --classes cat,dog --wait
    lafter-client jobs list | jobs get ID | jobs cancel ID | jobs wait ID
    lafter-client classify MODEL a.jpg b.jpg --top-k 3
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lafter_client.client import Client
from lafter_client.errors import LafterError
from lafter_client.types import Job, JobEvent


def _print(value: Any) -> None:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def _hyperparameters(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--hp takes key=value, got {pair!r}")
        try:
            out[key] = json.loads(raw)  # numbers, null, true/false
        except ValueError:
            out[key] = raw  # "auto" and other words
    return out


class ProgressLine:
    """One line on stderr that follows a job's events: stage, percent, step, loss, images/s."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.state: dict[str, Any] = {}

    def __call__(self, event: JobEvent) -> None:
        if not self.enabled:
            return
        if event.stage:
            self.state["stage"] = event.stage
        data = event.data
        for key in ("percent", "loss", "images_per_s"):
            if isinstance(data.get(key), int | float):
                self.state[key] = data[key]
        if event.step is not None and data.get("total_steps"):
            self.state["step"] = f"{event.step}/{data['total_steps']}"
        parts = [f"[{self.state.get('stage', '...')}]"]
        if "percent" in self.state:
            parts.append(f"{self.state['percent']:5.1f}%")
        if "step" in self.state:
            parts.append(f"step {self.state['step']}")
        if "loss" in self.state:
            parts.append(f"loss {self.state['loss']:.4f}")
        if "images_per_s" in self.state:
            parts.append(f"{self.state['images_per_s']:.1f} img/s")
        line = " ".join(parts)
        if event.kind == "log" and event.message:
            line += f"  {event.message[:80]}"
        sys.stderr.write(f"\r\x1b[K{line}" if self.tty else f"{line}\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def _wait(client: Client, job_id: str, timeout: float | None, progress: bool) -> Job:
    line = ProgressLine(progress)
    try:
        return client.jobs.wait(job_id, on_event=line, timeout=timeout)
    finally:
        line.close()


def _finish(job: Job) -> int:
    _print(job)
    if job.status != "succeeded":
        error = f": {job.error.code}: {job.error.message}" if job.error else ""
        sys.stderr.write(f"job {job.id} {job.status}{error}\n")
        return 1
    sys.stderr.write(f"model {job.model_id}\n")
    return 0


def cmd_adapt(client: Client, args: argparse.Namespace) -> int:
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    folder = Path(args.images)
    dataset = client.datasets.create(args.name or folder.resolve().name or "dataset")
    sys.stderr.write(f"dataset {dataset.id}\n")
    report = client.datasets.upload(dataset.id, folder, progress=not args.quiet)
    if args.eval:
        client.datasets.upload(dataset.id, args.eval, split="eval", progress=not args.quiet)
    for rejected in report.rejected[:20]:
        sys.stderr.write(f"rejected {rejected.filename}: {rejected.code}: {rejected.message}\n")
    sys.stderr.write(
        f"{len(report.accepted)} accepted, {len(report.duplicates)} duplicates, "
        f"{len(report.rejected)} rejected\n"
    )
    job = client.jobs.create(
        dataset.id,
        classes,
        base_model=args.base_model,
        descriptions={"source": args.descriptions} if args.descriptions else None,
        hyperparameters=_hyperparameters(args.hp) or None,
        recipe=args.recipe,
        seed=args.seed,
    )
    sys.stderr.write(f"job {job.id} {job.status}\n")
    if not args.wait:
        _print(job)
        return 0
    return _finish(_wait(client, job.id, args.timeout, not args.quiet))


def cmd_jobs(client: Client, args: argparse.Namespace) -> int:
    if args.action == "list":
        jobs = []
        for job in client.jobs.list(status=args.status):
            jobs.append(job)
            if len(jobs) >= args.limit:
                break
        _print(jobs)
        return 0
    if not args.job_id:
        raise SystemExit(f"jobs {args.action} needs a job id")
    if args.action == "get":
        _print(client.jobs.get(args.job_id))
        return 0
    if args.action == "cancel":
        _print(client.jobs.cancel(args.job_id))
        return 0
    return _finish(_wait(client, args.job_id, args.timeout, not args.quiet))


def cmd_classify(client: Client, args: argparse.Namespace) -> int:
    _print(client.models.classify(args.model_id, args.images, top_k=args.top_k))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lafter-client", description="Client of the LaFTer adaptation service")
    p.add_argument("--base-url", help="the service (default: LAFTER_BASE_URL, else http://127.0.0.1:8000)")
    p.add_argument("--api-key", help="default: LAFTER_API_KEY")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    sub = p.add_subparsers(dest="command", required=True)

    adapt = sub.add_parser("adapt", help="dataset + upload + job (+ wait) in one go")
    adapt.add_argument("images", help="a folder of unlabelled images (walked recursively)")
    adapt.add_argument("--classes", required=True, help="comma-separated class names")
    adapt.add_argument("--name", help="the dataset's name (default: the folder's)")
    adapt.add_argument("--eval", help="a labelled folder (class_name/ sub-folders), for evaluation only")
    adapt.add_argument("--base-model", help="e.g. ViT-B-32::openai (default: the service's)")
    adapt.add_argument("--recipe", choices=["default", "paper"])
    adapt.add_argument("--descriptions", choices=["auto", "llm", "templates"])
    adapt.add_argument("--seed", type=int)
    adapt.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", help="a hyperparameter")
    adapt.add_argument("--wait", action="store_true", help="follow the job until it is final")
    adapt.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    adapt.set_defaults(run=cmd_adapt)

    jobs = sub.add_parser("jobs", help="list, get, cancel or wait for jobs")
    jobs.add_argument("action", choices=["list", "get", "cancel", "wait"])
    jobs.add_argument("job_id", nargs="?")
    jobs.add_argument("--status", help="with list: only jobs in this status")
    jobs.add_argument("--limit", type=int, default=20, help="with list: at most this many")
    jobs.add_argument("--timeout", type=float, help="with wait: give up after this many seconds")
    jobs.set_defaults(run=cmd_jobs)

    classify = sub.add_parser("classify", help="classify images with an adapted model")
    classify.add_argument("model_id")
    classify.add_argument("images", nargs="+")
    classify.add_argument("--top-k", type=int, default=5)
    classify.set_defaults(run=cmd_classify)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with Client(base_url=args.base_url, api_key=args.api_key) as client:
            return int(args.run(client, args))
    except LafterError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    except (FileNotFoundError, ValueError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
