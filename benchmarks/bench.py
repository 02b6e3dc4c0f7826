#!/usr/bin/env python
"""Benchmark: what it costs to keep the best PyTorch checkpoint in MLflow.

The same deterministic training runs under several tracking variants:

  none               no tracking at all (the floor)
  seed               the hand-written pattern: synchronous torch.save + log_artifact
                     + model version + alias on each improvement, log_metrics every epoch
  lightning          PyTorch Lightning ModelCheckpoint + MLFlowLogger(log_model="all")
  mlflow_best        mlflow_best.track(...) (keep=None)
  mlflow_best_keep1  mlflow_best.track(..., keep=1) (for bytes stored)

The validation loss that decides "improvement" is scripted (IMPROVING), so every
variant improves on exactly the same epochs, while the model really trains on
seeded synthetic data so checkpoints hold real, changing weights. Every
measurement runs in a fresh subprocess (--_child) so memory peaks, imports and
caches don't bleed between variants.

--rounds N runs the whole plan N times, each round in an order shuffled by
random.Random(round) (the floors stay first); the table shows the median over
rounds. --before PATH also measures every mlflow_best* variant with the package
imported from another checkout (rows "... (before)"), each next to its own row.

CPU and I/O columns, over the same window as wall_s (per improvement: divided
by the number of improving epochs):

  cpu_s              process CPU (getrusage, all threads), less the RSS sampler's own thread
  work_cpu_s         main-thread CPU (thread_time) in train + validate only
  track_cpu_impr_ms  (cpu_s - work_cpu_s) per improvement: all CPU spent on tracking
  bg_cpu_impr_ms     (cpu_s - main-thread CPU over the window) per improvement
  written_impr_mb    /proc/self/io write_bytes per improvement (server store: plus the
                     server's process group), MB
  wchar_impr_mb      the same with wchar (bytes passed to write(), page cache included)
  over_none_s        wall_s minus the median wall_s of `none` for the same size
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.metadata
import itertools
import json
import math
import os
import random
import resource
import shlex
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

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # pandas is only needed by the parent, for the report
    import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 20
QUICK_EPOCHS = 8
# Epochs on which the scripted val_loss reaches a new minimum. The last epoch is
# never one of them, so no checkpoint stall is mixed with end-of-run work.
IMPROVING = (0, 1, 3, 6, 10, 15)
ALL_VARIANTS = ("none", "seed", "lightning", "mlflow_best", "mlflow_best_keep1")
ALL_STORES = ("sqlite", "server")
CHILD_TIMEOUT_S = 900
SERVER_START_TIMEOUT_S = 180
SAMPLE_INTERVAL_S = 0.005
MB = 1_000_000
TORCH_FILES = (".pt", ".pth", ".ckpt")


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
    "large": SizeSpec((1024, 4096, 4096, 1024, 10), batch=64, train_batches=3, val_batches=1),
}


# --------------------------------------------------------------------------- #
# Child side: workload                                                        #
# --------------------------------------------------------------------------- #

Batch = tuple[torch.Tensor, torch.Tensor]


class BenchMLP(nn.Module):
    """Module-level and JSON-configurable, so mlflow_best.restore can rebuild it."""

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for d_in, d_out in itertools.pairwise(dims):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])  # no ReLU after the logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


@dataclass
class Workload:
    """Model, optimizer and data shared by every variant of one size."""

    dims: tuple[int, ...]
    model: nn.Module
    opt: torch.optim.Optimizer
    train: list[Batch]
    val: list[Batch]
    epochs: int
    val_script: list[float]
    # epoch -> fingerprint of the weights after that epoch (improving epochs only)
    fingerprints: dict[int, list[float]] = field(default_factory=dict)


def scripted_val_loss(epochs: int) -> list[float]:
    """Val loss that reaches a new minimum exactly on IMPROVING, worse otherwise."""
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
    """Inputs from `seed`, labels from a fixed random linear teacher: a learnable task."""
    teacher = torch.randn(size.dims[0], size.dims[-1], generator=torch.Generator().manual_seed(7))
    x = torch.randn(n_batches * size.batch, size.dims[0], generator=torch.Generator().manual_seed(seed))
    y = (x @ teacher).argmax(dim=1)
    return list(zip(torch.split(x, size.batch), torch.split(y, size.batch), strict=True))


def make_workload(size_name: str, epochs: int) -> Workload:
    size = SIZES[size_name]
    torch.manual_seed(0)
    model = BenchMLP(size.dims)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    prime_optimizer(model, opt)
    return Workload(
        dims=size.dims,
        model=model,
        opt=opt,
        train=make_batches(size, size.train_batches, seed=1),
        val=make_batches(size, size.val_batches, seed=2),
        epochs=epochs,
        val_script=scripted_val_loss(epochs),
    )


def prime_optimizer(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Allocate grads and Adam state before the run.

    Otherwise the first step allocates 3x the model size inside the measured
    window, and "peak extra memory" would measure training, not tracking.
    A zero gradient leaves the weights unchanged (Adam's update is 0/eps).
    """
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()


def state_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = list(model.state_dict().values())
    for per_param in opt.state_dict()["state"].values():
        tensors.extend(v for v in per_param.values() if isinstance(v, torch.Tensor))
    return tensors


def fingerprint(state: Mapping[str, torch.Tensor]) -> list[float]:
    """Cheap, order-independent summary of a model state (one sum per tensor)."""
    return [float(state[k].double().sum()) for k in sorted(state)]


