"""Resolve a reference, download (cached by sha256), verify, load safely, rebuild, map to a device."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mlflow_best import _training as train_state
from mlflow_best._cache import Seal
from mlflow_best._checkpoint import (
    MANIFEST,
    MODEL_FILE,
    TRAINING_FILE,
    Manifest,
    TorchFile,
    load_verified,
    open_checkpoint,
)
from mlflow_best._config import home
from mlflow_best._download import _evict, fetch
from mlflow_best._errors import (
    CheckpointError,
    ConfigError,
    UnsafeCheckpointError,
)
from mlflow_best._reach import bounded_http, probe
from mlflow_best._recipe import (
    load_model_state,
    plan_model,
    rebuild_optimizer,
)
from mlflow_best._resolve import Source, check_identity, resolve, resolve_run
from mlflow_best._state import unwrap_model
from mlflow_best._tags import TAG

if TYPE_CHECKING:
    from mlflow import MlflowClient



@dataclass
class Restored:
    """What ``restore`` returns: live objects on the requested device plus where they came from.

    Attributes:
        model: the model with the checkpoint's weights, on ``device``.
        optimizer: the optimizer with its state on ``device`` (None if none was saved or given).
        scheduler: the given scheduler with its state loaded (None if not given).
        scaler: the given GradScaler with its state loaded (None if not given).
        epoch: the epoch the checkpoint was taken after.
        metrics: that epoch's metrics.
        run_id: the MLflow run that logged it.
        version: the registered model version, when the reference went through the registry or the
            run's best is registered.
        model_id: the MLflow LoggedModel id (None for a "last" checkpoint).
        path: the verified local folder it was loaded from.
        manifest: the checkpoint's manifest (classes, model_args, sha256 of each file, versions).
        training_state: the raw training state (optimizer / scheduler / scaler / RNG state dicts), on the CPU.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    scheduler: Any
    scaler: Any
    epoch: int
    metrics: dict[str, float]
    run_id: str | None
    version: str | None
    model_id: str | None
    path: Path
    manifest: dict[str, Any] = field(repr=False)
    training_state: dict[str, Any] = field(repr=False)


def restore(
    ref: str,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    *,
    device: str | torch.device = "cpu",
    tracking_uri: str | None = None,
    restore_rng: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    model_factory: Any = None,
    trust_code: bool = False,
) -> Restored:
    """Load a checkpoint logged by ``track`` into live objects on ``device``.

    Args:
        ref: a run id or ``runs:/<run_id>`` (that run's best checkpoint), ``models:/<name>/<version>``,
            ``models:/<name>@<alias>``, ``models:/<logged model id>``, or a local checkpoint folder.
        model: load into this model; None rebuilds it from the recorded class and ``model_args``.
        optimizer: load into this optimizer; None rebuilds it from the recorded class and defaults.
        scheduler: an LR scheduler to load the saved state into (optional).
        scaler: a ``torch.amp.GradScaler`` to load the saved state into (optional).
        device: where the model and the optimizer state end up ("cpu", "cuda", "cuda:1", ...).
        tracking_uri: the MLflow tracking URI; None uses MLflow's own (``MLFLOW_TRACKING_URI``).
        restore_rng: also put back the torch / CUDA / numpy / Python RNG states of that epoch.
        cache_dir: the download cache (default ``$MLFLOW_BEST_HOME/cache``); keyed by sha256.
        generators: with ``restore_rng``, named ``torch.Generator`` objects (as passed to
            ``track(generators=...)``, e.g. a DataLoader's) to put the saved states back into.
        model_factory: the factory the model was built with (``track(model_factory=...)``), to call
            it even when it has no ``-> nn.Module`` return annotation.
        trust_code: call the recorded factory on the checkpoint's word (Hugging Face's
            ``trust_remote_code`` convention); off by default. Nothing is ever imported either way:
            the module that defines the model must already be imported (``import mymodels``).

    Returns:
        A ``Restored`` with ``model``, ``optimizer``, ``scheduler``, ``scaler``, ``epoch``,
        ``metrics``, ``run_id``, ``version``.

    Raises:
        CheckpointNotFoundError: unknown run, model, version or alias, or a run without checkpoint.
        CheckpointError: a checksum mismatch, a truncated, missing or foreign file.
        UnsafeCheckpointError: a file that would need code execution to load.
        ArchitectureMismatchError: the weights do not fit ``model``.
        ConfigError: a device that is not a torch device or not on this machine (the message lists
            the ones that are), or ``model=None`` when the model cannot be rebuilt.
        TrackingStoreError: the tracking store refused a call, or did not answer at all (within
            seconds, naming the URI: MLflow's own retries are bounded for the call).

    Example:
        >>> r = mlflow_best.restore("models:/digits-mlp@best", device="cuda:0")  # doctest: +SKIP
        >>> r.model.eval(); r.epoch, r.metrics["val_loss"]  # doctest: +SKIP
    """
    target = _device(device)
    cache = Path(cache_dir) if cache_dir else home() / "cache"
    with bounded_http():
        return _restore(ref, model, optimizer, scheduler, scaler, target, tracking_uri, restore_rng, cache,
                        generators, model_factory, trust_code)


