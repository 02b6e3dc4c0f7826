"""Did this epoch improve, and is a checkpoint due? Pure functions of numbers: no MLflow, no filesystem."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from mlflow_best._errors import ConfigError

Mode = Literal["min", "max"]
MODES: tuple[Mode, ...] = ("min", "max")


@dataclass(frozen=True)
class Criterion:
    """The improvement rule: strictly better than ``best`` by more than ``min_delta``.

    NaN and ±inf never improve; the first finite value always does. The margin is compared exactly
    (no float rounding of ``best - min_delta``).
    """

    mode: Mode = "min"
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(
                f"mode={self.mode!r} is not a known mode; pass mode='min' when lower is better "
                "(a loss) or mode='max' when higher is better (an accuracy)"
            )
        if isinstance(self.min_delta, bool) or not isinstance(self.min_delta, (int, float)):
            raise ConfigError(f"min_delta={self.min_delta!r} is not a number; pass a float >= 0, e.g. 1e-4")
        if not math.isfinite(self.min_delta) or self.min_delta < 0:
            raise ConfigError(
                f"min_delta={self.min_delta!r} must be finite and >= 0; it is the margin an epoch must "
                "beat the best by, whatever the mode (e.g. min_delta=1e-4)"
            )

    def improves(self, value: float, best: float | None) -> bool:
        """Return True when ``value`` beats ``best`` (None: nothing finite seen yet)."""
        if not math.isfinite(value):
            return False
        if best is None:
            return True
        if not self.min_delta or not math.isfinite(best):
            return self.better(value, best)  # comparing two floats is exact
        # The margin in exact arithmetic: ``best - min_delta`` in floats rounds, and an epoch within
        # one ulp of that threshold would be judged against a threshold nobody set.
        gain = Fraction(best) - Fraction(value) if self.mode == "min" else Fraction(value) - Fraction(best)
        return gain > Fraction(self.min_delta)

    def better(self, a: float, b: float) -> bool:
        """Return True when ``a`` is strictly better than ``b`` under this mode (no margin)."""
        return a < b if self.mode == "min" else a > b


@dataclass
class Best:
    """The best epoch so far: its number, monitored value, and registered version once published."""

    epoch: int | None = None
    value: float | None = None
    version: str | None = None
    model_id: str | None = None


def decide(
    criterion: Criterion,
    value: float,
    best: float | None,
    epoch: int,
    last_saved: int | None,
    save_last_every: int,
) -> tuple[bool, bool]:
    """``(improved, last_due)`` for one epoch: a best checkpoint, else a rolling "last" one when due.

    ``last_saved`` is the epoch of the newest checkpoint of either kind (None: none yet);
    ``save_last_every`` is 0 when no "last" checkpoints are kept.
    """
    improved = criterion.improves(value, best)
    last_due = (
        not improved
        and save_last_every > 0
        and (last_saved is None or epoch - last_saved >= save_last_every)
    )
    return improved, last_due
