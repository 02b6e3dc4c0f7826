"""PyTorch Lightning adapter: ``mlflow_best.track`` as a ``lightning.pytorch.Callback``.

Install with ``pip install "mlflow-best[lightning]"``. ``import mlflow_best`` never imports Lightning;
only ``import mlflow_best.lightning`` does::

    from mlflow_best.lightning import TrackCallback

    trainer = L.Trainer(max_epochs=20, callbacks=[TrackCallback(monitor="val_loss", registered_model="m")])
    trainer.fit(module, datamodule=data)

How the hooks map onto the core:

* ``on_train_start`` opens ``track(...)`` with the LightningModule, ``trainer.optimizers[0]``, the
  scheduler of ``trainer.lr_scheduler_configs[0]`` and the precision plugin's ``GradScaler`` (if any);
  ``model_args`` defaults to the module's ``hparams`` (``save_hyperparameters()``) when they are
  JSON-able, so ``restore(ref)`` can rebuild the module with ``model=None``.
* Each epoch is logged with ``run.log_epoch(epoch, trainer.callback_metrics)`` at the first hook that
  sees the epoch complete: the next ``on_train_epoch_start``, or ``on_train_end`` for the last one.
  Not at ``on_validation_epoch_end``: Lightning computes the training epoch's metrics
  (``self.log(..., on_epoch=True)``) and steps ``ReduceLROnPlateau`` schedulers only after the
  validation, so they would be missing there and a checkpoint taken there would resume with the
  plateau step of that epoch lost. Sanity-check validation is never logged; an epoch is logged when
  a validation ran in it (or every epoch when there is no validation loop).
* The run is opened at ``on_train_start``, not ``on_fit_start``: Lightning creates the first
  epoch's DataLoader iterator (which draws from the torch RNG) between the two, so the resumed RNG
  state must be put back after it for the data order to repeat exactly.
* ``on_fit_end`` ends the run FINISHED; ``on_exception`` ends it FAILED (``KeyboardInterrupt``: KILLED),
  with the best checkpoint kept.
* ``resume=run_id`` loads the run's newest checkpoint into the module, optimizer, scheduler, scaler
  and RNG, and sets the fit loop's epoch counters to ``run.start_epoch`` so Lightning continues
  there (``max_epochs`` counts all epochs, as in the uninterrupted fit). ``trainer.global_step``
  restarts at 0: it is not in the checkpoint (it only matters for ``max_steps`` and logger steps).
  Do not pass ``ckpt_path=`` to ``fit`` as well.

With several optimizers or schedulers (e.g. a GAN), only the first of each is checkpointed (a
warning says so); the others are trained as usual but not restored. Under DDP every rank runs the
callback and the core lets only global rank 0 talk to MLflow. Lightning's own checkpoints are
independent of this callback: ``Trainer(enable_checkpointing=False)`` turns them off.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import lightning.pytorch as pl

from mlflow_best._adapter import Session, check_arguments
from mlflow_best._errors import ConfigError
from mlflow_best._tracker import Run

__all__ = ["TrackCallback"]


class TrackCallback(pl.Callback):
    """Track a Lightning fit with ``mlflow_best.track``: best checkpoints registered, exact resume.

    Args:
        **track_arguments: any argument of ``mlflow_best.track`` except ``model``, ``optimizer``,
            ``scheduler`` and ``scaler``, which are taken from the trainer (e.g. ``monitor="val_loss",
            mode="min", registered_model="digits", resume=run_id, save_last=True``).

    Attributes:
        run: the open ``mlflow_best.Run`` during the fit, else None; ``last_run`` keeps it after.

    Raises:
        ConfigError: an unknown or trainer-owned argument, or a bad value (at construction).

    Example:
        >>> cb = TrackCallback(monitor="val_acc", mode="max", registered_model="digits")  # doctest: +SKIP
        >>> L.Trainer(max_epochs=10, callbacks=[cb]).fit(module, data)  # doctest: +SKIP
        >>> mlflow_best.restore("models:/digits@best", model=MyModule())  # doctest: +SKIP
    """

    def __init__(self, **track_arguments: Any) -> None:
        super().__init__()
        self._session = Session(check_arguments(track_arguments, "TrackCallback"))
        self.last_run: Run | None = None
        self._ended: int | None = None  # the last epoch whose on_train_epoch_end has run
        self._validated: int | None = None  # the last epoch in which a (non sanity-check) validation ran

    @property
    def run(self) -> Run | None:
        return self._session.run

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._session.arguments.get("resume") and trainer.ckpt_path:
            raise ConfigError(
                f"TrackCallback(resume={self._session.arguments['resume']!r}) and "
                f"trainer.fit(ckpt_path={trainer.ckpt_path!r}) both resume; pass only resume= "
                "(it restores the RNG too) or only ckpt_path="
            )
        optimizers = trainer.optimizers
        configs = trainer.lr_scheduler_configs
        if len(optimizers) > 1 or len(configs) > 1:
            warnings.warn(
                f"mlflow_best: the module has {len(optimizers)} optimizers and {len(configs)} LR schedulers; "
                "TrackCallback checkpoints and restores only the first of each (trainer.optimizers[0], "
                "trainer.lr_scheduler_configs[0].scheduler)",
                RuntimeWarning,
                stacklevel=2,
            )
        self._ended = self._validated = None
        run = self._session.open(
            pl_module,
            optimizers[0] if optimizers else None,
            scheduler=configs[0].scheduler if configs else None,
            scaler=getattr(trainer.precision_plugin, "scaler", None),
            defaults=_model_args(pl_module),
        )
        self.last_run = run
        if run.start_epoch:
            _continue_at(trainer, run.start_epoch)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated = trainer.current_epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ended = trainer.current_epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_ended_epoch(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_ended_epoch(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._session.close(None)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._session.close(exception)

    def _log_ended_epoch(self, trainer: pl.Trainer) -> None:
        epoch, self._ended = self._ended, None
        if epoch is None or (trainer.enable_validation and self._validated != epoch):
            return
        # The core turns 0-d tensors into floats and names any metric that is not a number.
        self._session.log(epoch, dict(trainer.callback_metrics))


def _model_args(module: pl.LightningModule) -> dict[str, Any]:
    hparams = dict(module.hparams)
    if not hparams:
        return {}
    try:
        json.dumps(hparams, allow_nan=False)
    except (TypeError, ValueError):
        return {}  # restore(model=...) still works; only the rebuild from the record needs them
    return {"model_args": hparams}


def _continue_at(trainer: pl.Trainer, epoch: int) -> None:
    """Make the fit loop start at ``epoch``, as if that many epochs had completed in this process."""
    done = dict.fromkeys(("ready", "started", "processed", "completed"), epoch)
    trainer.fit_loop.epoch_progress.load_state_dict({"total": done, "current": dict(done)})


