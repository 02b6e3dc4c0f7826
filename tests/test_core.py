"""The core contract of issue 2, against a real sqlite store and a real mlflow server."""

from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from mlflow import MlflowClient

import mlflow_best
from mlflow_best._state import SnapshotPool
from tests.helpers import TinyNet, run_sequence, unique


def _versions(client: MlflowClient, name: str) -> list[dict[str, str]]:
    found = client.search_model_versions(f"name='{name}'")
    return sorted(({"version": str(v.version), **v.tags} for v in found), key=lambda t: int(t["version"]))


# -- start ---------------------------------------------------------------------------------------
def test_start_creates_experiment_and_records_params_and_tags(store: str) -> None:
    exp = unique("exp")
    run, model, _ = run_sequence([1.0], experiment=exp, params={"batch_size": 32}, tags={"team": "vision"})
    client = MlflowClient(store)
    assert client.get_experiment_by_name(exp) is not None
    data = client.get_run(run.run_id).data
    assert data.params["monitor"] == "val_loss"
    assert data.params["mode"] == "min"
    assert data.params["min_delta"] == "0.0"
    assert data.params["model_class"] == "tests.helpers:TinyNet"
    assert data.params["model_parameters"] == str(sum(p.numel() for p in model.parameters()))
    assert data.params["optimizer_class"] == "torch.optim.adam:Adam"
    assert data.params["optimizer.lr"] == "0.01"
    assert data.params["batch_size"] == "32"
    assert data.tags["team"] == "vision"
    assert data.tags["mlflow_best.version"] == mlflow_best.__version__


# -- log_epoch -----------------------------------------------------------------------------------
def test_every_metric_is_logged_once_per_epoch_with_best(store: str) -> None:
    values = [1.0, 0.8, 0.9, 0.5, 0.6]
    run, _, _ = run_sequence(values, experiment=unique("exp"), registered_model=unique("m"))
    client = MlflowClient(store)
    for key in ("val_loss", "train_loss", "best_val_loss"):
        history = client.get_metric_history(run.run_id, key)
        assert sorted(m.step for m in history) == list(range(len(values))), key
    best = {m.step: m.value for m in client.get_metric_history(run.run_id, "best_val_loss")}
    assert best == {0: 1.0, 1: 0.8, 2: 0.8, 3: 0.5, 4: 0.5}
    assert run.improvements == [0, 1, 3]


def test_nan_and_inf_never_improve_and_the_first_finite_value_does(sqlite_uri: str) -> None:
    run, _, _ = run_sequence([math.nan, math.inf, 2.0, -math.inf, math.nan, 1.0], experiment=unique("e"))
    assert run.improvements == [2, 5]
    assert run.best.epoch == 5


def test_min_delta_and_max_mode(sqlite_uri: str) -> None:
    model = TinyNet()
    with mlflow_best.track(model, None, monitor="acc", mode="max", min_delta=0.05) as run:
        got = [run.log_epoch(e, {"acc": v}) for e, v in enumerate([0.5, 0.54, 0.56, 0.6, 0.7])]
    assert got == [True, False, True, False, True]


def _replace_everywhere(monkeypatch: pytest.MonkeyPatch, original: object, replacement: object) -> int:
    """Point every name bound to ``original`` in the package's modules at ``replacement``."""
    count = 0
    for name, module in list(sys.modules.items()):
        if name == "mlflow_best" or name.startswith("mlflow_best."):
            for attr, value in list(vars(module).items()):
                if value is original:
                    monkeypatch.setattr(module, attr, replacement)
                    count += 1
    return count


