#!/usr/bin/env python
"""Check mlflow_best on a CUDA machine: train through track(), restore onto "cpu" and "cuda:0", resume.

Run it on a machine with a GPU (one minute or less, no network):

    python scripts/gpu_check.py

It prints one PASS/FAIL line per check and a summary, and exits 1 if any check failed. Without CUDA it
prints why it skipped and exits 0. Everything it writes (a sqlite store, staging, cache) lives in a
temporary folder that is removed at the end (pass --keep to keep it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

EPOCHS = 4
VALUES = [1.0, 0.6, 0.8, 0.9]  # the monitored value per epoch: best at 1, "last" checkpoints at 2 and 3


class Net(nn.Module):
    """Dropout and BatchNorm (a buffer and RNG use on the GPU), small enough to train in a second."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.body(x))
        return out


class Checks:
    def __init__(self) -> None:
        self.results: list[tuple[str, bool, str]] = []

    def run(self, name: str, check: Callable[[], str | None]) -> None:
        try:
            detail = check() or ""
            self.results.append((name, True, detail))
            print(f"PASS  {name}{'  (' + detail + ')' if detail else ''}", flush=True)
        except Exception as e:  # report every failure, keep checking
            self.results.append((name, False, f"{type(e).__name__}: {e}"))
            print(f"FAIL  {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=4)

    def summary(self) -> int:
        failed = [name for name, ok, _ in self.results if not ok]
        print(f"\n{len(self.results) - len(failed)}/{len(self.results)} checks passed", flush=True)
        if failed:
            print("FAILED: " + ", ".join(failed), flush=True)
            return 1
        print("ALL PASS", flush=True)
        return 0


def _cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys(), f"keys differ: {sorted(a.keys() ^ b.keys())}"
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), f"{k} differs"


