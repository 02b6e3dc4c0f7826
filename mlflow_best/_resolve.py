"""Resolving a reference (run id, runs:/, models:/name/N, models:/name@alias, a LoggedModel id, a local
folder) to where its checkpoint lives in MLflow and what MLflow says it is.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow_best._checkpoint import (
    MANIFEST,
    Manifest,
    verify_checkpoint,
)
from mlflow_best._config import home
from mlflow_best._criterion import Criterion
from mlflow_best._errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointPrunedError,
    ConfigError,
    TrackingStoreError,
)
from mlflow_best._promote import _ranges
from mlflow_best._reach import shown_uri
from mlflow_best._registry import _all_versions, alias_holder, best_version, is_missing, known_models
from mlflow_best._tags import TAG, V_EPOCH, V_MODE, V_MODEL_ID, V_MONITOR, V_PRUNED, V_RUN, V_SHA, V_VALUE

if TYPE_CHECKING:
    from mlflow import MlflowClient

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Source:
    """Where a checkpoint lives in MLflow and what it must hash to."""

    artifact_uri: str
    sha256: str | None
    run_id: str | None
    version: str | None = None
    model_id: str | None = None
    # What MLflow says the checkpoint is (version or LoggedModel tags): the manifest must agree.
    expect: Mapping[str, str] = field(default_factory=dict)


# -- resolving references -------------------------------------------------------------------------
REF_FORMS = (
    "a run id (32 hex characters) or 'runs:/<run id>', 'models:/<name>/<version>', "
    "'models:/<name>@<alias>', 'models:/<logged model id>' (m-...), or a local checkpoint folder"
)


def resolve(client: MlflowClient, ref: str) -> Source:
    from mlflow.exceptions import MlflowException

    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"ref={ref!r} is not a reference; pass {REF_FORMS}")
    try:
        if ref.startswith("models:/"):
            return _resolve_model(client, ref[len("models:/") :], ref)
        run_id = ref[len("runs:/") :].strip("/") if ref.startswith("runs:/") else ref
        if not _RUN_ID.match(run_id):
            looks_local = not ref.startswith("runs:/") and (
                "/" in ref or os.sep in ref or ref.startswith(".")
            )
            where = f" (and there is no folder {str(Path(ref).resolve())!r})" if looks_local else ""
            raise ConfigError(f"ref={ref!r} is not a reference restore understands{where}; pass {REF_FORMS}")
        return resolve_run(client, run_id)
    except MlflowException as e:
        if is_missing(e) or e.error_code == "INVALID_PARAMETER_VALUE":
            raise CheckpointNotFoundError(f"{ref!r} was not found in the tracking store ({e.message})") from e
        raise TrackingStoreError(
            f"resolving {ref!r} at the tracking store {shown_uri(client.tracking_uri)!r} failed: {e.message}"
        ) from e


def _missing(client: MlflowClient, ref: str, name: str, *, alias: str | None = None,
             version: str | None = None) -> CheckpointNotFoundError:
    """Why ``name@alias`` / ``name/version`` was not found, with what exists instead."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        if not is_missing(e):
            raise
        return CheckpointNotFoundError(
            f"{ref!r}: registered model {name!r} does not exist in {shown_uri(client.tracking_uri)!r} "
            f"(it has: {known_models(client)}); pass one of these, or train with track(registered_model=...) "
            "first"
        )
    if alias is not None:
        held = ", ".join(f"@{a} -> v{v}" for a, v in sorted((model.aliases or {}).items())) or "none"
        return CheckpointNotFoundError(
            f"{ref!r}: registered model {name!r} has no alias {alias!r} (its aliases: {held}); pass one of "
            f"these, 'models:/{name}/<version>', or set it with mlflow-best promote / mlflow_best.promote"
        )
    has = _ranges(sorted(int(v.version) for v in _all_versions(client, name))) or "no versions"
    return CheckpointNotFoundError(
        f"{ref!r}: registered model {name!r} has no version {version} (it has {has}); pass one of these"
    )


def _resolve_model(client: MlflowClient, rest: str, ref: str) -> Source:
    from mlflow.exceptions import MlflowException

    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        try:
            mv = alias_holder(client, name, alias)
        except MlflowException as e:
            if e.error_code != "INVALID_PARAMETER_VALUE":
                raise
            mv = None  # an alias name MLflow refuses names no version either
        if mv is None:
            raise _missing(client, ref, name, alias=alias)
        return _from_version(client, mv, alias)
    if "/" in rest:
        name, version = rest.rsplit("/", 1)
        if not version.isdigit():
            raise ConfigError(f"{ref!r}: version {version!r} must be a number, as in 'models:/{name}/3'")
        try:
            mv = client.get_model_version(name, version)
        except MlflowException as e:
            if not is_missing(e) and e.error_code != "INVALID_PARAMETER_VALUE":
                raise
            raise _missing(client, ref, name, version=version) from e
        return _from_version(client, mv)
    if rest.startswith("m-"):
        return _from_logged_model(client, rest)
    raise ConfigError(
        f"{ref!r} names no version or alias; use 'models:/{rest}@best' or 'models:/{rest}/1' "
        f"(restore accepts {REF_FORMS})"
    )


