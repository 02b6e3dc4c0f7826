"""What importing the package and starting the CLI cost: no torch, no MLflow until something needs them.

Each check runs in a fresh interpreter (this test process has imported everything already). The
public surface is checked there too: ``__all__`` is what ``mlflow_best`` exposes, nothing leaks.
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException
from mlflow.utils import validation

import mlflow_best
from mlflow_best._config import alias_rule, key_rule, model_name_rule

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "mlflow")


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def _imported(importtime_stderr: str) -> set[str]:
    """Top-level package names of every module ``python -X importtime`` reports as imported."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name.split(".")[0])
    return names


def test_import_mlflow_best_imports_neither_torch_nor_mlflow() -> None:
    done = _python("-c", "import json, sys, mlflow_best; print(json.dumps(sorted(sys.modules)))")
    assert done.returncode == 0, done.stderr
    loaded = {name.split(".")[0] for name in json.loads(done.stdout)}
    assert "mlflow_best" in loaded
    assert not loaded & set(HEAVY), f"import mlflow_best imported {sorted(loaded & set(HEAVY))}"


def test_the_public_surface_is_all_and_nothing_else() -> None:
    script = (
        "import json, mlflow_best\n"
        "before = sorted(n for n in vars(mlflow_best) if not n.startswith('_'))\n"
        "values = {n: getattr(mlflow_best, n) for n in mlflow_best.__all__}\n"
        "after = sorted(n for n in vars(mlflow_best) if not n.startswith('_'))\n"
        "print(json.dumps({'before': before, 'after': after, 'dir': dir(mlflow_best),\n"
        "                  'modules': {n: getattr(v, '__module__', '') for n, v in values.items()}}))\n"
    )
    done = _python("-c", script)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    public = set(mlflow_best.__all__) - {"__version__"}
    # Only public names, before and after every lazily loaded one was used (no Any, torch, TrackConfig).
    assert set(found["before"]) <= public, sorted(set(found["before"]) - public)
    assert set(found["after"]) == public, sorted(set(found["after"]) ^ public)
    assert public <= set(found["dir"])
    # every name comes from a private module of the package (the public API lives nowhere else)
    assert all(m.startswith("mlflow_best._") for n, m in found["modules"].items() if n != "__version__")


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="module 'mlflow_best' has no attribute 'trak'"):
        mlflow_best.trak  # type: ignore[attr-defined]  # noqa: B018


# Each is answered by click or by our own checks before a command body reaches MLflow or torch.
CLI = [
    (["--help"], 0),
    (["runs", "--help"], 0),
    (["restore", "--help"], 0),
    (["promote"], 2),  # missing NAME
    (["promote", "m", "--version", "1", "--best"], 2),
    (["promote", "m", "--version", "one"], 2),
    (["restore", "models:/m@best", "--out", "w.txt"], 2),
    (["demo", "--epochs", "0"], 2),
    (["nope"], 2),
]


@pytest.mark.parametrize(("args", "code"), CLI, ids=[" ".join(a) for a, _ in CLI])
def test_help_and_usage_errors_import_neither_torch_nor_mlflow(args: list[str], code: int) -> None:
    done = _python("-X", "importtime", "-m", "mlflow_best", *args)
    assert done.returncode == code, done.stderr[-2000:]
    heavy = _imported(done.stderr) & set(HEAVY)
    assert not heavy, f"mlflow-best {' '.join(args)} imported {sorted(heavy)}"


def test_a_command_that_needs_mlflow_still_imports_it(tmp_path: Path) -> None:
    # the converse, so the check above cannot pass by never seeing an import
    done = _python("-X", "importtime", "-m", "mlflow_best", "runs", "--tracking-uri",
                   f"sqlite:///{tmp_path / 'missing.db'}")
    assert done.returncode == 1
    assert "mlflow" in _imported(done.stderr)


