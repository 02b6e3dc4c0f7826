"""The commands and links that mlflow_best prints work when pasted: this environment's scripts, the UI's
training view."""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from mlflow_best._shell import command
from tests.helpers import run_sequence

BIN = Path(sys.executable).parent


def test_a_command_on_path_is_printed_bare(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert command("mlflow") == "mlflow" and command("mlflow-best") == "mlflow-best"


def test_a_venv_that_is_not_activated_gets_its_script_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # this environment's bin folder is not on it
    assert command("mlflow") == str(BIN / "mlflow")
    monkeypatch.chdir(BIN.parent)  # as from a project folder holding .venv/: a relative path
    assert command("mlflow-best") == f"{BIN.name}/mlflow-best"
    assert command("not-installed-here") == "not-installed-here"


def test_the_summary_links_the_run_in_the_training_view(
    store: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a venv that is not activated
    run, _, _ = run_sequence([0.5], verbose=True)
    out = capsys.readouterr().out.splitlines()
    first = next(i for i, line in enumerate(out) if line.startswith("  open the UI   "))
    hint = [out[first].removeprefix("  open the UI   "), *(line.strip() for line in out[first + 1:first + 2])]
    if store.startswith("http"):
        link = hint[0]
        assert link.startswith(store.rstrip("/") + "/#/")
        with urllib.request.urlopen(link, timeout=10) as page:  # the UI itself is served there
            assert page.status == 200 and b"<html" in page.read(2000).lower()
    else:
        assert hint[0] == f"{BIN / 'mlflow'} ui --backend-store-uri {store}"
        link = hint[1].removeprefix("then ")
    parts = urlsplit(link)
    # MLflow's UI routes on the hash (createHashRouter): the parameter must be inside it, after the route
    assert parts.query == ""
    route, _, query = parts.fragment.partition("?")
    assert route == f"/experiments/{run.experiment_id}/runs/{run.run_id}"
    assert parse_qs(query) == {"workflowType": ["machine_learning"]}
