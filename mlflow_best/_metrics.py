"""What ``log_epoch`` accepts: an increasing integral epoch and a mapping of names MLflow takes to numbers.

Pure checks, before anything of the epoch is queued: a name MLflow would refuse in the background,
or a value that is not a number, fails in the training loop where it can be fixed.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Mapping
from typing import Any

import torch

from mlflow_best._config import check_key
from mlflow_best._errors import MetricError


def check_epoch(epoch: Any, last_epoch: int | None) -> int:
    """``epoch`` as a plain int (a numpy integer from ``np.arange`` too), greater than ``last_epoch``."""
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
        raise MetricError(f"epoch={epoch!r} must be an int >= 0 (used as MLflow's step)")
    number: int = operator.index(epoch)
    if last_epoch is not None and number <= last_epoch:
        raise MetricError(
            f"epoch={number} was already logged (last logged: {last_epoch}); epochs must increase. "
            f"Loop with `for epoch in range(run.start_epoch, n)`"
        )
    return number


def check_metrics(metrics: Any, monitor: str, valid_keys: set[str]) -> dict[str, float]:
    """``metrics`` as name -> float, holding ``monitor``; names already checked are kept in ``valid_keys``."""
    if not isinstance(metrics, Mapping):
        raise MetricError(f"metrics must be a mapping of name -> number, got {type(metrics).__name__}")
    if monitor not in metrics:
        got = ", ".join(repr(k) for k in metrics) or "nothing"
        raise MetricError(
            f"monitor={monitor!r} is not in the metrics passed to log_epoch (got: {got}); pass it, "
            "or set monitor= to one of these"
        )
    values: dict[str, float] = {}
    for key, raw in metrics.items():
        if key not in valid_keys:
            # MLflow's own rules, checked before anything of this epoch is queued: a name it would
            # refuse in the background must not get that far (log the epoch again, renamed).
            check_key(key, "metric name")
            valid_keys.add(key)
        values[key] = to_float(key, raw)
    return values


def to_float(key: str, raw: Any) -> float:
    if isinstance(raw, torch.Tensor):
        if raw.numel() != 1:
            raise MetricError(
                f"metric {key!r} is a tensor of shape {tuple(raw.shape)}; pass a scalar (e.g. loss.item())"
            )
        return float(raw.detach().cpu().item())
    if isinstance(raw, bool) or not isinstance(raw, numbers.Real):
        raise MetricError(f"metric {key!r} is {raw!r} ({type(raw).__name__}), not a number; pass a float")
    try:
        return float(raw)
    except OverflowError as e:
        raise MetricError(f"metric {key!r} is {str(raw)[:40]}..., too large for a float; pass a float") from e
