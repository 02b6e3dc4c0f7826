"""A team's `mlflow server` (PostgreSQL, proxied artifacts): what travels where, and bounded waits."""

from __future__ import annotations

import os
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

import mlflow_best
from mlflow_best._reach import HTTP_BOUNDS as _HTTP_DEFAULTS
from tests._server import MlflowServer, free_port
from tests.helpers import TinyNet, run_sequence, unique


@pytest.mark.server
def test_checkpoints_travel_through_the_proxied_artifact_store(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """Clients never see the server's disk: they upload and download over HTTP (mlflow-artifacts:)."""
    mlflow.set_tracking_uri(mlflow_server.url)
    try:
        snapshots: dict[int, dict[str, torch.Tensor]] = {}
        name = unique("proxied")
        run, _, _ = run_sequence([1.0, 0.5, 0.7], snapshots=snapshots, experiment=unique("proxied"),
                                 registered_model=name, verbose=False)
        client = MlflowClient(mlflow_server.url)
        assert client.get_run(run.run_id).info.artifact_uri.startswith("mlflow-artifacts:")
        model = client.get_logged_model(client.get_run(run.run_id).data.tags["mlflow_best.best_model_id"])
        assert model.artifact_location.startswith("mlflow-artifacts:")
        # The files are in the server's artifact destination, nowhere near the client's staging.
        stored = list(mlflow_server.artifacts.rglob("manifest.json"))
        assert any(model.model_id in str(p) for p in stored)
        # A fresh machine (empty cache) gets the exact weights back through the server.
        restored = mlflow_best.restore(f"models:/{name}@best", cache_dir=tmp_path / "fresh-cache")
        assert restored.epoch == 1 and restored.version == "2"
        for key, tensor in restored.model.state_dict().items():
            assert torch.equal(tensor, snapshots[1][key]), key
        assert str(restored.path).startswith(str(tmp_path / "fresh-cache"))
    finally:
        mlflow.set_tracking_uri(None)


def test_mlflow_http_retries_are_bounded_inside_the_block_and_put_back_after_it(
    monkeypatch: pytest.MonkeyPatch, sqlite_uri: str
) -> None:
    """MLflow alone retries an unreachable server for ~4 minutes; under track() a call gives up in seconds,
    and the process's settings are as they were once the block has ended (failed or not)."""
    for key in _HTTP_DEFAULTS:
        monkeypatch.setenv(key, "placeholder")  # recorded, so that the test leaves the environment as it was
        monkeypatch.delenv(key)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    started = time.monotonic()
    with (
        pytest.raises(mlflow_best.TrackingStoreError, match=r"did not answer.*server is running"),
        mlflow_best.track(TinyNet(), None, tracking_uri=dead, verbose=False),
    ):
        pass
    took = time.monotonic() - started
    assert took < 30, f"one refused call took {took:.1f} s"
    assert not any(key in os.environ for key in _HTTP_DEFAULTS)  # put back after a failed start
    with mlflow_best.track(TinyNet(), None, verbose=False) as run:
        assert {key: os.environ[key] for key in _HTTP_DEFAULTS} == _HTTP_DEFAULTS
        run.log_epoch(0, {"val_loss": 1.0})
    assert not any(key in os.environ for key in _HTTP_DEFAULTS)  # put back after the block
    # A user's own setting wins over ours, and stays.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with (
        pytest.raises(mlflow_best.TrackingStoreError),
        mlflow_best.track(TinyNet(), None, tracking_uri=dead, verbose=False),
    ):
        pass
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
