#!/usr/bin/env python
"""Benchmark: what it costs to keep the best PyTorch checkpoint in MLflow.

The same deterministic training runs under several tracking variants:

* ``none``              no tracking at all (the floor),
* ``seed``              the hand-written pattern: synchronous ``torch.save`` +
                        ``log_artifact`` + model-registry version on each improvement,
* ``lightning``         PyTorch Lightning ``ModelCheckpoint`` + ``MLFlowLogger(log_model="all")``,
* ``mlflow_best``       ``mlflow_best.track`` (keep=None),
* ``mlflow_best_keep1`` ``mlflow_best.track(keep=1)`` (only its bytes stored matter).

The validation loss that drives "improvement" is scripted (``IMPROVING``), so
every variant sees improvements on exactly the same epochs, while the model
really trains (seeded synthetic data) so that checkpoints contain real,
changing weights. Each measurement runs in a fresh subprocess (``--_child``) so
memory peaks and warm caches don't bleed between variants.

Run ``python benchmarks/bench.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import itertools
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports stay out of the parent process
    import pandas as pd
    import torch
    from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 20
QUICK_EPOCHS = 8
# Epochs on which the scripted val_loss reaches a new minimum. The last epoch is
# deliberately not one of them so that no stall is mixed with end-of-run work.
IMPROVING = (0, 1, 3, 6, 10, 15)
ALL_VARIANTS = ("none", "seed", "lightning", "mlflow_best", "mlflow_best_keep1")
ALL_STORES = ("sqlite", "server")
CHILD_TIMEOUT_S = 900
SERVER_START_TIMEOUT_S = 180
SAMPLE_INTERVAL_S = 0.005
MB = 1_000_000


@dataclass(frozen=True)
class SizeSpec:
    """An MLP plus how much work one epoch does with it."""

    dims: tuple[int, ...]
    batch: int
    train_batches: int
    val_batches: int


SIZES: dict[str, SizeSpec] = {
    # ~100K parameters: 256*256 + 256*128 + 128*10 (+ biases) = 99,978.
    "small": SizeSpec((256, 256, 128, 10), batch=256, train_batches=64, val_batches=8),
    # ~25.2M parameters (~100 MB fp32); few batches keep 2-core CPU runs short.
    "large": SizeSpec((1024, 4096, 4096, 1024, 10), batch=64, train_batches=4, val_batches=2),
}


# --------------------------------------------------------------------------- #
# Child side: workload                                                        #
# --------------------------------------------------------------------------- #

Batch = tuple["torch.Tensor", "torch.Tensor"]


@dataclass
class Workload:
    """Model, optimizer and data shared by every variant of one size."""

    model: nn.Module
    opt: torch.optim.Optimizer
    train: list[Batch]
    val: list[Batch]
    epochs: int
    val_script: list[float]
    # epoch -> fingerprint of the weights at the end of that epoch (improving epochs only)
    fingerprints: dict[int, list[float]] = field(default_factory=dict)


def scripted_val_loss(epochs: int) -> list[float]:
    """Val loss that improves exactly on IMPROVING and is worse otherwise."""
    best, out = 1.0, []
    for epoch in range(epochs):
        if epoch in IMPROVING:
            best *= 0.8
            out.append(best)
        else:
            out.append(best + 0.05)
    return out


def expected_improving(epochs: int) -> list[int]:
    return [e for e in IMPROVING if e < epochs]


def make_batches(size: SizeSpec, n_batches: int, seed: int) -> list[Batch]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(size.dims[0], size.dims[-1], generator=torch.Generator().manual_seed(7))
    x = torch.randn(n_batches * size.batch, size.dims[0], generator=gen)
    y = (x @ teacher).argmax(dim=1)
    return list(zip(x.split(size.batch), y.split(size.batch), strict=True))


def make_model(dims: Sequence[int]) -> nn.Module:
    from torch import nn

    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_workload(size_name: str, epochs: int) -> Workload:
    import torch

    size = SIZES[size_name]
    torch.manual_seed(0)
    model = make_model(size.dims)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    prime_optimizer(model, opt)
    return Workload(
        model=model,
        opt=opt,
        train=make_batches(size, size.train_batches, seed=1),
        val=make_batches(size, size.val_batches, seed=2),
        epochs=epochs,
        val_script=scripted_val_loss(epochs),
    )


def prime_optimizer(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Allocate grads and Adam state before the run.

    Otherwise the first step allocates 3x the model size and every variant's
    "peak extra memory" would be dominated by training, not by tracking.
    A zero gradient leaves the weights unchanged (Adam's update is 0/eps).
    """
    import torch

    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()


