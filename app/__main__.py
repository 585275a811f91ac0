"""``python -m app``: the whole service in one command, with nothing else installed.

Embedded defaults: SQLite and blobs under ``LAFTER_DATA_DIR`` (./data), kombu's filesystem broker
(no server), the schema made by the migrations at start, and a Celery worker started alongside the
API as a child process. Any ``LAFTER_*`` setting still applies (point it at Postgres and Redis and
it is the production shape on one machine). ``--no-worker`` starts the API alone.

Auth is off by default here (single-user; the log says so loudly) unless ``LAFTER_AUTH`` is set.
``python -m app keys create|list|revoke`` manages API keys (see ``app.keys.cli``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time

import uvicorn

from app.core.migrate import upgrade_head
from app.core.settings import get_settings

log = logging.getLogger("app")


def worker_command(queue: str, loglevel: str = "INFO") -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--pool=solo",
        "-Q",
        queue,
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


def _single_user_auth_default() -> None:
    """This command is the embedded single-user mode: auth defaults to off, unless it was set
    explicitly (environment or .env) or this is production (which refuses auth off)."""
    settings = get_settings()
    if "auth" not in settings.model_fields_set and settings.env != "production":
        os.environ["LAFTER_AUTH"] = "off"  # the API below (same process) and the worker inherit it
        get_settings.cache_clear()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:
        from app.keys.cli import main as keys_main

        return keys_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog="API keys: python -m app keys {create,list,revoke} --help",
    )
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--no-worker", action="store_true", help="do not start a worker alongside the API")
    parser.add_argument("--no-migrate", action="store_true", help="do not run the migrations at start")
    args = parser.parse_args(argv)

    _single_user_auth_default()
    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if not args.no_migrate:
        log.info("migrating %s", settings.database_url.split("@")[-1])
        upgrade_head(settings.database_url)

    # SIGTERM and SIGINT end the API and then its worker, never the API alone. Uvicorn handles both
    # while it serves and, once it has shut down, raises the signal again: these handlers turn that
    # (and a signal before or after serving) into an exception, so the ``finally`` below always runs.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_on_signal)
    worker: subprocess.Popen[bytes] | None = None
    try:
        if settings.embedded_worker and not args.no_worker:
            worker = subprocess.Popen(
                worker_command(settings.gpu_queue, settings.log_level), env=dict(os.environ)
            )
            log.info("started worker pid %d on queue %s", worker.pid, settings.gpu_queue)
        uvicorn.run(
            "app.main:app",
            host=args.host or settings.host,
            port=args.port or settings.port,
            log_level=settings.log_level.lower(),
            timeout_graceful_shutdown=10,
        )
    except Stopped as stop:
        log.info("stopping on %s", signal.Signals(stop.signum).name)
    finally:
        if worker is not None:
            stop_worker(worker, settings.worker_stop_timeout_s)
    return 0


class Stopped(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise Stopped(signum)


def stop_worker(worker: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Ask the worker to stop (SIGTERM: Celery's warm shutdown; a running job stops before its next
    step, writes a checkpoint and is queued again) and wait for it; SIGKILL after ``timeout_s``, or
    at once on a second SIGINT (Ctrl-C twice). Further SIGTERMs are ignored meanwhile."""
    if worker.poll() is not None:
        return
    again: list[int] = []
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, lambda signum, _frame: again.append(signum))
    log.info("stopping worker pid %d", worker.pid)
    worker.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while worker.poll() is None:
        if again or time.monotonic() > deadline:
            log.warning("worker pid %d did not stop in time; killing it", worker.pid)
            worker.kill()
            worker.wait()
            break
        time.sleep(0.1)
    log.info("worker pid %d stopped (exit %s)", worker.pid, worker.returncode)


if __name__ == "__main__":
    raise SystemExit(main())
