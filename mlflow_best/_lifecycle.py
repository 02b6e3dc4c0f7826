"""The MLflow run a ``track`` block logs into: opening it (create, join, reopen) and the fluent stack.

``track`` makes its run the active fluent run inside the block (so the user's ``mlflow.log_*`` land
in it), joins a run the user started with ``mlflow.start_run()``, nests a child run when a ``track``
block is opened inside another one, and reopens a run for ``resume=``. This is the only module that
touches MLflow's private fluent APIs. The run is ended by the pipeline's last item, not here.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlflow_best import _lease as lease
from mlflow_best._config import TrackConfig
from mlflow_best._errors import ConfigError, TrackingStoreError
from mlflow_best._lease import LEASE_TAG

if TYPE_CHECKING:
    from mlflow import MlflowClient

# Run ids of the track blocks open in this process whose run is on the fluent stack.
_TRACKED: set[str] = set()
_LOCK = threading.Lock()


def active_run() -> tuple[str, str, bool] | None:
    """``(run_id, experiment_id, opened_by_track)`` of MLflow's active fluent run, or None."""
    import mlflow

    active = mlflow.active_run()
    if active is None:
        return None
    with _LOCK:
        ours = active.info.run_id in _TRACKED
    return active.info.run_id, active.info.experiment_id, ours


def active_experiment_id() -> str | None:
    """The experiment ``mlflow.start_run()`` would use: ``set_experiment``, the env vars, or Default."""
    from mlflow.tracking.fluent import _get_experiment_id

    found = _get_experiment_id()
    return None if found is None else str(found)


def push(run: Any) -> None:
    """Make ``run`` the active fluent run, without ``start_run``'s checks against the active experiment."""
    from mlflow.tracking.fluent import ActiveRun, _active_run_stack

    _active_run_stack.get().append(ActiveRun(run))  # type: ignore[no-untyped-call]
    with _LOCK:
        _TRACKED.add(run.info.run_id)


def pop(run_id: str) -> None:
    """Take ``run_id`` off the fluent stack again (its status is set by the pipeline, not here)."""
    from mlflow.tracking.fluent import _active_run_stack

    stack = _active_run_stack.get()  # type: ignore[no-untyped-call]
    if stack and stack[-1].info.run_id == run_id:
        stack.pop()
    with _LOCK:
        _TRACKED.discard(run_id)


# -- opening the MLflow run a track block logs into ---------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """What a ``track`` block brings to the run it opens: its configuration, params and own tags."""

    config: TrackConfig
    tracking_uri: str
    params: dict[str, str]
    own_tags: dict[str, str]
    same_store: bool  # the block's store is MLflow's global one: the fluent active run applies


def open_run(
    client: MlflowClient, spec: RunSpec, *, before: Callable[[], None], claim: Callable[[Any], None]
) -> tuple[Any, bool, str]:
    """Join the user's active run, reopen ``resume=``, or create a run (a child inside another block).

    ``before()`` runs before anything is created or written; ``claim(run)`` before anything is written
    into an existing run (the lease and the staging lock). Returns ``(run, owns_run, status_before)``:
    a joined run is ended by its owner, not by the block; a reopened run's earlier status is put
    back if the resume fails.
    """
    from mlflow.exceptions import MlflowException

    cfg = spec.config
    active = active_run() if spec.same_store else None
    try:
        if active is not None and not active[2]:
            # Inside the user's own `with mlflow.start_run():` everything goes into that run, and
            # ending it is left to its owner (as autolog and the HF callback do).
            return _join(client, spec, active[0], active[1], before, claim), False, "RUNNING"
        if cfg.resume is not None:
            run, status = _reopen(client, spec, cfg.resume, before, claim)
            return run, True, status
        parent = active[0] if active is not None else None
        default_exp = None
        if spec.same_store:
            default_exp = active[1] if active is not None else active_experiment_id()
        return _create(client, spec, parent, default_exp, before), True, "FAILED"
    except MlflowException as e:
        raise TrackingStoreError(
            f"the tracking store at {spec.tracking_uri!r} refused or did not answer ({e.message}); "
            "check MLFLOW_TRACKING_URI / tracking_uri= and that the server is running"
        ) from e


def _user_tags(spec: RunSpec) -> dict[str, str]:
    tags = {str(k): str(v)[:8000] for k, v in (spec.config.tags or {}).items()}
    tags.update(spec.own_tags)
    tags[LEASE_TAG] = lease.value()
    return tags


