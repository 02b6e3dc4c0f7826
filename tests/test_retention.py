"""keep=N: only the N best checkpoints keep their files; pruned versions stay listed, tagged."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlflow import MlflowClient

import mlflow_best
from mlflow_best import ConfigError, _registry
from mlflow_best._criterion import Mode
from mlflow_best._retention import Candidate, aliases_of, to_prune
from mlflow_best._tags import V_MODEL_ID, V_PRUNED
from tests.helpers import run_sequence, unique


def _stored_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_keep_deletes_the_files_of_checkpoints_outside_the_n_best(store: str) -> None:
    name = unique("model")
    values = [1.0, 0.9, 0.8, 0.85, 0.7, 0.6]
    run, _, _ = run_sequence(values, experiment=unique("e"), registered_model=name, keep=2)
    client = MlflowClient(store)
    versions = {str(v.version): v.tags for v in client.search_model_versions(f"name='{name}'")}
    assert sorted(versions, key=int) == ["1", "2", "3", "4", "5"]  # every improvement got a version
    pruned = sorted((v for v, t in versions.items() if t.get("mlflow_best.pruned") == "true"), key=int)
    assert pruned == ["1", "2", "3"]
    assert str(client.get_model_version_by_alias(name, "best").version) == "5"
    assert mlflow_best.restore(f"models:/{name}/4").epoch == 4
    assert mlflow_best.restore(f"models:/{name}@best").epoch == 5
    with pytest.raises(mlflow_best.CheckpointNotFoundError, match=r"version 1 .* was pruned by track"):
        mlflow_best.restore(f"models:/{name}/1")
    exp_id = client.get_run(run.run_id).info.experiment_id
    models = client.search_logged_models([exp_id])
    assert sum(m.tags.get("mlflow_best.pruned") == "true" for m in models) == 3
    if store.startswith("sqlite"):
        for m in models:
            has_files = Path(m.artifact_location).joinpath("model.pt").exists()
            assert has_files == (m.tags.get("mlflow_best.pruned") != "true"), m.name


def _files_kept(client: MlflowClient, name: str, version: str) -> bool:
    mv = client.get_model_version(name, version)
    model_id = mv.tags[V_MODEL_ID]
    return Path(client.get_logged_model(model_id).artifact_location).joinpath("model.pt").exists()


def test_a_version_holding_any_alias_is_never_pruned(sqlite_uri: str) -> None:
    """A promoted @champion on this run's own old checkpoint, and an alias of another registered
    model the checkpoint was also registered into, both protect it from keep=1."""
    name, other = unique("model"), unique("prod")
    client = MlflowClient(sqlite_uri)
    first, _, _ = run_sequence([1.0], registered_model=name, keep=1)  # v1: epoch 0
    client.set_registered_model_alias(name, "champion", "1")
    values = [1.0, 0.9, 0.8, 0.7]
    run_sequence(values[:2], registered_model=name, keep=1, resume=first.run_id)  # v2: epoch 1
    model_id = client.get_model_version(name, "2").tags[V_MODEL_ID]
    registered = mlflow.register_model(f"models:/{model_id}", other)  # writes mlflow.modelVersions
    client.set_registered_model_alias(other, "live", str(registered.version))
    run_sequence(values, registered_model=name, keep=1, resume=first.run_id)  # v3, v4: epochs 2, 3

    tags = {str(v.version): v.tags for v in client.search_model_versions(f"name='{name}'")}
    assert sorted(tags, key=int) == ["1", "2", "3", "4"]
    # v1 (@champion) and v2 (registered as other@live) are outside the best 1, yet keep their files;
    # v3 holds no alias and is pruned; v4 is the best.
    assert {v: t.get(V_PRUNED) for v, t in tags.items()} == {"1": None, "2": None, "3": "true", "4": None}
    assert [_files_kept(client, name, v) for v in ("1", "2", "3", "4")] == [True, True, False, True]
    assert mlflow_best.restore(f"models:/{name}@champion").epoch == 0
    assert mlflow_best.restore(f"models:/{other}@live").epoch == 1
    assert mlflow_best.restore(f"models:/{name}@best").epoch == 3


def test_a_version_is_tagged_pruned_before_its_files_are_deleted(
    sqlite_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = unique("model")
    client = MlflowClient(sqlite_uri)
    seen: list[tuple[str | None, str | None]] = []
    delete = _registry._delete_artifacts

    def observed(artifact_uri: str, path: str | None = None) -> None:
        # What another reader of the registry sees at the instant the files go.
        models = client.search_logged_models([experiment_id])
        model = next(m for m in models if m.artifact_location == artifact_uri)
        version = client.get_model_version(name, model.tags["mlflow_best.version"])
        seen.append((version.tags.get(V_PRUNED), model.tags.get(V_PRUNED)))
        delete(artifact_uri, path)

    experiment = unique("e")
    experiment_id = client.create_experiment(experiment)
    monkeypatch.setattr(_registry, "_delete_artifacts", observed)
    run_sequence([1.0, 0.9, 0.8], registered_model=name, keep=1, experiment=experiment)
    assert seen == [("true", "true"), ("true", "true")]


def test_a_promotion_racing_the_prune_wins_and_keeps_the_files(
    sqlite_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process sets @champion on v1 after the prune read the aliases and tagged v1 pruned,
    before its files go: the prune sees the alias when it looks again, untags v1 and keeps them."""
    name = unique("model")
    promoter = MlflowClient(sqlite_uri)
    tag = MlflowClient.set_logged_model_tags
    promoted: list[str] = []

    def then_promote(self: MlflowClient, model_id: str, tags: dict[str, str]) -> None:
        tag(self, model_id, tags)
        if V_PRUNED in tags and not promoted:
            version = promoter.get_logged_model(model_id).tags["mlflow_best.version"]
            promoter.set_registered_model_alias(name, "champion", version)
            promoted.append(version)

    monkeypatch.setattr(MlflowClient, "set_logged_model_tags", then_promote)
    run_sequence([1.0, 0.9], registered_model=name, keep=1)
    assert promoted == ["1"]
    v1 = promoter.get_model_version(name, "1")
    assert v1.tags.get(V_PRUNED) is None
    assert V_PRUNED not in promoter.get_logged_model(v1.tags[V_MODEL_ID]).tags
    assert _files_kept(promoter, name, "1")
    assert mlflow_best.restore(f"models:/{name}@champion").epoch == 0


