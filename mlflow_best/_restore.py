"""Resolve a reference, download (cached by sha256), verify, load safely, rebuild, map to a device."""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mlflow_best import _training as train_state
from mlflow_best._cache import WEIGHTS, Seal, enforce_limit, max_bytes, partial_dir, sweep, touch
from mlflow_best._checkpoint import (
    MANIFEST,
    MODEL_FILE,
    TRAINING_FILE,
    Manifest,
    TorchFile,
    load_verified,
    open_checkpoint,
    read_manifest,
    verify_checkpoint,
)
from mlflow_best._config import home
from mlflow_best._criterion import Criterion
from mlflow_best._errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointPrunedError,
    ConfigError,
    TrackingStoreError,
    UnsafeCheckpointError,
)
from mlflow_best._promote import _ranges
from mlflow_best._reach import QUIET_DOWNLOADS, bounded_http, probe, scoped_env, shown_uri
from mlflow_best._recipe import (
    load_model_state,
    plan_model,
    rebuild_optimizer,
)
from mlflow_best._registry import (
    TAG,
    V_EPOCH,
    V_MODE,
    V_MODEL_ID,
    V_MONITOR,
    V_PRUNED,
    V_RUN,
    V_SHA,
    V_VALUE,
    _all_versions,
    best_version,
    is_missing,
    known_models,
)
from mlflow_best._signing import SIGNATURE_FILE
from mlflow_best._state import unwrap_model

if TYPE_CHECKING:
    from mlflow import MlflowClient

RUN_FILE = "run.json"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


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


@dataclass(frozen=True)
class _Source:
    """Where a checkpoint lives in MLflow and what it must hash to."""

    artifact_uri: str
    sha256: str | None
    run_id: str | None
    version: str | None = None
    model_id: str | None = None
    # What MLflow says the checkpoint is (version or LoggedModel tags): the manifest must agree.
    expect: Mapping[str, str] = field(default_factory=dict)


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
        source = _Source(artifact_uri=str(folder), sha256=None, run_id=None)
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
        source = _resolve(client, ref)
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
    if opt is None and saved_opt is not None and manifest.data.get("optimizer"):
        opt = rebuild_optimizer(manifest.data["optimizer"], inner, saved_opt)
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
        metrics={str(k): float(v) for k, v in manifest.data["metrics"].items()},
        run_id=source.run_id or manifest.data.get("run_id"),
        version=source.version,
        model_id=source.model_id,
        path=folder,
        manifest=manifest.data,
        training_state=dict(state),
    )


def _load_checkpoint(
    folder: Path,
    source: _Source,
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
        plan = plan_model(manifest.data["model"], factory=factory, trust_code=trust_code)
        plan.check_size(str(folder / MODEL_FILE), int(model_entry["bytes"]),
                        manifest.data["model"].get("parameters"))
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


# -- resolving references -------------------------------------------------------------------------
REF_FORMS = (
    "a run id (32 hex characters) or 'runs:/<run id>', 'models:/<name>/<version>', "
    "'models:/<name>@<alias>', 'models:/<logged model id>' (m-...), or a local checkpoint folder"
)


def _resolve(client: MlflowClient, ref: str) -> _Source:
    from mlflow.exceptions import MlflowException

    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"ref={ref!r} is not a reference; pass {REF_FORMS}")
    try:
        if ref.startswith("models:/"):
            return _resolve_model(client, ref[len("models:/") :], ref)
        run_id = ref[len("runs:/") :].strip("/") if ref.startswith("runs:/") else ref
        if not _RUN_ID.match(run_id):
            looks_local = not ref.startswith("runs:/") and (
                "/" in ref or os.sep in ref or ref.startswith(".")
            )
            where = f" (and there is no folder {str(Path(ref).resolve())!r})" if looks_local else ""
            raise ConfigError(f"ref={ref!r} is not a reference restore understands{where}; pass {REF_FORMS}")
        return _resolve_run(client, run_id)
    except MlflowException as e:
        if is_missing(e) or e.error_code == "INVALID_PARAMETER_VALUE":
            raise CheckpointNotFoundError(f"{ref!r} was not found in the tracking store ({e.message})") from e
        raise TrackingStoreError(
            f"resolving {ref!r} at the tracking store {shown_uri(client.tracking_uri)!r} failed: {e.message}"
        ) from e