def train_epoch(wl: Workload) -> float:
    wl.model.train()
    total = 0.0
    for x, y in wl.train:
        # set_to_none=False keeps grads allocated (see prime_optimizer).
        wl.opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(wl.model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        wl.opt.step()
        total += loss.item()
    return total / len(wl.train)


def validate(wl: Workload) -> float:
    """A real validation pass; the scripted value is what gets reported."""
    wl.model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(wl.model(x), y).item() for x, y in wl.val]
    return sum(losses) / len(losses)


class EpochClock:
    """Measures the gap between the end of an epoch's work and the next epoch.

    ``work_end()`` is called right after validation; ``epoch_start()`` at the
    top of the next epoch (and once after the loop for the last epoch). That
    gap is exactly the time the training loop spends in tracking code. The
    work itself (train + validate) is timed too, to explain wall-time gaps,
    both in wall time and in the calling (main) thread's CPU time.
    """

    def __init__(self) -> None:
        self.stalls: list[float] = []
        self.work: list[float] = []
        self.work_cpu: list[float] = []  # time.thread_time() of the work windows
        self._work_start_cpu = 0.0
        self.first_start: float | None = None  # setup ends here
        self.last_start = 0.0  # the final call (after the loop): finishing starts here
        self._work_end: float | None = None
        self._work_start: float | None = None

    def epoch_start(self) -> None:
        now = time.perf_counter()
        if self.first_start is None:
            self.first_start = now
        self.last_start = now
        if self._work_end is not None:
            self.stalls.append(now - self._work_end)
            self._work_end = None
        self._work_start = now
        self._work_start_cpu = time.thread_time()

    def work_end(self) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        if self._work_start is not None:
            self.work.append(now - self._work_start)
            self.work_cpu.append(cpu - self._work_start_cpu)
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
    artifact_dir: Path  # this experiment's artifacts on disk (also for the server store)
    registered_model: str
    scratch: Path  # local files a variant writes before/besides MLflow


Restore = Callable[[], tuple[int, dict[str, torch.Tensor]]]


@dataclass
class VariantOut:
    clock: EpochClock
    improved: list[int] | None  # epochs the variant itself reported as improving
    restore: Restore | None
    local_dir: Path | None = None  # local copies the variant keeps after the run


def open_store(spec: ChildSpec, tag: str) -> StoreCtx:
    """Point MLflow at the store and pre-create a fresh experiment.

    Pre-creating lets us put sqlite artifacts under the tmpdir (MLflow's own
    default is ./mlruns, the same plain-path form) and keeps experiment
    creation and the schema migration of a fresh sqlite file out of every
    variant's wall time.
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
        if not (spec.server_url and spec.server_artifacts):
            raise ValueError("the server store needs server_url and server_artifacts")
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
    return VariantOut(clock, improved, lambda: restore_seed(ctx), ctx.scratch)


def restore_seed(ctx: StoreCtx) -> tuple[int, dict[str, torch.Tensor]]:
    """Resolve the "best" alias, download that checkpoint, torch.load it."""
    import mlflow
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
    ckpt_dir = ctx.scratch / "lightning"
    ckpt_cb = ModelCheckpoint(dirpath=ckpt_dir, monitor="val_loss", mode="min", save_top_k=1)
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
    # batch_size=None: the lists are already batched, so nothing is collated.
    train_dl: DataLoader[Batch] = DataLoader(wl.train, batch_size=None)  # type: ignore[arg-type]
    val_dl: DataLoader[Batch] = DataLoader(wl.val, batch_size=None)  # type: ignore[arg-type]
    trainer.fit(_lightning_module(wl, clock), train_dl, val_dl)
    run_id = logger.run_id
    return VariantOut(clock, clock_cb.improved, lambda: restore_lightning(ctx, run_id, ckpt_cb), ckpt_dir)


def _lightning_module(wl: Workload, clock: EpochClock) -> Any:
    """The same model, optimizer and steps as the plain loop, as a LightningModule."""
    import lightning as L

    class BenchModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = wl.model

        def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
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

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return wl.opt  # the pre-built, primed optimizer: same state as the other variants

        def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
            optimizer.zero_grad(set_to_none=False)

    return BenchModule()


def _lightning_clock_callback(clock: EpochClock, ckpt_cb: Any) -> Any:
    from lightning.pytorch.callbacks import Callback

    class ClockCallback(Callback):
        """Closes the stall window; records the epochs on which ModelCheckpoint saved."""

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
    """Download the best checkpoint that MLFlowLogger logged and torch.load it."""
    import mlflow

    stem = Path(ckpt_cb.best_model_path).stem  # MLFlowLogger's artifact_path for it
    with tempfile.TemporaryDirectory(dir=ctx.scratch) as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=stem, dst_path=tmp)
        ckpt = torch.load(Path(local) / f"{stem}.ckpt", map_location="cpu", weights_only=True)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    return int(ckpt["epoch"]), state


def run_mlflow_best(wl: Workload, ctx: StoreCtx | None, keep: int | None = None) -> VariantOut:
    import mlflow_best  # lazy: the benchmark must run before the package exists

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
        model_args={"dims": list(wl.dims)},  # lets restore(run_id) rebuild BenchMLP
        **extra,
    ) as run:
        for epoch in range(run.start_epoch, wl.epochs):
            train_loss, val_loss = fit_epoch(wl, epoch, clock)
            if run.log_epoch(epoch, {"train_loss": train_loss, "val_loss": val_loss}):
                improved.append(epoch)
        clock.epoch_start()
    run_id = str(run.run_id)
    local = Path(os.environ["MLFLOW_BEST_HOME"]) / "runs"
    return VariantOut(clock, improved, lambda: restore_mlflow_best(run_id), local)


def restore_mlflow_best(run_id: str) -> tuple[int, dict[str, torch.Tensor]]:
    import mlflow_best

    restored = mlflow_best.restore(run_id, device="cpu")
    return int(restored.epoch), restored.model.state_dict()


PREIMPORTS: dict[str, tuple[str, ...]] = {
    "seed": ("mlflow",),
    "lightning": ("lightning", "lightning.pytorch.callbacks", "lightning.pytorch.loggers"),
    # `import mlflow_best` is lazy (issue 12): what track() itself imports (the tracker, MLflow's model
    # modules for the MLmodel files) is a once-per-process cost too, paid by the first run only.
    "mlflow_best": ("mlflow_best", "mlflow_best._tracker", "mlflow_best._pyfunc", "mlflow.pyfunc"),
    "mlflow_best_keep1": ("mlflow_best", "mlflow_best._tracker", "mlflow_best._pyfunc", "mlflow.pyfunc"),
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
    """RSS of this process plus its children (a library may work in a subprocess)."""
    try:
        import psutil
    except ImportError:  # fall back to /proc: this process only
        page = os.sysconf("SC_PAGE_SIZE")
        return lambda: int(Path("/proc/self/statm").read_text().split()[1]) * page
    proc = psutil.Process()
    children: list[Any] = []
    calls = 0

    def read() -> int:
        nonlocal children, calls
        if calls % 20 == 0:  # scanning /proc for children every 5 ms would cost CPU
            children = proc.children(recursive=True)
        calls += 1
        total = int(proc.memory_info().rss)
        for child in children:
            with contextlib.suppress(psutil.Error):
                total += int(child.memory_info().rss)
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
        self.cpu_s = 0.0  # this sampler thread's own CPU so far: not the variant's

    def _loop(self) -> None:
        cpu0 = time.thread_time()
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self.peak = max(self.peak, self._read())
            self.cpu_s = time.thread_time() - cpu0

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


def process_cpu_s() -> float:
    """User + system CPU of this process, all its threads (and reaped children)."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


