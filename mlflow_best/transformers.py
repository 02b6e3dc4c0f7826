"""Hugging Face ``Trainer`` adapter: ``mlflow_best.track`` as a ``transformers.TrainerCallback``.

Install with ``pip install "mlflow-best[transformers]"``. ``import mlflow_best`` never imports
transformers; only ``import mlflow_best.transformers`` does::

    from mlflow_best.transformers import TrackCallback

    track = TrackCallback(registered_model="sentiment")
    args = TrainingArguments("out", eval_strategy="epoch", save_strategy="no", report_to="none")
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val, callbacks=[track])
    with track:  # so that the run ends FAILED if train() raises (the Trainer calls no callback then)
        trainer.train()

How the hooks map onto the core:

* ``on_train_begin`` opens ``track(...)`` with the model, the optimizer the Trainer made (unwrapped
  from accelerate's ``AcceleratedOptimizer``, so the plain ``torch.optim.AdamW`` and its two parameter
  groups are recorded) and its LR scheduler. The model is recorded as ``model_factory=from_config``
  with ``model_args={"architecture": "BertForSequenceClassification", "config": {...}}``, so
  ``mlflow_best.restore(ref)`` with ``model=None`` rebuilds it from its config: nothing is downloaded.
* ``on_evaluate`` is the epoch boundary: ``run.log_epoch(index, metrics)`` with the evaluation's
  metrics (and the latest training logs, e.g. ``loss``). The index is the epoch (0, 1, ...) when
  ``eval_strategy="epoch"`` (the Trainer's ``state.epoch`` is a float: 1.0 after the first epoch),
  else the global step. An evaluation outside ``train()`` or at an index already logged (e.g. the
  second of several eval datasets) is not logged.
* The monitor defaults to ``"eval_" + args.metric_for_best_model`` (the Trainer prefixes ``eval_``)
  and the mode to ``args.greater_is_better``; without them, ``eval_loss``, "min". ``monitor=`` and
  ``mode=`` passed to the callback win.
* ``on_train_end`` ends the run FINISHED. When ``train()`` raises, the Trainer calls no callback:
  use the callback as a context manager around ``train()`` and its ``__exit__`` ends the run FAILED
  (KILLED for ``KeyboardInterrupt``). Without the ``with``, a warning at the start says so.
* One MLflow run: with ``"mlflow"`` in ``args.report_to`` (``report_to="all"`` includes it when mlflow
  is installed), transformers' own ``MLflowCallback`` would start a second run and log every
  checkpoint; ``Trainer(...)`` (through ``on_init_end``) raises ``ConfigError`` asking for
  ``report_to="none"``.

``resume=`` is refused for now: the Trainer fixes the epochs to run (from its own
``trainer_state.json``) before any callback is called, so a callback cannot make it continue at
``run.start_epoch``. Restoring weights and optimizer works as everywhere (``restore(ref)``).
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from types import TracebackType
from typing import Any

import torch
import transformers
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from mlflow_best._adapter import Session, check_arguments
from mlflow_best._errors import ConfigError
from mlflow_best._tracker import Run

__all__ = ["TrackCallback", "from_config"]


def from_config(architecture: str, config: dict[str, Any]) -> torch.nn.Module:
    """Build a ``transformers`` model class from a config dict, with random weights; never downloads.

    The model factory ``TrackCallback`` records, so ``restore(ref)`` can rebuild the model with
    ``model=None`` (and then load the checkpoint's weights into it).

    Args:
        architecture: the class name, looked up only as an attribute of the ``transformers`` package
            (e.g. ``"BertForSequenceClassification"``).
        config: ``model.config.to_dict()`` as recorded (JSON).

    Returns:
        ``cls(cls.config_class.from_dict(config))``.

    Raises:
        ConfigError: transformers is not imported, or ``architecture`` is not a ``PreTrainedModel``
            class of the transformers package, or ``config`` is not a dict.
    """
    if "transformers" not in sys.modules:
        raise ConfigError(
            "from_config needs transformers imported in this process (it builds the recorded "
            "architecture from its config); `import transformers` (or mlflow_best.transformers) first"
        )
    cls = getattr(transformers, architecture, None) if isinstance(architecture, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ConfigError(
            f"architecture={architecture!r} is not a PreTrainedModel class of the transformers package "
            f"(version {transformers.__version__}); pass a class name such as "
            "'BertForSequenceClassification', or pass model= an instance to restore"
        )
    if not isinstance(config, dict):
        raise ConfigError(f"config={config!r} must be the dict of model.config.to_dict()")
    config_class = cls.config_class
    if config_class is None:
        raise ConfigError(
            f"architecture={architecture!r} declares no config_class, so it cannot be built from a config; "
            "pass model= an instance to restore"
        )
    model: torch.nn.Module = cls(config_class.from_dict(config))
    return model


class TrackCallback(TrainerCallback):
    """Track ``Trainer.train()`` with ``mlflow_best.track``: best checkpoints registered, restorable.

    Args:
        **track_arguments: any argument of ``mlflow_best.track`` except ``model``, ``optimizer``,
            ``scheduler`` and ``scaler`` (taken from the Trainer) and ``resume`` (see the module
            docstring), e.g. ``registered_model="sentiment", keep=3``.

    Attributes:
        run: the open ``mlflow_best.Run`` during ``train()``, else None; ``last_run`` keeps it after.

    Raises:
        ConfigError: an unknown or Trainer-owned argument, ``resume=``, or a bad value (here), and
            ``report_to`` including "mlflow" (at ``Trainer(..., callbacks=[track])``).

    Example:
        >>> track = TrackCallback(registered_model="sentiment")  # doctest: +SKIP
        >>> trainer = Trainer(model, args, train_dataset=tr, callbacks=[track])  # doctest: +SKIP
        >>> with track:  # doctest: +SKIP
        ...     trainer.train()
        >>> mlflow_best.restore("models:/sentiment@best").model  # doctest: +SKIP
    """

    def __init__(self, **track_arguments: Any) -> None:
        if track_arguments.get("resume") is not None:
            raise ConfigError(
                f"TrackCallback(resume={track_arguments['resume']!r}) is not supported with the Hugging Face "
                "Trainer: it fixes the epochs to run before any callback is called, so it cannot continue "
                "at the checkpoint's epoch. Remove resume=; restore the weights with mlflow_best.restore(ref)"
            )
        self._session = Session(check_arguments(track_arguments, "TrackCallback"))
        self.last_run: Run | None = None
        self._entered = False
        self._last_index: int | None = None
        self._train_logs: dict[str, float] = {}

    @property
    def run(self) -> Run | None:
        return self._session.run

    def __enter__(self) -> TrackCallback:
        self._entered = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._entered = False
        # After a normal train() the run is already ended by on_train_end, and this does nothing.
        self._session.close(exc)

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # At Trainer(...): transformers' MLflowCallback starts its run in on_train_begin, before ours.
        _refuse_mlflow_reporting(args)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        _refuse_mlflow_reporting(args)
        if model is None:
            raise ConfigError("TrackCallback got no model from the Trainer; pass model= to Trainer(...)")
        if not self._entered:
            warnings.warn(
                "mlflow_best: TrackCallback is not used as `with track: trainer.train()`; if train() raises, "
                "the Trainer calls no callback and the MLflow run stays RUNNING. Wrap train() in the "
                "callback's with block",
                RuntimeWarning,
                stacklevel=2,
            )
        self._last_index = None
        self._train_logs = {}
        run = self._session.open(
            model,
            _unwrap(optimizer, "optimizer"),
            scheduler=_unwrap(lr_scheduler, "scheduler"),
            defaults={**_monitor(args), **_recipe(model)},
        )
        self.last_run = run

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        for key, value in (logs or {}).items():
            if key != "epoch" and not key.startswith("eval_") and isinstance(value, (int, float)):
                self._train_logs[key] = float(value)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self._session.run is None or not metrics:
            return
        by_epoch = getattr(args.eval_strategy, "value", args.eval_strategy) == "epoch"
        index = _epoch_index(state.epoch) if by_epoch else int(state.global_step)
        if index < 0 or (self._last_index is not None and index <= self._last_index):
            return
        self._last_index = index
        values = {**self._train_logs, **{k: v for k, v in metrics.items() if k != "epoch"}}
        self._session.log(index, values)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._session.close(None)


def _refuse_mlflow_reporting(args: TrainingArguments) -> None:
    reporting = list(args.report_to or [])
    if "mlflow" in reporting:
        raise ConfigError(
            f"TrainingArguments(report_to={reporting!r}) includes 'mlflow': transformers' MLflowCallback "
            "would start a second MLflow run beside TrackCallback's and log every checkpoint. Pass "
            'report_to="none" (or a list without "mlflow") to TrainingArguments'
        )


def _epoch_index(epoch: float | None) -> int:
    """The epoch an evaluation ran in: state.epoch is 1.0 (or 0.9999999) after the first epoch."""
    if epoch is None:
        return -1
    return math.ceil(epoch - 1e-6) - 1


def _unwrap(obj: Any, attr: str) -> Any:
    """accelerate's ``AcceleratedOptimizer.optimizer`` / ``AcceleratedScheduler.scheduler``."""
    while obj is not None and getattr(obj, attr, None) is not None and getattr(obj, attr) is not obj:
        obj = getattr(obj, attr)
    return obj


def _monitor(args: TrainingArguments) -> dict[str, Any]:
    name = args.metric_for_best_model
    if not name:
        return {"monitor": "eval_loss", "mode": "min"}
    monitor = name if name.startswith("eval_") else f"eval_{name}"
    greater = args.greater_is_better
    if greater is None:  # the Trainer's own rule when it is not set
        greater = not monitor.endswith("loss")
    return {"monitor": monitor, "mode": "max" if greater else "min"}


def _recipe(model: torch.nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if getattr(transformers, type(model).__name__, None) is not type(model) or config is None:
        return {}  # not a class of the transformers package: the core records its class as usual
    # Through JSON: the recorded args must be JSON (torch dtypes and int label keys become strings).
    as_json = json.loads(config.to_json_string(use_diff=False))
    return {
        "model_factory": from_config,
        "model_args": {"architecture": type(model).__name__, "config": as_json},
    }