def state_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    import torch

    tensors = list(model.state_dict().values())
    for per_param in opt.state_dict()["state"].values():
        tensors.extend(v for v in per_param.values() if isinstance(v, torch.Tensor))
    return tensors


def fingerprint(state: Mapping[str, torch.Tensor]) -> list[float]:
    """Cheap, order-independent summary of a model state (sum per tensor)."""
    return [float(state[k].double().sum()) for k in sorted(state)]


def train_epoch(wl: Workload) -> float:
    import torch.nn.functional as F

    wl.model.train()
    total = 0.0
    for x, y in wl.train:
        # set_to_none=False keeps grads allocated (see prime_optimizer).
        wl.opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(wl.model(x), y)
        loss.backward()
        wl.opt.step()
        total += loss.item()
    return total / len(wl.train)


def validate(wl: Workload) -> float:
    """Real validation pass; its value is computed but the scripted one is reported."""
    import torch
    import torch.nn.functional as F

    wl.model.eval()
    with torch.no_grad():
        losses = [float(F.cross_entropy(wl.model(x), y)) for x, y in wl.val]
    return sum(losses) / len(losses)


class EpochClock:
    """Measures the gap between the end of an epoch's work and the next epoch.

    ``work_end()`` is called right after validation; ``epoch_start()`` at the
    top of the next epoch (and once after the loop for the last epoch). The
    gap is exactly the time the training loop spends in tracking code. The
    work itself (train + validate) is timed too, to explain wall-time gaps.
    """

    def __init__(self) -> None:
        self.stalls: list[float] = []
        self.work: list[float] = []
        self._work_end: float | None = None
        self._work_start: float | None = None

    def epoch_start(self) -> None:
        now = time.perf_counter()
        if self._work_end is not None:
            self.stalls.append(now - self._work_end)
            self._work_end = None
        self._work_start = now

    def work_end(self) -> None:
        now = time.perf_counter()
        if self._work_start is not None:
            self.work.append(now - self._work_start)
        self._work_end = now


def fit_epoch(wl: Workload, epoch: int, clock: EpochClock) -> tuple[float, float]:
    """One epoch of real work; returns (train_loss, scripted val_loss)."""
    clock.epoch_start()
    train_loss = train_epoch(wl)
    validate(wl)
    if epoch in IMPROVING:  # before work_end: the check must not count as stall
        wl.fingerprints[epoch] = fingerprint(wl.model.state_dict())
    clock.work_end()
    return train_loss, wl.val_script[epoch]


# --------------------------------------------------------------------------- #
# Child side: stores and variants                                             #
# --------------------------------------------------------------------------- #


@dataclass
class StoreCtx:
    """Where one variant's run goes, and where its bytes land on disk."""

    uri: str
    experiment: str
    experiment_id: str
    artifact_dir: Path
    registered_model: str
    scratch: Path


@dataclass
class VariantOut:
    clock: EpochClock
    improved: list[int] | None  # epochs the variant itself reported as improving
    restore: Callable[[], tuple[int, dict[str, torch.Tensor]]] | None
    run_id: str | None = None


def open_store(spec: ChildSpec, tag: str) -> StoreCtx:
    """Point MLflow at the store and pre-create a fresh experiment.

    Pre-creating lets us choose the artifact location for sqlite (MLflow would
    otherwise default to ./mlruns) and keeps experiment creation (and, for a
    fresh sqlite file, schema migration) out of every variant's wall time.
    """
    import mlflow
    from mlflow import MlflowClient

    workdir = Path(spec.workdir)
    name = f"bench-{tag}"
    if spec.store == "sqlite":
        uri = f"sqlite:///{workdir / 'mlflow.db'}"
        artifacts = workdir / "artifacts"
        exp_id = MlflowClient(uri).create_experiment(name, artifact_location=str(artifacts))
    else:
        assert spec.server_url and spec.server_artifacts
        uri = spec.server_url
        exp_id = MlflowClient(uri).create_experiment(name)
        artifacts = Path(spec.server_artifacts) / exp_id  # mlflow-artifacts:/<exp_id>
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # for code that builds its own client
    scratch = workdir / "scratch"
    scratch.mkdir(exist_ok=True)
    return StoreCtx(uri, name, exp_id, artifacts, f"bench-model-{tag}", scratch)


