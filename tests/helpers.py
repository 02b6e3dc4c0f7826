"""Small models and loops shared by the tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mlflow_best


class TinyNet(nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, hidden)
        self.fc2 = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(torch.relu(self.fc1(x)))
        return out


def unique(prefix: str) -> str:
    """Names unique per test, so tests sharing one server do not see each other's models."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    x = torch.randn(16, 4)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def run_sequence(
    values: Sequence[float],
    *,
    hidden: int = 8,
    snapshots: dict[int, dict[str, torch.Tensor]] | None = None,
    **track_kwargs: Any,
) -> tuple[mlflow_best.Run, nn.Module, torch.optim.Optimizer]:
    """Train one step per epoch and log ``values`` as val_loss; record the weights of every epoch."""
    model = TinyNet(hidden)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    track_kwargs.setdefault("model_args", {"hidden": hidden})
    with mlflow_best.track(model, opt, **track_kwargs) as run:
        for epoch in range(run.start_epoch, len(values)):
            train_step(model, opt)
            if snapshots is not None:
                snapshots[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
            run.log_epoch(epoch, {"train_loss": 1.0 / (epoch + 1), "val_loss": values[epoch]})
    return run, model, opt


class PairNet(nn.Module):
    """Two named inputs, two named outputs: the dict case of serving."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sum": self.fc(a + b), "diff": self.fc(a - b)}


def launch_ranks(
    script: Path, argv: Sequence[str], cwd: Path, world: int, *, log_prefix: str = "rank",
    env: Mapping[str, str] | None = None, timeout: float = 240,
) -> None:
    """Run ``script`` as ``world`` gloo ranks (RANK / WORLD_SIZE / LOCAL_RANK set as torchrun does).

    Fails the test naming the rank and the end of its log when a rank hangs or exits non-zero; no
    rank outlives the call. Each rank's output goes to ``<cwd>/<log_prefix><rank>.log``.
    """
    import pytest

    from tests._server import die_with_parent

    procs = []
    for rank in range(world):
        rank_env = {**os.environ, **(env or {}), "RANK": str(rank), "WORLD_SIZE": str(world)}
        rank_env["LOCAL_RANK"] = str(rank)
        with open(cwd / f"{log_prefix}{rank}.log", "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, str(script), *argv],
                stdout=log, stderr=subprocess.STDOUT, env=rank_env, cwd=cwd, preexec_fn=die_with_parent,
            ))
    try:
        for rank, p in enumerate(procs):
            out = cwd / f"{log_prefix}{rank}.log"
            try:
                code = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {rank} hangs: {out.read_text()[-3000:]}")
            assert code == 0, f"rank {rank} failed: {out.read_text()[-3000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# -- child training processes (the SIGKILL-and-resume tests) -------------------------------------
def child_env(tracking_uri: str, home: Path, scores: list[float]) -> dict[str, str]:
    """A child training script's environment: its store, its own MLFLOW_BEST_HOME, scripted scores."""
    env = dict(os.environ)
    env.update(
        MLFLOW_TRACKING_URI=tracking_uri,
        MLFLOW_BEST_HOME=str(home),
        SCORES=repr(scores),
        PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]),
    )
    env.pop("MLFLOW_RUN_ID", None)
    return env


def start_child(script: Path, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``python script *args`` with its output in ``log``."""
    with open(log, "wb") as f:
        return subprocess.Popen(
            [sys.executable, str(script), *args], env=env, stdout=f, stderr=subprocess.STDOUT
        )


def finish_child(proc: subprocess.Popen[bytes], log: Path, timeout: float = 180) -> None:
    """Wait for the child; fail with the end of its log unless it exited 0."""
    rc = proc.wait(timeout=timeout)
    assert rc == 0, f"child exited with {rc}:\n{log.read_text(errors='replace')[-4000:]}"


def wait_for(
    condition: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, what: str, *, poll: float = 0.2
) -> None:
    """Until ``condition()`` holds; fails with the end of the child's log if it exits or 180 s pass."""
    import pytest

    deadline = time.monotonic() + 180
    while not condition():
        if proc.poll() is not None:
            pytest.fail(
                f"child exited ({proc.returncode}) before {what}:\n{log.read_text(errors='replace')[-4000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(poll)


def assert_identical(a: Any, b: Any, path: str = "") -> int:
    """torch.equal on every tensor of two nested states; equal plain values elsewhere. Returns the count."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs (max abs diff {(a.double() - b.double()).abs().max()})"
        return 1
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        return sum(assert_identical(a[k], b[k], f"{path}/{k}") for k in a)
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        return sum(assert_identical(x, y, f"{path}/{i}") for i, (x, y) in enumerate(zip(a, b, strict=True)))
    assert a == b, f"{path}: {a!r} != {b!r}"
    return 0



def sigkill_when(
    condition: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, what: str, *, poll: float = 0.2
) -> None:
    """SIGKILL the child as soon as ``condition()`` holds (see ``wait_for``), and check it died of it."""
    wait_for(condition, proc, log, what, poll=poll)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
