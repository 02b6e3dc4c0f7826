"""What the framework adapters share: ``track`` arguments checked up front, one run opened and ended.

The adapters (``mlflow_best.lightning``, ``mlflow_best.transformers``) only translate a framework's
hooks into these calls; every decision (what improved, what is written, how a run ends) stays in
``track`` / ``Run``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

# The package is initialised before any adapter module is imported, so this is no import cycle.
from mlflow_best import track
from mlflow_best._errors import ConfigError
from mlflow_best._tracker import Run

# Taken from the trainer, never from the user: passing them too would track other objects than
# the ones being trained.
SUPPLIED = ("model", "optimizer", "scheduler", "scaler")
_NEED_THE_MODEL = ("model_args", "model_factory")


def check_arguments(arguments: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """``arguments`` for ``track``, validated now (a bad value fails here, before any training).

    Raises:
        ConfigError: an argument the trainer supplies, an unknown argument, or a bad value (except
            ``model_args`` / ``model_factory``, checked against the model when the run is opened).
    """
    accepted = [name for name in inspect.signature(track).parameters if name not in SUPPLIED]
    for name in arguments:
        if name in SUPPLIED:
            raise ConfigError(
                f"{owner}({name}=...) is taken from the trainer, which owns the {name} it trains; "
                f"remove {name}= from {owner}(...)"
            )
        if name not in accepted:
            raise ConfigError(
                f"{owner}({name}=...) is not an argument of mlflow_best.track (accepted: "
                f"{', '.join(accepted)}); remove it or fix its spelling"
            )
    # The same checks track() makes, on a stand-in model: nothing is opened or written. model_args and
    # model_factory are checked against the real model, when the trainer hands it over.
    track(torch.nn.Module(), None, **{k: v for k, v in arguments.items() if k not in _NEED_THE_MODEL})
    return dict(arguments)


class Session:
    """One ``track`` run driven by a framework's hooks: opened once, logged into, ended once.

    Args:
        arguments: the user's ``track`` arguments (see ``check_arguments``); they win over the
            defaults an adapter derives from the trainer (e.g. the HF ``metric_for_best_model``).
    """

    def __init__(self, arguments: Mapping[str, Any]) -> None:
        self.arguments = dict(arguments)
        self.run: Run | None = None

    def open(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scheduler: Any = None,
        scaler: Any = None,
        defaults: Mapping[str, Any] | None = None,
    ) -> Run:
        """Enter ``track(...)``: start (or, with ``resume=``, reopen and load) the run."""
        if self.run is not None:
            raise RuntimeError("the tracked run is already open; a trainer runs one fit at a time")
        kwargs = {**(defaults or {}), **self.arguments}
        run = track(model, optimizer, scheduler=scheduler, scaler=scaler, **kwargs)
        self.run = run.__enter__()
        return self.run

    def log(self, epoch: int, metrics: Mapping[str, Any]) -> bool:
        """``run.log_epoch``; False when no run is open (e.g. an evaluation outside training)."""
        if self.run is None:
            return False
        return self.run.log_epoch(epoch, metrics)

    def close(self, error: BaseException | None) -> None:
        """Leave the ``with`` block as if ``error`` was raised in it (None: a normal end)."""
        run, self.run = self.run, None
        if run is None:
            return
        if error is None:
            run.__exit__(None, None, None)
        else:
            run.__exit__(type(error), error, error.__traceback__)
