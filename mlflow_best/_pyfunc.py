"""Each checkpoint as an MLflow model: the files that make it one, and the loaders that read it.

    <checkpoint>/
      MLmodel            python_function flavor (loader_module ``mlflow_best._pyfunc``, env files,
                         ``code``), the ``mlflow_best`` flavor (format version, what restore needs),
                         the signature inferred once from ``track(input_example=...)``
      requirements.txt   torch, mlflow, mlflow-best pinned to the training versions: MLflow's
                         requirement inference (a subprocess that loads the model) never runs
      python_env.yaml    conda.yaml   as MLflow writes them
      code/...           ``track(code_paths=...)``; MLflow puts ``code/`` on ``sys.path`` when it loads

The disk thread writes these with the state dicts (``ModelFiles`` renders them), and the manifest
lists them with their sha256 like every other file.

MLflow loads the model by calling ``_load_pyfunc(data_path, model_config)`` of this module (its
"custom loader module" mechanism). Loading through MLflow trusts the artifact the way MLflow does:
MLflow itself reads ``MLmodel`` and puts ``code/`` on ``sys.path`` before this module runs. What this
module reads it verifies against the manifest (sha256) and loads with ``weights_only=True``; it
never reads the optimizer and training state. ``load_model`` is the same weights-only path for
Python callers, with ``restore``'s references and download cache.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml

from mlflow_best import _distributed as dist
from mlflow_best._cache import Seal
from mlflow_best._checkpoint import (
    CODE_DIR,
    FORMAT_VERSION,
    MANIFEST,
    MODEL_FILE,
    TRAINING_FILE,
    Manifest,
    TorchFile,
    open_checkpoint,
    read_manifest,
    verify_checkpoint,
)
from mlflow_best._config import home
from mlflow_best._download import _evict, download_into_cache
from mlflow_best._errors import CheckpointError, ConfigError
from mlflow_best._reach import reach
from mlflow_best._recipe import plan_model
from mlflow_best._resolve import Source, check_identity, resolve
from mlflow_best._restore import _device
from mlflow_best._version import __version__

if TYPE_CHECKING:
    from mlflow import MlflowClient

LOADER_MODULE = "mlflow_best._pyfunc"
FLAVOR = "mlflow_best"
MLMODEL = "MLmodel"
REQUIREMENTS = "requirements.txt"
PYTHON_ENV = "python_env.yaml"
CONDA_ENV = "conda.yaml"
MODEL_FILES = (MLMODEL, REQUIREMENTS, PYTHON_ENV, CONDA_ENV)
DEVICE_ENV = "MLFLOW_DEFAULT_PREDICTION_DEVICE"  # MLflow's own setting, as its pytorch flavor reads it
_SKIP_CODE = ("__pycache__", ".git", ".mypy_cache", ".pytest_cache", ".ruff_cache")


def pinned_requirements() -> list[str]:
    """The pip requirements every version records: this environment's torch, mlflow, mlflow-best."""
    import mlflow

    # A local version label (2.13.0+cpu) is not installable from PyPI; MLflow drops it the same way.
    return [
        f"torch=={torch.__version__.split('+', 1)[0]}",
        f"mlflow=={mlflow.__version__}",
        f"mlflow-best=={__version__}",
    ]


