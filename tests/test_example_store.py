"""mlruns.example/ works from anywhere: served from a copy in tmp_path, its champion restores and scores."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

import mlflow_best
from mlflow_best._demo import DigitsMLP, evaluate, load_digits_data
from tests._server import MlflowServer

EXAMPLE = Path(__file__).resolve().parents[1] / "mlruns.example"


@pytest.fixture
def served_copy(tmp_path: Path) -> Iterator[str]:
    """The example store copied to a place it was never created in, behind a real `mlflow server`."""
    store = tmp_path / "somewhere" / "else"
    shutil.copytree(EXAMPLE, store)
    server = MlflowServer(
        tmp_path / "server", backend_uri=f"sqlite:///{store / 'mlflow.db'}", artifacts=store / "artifacts"
    ).start(timeout=120)
    try:
        yield server.url
    finally:
        server.stop()


def test_the_example_store_is_small_and_holds_no_local_path() -> None:
    files = [f for f in EXAMPLE.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 2_000_000
    db = sqlite3.connect(f"file:{EXAMPLE / 'mlflow.db'}?mode=ro", uri=True)
    try:
        locations = [row[0] for row in db.execute("SELECT artifact_location FROM experiments")]
        locations += [row[0] for row in db.execute("SELECT artifact_uri FROM runs")]
        locations += [row[0] for row in db.execute("SELECT storage_location FROM model_versions")]
    finally:
        db.close()
    assert locations and all(loc.startswith("mlflow-artifacts:/") for loc in locations), locations


@pytest.mark.slow
def test_its_champion_restores_from_a_copy_served_anywhere(served_copy: str) -> None:
    client = MlflowClient(tracking_uri=served_copy)
    champion = client.get_model_version_by_alias("digits-mlp", "champion")
    runs = client.search_runs([client.get_experiment_by_name("digits-example").experiment_id])
    assert len(runs) == 3
    best = min(runs, key=lambda r: float(r.data.tags["mlflow_best.best_value"]))
    assert str(champion.version) == best.data.tags["mlflow_best.best_version"]

    r = mlflow_best.restore("models:/digits-mlp@champion", tracking_uri=served_copy)
    assert isinstance(r.model, DigitsMLP) and r.version == str(champion.version)
    assert r.epoch == int(champion.tags["epoch"]) and r.run_id == best.info.run_id
    assert r.metrics["val_loss"] == pytest.approx(float(champion.tags["value"]))
    data = load_digits_data(seed=0)
    _, accuracy = evaluate(r.model, data.x_test, data.y_test)
    assert accuracy > 0.9
    # the run's plot is served from the copy too
    assert [a.path for a in client.list_artifacts(best.info.run_id, "plots")] == ["plots/val_loss.png"]
