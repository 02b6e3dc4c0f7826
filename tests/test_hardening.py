"""Damaged, foreign and malicious checkpoints; a staging folder that is read-only or full."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient

import mlflow_best
from mlflow_best import CheckpointError, ConfigError, UnsafeCheckpointError
from tests.conftest import new_sqlite_store
from tests.helpers import TinyNet, run_sequence, unique

TAG = "mlflow_best."


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory, _sqlite_template: Path) -> Path:
    """A genuine checkpoint folder, written by track and fetched by restore; tests tamper with copies."""
    folder = tmp_path_factory.mktemp("golden")
    uri = new_sqlite_store(_sqlite_template, folder)
    cwd = os.getcwd()
    os.chdir(folder)  # the store's artifacts land under this folder, not the repository
    try:
        model = TinyNet()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        with mlflow_best.track(
            model, opt, tracking_uri=uri, staging_dir=str(folder / "staging"), model_args={"hidden": 8}
        ) as run:
            run.log_epoch(0, {"val_loss": 0.5, "acc": 0.9})
        path = mlflow_best.restore(run.run_id, tracking_uri=uri, cache_dir=folder / "cache").path
    finally:
        os.chdir(cwd)
    return path


@pytest.fixture
def ckpt(golden: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(golden, copy, ignore=shutil.ignore_patterns(".*"))
    return copy


def _edit_manifest(folder: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _reseal(folder: Path) -> None:
    """Recompute the manifest's size and sha256 of every file, as a careful attacker would."""

    def edit(data: dict[str, Any]) -> None:
        for name in data["files"]:
            data["files"][name] = {"sha256": _sha256(folder / name), "bytes": (folder / name).stat().st_size}

    _edit_manifest(folder, edit)


def test_the_genuine_checkpoint_restores(ckpt: Path) -> None:
    r = mlflow_best.restore(str(ckpt))
    assert r.epoch == 0 and r.metrics == {"val_loss": 0.5, "acc": 0.9, "best_val_loss": 0.5}
    assert isinstance(r.model, TinyNet) and isinstance(r.optimizer, torch.optim.Adam)


def _set(key: str | tuple[str, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        target = data
        *parents, last = key.split(".") if isinstance(key, str) else key
        for p in parents:
            target = target[p]
        target[last] = value

    return edit


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda data: data.pop(key)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set("epoch", "0"), "field 'epoch' is '0' (str), expected int"),
        (_set("epoch", True), "field 'epoch' is True (bool), expected int"),
        (_set("epoch", -1), "field 'epoch' is -1, expected an int >= 0"),
        (_drop("epoch"), "required field 'epoch' is missing"),
        (_set("format", "lightning"), "field 'format' is 'lightning', expected 'mlflow_best.checkpoint'"),
        (_set("format_version", "1"), "field 'format_version' is '1' (str), expected int"),
        (_set("format_version", 99), "format_version 99 is newer than this mlflow_best reads (1); upgrade"),
        (_set("files", []), "field 'files' is [] (list), expected dict"),
        (_set(("files", "model.pt"), "abc"), "field 'files.model.pt' is 'abc', expected"),
        (lambda d: d["files"].pop("training_state.pt"), "field 'files' does not list 'training_state.pt'"),
        (
            lambda d: d["files"].update({"../../etc/passwd": d["files"]["model.pt"]}),
            "lists '../../etc/passwd'",
        ),
        (_set("metrics.val_loss", "low"), "field 'metrics.val_loss' is 'low' (str), expected a number"),
        (_set("model", None), "field 'model' is None (NoneType), expected dict"),
        (_set("model.class", 3), "field 'model.class' is 3, expected 'module:ClassName'"),
        (_set("model.args", [8]), "field 'model.args' is [8], expected an object or null"),
        (_set("optimizer", "adam"), "field 'optimizer' is 'adam', expected null or"),
    ],
)
def test_a_malformed_manifest_names_the_file_and_the_field(
    ckpt: Path, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    path = _edit_manifest(ckpt, edit)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: ") + ".*" + re.escape(message)):
        mlflow_best.restore(str(ckpt))


def test_a_manifest_that_is_not_json_is_named(ckpt: Path) -> None:
    (ckpt / "manifest.json").write_text('{"format": "mlflow_best.checkpoint", ')
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt / "manifest.json")) + " is not valid JSON"):
        mlflow_best.restore(str(ckpt))