IO_FIELDS = ("write_bytes", "wchar")


def read_io(pid: int | str = "self") -> dict[str, int] | None:
    """The write counters of /proc/<pid>/io; None when they cannot be read."""
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return None
    values = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    return {k: int(values[k]) for k in IO_FIELDS if k in values} or None


def read_group_io(pgid: int) -> dict[str, int] | None:
    """The write counters summed over a process group (the server and its workers).

    /proc/<pid>/io of the server's main process does not include its live
    worker processes, which do the writing; the server runs in its own
    session, so its group id is its pid. None when the leader's cannot be read.
    """
    total = read_io(pgid)
    if total is None:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == pgid:
            continue
        try:  # field 5 of stat is the group; the name (field 2) may hold spaces
            pgrp = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2])
        except (OSError, IndexError, ValueError):
            continue
        if pgrp == pgid and (io := read_io(entry.name)) is not None:
            for k in IO_FIELDS:
                total[k] = total.get(k, 0) + io.get(k, 0)
    return total


@dataclass
class IoMark:
    """Write counters of this process and, for the server store, of the server."""

    own: dict[str, int] | None
    server: dict[str, int] | None

    @classmethod
    def take(cls, server_pid: int | None) -> IoMark:
        os.sync()  # attribute delayed writeback to the window it belongs to
        return cls(read_io(), read_group_io(server_pid) if server_pid else None)


def written_mb(start: IoMark, end: IoMark, key: str, with_server: bool) -> float | None:
    """MB (1e6) counted in `key` between two marks; None when a needed counter was unreadable."""
    if start.own is None or end.own is None:
        return None
    total = end.own[key] - start.own[key]
    if with_server:
        if start.server is None or end.server is None:
            return None
        total += end.server[key] - start.server[key]
    return total / MB


def dir_bytes(root: Path | None) -> int:
    if root is None or not root.exists():
        return 0
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def median_ms(values: Sequence[float]) -> float | None:
    return statistics.median(values) * 1e3 if values else None


def bare_load_ms(artifact_dir: Path) -> float | None:
    """Warm torch.load(weights_only=True) of one stored checkpoint, in its own format.

    The checkpoint is the folder holding the largest stored file; all its
    torch files are loaded (mlflow_best splits model and training state).
    That is the floor a restore of this variant is compared with. None when
    nothing there loads with torch.load.
    """
    files = [p for p in artifact_dir.rglob("*") if p.is_file()] if artifact_dir.exists() else []
    if not files:
        return None
    folder = max(files, key=lambda p: p.stat().st_size).parent
    ckpt = [p for p in folder.iterdir() if p.suffix in TORCH_FILES]

    def load() -> None:
        for path in ckpt:
            torch.load(path, map_location="cpu", weights_only=True)

    try:
        load()  # warm the page cache, as for the warm restore
    except Exception:  # any failure just means "not a plain torch file"
        return None
    return statistics.median(timed(load)[0] for _ in range(3)) * 1e3  # one load is noisy


def check_restore(wl: Workload, out: VariantOut, restored: tuple[int, dict[str, Any]]) -> str:
    """Did the variant report the right epochs and restore the best epoch's weights?"""
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


def check_package_root(spec: ChildSpec) -> str | None:
    """An error when the imported mlflow_best is not the one of spec.package_root."""
    import mlflow_best

    where = Path(mlflow_best.__file__ or "").resolve()
    root = Path(spec.package_root).resolve()
    print(f"mlflow_best imported from {where} (intended root {root})", flush=True)
    return None if where.is_relative_to(root) else f"ERROR mlflow_best from {where}, not under {root}"


def _run_tag(spec: ChildSpec) -> str:
    """``r0-07``: this child's round and place in it, so that names on a shared server never collide."""
    return "-".join(Path(spec.workdir).name.split("-")[:2])