def run_none(wl: Workload, ctx: StoreCtx | None) -> VariantOut:
    clock = EpochClock()
    for epoch in range(wl.epochs):
        fit_epoch(wl, epoch, clock)
    clock.epoch_start()
    return VariantOut(clock, None, None)


def run_seed(wl: Workload, ctx: StoreCtx | None) -> VariantOut:
    """The hand-written, fully synchronous pattern this library replaces."""
    import mlflow
    import torch
    from mlflow import MlflowClient

    assert ctx is not None
    client = MlflowClient()
    client.create_registered_model(ctx.registered_model)
    path = ctx.scratch / "ckpt.pt"
    clock, improved, best = EpochClock(), [], math.inf
    with mlflow.start_run(experiment_id=ctx.experiment_id) as run:
        run_id = run.info.run_id
        for epoch in range(wl.epochs):
            train_loss, val_loss = fit_epoch(wl, epoch, clock)
            mlflow.log_metrics({"train_loss": train_loss, "val_loss": val_loss}, step=epoch)
            if val_loss < best:
                best = val_loss
                improved.append(epoch)
                state = {"model": wl.model.state_dict(), "optimizer": wl.opt.state_dict(), "epoch": epoch}
                torch.save(state, path)
                mlflow.log_artifact(str(path), artifact_path=f"checkpoints/epoch={epoch}")
                source = f"runs:/{run_id}/checkpoints/epoch={epoch}"
                mv = client.create_model_version(ctx.registered_model, source=source, run_id=run_id)
                # Same outcome as mlflow_best's alias="best", for a like-for-like stall.
                client.set_registered_model_alias(ctx.registered_model, "best", mv.version)
        clock.epoch_start()
    return VariantOut(clock, improved, lambda: restore_seed(ctx), run_id)


def restore_seed(ctx: StoreCtx) -> tuple[int, dict[str, torch.Tensor]]:
    """Resolve the "best" alias, download that checkpoint, torch.load it."""
    import mlflow
    import torch
    from mlflow import MlflowClient

    mv = MlflowClient().get_model_version_by_alias(ctx.registered_model, "best")
    with tempfile.TemporaryDirectory(dir=ctx.scratch) as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=tmp)
        ckpt = torch.load(Path(local) / "ckpt.pt", map_location="cpu", weights_only=True)
    return int(ckpt["epoch"]), ckpt["model"]


def run_lightning(wl: Workload, ctx: StoreCtx | None) -> VariantOut:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import MLFlowLogger
    from torch.utils.data import DataLoader

    assert ctx is not None
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    clock = EpochClock()
    ckpt_cb = ModelCheckpoint(dirpath=ctx.scratch / "lightning", monitor="val_loss", mode="min", save_top_k=1)
    clock_cb = _lightning_clock_callback(clock, ckpt_cb)
    logger = MLFlowLogger(experiment_name=ctx.experiment, tracking_uri=ctx.uri, log_model="all")
    trainer = L.Trainer(
        max_epochs=wl.epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[ckpt_cb, clock_cb],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,  # the other variants don't validate before training
        default_root_dir=str(ctx.scratch),
    )
    # batch_size=None: the lists are already batched, so no collation happens.
    train_dl = DataLoader(wl.train, batch_size=None)  # type: ignore[arg-type]
    val_dl = DataLoader(wl.val, batch_size=None)  # type: ignore[arg-type]
    trainer.fit(_lightning_module(wl, clock), train_dl, val_dl)
    run_id = logger.run_id
    return VariantOut(
        clock, clock_cb.improved, lambda: restore_lightning(ctx, run_id, ckpt_cb), run_id
    )