def test_log_epoch_returns_before_the_checkpoint_is_written(
    sqlite_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow_best import _checkpoint

    # The write is held until the test lets it go, which it does only once log_epoch has returned: a
    # log_epoch that waited for the write would hold the write's gate closed until it times out.
    gate = threading.Event()
    opened_by_test: list[bool] = []
    write = _checkpoint.write_checkpoint

    def held(*args: object, **kwargs: object) -> object:
        opened_by_test.append(gate.wait(timeout=30))
        return write(*args, **kwargs)  # type: ignore[arg-type]

    assert _replace_everywhere(monkeypatch, write, held) >= 1
    model = TinyNet()
    with mlflow_best.track(model, None, experiment=unique("e"), model_args={"hidden": 8}) as run:
        assert run.log_epoch(0, {"val_loss": 1.0}) is True
        checkpoints = run.staging_dir / "checkpoints"
        assert not list(checkpoints.glob("*/manifest.json"))  # returned with the write still to come
        gate.set()
    assert opened_by_test == [True]
    assert mlflow_best.restore(run.run_id).epoch == 0  # and the write, let go, completed


# -- checkpoints in MLflow -----------------------------------------------------------------------
def test_each_improvement_is_a_logged_model_and_a_version_in_order(store: str) -> None:
    name = unique("model")
    run, _, _ = run_sequence([1.0, 0.8, 0.9, 0.5], experiment=unique("exp"), registered_model=name)
    client = MlflowClient(store)
    versions = _versions(client, name)
    assert [(v["version"], v["epoch"], v["value"]) for v in versions] == [
        ("1", "0", "1.0"), ("2", "1", "0.8"), ("3", "3", "0.5")
    ]
    assert all(v["monitor"] == "val_loss" and len(v["sha256"]) == 64 for v in versions)
    assert str(client.get_model_version_by_alias(name, "best").version) == "3"
    exp_id = client.get_run(run.run_id).info.experiment_id
    models = client.search_logged_models([exp_id])
    assert sorted(m.name for m in models) == [
        "epoch=0000-val_loss=1_0000", "epoch=0001-val_loss=0_8000", "epoch=0003-val_loss=0_5000"
    ]
    assert {m.tags["mlflow_best.checkpoint"] for m in models} == {
        "epoch=0000-val_loss=1.0000", "epoch=0001-val_loss=0.8000", "epoch=0003-val_loss=0.5000"
    }
    outputs = client.get_run(run.run_id).outputs.model_outputs
    assert sorted(o.step for o in outputs) == [0, 1, 3]
    tags = client.get_run(run.run_id).data.tags
    best = (tags["mlflow_best.best_epoch"], tags["mlflow_best.best_value"], tags["mlflow_best.best_version"])
    assert best == ("3", "0.5", "3")
    # The LoggedModel of epoch 3, as MLflow lists it: the one version 3 was made from.
    epoch3 = next(m.model_id for m in models if m.name == "epoch=0003-val_loss=0_5000")
    assert versions[2]["mlflow_best.model_id"] == epoch3
    assert run.best == mlflow_best.Best(epoch=3, value=0.5, version="3", model_id=epoch3)


def test_the_alias_moves_only_to_a_version_that_beats_its_holder_across_runs(store: str) -> None:
    name = unique("model")
    exp = unique("exp")
    run_sequence([1.0, 0.3], experiment=exp, registered_model=name)
    client = MlflowClient(store)
    assert str(client.get_model_version_by_alias(name, "best").version) == "2"
    run_sequence([0.9, 0.5, 0.4], experiment=exp, registered_model=name)  # never beats 0.3
    assert str(client.get_model_version_by_alias(name, "best").version) == "2"
    assert len(_versions(client, name)) == 5
    run_sequence([0.2], experiment=exp, registered_model=name)
    assert str(client.get_model_version_by_alias(name, "best").version) == "6"


def test_without_registered_model_checkpoints_are_logged_but_nothing_is_registered(store: str) -> None:
    run, _, _ = run_sequence([1.0, 0.5], experiment=unique("exp"), registered_model=None)
    client = MlflowClient(store)
    assert run.best.version is None
    assert "mlflow_best.best_model_id" in client.get_run(run.run_id).data.tags
    assert mlflow_best.restore(run.run_id).epoch == 1


# -- end -----------------------------------------------------------------------------------------
def test_run_statuses_and_the_exception_propagates_unchanged(sqlite_uri: str) -> None:
    client = MlflowClient(sqlite_uri)
    model = TinyNet()
    with mlflow_best.track(model, None, experiment=unique("e")) as ok:
        ok.log_epoch(0, {"val_loss": 1.0})
    assert client.get_run(ok.run_id).info.status == "FINISHED"

    error = ValueError("boom in epoch 1")
    with (
        pytest.raises(ValueError, match="boom in epoch 1") as caught,
        mlflow_best.track(model, None) as failed,
    ):
        failed.log_epoch(0, {"val_loss": 1.0})
        raise error
    assert caught.value is error
    assert client.get_run(failed.run_id).info.status == "FAILED"
    assert mlflow_best.restore(failed.run_id).epoch == 0  # what was saved before the error is kept

    with pytest.raises(KeyboardInterrupt, match="Ctrl-C"), mlflow_best.track(model, None) as killed:
        killed.log_epoch(0, {"val_loss": 1.0})
        raise KeyboardInterrupt("Ctrl-C")
    assert client.get_run(killed.run_id).info.status == "KILLED"
    assert mlflow.active_run() is None


def test_inside_the_block_the_run_is_mlflows_active_run(sqlite_uri: str) -> None:
    with mlflow_best.track(TinyNet(), None) as run:
        assert mlflow.active_run() is not None
        assert mlflow.active_run().info.run_id == run.run_id
        mlflow.log_param("extra", "yes")
        run.log_epoch(0, {"val_loss": 1.0})
    assert mlflow.active_run() is None
    assert MlflowClient(sqlite_uri).get_run(run.run_id).data.params["extra"] == "yes"


def test_a_dead_server_at_exit_never_hides_the_users_exception(tmp_path: Path) -> None:
    from tests._server import MlflowServer, postgres_available

    if postgres_available() is not None:
        pytest.skip(postgres_available())
    server = MlflowServer(tmp_path / "srv").start()
    try:
        with (
            pytest.warns(RuntimeWarning, match=rf"did not reach MLflow at '{re.escape(server.url)}'") as seen,
            pytest.raises(ZeroDivisionError, match="division by zero"),
            mlflow_best.track(TinyNet(), None, tracking_uri=server.url, offline_timeout=1) as run,
        ):
            run.log_epoch(0, {"val_loss": 1.0})
            server.stop()
            run.log_epoch(1, {"val_loss": 0.5})
            _ = 1 / 0
    finally:
        server.drop()
    # The warning says what is left and how to send it, for this run.
    unsent = next(str(w.message) for w in seen if "did not reach MLflow" in str(w.message))
    assert f"mlflow_best.sync({run.run_id!r})" in unsent and "epoch=0001-val_loss=0.5000" in unsent


# -- resume --------------------------------------------------------------------------------------
def test_resume_continues_the_same_run_and_the_best_carries_over(store: str) -> None:
    exp, name = unique("exp"), unique("model")
    first, _, _ = run_sequence([1.0, 0.4, 0.6], experiment=exp, registered_model=name)
    model2 = TinyNet()
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.01)
    with mlflow_best.track(model2, opt2, experiment=exp, registered_model=name, resume=first.run_id) as run:
        assert run.run_id == first.run_id
        assert run.start_epoch == 2  # the epoch after the latest checkpoint (epoch 1)
        assert run.best.value == 0.4 and run.best.epoch == 1
        for k, v in model2.state_dict().items():
            assert torch.equal(v, mlflow_best.restore(first.run_id).model.state_dict()[k])
        assert run.log_epoch(2, {"val_loss": 0.5}) is False  # worse than the carried-over best
        assert run.log_epoch(3, {"val_loss": 0.1}) is True
    client = MlflowClient(store)
    assert client.get_run(run.run_id).info.status == "FINISHED"
    assert [v["epoch"] for v in _versions(client, name)] == ["0", "1", "3"]