def _missing(client: MlflowClient, ref: str, name: str, *, alias: str | None = None,
             version: str | None = None) -> CheckpointNotFoundError:
    """Why ``name@alias`` / ``name/version`` was not found, with what exists instead."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        if not is_missing(e):
            raise
        return CheckpointNotFoundError(
            f"{ref!r}: registered model {name!r} does not exist in {shown_uri(client.tracking_uri)!r} "
            f"(it has: {known_models(client)}); pass one of these, or train with track(registered_model=...) "
            "first"
        )
    if alias is not None:
        held = ", ".join(f"@{a} -> v{v}" for a, v in sorted((model.aliases or {}).items())) or "none"
        return CheckpointNotFoundError(
            f"{ref!r}: registered model {name!r} has no alias {alias!r} (its aliases: {held}); pass one of "
            f"these, 'models:/{name}/<version>', or set it with mlflow-best promote / mlflow_best.promote"
        )
    has = _ranges(sorted(int(v.version) for v in _all_versions(client, name))) or "no versions"
    return CheckpointNotFoundError(
        f"{ref!r}: registered model {name!r} has no version {version} (it has {has}); pass one of these"
    )


def _resolve_model(client: MlflowClient, rest: str, ref: str) -> _Source:
    from mlflow.exceptions import MlflowException

    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        try:
            mv = client.get_model_version_by_alias(name, alias)
        except MlflowException as e:
            if not is_missing(e) and e.error_code != "INVALID_PARAMETER_VALUE":
                raise
            raise _missing(client, ref, name, alias=alias) from e
        return _from_version(client, mv, alias)
    if "/" in rest:
        name, version = rest.rsplit("/", 1)
        if not version.isdigit():
            raise ConfigError(f"{ref!r}: version {version!r} must be a number, as in 'models:/{name}/3'")
        try:
            mv = client.get_model_version(name, version)
        except MlflowException as e:
            if not is_missing(e) and e.error_code != "INVALID_PARAMETER_VALUE":
                raise
            raise _missing(client, ref, name, version=version) from e
        return _from_version(client, mv)
    if rest.startswith("m-"):
        return _from_logged_model(client, rest)
    raise ConfigError(
        f"{ref!r} names no version or alias; use 'models:/{rest}@best' or 'models:/{rest}/1' "
        f"(restore accepts {REF_FORMS})"
    )


def _from_version(client: MlflowClient, mv: Any, alias: str | None = None) -> _Source:
    from_source = mv.source.split("/")[-1] if mv.source.startswith("models:/m-") else None
    model_id = getattr(mv, "model_id", None) or (mv.tags or {}).get(V_MODEL_ID) or from_source
    if not model_id:
        raise CheckpointError(
            f"model version {mv.name}/{mv.version} was not logged by mlflow_best (source {mv.source!r}); "
            "restore only reads versions that track() registered"
        )
    if V_PRUNED in (mv.tags or {}):
        how = (
            f"alias @{alias} of {mv.name!r} points at version {mv.version}, which"
            if alias else f"version {mv.version} of {mv.name!r}"
        )
        raise CheckpointPrunedError(
            f"{how} was pruned by track(keep=...): its checkpoint files were deleted, so it cannot be "
            f"restored; {_with_files(client, mv)}"
        )
    src = _from_logged_model(client, model_id)
    sha256 = (mv.tags or {}).get(V_SHA) or src.sha256
    return _Source(src.artifact_uri, sha256, src.run_id, str(mv.version), model_id, _expected(mv.tags))


def _with_files(client: MlflowClient, pruned: Any) -> str:
    """Where to go instead of a pruned version: its model's aliases and its best version with files."""
    from mlflow.exceptions import MlflowException

    name, tags = pruned.name, pruned.tags or {}
    try:
        aliases = client.get_registered_model(name).aliases or {}
        best = None
        if V_MONITOR in tags:
            best = best_version(client, name, tags[V_MONITOR], Criterion(tags.get(V_MODE, "min")))
    except MlflowException:
        return f"restore 'models:/{name}@<alias>' or a newer version"
    hints = []
    if best is not None:
        hints.append(
            f"the best version with files is {best.version} ({tags[V_MONITOR]}={best.tags.get(V_VALUE)}): "
            f"'models:/{name}/{best.version}'"
        )
    held = [
        f"'models:/{name}@{a}' (-> v{v})" for a, v in sorted(aliases.items()) if str(v) != str(pruned.version)
    ]
    if held:
        hints.append("its aliases: " + ", ".join(held))
    return "; ".join(hints) or f"no version of {name!r} has files left; restore a run id instead"