def _lightning_module(wl: Workload, clock: EpochClock) -> Any:
    """The same model/optimizer/steps as the plain loop, as a LightningModule."""
    import lightning as L
    import torch.nn.functional as F

    class BenchModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = wl.model

        def training_step(self, batch: Batch, batch_idx: int) -> Any:
            x, y = batch
            loss = F.cross_entropy(self.model(x), y)
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return loss

        def validation_step(self, batch: Batch, batch_idx: int) -> None:
            x, y = batch
            F.cross_entropy(self.model(x), y)

        def on_validation_epoch_end(self) -> None:
            epoch = self.current_epoch
            self.log("val_loss", wl.val_script[epoch])
            if epoch in IMPROVING:
                wl.fingerprints[epoch] = fingerprint(self.model.state_dict())
            clock.work_end()

        def configure_optimizers(self) -> Any:
            return wl.opt  # the pre-built, primed optimizer: same state as the others

        def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
            optimizer.zero_grad(set_to_none=False)

    return BenchModule()


def _lightning_clock_callback(clock: EpochClock, ckpt_cb: Any) -> Any:
    from lightning.pytorch.callbacks import Callback

    class ClockCallback(Callback):
        """Closes the stall window and records which epochs ModelCheckpoint saved."""

        def __init__(self) -> None:
            self.improved: list[int] = []
            self._best = ""
            self._epoch = -1

        def _close(self) -> None:
            clock.epoch_start()
            if ckpt_cb.best_model_path != self._best:
                self._best = ckpt_cb.best_model_path
                self.improved.append(self._epoch)

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self._close()
            self._epoch = trainer.current_epoch

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self._close()

    return ClockCallback()


def restore_lightning(ctx: StoreCtx, run_id: str | None, ckpt_cb: Any) -> tuple[int, dict[str, torch.Tensor]]:
    """Download the best checkpoint logged by MLFlowLogger and torch.load it."""
    import mlflow
    import torch

    stem = Path(ckpt_cb.best_model_path).stem  # MLFlowLogger's artifact_path
    with tempfile.TemporaryDirectory(dir=ctx.scratch) as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=stem, dst_path=tmp)
        ckpt = torch.load(Path(local) / f"{stem}.ckpt", map_location="cpu", weights_only=True)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    return int(ckpt["epoch"]), state


def run_mlflow_best(wl: Workload, ctx: StoreCtx | None, keep: int | None = None) -> VariantOut:
    import mlflow_best  # lazy: the package may not exist yet

    assert ctx is not None
    extra: dict[str, Any] = {} if keep is None else {"keep": keep}
    clock, improved = EpochClock(), []
    with mlflow_best.track(
        wl.model,
        wl.opt,
        monitor="val_loss",
        mode="min",
        experiment=ctx.experiment,
        registered_model=ctx.registered_model,
        alias="best",
        tracking_uri=ctx.uri,
        **extra,
    ) as run:
        for epoch in range(run.start_epoch, wl.epochs):
            train_loss, val_loss = fit_epoch(wl, epoch, clock)
            if run.log_epoch(epoch, {"train_loss": train_loss, "val_loss": val_loss}):
                improved.append(epoch)
        clock.epoch_start()
    run_id = str(run.run_id)
    return VariantOut(clock, improved, lambda: restore_mlflow_best(run_id), run_id)


def restore_mlflow_best(run_id: str) -> tuple[int, dict[str, torch.Tensor]]:
    import mlflow_best

    restored = mlflow_best.restore(run_id, device="cpu")
    return int(restored.epoch), restored.model.state_dict()


PREIMPORTS: dict[str, tuple[str, ...]] = {
    "seed": ("mlflow",),
    "lightning": ("lightning", "lightning.pytorch.callbacks", "lightning.pytorch.loggers"),
    "mlflow_best": ("mlflow_best",),
    "mlflow_best_keep1": ("mlflow_best",),
}

VARIANTS: dict[str, Callable[[Workload, StoreCtx | None], VariantOut]] = {
    "none": run_none,
    "seed": run_seed,
    "lightning": run_lightning,
    "mlflow_best": run_mlflow_best,
    "mlflow_best_keep1": lambda wl, ctx: run_mlflow_best(wl, ctx, keep=1),
}


