"""The Lightning adapter: a real ``lightning.pytorch.Trainer`` on a tiny module, real MLflow stores."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from mlflow import MlflowClient
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import mlflow_best
from mlflow_best.lightning import TrackCallback
from tests.helpers import (
    assert_identical,
    child_env,
    finish_child,
    sigkill_when,
    start_child,
    unique,
    wait_for,
)

TAG = "mlflow_best."


class Scripted(pl.LightningModule):
    """A small classifier whose monitored ``score`` per epoch is given, so the test picks the improvements.

    Lightning logs float32 tensors: the scores are exact in float32 so the registry tags compare as text.
    """

    def __init__(self, scores: list[float], hidden: int = 16, fail_at: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 2))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.hparams.fail_at == self.current_epoch and batch_idx == 1:
            raise RuntimeError(f"boom in epoch {self.current_epoch}")
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.log("score", self.hparams.scores[self.current_epoch])

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=0.02)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": sched}


def _loaders(seed: int = 0) -> tuple[DataLoader[Any], DataLoader[Any]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=g)
    data = TensorDataset(x, (x[:, 0] > 0).long())
    return DataLoader(data, batch_size=16, shuffle=True), DataLoader(data, batch_size=32)


class Snapshots(pl.Callback):
    """The weights and optimizer state at the end of each training epoch (what a checkpoint must hold)."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, Any]] = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.states[trainer.current_epoch] = {
            "model": {k: v.clone() for k, v in pl_module.state_dict().items()},
            "optimizer": _clone(trainer.optimizers[0].state_dict()),
        }


def _clone(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_clone(v) for v in tree]
    return tree


def _trainer(epochs: int, *callbacks: pl.Callback) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )


def _versions(client: MlflowClient, name: str) -> list[tuple[str, str, str]]:
    found = client.search_model_versions(f"name='{name}'")
    rows = ((str(v.version), v.tags["epoch"], v.tags["value"]) for v in found)
    return sorted(rows, key=lambda t: int(t[0]))


def test_versions_on_the_improving_epochs_alias_on_the_best_and_restore_equals_it(store: str) -> None:
    torch.manual_seed(0)
    name = unique("lit")
    module = Scripted([1.0, 0.75, 0.875, 0.5])
    snapshots = Snapshots()
    track = TrackCallback(monitor="score", registered_model=name, experiment=unique("exp"), verbose=False)
    _trainer(4, track, snapshots).fit(module, *_loaders())

    run = track.last_run
    assert run is not None and track.run is None
    client = MlflowClient(store)
    assert _versions(client, name) == [("1", "0", "1.0"), ("2", "1", "0.75"), ("3", "3", "0.5")]
    assert str(client.get_model_version_by_alias(name, "best").version) == "3"
    info = client.get_run(run.run_id)
    assert info.info.status == "FINISHED"
    # Every epoch once, with the training epoch's metrics and the validation's, at step = epoch.
    for metric in ("score", "train_loss", "val_acc"):
        assert [m.step for m in client.get_metric_history(run.run_id, metric)] == [0, 1, 2, 3]
    assert info.data.params["scheduler_class"] == "torch.optim.lr_scheduler:StepLR"

    # model=None: rebuilt from the recorded class and its hparams; the optimizer from its defaults.
    restored = mlflow_best.restore(run.run_id)
    assert isinstance(restored.model, Scripted) and restored.epoch == 3
    assert restored.metrics["score"] == 0.5
    assert_identical(snapshots.states[3]["model"], restored.model.state_dict())
    assert restored.optimizer is not None
    assert_identical(snapshots.states[3]["optimizer"], restored.optimizer.state_dict())
    # The scheduler state is the one after the epoch's step: 4 epochs done, lr halved 4 times.
    assert restored.training_state["scheduler"]["last_epoch"] == 4
    assert restored.training_state["scheduler"]["_last_lr"] == [pytest.approx(0.02 / 16)]

    best = mlflow_best.restore(f"models:/{name}@best", model=Scripted([0.0] * 4))
    assert_identical(snapshots.states[3]["model"], best.model.state_dict())


