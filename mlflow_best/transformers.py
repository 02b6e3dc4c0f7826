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

Resume (exact, into the same MLflow run): the Trainer fixes the epochs to run from its own
``trainer_state.json`` before any callback is called, so ``resume=run_id`` goes with
``resume_from_checkpoint=`` set to the folder ``track.checkpoint_for(trainer)`` writes::

    track = TrackCallback(resume=run_id, save_last=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val, callbacks=[track])
    with track:
        trainer.train(resume_from_checkpoint=track.checkpoint_for(trainer))

``checkpoint_for`` loads the run's newest checkpoint (the one ``track(resume=)`` loads, after sending
what a killed process left unsent) and writes ``<output_dir>/mlflow_best/<run_id>/checkpoint-<step>``:
the weights (``trainer.save_model``), ``rng_state.pth`` (the checkpoint's RNG states, which the Trainer
puts back at the start of the first resumed epoch) and ``trainer_state.json`` with the global step
and epoch after the checkpoint's epoch, so the Trainer continues at ``run.start_epoch``. The optimizer,
scheduler and scaler states come from ``track(resume=)`` itself at ``on_train_begin`` (no
``optimizer.pt``). ``num_train_epochs`` counts all epochs, as in the uninterrupted run; ``save_last=True``
checkpoints every epoch, so the resume starts after the last completed one. Only with
``eval_strategy="epoch"`` and one process; ``on_train_begin`` raises ``ConfigError`` if the Trainer
does not start at ``run.start_epoch`` (e.g. ``resume=`` without ``resume_from_checkpoint=``). Without
a checkpoint in the run, ``checkpoint_for`` returns None and training starts at epoch 0.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