def measure_variant(spec: ChildSpec) -> dict[str, Any]:
    # Imports are a once-per-process cost, not a per-run one: keep them out of wall time.
    for module in PREIMPORTS.get(spec.variant, ()):
        importlib.import_module(module)
    if spec.variant.startswith("mlflow_best") and (error := check_package_root(spec)):
        return {"check": error}
    wl = make_workload(spec.size, spec.epochs)
    ctx = None if spec.variant == "none" else open_store(spec, f"{spec.variant}-{spec.size}-{_run_tag(spec)}")
    state_bytes = sum(t.nbytes for t in state_tensors(wl.model, wl.opt))
    server_pid = spec.server_pid if spec.store == "server" else None
    with RssSampler() as mem:
        io0 = IoMark.take(server_pid)
        cpu0, main0 = process_cpu_s(), time.thread_time()
        sampler0 = mem.cpu_s
        t0 = time.perf_counter()
        out = VARIANTS[spec.variant](wl, ctx)
        t1 = time.perf_counter()
        # Right after the variant returns, before restore and the other measurements.
        main_cpu, cpu = time.thread_time() - main0, process_cpu_s() - cpu0
        cpu -= mem.cpu_s - sampler0  # the RSS sampler's own thread is the benchmark's, not the variant's
        io1 = IoMark.take(server_pid)
    wall = t1 - t0
    n_impr = len(expected_improving(wl.epochs))
    work_cpu = sum(out.clock.work_cpu)
    print(
        f"window: cpu {cpu:.3f}s (sampler {mem.cpu_s - sampler0:.3f}s excluded), "
        f"main thread {main_cpu:.3f}s, work {work_cpu:.3f}s; io own {io0.own} -> {io1.own}",
        flush=True,
    )
    if server_pid is not None:
        if io0.server is None or io1.server is None:
            print(f"server pid {server_pid}: /proc/{server_pid}/io unreadable; written/wchar left empty")
        else:
            print(f"io server group {server_pid}: {io0.server} -> {io1.server}", flush=True)
    row: dict[str, Any] = {
        **stall_stats(out.clock.stalls, wl.epochs),
        "wall_s": wall,
        "work_s": sum(out.clock.work),
        # Tracking's share of the wall time, immune to how fast training happened to run.
        "overhead_s": wall - sum(out.clock.work),
        # Where the rest of that overhead goes: before the first epoch, after the last one.
        "setup_s": (out.clock.first_start or t0) - t0,
        "finish_s": t1 - out.clock.last_start,
        "cpu_s": cpu,
        "work_cpu_s": work_cpu,
        "track_cpu_impr_ms": (cpu - work_cpu) / n_impr * 1e3,
        "bg_cpu_impr_ms": (cpu - main_cpu) / n_impr * 1e3,
        "written_impr_mb": _per(written_mb(io0, io1, "write_bytes", server_pid is not None), n_impr),
        "wchar_impr_mb": _per(written_mb(io0, io1, "wchar", server_pid is not None), n_impr),
        "peak_extra_mb": mem.extra_bytes / MB,
        "state_mb": state_bytes / MB,
    }
    if ctx is not None and out.restore is not None:
        row.update(storage_and_restore(wl, ctx, out, out.restore))
        if spec.variant.startswith("mlflow_best"):
            row.update(pyfunc_vs_bare(wl, ctx))
        if spec.store == "server":  # the server outlives this child: free its disk now
            shutil.rmtree(ctx.artifact_dir, ignore_errors=True)
    return row


def _per(total: float | None, n: int) -> float | None:
    return None if total is None else total / n


def storage_and_restore(wl: Workload, ctx: StoreCtx, out: VariantOut, restore: Restore) -> dict[str, Any]:
    """Bytes kept, then two restores of the best checkpoint (cold, warm) and their check."""
    row: dict[str, Any] = {
        "stored_mb": dir_bytes(ctx.artifact_dir) / MB,
        "local_mb": dir_bytes(out.local_dir) / MB,
        "restore_cold_ms": timed(restore)[0] * 1e3,
    }
    warm, restored = timed(restore)
    row["restore_ms"] = warm * 1e3
    row["bare_load_ms"] = bare_load_ms(ctx.artifact_dir)
    row["check"] = check_restore(wl, out, restored)
    return row


def pyfunc_vs_bare(wl: Workload, ctx: StoreCtx) -> dict[str, Any]:
    """Serving's start: ``mlflow.pyfunc.load_model`` of the best version to its first ``predict``,
    against a bare ``torch.load`` + ``load_state_dict`` + forward of the same stored ``model.pt``.

    Both warm (imports done, files in the page cache), median of 3; pyfunc's time includes MLflow
    resolving the alias and copying the model folder out of the artifact store, as serving does.
    """
    import mlflow
    import numpy as np

    x = wl.val[0][0].numpy()
    uri = f"models:/{ctx.registered_model}@best"

    def pyfunc() -> np.ndarray:
        out: np.ndarray = mlflow.pyfunc.load_model(uri).predict(x)
        return out

    stored = [p for p in ctx.artifact_dir.rglob("model.pt") if p.is_file()]
    if not stored:
        return {}
    weights = stored[0]

    def bare() -> torch.Tensor:
        net = BenchMLP(wl.dims)
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        with torch.no_grad():
            out: torch.Tensor = net.eval()(torch.from_numpy(x))
        return out

    pyfunc()
    bare()
    return {
        "pyfunc_predict_ms": statistics.median(timed(pyfunc)[0] for _ in range(3)) * 1e3,
        "bare_predict_ms": statistics.median(timed(bare)[0] for _ in range(3)) * 1e3,
    }