def test_a_fit_that_raises_ends_the_run_failed_and_keeps_the_best(sqlite_uri: str) -> None:
    torch.manual_seed(0)
    name = unique("lit")
    snapshots = Snapshots()
    track = TrackCallback(monitor="score", registered_model=name, verbose=False)
    with pytest.raises(RuntimeError, match="boom in epoch 2"):
        _trainer(4, track, snapshots).fit(Scripted([1.0, 0.75, 0.875, 0.5], fail_at=2), *_loaders())
    run = track.last_run
    assert run is not None and track.run is None
    client = MlflowClient(sqlite_uri)
    assert client.get_run(run.run_id).info.status == "FAILED"
    assert _versions(client, name) == [("1", "0", "1.0"), ("2", "1", "0.75")]
    best = mlflow_best.restore(f"models:/{name}@best", model=Scripted([0.0] * 4))
    assert best.epoch == 1
    assert_identical(snapshots.states[1]["model"], best.model.state_dict())


class Interrupt(pl.Callback):
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            raise KeyboardInterrupt


def test_an_interrupted_fit_ends_the_run_killed(sqlite_uri: str) -> None:
    track = TrackCallback(monitor="score", verbose=False)
    # Lightning turns Ctrl+C into a graceful shutdown and sys.exit(1), after calling on_exception.
    with pytest.raises(SystemExit):
        _trainer(4, track, Interrupt()).fit(Scripted([1.0, 0.75, 0.875, 0.5]), *_loaders())
    assert track.last_run is not None
    assert MlflowClient(sqlite_uri).get_run(track.last_run.run_id).info.status == "KILLED"


def test_a_monitor_that_is_not_logged_names_what_was(sqlite_uri: str) -> None:
    track = TrackCallback(monitor="val_loss", verbose=False)
    with pytest.raises(mlflow_best.MetricError, match=r"monitor='val_loss' is not in the metrics .*'score'"):
        _trainer(2, track).fit(Scripted([1.0, 0.8]), *_loaders())
    assert track.last_run is not None
    assert MlflowClient(sqlite_uri).get_run(track.last_run.run_id).info.status == "FAILED"


def test_arguments_are_checked_when_the_callback_is_made() -> None:
    with pytest.raises(mlflow_best.ConfigError, match=r"TrackCallback\(optimizer=...\) is taken from the"):
        TrackCallback(optimizer=None)
    with pytest.raises(mlflow_best.ConfigError, match=r"TrackCallback\(monitr=...\) is not an argument"):
        TrackCallback(monitr="val_loss")
    with pytest.raises(mlflow_best.ConfigError, match=r"keep=0 must be None"):
        TrackCallback(keep=0)


# -- exact resume ----------------------------------------------------------------------------------
# The child fits with dropout, a shuffling DataLoader (its order drawn from the global torch RNG),
# numpy and Python noise, AdamW and a ReduceLROnPlateau on the score (Lightning steps it after the
# validation, so a checkpoint taken at validation end would miss the step of epoch N-1, which does
# not improve). In phase "first" it stops at the start of epoch N and waits to be killed, after the
# callback logged (and checkpointed) epoch N-1.
LIGHTNING_SCRIPT = textwrap.dedent(
    """
    import json, os, random, sys, time
    import numpy as np
    import torch
    import torch.nn.functional as F
    import lightning.pytorch as pl
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from mlflow_best.lightning import TrackCallback

    phase, epochs, pause, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    resume = sys.argv[5] if len(sys.argv) > 5 else None
    scores = json.loads(os.environ["SCORES"])

    class Noisy(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2))

        def training_step(self, batch, batch_idx):
            x, y = batch
            x = x + torch.from_numpy(np.random.normal(0, 0.05, size=tuple(x.shape)).astype("float32"))
            return F.cross_entropy(self.net(x), y) * random.uniform(0.9, 1.1)

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]))

        def on_validation_epoch_end(self):
            if not self.trainer.sanity_checking:
                self.log("score", scores[self.current_epoch])

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": "score"}}

    class Pause(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if phase == "first" and trainer.current_epoch == pause:
                print("READY", flush=True)
                time.sleep(600)

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    x = torch.randn(96, 8)
    data = TensorDataset(x, (x[:, 0] + 0.5 * x[:, 1] > 0).long())
    model = Noisy()
    track = TrackCallback(monitor="score", experiment="resume", save_last=True, resume=resume, verbose=False)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[track, Pause()],
    )
    trainer.fit(model, DataLoader(data, batch_size=16, shuffle=True), DataLoader(data, batch_size=48))
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": trainer.optimizers[0].state_dict(),
            "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "numpy_next": float(np.random.random()),
            "python_next": random.random(),
            "start_epoch": track.last_run.start_epoch,
            "current_epoch": trainer.current_epoch,
        },
        out,
    )
    """
)


