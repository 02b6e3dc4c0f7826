"""``track`` configuration as data: validated in the constructor, before any run is started."""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow_best._criterion import Criterion, Mode
from mlflow_best._errors import ConfigError, MetricError

# MLflow's naming rules (mlflow/utils/validation.py), restated so that checking a name needs no
# import of mlflow: every DDP rank checks its metric names, and only rank 0 talks to MLflow.
# tests/test_startup.py holds them against MLflow's own validators.
MAX_ENTITY_KEY_LENGTH = 250
_MAX_ALIAS_LENGTH = 255
_KEY_CHARACTERS = re.compile(r"^[/\w.\- ]*$" if os.name == "nt" else r"^[/\w.\- :]*$")
_ALIAS_CHARACTERS = re.compile(r"^[\w\-]*$")
_BAD_KEY_MESSAGE = (
    "Names may only contain alphanumerics, underscores (_), dashes (-), periods (.), spaces ( )"
    + ("" if os.name == "nt" else ", colon(:)")
    + " and slashes (/)."
)


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
        _mlflow_check(key_rule, self.monitor, "monitor")
        if len(self.monitor) > MAX_ENTITY_KEY_LENGTH - len("best_"):
            raise ConfigError(
                f"monitor={self.monitor[:40]!r}... is {len(self.monitor)} characters; track also logs "
                f"best_<monitor>, and MLflow accepts names of at most {MAX_ENTITY_KEY_LENGTH}; use a "
                "shorter name"
            )
        if self.registered_model is not None:
            if not isinstance(self.registered_model, str):
                raise ConfigError(f"registered_model={self.registered_model!r} must be a str or None")
            _mlflow_check(model_name_rule, self.registered_model, "registered_model")
        if self.alias is not None:
            if not isinstance(self.alias, str):
                raise ConfigError(f"alias={self.alias!r} must be a str or None, e.g. alias='best'")
            _mlflow_check(alias_rule, self.alias, "alias")
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
    rule = key_rule(key)
    if rule is not None:
        safe = "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in key).strip("/") or "metric"
        raise error(f"{what} {key!r} is refused by MLflow: {rule} Rename it, e.g. {safe!r}")


def key_rule(key: str) -> str | None:
    """The rule of MLflow's that a metric, param or tag name breaks, or None when it is accepted."""
    if not _KEY_CHARACTERS.match(key):
        return _BAD_KEY_MESSAGE
    if _path_not_unique(key):
        return _bad_path_message(key)
    return None


def model_name_rule(name: str) -> str | None:
    """The rule of MLflow's that a registered model name breaks, or None when it is accepted."""
    if not name.strip():
        return "Missing value for required parameter 'name'."
    if "/" in name or ":" in name:
        return f"Invalid model name '{name}'. Names cannot contain '/' or ':'."
    if _path_not_unique(name):
        return f"Invalid value {json.dumps(name)} for parameter 'name' supplied: {_bad_path_message(name)}"
    return None


def alias_rule(alias: str) -> str | None:
    """The rule of MLflow's that a registered model alias breaks, or None when it is accepted."""
    if not alias:
        return "Registered model alias name cannot be empty."
    if not _ALIAS_CHARACTERS.match(alias):
        return (
            f"Invalid alias name: '{alias}'. Names may only contain alphanumerics, underscores (_), "
            "and dashes (-)."
        )
    if len(alias) > _MAX_ALIAS_LENGTH:
        return f"'Registered model alias name' exceeds the maximum length of {_MAX_ALIAS_LENGTH} characters"
    return None


def _path_not_unique(name: str) -> bool:
    norm = posixpath.normpath(name)
    return norm != name or norm == "." or norm.startswith("..") or norm.startswith("/")


def _bad_path_message(name: str) -> str:
    return (
        "Names may be treated as files in certain cases, and must not resolve to other names when "
        f"treated as such. This name would resolve to {posixpath.normpath(name)!r}"
    )


def _mlflow_check(rule: Callable[[str], str | None], value: str, arg: str) -> None:
    broken = rule(value)
    if broken is not None:
        raise ConfigError(f"{arg}={value!r} is not accepted by MLflow: {broken}")