def measure_baseline(spec: ChildSpec) -> dict[str, Any]:
    """Floors: copying the state into preallocated CPU buffers; a bare torch.load."""
    wl = make_workload(spec.size, 1)
    tensors = state_tensors(wl.model, wl.opt)
    buffers = [torch.empty_like(t, device="cpu") for t in tensors]

    def copy() -> None:
        for buf, t in zip(buffers, tensors, strict=True):
            buf.copy_(t)

    copy()  # the first touch of fresh buffers pays page faults; a library reuses its buffers
    copy_s = statistics.median(timed(copy)[0] for _ in range(5))
    path = Path(spec.workdir) / "ckpt.pt"
    torch.save({"model": wl.model.state_dict(), "optimizer": wl.opt.state_dict(), "epoch": 0}, path)

    def load() -> Any:
        return torch.load(path, map_location="cpu", weights_only=True)

    load()  # warm page cache, as for a warm restore
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

    ctx = open_store(spec, f"run-start-{_run_tag(spec)}")

    def start_end() -> None:
        mlflow.start_run(experiment_id=ctx.experiment_id)
        mlflow.end_run()

    return {"wall_s": timed(start_end)[0]}


# --------------------------------------------------------------------------- #
# Parent side: processes                                                      #
# --------------------------------------------------------------------------- #

BASELINE = "baseline: copy->CPU buffers / torch.load"
RUN_START = "mlflow start_run+end_run"
BEFORE = " (before)"  # label suffix of the rows measured with --before's checkout


@dataclass
class ChildSpec:
    kind: str  # "variant" | "baseline" | "run_start"
    variant: str
    size: str
    store: str
    epochs: int
    workdir: str
    result: str
    torch_threads: int = 1
    server_url: str | None = None
    server_artifacts: str | None = None
    server_pid: int | None = None  # the server's process group, for its write counters
    package_root: str = str(REPO_ROOT)  # the checkout whose mlflow_best the child imports
    label_suffix: str = ""  # " (before)" for the rows of --before's checkout

    @property
    def label(self) -> str:
        return self.variant + self.label_suffix


def child_main(raw: str) -> None:
    spec = ChildSpec(**json.loads(raw))
    torch.set_num_threads(spec.torch_threads)
    os.chdir(spec.workdir)  # stray relative paths (./mlruns, lightning_logs) stay in the tmpdir
    # mlflow_best stages checkpoints and caches downloads here: fresh and cold per variant.
    os.environ["MLFLOW_BEST_HOME"] = str(Path(spec.workdir) / "mlflow_best_home")
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
    pid: int  # also its process group: it runs in its own session


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[Server]:
    """Start `mlflow server` (sqlite backend, proxied artifacts) on 127.0.0.1; stop it after."""
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
        # Own session, so the server and its workers stop together as one process group.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log_path)
        yield Server(url, artifacts, proc.pid)
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
    """SIGTERM the server's process group, then SIGKILL whatever is left of it.

    `mlflow server` starts worker and job-consumer processes in its group; one
    of them must not outlive the benchmark even if the main process exits first.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_child(spec: ChildSpec, logs: Path | None = None) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; never raise, report errors in the row."""
    workdir = Path(spec.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # The checked-out package is measured, even when another copy is installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [spec.package_root, env.get("PYTHONPATH")]))
    log_path = workdir.with_suffix(".log")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(asdict(spec))]
    t0 = time.monotonic()
    try:
        with log_path.open("wb") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=CHILD_TIMEOUT_S)
        rc = proc.returncode
        row = json.loads(Path(spec.result).read_text()) if rc == 0 else {"check": f"ERROR rc={rc}"}
    except subprocess.TimeoutExpired:
        row = {"check": f"ERROR timeout {CHILD_TIMEOUT_S}s"}
    if str(row.get("check", "")).startswith("ERROR"):
        tail = log_path.read_text(errors="replace")[-4000:]
        print(f"--- {spec.label}/{spec.size}/{spec.store} failed; log tail:\n{tail}", file=sys.stderr)
    took = time.monotonic() - t0
    print(f"  {spec.label:<40} {spec.size:<6} {spec.store:<7} {took:6.1f}s", file=sys.stderr)
    shutil.rmtree(workdir, ignore_errors=True)  # checkpoints can be GBs
    if logs is not None and log_path.exists():  # the tmpdir goes at the end; keep a copy
        logs.mkdir(parents=True, exist_ok=True)
        shutil.copy(log_path, logs / log_path.name)
    return {"variant": spec.label, "size": spec.size, "store": spec.store, **row}


def plan(
    args: argparse.Namespace, workdir: Path, servers: Mapping[str, Server], round_no: int = 0
) -> list[ChildSpec]:
    """One round: the floors first, then the variants in an order shuffled by `round_no`.

    With --before, each mlflow_best* child is paired with the same child importing
    the package from the other checkout; a pair stays adjacent (in a shuffled
    order too), so both run under the same machine load.
    """
    fixed: list[ChildSpec] = []
    groups: list[list[ChildSpec]] = []
    count = itertools.count()

    def spec(
        kind: str, variant: str, size: str, store: str, root: Path = REPO_ROOT, suffix: str = ""
    ) -> ChildSpec:
        server = servers.get(store)
        label = variant if kind == "variant" else kind  # the labels of the others hold spaces
        tag = "-before" if suffix else ""
        child = workdir / f"r{round_no}-{next(count):02d}-{label}{tag}-{size}-{store}"
        return ChildSpec(
            kind, variant, size, store, args.epochs, str(child), str(child) + ".json", args.torch_threads,
            server.url if server else None, str(server.artifacts) if server else None,
            server.pid if server else None, str(root), suffix,
        )  # fmt: skip

    def add(variant: str, size: str, store: str) -> None:
        group = [spec("variant", variant, size, store)]
        if args.before is not None and variant.startswith("mlflow_best"):
            group.append(spec("variant", variant, size, store, args.before, BEFORE))
        groups.append(group)

    for size in args.sizes:
        fixed.append(spec("baseline", BASELINE, size, "-"))
    for store in args.stores:
        fixed.append(spec("run_start", RUN_START, "-", store))
    for size in args.sizes:
        if "none" in args.variants:  # tracks nothing, so one run per size
            add("none", size, "-")
        for store in args.stores:
            for variant in args.variants:
                if variant != "none":
                    add(variant, size, store)
    rng = random.Random(round_no)
    rng.shuffle(groups)
    for group in groups:
        rng.shuffle(group)  # which of a before/after pair goes first
    return fixed + [s for group in groups for s in group]