def test_resume_of_a_run_without_checkpoint_starts_at_epoch_0_with_a_warning(sqlite_uri: str) -> None:
    with mlflow_best.track(TinyNet(), None) as first:
        first.log_epoch(0, {"val_loss": math.nan})
    with pytest.warns(RuntimeWarning, match="has no checkpoint yet"), mlflow_best.track(
        TinyNet(), None, resume=first.run_id
    ) as run:
        assert run.start_epoch == 0


# -- restore -------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["run_id", "runs", "version", "alias"])
def test_restore_by_every_reference_gives_the_exact_best_weights(store: str, form: str) -> None:
    name = unique("model")
    snaps: dict[int, dict[str, torch.Tensor]] = {}
    run, _, _ = run_sequence(
        [1.0, 0.5, 0.7, 0.6], experiment=unique("e"), registered_model=name, snapshots=snaps
    )
    ref = {
        "run_id": run.run_id,
        "runs": f"runs:/{run.run_id}",
        "version": f"models:/{name}/2",
        "alias": f"models:/{name}@best",
    }[form]
    r = mlflow_best.restore(ref, device="cpu")
    assert r.epoch == 1 and r.run_id == run.run_id and r.version == "2"
    assert r.metrics["val_loss"] == 0.5
    assert isinstance(r.model, TinyNet)  # rebuilt from its import path and model_args
    state = r.model.state_dict()
    assert set(state) == set(snaps[1])
    for key, tensor in snaps[1].items():
        assert torch.equal(state[key], tensor), key
    assert isinstance(r.optimizer, torch.optim.Adam)
    assert all(s["exp_avg"].device.type == "cpu" for s in r.optimizer.state.values())