# --------------------------------------------------------------------------- #
# Child side: measurement                                                     #
# --------------------------------------------------------------------------- #


def _rss_reader() -> Callable[[], int]:
    """RSS of this process plus its children (a library may upload from a subprocess)."""
    try:
        import psutil
    except ImportError:  # fall back to /proc: this process only
        page = os.sysconf("SC_PAGE_SIZE")

        def statm() -> int:
            return int(Path("/proc/self/statm").read_text().split()[1]) * page

        return statm
    proc = psutil.Process()
    children: list[Any] = []
    calls = 0

    def read() -> int:
        nonlocal children, calls
        if calls % 20 == 0:  # scanning /proc for children every 5 ms would be costly
            children = proc.children(recursive=True)
        calls += 1
        total = proc.memory_info().rss
        for child in children:
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return total

    return read


class RssSampler:
    """Samples RSS every SAMPLE_INTERVAL_S in a thread; reports peak minus start."""

    def __init__(self) -> None:
        self._read = _rss_reader()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.start_rss = 0
        self.peak = 0

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self.peak = max(self.peak, self._read())

    def __enter__(self) -> RssSampler:
        gc.collect()
        self.start_rss = self.peak = self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())

    @property
    def extra_bytes(self) -> int:
        return self.peak - self.start_rss


def dir_bytes(root: Path) -> int:
    if not root.exists():
        return 0
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def median_ms(values: Sequence[float]) -> float | None:
    return statistics.median(values) * 1e3 if values else None


def bare_load_ms(artifact_dir: Path) -> float | None:
    """Warm torch.load(weights_only=True) of the largest file this run stored.

    That file is the variant's own checkpoint format, so this is the floor
    that its restore is compared with. None if it isn't torch.load-able.
    """
    import torch

    files = [p for p in artifact_dir.rglob("*") if p.is_file()] if artifact_dir.exists() else []
    if not files:
        return None
    biggest = max(files, key=lambda p: p.stat().st_size)
    try:
        torch.load(biggest, map_location="cpu", weights_only=True)  # warm the page cache
        return timed(lambda: torch.load(biggest, map_location="cpu", weights_only=True))[0] * 1e3
    except Exception:  # any failure just means "not a torch file"
        return None


def check_restore(wl: Workload, out: VariantOut, restored: tuple[int, dict[str, Any]]) -> str:
    """Did the variant report the right epochs and restore the right weights?"""
    expected = expected_improving(wl.epochs)
    problems = []
    if out.improved is not None and out.improved != expected:
        problems.append(f"improved={out.improved} expected={expected}")
    epoch, state = restored
    if epoch != expected[-1]:
        problems.append(f"restored epoch {epoch} != best {expected[-1]}")
    elif not all(
        math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
        for a, b in zip(fingerprint(state), wl.fingerprints[epoch], strict=True)
    ):
        problems.append("restored weights differ from the best epoch's")
    return "; ".join(problems) or "ok"


def stall_stats(stalls: list[float], epochs: int) -> dict[str, float | None]:
    improving = set(expected_improving(epochs))
    imp = [s for e, s in enumerate(stalls) if e in improving]
    non = [s for e, s in enumerate(stalls) if e not in improving]
    return {
        "stall_impr_ms": median_ms(imp),
        "stall_max_ms": max(imp) * 1e3 if imp else None,
        "nonimpr_ms": median_ms(non),
    }


