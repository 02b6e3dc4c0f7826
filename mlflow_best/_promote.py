"""Promotion in the registry with aliases (stages are deprecated in MLflow)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlflow_best._criterion import Criterion
from mlflow_best._errors import CheckpointNotFoundError, ConfigError, TrackingStoreError
from mlflow_best._reach import reach, shown_uri
from mlflow_best._registry import _all_versions, alias_holder, best_version, is_missing, known_models
from mlflow_best._tags import V_MODE, V_MONITOR, V_PRUNED, V_VALUE

if TYPE_CHECKING:
    from mlflow import MlflowClient


@dataclass(frozen=True)
class Promotion:
    """The result of ``promote``: which version now holds the alias, and why it was picked.

    Attributes:
        name: the registered model.
        version: the version the alias points at now.
        alias: the alias that was set.
        monitor: the metric recorded on that version (None for a version not logged by ``track``).
        mode: "min" or "max", how ``monitor`` was compared.
        value: that version's value of ``monitor``.
        previous: the version the alias pointed at before (None: it was unset).
        picked_best: True when the version was picked as the best, False when it was given.
        candidates: how many versions were compared when picking the best (0 when given).
    """

    name: str
    version: str
    alias: str
    monitor: str | None
    mode: str | None
    value: float | None
    previous: str | None
    picked_best: bool = False
    candidates: int = 0

    def __str__(self) -> str:
        """``digits-mlp@champion -> v7 (best val_loss=0.1274 of 7 versions, mode min); was v5``."""
        head = f"{self.name}@{self.alias} -> v{self.version}"
        if self.picked_best and self.value is not None:
            head += (
                f" (best {self.monitor}={self.value:.4f} of {self.candidates} version(s), mode {self.mode}: "
                f"{'lower' if self.mode == 'min' else 'higher'} is better)"
            )
        elif self.monitor is not None and self.value is not None:
            head += f" ({self.monitor}={self.value:.4f})"
        if self.previous is None:
            return head + "; the alias was not set before"
        if self.previous == self.version:
            return head + "; it already pointed there"
        return head + f"; was v{self.previous}"


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
        A ``Promotion`` naming the version, the metric and mode used, and the previous holder;
        ``str()`` of it is a one-line report.

    Raises:
        CheckpointNotFoundError: the model or version does not exist, or its files were pruned.
        ConfigError: a malformed version or alias, or versions that record different metrics or
            modes, so "best" is ambiguous.
        TrackingStoreError: the tracking store refused a call, or did not answer (naming the URI).

    Example:
        >>> print(mlflow_best.promote("digits-mlp"))  # doctest: +SKIP
        digits-mlp@champion -> v7 (best val_loss=0.1274 of 7 version(s), mode min: lower is better); was v5
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if version is not None and (isinstance(version, bool) or not str(version).isdigit()):
        raise ConfigError(f"version={version!r} must be a version number such as 3, or None to pick the best")
    if not isinstance(alias, str) or not alias:
        raise ConfigError(f"alias={alias!r} must be a non-empty str, e.g. alias='champion'")
    if alias.lower() == "latest" or (alias[:1] in "vV" and alias[1:].isdigit()):
        raise ConfigError(f"alias={alias!r} is reserved by the MLflow registry (latest, v<N>); pick another")
    uri = tracking_uri or mlflow.get_tracking_uri()
    with reach(uri):
        client = MlflowClient(tracking_uri=uri)
        try:
            return _promote(client, name, None if version is None else str(version), alias)
        except MlflowException as e:
            if e.error_code == "INVALID_PARAMETER_VALUE":
                raise ConfigError(f"MLflow refused promote({name!r}, alias={alias!r}): {e.message}") from e
            raise TrackingStoreError(
                f"promote({name!r}) failed at the tracking store {shown_uri(uri)!r}: {e.message}"
            ) from e


def _promote(client: MlflowClient, name: str, version: str | None, alias: str) -> Promotion:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if not is_missing(e):
            raise
        raise CheckpointNotFoundError(
            f"registered model {name!r} does not exist in {shown_uri(client.tracking_uri)!r} (it has: "
            f"{known_models(client)}); pass one of these, or train with track(registered_model=...) first"
        ) from e
    monitor = mode = None
    value = None
    versions = _all_versions(client, name)
    candidates = 0
    if version is None:
        ours = [v for v in versions if V_MONITOR in (v.tags or {}) and V_PRUNED not in (v.tags or {})]
        kinds = {(v.tags[V_MONITOR], v.tags.get(V_MODE, "min")) for v in ours}
        if not kinds:
            raise CheckpointNotFoundError(
                f"registered model {name!r} has no version logged by mlflow_best.track, so there is no "
                "recorded metric to pick the best by; pass version= explicitly"
            )
        if len(kinds) > 1:
            raise ConfigError(
                f"the versions of {name!r} record different metrics/modes {sorted(kinds)}, so 'best' is "
                "ambiguous; pass version= explicitly"
            )
        monitor, mode = kinds.pop()
        best = best_version(client, name, monitor, Criterion(mode))
        if best is None:
            raise CheckpointNotFoundError(
                f"no version of {name!r} has a finite {monitor!r}; pass version= explicitly"
            )
        version = str(best.version)
        value = float(best.tags[V_VALUE])
        candidates = sum(1 for v in ours if _finite(v.tags.get(V_VALUE)))
    existing = sorted(int(v.version) for v in versions)
    mv = next((v for v in versions if str(v.version) == version), None)
    if mv is None:
        has = _ranges(existing) or "no versions"
        raise CheckpointNotFoundError(
            f"registered model {name!r} has no version {version} (it has {has}); pass one of these, or "
            "omit the version to promote the best"
        )
    if V_PRUNED in (mv.tags or {}):
        raise CheckpointNotFoundError(
            f"version {version} of {name!r} was pruned by track(keep=...): its files are deleted and it "
            "cannot be restored; promote another version"
        )
    found = alias_holder(client, name, alias)
    previous = None if found is None else str(found.version)
    client.set_registered_model_alias(name, alias, str(mv.version))
    tags = mv.tags or {}
    if monitor is None and V_MONITOR in tags:
        monitor, mode = tags[V_MONITOR], tags.get(V_MODE)
        value = float(tags[V_VALUE]) if _finite(tags.get(V_VALUE)) else None
    return Promotion(name, str(mv.version), alias, monitor, mode, value, previous,
                     picked_best=candidates > 0, candidates=candidates)


def _finite(raw: str | None) -> bool:
    try:
        return raw is not None and math.isfinite(float(raw))
    except ValueError:
        return False


def _ranges(numbers: list[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``'versions 1-3, 5'``: short even for a model with hundreds of versions."""
    if not numbers:
        return ""
    parts: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ("version " if len(numbers) == 1 else "versions ") + ", ".join(parts)