def _from_version(client: MlflowClient, mv: Any, alias: str | None = None) -> Source:
    from_source = mv.source.split("/")[-1] if mv.source.startswith("models:/m-") else None
    model_id = getattr(mv, "model_id", None) or (mv.tags or {}).get(V_MODEL_ID) or from_source
    if not model_id:
        raise CheckpointError(
            f"model version {mv.name}/{mv.version} was not logged by mlflow_best (source {mv.source!r}); "
            "restore only reads versions that track() registered"
        )
    if V_PRUNED in (mv.tags or {}):
        how = (
            f"alias @{alias} of {mv.name!r} points at version {mv.version}, which"
            if alias else f"version {mv.version} of {mv.name!r}"
        )
        raise CheckpointPrunedError(
            f"{how} was pruned by track(keep=...): its checkpoint files were deleted, so it cannot be "
            f"restored; {_with_files(client, mv)}"
        )
    src = _from_logged_model(client, model_id)
    sha256 = (mv.tags or {}).get(V_SHA) or src.sha256
    return Source(src.artifact_uri, sha256, src.run_id, str(mv.version), model_id, _expected(mv.tags))


def _with_files(client: MlflowClient, pruned: Any) -> str:
    """Where to go instead of a pruned version: its model's aliases and its best version with files."""
    from mlflow.exceptions import MlflowException

    name, tags = pruned.name, pruned.tags or {}
    try:
        aliases = client.get_registered_model(name).aliases or {}
        best = None
        if V_MONITOR in tags:
            best = best_version(client, name, tags[V_MONITOR], Criterion(tags.get(V_MODE, "min")))
    except MlflowException:
        return f"restore 'models:/{name}@<alias>' or a newer version"
    hints = []
    if best is not None:
        hints.append(
            f"the best version with files is {best.version} ({tags[V_MONITOR]}={best.tags.get(V_VALUE)}): "
            f"'models:/{name}/{best.version}'"
        )
    held = [
        f"'models:/{name}@{a}' (-> v{v})" for a, v in sorted(aliases.items()) if str(v) != str(pruned.version)
    ]
    if held:
        hints.append("its aliases: " + ", ".join(held))
    return "; ".join(hints) or f"no version of {name!r} has files left; restore a run id instead"


def _from_logged_model(client: MlflowClient, model_id: str) -> Source:
    lm = client.get_logged_model(model_id)
    if V_PRUNED in (lm.tags or {}):
        raise CheckpointPrunedError(
            f"logged model {model_id} ({lm.name}) was pruned by track(keep=...): its checkpoint files were "
            f"deleted, so it cannot be restored; restore its run {lm.source_run_id} (that run's best) instead"
        )
    return Source(
        lm.artifact_location, (lm.tags or {}).get(V_SHA), lm.source_run_id, None, model_id, _expected(lm.tags)
    )


def _expected(tags: Mapping[str, str] | None) -> dict[str, str]:
    return {k: v for k, v in (tags or {}).items() if k in (V_EPOCH, V_VALUE, V_MONITOR, V_RUN)}


def check_identity(manifest: Manifest, source: Source) -> None:
    """Refuse a checkpoint whose manifest says it is another one than MLflow says (a redirected source,
    a rewritten tag): the run it belongs to, its epoch, monitor and value."""
    data, where = manifest.data, manifest.path / MANIFEST
    owner = data.get("run_id")
    if source.run_id and owner and owner != source.run_id:
        raise CheckpointError(
            f"{where}: this checkpoint belongs to run {owner}, not {source.run_id} as MLflow's records say "
            "(a version source or tag was redirected); it was not loaded"
        )
    mine_of = {V_EPOCH: data.get("epoch"), V_VALUE: data.get("value"), V_MONITOR: data.get("monitor"),
               V_RUN: owner}
    for key, mine in mine_of.items():
        if key not in source.expect:
            continue
        tag = source.expect[key]
        try:
            if key == V_EPOCH:
                agree = int(tag) == mine
            elif key == V_VALUE:
                agree = mine is not None and float(tag) == float(mine)
            else:
                agree = mine is None or tag == mine
        except (TypeError, ValueError):
            agree = False
        if not agree:
            raise CheckpointError(
                f"{where}: MLflow's tag {key}={source.expect[key]!r} disagrees with the manifest's {mine!r}: "
                "the tags or the files were changed; it was not loaded"
            )


def resolve_run(client: MlflowClient, run_id: str) -> Source:
    run = client.get_run(run_id)
    tags = run.data.tags
    model_id = tags.get(TAG + "best_model_id")
    if model_id:
        src = _from_logged_model(client, model_id)
        return Source(src.artifact_uri, tags.get(TAG + "best_sha256") or src.sha256, run_id,
                       tags.get(TAG + "best_version"), model_id)
    staged = _staged_best(run_id)
    if staged is not None:
        warnings.warn(
            f"mlflow_best: run {run_id} has no checkpoint in MLflow yet; using the local staged copy "
            f"{staged} (upload it with mlflow_best.sync({run_id!r}))",
            RuntimeWarning,
            stacklevel=3,
        )
        return Source(str(staged), None, run_id)
    raise CheckpointNotFoundError(
        f"run {run_id} has no checkpoint: no epoch has improved "
        f"{tags.get(TAG + 'monitor', 'the monitor')!r} yet (or the run was not tracked by "
        "mlflow_best.track); train until log_epoch returns True, or restore another run"
    )


def _staged_best(run_id: str) -> Path | None:
    folder = home() / "runs" / run_id / "checkpoints"
    if not folder.is_dir():
        return None
    best: tuple[float, Path] | None = None
    for sub in folder.iterdir():
        if sub.name.startswith(".") or sub.name.startswith("last"):
            continue
        try:
            m = verify_checkpoint(sub)
        except CheckpointError:
            continue
        crit = Criterion(m.mode)
        value = m.value
        if math.isfinite(value) and (best is None or crit.better(value, best[0])):
            best = (value, sub)
    return best[1] if best else None


