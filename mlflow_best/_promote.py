"""Promotion in the registry with aliases (stages are deprecated in MLflow)."""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mlflow_best._criterion import Criterion
from mlflow_best._errors import CheckpointNotFoundError, ConfigError
from mlflow_best._registry import V_MODE, V_MONITOR, V_VALUE, _all_versions, best_version, is_missing


@dataclass(frozen=True)
class Promotion:
    """The result of ``promote``: which version now holds the alias, and why it was picked."""

    name: str
    version: str
    alias: str
    monitor: str | None
    mode: str | None
    value: float | None
    previous: str | None


def promote(
    name: str, version: int | str | None = None, *, alias: str = "champion", tracking_uri: str | None = None
) -> Promotion:
    """Point ``alias`` of registered model ``name`` at a version.

    Args:
        name: the registered model.
        version: the version to promote; None picks the best version by the metric that ``track``
            recorded on the versions (their ``monitor``/``mode``/``value`` tags).
        alias: the alias to set (default ``"champion"``).
        tracking_uri: the MLflow tracking URI; None uses MLflow's own.

    Returns:
        A ``Promotion`` naming the version, the metric and mode used, and the previous holder.

    Raises:
        CheckpointNotFoundError: the model or version does not exist.
        ConfigError: the versions record different metrics or modes, so "best" is ambiguous.
    """
    client = MlflowClient(tracking_uri=tracking_uri or mlflow.get_tracking_uri())
    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if is_missing(e):
            raise CheckpointNotFoundError(f"registered model {name!r} does not exist") from e
        raise
    monitor = mode = None
    value = None
    if version is None:
        versions = [v for v in _all_versions(client, name) if V_MONITOR in (v.tags or {})]
        kinds = {(v.tags[V_MONITOR], v.tags.get(V_MODE, "min")) for v in versions}
        if not kinds:
            raise CheckpointNotFoundError(
                f"registered model {name!r} has no version logged by mlflow_best; pass version= explicitly"
            )
        if len(kinds) > 1:
            raise ConfigError(
                f"the versions of {name!r} record different metrics/modes {sorted(kinds)}; pass version="
            )
        monitor, mode = kinds.pop()
        best = best_version(client, name, monitor, Criterion(mode))  # type: ignore[arg-type]
        if best is None:
            raise CheckpointNotFoundError(f"no version of {name!r} has a finite {monitor!r}; pass version=")
        version = str(best.version)
        value = float(best.tags[V_VALUE])
    version = str(version)
    if not version.isdigit():
        raise ConfigError(f"version={version!r} must be a version number such as 3")
    try:
        mv = client.get_model_version(name, version)
    except MlflowException as e:
        if is_missing(e):
            raise CheckpointNotFoundError(f"registered model {name!r} has no version {version}") from e
        raise
    previous: str | None
    try:
        previous = str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        previous = None
    client.set_registered_model_alias(name, alias, str(mv.version))
    tags = mv.tags or {}
    if monitor is None and V_MONITOR in tags:
        monitor, mode = tags[V_MONITOR], tags.get(V_MODE)
        value = float(tags[V_VALUE]) if V_VALUE in tags else None
    return Promotion(name, str(mv.version), alias, monitor, mode, value, previous)