# --------------------------------------------------------------------------- #
# Parent side: report                                                         #
# --------------------------------------------------------------------------- #

COLUMNS = [
    "variant", "size", "store", "stall_impr_ms", "stall_max_ms", "nonimpr_ms",
    "wall_s", "work_s", "overhead_s", "setup_s", "finish_s",
    "over_none_s", "cpu_s", "work_cpu_s", "track_cpu_impr_ms", "bg_cpu_impr_ms",
    "written_impr_mb", "wchar_impr_mb",
    "peak_extra_mb", "state_mb", "stored_mb", "local_mb",
    "restore_ms", "restore_cold_ms", "bare_load_ms", "pyfunc_predict_ms", "bare_predict_ms",
    "check", "rounds",
]  # fmt: skip
KEYS = ["variant", "size", "store"]


def add_over_none(rows: list[dict[str, Any]]) -> None:
    """over_none_s: a row's wall_s minus the median wall_s of `none` (all rounds) for its size."""
    none_walls: dict[str, list[float]] = {}
    for row in rows:
        if row["variant"] == "none" and isinstance(row.get("wall_s"), float):
            none_walls.setdefault(row["size"], []).append(row["wall_s"])
    for row in rows:
        walls = none_walls.get(row["size"])
        floor = row["variant"] in (BASELINE, RUN_START)
        if walls and not floor and isinstance(row.get("wall_s"), float):
            row["over_none_s"] = row["wall_s"] - statistics.median(walls)


def _first_problem(checks: pd.Series) -> Any:
    """`ok` only when every round said ok; else the first round's other word."""
    said = [c for c in checks if isinstance(c, str)]
    if not said:
        return None
    return next((c for c in said if c != "ok"), "ok") if len(said) == len(checks) else "ERROR no check"


def results_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (variant, size, store): the median over rounds of each number."""
    import pandas as pd

    df = pd.DataFrame(rows)
    for col in [*COLUMNS, "round"]:
        if col not in df:
            df[col] = None
    numeric = [c for c in COLUMNS if c not in (*KEYS, "check", "rounds")]
    df[numeric] = df[numeric].apply(pd.to_numeric, errors="coerce")
    grouped = df.groupby(KEYS, sort=False, dropna=False)
    out = grouped[numeric].median()
    has_check = df["check"].notna().any()
    out["check"] = grouped["check"].agg(_first_problem) if has_check else None
    out["rounds"] = grouped["round"].nunique()
    out = out.reset_index()
    # A fixed order, whatever order the rounds ran in: floors, then by size, store, variant.
    return out.iloc[sorted(range(len(out)), key=lambda i: _row_order(out.iloc[i]))][COLUMNS]


def _row_order(row: pd.Series) -> tuple[int, int, int, int, str]:
    def index(values: Sequence[str], value: str) -> int:
        return values.index(value) if value in values else -1

    variant = str(row["variant"]).removesuffix(BEFORE)
    floor = index((BASELINE, RUN_START), variant)
    return (
        floor if floor >= 0 else 2,
        index(tuple(SIZES), str(row["size"])),
        index(ALL_STORES, str(row["store"])),
        index(ALL_VARIANTS, variant),
        str(row["variant"]),  # "x" before "x (before)"
    )


class Lookup:
    """Reads one number of the results table; None when missing."""

    def __init__(self, df: pd.DataFrame) -> None:
        self.df = df

    def __call__(self, variant: str, size: str, store: str, col: str) -> float | None:
        df = self.df
        hit = df[(df["variant"] == variant) & (df["size"] == size) & (df["store"] == store)]
        if hit.empty:
            return None
        value = hit.iloc[0][col]
        return None if value is None or isinstance(value, str) or math.isnan(value) else float(value)


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den == 0 else num / den


def add_or_none(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


TargetFn = Callable[[Lookup, str, str], float | None]
MBV = "mlflow_best"


def _stall_over(variant: str, fixed_store: str | None = None) -> TargetFn:
    """mlflow_best's median improving-epoch stall over another row's, same size."""

    def fn(get: Lookup, size: str, store: str) -> float | None:
        other = get(variant, size, fixed_store or store, "stall_impr_ms")
        return ratio(get(MBV, size, store, "stall_impr_ms"), other)

    return fn


def _own(num_col: str, den_col: str | None = None) -> TargetFn:
    """A column of the mlflow_best row, or the ratio of two of its columns."""

    def fn(get: Lookup, size: str, store: str) -> float | None:
        num = get(MBV, size, store, num_col)
        return num if den_col is None else ratio(num, get(MBV, size, store, den_col))

    return fn


def _wall_over_floor(get: Lookup, size: str, store: str) -> float | None:
    """Whole run against untracked training plus MLflow's own start_run+end_run."""
    floor = add_or_none(get("none", size, "-", "wall_s"), get(RUN_START, "-", store, "wall_s"))
    return ratio(get(MBV, size, store, "wall_s"), floor)


