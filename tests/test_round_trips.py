"""Fewer MLflow calls and one write per improvement, with the same outcome in MLflow (issue 15)."""

from __future__ import annotations

import errno
import functools
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient

import mlflow_best
from mlflow_best._criterion import Criterion
from mlflow_best._registry import ensure_registered_model, move_alias_to_best
from mlflow_best._tags import TAG, V_MODE, V_MODEL_ID, V_MONITOR, V_VALUE
from mlflow_best._upload import upload_folder
from tests.helpers import unique


@pytest.fixture
def mlflow_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The names of the MlflowClient methods called (outermost calls only), on the real store."""
    calls: list[str] = []
    depth = threading.local()

    def counting(name: str, method: Any) -> Any:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            level = getattr(depth, "n", 0)
            if level == 0:
                calls.append(name)
            depth.n = level + 1
            try:
                return method(*args, **kwargs)
            finally:
                depth.n = level

        return call

    for name in dir(MlflowClient):
        method = getattr(MlflowClient, name)
        if not name.startswith("_") and callable(method):
            monkeypatch.setattr(MlflowClient, name, counting(name, method))
    yield calls


def _train(values: list[float], name: str, experiment: str) -> mlflow_best.Run:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    with mlflow_best.track(model, torch.optim.SGD(model.parameters(), lr=0.1), experiment=experiment,
                           registered_model=name, alias="best",
                           model_args={"in_features": 4, "out_features": 2},
                           verbose=False) as run:
        for epoch, v in enumerate(values):
            run.log_epoch(epoch, {"val_loss": v})
    return run


def test_an_improvement_costs_at_most_ten_mlflow_calls_and_lands_whole(
    sqlite_uri: str, mlflow_calls: list[str]
) -> None:
    """Six epochs each time: one improvement, then five; the difference is what four improvements cost."""
    experiment = unique("calls")
    _train([1.0, 2.0, 2.0, 2.0, 2.0, 2.0], unique("one"), experiment)
    one = len(mlflow_calls)
    mlflow_calls.clear()
    name = unique("five")
    run = _train([1.0, 0.9, 0.8, 0.7, 0.6, 2.0], name, experiment)
    per_improvement = (len(mlflow_calls) - one) / 4
    assert per_improvement <= 10, (per_improvement, sorted(mlflow_calls))

    # The same outcome as before the calls were cut: five versions, the alias on the last one, the
    # run's tags on it, and every epoch's metric once, the improving ones linked to their model.
    client = MlflowClient(sqlite_uri)
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    assert [v.tags[V_VALUE] for v in versions] == ["1.0", "0.9", "0.8", "0.7", "0.6"]
    assert str(client.get_model_version_by_alias(name, "best").version) == str(versions[-1].version)
    tags = client.get_run(run.run_id).data.tags
    assert tags[TAG + "best_version"] == str(versions[-1].version) and tags[TAG + "best_epoch"] == "4"
    history = client.get_metric_history(run.run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.9), (2, 0.8), (3, 0.7), (4, 0.6),
                                                    (5, 2.0)]
    for v in versions:
        model = client.get_logged_model(v.tags[V_MODEL_ID])
        assert str(model.status).endswith("READY")
        assert [m.value for m in model.metrics or [] if m.key == "val_loss"] == [float(v.tags[V_VALUE])]
        assert f'"version": {v.version}' in model.tags["mlflow.modelVersions"]
    restored = mlflow_best.restore(f"models:/{name}@best", model=torch.nn.Linear(4, 2))
    assert restored.epoch == 4


def _bytes_written() -> int:
    os.sync()
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no write_bytes in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's per-process I/O counters")
def test_a_local_store_gets_each_checkpoint_written_once(sqlite_uri: str, tmp_path: Path) -> None:
    """Staged files are hard-linked into the local artifact store: the bytes hit the disk once, not twice."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1000, 1000)  # 4 MB of weights; SGD without momentum has no state
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    before = _bytes_written()
    with mlflow_best.track(model, torch.optim.SGD(model.parameters(), lr=0.1), experiment=unique("once"),
                           model_args={"in_features": 1000, "out_features": 1000}, verbose=False) as run:
        for epoch in range(3):
            run.log_epoch(epoch, {"val_loss": 1.0 - epoch / 10})
    written = _bytes_written() - before
    assert written < 1.5 * 3 * size, f"{written / 1e6:.1f} MB for 3 checkpoints of {size / 1e6:.1f} MB"
    restored = mlflow_best.restore(run.run_id, model=torch.nn.Linear(1000, 1000))
    assert restored.epoch == 2  # the staged copy is gone; the store's file still holds every byte
    assert torch.equal(restored.model.weight, model.weight)