def _from_logged_model(client: MlflowClient, model_id: str) -> _Source:
    lm = client.get_logged_model(model_id)
    if V_PRUNED in (lm.tags or {}):
        raise CheckpointPrunedError(
            f"logged model {model_id} ({lm.name}) was pruned by track(keep=...): its checkpoint files were "
            f"deleted, so it cannot be restored; restore its run {lm.source_run_id} (that run's best) instead"
        )
    return _Source(
        lm.artifact_location, (lm.tags or {}).get(V_SHA), lm.source_run_id, None, model_id, _expected(lm.tags)
    )


def _expected(tags: Mapping[str, str] | None) -> dict[str, str]:
    return {k: v for k, v in (tags or {}).items() if k in (V_EPOCH, V_VALUE, V_MONITOR, V_RUN)}


def check_identity(manifest: Manifest, source: _Source) -> None:
    """Refuse a checkpoint whose manifest says it is another one than MLflow says (a redirected source,
    a rewritten tag): the run it belongs to, its epoch, monitor and value."""
    data, where = manifest.data, manifest.path / MANIFEST
    owner = data.get("run_id")
    if source.run_id and owner and owner != source.run_id:
        raise CheckpointError(
            f"{where}: this checkpoint belongs to run {owner}, not {source.run_id} as MLflow's records say "
            "(a version source or tag was redirected); it was not loaded"
        )
    mine_of = {V_EPOCH: data.get("epoch"), V_VALUE: data.get("value"), V_MONITOR: data.get("monitor"),
               V_RUN: owner}
    for key, mine in mine_of.items():
        if key not in source.expect:
            continue
        tag = source.expect[key]
        try:
            if key == V_EPOCH:
                agree = int(tag) == mine
            elif key == V_VALUE:
                agree = mine is not None and float(tag) == float(mine)
            else:
                agree = mine is None or tag == mine
        except (TypeError, ValueError):
            agree = False
        if not agree:
            raise CheckpointError(
                f"{where}: MLflow's tag {key}={source.expect[key]!r} disagrees with the manifest's {mine!r}: "
                "the tags or the files were changed; it was not loaded"
            )


def _resolve_run(client: MlflowClient, run_id: str) -> _Source:
    run = client.get_run(run_id)
    tags = run.data.tags
    model_id = tags.get(TAG + "best_model_id")
    if model_id:
        src = _from_logged_model(client, model_id)
        return _Source(src.artifact_uri, tags.get(TAG + "best_sha256") or src.sha256, run_id,
                       tags.get(TAG + "best_version"), model_id)
    staged = _staged_best(run_id)
    if staged is not None:
        warnings.warn(
            f"mlflow_best: run {run_id} has no checkpoint in MLflow yet; using the local staged copy "
            f"{staged} (upload it with mlflow_best.sync({run_id!r}))",
            RuntimeWarning,
            stacklevel=3,
        )
        return _Source(str(staged), None, run_id)
    raise CheckpointNotFoundError(
        f"run {run_id} has no checkpoint: no epoch has improved "
        f"{tags.get(TAG + 'monitor', 'the monitor')!r} yet (or the run was not tracked by "
        "mlflow_best.track); train until log_epoch returns True, or restore another run"
    )


