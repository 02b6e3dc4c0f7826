"""A real `mlflow server` on 127.0.0.1 with a PostgreSQL backend and a proxied artifact store.

``stop(); start()`` is an outage on the same port: clients keep the URL they were given, as they
would across a restart of a team's server. ``stop(hard=True)`` is a crash (SIGKILL, no graceful
shutdown of in-flight requests).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType

import pytest

PG_DSN = os.environ.get("MLFLOW_BEST_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
REQUIRE_SERVER = os.environ.get("MLFLOW_BEST_REQUIRE_SERVER") == "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postgres_available() -> str | None:
    """None when PostgreSQL answers, else the reason it does not."""
    try:
        import psycopg2
    except ImportError:
        return "psycopg2 is not installed (pip install psycopg2-binary)"
    try:
        psycopg2.connect(f"{PG_DSN}/postgres", connect_timeout=3).close()
    except Exception as e:
        return f"PostgreSQL not reachable at {PG_DSN}: {e}"
    return None


def require_postgres() -> None:
    """Skip the calling test or fixture without PostgreSQL; fail instead where CI demands the server."""
    reason = postgres_available()
    if reason is None:
        return
    if REQUIRE_SERVER:
        pytest.fail(f"MLFLOW_BEST_REQUIRE_SERVER=1 but {reason}")
    pytest.skip(reason)


def _admin(sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(f"{PG_DSN}/postgres", connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


class MlflowServer:
    """Start with ``start()``, stop with ``stop()``; ``stop(); start()`` simulates an outage on one port."""

    def __init__(
        self, root: Path, port: int | None = None, *, backend_uri: str | None = None,
        artifacts: Path | None = None,
    ) -> None:
        """``backend_uri=None``: a fresh PostgreSQL database, dropped by ``drop()``; else that store."""
        self.root = root
        self.port = port or free_port()
        self.db = f"mlflow_best_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.backend_uri = backend_uri
        self.url = f"http://127.0.0.1:{self.port}"
        self.artifacts = artifacts or root / "artifacts"
        self.proc: subprocess.Popen[bytes] | None = None
        self._created = False

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.drop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 90.0) -> MlflowServer:
        if self.backend_uri is None and not self._created:
            _admin(f'CREATE DATABASE "{self.db}"')
            self._created = True
        backend = self.backend_uri or f"{PG_DSN.replace('postgresql://', 'postgresql+psycopg2://')}/{self.db}"
        self.root.mkdir(parents=True, exist_ok=True)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # The job executor (a huey consumer for GenAI jobs) is unused here and would compete for the
        # CPU with the training processes under test.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        env.pop("MLFLOW_TRACKING_URI", None)
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", backend,
                "--artifacts-destination", str(self.artifacts),
                "--serve-artifacts",
                "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", "1",
            ],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer in {timeout} s: {self.log_tail()}")

    def stop(self, hard: bool = False) -> None:
        """SIGTERM (uvicorn finishes in-flight requests) or, with ``hard``, SIGKILL (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL if hard else signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            if hard:
                # The uvicorn worker is in the same process group; reap nothing else, but make
                # sure the port is free before a restart binds it again.
                _wait_port_free(self.port)
        self.proc = None

    def drop(self) -> None:
        self.stop()
        if self._created:
            _admin(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
            self._created = False

    def log_tail(self, chars: int = 3000) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-chars:] if path.is_file() else "(no server.log)"


def _wait_port_free(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.1)


def die_with_parent() -> None:
    """``preexec_fn`` for test children: SIGKILL them when the test process dies (Linux).

    A pytest run killed by a timeout runs no teardown; without this its training children would
    live on. Use it only for children started from the main thread: the signal follows the thread.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class LineReader:
    """Lines a child prints, read by a thread, so a hung child fails the test instead of hanging it."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        import queue
        import threading

        self.proc = proc
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next(self, timeout: float) -> str | None:
        """The next line; None once the child closed stdout (exited). Raises TimeoutError."""
        import queue

        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no output from pid {self.proc.pid} in {timeout} s") from None