def _restore(
    ref: str,
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    scaler: Any,
    target: torch.device,
    tracking_uri: str | None,
    restore_rng: bool,
    cache: Path,
    generators: Mapping[str, torch.Generator] | None,
    model_factory: Any,
    trust_code: bool,
) -> Restored:
    import mlflow
    from mlflow import MlflowClient

    client: MlflowClient | None = None
    if isinstance(ref, os.PathLike) or (isinstance(ref, str) and Path(ref).is_dir()):
        folder = Path(ref)
        source = Source(artifact_uri=str(folder), sha256=None, run_id=None)
    elif isinstance(ref, str) and Path(ref).is_file():
        raise CheckpointError(
            f"{ref} is a single file, not an mlflow_best checkpoint (a folder with {MANIFEST}, {MODEL_FILE} "
            f"and {TRAINING_FILE}); it may come from torch.save or another library (e.g. a Lightning .ckpt). "
            "restore reads only what mlflow_best.track wrote; load a bare state_dict with "
            "model.load_state_dict(torch.load(path, weights_only=True))"
        )
    else:
        uri = tracking_uri or mlflow.get_tracking_uri()
        probe(uri)
        client = MlflowClient(tracking_uri=uri)
        source = resolve(client, ref)
        folder = fetch(client, source, cache)
    try:
        loaded = _load_checkpoint(
            folder, source, target, model, model_factory, trust_code, cached=folder.parent == cache
        )
    except UnsafeCheckpointError:
        raise
    except CheckpointError:
        if client is None or folder.parent != cache:
            raise
        # A cache entry that no longer matches what it was verified as (changed on this machine):
        # set it aside and load a fresh download, never the changed bytes.
        _evict(folder, cache)
        folder = fetch(client, source, cache)
        loaded = _load_checkpoint(folder, source, target, model, model_factory, trust_code, cached=True)
    manifest, net, inner, state = loaded
    opt = optimizer
    saved_opt = train_state.saved_optimizer(state)
    if opt is None and saved_opt is not None and manifest.optimizer:
        opt = rebuild_optimizer(manifest.optimizer, inner, saved_opt)
    train_state.apply(
        state, optimizer=optimizer, scheduler=scheduler, scaler=scaler, generators=generators or {},
        source=str(folder / TRAINING_FILE), rng=restore_rng,
    )
    if opt is not None and saved_opt is not None:
        _move_optimizer_state(opt, target)
    return Restored(
        model=net,
        optimizer=opt,
        scheduler=scheduler,
        scaler=scaler,
        epoch=train_state.epoch_of(state, default=manifest.epoch),
        metrics=manifest.metrics,
        run_id=source.run_id or manifest.run_id,
        version=source.version,
        model_id=source.model_id,
        path=folder,
        manifest=manifest.data,
        training_state=dict(state),
    )


def _load_checkpoint(
    folder: Path,
    source: Source,
    target: torch.device,
    model: torch.nn.Module | None,
    factory: Any,
    trust_code: bool,
    cached: bool = False,
) -> tuple[Manifest, torch.nn.Module, torch.nn.Module, Mapping[str, Any]]:
    """Read a checkpoint the safe way round: identity, then bounds, then the verified bytes."""
    manifest = open_checkpoint(folder, source.sha256)
    check_identity(manifest, source)
    seal = Seal(folder) if cached else None
    model_entry = manifest.files[MODEL_FILE]
    model_file = TorchFile(folder / MODEL_FILE, model_entry, seal)
    plan = None
    if model is None:
        # Built on the meta device and checked against the weights file before anything is
        # allocated or read: a recipe that would allocate gigabytes is refused here.
        plan = plan_model(manifest.model, factory=factory, trust_code=trust_code)
        plan.check_size(str(folder / MODEL_FILE), int(model_entry["bytes"]),
                        manifest.model.get("parameters"))
    model_state = model_file.load(target)
    # The training state is read onto the CPU: optimizer.load_state_dict then moves each state to its
    # parameter's device and keeps a non-capturable 'step' on the CPU, as torch wants it (a 'step'
    # on the GPU costs a device sync per parameter per step); RNG states must be CPU tensors anyway.
    training = load_verified(folder / TRAINING_FILE, manifest.files[TRAINING_FILE], "cpu", seal)
    if not isinstance(model_state, Mapping) or not isinstance(training, Mapping):
        raise CheckpointError(
            f"{folder}: {MODEL_FILE} / {TRAINING_FILE} do not hold dicts; the checkpoint is damaged"
        )
    if model is not None:
        net = model
        inner = unwrap_model(net)
        inner.to(target)
        load_model_state(inner, model_state, source=str(folder / MODEL_FILE))
    else:
        assert plan is not None
        net = inner = plan.build(model_state, target, str(folder / MODEL_FILE))
    return manifest, net, inner, training


