"""The training state saved beside the model (``training_state.pt``): its keys, written and read here only.

    {"epoch": int, "metrics": {name: float}, "optimizer": state_dict | None,
     "scheduler": state_dict | None, "scaler": state_dict | None,
     "rng": RNG states of rank 0, "rng_per_rank": [one per rank] (under torch.distributed only)}

``capture`` builds it when a checkpoint is taken; ``apply`` puts it back into the objects of a resumed
run or a restore. Everything in it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlflow_best._recipe import load_optimizer_state
from mlflow_best._state import apply_rng, capture_rng


def capture(
    epoch: int,
    metrics: Mapping[str, float],
    *,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    generators: Mapping[str, Any],
    rngs: list[Any] | None = None,
) -> dict[str, Any]:
    """The training state as of ``epoch``; ``rngs`` are every rank's RNG states under DDP."""
    training: dict[str, Any] = {
        "epoch": epoch,
        "metrics": dict(metrics),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rngs[0] if rngs else capture_rng(generators),
    }
    if rngs:
        training["rng_per_rank"] = rngs
    return training


def epoch_of(training: Mapping[str, Any], default: int | None = None) -> int:
    """The epoch a training state was captured at (``default`` for a state without one)."""
    if "epoch" not in training and default is not None:
        return default
    return int(training["epoch"])


def saved_optimizer(training: Mapping[str, Any]) -> Any:
    """The optimizer's saved ``state_dict``, or None."""
    return training.get("optimizer")


def apply(
    training: Mapping[str, Any],
    *,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    generators: Mapping[str, Any],
    source: str,
    rank: int = 0,
    rng: bool = True,
) -> None:
    """Load what was saved into the objects given (None: skipped); this rank's RNG states when ``rng``."""
    if optimizer is not None and training.get("optimizer") is not None:
        load_optimizer_state(optimizer, training["optimizer"], source=source)
    if scheduler is not None and training.get("scheduler") is not None:
        scheduler.load_state_dict(training["scheduler"])
    if scaler is not None and training.get("scaler") is not None:
        scaler.load_state_dict(training["scaler"])
    if not rng:
        return
    rngs = training.get("rng_per_rank") or [training.get("rng")]
    if rngs and rngs[min(rank, len(rngs) - 1)] is not None:
        apply_rng(rngs[min(rank, len(rngs) - 1)], generators)