def measure_variant(spec: ChildSpec) -> dict[str, Any]:
    # Imports are a once-per-process cost, not a per-run one: keep them out of wall time.
    for module in PREIMPORTS.get(spec.variant, ()):
        importlib.import_module(module)
    wl = make_workload(spec.size, spec.epochs)
    ctx = None if spec.variant == "none" else open_store(spec, f"{spec.variant}-{spec.size}")
    state_bytes = sum(t.nbytes for t in state_tensors(wl.model, wl.opt))
    with RssSampler() as mem:
        wall, out = timed(lambda: VARIANTS[spec.variant](wl, ctx))
    row: dict[str, Any] = {
        **stall_stats(out.clock.stalls, wl.epochs),
        "wall_s": wall,
        "work_s": sum(out.clock.work),
        "peak_extra_mb": mem.extra_bytes / MB,
        "state_mb": state_bytes / MB,
    }
    if ctx is not None and out.restore is not None:
        row["stored_mb"] = dir_bytes(ctx.artifact_dir) / MB
        row["restore_cold_ms"] = timed(out.restore)[0] * 1e3
        warm, restored = timed(out.restore)
        row["restore_ms"] = warm * 1e3
        row["bare_load_ms"] = bare_load_ms(ctx.artifact_dir)
        row["check"] = check_restore(wl, out, restored)
        if spec.store == "server":  # the server outlives this child: free its disk now
            shutil.rmtree(ctx.artifact_dir, ignore_errors=True)
    return row


def measure_baseline(spec: ChildSpec) -> dict[str, Any]:
    """Floors: copying the state into preallocated CPU buffers; a bare torch.load."""
    import torch

    wl = make_workload(spec.size, 1)
    tensors = state_tensors(wl.model, wl.opt)
    buffers = [torch.empty_like(t, device="cpu") for t in tensors]

    def copy() -> None:
        for buf, t in zip(buffers, tensors, strict=True):
            buf.copy_(t)

    copy()  # first touch of fresh buffers pays page faults; a real library reuses them
    copy_s = statistics.median(timed(copy)[0] for _ in range(5))
    path = Path(spec.workdir) / "ckpt.pt"
    torch.save({"model": wl.model.state_dict(), "optimizer": wl.opt.state_dict(), "epoch": 0}, path)

    def load() -> Any:
        return torch.load(path, map_location="cpu", weights_only=True)

    load()  # warm page cache, like a warm restore
    load_s = statistics.median(timed(load)[0] for _ in range(3))
    return {
        "stall_impr_ms": copy_s * 1e3,
        "restore_ms": load_s * 1e3,
        "bare_load_ms": load_s * 1e3,
        "stored_mb": path.stat().st_size / MB,
        "state_mb": sum(t.nbytes for t in tensors) / MB,
    }


def measure_run_start(spec: ChildSpec) -> dict[str, Any]:
    """MLflow's own fixed cost: start_run + end_run on a pre-created experiment."""
    import mlflow

    ctx = open_store(spec, "run-start")

    def start_end() -> None:
        mlflow.start_run(experiment_id=ctx.experiment_id)
        mlflow.end_run()

    return {"wall_s": timed(start_end)[0]}


# --------------------------------------------------------------------------- #
# Parent side                                                                 #
# --------------------------------------------------------------------------- #

BASELINE = "baseline: copy->CPU buf / torch.load"
RUN_START = "mlflow run start"


@dataclass
class ChildSpec:
    kind: str  # "variant" | "baseline" | "run_start"
    variant: str
    size: str
    store: str
    epochs: int
    workdir: str
    result: str
    server_url: str | None = None
    server_artifacts: str | None = None


def child_main(raw: str) -> None:
    spec = ChildSpec(**json.loads(raw))
    os.chdir(spec.workdir)  # stray relative paths (./mlruns, lightning_logs) stay in the tmpdir
    measure = {"variant": measure_variant, "baseline": measure_baseline, "run_start": measure_run_start}
    row = measure[spec.kind](spec)
    Path(spec.result).write_text(json.dumps(row))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    artifacts: Path


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[Server]:
    """Start `mlflow server` (sqlite backend, proxied artifacts) and stop it after."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    artifacts = root / "artifacts"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination", str(artifacts),
        "--serve-artifacts",
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    log_path = root / "server.log"
    with log_path.open("wb") as log:
        # Own session: we can stop the server and its workers as one group.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log_path)
        yield Server(url, artifacts)
    finally:
        stop_group(proc)


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited:\n{log_path.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server not healthy after {SERVER_START_TIMEOUT_S}s")


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_child(spec: ChildSpec) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; never raise, report errors in the row."""
    Path(spec.workdir).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # The checked-out package wins over any installed copy.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    log_path = Path(spec.workdir).parent / f"{Path(spec.workdir).name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(asdict(spec))]
    t0 = time.monotonic()
    try:
        with log_path.open("wb") as log:
            rc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=CHILD_TIMEOUT_S
            ).returncode
        row = json.loads(Path(spec.result).read_text()) if rc == 0 else {"check": f"ERROR rc={rc}"}
    except subprocess.TimeoutExpired:
        row = {"check": f"ERROR timeout {CHILD_TIMEOUT_S}s"}
    if str(row.get("check", "")).startswith("ERROR"):
        tail = log_path.read_text(errors="replace")[-4000:]
        print(f"--- {spec.variant}/{spec.size}/{spec.store} failed; log tail:\n{tail}", file=sys.stderr)
    print(
        f"  {spec.variant:<22} {spec.size:<6} {spec.store:<7} {time.monotonic() - t0:6.1f}s", file=sys.stderr
    )
    shutil.rmtree(spec.workdir, ignore_errors=True)  # checkpoints can be GBs
    return {"variant": spec.variant, "size": spec.size, "store": spec.store, **row}