def test_restore_into_given_instances(sqlite_uri: str) -> None:
    snaps: dict[int, dict[str, torch.Tensor]] = {}
    run, _, _ = run_sequence([1.0, 0.5], snapshots=snaps)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    r = mlflow_best.restore(run.run_id, model=model, optimizer=opt)
    assert r.model is model and r.optimizer is opt
    assert opt.param_groups[0]["lr"] == 0.01  # the saved hyperparameters win
    assert torch.equal(model.fc1.weight, snaps[1]["fc1.weight"])
    assert len(opt.state) == 4


def test_restore_uses_the_cache_and_still_detects_a_changed_file(sqlite_uri: str, tmp_path: Path) -> None:
    snaps: dict[int, dict[str, torch.Tensor]] = {}
    run, _, _ = run_sequence([1.0], snapshots=snaps)
    stored = _logged_model_dir(run.run_id, sqlite_uri)
    first = mlflow_best.restore(run.run_id)
    # With the checkpoint's files gone from the store, only a cache hit can restore it: no download.
    aside = tmp_path / "stored-aside"
    stored.rename(aside)
    again = mlflow_best.restore(run.run_id)
    assert again.path == first.path and again.epoch == 0
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in snaps[0].items())
    (again.path / "model.pt").write_bytes(b"garbage")
    # The changed entry is never loaded; with nothing in the store to download, restore says so.
    model_id = MlflowClient(sqlite_uri).get_run(run.run_id).data.tags["mlflow_best.best_model_id"]
    with pytest.raises(mlflow_best.MlflowBestError, match=r"download.*" + re.escape(model_id)):
        mlflow_best.restore(run.run_id)
    aside.rename(stored)
    third = mlflow_best.restore(run.run_id)  # downloaded and verified anew
    assert third.epoch == 0 and (third.path / "model.pt").read_bytes() != b"garbage"
    assert all(torch.equal(third.model.state_dict()[k], v) for k, v in snaps[0].items())