def test_a_missing_truncated_or_changed_file_is_named(ckpt: Path) -> None:
    model_pt, training_pt = ckpt / "model.pt", ckpt / "training_state.pt"
    data = model_pt.read_bytes()
    model_pt.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match=re.escape(f"{model_pt} is {len(data) // 2} bytes, the manifest says")
    ):
        mlflow_best.restore(str(ckpt))
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    model_pt.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=re.escape(f"{model_pt} fails its checksum")):
        mlflow_best.restore(str(ckpt))
    model_pt.write_bytes(data)
    training_pt.unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"{training_pt} is missing")):
        mlflow_best.restore(str(ckpt))


def test_a_resealed_file_that_is_not_a_torch_file_is_named(ckpt: Path) -> None:
    (ckpt / "model.pt").write_bytes(b"PK\x03\x04 not really a zip")
    _reseal(ckpt)
    with pytest.raises(
        CheckpointError, match=re.escape(f"{ckpt / 'model.pt'} cannot be read as a torch file")
    ):
        mlflow_best.restore(str(ckpt))


def test_a_bare_state_dict_from_torch_save_is_refused_with_what_it_is(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(TinyNet().state_dict(), path)
    with pytest.raises(
        CheckpointError, match=re.escape(f"{path} is a single file, not an mlflow_best checkpoint")
    ):
        mlflow_best.restore(str(path))
    folder = tmp_path / "exported"
    folder.mkdir()
    shutil.copy(path, folder / "model.pt")
    with pytest.raises(
        CheckpointError, match=re.escape(f"{folder / 'manifest.json'} is missing: {folder} is not")
    ):
        mlflow_best.restore(str(folder))


def test_a_lightning_checkpoint_is_refused_with_what_it_is(tmp_path: Path) -> None:
    single = tmp_path / "last.ckpt"
    torch.save({"state_dict": TinyNet().state_dict(), "epoch": 3, "global_step": 30}, single)
    with pytest.raises(CheckpointError, match=re.escape(f"{single} is a single file") + ".*Lightning"):
        mlflow_best.restore(str(single))
    # The sharded (DeepSpeed / FSDP) form is a folder named like a file.
    sharded = tmp_path / "epoch=3-step=30.ckpt"
    (sharded / "checkpoint").mkdir(parents=True)
    torch.save({"module": TinyNet().state_dict()}, sharded / "checkpoint" / "mp_rank_00_model_states.pt")
    (sharded / "latest").write_text("checkpoint")
    with pytest.raises(CheckpointError, match=re.escape(f"{sharded / 'manifest.json'} is missing")):
        mlflow_best.restore(str(sharded))


class _Exploit:
    """Unpickling this runs a shell command: what a poisoned checkpoint looks like."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("poisoned", ["model.pt", "training_state.pt"])
def test_a_resealed_pickle_that_would_run_code_is_refused_and_not_run(
    ckpt: Path, tmp_path: Path, poisoned: str
) -> None:
    marker = tmp_path / "pwned"
    state = torch.load(ckpt / poisoned, weights_only=True)
    state["payload"] = _Exploit(marker)
    torch.save(state, ckpt / poisoned)
    _reseal(ckpt)  # checksums match: only weights_only stands between the file and the shell
    with pytest.raises(
        UnsafeCheckpointError, match=re.escape(f"{ckpt / poisoned} was refused") + ".*posix.system"
    ):
        mlflow_best.restore(str(ckpt))
    assert not marker.exists()


# -- the same, in the store ------------------------------------------------------------------------
def _stored_checkpoint(sqlite_uri: str) -> tuple[str, Path]:
    run, _, _ = run_sequence([1.0, 0.5], registered_model=unique("m"))
    tags = MlflowClient(sqlite_uri).get_run(run.run_id).data.tags
    lm = MlflowClient(sqlite_uri).get_logged_model(tags[TAG + "best_model_id"])
    return run.run_id, Path(lm.artifact_location)


def test_a_tampered_manifest_in_the_store_is_named_where_it_is_stored(sqlite_uri: str) -> None:
    run_id, stored = _stored_checkpoint(sqlite_uri)
    path = _edit_manifest(stored, _set("epoch", "1"))
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: field 'epoch' is '1' (str), expected int")):
        mlflow_best.restore(run_id)


def test_a_changed_manifest_in_the_store_fails_against_the_sha256_mlflow_recorded(sqlite_uri: str) -> None:
    run_id, stored = _stored_checkpoint(sqlite_uri)
    path = _edit_manifest(stored, _set("metrics.val_loss", 0.01))  # well-formed, but not what was logged
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*but MLflow recorded.*was not loaded"):
        mlflow_best.restore(run_id)


def test_a_truncated_file_in_the_store_is_named(sqlite_uri: str) -> None:
    run_id, stored = _stored_checkpoint(sqlite_uri)
    data = (stored / "training_state.pt").read_bytes()
    (stored / "training_state.pt").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=re.escape(f"{stored / 'training_state.pt'} is 100 bytes")):
        mlflow_best.restore(run_id)


def test_a_poisoned_checkpoint_in_the_store_with_every_hash_rewritten_is_refused(
    sqlite_uri: str, tmp_path: Path
) -> None:
    run_id, stored = _stored_checkpoint(sqlite_uri)
    marker = tmp_path / "pwned"
    state = torch.load(stored / "model.pt", weights_only=True)
    state["payload"] = _Exploit(marker)
    torch.save(state, stored / "model.pt")
    _reseal(stored)
    # Rewrite what MLflow recorded too, so no checksum anywhere gives the tampering away.
    client = MlflowClient(sqlite_uri)
    client.set_tag(run_id, TAG + "best_sha256", _sha256(stored / "manifest.json"))
    with pytest.raises(UnsafeCheckpointError, match=r"model\.pt was refused: loading it would execute code"):
        mlflow_best.restore(run_id)
    assert not marker.exists()
    # Resuming from it refuses it the same way rather than skipping to another checkpoint.
    with (
        pytest.raises(UnsafeCheckpointError, match="would execute code"),
        mlflow_best.track(TinyNet(), None, resume=run_id),
    ):
        pytest.fail("the block must not run")
    assert not marker.exists()
    assert client.get_run(run_id).info.status == "FINISHED"


def test_resume_skips_a_damaged_last_checkpoint_for_the_best_with_a_warning(sqlite_uri: str) -> None:
    run, _, _ = run_sequence([1.0, 2.0, 3.0], save_last=True)  # best: 0, last: 2
    client = MlflowClient(sqlite_uri)
    last = (
        Path(client.get_run(run.run_id).info.artifact_uri)
        / client.get_run(run.run_id).data.tags[TAG + "last_checkpoint"]
    )
    (last / "model.pt").write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning, match=r"skipping a damaged checkpoint.*model\.pt is 7 bytes"):
        resumed = mlflow_best.track(TinyNet(), None, resume=run.run_id)
        with resumed:
            assert resumed.start_epoch == 1


# -- the staging folder --------------------------------------------------------------------------------
def _runs(uri: str) -> list[Any]:
    client = MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mount small tmpfs file systems (root only; the test is skipped where mounting is not allowed)."""
    mounted: list[Path] = []

    def mount(size_kb: int, *, read_only: bool = False) -> Path:
        where = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
        where.mkdir()
        opts = f"size={size_kb}k" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode(errors='replace').strip()})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_read_only_staging_dir_is_refused_before_any_run_is_created(
    sqlite_uri: str, tiny_fs: Callable[..., Path]
) -> None:
    ro = tiny_fs(64, read_only=True)
    expected = re.escape(f"staging_dir={str(ro)!r} is not writable (Read-only file")
    with pytest.raises(ConfigError, match=expected), mlflow_best.track(TinyNet(), None, staging_dir=str(ro)):
        pytest.fail("the block must not run")
    assert _runs(sqlite_uri) == []


