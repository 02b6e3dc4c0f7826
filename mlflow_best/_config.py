"""``track`` configuration as data: validated in the constructor, before any run is started."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    _validate_metric_name,
    _validate_model_alias_name,
    _validate_model_name,
    _validate_param_name,
    _validate_tag_name,
)

from mlflow_best._criterion import Criterion, Mode
from mlflow_best._errors import ConfigError, MetricError


def home() -> Path:
    """Where staging folders and the restore cache live (``MLFLOW_BEST_HOME``, else ~/.cache)."""
    env = os.environ.get("MLFLOW_BEST_HOME")
    return Path(env) if env else Path.home() / ".cache" / "mlflow_best"


@dataclass(frozen=True)
class TrackConfig:
    monitor: str = "val_loss"
    mode: Mode = "min"
    min_delta: float = 0.0
    experiment: str | None = None
    registered_model: str | None = None
    alias: str | None = "best"
    model_args: dict[str, Any] | None = None
    model_factory: str | None = None
    params: dict[str, Any] | None = None
    tags: dict[str, Any] | None = None
    run_name: str | None = None
    resume: str | None = None
    tracking_uri: str | None = None
    keep: int | None = None
    save_last: bool | int = False
    staging_dir: str | None = None
    verbose: bool | None = None
    offline_timeout: float = 60.0
    criterion: Criterion = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "criterion", Criterion(self.mode, self.min_delta))
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ConfigError(f"monitor={self.monitor!r} must be a metric name, e.g. monitor='val_loss'")
        _mlflow_check(_validate_metric_name, self.monitor, "monitor")
        if len(self.monitor) > MAX_ENTITY_KEY_LENGTH - len("best_"):
            raise ConfigError(
                f"monitor={self.monitor[:40]!r}... is {len(self.monitor)} characters; track also logs "
                f"best_<monitor>, and MLflow accepts names of at most {MAX_ENTITY_KEY_LENGTH}; use a "
                "shorter name"
            )
        if self.registered_model is not None:
            if not isinstance(self.registered_model, str):
                raise ConfigError(f"registered_model={self.registered_model!r} must be a str or None")
            _mlflow_check(_validate_model_name, self.registered_model, "registered_model")
        if self.alias is not None:
            if not isinstance(self.alias, str):
                raise ConfigError(f"alias={self.alias!r} must be a str or None, e.g. alias='best'")
            _mlflow_check(_validate_model_alias_name, self.alias, "alias")
            if self.alias.lower() == "latest" or (self.alias[:1] in "vV" and self.alias[1:].isdigit()):
                raise ConfigError(
                    f"alias={self.alias!r} is reserved by the MLflow registry (latest, v<N>); "
                    "pick another name, e.g. alias='best'"
                )
        if self.model_args is not None:
            if not isinstance(self.model_args, dict):
                raise ConfigError(
                    f"model_args={self.model_args!r} must be a dict of the model's init kwargs, "
                    "e.g. model_args={'hidden': 64}"
                )
            try:
                json.dumps(self.model_args, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise ConfigError(
                    f"model_args={self.model_args!r} is not JSON-serialisable ({e}); pass plain numbers, "
                    "strings, lists and dicts so restore can rebuild the model"
                ) from e
        for name in ("params", "tags"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{name}={value!r} must be a dict or None")
            for key in value or {}:
                check_key(key, f"{name} key", ConfigError)
        if self.keep is not None and (
            isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 1
        ):
            raise ConfigError(f"keep={self.keep!r} must be None (keep every checkpoint) or an int >= 1")
        if not isinstance(self.save_last, (bool, int)) or (
            not isinstance(self.save_last, bool) and self.save_last < 1
        ):
            raise ConfigError(
                f"save_last={self.save_last!r} must be False, True (every epoch) or an int N >= 1 "
                "(every N epochs)"
            )
        if self.resume is not None and (not isinstance(self.resume, str) or not self.resume):
            raise ConfigError(f"resume={self.resume!r} must be the run id of an earlier run, e.g. run.run_id")
        if not isinstance(self.offline_timeout, (int, float)) or not math.isfinite(self.offline_timeout) or (
            self.offline_timeout < 0
        ):
            raise ConfigError(f"offline_timeout={self.offline_timeout!r} must be a number of seconds >= 0")

    @property
    def save_last_every(self) -> int:
        """0 when off, else save a "last" checkpoint every N epochs."""
        if self.save_last is False:
            return 0
        return 1 if self.save_last is True else int(self.save_last)


def check_key(key: Any, what: str, error: type[ConfigError] | type[MetricError] = MetricError) -> None:
    """Apply MLflow's own rules for metric, param and tag names; raise ``error`` naming the rule.

    MLflow would refuse the name later, in the background; refusing it here keeps the run clean.
    """
    if not isinstance(key, str) or not key:
        raise error(f"{what} {key!r} must be a non-empty str")
    if len(key) > MAX_ENTITY_KEY_LENGTH:
        raise error(
            f"{what} {key[:40]!r}... is {len(key)} characters; MLflow accepts at most "
            f"{MAX_ENTITY_KEY_LENGTH}. Use a shorter name"
        )
    check: Any = _validate_tag_name if what.startswith("tags") else (
        _validate_param_name if what.startswith("params") else _validate_metric_name
    )
    try:
        check(key)
    except MlflowException as e:
        rule = e.message.split("supplied: ", 1)[-1]
        safe = "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in key).strip("/") or "metric"
        raise error(f"{what} {key!r} is refused by MLflow: {rule} Rename it, e.g. {safe!r}") from e


def _mlflow_check(check: Any, value: str, arg: str) -> None:
    try:
        check(value)
    except MlflowException as e:
        raise ConfigError(f"{arg}={value!r} is not accepted by MLflow: {e.message}") from e
