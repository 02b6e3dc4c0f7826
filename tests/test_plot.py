"""What the user sees while training: a line per epoch, a summary, and the metric plot in the run."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

import mlflow_best
from mlflow_best._plot import EpochPoint, plot_filename, render_metric_plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.load()  # decodes the whole file: a truncated PNG raises
        assert image.size == (640, 360)
        assert len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50  # something is drawn
    assert path.stat().st_size < 100_000


def _track(values: list[float], verbose: bool | None = None, **kwargs: object) -> mlflow_best.Run:
    model = torch.nn.Linear(3, 2)
    with mlflow_best.track(model, torch.optim.SGD(model.parameters(), lr=0.1), experiment="plots",
                           model_args={"in_features": 3, "out_features": 2}, verbose=verbose,
                           **kwargs) as run:  # type: ignore[arg-type]
        for epoch, v in enumerate(values):
            run.log_epoch(epoch, {"val_loss": v, "train_loss": v + 0.1})
    return run


def test_the_run_has_a_png_of_its_monitored_metric(sqlite_uri: str, tmp_path: Path) -> None:
    run = _track([1.0, 0.5, math.nan, 0.7, 0.4])
    names = [f.path for f in MlflowClient().list_artifacts(run.run_id, "plots")]
    assert names == ["plots/val_loss.png"]
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.run_id, artifact_path="plots/val_loss.png",
                                                     dst_path=str(tmp_path / "dl")))
    _assert_png(local)
    assert [p.improved for p in run.history] == [True, True, False, False, True]


def test_a_metric_name_with_a_slash_gets_a_flat_file_name(sqlite_uri: str) -> None:
    model = torch.nn.Linear(3, 2)
    with mlflow_best.track(model, monitor="val/acc", mode="max", experiment="plots", verbose=False) as run:
        for epoch, v in enumerate([0.5, 0.7, 0.6]):
            run.log_epoch(epoch, {"val/acc": v})
    assert [f.path for f in MlflowClient().list_artifacts(run.run_id, "plots")] == ["plots/val_acc.png"]
    assert plot_filename("val/acc") == "val_acc.png" and plot_filename("/") == "metric.png"


def test_the_plot_is_journaled_so_sync_can_still_send_it(sqlite_uri: str, tmp_path: Path) -> None:
    run = _track([1.0, 0.5])
    # As if the server had died before the plot arrived: MLflow lacks it, the journal does not know
    # it was sent. sync must put it in the same run.
    artifacts = Path(MlflowClient().get_run(run.run_id).info.artifact_uri.removeprefix("file://"))
    shutil.rmtree(artifacts / "plots")
    journal = [json.loads(line) for line in (run.staging_dir / "journal.jsonl").read_text().splitlines()]
    (plot_seq,) = [op["seq"] for op in journal if op["type"] == "artifact"]
    sent = run.staging_dir / "sent.jsonl"
    sent.write_text("".join(line + "\n" for line in sent.read_text().splitlines()
                            if json.loads(line)["seq"] != plot_seq))
    assert mlflow_best.sync(run.run_id) == 1
    _assert_png(artifacts / "plots" / "val_loss.png")


def test_verbose_prints_a_line_per_epoch_and_a_summary_that_says_where_to_look(
    sqlite_uri: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # as in an activated venv: `mlflow` on PATH is this environment's (tests/test_ui_link.py: when not)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    run = _track([1.0, 0.5, 0.7, 2e-5], verbose=True, registered_model="plotted", alias="best")
    lines = capsys.readouterr().out.splitlines()
    epochs, summary = lines[:4], lines[4:]
    pattern = r"epoch +{e}  val_loss={v}  train_loss=\S+  \| {status}  \[\d+\.\d\d s\]"
    first = r"✓ new best val_loss \(first\), checkpoint taken"
    second = r"✓ new best val_loss \(was 1.0000, epoch 0\), checkpoint taken"
    assert re.fullmatch(pattern.format(e=0, v="1.0000", status=first), epochs[0]), epochs[0]
    assert re.fullmatch(pattern.format(e=1, v="0.5000", status=second), epochs[1]), epochs[1]
    assert re.fullmatch(pattern.format(e=2, v="0.7000", status="best val_loss=0.5000 at epoch 1"), epochs[2])
    # tiny values keep their digits instead of printing 0.0000
    assert "val_loss=2.000e-05" in epochs[3] and "was 0.5000, epoch 1" in epochs[3]
    assert summary[0].startswith(f"mlflow_best: run {run.run_id} FINISHED, 4 epoch(s) in ")
    assert summary[1:] == [
        "  best          val_loss=2.000e-05 at epoch 3 (3 improvement(s), each checkpointed)",
        "  registered    plotted v3  (models:/plotted/3); @best -> v3",
        "  plot          plots/val_loss.png in the run's artifacts",
        f"  open the UI   mlflow ui --backend-store-uri {sqlite_uri}",
        f"                then http://127.0.0.1:5000/#/experiments/{run.experiment_id}/runs/{run.run_id}"
        "?workflowType=machine_learning",
    ]


def test_the_summary_says_when_the_alias_is_held_by_another_run(
    sqlite_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _track([0.1], registered_model="shared")
    capsys.readouterr()
    _track([0.5], verbose=True, registered_model="shared")
    out = capsys.readouterr().out
    line = "  registered    shared v2  (models:/shared/2); @best -> v1 (a better version from another run)"
    assert line in out.splitlines()


def test_not_a_terminal_means_quiet_by_default(sqlite_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    _track([1.0, 0.5])
    assert capsys.readouterr().out == ""


def test_a_resumed_run_plots_every_epoch_not_only_this_session(sqlite_uri: str) -> None:
    first = _track([1.0, 0.5, 0.7])
    model = torch.nn.Linear(3, 2)
    with mlflow_best.track(model, torch.optim.SGD(model.parameters(), lr=0.1), experiment="plots",
                           resume=first.run_id, verbose=False) as run:
        assert run.start_epoch == 2  # resumed from the best checkpoint, epoch 1
        for epoch in range(run.start_epoch, 4):
            run.log_epoch(epoch, {"val_loss": [1.0, 0.5, 0.45, 0.6][epoch]})
    assert run.history == [EpochPoint(0, 1.0, True), EpochPoint(1, 0.5, True),
                           EpochPoint(2, 0.45, True), EpochPoint(3, 0.6, False)]


@pytest.mark.parametrize(
    "points",
    [
        [EpochPoint(0, 0.3, True)],
        [EpochPoint(0, math.nan, False), EpochPoint(1, math.inf, False)],
        [EpochPoint(e, 0.5 + 0.01 * e, e == 0) for e in range(200)],
    ],
    ids=["one epoch", "nothing finite", "200 epochs"],
)
def test_the_plot_draws_any_history_into_a_small_png(points: list[EpochPoint], tmp_path: Path) -> None:
    path = render_metric_plot(tmp_path / "deep" / "acc.png", points, "val_acc", "max")
    _assert_png(path)
    assert [p.name for p in path.parent.iterdir()] == ["acc.png"]  # no temporary file left behind
