"""``mlflow-best`` from the shell: the real entry points against a sqlite store in tmp_path.

The flows run as real processes (``python -m mlflow_best`` and the installed ``mlflow-best`` script),
so exit statuses, stdout and stderr are what a user sees. The table of bad inputs goes through
click's runner in-process: the same ``main``, without paying ~5 s of imports per case.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

import mlflow_best
from mlflow_best._demo import DigitsMLP
from mlflow_best.cli import main

MODEL = "cli-mlp"


def _cli(args: list[str], tmp_path: Path, uri: str, script: bool = False,
         extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("mlflow-best", path=str(Path(sys.executable).parent)) if script else None
    if script:
        assert exe, f"the mlflow-best script is not installed next to {sys.executable}; pip install -e ."
    cmd = [exe] if exe else [sys.executable, "-m", "mlflow_best"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, **(extra_env or {})}
    return subprocess.run([*cmd, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def _train(values: list[float], run_name: str, hidden: int = 8) -> mlflow_best.Run:
    """A tracked run whose val_loss follows ``values`` (the weights need not be trained for these tests)."""
    torch.manual_seed(len(values))
    model = DigitsMLP(hidden=hidden)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with mlflow_best.track(model, opt, experiment="cli", registered_model=MODEL, run_name=run_name,
                           model_args={"hidden": hidden}, verbose=False) as run:
        for epoch, v in enumerate(values):
            run.log_epoch(epoch, {"val_loss": v, "val_acc": 1 - v / 2})
    return run


@pytest.mark.slow
def test_runs_promote_restore_as_a_user_would(sqlite_uri: str, tmp_path: Path) -> None:
    worse = _train([0.9, 0.6, 0.7], "worse")  # versions 1, 2
    better = _train([0.8, 0.5, 0.3, 0.4], "better")  # versions 3, 4, 5; v5 (0.3) is the best

    listed = _cli(["runs", "--experiment", "cli"], tmp_path, sqlite_uri)
    assert listed.returncode == 0, listed.stderr
    header, first, second = listed.stdout.splitlines()
    assert header.split() == ["run_id", "run_name", "status", "metric", "best", "epoch", "version", "alias"]
    # best first, with the best epoch, the registered version of that epoch and the alias on it
    assert first.split() == [better.run_id, "better", "FINISHED", "val_loss", "(min)", "0.3000", "2",
                             MODEL, "v5", "@best"]
    assert second.split() == [worse.run_id, "worse", "FINISHED", "val_loss", "(min)", "0.6000", "1",
                              MODEL, "v2", "-"]

    promoted = _cli(["promote", MODEL], tmp_path, sqlite_uri, script=True)
    assert promoted.returncode == 0, promoted.stderr
    assert promoted.stdout.strip() == (
        f"{MODEL}@champion -> v5 (best val_loss=0.3000 of 5 version(s), mode min: lower is better); "
        "the alias was not set before"
    )
    assert str(MlflowClient().get_model_version_by_alias(MODEL, "champion").version) == "5"

    out = tmp_path / "weights" / "champion.pt"
    restored = _cli(["restore", f"models:/{MODEL}@champion", "--out", str(out)], tmp_path, sqlite_uri)
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout.splitlines()[0] == (
        f"restored DigitsMLP (610 parameters) from epoch 2 of run {better.run_id}, version 5, onto cpu"
    )
    assert "val_loss=0.3000" in restored.stdout and f"wrote       {out}" in restored.stdout
    state = torch.load(out, weights_only=True)
    expected = mlflow_best.restore(f"models:/{MODEL}/5").model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    model = DigitsMLP(hidden=8)
    model.load_state_dict(state)  # a plain state_dict: loads without mlflow_best


@pytest.mark.slow
def test_restore_writes_safetensors_or_says_how_to_get_it(sqlite_uri: str, tmp_path: Path) -> None:
    run = _train([0.5, 0.4], "st")
    out = tmp_path / "best.safetensors"
    try:
        from safetensors.torch import load_file
    except ImportError:
        load_file = None
    if load_file is not None:
        done = _cli(["restore", run.run_id, "--out", str(out)], tmp_path, sqlite_uri)
        assert done.returncode == 0, done.stderr
        expected = mlflow_best.restore(run.run_id).model.state_dict()
        loaded = load_file(str(out))
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)
        out.unlink()
    # Without the package (shadowed by one that fails to import, as on a machine without it):
    # one line that says what to install, before any restore work, and no file.
    blocker = tmp_path / "blocked" / "safetensors"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named safetensors')\n")
    missing = _cli(["restore", run.run_id, "--out", str(out)], tmp_path, sqlite_uri,
                   extra_env={"PYTHONPATH": str(blocker.parent)})
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"error: --out {out}: writing .safetensors needs the safetensors package, which is not installed "
        "here; pip install safetensors, or write a .pt file instead"
    ]
    assert missing.stdout == "" and not out.exists()


@pytest.mark.slow
def test_demo_trains_registers_and_restores(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'demo.db'}"
    args = ["demo", "--epochs", "3", "--experiment", "demo-e", "--registered-model", "demo-m"]
    done = _cli(args, tmp_path, uri)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 3 and "new best val_loss (first), checkpoint taken" in epochs[0]
    # `mlflow`, or the path of this environment's script when it is not on PATH (a venv not activated)
    ui = r"  open the UI   (\S+/)?mlflow ui --backend-store-uri sqlite:///"
    assert any(re.match(ui, line) for line in lines)
    assert lines[-1].startswith("test accuracy of the restored best model")
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("demo-e").experiment_id])
    assert run.info.status == "FINISHED"
    best_version = run.data.tags["mlflow_best.best_version"]
    assert str(client.get_model_version_by_alias("demo-m", "best").version) == best_version


@pytest.mark.slow
def test_bad_input_from_a_real_process_is_one_line_and_exit_1(sqlite_uri: str, tmp_path: Path) -> None:
    _train([0.5, 0.4], "one")
    done = _cli(["promote", MODEL, "--version", "9"], tmp_path, sqlite_uri)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"error: registered model {MODEL!r} has no version 9 (it has versions 1-2); pass one of these, or "
        "omit the version to promote the best"
    ]
    assert "@champion" not in str(MlflowClient().get_registered_model(MODEL).aliases)


# -- bad input, in-process ------------------------------------------------------------------------
@pytest.fixture
def trained(sqlite_uri: str, monkeypatch: pytest.MonkeyPatch) -> mlflow_best.Run:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return _train([0.5, 0.4, 0.45], "one")


def _invoke(args: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


BAD_INPUT = [
    (["promote", MODEL, "--version", "7"], 1,
     f"error: registered model {MODEL!r} has no version 7 (it has versions 1-2)"),
    (["promote", "no-such-model"], 1, "error: registered model 'no-such-model' does not exist"),
    (["promote", MODEL, "--version", "2", "--best"], 2, "Error: pass --version V or --best, not both"),
    (["promote", MODEL, "--version", "two"], 2, "Error: Invalid value for '--version'"),
    (["promote", MODEL, "--alias", "latest"], 1,
     "error: alias='latest' is reserved by the MLflow registry"),
    (["restore", "models:/cli-mlp@nope"], 1,
     "error: 'models:/cli-mlp@nope': registered model 'cli-mlp' has no alias 'nope'"),
    (["restore", "models:/cli-mlp/99"], 1,
     "error: 'models:/cli-mlp/99': registered model 'cli-mlp' has no version 99"),
    (["restore", "not-a-ref"], 1, "error: ref='not-a-ref' is not a reference restore understands"),
    (["restore", "models:/cli-mlp@best", "--device", "tpu9"], 1,
     "error: device='tpu9' is not a torch device"),
    (["restore", "models:/cli-mlp@best", "--out", "w.txt"], 2,
     "Error: Invalid value for --out: 'w.txt' has no known suffix"),
    (["runs", "--experiment", "nope"], 1,
     "error: experiment 'nope' does not exist (there are: 'Default', 'cli')"),
    (["sync", "0" * 32], 1, f"error: no staging folder for run {'0' * 32}"),
    (["demo", "--epochs", "0"], 2, "Error: Invalid value for '--epochs': 0 is not in the range x>=1."),
]


@pytest.mark.parametrize(("args", "code", "message"), BAD_INPUT, ids=[" ".join(c[0]) for c in BAD_INPUT])
def test_bad_input_is_refused_with_the_problem_and_the_fix(
    trained: mlflow_best.Run, args: list[str], code: int, message: str
) -> None:
    exit_code, out, err = _invoke(args)
    assert exit_code == code
    assert message in err, err
    if code == 1:
        assert len(err.strip().splitlines()) == 1 and out == ""


def test_read_commands_do_not_create_a_store_where_there_is_none(tmp_path: Path) -> None:
    for args in (["runs"], ["promote", MODEL], ["restore", "models:/x@best"]):
        exit_code, _, err = _invoke(args)
        assert exit_code == 1
        assert err.startswith(f"error: no MLflow database at {tmp_path / 'mlflow.db'}")
    assert not (tmp_path / "mlflow.db").exists()


def test_promote_best_after_a_given_version_and_sync_of_a_complete_run(trained: mlflow_best.Run) -> None:
    assert _invoke(["promote", MODEL, "--version", "1", "--alias", "staging"]) == (
        0, f"{MODEL}@staging -> v1 (val_loss=0.5000); the alias was not set before\n", ""
    )
    code, out, _ = _invoke(["promote", MODEL, "--best", "--alias", "staging"])
    assert code == 0
    why = "best val_loss=0.4000 of 2 version(s), mode min: lower is better"
    assert out == f"{MODEL}@staging -> v2 ({why}); was v1\n"
    done = f"nothing to send: MLflow has all of run {trained.run_id}\n"
    assert _invoke(["sync", trained.run_id]) == (0, done, "")


def test_runs_lists_every_experiment_and_says_when_there_is_nothing(
    sqlite_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    mlflow.MlflowClient().create_experiment("empty")  # creates the database file
    assert _invoke(["runs"]) == (0, "no runs tracked by mlflow_best here; train one with `mlflow-best demo` "
                                    "or track()\n", "")
    _train([0.5], "one")
    code, out, _ = _invoke(["runs"])
    assert code == 0 and out.splitlines()[0].split()[:2] == ["experiment", "run_id"]
    assert out.splitlines()[1].split()[0] == "cli"


def test_help_lists_every_command_with_a_line_that_says_what_it_does() -> None:
    code, out, _ = _invoke(["--help"])
    assert code == 0
    for command in ("demo", "runs", "restore", "promote", "sync"):
        line = next(line for line in out.splitlines() if line.strip().startswith(command + " "))
        assert not line.rstrip().endswith("..."), line  # not cut off by click
    for command in ("demo", "runs", "restore", "promote", "sync"):
        code, text, _ = _invoke([command, "--help"])
        assert code == 0 and "--tracking-uri" in text
    assert "models:/NAME@ALIAS" in _invoke(["restore", "--help"])[1]