# -- the policy alone (pure: no MLflow) ------------------------------------------------------------
candidates = st.lists(
    st.builds(
        Candidate,
        id=st.uuids().map(str),
        epoch=st.integers(0, 50),
        value=st.one_of(st.integers(-3, 3).map(float), st.floats(-1e6, 1e6)),
        aliases=st.frozensets(st.sampled_from(["m@best", "m@champion", "prod@live"]), max_size=2),
    ),
    max_size=12,
    unique_by=lambda c: c.epoch,  # one checkpoint per epoch, as in a run
)


def ranks_above(mode: str, a: Candidate, b: Candidate) -> bool:
    """``a`` is one of the better ones than ``b``: a better value, or the same value and earlier."""
    better = a.value < b.value if mode == "min" else a.value > b.value
    return better or (a.value == b.value and a.epoch < b.epoch)


@given(candidates, st.integers(1, 6), st.sampled_from(["min", "max"]))
def test_what_is_pruned_is_outside_the_keep_best_and_holds_no_alias(
    found: list[Candidate], keep: int, mode: Mode
) -> None:
    pruned = to_prune(found, keep, mode)
    assert len({c.id for c in pruned}) == len(pruned) and all(c in found for c in pruned)
    for c in found:
        better = sum(ranks_above(mode, other, c) for other in found if other is not c)
        if c in pruned:
            assert not c.aliases, c  # an alias, any alias, protects
            assert better >= keep, c  # at least `keep` checkpoints are better
        elif not c.aliases:
            assert better < keep, c  # kept without an alias: one of the `keep` best


@pytest.mark.parametrize(
    ("mode", "values", "aliased", "keep", "expected"),
    [
        # Written out by hand: (epoch = index) values, aliased epochs -> pruned epochs, worst first.
        ("min", [1.0, 0.9, 0.8, 0.85, 0.7, 0.6], set(), 2, [0, 1, 3, 2]),
        ("min", [1.0, 0.9, 0.8], {0}, 1, [1]),
        ("max", [0.1, 0.5, 0.3], {1}, 1, [0, 2]),  # the alias holder is the best: it takes the slot
        ("min", [0.5, 0.5, 0.7], set(), 1, [2, 1]),  # a tie: the earlier epoch ranks first
        ("min", [0.5, math.nan, 0.7], set(), 1, [2]),  # what cannot be ranked is kept
        ("min", [0.3], set(), 1, []),
    ],
)
def test_to_prune_examples(
    mode: Mode, values: list[float], aliased: set[int], keep: int, expected: list[int]
) -> None:
    found = [
        Candidate(f"m-{e}", e, v, frozenset({"m@champion"}) if e in aliased else frozenset())
        for e, v in enumerate(values)
    ]
    assert [c.epoch for c in to_prune(found, keep, mode)] == expected


def test_aliases_are_matched_per_registered_model_and_version() -> None:
    aliases = {"m": {"best": "4", "champion": "2"}, "prod": {"live": "2"}}
    assert aliases_of([("m", "2")], aliases) == {"m@champion"}
    assert aliases_of([("m", "2"), ("prod", "2")], aliases) == {"m@champion", "prod@live"}
    assert aliases_of([("prod", "4"), ("gone", "1")], aliases) == frozenset()


def test_keep_below_one_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"keep=0 must be an int >= 1"):
        to_prune([], 0, "min")


def test_keep_reduces_bytes_stored(sqlite_uri: str, tmp_path: Path) -> None:
    values = [1.0 - 0.1 * i for i in range(6)]
    run_sequence(values, experiment="all", hidden=256)
    all_bytes = _stored_bytes(tmp_path / "mlruns")
    run_sequence(values, experiment="kept", hidden=256, keep=1)
    kept_bytes = _stored_bytes(tmp_path / "mlruns") - all_bytes
    assert kept_bytes < all_bytes / 3
