"""The read paths (restore, load_model, promote, the CLI) never hang and say what is wrong.

Against a server that does not answer they give up at once, naming the URI; a device that is not
here, a model that does not exist, a pruned version: each is named with what exists instead.
"""

from __future__ import annotations

import os
import pickle
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

import mlflow_best
from mlflow_best._errors import CheckpointPrunedError, TrackingStoreUnreachableError
from mlflow_best._reach import HTTP_BOUNDS, bounded_http, probe, scoped_env
from mlflow_best.cli import main
from tests._server import free_port
from tests.helpers import TinyNet, run_sequence, unique


@pytest.fixture(autouse=True)
def _forget_cli_uri() -> Iterator[None]:
    """``--tracking-uri`` in an in-process CLI call sets MLflow's global URI: reset it after each test."""
    yield
    mlflow.set_tracking_uri(None)


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A port that accepts TCP connections and never answers (a hung server, a black-holing proxy)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)  # the kernel completes the handshakes; nobody ever reads or replies
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def refused_server() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused


# -- unreachable servers ----------------------------------------------------------------------------
READS = {
    "restore": lambda uri: mlflow_best.restore("models:/m@best", tracking_uri=uri),
    "restore-run": lambda uri: mlflow_best.restore("0" * 32, tracking_uri=uri),
    "load_model": lambda uri: mlflow_best.load_model("models:/m/1", tracking_uri=uri),
    "promote": lambda uri: mlflow_best.promote("m", tracking_uri=uri),
}


@pytest.mark.parametrize("call", list(READS))
def test_a_refused_server_is_an_outage_named_by_its_uri(
    refused_server: str, call: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in HTTP_BOUNDS:
        monkeypatch.delenv(key, raising=False)
    before = dict(os.environ)
    said = rf"{refused_server}' did not answer \(connection refused"
    with pytest.raises(TrackingStoreUnreachableError, match=said):
        READS[call](refused_server)
    assert dict(os.environ) == before  # MLflow's HTTP settings were bounded for the call only


def test_a_server_that_accepts_but_never_answers_is_an_outage_too(silent_server: str) -> None:
    said = rf"{silent_server}' did not answer \(connected, but no response within"
    with pytest.raises(TrackingStoreUnreachableError, match=said):
        mlflow_best.restore("models:/m@best", tracking_uri=silent_server)


@pytest.mark.parametrize("args", [["runs"], ["restore", "models:/m@best"], ["promote", "m"]], ids=" ".join)
def test_the_cli_gives_up_on_an_unreachable_server_in_one_line(refused_server: str, args: list[str]) -> None:
    result = CliRunner().invoke(main, [*args, "--tracking-uri", refused_server])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"error: the tracking store at '{refused_server}' did not answer")
    assert "--tracking-uri / MLFLOW_TRACKING_URI" in result.output


def test_the_cli_names_a_silent_server_from_the_environment(
    silent_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", silent_server)
    result = CliRunner().invoke(main, ["runs"])
    assert result.exit_code == 1
    assert f"'{silent_server}' did not answer (connected, but no response" in result.output


def test_the_outage_error_hides_passwords_and_survives_pickle(refused_server: str) -> None:
    uri = refused_server.replace("http://", "http://alice:s3cret@")
    with pytest.raises(TrackingStoreUnreachableError, match="did not answer") as caught:
        probe(uri)
    assert "s3cret" not in str(caught.value) and "alice:***@" in str(caught.value)
    again = pickle.loads(pickle.dumps(caught.value))
    assert isinstance(again, mlflow_best.TrackingStoreError)
    assert again.uri == caught.value.uri == uri.replace("s3cret", "***") and str(again) == str(caught.value)


def test_local_stores_and_answering_servers_are_not_refused(sqlite_uri: str) -> None:
    probe(sqlite_uri)
    probe("databricks")
    with pytest.raises(mlflow_best.CheckpointNotFoundError, match="does not exist"):
        mlflow_best.promote("nothing-here")  # reached the store, which said no: a refusal, not an outage


def test_http_settings_are_scoped_a_users_own_win_and_nesting_restores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in HTTP_BOUNDS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "77")  # the user's own
    with bounded_http():
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == HTTP_BOUNDS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"
        with bounded_http(), scoped_env({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "9"}):
            assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"  # already set by the outer scope
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"  # the inner scopes did not unset it
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"


