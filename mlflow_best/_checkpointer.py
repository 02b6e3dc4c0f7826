"""Taking a checkpoint: the state copied into the snapshot pool, described for its manifest, handed off.

``Run.log_epoch`` decides *whether* (policy, ``_criterion``); this module does the taking, in the
training thread and in microseconds to milliseconds: the copy into reused CPU buffers, the journal
item, the manifest's metadata (how to rebuild model and optimizer, versions). Writing and uploading
happen in the pipeline's threads (``_writer``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mlflow_best import _training as training
from mlflow_best._checkpoint import CheckpointId
from mlflow_best._config import TrackConfig
from mlflow_best._errors import CheckpointError
from mlflow_best._recipe import OptimizerRecipe, class_path, model_recipe
from mlflow_best._staging import CHECKPOINTS, CheckpointOp
from mlflow_best._state import SnapshotPool, unwrap_model
from mlflow_best._version import __version__
from mlflow_best._writer import Pipeline


class Checkpointer:
    """Takes checkpoints of one run's model, optimizer, scheduler, scaler and RNG states."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scheduler: Any,
        scaler: Any,
        generators: Mapping[str, torch.Generator],
        config: TrackConfig,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.generators = generators
        self.config = config
        self._optimizer_recipe = OptimizerRecipe(model)
        self._pool = SnapshotPool(slots=2)

    def take(
        self,
        pipeline: Pipeline,
        staging_dir: Path,
        run_id: str,
        epoch: int,
        values: dict[str, float],
        kind: str,
        rngs: list[Any] | None,
    ) -> None:
        """Copy the state as of ``epoch`` and queue its checkpoint (``CheckpointError``: not copyable)."""
        cfg = self.config
        value = values[cfg.monitor]
        # Every "last" gets its own folder too: the upload of one may still be reading its files
        # while the next one is written, and a shared folder would be replaced under it.
        name = CheckpointId("best" if kind == "best" else "last", epoch, cfg.monitor, value).name
        folder = staging_dir / CHECKPOINTS / name
        try:
            state = training.capture(
                epoch, values, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                generators=self.generators, rngs=rngs,
            )
            snapshot = self._pool.take(unwrap_model(self.model).state_dict(), state)
        except Exception as e:
            raise CheckpointError(
                f"could not copy the training state of epoch {epoch} for its checkpoint ({type(e).__name__}: "
                f"{str(e)[:200]}); run.best is unchanged. A model on the 'meta' device has no data to "
                "save: move it to a real device (model.to_empty(device=...) and load weights) first"
            ) from e
        op = CheckpointOp(
            seq=pipeline.journal.next_seq(),
            epoch=epoch,
            metrics=values,
            timestamp_ms=int(time.time() * 1000),
            kind="best" if kind == "best" else "last",
            name=name,
            value=value,
            folder=str(folder),
        )
        pipeline.submit_checkpoint(op, snapshot, self._meta(run_id, epoch, value, values, kind))

    def _meta(
        self, run_id: str, epoch: int, value: float, values: dict[str, float], kind: str
    ) -> dict[str, Any]:
        """What the manifest says besides its files: the checkpoint's identity and how to rebuild it."""
        import mlflow

        net = unwrap_model(self.model)
        opt = self.optimizer
        return {
            "kind": kind,
            "epoch": epoch,
            "monitor": self.config.monitor,
            "mode": self.config.mode,
            "value": value,
            "metrics": values,
            "run_id": run_id,
            "model": model_recipe(net, self.config.model_factory, self.config.model_args),
            "optimizer": None if opt is None else self._optimizer_recipe(opt),
            "scheduler": None if self.scheduler is None else {"class": class_path(self.scheduler)},
            "scaler": self.scaler is not None,
            "versions": {
                "mlflow_best": __version__,
                "torch": torch.__version__,
                "mlflow": mlflow.__version__,
                "python": sys.version.split()[0],
            },
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
