"""The exceptions mlflow_best raises, in one place.

    MlflowBestError                      base of everything below
    ├── ConfigError (ValueError)         a bad argument to track/restore/promote, raised before any work
    ├── MetricError (ValueError)         a bad metrics mapping passed to Run.log_epoch
    ├── TrackingStoreError               the tracking store cannot be reached or refused a call
    │   └── TrackingStoreUnreachableError
    │                                    it did not answer at all (an outage, not a refusal); names the URI
    ├── CheckpointNotFoundError (LookupError)
    │                                    an unknown run, model, version or alias, or a run without checkpoint
    ├── CheckpointError                  a checkpoint that cannot be trusted: bad manifest, checksum
    │   │                                mismatch, truncated or missing file, newer format
    │   ├── UnsafeCheckpointError        loading it would need code execution (refused, never retried
    │   │                                unsafely)
    │   └── CheckpointPrunedError        (also a CheckpointNotFoundError) its files were deleted by
    │                                    track(keep=...); the message names where the alias is
    ├── ArchitectureMismatchError        the checkpoint's state_dict does not fit the model given
    └── UnsentError                      at exit, some metrics or checkpoints did not reach MLflow;
                                         the local copies are kept and ``mlflow_best.sync`` uploads them

Every message names the argument or file, what was expected, what was received, and the fix.
"""

from __future__ import annotations


class MlflowBestError(Exception):
    """Base class of every error raised by mlflow_best."""


class ConfigError(MlflowBestError, ValueError):
    """An argument has a value mlflow_best cannot work with."""


class MetricError(MlflowBestError, ValueError):
    """The metrics passed to ``Run.log_epoch`` are missing the monitored key or are not numbers."""


class TrackingStoreError(MlflowBestError):
    """The MLflow tracking store cannot be reached or refused a call."""


class TrackingStoreUnreachableError(TrackingStoreError):
    """The tracking store did not answer at all (refused, timed out, unknown host): an outage.

    Attributes:
        uri: the tracking URI that did not answer (any password replaced by ``***``).
    """

    def __init__(self, message: str, uri: str) -> None:
        super().__init__(message)
        self.uri = uri

    def __reduce__(self) -> tuple[type[TrackingStoreUnreachableError], tuple[str, str]]:
        return type(self), (str(self), self.uri)


class CheckpointNotFoundError(MlflowBestError, LookupError):
    """A reference names no run, model, version or alias, or the run has no checkpoint yet."""


class CheckpointError(MlflowBestError):
    """A checkpoint is damaged, incomplete, or of a format this version cannot read."""


class UnsafeCheckpointError(CheckpointError):
    """Loading the checkpoint would execute code from it; it is refused."""


class CheckpointPrunedError(CheckpointNotFoundError, CheckpointError):
    """The version (or LoggedModel) exists, but ``track(keep=...)`` deleted its checkpoint files."""


class ArchitectureMismatchError(MlflowBestError):
    """The checkpoint's model ``state_dict`` does not match the model it is loaded into."""


class UnsentError(MlflowBestError):
    """Some metrics or checkpoints did not reach MLflow before the run ended.

    Attributes:
        staging_dir: the local folder that holds everything not yet sent.
        pending: a human-readable line per item that is still waiting.
    """

    def __init__(self, message: str, staging_dir: str, pending: list[str]) -> None:
        super().__init__(message)
        self.staging_dir = staging_dir
        self.pending = pending

    def __reduce__(self) -> tuple[type[UnsentError], tuple[str, str, list[str]]]:
        # Exceptions pickle their ``args`` (the message only); multiprocessing and Ray need all three.
        return (type(self), (str(self), self.staging_dir, self.pending))
