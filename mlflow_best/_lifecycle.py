"""MLflow's fluent run stack and active experiment: the only place that touches MLflow's private APIs.

``track`` makes its run the active fluent run inside the block (so the user's ``mlflow.log_*`` land
in it), joins a run the user started with ``mlflow.start_run()``, and nests a child run when a
``track`` block is opened inside another one.
"""

from __future__ import annotations

import threading
from typing import Any

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
