"""How the tests start this project's processes: the API (``python -m uvicorn app.main:app``), the
workers (``python -m celery -A worker.celery_app worker``), ``python -m app`` (embedded mode, key
commands), ``python -m alembic`` and ``python -m lafter``, the commands an operator or user runs.

A cold start of any of them spends about 6 CPU-seconds importing torch, torchvision (which pulls in
``torch._dynamo``) and open_clip before it runs a line of this project, and the suite starts about
45 of them: on the 2-core machine that was over a third of the suite's CPU time. So by default each
one is forked from a ``multiprocessing`` fork server that imported those third-party libraries once
(``PRELOAD``). The child then does what the interpreter would: it takes the given environment,
working directory and log files as stdout and stderr, and runs the entry module as ``__main__``
with the given arguments. Nothing of this project is imported before the fork, so every module of
``app/``, ``worker/`` and ``lafter/`` is imported in the child, under the child's environment, as in
production. What those processes start themselves (the embedded mode's worker) is a fresh
interpreter, as always.

``LAFTER_TEST_LAUNCH=exec`` starts a fresh interpreter for each instead (``subprocess.Popen``).

Both kinds of handle answer ``pid``, ``poll``, ``wait``, ``terminate``, ``kill`` and ``returncode``
like ``subprocess.Popen``; ``wait`` raises ``subprocess.TimeoutExpired`` the same way.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import multiprocessing
import multiprocessing.context
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Protocol

REPO = Path(__file__).resolve().parents[1]

# Third-party only: importing them reads no setting of this project.
PRELOAD = [
    "torch",
    "torchvision",
    "open_clip",
    "numpy",
    "PIL.Image",
    "kornia",
    "safetensors.torch",
    "openai",
    "celery",
    "kombu",
    "billiard",
    "redis",
    "fastapi",
    "starlette",
    "uvicorn",
    "pydantic",
    "sqlalchemy",
    "psycopg",
    "httpx",
    "prometheus_client",
]


class Proc(Protocol):
    """The part of ``subprocess.Popen`` the tests use."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


def _run_as_main(
    module: str, args: list[str], env: dict[str, str], cwd: str, out: str, err: str, new_session: bool
) -> None:
    """In the forked child: become ``python -m module *args`` with ``env`` in ``cwd``, stdout appended
    to ``out`` and stderr to ``err`` (the same file or not)."""
    if new_session:
        os.setsid()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    tempfile.tempdir = None  # the fork server may have cached its own; honour the child's TMPDIR
    for target, path in ((1, out), (2, err)):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.dup2(fd, target)
        os.close(fd)
    # Unbuffered, like PYTHONUNBUFFERED=1: a test reads the log while the process runs.
    sys.stdout = io.TextIOWrapper(open(1, "wb", buffering=0, closefd=False), write_through=True)  # noqa: SIM115
    sys.stderr = io.TextIOWrapper(open(2, "wb", buffering=0, closefd=False), write_through=True)  # noqa: SIM115
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    sys.argv = [module, *args]
    sys.path.insert(0, cwd)  # what ``python -m`` puts first
    runpy.run_module(module, run_name="__main__", alter_sys=True)


class Forked:
    """A process forked from the fork server, with the ``Popen`` methods the tests use."""

    def __init__(self, process: multiprocessing.process.BaseProcess, cmd: list[str]) -> None:
        self._process = process
        self.args = cmd

    @property
    def pid(self) -> int:
        pid = self._process.pid
        assert pid is not None
        return pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode  # exitcode polls; negative: killed by that signal, as Popen

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        code = self._process.exitcode
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return code

    def terminate(self) -> None:
        if self._process.exitcode is None:
            self._process.terminate()

    def kill(self) -> None:
        if self._process.exitcode is None:
            self._process.kill()


_lock = threading.Lock()
_context: multiprocessing.context.ForkServerContext | None = None
_forked: list[Forked] = []


def _fork_server() -> multiprocessing.context.ForkServerContext:
    global _context
    with _lock:
        if _context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(PRELOAD)
            _context = context
            atexit.register(_kill_leftovers)  # runs before multiprocessing's own exit hook joins them
        return _context


def _kill_leftovers() -> None:
    for proc in _forked:
        proc.kill()


def mode() -> str:
    value = os.environ.get("LAFTER_TEST_LAUNCH", "fork")
    if value not in ("fork", "exec"):
        raise ValueError(f"LAFTER_TEST_LAUNCH must be fork or exec, not {value!r}")
    return value


def launch(
    module: str,
    args: list[str],
    *,
    env: dict[str, str],
    log: Path,
    append: bool = False,
    cwd: Path = REPO,
    new_session: bool = False,
    stderr: Path | None = None,
) -> Proc:
    """``python -m module *args`` in ``cwd`` with ``env``; stdout goes to ``log``, and so does stderr
    unless ``stderr`` names another file. ``new_session``: its own session and process group (as
    ``Popen(start_new_session=True)``), so ``os.killpg(proc.pid, ...)`` reaches its children too."""
    cmd = [sys.executable, "-m", module, *args]
    mode_ = "ab" if append else "wb"
    if mode() == "exec":
        with contextlib.ExitStack() as files:
            out = files.enter_context(log.open(mode_))
            err = subprocess.STDOUT if stderr is None else files.enter_context(stderr.open(mode_))
            return subprocess.Popen(
                cmd, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=new_session
            )
    for path in {log, stderr or log}:
        path.open(mode_).close()  # there at once, as with Popen; the child appends
    context = _fork_server()
    process = context.Process(
        target=_run_as_main,
        args=(module, args, env, str(cwd), str(log), str(stderr or log), new_session),
    )
    process.start()
    proc = Forked(process, cmd)
    _forked.append(proc)
    return proc


def run(
    module: str, args: list[str], *, env: dict[str, str], cwd: Path = REPO, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m module *args`` to completion, like ``subprocess.run(..., capture_output=True,
    text=True, timeout=timeout)``; its output passes through two temporary files."""
    with tempfile.TemporaryDirectory(prefix="lafter-run-") as scratch:
        out, err = Path(scratch) / "stdout", Path(scratch) / "stderr"
        proc = launch(module, args, env=env, log=out, stderr=err, cwd=cwd)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        return subprocess.CompletedProcess(
            [sys.executable, "-m", module, *args],
            code,
            out.read_text(errors="replace"),
            err.read_text(errors="replace"),
        )
