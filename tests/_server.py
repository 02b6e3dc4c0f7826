"""A real `mlflow server` on 127.0.0.1 with a PostgreSQL backend and a proxied artifact store."""

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

PG_DSN = os.environ.get("MLFLOW_BEST_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


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
    """Start with ``start()``, stop with ``stop()``; ``stop(); start()`` simulates an outage on the same port."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.db = f"mlflow_best_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._created = False

    def start(self, timeout: float = 90.0) -> MlflowServer:
        if not self._created:
            _admin(f'CREATE DATABASE "{self.db}"')
            self._created = True
        (self.root / "artifacts").mkdir(parents=True, exist_ok=True)
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", f"{PG_DSN.replace('postgresql://', 'postgresql+psycopg2://')}/{self.db}",
                "--artifacts-destination", str(self.root / "artifacts"),
                "--serve-artifacts",
                "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", "1",
            ],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer in {timeout} s: {(self.root / 'server.log').read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def drop(self) -> None:
        self.stop()
        if self._created:
            _admin(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
            self._created = False
