"""examples/quickstart.py, the README's quickstart, runs as a user runs it and leaves what it says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

from tests.conftest import new_sqlite_store

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.py"


def test_the_quickstart_runs_and_registers_its_best_epoch(tmp_path: Path, _sqlite_template: Path) -> None:
    uri = new_sqlite_store(_sqlite_template, tmp_path / "store")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(QUICKSTART)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # No warning of ours (e.g. a class in __main__). A wait at exit of 10 s or more (a loaded machine)
    # prints a progress line, which is not a warning.
    ours = [line for line in done.stderr.splitlines()
            if "mlflow_best:" in line and "upload(s) to MLflow…" not in line]
    assert ours == [], done.stderr

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("quickstart")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    best = client.get_model_version_by_alias("digits-quickstart", "best")
    assert str(best.version) == tags["mlflow_best.best_version"]
    lines = done.stdout.splitlines()
    assert lines[0] == (f"run {run.info.run_id}: best val_loss={float(tags['mlflow_best.best_value']):.4f} "
                        f"at epoch {tags['mlflow_best.best_epoch']}, version {best.version}")
    assert lines[1].startswith(f"restored Net from epoch {tags['mlflow_best.best_epoch']} (version "
                               f"{best.version}), val_loss={float(tags['mlflow_best.best_value']):.4f}")
    accuracy = float(lines[2].rsplit("val_acc=", 1)[1])
    assert accuracy > 0.9
