"""Small models and loops shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
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
