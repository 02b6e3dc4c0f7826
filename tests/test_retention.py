"""keep=N: only the N best checkpoints keep their files; pruned versions stay listed, tagged."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

import mlflow_best
from tests.helpers import run_sequence, unique


def _stored_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_keep_deletes_the_files_of_checkpoints_outside_the_n_best(store: str) -> None:
    name = unique("model")
    values = [1.0, 0.9, 0.8, 0.85, 0.7, 0.6]
    run, _, _ = run_sequence(values, experiment=unique("e"), registered_model=name, keep=2)
    client = MlflowClient(store)
    versions = {str(v.version): v.tags for v in client.search_model_versions(f"name='{name}'")}
    assert sorted(versions, key=int) == ["1", "2", "3", "4", "5"]  # every improvement got a version
    pruned = sorted((v for v, t in versions.items() if t.get("mlflow_best.pruned") == "true"), key=int)
    assert pruned == ["1", "2", "3"]
    assert str(client.get_model_version_by_alias(name, "best").version) == "5"
    assert mlflow_best.restore(f"models:/{name}/4").epoch == 4
    assert mlflow_best.restore(f"models:/{name}@best").epoch == 5
    with pytest.raises(mlflow_best.CheckpointNotFoundError, match=r"version 1 .* was pruned by track"):
        mlflow_best.restore(f"models:/{name}/1")
    exp_id = client.get_run(run.run_id).info.experiment_id
    models = client.search_logged_models([exp_id])
    assert sum(m.tags.get("mlflow_best.pruned") == "true" for m in models) == 3
    if store.startswith("sqlite"):
        for m in models:
            has_files = Path(m.artifact_location).joinpath("model.pt").exists()
            assert has_files == (m.tags.get("mlflow_best.pruned") != "true"), m.name


def test_the_version_holding_the_alias_is_never_pruned(sqlite_uri: str) -> None:
    name = unique("model")
    exp = unique("e")
    run_sequence([0.1], experiment=exp, registered_model=name)  # v1 holds @best for good
    run_sequence([1.0, 0.9, 0.8], experiment=exp, registered_model=name, keep=1)
    client = MlflowClient(sqlite_uri)
    assert str(client.get_model_version_by_alias(name, "best").version) == "1"
    tags = {str(v.version): v.tags for v in client.search_model_versions(f"name='{name}'")}
    assert "mlflow_best.pruned" not in tags["1"]
    assert [v for v in ("2", "3", "4") if "mlflow_best.pruned" in tags[v]] == ["2", "3"]
    client.set_registered_model_alias(name, "best", "4")
    assert mlflow_best.restore(f"models:/{name}@best").epoch == 2


def test_keep_reduces_bytes_stored(sqlite_uri: str, tmp_path: Path) -> None:
    values = [1.0 - 0.1 * i for i in range(6)]
    run_sequence(values, experiment="all", hidden=256)
    all_bytes = _stored_bytes(tmp_path / "mlruns")
    run_sequence(values, experiment="kept", hidden=256, keep=1)
    kept_bytes = _stored_bytes(tmp_path / "mlruns") - all_bytes
    assert kept_bytes < all_bytes / 3