# -- bad input -----------------------------------------------------------------------------------
def test_bad_configuration_is_refused_before_any_run_starts(sqlite_uri: str) -> None:
    model = TinyNet()
    with pytest.raises(mlflow_best.ConfigError, match=r"mode='minimum' is not a known mode.*mode='min'"):
        mlflow_best.track(model, None, mode="minimum")  # type: ignore[arg-type]
    with pytest.raises(mlflow_best.ConfigError, match="min_delta=-1"):
        mlflow_best.track(model, None, min_delta=-1)
    with pytest.raises(mlflow_best.ConfigError, match="monitor=3"):
        mlflow_best.track(model, None, monitor=3)  # type: ignore[arg-type]
    with pytest.raises(mlflow_best.ConfigError, match="registered_model='a/b'"):
        mlflow_best.track(model, None, registered_model="a/b")
    with pytest.raises(mlflow_best.ConfigError, match="alias='latest' is reserved"):
        mlflow_best.track(model, None, registered_model="x", alias="latest")
    with pytest.raises(mlflow_best.ConfigError, match=r"model_args=.*not JSON"):
        mlflow_best.track(model, None, model_args={"act": torch.nn.ReLU()})
    with pytest.raises(mlflow_best.ConfigError, match=r"model=str must be a torch\.nn\.Module"):
        mlflow_best.track("not a model", None)  # type: ignore[arg-type]
    assert MlflowClient(sqlite_uri).search_runs(["0"]) == []


def test_an_unreachable_tracking_store_is_reported_at_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with (
        pytest.raises(mlflow_best.TrackingStoreError, match=r"127\.0\.0\.1:9.*did not answer"),
        mlflow_best.track(TinyNet(), None, tracking_uri="http://127.0.0.1:9"),
    ):
        pass


def test_a_missing_monitor_names_the_keys_passed(sqlite_uri: str) -> None:
    with mlflow_best.track(TinyNet(), None, monitor="val_loss") as run:
        run.log_epoch(0, {"val_loss": 1.0})
        with pytest.raises(
            mlflow_best.MetricError, match=r"monitor='val_loss' is not in .*'loss', 'valid_loss'"
        ):
            run.log_epoch(1, {"loss": 1.0, "valid_loss": 0.5})
        with pytest.raises(mlflow_best.MetricError, match=r"metric 'val_acc' is 'high' \(str\)"):
            run.log_epoch(1, {"val_loss": 1.0, "val_acc": "high"})
        with pytest.raises(mlflow_best.MetricError, match=r"metric 'val_loss' is a tensor of shape \(2,\)"):
            run.log_epoch(1, {"val_loss": torch.ones(2)})
        with pytest.raises(mlflow_best.MetricError, match="epoch=0 was already logged"):
            run.log_epoch(0, {"val_loss": 0.1})
        assert run.log_epoch(1, {"val_loss": torch.tensor(0.5)}) is True
    assert mlflow_best.restore(run.run_id).epoch == 1  # bad calls lost nothing


def test_restore_of_unknown_references(sqlite_uri: str) -> None:
    name = unique("m")
    run, _, _ = run_sequence([1.0], registered_model=name)
    with pytest.raises(mlflow_best.CheckpointNotFoundError, match="was not found"):
        mlflow_best.restore("0" * 32)
    with pytest.raises(mlflow_best.CheckpointNotFoundError, match="has no version 7"):
        mlflow_best.restore(f"models:/{name}/7")
    with pytest.raises(mlflow_best.CheckpointNotFoundError, match="has no alias 'prod'"):
        mlflow_best.restore(f"models:/{name}@prod")
    with pytest.raises(mlflow_best.CheckpointNotFoundError, match="no-such-model"):
        mlflow_best.restore("models:/no-such-model/1")
    with pytest.raises(mlflow_best.ConfigError, match="not a reference restore understands"):
        mlflow_best.restore("last-tuesday")
    with mlflow_best.track(TinyNet(), None) as empty:
        empty.log_epoch(0, {"val_loss": math.nan})
    with pytest.raises(mlflow_best.CheckpointNotFoundError, match=f"run {empty.run_id} has no checkpoint"):
        mlflow_best.restore(empty.run_id)
    with pytest.raises(mlflow_best.ConfigError, match="device='tpu:0'"):
        mlflow_best.restore(run.run_id, device="tpu:0")


