"""A checkpoint's identity and every name derived from it, spelled in one place (``CheckpointId``)."""

from __future__ import annotations

import math

import pytest

from mlflow_best._checkpoint import CheckpointId
from mlflow_best._errors import ConfigError


def test_best_and_last_names() -> None:
    best = CheckpointId("best", 6, "val/loss", 0.6)
    assert best.name == "epoch=0006-val_loss=0.6000"
    assert best.logged_model_name == "epoch=0006-val_loss=0_6000"
    last = CheckpointId("last", 12, "val_loss", 0.9)
    assert last.name == "last-epoch=0012"
    assert last.artifact_path == "checkpoints/last-epoch=0012"
    assert CheckpointId.last_epoch_of(last.name) == 12
    assert CheckpointId.last_epoch_of(best.name) is None
    assert CheckpointId.last_epoch_of("last-epoch=12a") is None


def test_a_long_monitor_is_shortened_with_a_hash_so_two_never_share_a_name() -> None:
    a = CheckpointId("best", 1, "m" * 80 + "a", 1.0).name
    b = CheckpointId("best", 1, "m" * 80 + "b", 1.0).name
    assert a != b and len(a) < 100 and "/" not in a


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_best_checkpoint_refuses_a_value_that_is_not_finite(value: float) -> None:
    with pytest.raises(ConfigError, match="a best checkpoint needs a finite val_loss"):
        CheckpointId("best", 3, "val_loss", value)
    assert CheckpointId("last", 3, "val_loss", value).name == "last-epoch=0003"  # "last" is by epoch


def test_kind_and_epoch_are_checked() -> None:
    with pytest.raises(ConfigError, match="kind is 'best' or 'last', got 'first'"):
        CheckpointId("first", 0, "val_loss", 1.0)
    with pytest.raises(ConfigError, match="epoch is >= 0, got -1"):
        CheckpointId("best", -1, "val_loss", 1.0)