@dataclass(frozen=True)
class ModelFiles:
    """What turns a checkpoint folder into an MLflow model; computed once per run, rendered per checkpoint.

    Attributes:
        env_files: ``requirements.txt``, ``python_env.yaml``, ``conda.yaml`` as bytes.
        signature: the signature's ``to_dict()`` (None without ``input_example``).
        code: ``code/<path>`` -> bytes of the ``code_paths`` read at ``track``.
    """

    env_files: Mapping[str, bytes]
    signature: Mapping[str, Any] | None = None
    code: Mapping[str, bytes] = field(default_factory=dict)

    @classmethod
    def for_run(
        cls,
        model: torch.nn.Module,
        input_example: Any = None,
        code_paths: Sequence[str | os.PathLike[str]] | None = None,
    ) -> ModelFiles:
        """Validate ``input_example`` and ``code_paths`` (ConfigError) and compute the files."""
        code = read_code_paths(code_paths)
        if dist.rank() != 0:
            # Only rank 0 writes checkpoints. The other ranks check the same arguments, so that every
            # rank fails alike, and need no MLflow for it.
            if input_example is not None:
                check_example(model, input_example)
            return cls({}, None, code)
        from mlflow.utils.environment import _mlflow_conda_env, _PythonEnv

        signature = infer_signature(model, input_example) if input_example is not None else None
        requirements = pinned_requirements()
        conda = _mlflow_conda_env(additional_pip_deps=requirements, install_mlflow=False)  # type: ignore[no-untyped-call]
        current = _PythonEnv.current()  # type: ignore[no-untyped-call]
        python_env = {k: v for k, v in current.to_dict().items() if v}
        env_files = {
            REQUIREMENTS: ("\n".join(requirements) + "\n").encode(),
            PYTHON_ENV: yaml.safe_dump(python_env, sort_keys=False, default_flow_style=False).encode(),
            CONDA_ENV: yaml.safe_dump(conda, default_flow_style=False).encode(),
        }
        files = cls(env_files, signature, code)
        files({"model": {}})  # MLflow's model modules imported now, not by the disk thread mid-training
        return files

    def __call__(self, meta: Mapping[str, Any]) -> dict[str, bytes]:
        """The files of one checkpoint, from its manifest fields (run the disk thread, not the loop)."""
        from mlflow.models import Model
        from mlflow.models.signature import ModelSignature
        from mlflow.pyfunc import add_to_model

        mlmodel = Model(
            run_id=meta.get("run_id"),
            signature=ModelSignature.from_dict(dict(self.signature)) if self.signature else None,
        )
        add_to_model(  # type: ignore[no-untyped-call]
            mlmodel,
            loader_module=LOADER_MODULE,
            code=CODE_DIR if self.code else None,
            conda_env=CONDA_ENV,
            python_env=PYTHON_ENV,
            # MLflow passes on only the model_config keys a flavor declares: declared, unset, so
            # load_model(..., model_config={"device": ...}) reaches _load_pyfunc.
            model_config={"device": None},
        )
        model = meta.get("model") or {}
        mlmodel.add_flavor(
            FLAVOR,
            format_version=FORMAT_VERSION,
            mlflow_best_version=__version__,
            manifest=MANIFEST,
            model_file=MODEL_FILE,
            training_file=TRAINING_FILE,
            model_class=model.get("class"),
            model_args=model.get("args"),
        )
        return {MLMODEL: mlmodel.to_yaml().encode(), **self.env_files, **self.code}


def read_code_paths(code_paths: Sequence[str | os.PathLike[str]] | None) -> dict[str, bytes]:
    """``code/<name>/...`` -> bytes of each file or folder (caches and VCS folders skipped)."""
    if code_paths is None:
        return {}
    if isinstance(code_paths, (str, os.PathLike)) or not isinstance(code_paths, Sequence):
        raise ConfigError(
            f"code_paths={code_paths!r} must be a list of files or folders, e.g. code_paths=['models.py']"
        )
    out: dict[str, bytes] = {}
    for raw in code_paths:
        if not isinstance(raw, (str, os.PathLike)):
            raise ConfigError(f"code_paths: {raw!r} is not a path; pass files or folders as str or Path")
        path = Path(raw)
        if not path.exists():
            raise ConfigError(
                f"code_paths: {str(raw)!r} does not exist (resolved from {os.getcwd()}); pass an existing "
                "file or folder holding the model's code"
            )
        if path.is_file():
            files = [(path.name, path)]
        else:
            files = [
                (f"{path.resolve().name}/{p.relative_to(path).as_posix()}", p)
                for p in sorted(path.rglob("*"))
                if p.is_file() and not any(part in _SKIP_CODE for part in p.relative_to(path).parts)
            ]
        for rel, file in files:
            key = f"{CODE_DIR}/{rel}"
            if key in out:
                raise ConfigError(
                    f"code_paths: {str(raw)!r} ships {rel!r}, which an earlier entry already ships; "
                    "pass each file or folder once"
                )
            out[key] = file.read_bytes()
    return out