class _SeesTheEnvironment(TinyNet):
    """Records MLflow's HTTP settings at the moment restore moves it to the device (mid-restore)."""

    seen: ClassVar[dict[str, str | None]] = {}

    def _apply(self, *args: Any, **kwargs: Any) -> Any:
        type(self).seen = {key: os.environ.get(key) for key in HTTP_BOUNDS}
        return super()._apply(*args, **kwargs)


def test_restore_runs_with_bounded_http_settings_and_puts_them_back(
    sqlite_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in HTTP_BOUNDS:
        monkeypatch.delenv(key, raising=False)
    run, _, _ = run_sequence([1.0], experiment=unique("scoped"), verbose=False)
    for key in HTTP_BOUNDS:
        monkeypatch.delenv(key, raising=False)  # whatever track() left, restore starts from a clean slate
    mlflow_best.restore(run.run_id, model=_SeesTheEnvironment())
    assert _SeesTheEnvironment.seen == dict(HTTP_BOUNDS)
    assert not [key for key in HTTP_BOUNDS if key in os.environ]


# -- devices ----------------------------------------------------------------------------------------
def _absent(device: str) -> bool:
    kind = torch.device(device).type
    backend = getattr(torch, kind, None)
    if backend is None or not backend.is_available():
        return True
    index = torch.device(device).index
    return index is not None and index >= backend.device_count()


@pytest.mark.parametrize("device", ["mps", "xpu", "xpu:1", "hpu", "cuda:7"])
def test_a_device_that_is_not_here_is_a_config_error_before_any_download(
    sqlite_uri: str, tmp_path: Path, device: str
) -> None:
    if not _absent(device):
        pytest.skip(f"{device} is available here")
    run, _, _ = run_sequence([1.0, 0.5], experiment=unique("dev"), verbose=False)
    cache = tmp_path / "never-filled"
    shown = rf"device='{device}' was asked for but .* available here: 'cpu'"
    with pytest.raises(mlflow_best.ConfigError, match=shown):
        mlflow_best.restore(run.run_id, device=device, cache_dir=cache)
    with pytest.raises(mlflow_best.ConfigError, match=shown):
        mlflow_best.load_model(run.run_id, device=device, cache_dir=cache)
    assert not cache.exists()  # refused before anything was downloaded
    result = CliRunner().invoke(main, ["restore", run.run_id, "--device", device])
    assert result.exit_code == 1 and f"device='{device}'" in result.output and "damaged" not in result.output
    assert mlflow_best.restore(run.run_id, cache_dir=cache).epoch == 1  # the checkpoint itself is healthy


# -- what exists instead ----------------------------------------------------------------------------
def test_restore_of_an_unknown_model_alias_or_version_lists_what_exists(store: str) -> None:
    name = unique("known")
    run_sequence([1.0, 0.5], experiment=unique("known"), registered_model=name, verbose=False)
    missing = rf"'nosuch-model' does not exist in '{re.escape(store)}' \(it has: .*'{name}'"
    with pytest.raises(mlflow_best.CheckpointNotFoundError, match=missing):
        mlflow_best.restore("models:/nosuch-model@best")
    with pytest.raises(mlflow_best.CheckpointNotFoundError, match=missing):
        mlflow_best.load_model("models:/nosuch-model/1")
    no_alias = r"has no alias 'gold' \(its aliases: @best -> v2\)"
    with pytest.raises(mlflow_best.CheckpointNotFoundError, match=no_alias):
        mlflow_best.restore(f"models:/{name}@gold")
    no_version = r"has no version 9 \(it has versions 1-2\)"
    with pytest.raises(mlflow_best.CheckpointNotFoundError, match=no_version):
        mlflow_best.restore(f"models:/{name}/9")


@pytest.mark.parametrize("ref", ["digits-mlp", "./checkpoints/epoch=3"])
def test_a_reference_restore_cannot_read_lists_every_accepted_form(sqlite_uri: str, ref: str) -> None:
    forms = r"'models:/<logged model id>' \(m-\.\.\.\), or a local checkpoint folder"
    with pytest.raises(mlflow_best.ConfigError, match=rf"ref='{ref}' is not a reference.*{forms}"):
        mlflow_best.restore(ref)
    if ref.startswith("."):
        with pytest.raises(mlflow_best.ConfigError, match=rf"there is no folder '{Path(ref).resolve()}'"):
            mlflow_best.restore(ref)


def test_cli_sync_of_an_unknown_run_names_the_staging_dir_option() -> None:
    result = CliRunner().invoke(main, ["sync", "f" * 32])
    assert result.exit_code == 1
    assert f"no staging folder for run {'f' * 32}" in result.output and "--staging-dir" in result.output


# -- registered model names with quotes -------------------------------------------------------------
@pytest.mark.parametrize("base", ["bob's model", 'the "best" one', "it's \"quoted\" \\ twice"])
def test_registered_model_names_with_quotes_work_end_to_end(store: str, base: str) -> None:
    name = f"{base} {unique('q')}"
    # A model whose name differs only where the quotes are, with a better value: never mistaken for ours.
    decoy = "".join("_" if c in "'\\" else c for c in name)
    if decoy != name:
        run_sequence([0.01], experiment=unique("decoy"), registered_model=decoy, verbose=False)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    run_sequence([1.0, 0.5, 0.7, 0.3], snapshots=snapshots, experiment=unique("quotes"),
                 registered_model=name, verbose=False)
    client = MlflowClient(store)
    assert str(client.get_model_version_by_alias(name, "best").version) == "3"  # the alias followed the best
    by_alias = mlflow_best.restore(f"models:/{name}@best")
    assert by_alias.epoch == 3 and by_alias.version == "3"
    for key, tensor in by_alias.model.state_dict().items():
        assert torch.equal(tensor, snapshots[3][key]), key
    assert mlflow_best.restore(f"models:/{name}/2").epoch == 1
    promoted = mlflow_best.promote(name)
    assert (promoted.version, promoted.candidates, promoted.previous) == ("3", 3, None)
    # A second run of the same model: the alias moves across runs, and a replay finds its version.
    run_sequence([0.2], experiment=unique("quotes"), registered_model=name, verbose=False)
    assert str(client.get_model_version_by_alias(name, "best").version) == "4"
    result = CliRunner().invoke(main, ["promote", name, "--alias", "gold"])
    assert result.exit_code == 0 and "@gold -> v4" in result.output, result.output


# -- pruned versions --------------------------------------------------------------------------------
def _prune_by_hand(client: MlflowClient, name: str, version: str) -> None:
    """What track(keep=...) does to a version: tag it pruned, then delete its files."""
    mv = client.get_model_version(name, version)
    model_id = mv.tags["mlflow_best.model_id"]
    client.set_model_version_tag(name, version, "mlflow_best.pruned", "true")
    client.set_logged_model_tags(model_id, {"mlflow_best.pruned": "true"})
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    get_artifact_repository(client.get_logged_model(model_id).artifact_location).delete_artifacts()


def test_the_alias_skips_versions_whose_files_were_deleted(store: str) -> None:
    name = unique("pruned")
    run_sequence([0.1], experiment=unique("pruned"), registered_model=name, verbose=False)  # v1: the best
    client = MlflowClient(store)
    _prune_by_hand(client, name, "1")
    client.delete_registered_model_alias(name, "best")
    run_sequence([0.5, 0.4], experiment=unique("pruned"), registered_model=name, verbose=False)  # v2, v3
    assert str(client.get_model_version_by_alias(name, "best").version) == "3"  # not the pruned v1


def test_restore_of_a_pruned_version_says_its_files_were_deleted_and_where_to_go(store: str) -> None:
    name = unique("pruned")
    run_sequence([1.0, 0.5, 0.7, 0.3], experiment=unique("pruned"), registered_model=name, keep=1,
                 verbose=False)
    with pytest.raises(
        CheckpointPrunedError,
        match=r"version 1 of '.*' was pruned by track\(keep=\.\.\.\): its checkpoint files were deleted.*"
        rf"the best version with files is 3 \(val_loss=0\.3\): 'models:/{name}/3'.*"
        rf"'models:/{name}@best' \(-> v3\)",
    ) as caught:
        mlflow_best.restore(f"models:/{name}/1")
    assert isinstance(caught.value, mlflow_best.CheckpointError)
    assert isinstance(caught.value, mlflow_best.CheckpointNotFoundError)
    # An alias left on a pruned version (set by hand, or by an older mlflow_best): restore says so.
    MlflowClient(store).set_registered_model_alias(name, "old", "2")
    said = r"alias @old of '.*' points at version 2, which was pruned by track\(keep=\.\.\.\): its checkpoint"
    with pytest.raises(CheckpointPrunedError, match=said):
        mlflow_best.load_model(f"models:/{name}@old")