import mlflow
import numpy as np
import torch
import transformers
from mlflow import MlflowClient
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from mlflow_best import _training as train_state
from mlflow_best._adapter import Session, check_arguments
from mlflow_best._errors import ConfigError
from mlflow_best._recipe import load_model_state
from mlflow_best._replay import sync_staging
from mlflow_best._restore import latest_checkpoint
from mlflow_best._staging import StagingLock, staging_root
from mlflow_best._state import apply_rng, capture_rng, unwrap_model
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
            ``scheduler`` and ``scaler`` (taken from the Trainer), e.g. ``registered_model="sentiment",
            keep=3``; ``resume=run_id`` goes with ``train(resume_from_checkpoint=checkpoint_for(trainer))``.

    Attributes:
        run: the open ``mlflow_best.Run`` during ``train()``, else None; ``last_run`` keeps it after.

    Raises:
        ConfigError: an unknown or Trainer-owned argument or a bad value (here), ``report_to``
            including "mlflow" (at ``Trainer(..., callbacks=[track])``), and ``resume=`` without the
            checkpoint of ``checkpoint_for`` (at ``train()``).

    Example:
        >>> track = TrackCallback(registered_model="sentiment")  # doctest: +SKIP
        >>> trainer = Trainer(model, args, train_dataset=tr, callbacks=[track])  # doctest: +SKIP
        >>> with track:  # doctest: +SKIP
        ...     trainer.train()
        >>> mlflow_best.restore("models:/sentiment@best").model  # doctest: +SKIP
    """

    def __init__(self, **track_arguments: Any) -> None:
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

    def checkpoint_for(self, trainer: Trainer) -> str | None:
        """Write the Hugging Face checkpoint folder that makes ``trainer`` continue the ``resume=`` run.

        Pass the result to ``trainer.train(resume_from_checkpoint=...)`` (see the module docstring).
        The run's newest checkpoint is loaded into ``trainer.model`` and written as
        ``<output_dir>/mlflow_best/<run_id>/checkpoint-<global_step>`` (weights, ``rng_state.pth``,
        ``trainer_state.json``); the optimizer, scheduler and scaler are loaded by ``track(resume=)``.

        Returns:
            The folder, or None when the run has no checkpoint yet (training then starts at epoch 0).

        Raises:
            ConfigError: the callback has no ``resume=``, ``eval_strategy`` is not ``"epoch"``, or the
                Trainer runs in more than one process.
        """
        run_id = self._session.arguments.get("resume")
        if not run_id:
            raise ConfigError(
                "TrackCallback.checkpoint_for(trainer) needs the run to continue: pass "
                "TrackCallback(resume=run_id, ...)"
            )
        args = trainer.args
        if getattr(args.eval_strategy, "value", args.eval_strategy) != "epoch":
            raise ConfigError(
                f"TrackCallback(resume=...) needs TrainingArguments(eval_strategy='epoch') (got "
                f"{args.eval_strategy!r}): the checkpoints are per epoch, so the Trainer can continue "
                "only at an epoch boundary"
            )
        if args.world_size > 1:
            raise ConfigError(
                f"TrackCallback(resume=...) supports one process (world_size is {args.world_size}): the "
                "checkpoint holds the RNG states of one process"
            )
        tracking_uri = self._session.arguments.get("tracking_uri") or mlflow.get_tracking_uri()
        client = MlflowClient(tracking_uri=tracking_uri)
        # What track(resume=) loads at on_train_begin: first what a killed process left unsent.
        staging = staging_root(self._session.arguments.get("staging_dir")) / run_id
        lock = StagingLock(staging)
        lock.acquire(f"run {run_id} is still being tracked", "Stop the first copy of this job first")
        try:
            sync_staging(client, staging, quiet=True, resuming=True)
        finally:
            lock.release()
        found = latest_checkpoint(client, run_id)
        if found is None:
            return None
        model_state, training_state = found
        epochs_done = train_state.epoch_of(training_state) + 1
        steps = trainer.set_initial_training_values(args, trainer.get_train_dataloader())
        num_update_steps_per_epoch, max_steps = steps[1], steps[6]
        global_step = epochs_done * num_update_steps_per_epoch
        folder = Path(str(args.output_dir)) / "mlflow_best" / run_id / f"checkpoint-{global_step}"
        if folder.exists():
            shutil.rmtree(folder)
        if trainer.model is None:
            raise ConfigError("TrackCallback.checkpoint_for got a Trainer without a model; pass model=")
        source = f"the newest checkpoint of run {run_id}"
        load_model_state(unwrap_model(trainer.model), model_state, source=source)
        trainer.save_model(str(folder))
        _write_rng_state(folder / "rng_state.pth", training_state["rng"])
        state = TrainerState(
            epoch=float(epochs_done),
            global_step=global_step,
            max_steps=max_steps,
            num_train_epochs=math.ceil(args.num_train_epochs),
            train_batch_size=trainer._train_batch_size,
        )
        state.compute_steps(args, max_steps)  # type: ignore[no-untyped-call]
        state.save_to_json(str(folder / "trainer_state.json"))
        return str(folder)

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
        if self._session.arguments.get("resume") and _epoch_index(state.epoch) + 1 != run.start_epoch:
            starts_at = _epoch_index(state.epoch) + 1
            error = ConfigError(
                f"TrackCallback(resume={self._session.arguments['resume']!r}) continues run {run.run_id} at "
                f"epoch {run.start_epoch}, but the Trainer starts at epoch {starts_at}; call "
                "trainer.train(resume_from_checkpoint=track.checkpoint_for(trainer)) so it starts there"
            )
            self._session.close(error)
            raise error

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


def _write_rng_state(path: Path, rng: dict[str, Any]) -> None:
    """The checkpoint's RNG states in the Trainer's ``rng_state.pth`` format (``_load_rng_state``)."""
    now = capture_rng()
    apply_rng(rng)
    try:
        states: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cpu": torch.random.get_rng_state(),
        }
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.random.get_rng_state()
        torch.save(states, os.fspath(path))
    finally:
        apply_rng(now)


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