# -- inputs and outputs ----------------------------------------------------------------------------
def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _to_tensor(value: Any, dtype: torch.dtype, device: torch.device, what: str) -> torch.Tensor:
    import pandas as pd

    if isinstance(value, torch.Tensor):
        tensor = value.detach()
    else:
        if isinstance(value, pd.DataFrame):
            array = value.to_numpy(dtype=np.float32)
        else:
            try:
                array = np.asarray(value)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{what} cannot be made an array ({e}); pass a numpy array") from e
        if array.dtype.kind not in "biuf":
            raise ConfigError(
                f"{what} has dtype {array.dtype}, expected numbers; pass a numeric numpy array or DataFrame"
            )
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.to(device)


def model_input(x: Any, dtype: torch.dtype, device: torch.device, what: str = "model input") -> Any:
    """A tensor (or a dict of tensors, for a model with several inputs) from numpy / pandas / tensors."""
    if isinstance(x, Mapping):
        return {str(k): _to_tensor(v, dtype, device, f"{what}[{k!r}]") for k, v in x.items()}
    return _to_tensor(x, dtype, device, what)


def to_numpy(out: Any) -> Any:
    """The model's output as numpy: an array, or a dict of arrays for dict outputs."""
    if isinstance(out, torch.Tensor):
        return out.detach().cpu().numpy()
    if isinstance(out, Mapping):
        return {str(k): to_numpy(v) for k, v in out.items()}
    raise ConfigError(
        f"the model's forward returned a {type(out).__name__}; serving needs a tensor or a dict of tensors "
        "(return one, or wrap the model in a module whose forward does)"
    )


def forward(model: torch.nn.Module, x: Any, device: torch.device) -> Any:
    """One inference call: eval mode, no autograd; numpy in, numpy out."""
    inputs = model_input(x, _float_dtype(model), device)
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return to_numpy(out)


def infer_signature(model: torch.nn.Module, example: Any) -> dict[str, Any]:
    """MLflow's signature of ``model`` on ``example``: one forward pass in eval mode, RNG and modes kept."""
    from mlflow.models import infer_signature as mlflow_infer
    from mlflow.models.signature import ModelSignature

    example, output = check_example(model, example)
    signature: ModelSignature = mlflow_infer(example, output)
    result: dict[str, Any] = signature.to_dict()
    return result


def check_example(model: torch.nn.Module, example: Any) -> tuple[Any, Any]:
    """``example`` as numpy and the model's output on it; a ``ConfigError`` when the model refuses it."""
    import pandas as pd

    shown = _describe(example)
    if isinstance(example, torch.Tensor):
        example = example.detach().cpu().numpy()
    elif isinstance(example, Mapping):
        example = {
            str(k): v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            for k, v in example.items()
        }
    elif not isinstance(example, (np.ndarray, pd.DataFrame)):
        raise ConfigError(
            f"input_example={shown} must be a batch the model accepts: a numpy array, a pandas DataFrame, a "
            "torch tensor or a dict of arrays (for a model with several inputs)"
        )
    try:
        device = next(t.device for t in (*model.parameters(), *model.buffers()))
    except StopIteration:
        device = torch.device("cpu")
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.random.fork_rng(devices=[]):
            output = forward(model, example, device)
    except ConfigError as e:
        raise ConfigError(f"input_example={shown}: {e}") from e
    except Exception as e:
        raise ConfigError(
            f"input_example={shown} cannot be passed to the model ({type(e).__name__}: {e}); pass a batch "
            "that model(batch) accepts (dict keys become keyword arguments)"
        ) from e
    finally:
        for module, training in modes.items():
            module.training = training
    return example, output


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"<{type(value).__name__} of shape {tuple(shape)}, dtype {getattr(value, 'dtype', '?')}>"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in value.items()) + "}"
    return repr(value)[:80]