def _devices_of(model: nn.Module, opt: torch.optim.Optimizer | None) -> dict[str, set[str]]:
    out = {"model": {str(t.device) for t in model.state_dict().values()}}
    if opt is not None:
        out["optimizer"] = {
            str(v.device)
            for s in opt.state.values()
            for k, v in s.items()
            if isinstance(v, torch.Tensor) and k != "step"
        }
        out["step"] = {
            str(s["step"].device) for s in opt.state.values() if isinstance(s.get("step"), torch.Tensor)
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print(
            f"SKIP: CUDA is not available here (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda or 'none'}); run this script on a machine with a GPU. Nothing was checked.",
            flush=True,
        )
        return 0

    work = Path(tempfile.mkdtemp(prefix="mlflow_best-gpu-check-"))
    os.environ["MLFLOW_BEST_HOME"] = str(work / "home")
    os.environ.pop("MLFLOW_RUN_ID", None)
    os.chdir(work)  # the sqlite store's artifacts go under ./mlruns

    import mlflow

    import mlflow_best

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    dev = torch.device("cuda:0")
    print(
        f"device: {torch.cuda.get_device_name(dev)}; torch {torch.__version__}; mlflow {mlflow.__version__}"
    )
    checks = Checks()
    state: dict[str, object] = {}

    def train() -> str:
        torch.manual_seed(0)
        model = Net().to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
        scaler = torch.amp.GradScaler("cuda")
        x = torch.randn(256, 16, device=dev)
        y = torch.randint(0, 4, (256,), device=dev)
        snaps: dict[int, dict[str, torch.Tensor]] = {}
        t0 = time.perf_counter()
        with mlflow_best.track(
            model,
            opt,
            scheduler=sched,
            scaler=scaler,
            experiment="gpu-check",
            registered_model="gpu-check",
            save_last=True,
            model_args={"width": 64},
            verbose=False,
        ) as run:
            for epoch in range(run.start_epoch, EPOCHS):
                model.train()
                for i in range(0, 256, 32):
                    with torch.autocast("cuda", dtype=torch.float16):
                        loss = nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
                    opt.zero_grad()
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                sched.step()
                snaps[epoch] = _cpu_copy(model)
                run.log_epoch(epoch, {"train_loss": loss.item(), "val_loss": VALUES[epoch]})
        state.update(run_id=run.run_id, snaps=snaps, model=model, opt=opt)
        assert run.best.epoch == 1, f"best epoch {run.best.epoch}, expected 1"
        return f"run {run.run_id}, {EPOCHS} epochs in {time.perf_counter() - t0:.1f} s"

    def restore_cpu() -> str:
        r = mlflow_best.restore(str(state["run_id"]), device="cpu")  # rebuilt from the manifest
        devices = _devices_of(r.model, r.optimizer)
        assert devices["model"] == {"cpu"} and devices["optimizer"] == {"cpu"}, devices
        _same(r.model.state_dict(), state["snaps"][1])  # type: ignore[index]
        assert r.epoch == 1
        return f"devices {devices}"

    def restore_cuda() -> str:
        model = Net().to("cpu")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        r = mlflow_best.restore(str(state["run_id"]), model, opt, device="cuda:0")
        devices = _devices_of(r.model, r.optimizer)
        assert devices["model"] == {"cuda:0"} and devices["optimizer"] == {"cuda:0"}, devices
        assert devices["step"] <= {"cpu"}, devices  # a non-capturable AdamW keeps step on the CPU
        _same(r.model.state_dict(), state["snaps"][1])  # type: ignore[index]
        # The optimizer can take a step where it now lives.
        loss = r.model(torch.randn(8, 16, device="cuda:0")).sum()
        loss.backward()
        opt.step()
        return f"devices {devices}"

    def restore_alias_cuda() -> str:
        r = mlflow_best.restore("models:/gpu-check@best", device="cuda")
        assert {str(t.device) for t in r.model.state_dict().values()} == {"cuda:0"}
        _same(r.model.state_dict(), state["snaps"][1])  # type: ignore[index]
        return f"version {r.version}"

    def rng_on_cuda() -> str:
        r = mlflow_best.restore(str(state["run_id"]), device="cpu")
        saved = r.training_state["rng"].get("cuda")
        assert saved, "the checkpoint holds no CUDA RNG state"
        torch.cuda.manual_seed_all(123)
        mlflow_best.restore(str(state["run_id"]), device="cpu", restore_rng=True)
        assert torch.equal(torch.cuda.get_rng_state(0), saved[0].cpu()), "CUDA RNG state not restored"
        return f"{len(saved)} device state(s)"

    def resume_on_cuda() -> str:
        model = Net().to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with mlflow_best.track(model, opt, resume=str(state["run_id"]), save_last=True, verbose=False) as run:
            assert run.start_epoch == EPOCHS, (
                f"start_epoch {run.start_epoch}, expected {EPOCHS} (last: {EPOCHS - 1})"
            )
            _same(_cpu_copy(model), state["snaps"][EPOCHS - 1])  # type: ignore[index]
            devices = _devices_of(model, opt)
            assert devices["model"] == {"cuda:0"} and devices["optimizer"] == {"cuda:0"}, devices
        return f"start_epoch {run.start_epoch}"

    try:
        checks.run("train 4 epochs on cuda:0 through track (AMP, GradScaler, save_last)", train)
        if "run_id" in state:
            checks.run("restore onto cpu (model rebuilt): weights equal, every tensor on cpu", restore_cpu)
            checks.run(
                "restore onto cuda:0 into given objects: weights equal, optimizer state on cuda:0",
                restore_cuda,
            )
            checks.run("restore models:/gpu-check@best onto 'cuda'", restore_alias_cuda)
            checks.run("restore_rng puts the CUDA RNG state back", rng_on_cuda)
            checks.run("resume on cuda:0 from the latest checkpoint", resume_on_cuda)
        return checks.summary()
    finally:
        os.chdir(Path.home())
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
