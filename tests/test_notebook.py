"""notebooks/quickstart.ipynb runs top to bottom against a temporary store and leaves what it promises."""

from __future__ import annotations

import time
from pathlib import Path

import nbclient
import nbformat
import pytest
from mlflow import MlflowClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def _text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") or out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


@pytest.mark.slow
def test_quickstart_runs_top_to_bottom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path / 'nb.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the kernel inherits it (and MLFLOW_BEST_HOME)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), (
        "commit the notebook without outputs (they hold paths and timings of one machine)"
    )
    start = time.monotonic()
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    took = time.monotonic() - start
    assert took < 300, f"the quickstart took {took:.0f} s; it should stay around a minute"

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    best_run = min(runs, key=lambda r: float(r.data.tags["mlflow_best.best_value"]))
    champion = client.get_model_version_by_alias("digits-quickstart", "champion")
    assert str(champion.version) == best_run.data.tags["mlflow_best.best_version"]
    assert all([a.path for a in client.list_artifacts(r.info.run_id, "plots")] == ["plots/val_loss.png"]
               for r in runs)

    text = _text(nb)
    assert f"digits-quickstart@champion -> v{champion.version} (best val_loss=" in text
    best_epoch = best_run.data.tags["mlflow_best.best_epoch"]
    assert f"restored version {champion.version} (epoch {best_epoch} of run {best_run.info.run_id})" in text
    accuracy = float(text.split("test accuracy: ")[1].split()[0])
    assert accuracy > 0.9
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1  # the validation curves
