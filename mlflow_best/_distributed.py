"""Rank-0 gating under ``torch.distributed``: one rank talks to MLflow, every rank agrees with it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from mlflow_best import _errors


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a no-op outside distributed training)."""
    if not active():
        return value
    box = [value if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (small objects only: RNG states, flags)."""
    if not active():
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def from_leader(work: Callable[[], Any], what: str) -> Any:
    """Rank 0 runs ``work()`` and every rank gets its result; when it raises, every rank raises.

    The other ranks wait in the broadcast for rank 0: if rank 0 failed they must fail too, with its
    reason (as one of our error types, a ``TrackingStoreError`` for anything else), not wait forever.
    """
    result: Any = None
    failure: BaseException | None = None
    if rank() == 0:
        try:
            result = work()
        except BaseException as e:
            failure = e
    if not active():
        if failure is not None:
            raise failure
        return result
    message = {"error": (type(failure).__name__, str(failure))} if failure is not None else {"result": result}
    message = broadcast(message)
    if failure is not None:
        raise failure
    if "error" in message:
        name, text = message["error"]
        found = getattr(_errors, name, None)
        cls: type[_errors.MlflowBestError] = _errors.TrackingStoreError
        if isinstance(found, type) and issubclass(found, _errors.MlflowBestError):
            cls = _errors.TrackingStoreError if found is _errors.UnsentError else found
        raise cls(f"rank 0 could not {what}, so rank {rank()} stops too ({name}: {text})")
    return message["result"]


def raise_if_any(problem: _errors.MetricError | None) -> None:
    """Under ``torch.distributed`` a bad metric on any rank stops every rank, before the next collective."""
    if active():
        problems = gather(None if problem is None else str(problem))
        bad = [(r, text) for r, text in enumerate(problems) if text is not None]
        if bad:
            raise _errors.MetricError(f"rank {bad[0][0]}: {bad[0][1]}") from problem
    if problem is not None:
        raise problem