def _staged_best(run_id: str) -> Path | None:
    folder = home() / "runs" / run_id / "checkpoints"
    if not folder.is_dir():
        return None
    best: tuple[float, Path] | None = None
    for sub in folder.iterdir():
        if sub.name.startswith(".") or sub.name.startswith("last"):
            continue
        try:
            m = verify_checkpoint(sub)
        except CheckpointError:
            continue
        crit = Criterion(m.data.get("mode", "min"))
        value = float(m.data.get("value", math.nan))
        if math.isfinite(value) and (best is None or crit.better(value, best[0])):
            best = (value, sub)
    return best[1] if best else None


# -- download cache ---------------------------------------------------------------------------------
def fetch(client: MlflowClient, source: _Source, cache: Path) -> Path:
    """A local copy of ``source``: from the cache when complete, else downloaded into it.

    Nothing here is trusted for loading: the loader hashes the bytes it reads against the manifest,
    and the manifest against what MLflow recorded. The cache only saves downloads; it lives in a
    ``0700`` folder with read-only files.
    """
    return download_into_cache(client, source, cache)


def download_into_cache(
    client: MlflowClient, source: _Source, cache: Path, *, weights_only: bool = False
) -> Path:
    """The cache entry of ``source`` (``cache/<sha256>``), downloaded unless already complete there.

    ``weights_only``: only the manifest and the weights are needed (``load_model``); a full entry
    serves, else the two files go to ``cache/weights/<sha256>``. After each call the cache is within
    its size bound (``MLFLOW_BEST_CACHE_MAX_BYTES``), the entry returned excepted.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    if source.sha256 is None and os.path.isdir(source.artifact_uri):
        return Path(source.artifact_uri)  # a local staged copy: verified by the loader, in place
    max_bytes()  # a bad MLFLOW_BEST_CACHE_MAX_BYTES is refused before anything is downloaded
    names = [MODEL_FILE] if weights_only else None
    into = cache / WEIGHTS if weights_only else cache
    if source.sha256:
        for cached in (cache / source.sha256, *([into / source.sha256] if weights_only else [])):
            if cache_hit(cached, names):
                return _used(cache, cached)
    private_dir(into)
    sweep(into)
    stored = source.artifact_uri.rstrip("/")
    # MLflow's per-file progress bar is noise in logs and notebooks; a user's own setting wins.
    with scoped_env(QUIET_DOWNLOADS), partial_dir(into) as tmp:
        local = tmp
        try:
            if weights_only:
                stored = _download_weights(client, source, stored, tmp)
            else:
                local = Path(
                    mlflow.artifacts.download_artifacts(
                        artifact_uri=source.artifact_uri, dst_path=str(tmp), tracking_uri=client.tracking_uri
                    )
                )
                if not (local / MANIFEST).is_file() and (local / "artifacts" / MANIFEST).is_file():
                    local, stored = local / "artifacts", stored + "/artifacts"
            manifest = read_manifest(local)
            check_recorded(manifest, source)
            _check_sizes(local, manifest, names)
            seal(local)
            return _used(cache, _publish_to_cache(local, into / manifest.sha256, into))
        except CheckpointError as e:
            # Name the file where it is stored, not in the temporary download folder removed below.
            raise type(e)(str(e).replace(str(local), stored)) from e
        except MlflowException as e:
            raise TrackingStoreError(f"downloading {stored} failed: {e.message}") from e


def _used(cache: Path, entry: Path) -> Path:
    touch(entry)
    enforce_limit(cache, in_use=entry)
    sweep(cache)
    return entry


def _download_weights(client: MlflowClient, source: _Source, stored: str, tmp: Path) -> str:
    """Download only ``manifest.json``, ``model.pt`` (and the signature, if any) into ``tmp``."""
    from mlflow.exceptions import MlflowException

    try:
        _download(client, stored, MANIFEST, tmp)
    except (MlflowException, OSError):
        # A version whose source is the LoggedModel's folder rather than its artifacts.
        stored += "/artifacts"
        _download(client, stored, MANIFEST, tmp)
    check_recorded(read_manifest(tmp), source)  # before the weights are downloaded
    _download(client, stored, MODEL_FILE, tmp)
    with contextlib.suppress(MlflowException, OSError, CheckpointError):
        _download(client, stored, SIGNATURE_FILE, tmp)
    return stored


def _download(client: MlflowClient, stored: str, name: str, dst: Path) -> None:
    import mlflow

    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"{stored}/{name}", dst_path=str(dst), tracking_uri=client.tracking_uri
        )
    )
    if local != dst / name:
        shutil.move(str(local), dst / name)
    if not (dst / name).is_file():
        raise CheckpointError(f"{stored}/{name} is missing; the checkpoint is incomplete")


def check_recorded(manifest: Manifest, source: _Source) -> None:
    """A downloaded manifest is what MLflow recorded: the same checkpoint, and the same bytes."""
    check_identity(manifest, source)
    if source.sha256 and manifest.sha256 != source.sha256:
        raise CheckpointError(
            f"{manifest.path / MANIFEST} has sha256 {manifest.sha256[:12]}…, but MLflow recorded "
            f"{source.sha256[:12]}… for this checkpoint: the stored manifest was changed; it was not loaded"
        )


def private_dir(path: Path) -> None:
    """Create ``path`` (and parents) readable by this user only."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(OSError):
        path.chmod(0o700)


