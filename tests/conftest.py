"""Stores the tests run against: a sqlite file store per test, and one real `mlflow server` per session."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from tests._server import MlflowServer, postgres_available

REQUIRE_SERVER = os.environ.get("MLFLOW_BEST_REQUIRE_SERVER") == "1"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test gets its own staging/cache home and working directory; no run leaks between tests."""
    monkeypatch.setenv("MLFLOW_BEST_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    warnings.filterwarnings("ignore", module="mlflow")
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture
def sqlite_uri(tmp_path: Path) -> Iterator[str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    reason = postgres_available()
    if reason is not None:
        if REQUIRE_SERVER:
            pytest.fail(f"MLFLOW_BEST_REQUIRE_SERVER=1 but {reason}")
        pytest.skip(reason)
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.drop()


@pytest.fixture(params=["sqlite", pytest.param("server", marks=pytest.mark.server)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The tracking URI of each store the core behaviour must work on."""
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    else:
        uri = request.getfixturevalue("mlflow_server").url
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)
