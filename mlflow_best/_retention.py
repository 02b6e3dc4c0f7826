"""Which checkpoints ``keep=N`` prunes: a pure function of numbers and aliases, no MLflow calls.

``Publisher._prune`` (in ``_registry.py``) reads the run's checkpoints and the registry's aliases,
asks :func:`to_prune`, then tags and deletes. Keeping the decision here makes it testable on its own
(property-tested in ``tests/test_retention.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mlflow_best._criterion import Mode
from mlflow_best._errors import ConfigError


@dataclass(frozen=True)
class Candidate:
    """One of the run's checkpoints whose files are still stored.

    Attributes:
        id: the LoggedModel id.
        epoch: the epoch it was saved at.
        value: its monitored value.
        aliases: the aliases (``"name@alias"``) that point at a model version of it; any alias
            protects it, whoever set it (``track``'s own, or a promoted ``@champion``).
    """

    id: str
    epoch: int
    value: float
    aliases: frozenset[str] = frozenset()


def aliases_of(
    registrations: Iterable[tuple[str, str]], aliases: Mapping[str, Mapping[str, str]]
) -> frozenset[str]:
    """The aliases that point at any of ``registrations``.

    Args:
        registrations: ``(registered model name, version)`` pairs of one checkpoint.
        aliases: per registered model name, its aliases as ``{alias: version}``.

    Returns:
        ``"name@alias"`` for every alias held by one of those versions.
    """
    held: set[str] = set()
    for name, version in registrations:
        for alias, target in aliases.get(name, {}).items():
            if str(target) == str(version):
                held.add(f"{name}@{alias}")
    return frozenset(held)


def to_prune(candidates: Iterable[Candidate], keep: int, mode: Mode) -> list[Candidate]:
    """The checkpoints whose files go: outside the ``keep`` best, and holding no alias.

    The best are ranked by value under ``mode``; on a tie the earlier epoch ranks first (as the alias
    does: the earliest of equal versions holds it). A checkpoint that holds an alias is never
    pruned, and still counts among the ``keep`` best when it is one of them. A value that cannot be
    ranked (NaN, ±inf: never written by ``track``) is kept, never pruned.

    Args:
        candidates: the run's checkpoints that still have their files.
        keep: how many of the best keep their files (>= 1).
        mode: "min" (lower is better) or "max".

    Returns:
        The candidates to prune, worst first.
    """
    if keep < 1:
        raise ConfigError(f"keep={keep!r} must be an int >= 1 (how many of the best keep their files)")
    sign = 1.0 if mode == "min" else -1.0
    ranked = sorted(
        (c for c in candidates if math.isfinite(c.value)), key=lambda c: (sign * c.value, c.epoch)
    )
    return [c for c in reversed(ranked[keep:]) if not c.aliases]