def plan(args: argparse.Namespace, workdir: Path, servers: Mapping[str, Server]) -> list[ChildSpec]:
    specs: list[ChildSpec] = []

    def add(kind: str, variant: str, size: str, store: str) -> None:
        server = servers.get(store)
        child_dir = workdir / f"{len(specs):02d}-{variant}-{size}-{store}"
        specs.append(
            ChildSpec(
                kind, variant, size, store, args.epochs, str(child_dir), str(child_dir) + ".json",
                server.url if server else None, str(server.artifacts) if server else None,
            )
        )  # fmt: skip

    for size in args.sizes:
        add("baseline", BASELINE, size, "-")
    for store in args.stores:
        add("run_start", RUN_START, "-", store)
    for size in args.sizes:
        for store in args.stores:
            for variant in args.variants:
                # `none` tracks nothing, so one run per size is enough.
                if variant != "none" or store == args.stores[0]:
                    add("variant", variant, size, "-" if variant == "none" else store)
    return specs


COLUMNS = [
    "variant", "size", "store", "stall_impr_ms", "stall_max_ms", "nonimpr_ms", "wall_s", "work_s",
    "peak_extra_mb", "state_mb", "stored_mb", "restore_ms", "restore_cold_ms", "bare_load_ms", "check",
]  # fmt: skip


def results_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    df = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in df:
            df[col] = None
    return df[COLUMNS]


def lookup(df: pd.DataFrame, variant: str, size: str, store: str, col: str) -> float | None:
    hit = df[(df.variant == variant) & (df["size"] == size) & (df.store == store)]
    if hit.empty or hit.iloc[0][col] is None or math.isnan(float(hit.iloc[0][col])):
        return None
    return float(hit.iloc[0][col])


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den == 0 else num / den


def ratio_rows(df: pd.DataFrame, sizes: list[str], stores: list[str]) -> list[dict[str, Any]]:
    """The targets, computed from this run's numbers only."""
    big = "large" if "large" in sizes else sizes[-1]
    mb = "mlflow_best"
    out: list[dict[str, Any]] = []

    def add(name: str, size: str, store: str, value: float | None, op: str, target: float) -> None:
        ok = None if value is None else (value <= target if op == "<=" else value < target)
        verdict = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        out.append(
            {
                "ratio": name,
                "size": size,
                "store": store,
                "value": value,
                "target": f"{op} {target}",
                "result": verdict,
            }
        )

    def get(variant: str, size: str, store: str, col: str) -> float | None:
        return lookup(df, variant, size, store, col)

    for st in stores:
        stall = get(mb, big, st, "stall_impr_ms")
        add(
            "stall improving: mlflow_best / copy into CPU buffers",
            big,
            st,
            ratio(stall, get(BASELINE, big, "-", "stall_impr_ms")),
            "<=",
            1.5,
        )
        add(
            "stall improving: mlflow_best / seed",
            big,
            st,
            ratio(stall, get("seed", big, st, "stall_impr_ms")),
            "<=",
            0.2,
        )
        add(
            "stall improving: mlflow_best / lightning",
            big,
            st,
            ratio(stall, get("lightning", big, st, "stall_impr_ms")),
            "<=",
            0.2,
        )
        for size in sizes:
            add("non-improving overhead median (ms)", size, st, get(mb, size, st, "nonimpr_ms"), "<", 2)
        if "small" in sizes:
            floor = sum_or_none(get("none", "small", "-", "wall_s"), get(RUN_START, "-", st, "wall_s"))
            add(
                "wall small: mlflow_best / (none + run start)",
                "small",
                st,
                ratio(get(mb, "small", st, "wall_s"), floor),
                "<=",
                1.1,
            )
        load = get(mb, big, st, "bare_load_ms") or get(BASELINE, big, "-", "bare_load_ms")
        add("restore warm / bare torch.load", big, st, ratio(get(mb, big, st, "restore_ms"), load), "<=", 1.3)
        add(
            "peak extra host memory / state size",
            big,
            st,
            ratio(get(mb, big, st, "peak_extra_mb"), get(mb, big, st, "state_mb")),
            "<=",
            2,
        )
    return out  # fmt: skip


