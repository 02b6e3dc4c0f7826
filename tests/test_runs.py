"""``mlflow_best.runs()``: one row per tracked run, best first, on every store."""

from __future__ import annotations

import math
import os

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

import mlflow_best
from tests.helpers import run_sequence, unique


def test_one_row_per_tracked_run_best_first(store: str) -> None:
    experiment, model = unique("runs"), unique("runs-m")
    worse, _, _ = run_sequence([0.9, 0.6, 0.7], experiment=experiment, registered_model=model,
                               run_name="worse", verbose=False)
    better, _, _ = run_sequence([0.8, 0.5, 0.3, 0.4], experiment=experiment, registered_model=model,
                                run_name="better", verbose=False)
    unregistered, _, _ = run_sequence([0.2], experiment=experiment, run_name="plain", verbose=False)
    maximised, _, _ = run_sequence([0.1, 0.3, 0.2], experiment=experiment, monitor="val_loss", mode="max",
                                   run_name="max", verbose=False)
    max_lower, _, _ = run_sequence([0.25], experiment=experiment, mode="max", verbose=False)
    with mlflow.start_run(experiment_id=better.experiment_id):  # not tracked: not listed
        mlflow.log_metric("val_loss", 0.0)
    mlflow_best.promote(model, alias="champion")

    table = mlflow_best.runs(experiment)

    assert list(table.columns) == ["experiment", "run_id", "run_name", "status", "monitor", "mode",
                                   "best_value", "best_epoch", "registered_model", "version", "aliases",
                                   "start_time"]
    # mode max first (sorted by metric, then mode): 0.3, 0.25; then min: 0.2 (nothing registered), 0.3, 0.6
    assert list(table["run_id"]) == [maximised.run_id, max_lower.run_id, unregistered.run_id, better.run_id,
                                     worse.run_id]
    row = table.set_index("run_id").loc[better.run_id]
    assert (row.experiment, row.run_name, row.status, row.monitor, row["mode"]) == (
        experiment, "better", "FINISHED", "val_loss", "min")
    assert (row.best_value, row.best_epoch, row.registered_model, row.version) == (0.3, 2, model, 5)
    assert row.aliases == ["best", "champion"]
    assert isinstance(row.start_time, pd.Timestamp) and str(row.start_time.tz) == "UTC"
    worse_row = table.set_index("run_id").loc[worse.run_id]
    assert (worse_row.version, worse_row.aliases) == (2, [])
    plain = table.set_index("run_id").loc[unregistered.run_id]
    assert pd.isna(plain.registered_model) and pd.isna(plain.version) and plain.aliases == []
    assert table.set_index("run_id").loc[maximised.run_id, "best_value"] == pytest.approx(0.3)
    assert str(table["best_epoch"].dtype) == "Int64" and str(table["version"].dtype) == "Int64"


def test_the_experiment_is_found_as_track_finds_it(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = unique("first"), unique("second")
    one, _, _ = run_sequence([0.5], experiment=first, verbose=False)
    mlflow.set_experiment(second)
    two, _, _ = run_sequence([0.5], verbose=False)  # experiment=None: the active one

    assert list(mlflow_best.runs()["run_id"]) == [two.run_id]
    mlflow.tracking.fluent._active_experiment_id = None  # as a new process would start
    # set_experiment set this too; popped, not monkeypatched (monkeypatch would put it back)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", first)
    assert list(mlflow_best.runs()["run_id"]) == [one.run_id]
    everything = mlflow_best.runs(all_experiments=True)
    assert {one.run_id, two.run_id} <= set(everything["run_id"])
    assert set(everything.set_index("run_id").loc[[one.run_id, two.run_id], "experiment"]) == {first, second}


def test_an_explicit_tracking_uri_reads_that_store(
    store: str, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    experiment = unique("elsewhere")
    run, _, _ = run_sequence([0.4, 0.2], experiment=experiment, verbose=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path_factory.mktemp('other') / 'other.db'}")
    table = mlflow_best.runs(experiment, tracking_uri=store)
    assert list(table["run_id"]) == [run.run_id] and table.loc[0, "best_value"] == pytest.approx(0.2)
    # that store's experiment from the environment, as track(tracking_uri=...) takes it
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    assert list(mlflow_best.runs(tracking_uri=store)["run_id"]) == [run.run_id]


def test_no_runs_is_an_empty_frame_with_the_columns(store: str) -> None:
    experiment = unique("empty")
    MlflowClient().create_experiment(experiment)
    table = mlflow_best.runs(experiment)
    assert table.empty and "best_value" in table.columns


def test_an_unknown_experiment_names_those_that_exist(store: str) -> None:
    experiment = unique("known")
    MlflowClient().create_experiment(experiment)
    refused = rf"experiment 'nope' does not exist \(there are: .*'{experiment}'.*\); pass one"
    with pytest.raises(mlflow_best.ConfigError, match=refused):
        mlflow_best.runs("nope")
    with pytest.raises(mlflow_best.ConfigError, match="experiment='x' and all_experiments=True both choose"):
        mlflow_best.runs("x", all_experiments=True)


def test_a_run_without_a_finite_best_sorts_last(store: str) -> None:
    experiment = unique("nan")
    nan_run, _, _ = run_sequence([math.nan], experiment=experiment, verbose=False)
    finite, _, _ = run_sequence([0.9], experiment=experiment, verbose=False)
    table = mlflow_best.runs(experiment)
    assert list(table["run_id"]) == [finite.run_id, nan_run.run_id]
    assert math.isnan(table.loc[1, "best_value"]) and pd.isna(table.loc[1, "best_epoch"])