def _logged_model_dir(run_id: str, store: str) -> Path:
    client = MlflowClient(store)
    model_id = client.get_run(run_id).data.tags["mlflow_best.best_model_id"]
    return Path(client.get_logged_model(model_id).artifact_location)


def test_a_tampered_or_truncated_file_is_named_and_not_loaded(sqlite_uri: str) -> None:
    run, _, _ = run_sequence([1.0])
    stored = _logged_model_dir(run.run_id, sqlite_uri)
    original = (stored / "model.pt").read_bytes()
    (stored / "model.pt").write_bytes(original[:-10] + b"X" * 10)
    with pytest.raises(mlflow_best.CheckpointError, match=r"model\.pt fails its checksum"):
        mlflow_best.restore(run.run_id)
    (stored / "model.pt").write_bytes(original[:100])
    with pytest.raises(mlflow_best.CheckpointError, match=r"model\.pt is 100 bytes.*truncated"):
        mlflow_best.restore(run.run_id)
    (stored / "model.pt").write_bytes(original)
    assert mlflow_best.restore(run.run_id).epoch == 0  # the checkpoint itself was never lost


def test_a_checkpoint_that_needs_code_execution_is_refused(sqlite_uri: str, tmp_path: Path) -> None:
    import hashlib
    import json

    run, _, _ = run_sequence([1.0])
    stored = _logged_model_dir(run.run_id, sqlite_uri)
    marker = tmp_path / "pwned"
    torch.save(_Evil(str(marker)), stored / "training_state.pt")
    manifest = json.loads((stored / "manifest.json").read_text())
    data = (stored / "training_state.pt").read_bytes()
    manifest["files"]["training_state.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (stored / "manifest.json").write_text(json.dumps(manifest))
    client = MlflowClient(sqlite_uri)
    model_id = client.get_run(run.run_id).data.tags["mlflow_best.best_model_id"]
    new_sha = hashlib.sha256((stored / "manifest.json").read_bytes()).hexdigest()
    client.set_tag(run.run_id, "mlflow_best.best_sha256", new_sha)  # a tamperer with write access to both
    client.set_logged_model_tags(model_id, {"sha256": new_sha})
    with pytest.raises(mlflow_best.UnsafeCheckpointError, match="would execute code"):
        mlflow_best.restore(run.run_id)
    assert not marker.exists()


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (Path(self.path),))  # type: ignore[return-value]


def test_architecture_mismatch_lists_missing_unexpected_and_misshaped_keys(sqlite_uri: str) -> None:
    run, _, _ = run_sequence([1.0], hidden=8)
    with pytest.raises(
        mlflow_best.ArchitectureMismatchError,
        match=r"mis-shaped keys \['fc1.bias: checkpoint \(8,\) vs model \(16,\)'",
    ):
        mlflow_best.restore(run.run_id, model=TinyNet(hidden=16))
    other = torch.nn.Sequential(torch.nn.Linear(4, 8))
    with pytest.raises(
        mlflow_best.ArchitectureMismatchError,
        match=r"missing keys \['0.bias', '0.weight'\].*unexpected keys \['fc1.bias'",
    ):
        mlflow_best.restore(run.run_id, model=other)


def test_model_none_without_model_args_says_how_to_fix(sqlite_uri: str) -> None:
    model = torch.nn.Linear(4, 2)
    with mlflow_best.track(model, None) as run:
        run.log_epoch(0, {"val_loss": 1.0})
    with pytest.raises(
        mlflow_best.ConfigError,
        match=r"needs arguments \['in_features', 'out_features'\].*pass model=.*model_args",
    ):
        mlflow_best.restore(run.run_id)
    assert mlflow_best.restore(run.run_id, model=torch.nn.Linear(4, 2)).epoch == 0