def sum_or_none(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


def to_markdown(df: pd.DataFrame) -> str:
    """Minimal pipe table (avoids a dependency on `tabulate`)."""

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return (
            f"{v:.3g}"
            if isinstance(v, float) and abs(v) < 10
            else (f"{v:.1f}" if isinstance(v, float) else str(v))
        )

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def header(args: argparse.Namespace) -> str:
    import mlflow
    import torch

    improving = expected_improving(args.epochs)
    return (
        f"mlflow_best benchmark: epochs={args.epochs}, improving epochs={improving}, "
        f"sizes={','.join(args.sizes)}, stores={','.join(args.stores)}, "
        f"torch {torch.__version__}, mlflow {mlflow.__version__}, {os.cpu_count()} CPUs"
    )


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    import pandas as pd

    df = results_frame(rows)
    ratios = pd.DataFrame(ratio_rows(df, args.sizes, args.stores))
    with pd.option_context(
        "display.width", 250, "display.max_columns", 50, "display.float_format", "{:.3f}".format
    ):
        print(header(args))
        print(df.to_string(index=False))
        print()
        print(ratios.to_string(index=False))
    return f"{header(args)}\n\n{to_markdown(df)}\n\n{to_markdown(ratios)}\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"small model, sqlite only, {QUICK_EPOCHS} epochs")
    p.add_argument("--sizes", default=",".join(SIZES), help="comma list of: " + ",".join(SIZES))
    p.add_argument("--stores", default=",".join(ALL_STORES), help="comma list of: " + ",".join(ALL_STORES))
    p.add_argument(
        "--variants", default=",".join(ALL_VARIANTS), help="comma list of: " + ",".join(ALL_VARIANTS)
    )
    p.add_argument("--epochs", type=int, default=None, help=f"default {EPOCHS} ({QUICK_EPOCHS} with --quick)")
    p.add_argument("--out", type=Path, default=None, help="also write the tables as markdown to this file")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.stores = "small", "sqlite"
    args.epochs = args.epochs or (QUICK_EPOCHS if args.quick else EPOCHS)
    for name, allowed in (("sizes", SIZES), ("stores", ALL_STORES), ("variants", ALL_VARIANTS)):
        values = [v.strip() for v in getattr(args, name).split(",") if v.strip()]
        if bad := [v for v in values if v not in allowed]:
            p.error(f"--{name}: unknown {bad}; choose from {','.join(allowed)}")
        setattr(args, name, values)
    if args.epochs < 2 or (args.epochs - 1) in IMPROVING:
        p.error(f"--epochs: the last epoch must not be one of the improving epochs {IMPROVING}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args._child is not None:
        child_main(args._child)
        return
    workdir = Path(tempfile.mkdtemp(prefix="mlflow-best-bench-"))
    try:
        with contextlib.ExitStack() as stack:
            servers: dict[str, Server] = {}
            if "server" in args.stores:
                servers["server"] = stack.enter_context(mlflow_server(workdir / "server"))
            specs = plan(args, workdir, servers)
            print(f"running {len(specs)} measurements in {workdir}", file=sys.stderr)
            rows = [run_child(spec) for spec in specs]
        markdown = report(rows, args)
        if args.out:
            args.out.write_text(markdown)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