def _wall_same_training(get: Lookup, size: str, store: str) -> float | None:
    """The wall ratio with `none`'s training time for both: only tracking's own time counts.

    On a shared machine, training speed varies between runs by more than the
    10% margin; this view removes that noise (and with it the slowdown that
    background threads cause to training, which the plain ratio includes).
    """
    none_wall = get("none", size, "-", "wall_s")
    tracked = add_or_none(none_wall, get(MBV, size, store, "overhead_s"))
    return ratio(tracked, add_or_none(none_wall, get(RUN_START, "-", store, "wall_s")))


def _memory_above_training(get: Lookup, size: str, store: str) -> float | None:
    """Peak extra memory beyond what untracked training itself peaks at, per state size."""
    extra = get(MBV, size, store, "peak_extra_mb")
    training = get("none", size, "-", "peak_extra_mb")
    return ratio(
        None if extra is None or training is None else extra - training, get(MBV, size, store, "state_mb")
    )


def _col_over(col: str, other: str, num: str = MBV, other_col: str | None = None) -> TargetFn:
    """A column of the `num` row over a column (the same by default) of another row, same size and store.

    None (n/a) when the denominator is not positive: an over_none_s at or below
    zero means noise swamped the overhead, and a ratio over it says nothing.
    """

    def fn(get: Lookup, size: str, store: str) -> float | None:
        den = get(other, size, store, other_col or col)
        return ratio(get(num, size, store, col), den) if den is not None and den > 0 else None

    return fn


def _both_below(col: str, other: str, limit: float) -> Callable[[Lookup, str, str], bool]:
    """A pass condition: mlflow_best's and the other row's `col` are both under `limit`."""

    def fn(get: Lookup, size: str, store: str) -> bool:
        values = (get(MBV, size, store, col), get(other, size, store, col))
        return all(v is not None and v < limit for v in values)

    return fn


@dataclass(frozen=True)
class Target:
    """One ratio row. op "" marks a ratio shown for information only. Targets about
    "large" (~100 MB) are still computed when only the small model ran, but then
    shown as info; so is a target on a store outside `stores` (None: every store)."""

    name: str
    which: str  # the size it is about, or "each"
    fn: TargetFn
    op: str
    limit: float
    stores: tuple[str, ...] | None = None
    also_pass: Callable[[Lookup, str, str], bool] | None = None  # PASS when true, whatever the value
    needs_before: bool = False  # only with --before


MBB = MBV + BEFORE
T = Target
TARGETS: list[Target] = [
    T("stall improving: mlflow_best / copy into CPU buffers", "large", _stall_over(BASELINE, "-"), "<=", 1.5),
    T("stall improving: mlflow_best / seed", "large", _stall_over("seed"), "<=", 0.2),
    T("stall improving: mlflow_best / lightning", "large", _stall_over("lightning"), "<=", 0.2),
    T("non-improving overhead median, ms", "each", _own("nonimpr_ms"), "<", 2.0),
    T("wall: mlflow_best / (none + mlflow run start)", "small", _wall_over_floor, "<=", 1.1),
    T("wall, as above with none's training time for both", "small", _wall_same_training, "", 1.1),
    T("restore warm / bare torch.load of its files", "large", _own("restore_ms", "bare_load_ms"), "<=", 1.3),
    # No target in the issue: how much MLflow's pyfunc path (resolve, copy out, verify, rebuild) adds.
    T("pyfunc load -> first predict / bare load + forward", "each",
      _own("pyfunc_predict_ms", "bare_predict_ms"), "", 3.0),
    T("peak extra host memory / state size", "large", _own("peak_extra_mb", "state_mb"), "<=", 2.0),
    T("peak extra above none's training peak / state size", "large", _memory_above_training, "", 2.0),
    # Issue 15: a tracked run finishes sooner than the hand-written pattern.
    T("overhead over none: mlflow_best / seed", "each", _col_over("over_none_s", "seed"), "<=", 0.5),
    T("overhead over none: mlflow_best / lightning", "each",
      _col_over("over_none_s", "lightning"), "<=", 0.5),
    T("(info) overhead_s: mlflow_best / seed", "each", _col_over("overhead_s", "seed"), "", 0.5),
    T("(info) overhead_s: mlflow_best / lightning", "each", _col_over("overhead_s", "lightning"), "", 0.5),
    T("background CPU per improvement: mlflow_best bg_cpu_impr_ms / seed track_cpu_impr_ms", "each",
      _col_over("bg_cpu_impr_ms", "seed", other_col="track_cpu_impr_ms"), "<=", 1.0),
    T("bytes written per improvement / state size (local store)", "each",
      _own("written_impr_mb", "state_mb"), "<=", 1.2, stores=("sqlite",)),
    T("stall improving: mlflow_best / mlflow_best (before)", "each", _stall_over(MBB), "<=", 1.1,
      needs_before=True),
    T("non-improving overhead: mlflow_best / before (PASS also when both < 2 ms)", "each",
      _col_over("nonimpr_ms", MBB), "<=", 1.1, also_pass=_both_below("nonimpr_ms", MBB, 2.0),
      needs_before=True),
    T("(info) whole run over none: mlflow_best / before", "each", _col_over("over_none_s", MBB), "", 1.0,
      needs_before=True),
]  # fmt: skip