def seal(folder: Path) -> None:
    """Make a downloaded checkpoint's files read-only before it joins the cache."""
    for f in folder.rglob("*"):
        if f.is_file():
            with contextlib.suppress(OSError):
                f.chmod(0o444)


def _check_sizes(folder: Path, manifest: Manifest, names: list[str] | None = None) -> None:
    listed = manifest.all_files
    for name in names if names is not None else list(listed):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
        if path.stat().st_size != listed[name]["bytes"]:
            raise CheckpointError(
                f"{path} is {path.stat().st_size} bytes, the manifest says {listed[name]['bytes']}: the file "
                "is truncated or was changed; restore another version or re-download it"
            )


def _evict(folder: Path, cache: Path) -> None:
    with contextlib.suppress(OSError):
        os.replace(folder, cache / f".stale-{uuid.uuid4().hex[:8]}")


def _publish_to_cache(local: Path, final: Path, cache: Path) -> Path:
    """Move a verified download to ``final``, safe against other processes doing the same.

    Ranks of one node restore the same checkpoint at once: an entry another process completed is kept
    (the content is identical by its name); a stale one is moved aside, never deleted in place, so a
    reader that already holds it keeps reading whole files.
    """
    for _ in range(3):
        if cache_hit(final):
            return final
        if final.exists():
            with contextlib.suppress(OSError):
                os.replace(final, cache / f".stale-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(local, final)
            return final
        except OSError:
            continue  # another process put its copy there first: check it on the next pass
    if cache_hit(final):
        return final
    raise CheckpointError(f"{final}: the download cache kept changing under this process; retry restore")


def cache_hit(folder: Path, names: list[str] | None = None) -> bool:
    """A cached folder is used when its manifest still hashes to the folder's name and the files are
    all there at their declared sizes; their contents are hashed by the loader, at every load."""
    try:
        manifest = read_manifest(folder)
        if manifest.sha256 != folder.name:
            return False
        _check_sizes(folder, manifest, names)
        return True
    except (OSError, CheckpointError):
        return False


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
    candidates: list[tuple[int, _Source]] = []
    if TAG + "best_model_id" in tags:
        src = _resolve_run(client, run_id)
        candidates.append((int(tags.get(TAG + "best_epoch", -1)), src))
    if TAG + "last_checkpoint" in tags:
        run = client.get_run(run_id)
        uri = run.info.artifact_uri.rstrip("/") + "/" + tags[TAG + "last_checkpoint"]
        last = _Source(uri, tags.get(TAG + "last_sha256"), run_id)
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