# -- the hand-off --------------------------------------------------------------------------------
def _waiting_in(thread: threading.Thread, function: str) -> bool:
    """``thread`` is blocked in a ``threading`` wait (a lock, condition, queue) called from ``function``."""
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is None:
        return False
    if (frame.f_code.co_name, Path(frame.f_code.co_filename).name) != ("wait", "threading.py"):
        return False
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return function in names


def test_the_snapshot_pool_holds_at_most_two_snapshots_and_blocks_a_third() -> None:
    pool = SnapshotPool(slots=2)
    state = {"w": torch.ones(3)}
    a = pool.take(state, {})
    b = pool.take(state, {})
    third: list[object] = []
    t = threading.Thread(target=lambda: third.append(pool.take(state, {})), daemon=True)
    t.start()
    # Back-pressure: the third take waits for a slot, drops nothing. Observed, not timed: a take that
    # did not block would finish (and fill `third`) instead of ever being seen waiting.
    deadline = time.monotonic() + 60  # a guard against a hang only
    while not _waiting_in(t, "take"):
        assert t.is_alive() and not third, "the third take did not wait for a free slot"
        assert time.monotonic() < deadline, "the third take never started waiting"
        time.sleep(0.001)
    assert not third
    a.release()
    t.join(timeout=60)
    assert not t.is_alive() and len(third) == 1
    state["w"].add_(1)
    assert torch.equal(b.model["w"], torch.ones(3))  # a copy, not a view of the live tensor