def _create(
    client: MlflowClient, spec: RunSpec, parent: str | None, default_experiment: str | None,
    before: Callable[[], None],
) -> Any:
    from mlflow.entities import Param
    from mlflow.tracking.context.registry import resolve_tags

    from mlflow_best._registry import ensure_registered_model

    cfg = spec.config
    if cfg.experiment is None and default_experiment is not None:
        experiment_id = default_experiment
    else:
        experiment_id = ensure_experiment(client, cfg.experiment)
    if cfg.registered_model:
        ensure_registered_model(client, cfg.registered_model)
    before()
    tags = _user_tags(spec)
    if parent is not None:
        tags["mlflow.parentRunId"] = parent  # a track block inside another: a child run
    # MLflow's own context tags (user, source file, git commit), as mlflow.start_run would set them.
    tags = resolve_tags(tags)
    run = client.create_run(experiment_id, run_name=cfg.run_name, tags=tags)
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in spec.params.items()])
    return run


def _join(
    client: MlflowClient, spec: RunSpec, run_id: str, experiment_id: str,
    before: Callable[[], None], claim: Callable[[Any], None],
) -> Any:
    """Track inside the user's active run: log params and tags into it; its owner ends it."""
    from mlflow.entities import RunTag

    from mlflow_best._registry import ensure_registered_model

    cfg = spec.config
    if cfg.resume is not None and cfg.resume != run_id:
        raise ConfigError(
            f"resume={cfg.resume!r} names another run than the active MLflow run {run_id} (started with "
            "mlflow.start_run()); track logs into the active run. Resume outside that `with` block, or "
            f"start it as mlflow.start_run(run_id={cfg.resume!r})"
        )
    if cfg.experiment is not None:
        found = client.get_experiment_by_name(cfg.experiment)
        if found is None or str(found.experiment_id) != str(experiment_id):
            raise ConfigError(
                f"experiment={cfg.experiment!r}, but the active MLflow run {run_id} belongs to "
                f"experiment id {experiment_id}; pass experiment=None to log into the active run, or "
                "call track outside the `with mlflow.start_run():` block"
            )
    if cfg.registered_model:
        ensure_registered_model(client, cfg.registered_model)
    before()
    run = client.get_run(run_id)
    claim(run)
    _log_new_params(client, spec, run, resumed=False)
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in _user_tags(spec).items()])
    return run


def _reopen(
    client: MlflowClient, spec: RunSpec, run_id: str, before: Callable[[], None], claim: Callable[[Any], None]
) -> tuple[Any, str]:
    from mlflow.exceptions import MlflowException

    from mlflow_best._registry import ensure_registered_model, is_missing

    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if not is_missing(e) and e.error_code != "INVALID_PARAMETER_VALUE":
            raise
        raise ConfigError(
            f"resume={run_id!r} is not a run in the tracking store at {spec.tracking_uri!r}; pass the "
            "run_id of an earlier run (printed as run.run_id), or resume=None to start a new run"
        ) from e
    claim(run)
    if spec.config.registered_model:
        ensure_registered_model(client, spec.config.registered_model)
    before()
    _log_new_params(client, spec, run, resumed=True)
    status = str(run.info.status)
    client.update_run(run_id, status="RUNNING")
    return run, status


def _log_new_params(client: MlflowClient, spec: RunSpec, run: Any, *, resumed: bool) -> None:
    """Log the params the run does not have yet; MLflow refuses to change a param's value."""
    from mlflow.entities import Param, RunTag

    known = run.data.params
    params = spec.params
    resume = spec.config.resume
    new = {k: v for k, v in params.items() if k not in known}
    # A param that holds the resume= value itself changes on every resume by design: not a warning.
    changed = sorted(
        k for k, v in params.items() if k in known and known[k] != v and not (resume and v == resume)
    )
    if changed:
        shown = ", ".join(f"{k}: {known[k][:40]!r} -> {params[k][:40]!r}" for k in changed[:10])
        doing = "resuming" if resumed else "joining"
        warnings.warn(
            f"mlflow_best: {doing} run {run.info.run_id} with different values for params ({shown}); "
            "MLflow keeps a param's first value, so the run shows the old ones. If they change the "
            "training, start a new run instead; otherwise log them as tags",
            RuntimeWarning,
            stacklevel=9,
        )
    tags = {**spec.own_tags, LEASE_TAG: lease.value()} if resumed else {}
    client.log_batch(
        run.info.run_id,
        params=[Param(k, v) for k, v in new.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )


def ensure_experiment(client: MlflowClient, name: str | None) -> str:
    """The id of experiment ``name`` (``MLFLOW_EXPERIMENT_NAME`` or Default when None), created if missing."""
    from mlflow.exceptions import MlflowException

    if name is None:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise ConfigError(
                f"experiment={name!r} is deleted in the tracking store; restore it in the MLflow UI or "
                "pass another experiment name"
            )
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name))
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        again = client.get_experiment_by_name(name)
        assert again is not None
        return str(again.experiment_id)