@pytest.mark.slow
def test_a_sigkilled_fit_resumed_with_resume_equals_a_straight_fit(
    sqlite_uri: str, tmp_path: Path, _sqlite_template: Path
) -> None:
    from tests.conftest import new_sqlite_store

    n = 3
    # Epoch 2 does not improve: the resume starts from the rolling "last" checkpoint of epoch 2, and
    # the plateau scheduler halves the learning rate there (and again after epoch 4).
    scores = [1.0, 0.8, 0.9, 0.7, 0.75, 0.6]
    script = tmp_path / "fit.py"
    script.write_text(LIGHTNING_SCRIPT)
    straight_log = tmp_path / "straight.log"
    straight = start_child(
        script,
        ["full", str(2 * n), "-1", str(tmp_path / "straight.pt")],
        child_env(new_sqlite_store(_sqlite_template, tmp_path / "straight"), tmp_path / "h1", scores),
        straight_log,
    )
    first_log = tmp_path / "first.log"
    first = start_child(
        script,
        ["first", str(2 * n), str(n), str(tmp_path / "first.pt")],
        child_env(sqlite_uri, tmp_path / "h2", scores),
        first_log,
    )
    client = MlflowClient(sqlite_uri)
    try:
        wait_for(lambda: "READY" in first_log.read_text(errors="replace"), first, first_log, "READY")
        experiment = client.get_experiment_by_name("resume")
        assert experiment is not None
        (run_id,) = [r.info.run_id for r in client.search_runs([experiment.experiment_id])]

        def checkpoint_of_epoch_before_the_kill_is_in_mlflow() -> bool:
            return client.get_run(run_id).data.tags.get(TAG + "last_epoch") == str(n - 1)

        sigkill_when(checkpoint_of_epoch_before_the_kill_is_in_mlflow, first, first_log, f"epoch {n - 1}")
    finally:
        if first.poll() is None:
            first.kill()
    assert client.get_run(run_id).info.status == "RUNNING"

    resumed_log = tmp_path / "resumed.log"
    resumed = start_child(
        script,
        ["resume", str(2 * n), "-1", str(tmp_path / "resumed.pt"), run_id],
        child_env(sqlite_uri, tmp_path / "h3", scores),
        resumed_log,
    )
    finish_child(resumed, resumed_log)
    finish_child(straight, straight_log)

    a = torch.load(tmp_path / "straight.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert (a["start_epoch"], b["start_epoch"]) == (0, n)
    assert a["current_epoch"] == b["current_epoch"] == 2 * n
    counted = sum(assert_identical(a[k], b[k], k) for k in ("model", "optimizer", "scheduler", "torch_rng"))
    assert counted == 4 + 4 * 3 + 1  # 4 weights; AdamW step, exp_avg, exp_avg_sq of each; the RNG
    assert (a["numpy_next"], a["python_next"]) == (b["numpy_next"], b["python_next"])
    assert a["scheduler"]["_last_lr"] == [pytest.approx(1e-2 / 4)]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "score")) == list(range(2 * n))