def test_a_staging_dir_that_cannot_exist_is_refused_before_any_run_is_created(
    sqlite_uri: str, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bad = blocker / "staging"  # works for root too, unlike chmod
    expected = re.escape(f"staging_dir={str(bad)!r} is not writable (Not a directory)")
    with pytest.raises(ConfigError, match=expected), mlflow_best.track(TinyNet(), None, staging_dir=str(bad)):
        pytest.fail("the block must not run")
    assert _runs(sqlite_uri) == []


def _disk_full_run(
    sqlite_uri: str, staging: Path, after_epoch_0: Callable[[], None]
) -> tuple[mlflow_best.Run, dict[int, dict[str, torch.Tensor]], list[str]]:
    """Epoch 0 improves and reaches MLflow; then ``after_epoch_0``; epoch 1 improves but fails to write."""
    model = torch.nn.Linear(64, 64)  # ~17 KB of weights, ~50 KB per checkpoint with Adam's state
    opt = torch.optim.Adam(model.parameters())
    client = MlflowClient(sqlite_uri)
    snaps: dict[int, dict[str, torch.Tensor]] = {}
    with (
        pytest.warns(RuntimeWarning) as caught,
        mlflow_best.track(
            model, opt, staging_dir=str(staging), registered_model="full", verbose=False
        ) as run,
    ):
        for epoch, value in enumerate([1.0, 0.5, 0.7]):
            with torch.no_grad():
                model.weight.add_(1.0)
            snaps[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
            run.log_epoch(epoch, {"val_loss": value})
            if epoch == 0:
                staged = run.staging_dir / "checkpoints" / "epoch=0000-val_loss=1.0000"
                deadline = time.monotonic() + 60
                while client.get_run(run.run_id).data.tags.get(TAG + "best_epoch") != "0" or staged.exists():
                    assert time.monotonic() < deadline, "epoch 0 never reached MLflow"
                    time.sleep(0.05)
                after_epoch_0()
    return run, snaps, [str(w.message) for w in caught]


def _assert_previous_best_intact(
    sqlite_uri: str, run: mlflow_best.Run, snaps: dict[int, Any], warned: list[str]
) -> None:
    missing = [
        w
        for w in warned
        if "the checkpoint of epoch 1 (epoch=0001-val_loss=0.5000) could not be written" in w
    ]
    assert missing, warned
    assert "No space left on device" in missing[0] and "previous best checkpoint stays intact" in missing[0]
    client = MlflowClient(sqlite_uri)
    r = client.get_run(run.run_id)
    assert r.info.status == "FINISHED"
    assert r.data.tags[TAG + "best_epoch"] == "0"
    assert sorted(m.step for m in client.get_metric_history(run.run_id, "val_loss")) == [0, 1, 2]
    for ref in (run.run_id, "models:/full@best"):
        restored = mlflow_best.restore(ref, model=torch.nn.Linear(64, 64))
        assert restored.epoch == 0
        for k, v in restored.model.state_dict().items():
            assert torch.equal(v, snaps[0][k])


def test_a_full_disk_warns_which_checkpoint_is_missing_and_keeps_the_previous_best(
    sqlite_uri: str, tiny_fs: Callable[..., Path]
) -> None:
    staging = tiny_fs(256)

    def fill_the_disk() -> None:
        with open(staging / "ballast", "wb", buffering=0) as f, pytest.raises(OSError, match="No space left"):
            while True:
                f.write(b"\0" * 4096)

    run, snaps, warned = _disk_full_run(sqlite_uri, staging, fill_the_disk)
    _assert_previous_best_intact(sqlite_uri, run, snaps, warned)


def test_a_write_error_warns_which_checkpoint_is_missing_and_keeps_the_previous_best(
    sqlite_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow_best._writer as writer

    real = writer.write_checkpoint

    def no_space_for_epoch_1(parent: Path, name: str, *args: Any, **kwargs: Any) -> Path:
        if name.startswith("epoch=0001"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(parent / name))
        return real(parent, name, *args, **kwargs)

    monkeypatch.setattr(writer, "write_checkpoint", no_space_for_epoch_1)
    run, snaps, warned = _disk_full_run(sqlite_uri, tmp_path / "staging", lambda: None)
    _assert_previous_best_intact(sqlite_uri, run, snaps, warned)


def test_a_full_disk_under_the_journal_never_stops_training(
    sqlite_uri: str, tiny_fs: Callable[..., Path]
) -> None:
    staging = tiny_fs(128)
    with pytest.warns(RuntimeWarning, match="cannot write the journal") as caught, mlflow_best.track(
        TinyNet(), None, staging_dir=str(staging), verbose=False
    ) as run:
        run.log_epoch(0, {"val_loss": 1.0})
        with open(staging / "ballast", "wb", buffering=0) as f, pytest.raises(OSError, match="No space left"):
            while True:
                f.write(b"\0" * 4096)
        for epoch in range(1, 200):  # ~20 KB of journal lines: far past the last free block
            run.log_epoch(epoch, {"val_loss": 2.0, "note_with_a_long_name_to_fill_lines": float(epoch)})
    assert sum("cannot write the journal" in str(w.message) for w in caught) == 1
    history = MlflowClient(sqlite_uri).get_metric_history(run.run_id, "val_loss")
    assert sorted(m.step for m in history) == list(range(200))