# -- loading ---------------------------------------------------------------------------------------
def prediction_device(model_config: Mapping[str, Any] | None = None) -> torch.device:
    """``model_config["device"]``, else ``MLFLOW_DEFAULT_PREDICTION_DEVICE``, else the CPU."""
    device = (model_config or {}).get("device") or os.environ.get(DEVICE_ENV) or "cpu"
    return _device(device)


def load_weights(
    folder: Path,
    device: torch.device,
    source: Source | None = None,
    *,
    serving: bool = False,
    trust_code: bool = False,
    cached: bool = False,
) -> tuple[Manifest, torch.nn.Module]:
    """The model of a checkpoint folder, rebuilt from its manifest, on ``device``, in eval mode.

    The manifest is read once (against what MLflow recorded, and its signature when a key is set),
    the recipe is built on the meta device and checked against the weights file's size, and the
    weights are loaded from the bytes that were hashed.

    ``serving``: loaded by MLflow's pyfunc, whose trust model is the artifact's: the module that
    defines the model (shipped with ``code_paths`` or installed) is imported, as MLflow's own
    flavors do. ``load_model`` and ``restore`` never import anything.
    """
    manifest = open_checkpoint(folder, source.sha256 if source is not None else None)
    if source is not None:
        check_identity(manifest, source)
    info = manifest.model
    if serving:
        _import_recorded(info)
    entry = manifest.files[MODEL_FILE]
    weights = TorchFile(folder / MODEL_FILE, entry, Seal(folder) if cached else None)
    plan = plan_model(info, trust_code=serving or trust_code)
    plan.check_size(str(folder / MODEL_FILE), int(entry["bytes"]), info.get("parameters"))
    state = weights.load(device)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{folder / MODEL_FILE} does not hold a state_dict; the checkpoint is damaged")
    return manifest, plan.build(state, device, str(folder / MODEL_FILE)).eval()


def _import_recorded(info: Mapping[str, Any]) -> None:
    import importlib

    for field_name in ("factory", "class"):
        path = info.get(field_name)
        if isinstance(path, str) and ":" in path:
            module = path.split(":", 1)[0]
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ConfigError(
                    f"the model's module {module!r} (manifest field 'model.{field_name}') cannot be imported "
                    f"where it is served ({e}); ship it with track(code_paths=[...]) or install it"
                ) from e
            return


class PyfuncModel:
    """What MLflow's ``pyfunc`` wraps: ``predict`` runs the checkpoint's model on numpy / pandas input."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        """numpy array, DataFrame (values as float32) or dict of arrays in; numpy (or dict of numpy) out."""
        return forward(self.model, model_input, self.device)

    def get_raw_model(self) -> torch.nn.Module:
        """The ``torch.nn.Module`` itself (``PyFuncModel.get_raw_model()`` in MLflow returns it)."""
        return self.model


def _load_pyfunc(data_path: str, model_config: Mapping[str, Any] | None = None) -> PyfuncModel:
    """MLflow's entry point (``loader_module``): verify what is read, load weights only, rebuild."""
    folder = Path(data_path)
    device = prediction_device(model_config)
    manifest = read_manifest(folder)
    # Everything but the training state, which inference never reads: the weights, MLflow's files
    # and the shipped code (before the model class is imported from it).
    verify_checkpoint(folder, only=[n for n in manifest.all_files if n not in (TRAINING_FILE, MODEL_FILE)])
    return PyfuncModel(load_weights(folder, device, serving=True)[1], device)