_BACKENDS = {"cuda": "CUDA", "mps": "MPS (Apple GPU)", "xpu": "XPU (Intel GPU)", "mtia": "MTIA"}


def available_devices() -> list[str]:
    """The devices torch can load onto in this process: ``cpu``, then each accelerator by index."""
    found = ["cpu"]
    kinds = [*_BACKENDS]
    with contextlib.suppress(Exception):  # an out-of-tree backend (torch_npu, habana) registered by name
        kinds.append(torch._C._get_privateuse1_backend_name())
    for kind in dict.fromkeys(kinds):
        backend = getattr(torch, kind, None)
        try:
            if backend is None or not backend.is_available():
                continue
            count = int(backend.device_count()) if hasattr(backend, "device_count") else 1
        except Exception:  # a backend whose query fails is not usable here
            continue
        found += [f"{kind}:{i}" for i in range(count)] if count > 1 or kind != "mps" else ["mps"]
    return found


def _device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that exists here, or a ``ConfigError`` naming the ones that do.

    Checked before anything is downloaded or read: loading onto a device that is not there fails
    inside ``torch.load`` in a way that would look like a damaged file.
    """
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device={device!r} is not a torch device; pass 'cpu', 'cuda' or 'cuda:0'") from e
    if target.type in ("cpu", "meta"):  # meta: shapes and dtypes only, everywhere (a dry run)
        return target
    here = available_devices()
    shown = ", ".join(repr(d) for d in here)
    label = _BACKENDS.get(target.type, target.type.upper())
    mine = [d for d in here if d.split(":", 1)[0] == target.type]
    if not mine:
        raise ConfigError(
            f"device={device!r} was asked for but {label} is not available here; pass device='cpu' "
            f"(the devices available here: {shown})"
        )
    if target.index is not None and target.index >= len(mine):
        raise ConfigError(
            f"device={device!r} was asked for but this machine has {len(mine)} {label} device(s) "
            f"({', '.join(repr(d) for d in mine)}); pass one of the devices available here: {shown}"
        )
    return target


# -- loading ---------------------------------------------------------------------------------------
def _move_optimizer_state(opt: torch.optim.Optimizer, device: torch.device) -> None:
    # load_state_dict casts state to each parameter's device already; "step" stays where torch wants it.
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step" and value.device != device:
                state[key] = value.to(device)


# -- resume and sync --------------------------------------------------------------------------------
def latest_checkpoint(client: MlflowClient, run_id: str) -> tuple[Any, Any] | None:
    """The newest checkpoint of a run (best or "last"), loaded on the CPU, for ``resume``."""
    tags = client.get_run(run_id).data.tags
    candidates: list[tuple[int, Source]] = []
    if TAG + "best_model_id" in tags:
        src = resolve_run(client, run_id)
        candidates.append((int(tags.get(TAG + "best_epoch", -1)), src))
    if TAG + "last_checkpoint" in tags:
        run = client.get_run(run_id)
        uri = run.info.artifact_uri.rstrip("/") + "/" + tags[TAG + "last_checkpoint"]
        last = Source(uri, tags.get(TAG + "last_sha256"), run_id)
        candidates.append((int(tags.get(TAG + "last_epoch", -1)), last))
    for _, src in sorted(candidates, key=lambda c: -c[0]):
        try:
            folder = fetch(client, src, home() / "cache")
        except CheckpointError as e:
            warnings.warn(
                f"mlflow_best: skipping a damaged checkpoint while resuming: {e}",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        try:
            manifest = open_checkpoint(folder, src.sha256)
            check_identity(manifest, src)
            return (
                load_verified(folder / MODEL_FILE, manifest.files[MODEL_FILE], "cpu"),
                load_verified(folder / TRAINING_FILE, manifest.files[TRAINING_FILE], "cpu"),
            )
        except UnsafeCheckpointError:
            raise  # refused, not skipped: an attack is not a damaged file
        except CheckpointError as e:
            warnings.warn(
                f"mlflow_best: skipping a damaged checkpoint while resuming: {e}",
                RuntimeWarning,
                stacklevel=3,
            )
    return None