def _folder(root: Path) -> Path:
    (root / "code" / "pkg").mkdir(parents=True)
    (root / "model.pt").write_bytes(os.urandom(1 << 16))
    (root / "MLmodel").write_text("flavors: {}\n")
    (root / "code" / "pkg" / "net.py").write_text("X = 1\n")
    return root


def test_upload_links_into_a_local_store_and_copies_across_filesystems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _folder(tmp_path / "staged")
    store = tmp_path / "store"
    assert upload_folder("sqlite:///unused.db", str(store / "a"), src) == "linked"
    for rel in ("model.pt", "MLmodel", "code/pkg/net.py"):
        assert os.path.samefile(src / rel, store / "a" / rel), rel
    assert upload_folder("sqlite:///unused.db", str(store / "a"), src) == "linked"  # a retry: no error

    def cross_device(*args: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    assert upload_folder("sqlite:///unused.db", (store / "b").as_uri(), src) == "linked"
    for rel in ("model.pt", "MLmodel", "code/pkg/net.py"):
        assert not os.path.samefile(src / rel, store / "b" / rel)
        assert (src / rel).read_bytes() == (store / "b" / rel).read_bytes()
    assert not [p for p in store.rglob("*.tmp")]


def test_a_stale_alias_write_is_repaired_by_the_writer_that_made_it(sqlite_uri: str) -> None:
    """A writer that chose its target before a better version existed, and wrote it after the better
    writer had finished, must see its mistake in its own check and move the alias back."""
    client = MlflowClient(sqlite_uri)
    name = unique("stale")
    ensure_registered_model(client, name)
    run_id = client.create_run(client.create_experiment(unique("stale"))).info.run_id

    def register(value: float) -> str:
        tags = {V_MONITOR: "val_loss", V_MODE: "min", V_VALUE: repr(value)}
        return str(client.create_model_version(name, f"runs:/{run_id}/c-{value}", run_id, tags=tags).version)

    class Late:
        """The real client; its first alias write waits until told (the better writer is done)."""

        def __init__(self) -> None:
            self.waiting, self.go, self.first = threading.Event(), threading.Event(), True

        def __getattr__(self, attr: str) -> Any:
            return getattr(client, attr)

        def set_registered_model_alias(self, *args: Any) -> None:
            if self.first:
                self.first = False
                self.waiting.set()
                assert self.go.wait(30)
            client.set_registered_model_alias(*args)

    worse = register(0.9)
    late, outcome = Late(), []
    criterion = Criterion("min")
    slow = threading.Thread(target=lambda: outcome.append(
        move_alias_to_best(late, name, "best", "val_loss", criterion, mine=worse)))
    slow.start()
    assert late.waiting.wait(30)  # it chose `worse` and is about to write it
    better = register(0.5)
    assert move_alias_to_best(client, name, "best", "val_loss", criterion, mine=better) == better
    late.go.set()  # the stale write lands after the better writer returned
    slow.join(30)
    assert outcome == [better]
    assert str(client.get_model_version_by_alias(name, "best").version) == better


def test_a_refused_creation_of_an_existing_registered_model_is_not_an_error(sqlite_uri: str) -> None:
    """A permissioned server may refuse to create models to a user who may write versions of one."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient(sqlite_uri)
    existing, missing = unique("existing"), unique("missing")
    client.create_registered_model(existing)

    class NoCreate:
        """The real store, as a user who may not create registered models sees it."""

        def __getattr__(self, attr: str) -> Any:
            return getattr(client, attr)

        def create_registered_model(self, *args: Any, **kwargs: Any) -> None:
            raise MlflowException("not allowed to create registered models", error_code="PERMISSION_DENIED")

    ensure_registered_model(NoCreate(), existing)  # type: ignore[arg-type]
    with pytest.raises(MlflowException, match="not allowed"):
        ensure_registered_model(NoCreate(), missing)  # type: ignore[arg-type]