def load_model(
    ref: str,
    device: str | torch.device = "cpu",
    *,
    tracking_uri: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    trust_code: bool = False,
) -> torch.nn.Module:
    """Load the weights of a checkpoint logged by ``track`` into its rebuilt model, for inference.

    Only ``manifest.json`` and ``model.pt`` are downloaded and read (the optimizer and training state
    are not), so this works where the optimizer cannot be rebuilt. The model class is imported from
    this process's modules, as for ``restore``: nothing the checkpoint names is imported.

    Args:
        ref: a run id or ``runs:/<run_id>`` (that run's best checkpoint), ``models:/<name>/<version>``,
            ``models:/<name>@<alias>``, ``models:/<logged model id>``, or a local checkpoint folder.
        device: where the model ends up ("cpu", "cuda", "cuda:1", ...); a GPU-saved checkpoint loads
            on the CPU.
        tracking_uri: the MLflow tracking URI; None uses MLflow's own (``MLFLOW_TRACKING_URI``).
        cache_dir: the download cache (default ``$MLFLOW_BEST_HOME/cache``); keyed by sha256.
        trust_code: call the recorded ``model_factory`` even without a ``-> nn.Module`` annotation.

    Returns:
        The ``torch.nn.Module`` with the checkpoint's weights, on ``device``, in eval mode.

    Raises:
        CheckpointNotFoundError: unknown run, model, version or alias, or a run without checkpoint.
        CheckpointError: a checksum mismatch, a truncated, missing or foreign file.
        UnsafeCheckpointError: a weights file that would need code execution to load.
        ConfigError: a device not on this machine (the ones that are are listed), or a model class
            that cannot be rebuilt here.
        TrackingStoreError: the tracking store refused a call, or did not answer (naming the URI).

    Example:
        >>> net = mlflow_best.load_model("models:/digits-mlp@best")  # doctest: +SKIP
        >>> net(torch.rand(1, 64)).argmax(1)  # doctest: +SKIP
    """
    return load_for_inference(
        ref, device, tracking_uri=tracking_uri, cache_dir=cache_dir, trust_code=trust_code
    ).model


@dataclass(frozen=True)
class Loaded:
    """What ``load_for_inference`` found: the model and where it came from (for the CLI's report)."""

    model: torch.nn.Module
    manifest: Manifest
    folder: Path
    run_id: str | None
    version: str | None


def load_for_inference(
    ref: str,
    device: str | torch.device = "cpu",
    *,
    tracking_uri: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    trust_code: bool = False,
) -> Loaded:
    """``load_model`` with the manifest and the reference's run and version."""
    import mlflow
    from mlflow import MlflowClient

    target = _device(device)
    if isinstance(ref, os.PathLike) or (isinstance(ref, str) and Path(ref).is_dir()):
        folder = Path(ref)
        manifest, model = load_weights(folder, target, trust_code=trust_code)
        return Loaded(model, manifest, folder, manifest.run_id, None)
    cache = Path(cache_dir) if cache_dir else home() / "cache"
    uri = tracking_uri or mlflow.get_tracking_uri()
    with reach(uri):
        return _load_remote(MlflowClient(tracking_uri=uri), ref, target, cache, trust_code)


def _load_remote(
    client: MlflowClient, ref: str, target: torch.device, cache: Path, trust_code: bool
) -> Loaded:
    source = resolve(client, ref)
    folder = _fetch_weights(client, source, cache)
    try:
        manifest, model = load_weights(
            folder, target, source, trust_code=trust_code, cached=_in_cache(folder, cache)
        )
    except CheckpointError:
        if folder.parent not in (cache, cache / "weights"):
            raise
        _evict(folder, folder.parent)  # changed on this machine since it was cached: download again
        folder = _fetch_weights(client, source, cache)
        manifest, model = load_weights(
            folder, target, source, trust_code=trust_code, cached=_in_cache(folder, cache)
        )
    return Loaded(model, manifest, folder, source.run_id or manifest.run_id, source.version)


def _in_cache(folder: Path, cache: Path) -> bool:
    return folder.parent in (cache, cache / "weights")


def _fetch_weights(client: MlflowClient, source: Source, cache: Path) -> Path:
    """A local copy of the manifest and weights of ``source``: from the cache, else downloaded.

    A full copy that ``restore`` cached serves too; otherwise the two files go to ``cache/weights``.
    The loader hashes what it reads; this only saves downloads.
    """
    return download_into_cache(client, source, cache, weights_only=True)
