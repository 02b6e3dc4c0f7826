"""Rank-0 gating under ``torch.distributed``: one rank talks to MLflow, every rank agrees with it."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


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