def test_the_runs_table_needs_mlflow_but_not_torch(sqlite_uri: str) -> None:
    """`mlflow-best runs` reads tags only: torch and the checkpoint format stay out of it."""
    done = _python("-X", "importtime", "-m", "mlflow_best", "runs", "--tracking-uri", sqlite_uri)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = _imported(done.stderr)
    assert "mlflow" in imported and "torch" not in imported


# -- MLflow's naming rules, restated in _config so that checking a name needs no MLflow ------------
NAMES = [
    "val_loss", "val/loss", "a.b", "a b", "a:b", "a-b", "acc@1", "../x", "./x", "x/../y", "/abs", "a//b",
    "a/", ".", "..", "...", "..x", "x.", " ", "é", "日本", "a\n", "a\tb", "$", "a,b", "best_v1", "latest",
    "V3", "-", "_", "x" * 260,
]


def _mlflow_message(check: object, name: str) -> str | None:
    try:
        check(name)  # type: ignore[operator]
    except MlflowException as e:
        return e.message
    return None


@pytest.mark.parametrize("name", NAMES)
def test_key_rules_agree_with_mlflow(name: str) -> None:
    ours = key_rule(name)
    for check in (validation._validate_metric_name, validation._validate_param_name,
                  validation._validate_tag_name):
        theirs = _mlflow_message(check, name)
        assert (ours is None) == (theirs is None), (name, ours, theirs)
        assert theirs is None or theirs.endswith(str(ours)), (theirs, ours)


@pytest.mark.parametrize("name", NAMES)
def test_model_and_alias_rules_agree_with_mlflow(name: str) -> None:
    ours, theirs = model_name_rule(name), _mlflow_message(validation._validate_model_name, name)
    assert (ours is None) == (theirs is None) and (theirs is None or theirs == ours), (name, ours, theirs)
    ours, theirs = alias_rule(name), _mlflow_message(validation._validate_model_alias_name, name)
    assert (ours is None) == (theirs is None) and (theirs is None or theirs == ours), (name, ours, theirs)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=string.printable + "é/.:@ ", min_size=1, max_size=12))
def test_every_rule_agrees_with_mlflow_on_any_short_name(name: str) -> None:
    assert (key_rule(name) is None) == (_mlflow_message(validation._validate_metric_name, name) is None)
    assert (model_name_rule(name) is None) == (_mlflow_message(validation._validate_model_name, name) is None)
    assert (alias_rule(name) is None) == (
        _mlflow_message(validation._validate_model_alias_name, name) is None
    )


# -- DDP: only rank 0 talks to MLflow, so only rank 0 imports it -------------------------------------
RANK_WORKER = """
import json, os, sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
import mlflow_best

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}", rank=rank, world_size=world)
torch.manual_seed(0)
model = DDP(torch.nn.Linear(4, 2))
opt = torch.optim.Adam(model.parameters(), lr=0.01)
with mlflow_best.track(model, opt, experiment="ddp-startup", registered_model="ddp-startup",
                       model_args={"in_features": 4, "out_features": 2}, input_example=torch.randn(2, 4),
                       verbose=False) as run:
    for epoch in range(3):
        run.log_epoch(epoch, {"val_loss": 1.0 / (epoch + 1)})
dist.barrier()
loaded = "mlflow" in sys.modules
dist.destroy_process_group()
print(json.dumps({"rank": rank, "run_id": run.run_id, "best": run.best.epoch, "mlflow": loaded}))
"""


@pytest.mark.slow
def test_only_rank_0_imports_mlflow(sqlite_uri: str, tmp_path: Path) -> None:
    script = tmp_path / "rank_worker.py"
    script.write_text(RANK_WORKER, encoding="utf-8")
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MLFLOW_TRACKING_URI": sqlite_uri,
               "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / "init")], env=env,
                                      cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=240)
            assert p.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    rank0, rank1 = sorted(results, key=lambda r: r["rank"])
    assert rank0["run_id"] == rank1["run_id"] and rank0["best"] == rank1["best"] == 2
    assert rank0["mlflow"] is True  # it logged the run
    assert rank1["mlflow"] is False, "rank 1 imported mlflow"
