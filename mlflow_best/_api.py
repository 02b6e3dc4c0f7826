"""``track``: the public entry point; its arguments are checked into a ``TrackConfig``, a ``Run`` returned.

Importing this module imports neither torch nor MLflow: ``import mlflow_best`` stays cheap, and the
``Run`` (and with it torch) is imported when ``track`` is called.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mlflow_best._config import TrackConfig
from mlflow_best._criterion import Mode

if TYPE_CHECKING:
    import torch

    from mlflow_best._tracker import Run


def track(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    monitor: str = "val_loss",
    mode: Mode = "min",
    experiment: str | None = None,
    registered_model: str | None = None,
    alias: str | None = "best",
    min_delta: float = 0.0,
    scheduler: Any = None,
    scaler: Any = None,
    model_args: dict[str, Any] | None = None,
    model_factory: Callable[..., torch.nn.Module] | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    run_name: str | None = None,
    resume: str | None = None,
    tracking_uri: str | None = None,
    keep: int | None = None,
    save_last: bool | int = False,
    generators: Mapping[str, torch.Generator] | None = None,
    staging_dir: str | None = None,
    verbose: bool | None = None,
    offline_timeout: float = 60.0,
    input_example: Any = None,
    code_paths: Sequence[str | os.PathLike[str]] | None = None,
) -> Run:
    """Track a training run in MLflow and keep its best checkpoints; use as ``with track(...) as run``.

    Every ``run.log_epoch(epoch, metrics)`` logs the epoch's metrics (one batched call, step=epoch).
    When ``monitor`` improves, the full training state is copied to CPU memory and, in the
    background, written atomically, logged as an MLflow LoggedModel and registered as a version of
    ``registered_model``; ``alias`` moves to it if it is the best version across all runs. Every
    checkpoint is also an MLflow model (``mlflow.pyfunc.load_model``, ``mlflow models serve``).

    Args:
        model: the model (DDP / ``torch.compile`` wrappers are unwrapped for the state_dict).
        optimizer: its optimizer; saved and restored with the model.
        monitor: the metric that decides, as passed to ``log_epoch``.
        mode: "min" (lower is better) or "max".
        experiment: MLflow experiment name, created if missing (None: ``MLFLOW_EXPERIMENT_NAME`` or Default).
        registered_model: registry name to register improvements as versions of (None: register nothing).
        alias: registry alias moved to the best version (None: leave aliases alone).
        min_delta: an epoch improves only when better than the best by more than this.
        scheduler: an LR scheduler whose state is checkpointed.
        scaler: a ``torch.amp.GradScaler`` whose state is checkpointed.
        model_args: JSON-able keyword arguments of the model's class (or of ``model_factory``), so
            ``restore`` can rebuild it without ``model=``; checked against the signature here.
        model_factory: a module-level function (or class) that builds the model from ``model_args``,
            for models made by builders such as ``torchvision.models.resnet18(num_classes=10)``;
            recorded by its import path. Lambdas and nested functions are refused.
        params: extra run params. tags: extra run tags. run_name: the MLflow run name.
        resume: a run id: reopen that run, load its latest checkpoint (weights, optimizer, scheduler,
            scaler, RNG) into the given objects, and continue at ``run.start_epoch``.
        tracking_uri: the MLflow tracking URI (None: MLflow's own, e.g. ``MLFLOW_TRACKING_URI``).
        keep: keep only the files of the N best checkpoints (None: keep all).
        save_last: also keep a rolling "last" checkpoint every N epochs (True: every epoch), never
            registered; ``resume`` uses it, and it is written when the block raises.
        generators: named ``torch.Generator`` objects (e.g. a DataLoader's) saved and restored with RNG.
        staging_dir: local folder for checkpoints before upload (default ``$MLFLOW_BEST_HOME/runs``).
        verbose: print a line per epoch and a summary (None: only when stdout is a terminal).
        offline_timeout: at exit, how long to keep retrying an unreachable server before giving up
            and raising ``UnsentError`` (everything stays on disk for ``sync``).
        input_example: a batch the model accepts (numpy array, DataFrame, tensor, or dict of arrays
            for several inputs): the signature is inferred from it once, here, and recorded on
            every version, so the UI shows the schema and serving validates input.
        code_paths: files or folders shipped in every version under ``code/`` (as MLflow's
            ``log_model(code_paths=...)``), so the model class imports where it is served.

    Returns:
        A ``Run`` context manager.

    Raises:
        ConfigError: a bad argument (raised here, before any run is started).
        TrackingStoreError: on entering the block, when the tracking store cannot be reached.
    """
    from mlflow_best._recipe import factory_path
    from mlflow_best._tracker import Run

    config = TrackConfig(
        monitor=monitor,
        mode=mode,
        min_delta=min_delta,
        experiment=experiment,
        registered_model=registered_model,
        alias=alias,
        model_args=model_args,
        model_factory=None if model_factory is None else factory_path(model_factory),
        params=params,
        tags=tags,
        run_name=run_name,
        resume=resume,
        tracking_uri=tracking_uri,
        keep=keep,
        save_last=save_last,
        staging_dir=staging_dir,
        verbose=verbose,
        offline_timeout=offline_timeout,
    )
    _check_objects(model, optimizer, scheduler, scaler, generators)
    return Run(
        model,
        optimizer,
        config,
        scheduler=scheduler,
        scaler=scaler,
        generators=generators,
        model_factory=model_factory,
        input_example=input_example,
        code_paths=code_paths,
    )


def _check_objects(model: Any, optimizer: Any, scheduler: Any, scaler: Any, generators: Any) -> None:
    """The training objects are what ``track`` saves and restores: refused here when they cannot be."""
    import torch

    from mlflow_best._errors import ConfigError

    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model={type(model).__name__} must be a torch.nn.Module")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer={type(optimizer).__name__} must be a torch.optim.Optimizer or None")
    for name, obj in (("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None and not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise ConfigError(f"{name}={type(obj).__name__} has no state_dict/load_state_dict; pass None")
    if generators is not None and not all(isinstance(g, torch.Generator) for g in generators.values()):
        raise ConfigError("generators= must map names to torch.Generator objects, e.g. {'loader': g}")
