"""Attacks by whoever can write to the tracking server or the machine, written as the attack.

Each test plants what a hostile team member could (a manifest, a tag, a version source, a cache
entry, a journal line, a zip entry) and asserts that nothing outside the user's choice ran (a marker
file is never created, a module is never imported), that the poisoned weights never load, and what
the error says.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
import threading
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
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


# -- bounded work before trust -------------------------------------------------------------------------
def test_model_args_that_would_allocate_gigabytes_are_refused_before_any_allocation(
    sqlite_uri: str, tmp_path: Path
) -> None:
    import resource

    folder = _local_copy(_trained(), tmp_path)
    # TinyNet(hidden=10**9) would be ~16 GB of float32: refused from the meta-device build.
    _edit_manifest(folder, lambda m: m["model"].update({"args": {"hidden": 10**9}}))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(mlflow_best.CheckpointError, match=r"would need .* bytes.*model.pt holds"):
        mlflow_best.restore(str(folder))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing big allocated


def test_a_checkpoint_declaring_more_than_the_limit_is_refused_before_it_is_read(
    sqlite_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _local_copy(_trained(), tmp_path)
    monkeypatch.setenv("MLFLOW_BEST_MAX_LOAD_BYTES", "1000")
    with pytest.raises(
        mlflow_best.CheckpointError, match=r"declares [\d,]+ bytes, more than the 1,000.*MLFLOW_BEST_MAX"
    ):
        mlflow_best.restore(str(folder))


def test_a_zip_bomb_model_file_is_refused(sqlite_uri: str, tmp_path: Path) -> None:
    folder = _local_copy(_trained(), tmp_path)
    # The same entries, deflated: a small file that inflates on load (here 64 MB of zeros).
    src = folder / "model.pt"
    src.chmod(0o644)
    buf = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(src.read_bytes())) as zin,
        zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zout,
    ):
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
        zout.writestr(info.filename.split("/")[0] + "/padding", b"\0" * (64 << 20))
    src.write_bytes(buf.getvalue())
    assert src.stat().st_size < 1 << 20
    _rehash(folder, "model.pt")
    with pytest.raises(mlflow_best.CheckpointError, match=r"compressed entries.*inflate"):
        mlflow_best.restore(str(folder))


# -- hash what you load ----------------------------------------------------------------------------------
def test_weights_swapped_in_after_the_check_are_never_loaded(sqlite_uri: str, tmp_path: Path) -> None:
    run = _trained()
    good = mlflow_best.restore(run.run_id).model.state_dict()
    folder = _local_copy(run, tmp_path)
    evil = {k: torch.full_like(v, 666.0) for k, v in good.items()}
    swap = tmp_path / "evil.pt"
    torch.save(evil, swap)
    original = (folder / "model.pt").read_bytes()
    bad = swap.read_bytes()
    stop = threading.Event()

    def attacker() -> None:  # swaps the file by name, as fast as it can
        tmp = folder / ".swap"
        while not stop.is_set():
            for data in (bad, original):
                tmp.write_bytes(data)
                tmp.replace(folder / "model.pt")

    thread = threading.Thread(target=attacker, daemon=True)
    thread.start()
    loaded, refused = 0, 0
    try:
        for _ in range(150):
            try:
                r = mlflow_best.restore(str(folder))
            except mlflow_best.CheckpointError:
                refused += 1
                continue
            loaded += 1
            for k, v in r.model.state_dict().items():
                assert torch.equal(v, good[k]), "swapped-in weights were loaded"
    finally:
        stop.set()
        thread.join()
    assert loaded > 0 and refused > 0, (loaded, refused)


@pytest.mark.parametrize("sidecars", ["kept", "removed"])
def test_a_changed_cache_entry_is_refetched_not_loaded(
    sqlite_uri: str, tmp_path: Path, sidecars: str
) -> None:
    run = _trained()
    cache = tmp_path / "cache"
    mlflow_best.restore(run.run_id, cache_dir=cache)  # downloads, hashes, seals
    first = mlflow_best.restore(run.run_id, cache_dir=cache)  # warm: from the sealed entry
    good = {k: v.clone() for k, v in first.model.state_dict().items()}
    entry = first.path
    assert entry.parent == cache
    assert (entry.stat().st_mode & 0o777) == 0o700 or (cache.stat().st_mode & 0o777) == 0o700
    # Rewrite the cached weights (and any sidecar the cache keeps) as an attacker on the machine would.
    target = entry / "model.pt"
    target.chmod(0o644)
    # Overwrite a tensor's bytes in place: same size, same name, other weights.
    with zipfile.ZipFile(target) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 0)
    with open(target, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(info.header_offset + 30 + name_len + extra_len)
        f.write(b"\x7f" * info.file_size)
    if sidecars == "removed":
        for sidecar in entry.glob(".*"):
            sidecar.unlink()
    again = mlflow_best.restore(run.run_id, cache_dir=cache)
    for k, v in again.model.state_dict().items():
        assert torch.equal(v, good[k])


# -- identity --------------------------------------------------------------------------------------------
def test_a_run_whose_best_points_at_another_runs_checkpoint_is_refused(sqlite_uri: str) -> None:
    honest = _trained(experiment="team")
    other = _trained(experiment="team")
    MlflowClient().set_tag(honest.run_id, TAG + "best_model_id", other.best.model_id)
    with pytest.raises(
        mlflow_best.CheckpointError, match=rf"belongs to run {other.run_id}.*not {honest.run_id}"
    ):
        mlflow_best.restore(honest.run_id)


def test_a_version_whose_tags_disagree_with_its_manifest_is_refused(sqlite_uri: str) -> None:
    name = f"team-{uuid.uuid4().hex[:6]}"
    run = _trained(registered_model=name)
    MlflowClient().set_model_version_tag(name, run.best.version, "epoch", "7")  # type: ignore[arg-type]
    with pytest.raises(mlflow_best.CheckpointError, match=r"epoch.*7.*manifest.*1"):
        mlflow_best.restore(f"models:/{name}/{run.best.version}")


# -- malformed manifests --------------------------------------------------------------------------------
MALFORMED: dict[str, Callable[[dict[str, Any]], Any]] = {
    "deep-nesting": lambda m: m.update({"metrics": json.loads("[" * 50 + "]" * 50)}),
    "huge-int": lambda m: m.update({"epoch": 10**5000}),
    "args-list": lambda m: m["model"].update({"args": [1, 2]}),
    "class-int": lambda m: m["model"].update({"class": 3}),
    "groups-str": lambda m: m["optimizer"].update({"groups": "all"}),
    "files-entry-neg": lambda m: m["files"]["model.pt"].update({"bytes": -1}),
    "value-str": lambda m: m.update({"value": "low"}),
    "factory-dict": lambda m: m["model"].update({"factory": {"a": 1}}),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_every_malformed_manifest_is_a_checkpoint_error_naming_the_field(
    sqlite_uri: str, tmp_path: Path, case: str
) -> None:
    folder = _local_copy(_trained(), tmp_path)
    path = folder / "manifest.json"
    path.chmod(0o644)
    data = json.loads(path.read_text())
    MALFORMED[case](data)
    sys.set_int_max_str_digits(0)
    try:
        text = json.dumps(data)
    finally:
        sys.set_int_max_str_digits(4300)
    if case == "deep-nesting":
        text = text.replace('"metrics": []', '"metrics": ' + "[" * 100000 + "]" * 100000)
    path.write_text(text)
    with pytest.raises(mlflow_best.CheckpointError, match=r"manifest.json"):
        mlflow_best.restore(str(folder))


# -- signing --------------------------------------------------------------------------------------------
@pytest.fixture
def signing_key(monkeypatch: pytest.MonkeyPatch) -> str:
    key = "team-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("MLFLOW_BEST_SIGNING_KEY", key)
    return key


def test_signed_checkpoints_round_trip_and_a_tampered_one_is_refused(
    store: str, tmp_path: Path, signing_key: str
) -> None:
    run = _trained(experiment=f"signed-{uuid.uuid4().hex[:6]}")
    r = mlflow_best.restore(run.run_id, cache_dir=tmp_path / "c1")
    assert (r.path / "manifest.sig").is_file()
    folder = _local_copy(run, tmp_path)
    _edit_manifest(folder, lambda m: m.update({"value": 0.0001}))  # a better-looking checkpoint
    with pytest.raises(mlflow_best.CheckpointError, match=r"manifest.sig: the signature does not match"):
        mlflow_best.restore(str(folder))


def test_with_a_key_unsigned_checkpoints_are_refused(
    sqlite_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _trained()  # no key: unsigned
    monkeypatch.setenv("MLFLOW_BEST_SIGNING_KEY", "k-" + uuid.uuid4().hex)
    with pytest.raises(mlflow_best.CheckpointError, match=r"manifest.sig is missing.*unsigned"):
        mlflow_best.restore(run.run_id, cache_dir=tmp_path / "c")


def test_the_alias_never_moves_to_an_unsigned_or_forged_version(sqlite_uri: str, signing_key: str) -> None:
    client = MlflowClient()
    name = f"signed-{uuid.uuid4().hex[:6]}"
    honest = _trained(registered_model=name)
    assert str(client.get_model_version_by_alias(name, "best").version) == honest.best.version
    # A forged version with a better metric tag (and a copied, now wrong, signature).
    src = client.get_model_version(name, honest.best.version)  # type: ignore[arg-type]
    forged_tags = dict(src.tags)
    forged_tags["value"] = "0.0001"
    forged = client.create_model_version(name, src.source, run_id=honest.run_id, tags=forged_tags)
    # The next honest improvement recomputes the alias: it must skip the forgery.
    later = _trained(registered_model=name)
    holder = str(client.get_model_version_by_alias(name, "best").version)
    assert holder != str(forged.version)
    assert holder in (honest.best.version, later.best.version)


def test_the_cli_imports_only_the_modules_named_with_import(sqlite_uri: str, tmp_path: Path) -> None:
    import os
    import subprocess

    run = _trained()
    env = dict(
        os.environ, MLFLOW_TRACKING_URI=sqlite_uri, PYTHONPATH=str(Path(__file__).resolve().parents[1])
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mlflow_best", "restore", run.run_id, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )

    refused = cli()
    assert refused.returncode == 1
    assert (
        "module 'tests.helpers' is not imported" in refused.stderr
        and "--import tests.helpers" in refused.stderr
    )
    chosen = cli("--import", "tests.helpers")
    assert chosen.returncode == 0, chosen.stderr
    assert chosen.stdout.startswith("restored TinyNet (58 parameters) from epoch 1")


def test_the_pyfunc_loader_refuses_unsigned_checkpoints_when_a_key_is_set(
    sqlite_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"pyfunc-{uuid.uuid4().hex[:6]}"
    _trained(registered_model=name)  # unsigned
    monkeypatch.setenv("MLFLOW_BEST_SIGNING_KEY", "k-" + uuid.uuid4().hex)
    with pytest.raises(mlflow_best.CheckpointError, match=r"manifest.sig is missing"):
        mlflow.pyfunc.load_model(f"models:/{name}/2")
    signed = f"pyfunc-{uuid.uuid4().hex[:6]}"
    _trained(registered_model=signed)  # signed with the key now set
    model = mlflow.pyfunc.load_model(f"models:/{signed}@best")
    assert model.predict(torch.randn(3, 4).numpy()).shape == (3, 2)
