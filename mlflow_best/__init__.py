"""mlflow_best: keep the best PyTorch model in MLflow.

One ``with`` block logs every epoch, checkpoints and registers only improvements (off the training
loop), and ``restore`` brings any of them back onto any device::

    with mlflow_best.track(model, optimizer, monitor="val_loss", registered_model="digits-mlp") as run:
        for epoch in range(run.start_epoch, 20):
            ...
            run.log_epoch(epoch, {"train_loss": tl, "val_loss": vl})
    r = mlflow_best.restore(run.run_id, device="cuda:0")
    net = mlflow_best.load_model("models:/digits-mlp@best")   # weights only, for inference
"""

# The public surface only: every name here is in __all__ (tests/test_startup.py checks that nothing
# else leaks). Importing the package imports neither torch nor MLflow: the names that need them are
# loaded on first use (PEP 562), so `mlflow-best --help` and non-zero DDP ranks never pay for MLflow.
import typing as _typing

from mlflow_best._api import track
from mlflow_best._errors import (
    ArchitectureMismatchError,
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    MetricError,
    MlflowBestError,
    TrackingStoreError,
    UnsafeCheckpointError,
    UnsentError,
)
from mlflow_best._version import __version__

if _typing.TYPE_CHECKING:
    from mlflow_best._criterion import Best
    from mlflow_best._promote import Promotion, promote
    from mlflow_best._pyfunc import load_model
    from mlflow_best._replay import sync
    from mlflow_best._restore import Restored, restore
    from mlflow_best._runs import runs
    from mlflow_best._tracker import Run

__all__ = [
    "ArchitectureMismatchError",
    "Best",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "MetricError",
    "MlflowBestError",
    "Promotion",
    "Restored",
    "Run",
    "TrackingStoreError",
    "UnsafeCheckpointError",
    "UnsentError",
    "__version__",
    "load_model",
    "promote",
    "restore",
    "runs",
    "sync",
    "track",
]

# name -> the private module that defines it, imported when the name is first used
_LAZY = {
    "Best": "_criterion",
    "Run": "_tracker",
    "Promotion": "_promote",
    "promote": "_promote",
    "load_model": "_pyfunc",
    "Restored": "_restore",
    "restore": "_restore",
    "sync": "_replay",
    "runs": "_runs",
}


if not _typing.TYPE_CHECKING:  # type checkers see the imports above, and no catch-all attribute

    def __getattr__(name: str) -> object:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'mlflow_best' has no attribute {name!r}")
        import importlib

        value = getattr(importlib.import_module(f"mlflow_best.{module}"), name)
        globals()[name] = value  # the next lookup is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})
