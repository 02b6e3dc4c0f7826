"""Per-epoch cost of the framework callbacks: the same fit with and without TrackCallback.

    python benchmarks/bench_adapters.py [--epochs 6] [--repeats 3]

Each framework trains the same seeded model in three variants per repeat (the order alternating
between repeats): plain; with ``TrackCallback`` on a fresh sqlite store and a monitored metric that
improves at every epoch (the worst case: a checkpoint is taken, written, logged and registered each
epoch); and with a metric that improves only at the first epoch (metrics logged, no checkpoint). An
epoch's time is measured from one ``on_*_epoch_begin`` to the next (the first epoch is left out: it
includes the frameworks' own warm-up), so it includes the callback's ``log_epoch`` and whatever the
background threads take from the training process; the fit's total also includes opening the run
and waiting for the last uploads at its end. A tracked warm-up fit per framework comes first and is
not counted. torch runs one thread. Prints one table.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402


def _store(tmp: Path) -> str:
    """A fresh sqlite store per fit, copied from one migrated template (migrating costs ~7 s)."""
    template = tmp / "template.db"
    if not template.exists():
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
    path = tmp / f"s-{uuid.uuid4().hex[:6]}.db"
    shutil.copy(template, path)
    uri = f"sqlite:///{path}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


# -- Lightning ---------------------------------------------------------------------------------------
def lightning_fit(epochs: int, tracked: str, tmp: Path) -> tuple[list[tuple[float, float]], float]:
    import lightning.pytorch as pl

    from mlflow_best.lightning import TrackCallback

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2)
            )

        def training_step(self, batch: Any, i: int) -> torch.Tensor:
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def validation_step(self, batch: Any, i: int) -> None:
            self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]))

        def on_validation_epoch_end(self) -> None:
            if not self.trainer.sanity_checking:
                # improves every epoch ("improving") or only at the first ("flat")
                self.log("score", 1.0 / (1 + self.current_epoch) if tracked != "flat" else 1.0)

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, float]] = []

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self.marks.append((time.perf_counter(), time.process_time()))

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.marks.append((time.perf_counter(), time.process_time()))

    torch.manual_seed(0)
    x = torch.randn(4096, 32)
    data = TensorDataset(x, (x[:, 0] > 0).long())
    clock = Clock()
    callbacks: list[pl.Callback] = [clock]
    if tracked != "plain":
        _store(tmp)
        callbacks.insert(0, TrackCallback(monitor="score", registered_model="bench-lit", verbose=False))
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
    )
    t0 = time.perf_counter()
    trainer.fit(Net(), DataLoader(data, batch_size=64, shuffle=True), DataLoader(data, batch_size=512))
    total = time.perf_counter() - t0
    return _epochs(clock.marks), total


# -- Hugging Face ------------------------------------------------------------------------------------
def transformers_fit(epochs: int, tracked: str, tmp: Path) -> tuple[list[tuple[float, float]], float]:
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from mlflow_best.transformers import TrackCallback

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, float]] = []

        def on_epoch_begin(self, *a: Any, **k: Any) -> None:
            self.marks.append((time.perf_counter(), time.process_time()))

        def on_train_end(self, *a: Any, **k: Any) -> None:
            self.marks.append((time.perf_counter(), time.process_time()))

    class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __init__(self, n: int) -> None:
            g = torch.Generator().manual_seed(n)
            self.ids = torch.randint(1, 500, (n, 32), generator=g)
            self.labels = (self.ids[:, 0] > 250).long()

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": self.labels[i]}

    torch.manual_seed(0)
    config = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    model = BertForSequenceClassification(config)
    clock = Clock()
    callbacks: list[Any] = [clock]
    track = None
    if tracked != "plain":
        _store(tmp)
        track = TrackCallback(registered_model="bench-hf", verbose=False)
        callbacks.insert(0, track)
    args = TrainingArguments(
        str(tmp / "hf"), num_train_epochs=epochs, per_device_train_batch_size=32, eval_strategy="epoch",
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, logging_strategy="no", seed=0,
        metric_for_best_model="score", greater_is_better=True,
    )
    # improves at every evaluation ("improving") or only at the first ("flat"); computed in every variant
    scores = itertools.count() if tracked != "flat" else itertools.repeat(0)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(512), eval_dataset=Tokens(128),
                      callbacks=callbacks, compute_metrics=lambda _: {"score": float(next(scores))})
    trainer.remove_callback(PrinterCallback)  # disable_tqdm=True prints every log line otherwise
    t0 = time.perf_counter()
    if track is not None:
        with track:
            trainer.train()
    else:
        trainer.train()
    total = time.perf_counter() - t0
    return _epochs(clock.marks), total


def _epochs(marks: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of each epoch but the first."""
    return [(b[0] - a[0], b[1] - a[1]) for a, b in itertools.pairwise(marks[1:])]


VARIANTS = ("plain", "improving", "flat")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    ns = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)  # two variants compared on a small shared machine: no thread oversubscription
    fits: list[tuple[str, Callable[[int, str, Path], tuple[list[tuple[float, float]], float]]]] = [
        ("Lightning", lightning_fit), ("HF Trainer", transformers_fit)
    ]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        os.environ["MLFLOW_BEST_HOME"] = str(tmp / "home")
        os.chdir(tmp)
        for name, fit in fits:
            epochs: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
            totals: dict[str, list[float]] = {v: [] for v in VARIANTS}
            # One tracked fit first, not counted: the first run in a process imports and initialises
            # what the pipeline needs (MLflow's stores, SQLAlchemy, matplotlib), ~2 s once.
            fit(2, "improving", tmp)
            for r in range(ns.repeats):
                # Alternating the order, so a machine that gets busier or warmer favours no variant.
                for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                    times, total = fit(ns.epochs, variant, tmp)
                    epochs[variant].extend(times)
                    totals[variant].append(total)
            rows.append((
                name,
                {v: statistics.median(w for w, _ in epochs[v]) for v in VARIANTS},
                {v: statistics.median(c for _, c in epochs[v]) for v in VARIANTS},
                {v: statistics.median(totals[v]) for v in VARIANTS},
            ))
    print(f"\n{ns.epochs} epochs x {ns.repeats} repeats per variant, torch threads: 1; median epoch (the "
          "first left out). improving: a checkpoint every epoch; flat: metrics only. CPU = process CPU "
          "time (training + our threads), steadier than wall time on a shared machine\n")
    print("| framework | epoch, plain (wall / CPU) | with TrackCallback, improving | ratio wall / CPU | "
          "with, flat | ratio wall / CPU | fit total: plain / improving / flat |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, wall, cpu, t in rows:
        cells = [f"{wall['plain'] * 1000:.0f} / {cpu['plain'] * 1000:.0f} ms"]
        for v in ("improving", "flat"):
            cells.append(f"{wall[v] * 1000:.0f} / {cpu[v] * 1000:.0f} ms")
            cells.append(f"{wall[v] / wall['plain']:.2f} / {cpu[v] / cpu['plain']:.2f}")
        total_s = f"{t['plain']:.1f} / {t['improving']:.1f} / {t['flat']:.1f} s"
        print(f"| {name} | " + " | ".join(cells) + f" | {total_s} |")

if __name__ == "__main__":
    main()
