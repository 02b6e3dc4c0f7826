"""Stores the tests run against: a sqlite file store per test, and one real `mlflow server` per session."""

from __future__ import annotations

import os
import shutil
import sqlite3
import warnings
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from tests._server import MlflowServer, postgres_available

REQUIRE_SERVER = os.environ.get("MLFLOW_BEST_REQUIRE_SERVER") == "1"
# `mlflow` and its submodules, not `mlflow_best` (warnings matches this regex at the module name's start).
MLFLOW_ITSELF = r"mlflow(\.|$)"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test gets its own staging/cache home and working directory; no run leaks between tests."""
    monkeypatch.setenv("MLFLOW_BEST_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    # MLflow's own warnings (its deprecations, pydantic's) are not ours to fix. The module regex is
    # anchored: a bare "mlflow" also matches "mlflow_best" and would switch off the package's
    # warnings-as-errors setting (pyproject's filterwarnings) in every test.
    warnings.filterwarnings("ignore", module=MLFLOW_ITSELF)
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty sqlite store made once: creating one costs ~7 s, copying it ~1 ms."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    # The Default experiment's artifact root was fixed at creation; make it relative so each test's
    # copy keeps its artifacts in its own working directory.
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE experiments SET artifact_location = './mlruns/0' WHERE experiment_id = 0")
    return path


def new_sqlite_store(template: Path, folder: Path) -> str:
    """A fresh sqlite store in ``folder``; returns its tracking URI."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture
def sqlite_uri(tmp_path: Path, _sqlite_template: Path) -> Iterator[str]:
    uri = new_sqlite_store(_sqlite_template, tmp_path)
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
        uri = new_sqlite_store(request.getfixturevalue("_sqlite_template"), tmp_path)
    else:
        uri = request.getfixturevalue("mlflow_server").url
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(autouse=True)
def _no_active_experiment() -> Iterator[None]:
    """``mlflow.set_experiment`` in one test must not choose the experiment of the next."""
    yield
    import mlflow.tracking.fluent as fluent

    fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
