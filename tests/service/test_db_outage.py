"""Postgres briefly unreachable: the API answers 503 ``database_unavailable`` with ``Retry-After``
(never 500, never a hang) and recovers by itself when the database is back.

The shared Postgres server is not touched: a second API process reaches it through a TCP proxy the
test owns, and the test cuts the proxy (connections dropped, new ones refused or left unanswered)
and restores it."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

from app.core import db
from app.core.errors import is_database_unavailable
from tests.service.conftest import Service
from tests.service.helpers import api_process, bearer, free_port, wait_for


class TcpProxy:
    """127.0.0.1:<port> -> target. ``mode``: "up" forwards; "refuse" closes the port (new connections
    are refused); "blackhole" accepts and never answers. Leaving "up" drops every open connection."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.mode = "down"
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._acceptor: threading.Thread | None = None

    def set(self, mode: str) -> None:
        assert mode in ("up", "refuse", "blackhole")
        if mode != "up":
            self._drop_connections()
        if mode == "refuse":
            self._close_listener()
        elif self._listener is None:
            self._open_listener()
        self.mode = mode

    def close(self) -> None:
        self._close_listener()
        self._drop_connections()

    def _open_listener(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self._listener = listener
        self._stop = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, args=(listener, self._stop), daemon=True)
        self._acceptor.start()

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._stop.set()
            # The port is free only once the thread's accept() has returned (within its timeout).
            if self._acceptor is not None:
                self._acceptor.join(timeout=5)
            self._listener.close()
            self._listener = None

    def _drop_connections(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _track(self, *conns: socket.socket) -> None:
        with self._lock:
            self._conns.update(conns)

    def _accept(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            self._track(client)
            if self.mode == "blackhole":
                continue  # held open, never answered, closed by the next mode change
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            self._track(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def api_behind_proxy(
    service: Service, log_name: str, timeout: float = 30, **extra_env: str
) -> Iterator[tuple[TcpProxy, httpx.Client]]:
    """A second API process that reaches Postgres through a proxy the test can cut, and a client of it."""
    url = make_url(service.env["LAFTER_DATABASE_URL"])
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    proxy.set("up")
    env = {
        **service.env,
        "LAFTER_DATABASE_URL": url.set(host="127.0.0.1", port=proxy.port).render_as_string(
            hide_password=False
        ),
        "LAFTER_DB_CONNECT_TIMEOUT_S": "2",
        "LAFTER_REAPER_INTERVAL_S": "0",  # only requests touch the database in this process
        **extra_env,
    }
    try:
        with (
            api_process(env, service.logs / log_name) as api_url,
            httpx.Client(base_url=api_url, headers=bearer(service.key), timeout=timeout) as client,
        ):
            yield proxy, client
    finally:
        proxy.close()


@pytest.fixture
def proxied(service: Service) -> Iterator[tuple[TcpProxy, httpx.Client]]:
    with api_behind_proxy(service, "api-db-outage.log") as pair:
        yield pair


def _assert_503(r: httpx.Response) -> None:
    assert r.status_code == 503, (r.request.method, r.request.url, r.text)
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "database_unavailable"
    assert int(r.headers["retry-after"]) > 0


def test_database_outage_answers_503_and_recovers_by_itself(
    service: Service, proxied: tuple[TcpProxy, httpx.Client]
) -> None:
    proxy, client = proxied
    assert client.get("/readyz").status_code == 200
    # Fill the pool: these connections are the ones the outage breaks.
    for _ in range(3):
        assert client.get("/v1/datasets").status_code == 200

    for mode in ("refuse", "blackhole"):
        proxy.set(mode)
        started = time.monotonic()
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("error"), ready.text
        _assert_503(client.get("/v1/datasets"))  # the key check itself needs the database
        if mode == "refuse":  # (each request waits out the connect timeout when nothing answers)
            _assert_503(client.post("/v1/datasets", json={"name": "during the outage"}))
            _assert_503(client.get("/v1/jobs/job_0000"))
        # Bounded by LAFTER_DB_CONNECT_TIMEOUT_S (2 s here) per attempt, even when nothing answers.
        assert time.monotonic() - started < 25, mode
        assert client.get("/healthz").status_code == 200  # the process itself is fine

        proxy.set("up")
        wait_for(lambda: client.get("/readyz").status_code == 200, 30, 0.5, "readyz after the outage")
        made = client.post("/v1/datasets", json={"name": f"after {mode}"})
        assert made.status_code == 201, made.text
        assert service.client.get(f"/v1/datasets/{made.json()['id']}").status_code == 200
        assert client.get("/v1/datasets").status_code == 200


def test_only_connection_failures_count_as_unavailable() -> None:
    class Orig(Exception):
        pass

    assert is_database_unavailable(sa_exc.TimeoutError("QueuePool limit reached"))
    assert is_database_unavailable(sa_exc.OperationalError("SELECT 1", {}, Orig("connection refused")))
    assert is_database_unavailable(sa_exc.InterfaceError("SELECT 1", {}, Orig("connection already closed")))
    # A constraint doing its job, or bad SQL, is not an outage: no 503 that would invite retries.
    assert not is_database_unavailable(sa_exc.IntegrityError("INSERT", {}, Orig("duplicate key")))
    assert not is_database_unavailable(sa_exc.ProgrammingError("SELEC", {}, Orig("syntax error")))
    assert not is_database_unavailable(ValueError("no"))


def test_a_connection_lost_after_the_answer_is_discarded_quietly(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the outage test: the request's session is closed after the response went out, and a
    connection that died in between made that close raise, which cut the client's keep-alive
    connection. ``get_session`` now lets the pool discard it."""
    url = make_url(service.env["LAFTER_DATABASE_URL"])
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    proxy.set("up")
    engine = db.make_engine(url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False))
    monkeypatch.setattr(db, "get_sessionmaker", lambda: sessionmaker(bind=engine))
    try:
        request = db.get_session()
        session = next(request)
        assert session.execute(sa.text("SELECT 1")).scalar_one() == 1  # a transaction is open
        proxy.set("refuse")
        request.close()  # the end of the request: must not raise
        proxy.set("up")
        with sessionmaker(bind=engine)() as fresh:  # and the pool hands out a live connection
            assert fresh.execute(sa.text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()
        proxy.close()