def test_sigkill_mid_pipeline_restores_the_newest_checkpoint_in_mlflow_and_sync_sends_the_rest(
    sqlite_uri: str, tmp_path: Path
) -> None:
    from mlflow_best._checkpoint import verify_checkpoint
    from mlflow_best._config import home
    from mlflow_best._staging import CheckpointOp, read_unsent

    # Every weight of the model equals its epoch, and every epoch improves: a restored model says
    # which epoch it is, and uploads of 4 MB checkpoints fall behind the 20 ms epochs.
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import time, torch, mlflow, mlflow_best
        mlflow.set_tracking_uri({sqlite_uri!r})
        model = torch.nn.Linear(1024, 1024)
        with mlflow_best.track(model, None, model_args={{"in_features": 1024, "out_features": 1024}},
                               verbose=False) as run:
            print(run.run_id, flush=True)
            for epoch in range(10**6):  # runs until killed
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(float(epoch))
                print(epoch, flush=True)  # announced before log_epoch: nothing newer exists
                run.log_epoch(epoch, {{"val_loss": 1.0 / (epoch + 1)}})
                time.sleep(0.02)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        run_id = proc.stdout.readline().strip()
        staging = home() / "runs" / run_id
        client = MlflowClient(sqlite_uri)
        deadline = time.monotonic() + 120  # guards against a hang only

        def mid_pipeline() -> bool:
            # A checkpoint has reached MLflow, and a newer one is journaled but not yet sent.
            if "mlflow_best.best_model_id" not in client.get_run(run_id).data.tags:
                return False
            sent = int(client.get_run(run_id).data.tags["mlflow_best.best_epoch"])
            return any(isinstance(op, CheckpointOp) and op.epoch > sent for op in read_unsent(staging))

        while not mid_pipeline():
            assert proc.poll() is None and time.monotonic() < deadline, "the child never got mid-pipeline"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        last_logged = max(int(line) for line in proc.stdout.read().split() or ["-1"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    tags = client.get_run(run_id).data.tags
    assert client.get_run(run_id).info.status == "RUNNING"  # killed: nobody could end it
    unsent = [op for op in read_unsent(staging) if isinstance(op, CheckpointOp)]
    in_mlflow = int(tags["mlflow_best.best_epoch"])
    # The kill landed mid-pipeline: something newer than MLflow's best was still to send. (The best
    # itself may be unsent too: killed after its last MLflow call, before the journal marked it.)
    assert any(op.epoch > in_mlflow for op in unsent) and all(op.epoch >= in_mlflow for op in unsent)

    # restore gives the newest checkpoint MLflow has, whole: the weights of exactly that epoch.
    r = mlflow_best.restore(run_id)
    assert r.epoch == in_mlflow and r.model_id == tags["mlflow_best.best_model_id"]
    assert all(torch.all(t == float(in_mlflow)) for t in r.model.state_dict().values())

    # sync sends what was left; restore then gives the newest checkpoint the killed process wrote whole.
    whole = [op.epoch for op in unsent if _verifies(verify_checkpoint, Path(op.folder))]
    torn = [op.name for op in unsent if op.epoch not in whole]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        mlflow_best.sync(run_id)
    # A checkpoint the kill interrupted is named, loudly, and only its metrics are sent.
    assert all(any(name in str(w.message) for w in said) for name in torn), [str(w.message) for w in said]
    after = mlflow_best.restore(run_id)
    assert after.epoch == max(whole, default=in_mlflow) and after.epoch <= max(last_logged, in_mlflow)
    assert all(torch.all(t == float(after.epoch)) for t in after.model.state_dict().values())


def _verifies(verify: Any, folder: Path) -> bool:
    try:
        verify(folder)
    except (OSError, mlflow_best.CheckpointError):
        return False
    return True


def test_public_api_is_pinned() -> None:
    assert sorted(mlflow_best.__all__) == sorted([
        "ArchitectureMismatchError", "Best", "CheckpointError", "CheckpointNotFoundError", "ConfigError",
        "MetricError", "MlflowBestError", "Promotion", "Restored", "Run", "TrackingStoreError",
        "UnsafeCheckpointError", "UnsentError", "__version__", "load_model", "promote", "restore", "runs",
        "sync", "track",
    ])
    for name in mlflow_best.__all__:
        assert hasattr(mlflow_best, name)
    assert issubclass(mlflow_best.ConfigError, ValueError)
    assert all(
        issubclass(getattr(mlflow_best, n), mlflow_best.MlflowBestError)
        for n in mlflow_best.__all__ if n.endswith("Error")
    )


def test_log_epoch_after_the_block_is_refused(sqlite_uri: str) -> None:
    with mlflow_best.track(TinyNet(), None) as run:
        run.log_epoch(0, {"val_loss": 1.0})
    before = (run.best, list(run.history), list(run.improvements))
    with pytest.raises(mlflow_best.MlflowBestError, match=r"outside the `with mlflow_best\.track.*has ended"):
        run.log_epoch(1, {"val_loss": 0.5})
    assert (run.best, run.history, run.improvements) == before  # nothing changed by the refused call
    assert [m.step for m in MlflowClient(sqlite_uri).get_metric_history(run.run_id, "val_loss")] == [0]


def test_resume_into_a_model_that_does_not_fit_leaves_the_run_as_it_was(sqlite_uri: str) -> None:
    first, _, _ = run_sequence([1.0, 0.5])
    with (
        pytest.raises(mlflow_best.ArchitectureMismatchError, match="mis-shaped keys"),
        mlflow_best.track(TinyNet(hidden=32), None, resume=first.run_id),
    ):
        pass
    assert MlflowClient(sqlite_uri).get_run(first.run_id).info.status == "FINISHED"
    with (
        pytest.raises(mlflow_best.ConfigError, match="resume='nope' is not a run"),
        mlflow_best.track(TinyNet(), None, resume="nope"),
    ):
        pass


def test_an_explicit_tracking_uri_other_than_the_global_one_registers_and_restores(
    tmp_path: Path, _sqlite_template: Path
) -> None:
    from tests.conftest import new_sqlite_store

    uri = new_sqlite_store(_sqlite_template, tmp_path / "elsewhere")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'global.db'}")
    try:
        name = unique("model")
        run, _, _ = run_sequence([1.0, 0.5], registered_model=name, tracking_uri=uri, offline_timeout=5)
        assert run.best.version == "2"
        r = mlflow_best.restore(f"models:/{name}@best", tracking_uri=uri)
        assert r.epoch == 1 and r.version == "2"
    finally:
        mlflow.set_tracking_uri(None)
