"""``runs``: the runs ``track`` left in a tracking store, one row each, as a pandas DataFrame."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

from mlflow_best._errors import ConfigError

if TYPE_CHECKING:
    import pandas

COLUMNS = (
    "experiment",
    "run_id",
    "run_name",
    "status",
    "monitor",
    "mode",
    "best_value",
    "best_epoch",
    "registered_model",
    "version",
    "aliases",
    "start_time",
)


def runs(
    experiment: str | None = None, *, tracking_uri: str | None = None, all_experiments: bool = False
) -> pandas.DataFrame:
    """The runs tracked by ``mlflow_best.track``, one row per run, best first.

    The experiment is found as ``track`` finds it: ``experiment=`` by name, else MLflow's active
    experiment (``mlflow.set_experiment``, ``MLFLOW_EXPERIMENT_NAME`` / ``MLFLOW_EXPERIMENT_ID``,
    else Default); ``all_experiments=True`` lists every experiment of the store. Runs of other tools
    in the same experiments are left out.

    Args:
        experiment: an experiment name (None: the active experiment, as for ``track``).
        tracking_uri: the tracking store (None: MLflow's own, e.g. ``MLFLOW_TRACKING_URI``).
        all_experiments: list the runs of every (not deleted) experiment instead.

    Returns:
        A DataFrame with the columns ``experiment``, ``run_id``, ``run_name``, ``status``
        (``FINISHED``, ``RUNNING``, ``FAILED``, ``KILLED``), ``monitor``, ``mode`` (``min`` or
        ``max``), ``best_value`` (float, NaN before a first finite value), ``best_epoch`` and
        ``version`` (nullable ints), ``registered_model`` (missing, ``pd.isna``, for a run that
        registers nothing), ``aliases`` (a list of the aliases that point at the run's best version now, e.g.
        ``["best", "champion"]``) and ``start_time`` (UTC). Rows are sorted best first within each
        monitored metric (lowest first for mode ``min``), newest first among equals. No runs: an
        empty DataFrame with those columns.

    Raises:
        ConfigError: ``experiment`` does not exist (the message lists those that do), or both
            ``experiment`` and ``all_experiments=True`` were passed.

    Example::

        table = mlflow_best.runs("digits")
        table[["run_name", "best_value", "best_epoch", "version", "aliases"]].head()
        best = table.iloc[0]          # the best run of the first metric
        mlflow_best.restore(best.run_id)
    """
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from mlflow_best._tags import TAG

    if experiment is not None and all_experiments:
        raise ConfigError(
            f"experiment={experiment!r} and all_experiments=True both choose the experiments; "
            "pass one of them"
        )
    if experiment is not None and not isinstance(experiment, str):
        raise ConfigError(f"experiment={experiment!r} must be an experiment name (a str) or None")
    uri = tracking_uri or mlflow.get_tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    # As track: on MLflow's global store the fluent active experiment (set_experiment, env vars).
    same_store = tracking_uri is None or tracking_uri == mlflow.get_tracking_uri()
    active = _active_experiment_id() if experiment is None and not all_experiments and same_store else None
    experiments = {str(e.experiment_id): str(e.name) for e in client.search_experiments()}
    if all_experiments:
        ids = list(experiments)
    elif active is not None and active in experiments:
        ids = [active]
    else:
        if experiment is None:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"
        ids = [i for i, name in experiments.items() if name == experiment]
        if not ids:
            there = ", ".join(repr(n) for n in sorted(experiments.values())) or "none"
            raise ConfigError(
                f"experiment {experiment!r} does not exist (there are: {there}); pass one of these"
            )
    found: list[Any] = []
    token: str | None = None
    while ids:
        page = client.search_runs(
            ids, filter_string=f"tags.`{TAG}monitor` != ''", max_results=1000, page_token=token
        )
        found.extend(page)
        token = page.token
        if not token:
            break

    aliases: dict[tuple[str, int], list[str]] = {}
    key = TAG + "registered_model"
    names = {str(r.data.tags[key]) for r in found if key in r.data.tags}
    for name in sorted(names):
        try:
            held = client.get_registered_model(name).aliases
        except MlflowException:  # a deleted registered model: its runs are still worth listing
            continue
        for alias, version in held.items():
            aliases.setdefault((name, int(version)), []).append(str(alias))

    rows = []
    for r in found:
        tags = r.data.tags
        model = tags.get(TAG + "registered_model")
        version = _int(tags.get(TAG + "best_version"))
        rows.append({
            "experiment": experiments.get(str(r.info.experiment_id), str(r.info.experiment_id)),
            "run_id": r.info.run_id,
            "run_name": r.info.run_name or "",
            "status": r.info.status,
            "monitor": tags.get(TAG + "monitor", ""),
            "mode": tags.get(TAG + "mode", "min"),
            "best_value": _float(tags.get(TAG + "best_value")),
            "best_epoch": _int(tags.get(TAG + "best_epoch")),
            "registered_model": model,
            "version": version,
            "aliases": sorted(aliases.get((model, version), [])) if model and version is not None else [],
            "start_time": r.info.start_time,
        })
    # Best first within each metric; a run without a finite best goes last; otherwise MLflow's
    # order (newest first) is kept, the sort being stable.
    rows.sort(key=lambda row: (
        row["monitor"],
        row["mode"],
        math.isnan(row["best_value"]),
        0.0 if math.isnan(row["best_value"]) else (
            row["best_value"] if row["mode"] == "min" else -row["best_value"]
        ),
    ))
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table["best_value"] = table["best_value"].astype("float64")
    table["best_epoch"] = table["best_epoch"].astype("Int64")
    table["version"] = table["version"].astype("Int64")
    table["start_time"] = pd.to_datetime(table["start_time"], unit="ms", utc=True)
    return table


def _active_experiment_id() -> str | None:
    """The experiment ``track`` logs into with ``experiment=None`` on MLflow's global store."""
    from mlflow_best import _lifecycle as lifecycle

    return lifecycle.active_experiment_id()


def _float(raw: str | None) -> float:
    try:
        return float(raw) if raw is not None else math.nan
    except ValueError:
        return math.nan


def _int(raw: str | None) -> int | None:
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None
