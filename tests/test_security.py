"""Attacks by whoever can write to the tracking server or the machine, written as the attack.

Each test plants what a hostile team member could (a manifest, a tag, a version source, a cache
entry, a journal line, a zip entry) and asserts that nothing outside the user's choice ran (a marker
file is never created, a module is never imported), that the poisoned weights never load, and what
the error says.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

import mlflow_best
from tests import _factories
from tests.helpers import TinyNet, train_step

TAG = "mlflow_best."


@pytest.fixture
def evil_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """An installed module whose import has a side effect: it creates a marker file."""
    name = f"evil_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "marker"
    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / f"{name}.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, hidden=8):\n"
        "        super().__init__()\n"
        "        self.fc1 = torch.nn.Linear(4, hidden)\n"
        "        self.fc2 = torch.nn.Linear(hidden, 2)\n"
        "class Opt(torch.optim.SGD):\n"
        "    pass\n"
    )
    monkeypatch.syspath_prepend(str(pkg))
    yield name, marker
    sys.modules.pop(name, None)


def _trained(**kwargs: Any) -> mlflow_best.Run:
    model = TinyNet(8)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with mlflow_best.track(model, opt, model_args={"hidden": 8}, verbose=False, **kwargs) as run:
        for epoch, value in enumerate([1.0, 0.5]):
            train_step(model, opt)
            run.log_epoch(epoch, {"val_loss": value})
    return run


def _local_copy(run: mlflow_best.Run, tmp_path: Path) -> Path:
    folder = tmp_path / f"copy-{uuid.uuid4().hex[:6]}"
    shutil.copytree(mlflow_best.restore(run.run_id).path, folder)
    return folder


def _edit_manifest(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = folder / "manifest.json"
    path.chmod(0o644)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _tamper_in_store(run: mlflow_best.Run, edit: Callable[[Path], None]) -> None:
    """What a hostile writer with access to the store does: change the files, then every sha256 tag."""
    client = MlflowClient()
    lm = client.get_logged_model(run.best.model_id)  # type: ignore[arg-type]
    location = lm.artifact_location
    folder = Path(location[len("file://") :] if location.startswith("file://") else location)
    edit(folder)
    sha = hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
    client.set_logged_model_tags(lm.model_id, {"sha256": sha})
    client.set_tag(run.run_id, TAG + "best_sha256", sha)


def _rehash(folder: Path, name: str) -> None:
    data = (folder / name).read_bytes()

    def edit(m: dict[str, Any]) -> None:
        m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    _edit_manifest(folder, edit)


# -- no code the user did not choose ------------------------------------------------------------------
def test_a_manifest_naming_a_module_never_imports_it(
    sqlite_uri: str, tmp_path: Path, evil_module: tuple[str, Path]
) -> None:
    name, marker = evil_module
    run = _trained()

    def edit(folder: Path) -> None:
        _edit_manifest(folder, lambda m: m["model"].update({"class": f"{name}:Net"}))

    _tamper_in_store(run, edit)
    with pytest.raises(
        mlflow_best.ConfigError, match=rf"module '{name}' is not imported.*never imports.*import {name}"
    ):
        mlflow_best.restore(run.run_id, cache_dir=tmp_path / "fresh-cache")
    assert not marker.exists()
    assert name not in sys.modules
    # The user chooses: once they import it themselves, the class is used.
    __import__(name)
    assert marker.exists()
    r = mlflow_best.restore(run.run_id, cache_dir=tmp_path / "fresh-cache")
    assert type(r.model).__module__ == name


def test_a_manifest_naming_this_prints_no_zen(
    sqlite_uri: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    folder = _local_copy(_trained(), tmp_path)
    sys.modules.pop("this", None)
    _edit_manifest(folder, lambda m: m["model"].update({"class": "this:Net"}))
    with pytest.raises(mlflow_best.ConfigError, match="module 'this' is not imported"):
        mlflow_best.restore(str(folder))
    assert "Beautiful is better" not in capfd.readouterr().out
    assert "this" not in sys.modules


def test_the_optimizer_class_path_is_not_imported_when_the_model_is_given(
    sqlite_uri: str, tmp_path: Path, evil_module: tuple[str, Path]
) -> None:
    name, marker = evil_module
    folder = _local_copy(_trained(), tmp_path)
    _edit_manifest(folder, lambda m: m["optimizer"].update({"class": f"{name}:Opt"}))
    with pytest.raises(mlflow_best.ConfigError, match=rf"module '{name}' is not imported.*pass optimizer="):
        mlflow_best.restore(str(folder), model=TinyNet(8))
    assert not marker.exists()
    # With model= and optimizer= given, nothing is looked up at all.
    model = TinyNet(8)
    r = mlflow_best.restore(str(folder), model=model, optimizer=torch.optim.Adam(model.parameters()))
    assert r.optimizer is not None and not marker.exists() and name not in sys.modules


def test_a_recorded_factory_is_called_only_when_the_user_chose_it(sqlite_uri: str, tmp_path: Path) -> None:
    model = _factories.mlp(width=6)
    with mlflow_best.track(
        model, None, model_factory=_factories.mlp, model_args={"width": 6}, verbose=False
    ) as run:
        run.log_epoch(0, {"val_loss": 1.0})
    folder = _local_copy(run, tmp_path)
    # An annotated factory in a module the user imported: called (torchvision's builders are annotated).
    assert isinstance(mlflow_best.restore(str(folder)).model, torch.nn.Sequential)
    # os.system is a callable in an imported module, but it does not say it returns a module.
    marker = tmp_path / "pwned"
    _edit_manifest(
        folder, lambda m: m["model"].update({"factory": "os:system", "args": {"command": f"touch {marker}"}})
    )
    with pytest.raises(
        mlflow_best.ConfigError, match=r"'os:system' does not declare that it returns.*trust_code=True"
    ):
        mlflow_best.restore(str(folder))
    assert not marker.exists()
    # A factory passed to restore must be the recorded one.
    with pytest.raises(
        mlflow_best.ConfigError, match=r"model_factory=tests._factories:mlp was passed.*built by 'os:system'"
    ):
        mlflow_best.restore(str(folder), model_factory=_factories.mlp)
    assert not marker.exists()


def test_an_unannotated_factory_runs_when_passed_or_trusted(sqlite_uri: str, tmp_path: Path) -> None:
    model = _factories.mlp(width=6)
    with mlflow_best.track(
        model, None, model_factory=_factories.mlp, model_args={"width": 6}, verbose=False
    ) as run:
        run.log_epoch(0, {"val_loss": 1.0})
    folder = _local_copy(run, tmp_path)
    _edit_manifest(folder, lambda m: m["model"].update({"factory": "tests._factories:unannotated"}))
    with pytest.raises(mlflow_best.ConfigError, match="does not declare that it returns"):
        mlflow_best.restore(str(folder))
    assert isinstance(
        mlflow_best.restore(str(folder), model_factory=_factories.unannotated).model, torch.nn.Module
    )
    assert isinstance(mlflow_best.restore(str(folder), trust_code=True).model, torch.nn.Module)


# -- confinement: sync uploads only the run's own files ------------------------------------------------
def test_a_journal_line_naming_a_file_outside_the_staging_folder_is_never_uploaded(
    sqlite_uri: str, tmp_path: Path
) -> None:
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    run = _trained()
    journal = run.staging_dir / "journal.jsonl"
    line = {"seq": 999, "path": str(secret), "artifact_path": "keys", "type": "artifact"}
    with open(journal, "a") as f:
        f.write(json.dumps(line) + "\n" + json.dumps({"seq": 1000, "tags": {}, "type": "tags"}) + "\n")
    with pytest.raises(
        mlflow_best.CheckpointError, match=r"journal.jsonl line \d+: field 'path' names .*outside"
    ):
        mlflow_best.sync(run.run_id)
    artifacts = [a.path for a in MlflowClient().list_artifacts(run.run_id)]
    assert "keys" not in artifacts


@pytest.mark.parametrize(
    "line",
    [
        '{"seq": "1", "epoch": 0, "metrics": {}, "timestamp_ms": 0, "type": "metrics"}',
        '{"seq": 5, "type": "nope"}',
        "[" * 100000,
        '{"seq": 6, "epoch": 0, "metrics": {}, "timestamp_ms": 0, "kind": "best", "name": "x", "value": 1.0, '
        '"folder": "/etc", "type": "checkpoint"}',
    ],
    ids=["bad-type", "unknown-kind", "deep-nesting", "folder-outside"],
)
def test_a_malformed_journal_line_is_a_checkpoint_error_naming_line_and_field(
    sqlite_uri: str, line: str
) -> None:
    run = _trained()
    with open(run.staging_dir / "journal.jsonl", "a") as f:
        f.write(line + "\n" + json.dumps({"seq": 1001, "tags": {}, "type": "tags"}) + "\n")
    with pytest.raises(mlflow_best.CheckpointError, match=r"journal.jsonl line \d+"):
        mlflow_best.sync(run.run_id)


# -- the CLI prints what came from the store without terminal escapes -------------------------------------
def test_the_cli_escapes_control_characters_from_the_store(sqlite_uri: str) -> None:
    from mlflow_best.cli import main

    run = _trained(run_name="evil\x1b[2J\x1b]0;owned\x07name")
    result = CliRunner().invoke(main, ["runs"])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "evil\\x1b[2J" in result.output
    assert run.run_id[:8] in result.output