def ratio_rows(
    df: pd.DataFrame, sizes: list[str], stores: list[str], before: bool = False
) -> list[dict[str, Any]]:
    """The targets, computed from this run's numbers only."""
    get = Lookup(df)
    rows = []
    for store in stores:
        for t in TARGETS:
            if t.needs_before and not before:
                continue
            for size in _target_sizes(t.which, sizes):
                value = t.fn(get, size, store)
                informative = (
                    t.op == ""
                    or t.which not in ("each", size)
                    or (t.stores is not None and store not in t.stores)
                )
                forced = t.also_pass is not None and t.also_pass(get, size, store)
                rows.append(
                    {
                        "ratio": t.name,
                        "size": size,
                        "store": store,
                        "value": value,
                        "target": f"{t.op or '(info)'} {t.limit:g}",
                        "result": _verdict(value, t.op, t.limit, informative, forced),
                    }
                )
    return rows


def _target_sizes(which: str, sizes: list[str]) -> list[str]:
    if which == "each":
        return sizes
    if which in sizes:
        return [which]
    return [sizes[-1]]  # shown for information with the size that was run


def _verdict(value: float | None, op: str, limit: float, informative: bool, forced: bool = False) -> str:
    if value is None and not forced:
        return "n/a"
    ok = forced or (value is not None and (value <= limit if op in ("<=", "") else value < limit))
    if informative:
        return f"info ({'within' if ok else 'over'})"
    return "PASS" if ok else "FAIL"


def to_markdown(df: pd.DataFrame) -> str:
    """A plain pipe table (no dependency on `tabulate`)."""

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def header(args: argparse.Namespace) -> str:
    versions = ", ".join(f"{pkg} {_version(pkg)}" for pkg in ("torch", "mlflow", "lightning", "mlflow-best"))
    return (
        f"mlflow_best benchmark: {args.epochs} epochs, improving epochs {expected_improving(args.epochs)}, "
        f"sizes {','.join(args.sizes)}, stores {','.join(args.stores)}, rounds {args.rounds} (median shown)"
        f"{f', before = {args.before}' if args.before else ''}; {versions}; "
        f"{os.cpu_count()} CPUs, torch threads {args.torch_threads}; "
        f"load average at start {args.load_at_start}, at end {_load()}"
    )


def _load() -> str:
    """Other work on the machine skews every number: the report says how busy it was."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)" if pkg != "mlflow-best" else "(source checkout)"


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Print the results and ratio tables; return them as markdown."""
    import pandas as pd

    add_over_none(rows)
    df = results_frame(rows)
    ratios = pd.DataFrame(ratio_rows(df, args.sizes, args.stores, before=args.before is not None))
    command = f"command: {shlex.join(sys.orig_argv)}"
    options = ("display.width", 400, "display.max_columns", 60, "display.max_colwidth", 90)
    with pd.option_context(*options, "display.float_format", "{:.3f}".format):
        print(command)
        print(header(args))
        print(df.to_string(index=False))
        print()
        print(ratios.to_string(index=False))
    return f"{command}\n\n{header(args)}\n\n{to_markdown(df)}\n\n{to_markdown(ratios)}\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"small model, sqlite only, {QUICK_EPOCHS} epochs")
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma list of {','.join(SIZES)}")
    p.add_argument("--stores", default=",".join(ALL_STORES), help=f"comma list of {','.join(ALL_STORES)}")
    p.add_argument(
        "--variants", default=",".join(ALL_VARIANTS), help=f"comma list of {','.join(ALL_VARIANTS)}"
    )
    p.add_argument("--epochs", type=int, default=None, help=f"default {EPOCHS} ({QUICK_EPOCHS} with --quick)")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="intra-op threads for training (default 1: leaves a core free for tracking work, as a GPU "
        "training host has idle cores; with every core busy, any background thread steals from training)",
    )
    p.add_argument(
        "--rounds", type=int, default=1, help="run the whole plan N times, each in a shuffled order"
    )
    p.add_argument(
        "--before",
        type=Path,
        default=None,
        help="another checkout of this project (e.g. a git worktree of an older commit): every mlflow_best* "
        "variant also runs importing the package from there, in rows labelled '(before)'",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the tables as markdown to this file")
    p.add_argument("--logs", type=Path, default=None, help="copy every child's log into this folder")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.stores = "small", "sqlite"
    args.epochs = args.epochs or (QUICK_EPOCHS if args.quick else EPOCHS)
    for name, allowed in (("sizes", tuple(SIZES)), ("stores", ALL_STORES), ("variants", ALL_VARIANTS)):
        values = [v.strip() for v in getattr(args, name).split(",") if v.strip()]
        if not values or any(v not in allowed for v in values):
            p.error(f"--{name}: choose from {','.join(allowed)}")
        setattr(args, name, sorted(values, key=allowed.index))
    if args.epochs < 2 or (args.epochs - 1) in IMPROVING:
        p.error(f"--epochs: the last epoch must not be one of the improving epochs {IMPROVING}")
    if args.rounds < 1:
        p.error("--rounds: at least 1")
    if args.before is not None:
        args.before = args.before.resolve()
        if not (args.before / "mlflow_best" / "__init__.py").is_file():
            p.error(f"--before: {args.before} holds no mlflow_best package")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args._child is not None:
        child_main(args._child)
        return
    args.load_at_start = _load()
    workdir = Path(tempfile.mkdtemp(prefix="mlflow-best-bench-"))
    try:
        with contextlib.ExitStack() as stack:
            servers: dict[str, Server] = {}
            if "server" in args.stores:
                servers["server"] = stack.enter_context(mlflow_server(workdir / "server"))
            rows = []
            for round_no in range(args.rounds):
                specs = plan(args, workdir, servers, round_no)
                print(
                    f"round {round_no + 1}/{args.rounds}: {len(specs)} measurements, one subprocess each, "
                    f"under {workdir}",
                    file=sys.stderr,
                )
                rows += [{**run_child(spec, args.logs), "round": round_no} for spec in specs]
        markdown = report(rows, args)
        if args.out:
            args.out.write_text(markdown)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
