"""Exact resume: N epochs, SIGKILL, resume for N more == 2N epochs in one go, bit for bit on the CPU."""

from __future__ import annotations

import random
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mlflow_best
from tests.helpers import (
    TinyNet,
    assert_identical,
    child_env,
    finish_child,
    sigkill_when,
    start_child,
    unique,
    wait_for,
)

TAG = "mlflow_best."

# The child trains with everything that draws random numbers or carries state across epochs: dropout,
# a shuffling DataLoader, numpy and python RNG (noise), AdamW, a StepLR schedule and a GradScaler whose
# scale grows. Its monitored "score" is a fixed sequence, so which kind of checkpoint ("best" or "last")
# the resume starts from is chosen by the test.
TRAIN_SCRIPT = textwrap.dedent(
    """
    import json, os, random, sys, time
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    import mlflow_best

    phase, epochs, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    resume = sys.argv[4] if len(sys.argv) > 4 else None
    scores = json.loads(os.environ["SCORES"])

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    x = torch.randn(96, 8)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    data = TensorDataset(x, y)
    g = torch.Generator().manual_seed(1234)
    # One loader shuffles with its own generator (saved through generators=), the other draws its
    # seed from the global torch RNG at every epoch (saved with the RNG states).
    explicit = DataLoader(data, batch_size=16, shuffle=True, generator=g)
    implicit = DataLoader(data, batch_size=24, shuffle=True)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)

    with mlflow_best.track(
        model, opt, scheduler=sched, scaler=scaler, generators={"loader": g},
        monitor="score", experiment="resume", save_last=True, resume=resume, verbose=False,
    ) as run:
        with open(out + ".run", "w") as f:
            f.write(run.run_id)
        for epoch in range(run.start_epoch, epochs):
            model.train()
            for (xa, ya), (xb, yb) in zip(explicit, implicit):
                noise = torch.from_numpy(np.random.normal(0.0, 0.05, size=tuple(xa.shape)).astype("float32"))
                xa = xa + noise * random.random()
                loss = F.cross_entropy(model(xa), ya) + F.cross_entropy(model(xb), yb)
                opt.zero_grad()
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            sched.step()
            run.log_epoch(epoch, {"train_loss": loss.item(), "score": scores[epoch]})
            if phase == "mid":
                # Killed by the test somewhere in here, while checkpoints are still being written
                # and uploaded (the test checks where the kill landed).
                print("EPOCH", epoch, flush=True)
                time.sleep(0.1)
        if phase == "mid":
            print("DONE", flush=True)
            time.sleep(600)
        if phase == "first":
            # The first half is trained; the process waits to be killed. It never leaves the block,
            # so nothing is written at exit: the resume must use what is already in MLflow.
            print("READY", flush=True)
            time.sleep(600)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "loader_rng": g.get_state(),
            "numpy_next": float(np.random.random()),
            "python_next": random.random(),
            "start_epoch": run.start_epoch,
        },
        out,
    )
    """
)


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical_to_training_in_one_go(
    sqlite_uri: str, tmp_path: Path, _sqlite_template: Path
) -> None:
    from tests.conftest import new_sqlite_store

    n = 4
    # Epochs 2 and 3 do not improve: the kill comes after the rolling "last" checkpoint of epoch 3,
    # which is newer than the best (epoch 1), so that is what the resume must start from.
    scores = [1.0, 0.8, 0.9, 0.85, 0.7, 0.75, 0.6, 0.65]
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    # The uninterrupted run has its own store, so it runs while the first half is trained and killed.
    straight_uri = new_sqlite_store(_sqlite_template, tmp_path / "straight")
    straight_log = tmp_path / "straight.log"
    straight = start_child(
        script,
        ["full", str(2 * n), str(tmp_path / "straight.pt")],
        child_env(straight_uri, tmp_path / "home-straight", scores),
        straight_log,
    )
    first_log = tmp_path / "first.log"
    first = start_child(
        script,
        ["first", str(n), str(tmp_path / "first.pt")],
        child_env(sqlite_uri, tmp_path / "home-first", scores),
        first_log,
    )
    client = MlflowClient(sqlite_uri)
    try:
        wait_for(lambda: "READY" in first_log.read_text(errors="replace"), first, first_log, "READY")
        run_id = (tmp_path / "first.pt.run").read_text().strip()

        def last_checkpoint_of_first_half_is_in_mlflow() -> bool:
            return client.get_run(run_id).data.tags.get(TAG + "last_epoch") == str(n - 1)

        sigkill_when(
            last_checkpoint_of_first_half_is_in_mlflow, first, first_log, f"the checkpoint of epoch {n - 1}"
        )
    finally:
        if first.poll() is None:
            first.kill()
    killed = client.get_run(run_id)
    assert killed.info.status == "RUNNING"  # killed: nobody ended it
    assert killed.data.tags[TAG + "best_epoch"] == "1"

    # A fresh MLFLOW_BEST_HOME: the resume reads the checkpoint from MLflow, not from a local copy.
    resumed_log = tmp_path / "resumed.log"
    resumed = start_child(
        script,
        ["resume", str(2 * n), str(tmp_path / "resumed.pt"), run_id],
        child_env(sqlite_uri, tmp_path / "home-resumed", scores),
        resumed_log,
    )
    finish_child(resumed, resumed_log)
    finish_child(straight, straight_log)

    a = torch.load(tmp_path / "straight.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert (a["start_epoch"], b["start_epoch"]) == (0, n)
    counted = sum(
        assert_identical(a[key], b[key], key)
        for key in ("model", "optimizer", "scheduler", "scaler", "torch_rng", "loader_rng")
    )
    assert counted == 4 + 4 * 3 + 2  # 4 weights; AdamW step, exp_avg, exp_avg_sq of each; 2 RNG states
    assert (a["numpy_next"], a["python_next"]) == (b["numpy_next"], b["python_next"])
    assert a["scaler"]["scale"] > 1024.0  # the scale grew, so restoring the scaler mattered

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "score")) == list(range(2 * n))


@pytest.mark.slow
def test_sigkill_mid_pipeline_and_resume_is_bit_identical_to_training_in_one_go(
    sqlite_uri: str, tmp_path: Path, _sqlite_template: Path
) -> None:
    """Killed while checkpoints are still being written and uploaded; resumed on the same machine
    (same MLFLOW_BEST_HOME): the leftovers are replayed first, the resume starts after the newest
    checkpoint that was written whole, and the result equals training in one go."""
    from mlflow_best._checkpoint import verify_checkpoint
    from mlflow_best._staging import CheckpointOp, read_unsent
    from tests.conftest import new_sqlite_store

    epochs = 8
    scores = [1.0, 0.8, 0.9, 0.85, 0.7, 0.75, 0.6, 0.65]
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    straight_uri = new_sqlite_store(_sqlite_template, tmp_path / "straight")
    straight_log = tmp_path / "straight.log"
    straight = start_child(
        script,
        ["full", str(epochs), str(tmp_path / "straight.pt")],
        child_env(straight_uri, tmp_path / "home-straight", scores),
        straight_log,
    )
    home = tmp_path / "home-mid"
    first_log = tmp_path / "first.log"
    env = child_env(sqlite_uri, home, scores)
    first = start_child(script, ["mid", str(epochs), str(tmp_path / "first.pt")], env, first_log)
    client = MlflowClient(sqlite_uri)
    try:
        wait_for(lambda: (tmp_path / "first.pt.run").is_file(), first, first_log, "the run to start")
        wait_for(lambda: (tmp_path / "first.pt.run").read_text().strip() != "", first, first_log, "its id")
        run_id = (tmp_path / "first.pt.run").read_text().strip()
        staging = home / "runs" / run_id

        def mid_pipeline() -> bool:
            if "DONE" in first_log.read_text(errors="replace"):
                pytest.fail("the child finished training before the kill could land mid-pipeline")
            tags = client.get_run(run_id).data.tags
            in_mlflow = TAG + "best_epoch" in tags or TAG + "last_epoch" in tags
            try:
                pending = [op for op in read_unsent(staging) if isinstance(op, CheckpointOp)]
            except (OSError, ValueError):
                pending = []  # read while the child appends
            # Aimed where a resume has most to get right: a checkpoint written whole, not yet uploaded.
            return in_mlflow and any(_whole(verify_checkpoint, Path(op.folder)) for op in pending)

        sigkill_when(mid_pipeline, first, first_log, "a checkpoint whole but not uploaded", poll=0.01)
    finally:
        if first.poll() is None:
            first.kill()
    log = first_log.read_text(errors="replace")
    trained = [int(line.split()[1]) for line in log.splitlines() if line.startswith("EPOCH ")]
    unsent = [op for op in read_unsent(staging) if isinstance(op, CheckpointOp)]
    assert unsent, "the kill did not land while checkpoints were pending"
    assert "DONE" not in log and max(trained, default=-1) < epochs - 1
    tags = client.get_run(run_id).data.tags
    in_mlflow = max(int(tags.get(TAG + "best_epoch", -1)), int(tags.get(TAG + "last_epoch", -1)))
    whole = [op.epoch for op in unsent if _whole(verify_checkpoint, Path(op.folder))]
    newest = max([in_mlflow, *whole])
    print(
        f"\nkilled after epoch {max(trained, default=-1)} was logged: newest checkpoint in MLflow "
        f"{in_mlflow}, {len(unsent)} checkpoint(s) unsent ({len(whole)} whole on disk); "
        f"the resume starts at {newest + 1}"
    )

    resumed_log = tmp_path / "resumed.log"
    resumed = start_child(
        script,
        ["resume", str(epochs), str(tmp_path / "resumed.pt"), run_id],
        child_env(sqlite_uri, home, scores),
        resumed_log,
    )
    finish_child(resumed, resumed_log)
    finish_child(straight, straight_log)
    a = torch.load(tmp_path / "straight.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert b["start_epoch"] == newest + 1  # after the newest whole checkpoint, the replayed ones included
    for key in ("model", "optimizer", "scheduler", "scaler", "torch_rng", "loader_rng"):
        assert_identical(a[key], b[key], key)
    assert (a["numpy_next"], a["python_next"]) == (b["numpy_next"], b["python_next"])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted({m.step for m in client.get_metric_history(run_id, "score")}) == list(range(epochs))
    assert read_unsent(staging) == []  # the killed process's leftovers were sent by the resume


def _whole(verify: Callable[[Path], Any], folder: Path) -> bool:
    try:
        verify(folder)
    except (OSError, mlflow_best.CheckpointError):
        return False
    return True


# -- in one process ------------------------------------------------------------------------------
class Training:
    """Everything a resume must carry: dropout, two shuffling loaders, Adam, StepLR, a GradScaler."""

    def __init__(self) -> None:
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        x = torch.randn(48, 4)
        data = TensorDataset(x, (x[:, 0] > 0).long())
        self.g = torch.Generator().manual_seed(7)
        self.explicit = DataLoader(data, batch_size=16, shuffle=True, generator=self.g)
        self.implicit = DataLoader(data, batch_size=12, shuffle=True)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=0.02)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=2, gamma=0.5)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=2)

    def track(self, **kwargs: Any) -> mlflow_best.Run:
        kwargs.setdefault("experiment", "resume")
        return mlflow_best.track(
            self.model,
            self.opt,
            scheduler=self.sched,
            scaler=self.scaler,
            generators={"loader": self.g},
            verbose=False,
            **kwargs,
        )

    def epoch(self, stop_after: int | None = None) -> None:
        self.model.train()
        for i, ((xa, ya), (xb, yb)) in enumerate(zip(self.explicit, self.implicit, strict=False)):
            if i == stop_after:
                raise RuntimeError("crash in the middle of an epoch")
            xa = xa + torch.from_numpy(np.random.normal(0, 0.05, size=(len(xa), 4)).astype("float32"))
            loss = nn.functional.cross_entropy(self.model(xa), ya) * random.uniform(0.9, 1.1)
            loss = loss + nn.functional.cross_entropy(self.model(xb), yb)
            self.opt.zero_grad()
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        self.sched.step()

    def state(self) -> dict[str, Any]:
        return {
            "model": {k: v.clone() for k, v in self.model.state_dict().items()},
            "optimizer": _clone(self.opt.state_dict()),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "loader_rng": self.g.get_state(),
        }


def _clone(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_clone(v) for v in tree]
    return tree


SCORES = [1.0, 0.9, 1.1, 1.2, 0.8, 0.95]


def _train_straight(epochs: int, **kwargs: Any) -> dict[str, Any]:
    t = Training()
    with t.track(**kwargs) as run:
        for epoch in range(run.start_epoch, epochs):
            t.epoch()
            run.log_epoch(epoch, {"val_loss": SCORES[epoch]})
    return t.state()


@pytest.mark.parametrize(("error", "status"), [(RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_an_exception_saves_the_last_state_and_resume_is_exact(
    sqlite_uri: str, error: type[BaseException], status: str
) -> None:
    expected = _train_straight(len(SCORES), save_last=10)
    t = Training()
    with pytest.raises(error, match="stop"), t.track(save_last=10) as run:  # 10: never due on its own
        for epoch in range(3):
            t.epoch()
            run.log_epoch(epoch, {"val_loss": SCORES[epoch]})  # epoch 1 is the best, epoch 2 is not saved
        raise error("stop")
    client = MlflowClient(sqlite_uri)
    crashed = client.get_run(run.run_id)
    assert crashed.info.status == status
    assert crashed.data.tags[TAG + "best_epoch"] == "1"
    assert crashed.data.tags[TAG + "last_epoch"] == "2"  # written while the run ended

    t = Training()
    with t.track(save_last=10, resume=run.run_id) as resumed:
        assert resumed.start_epoch == 3
        for epoch in range(resumed.start_epoch, len(SCORES)):
            t.epoch()
            resumed.log_epoch(epoch, {"val_loss": SCORES[epoch]})
    assert_identical(expected, t.state())
    assert client.get_run(run.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("save_last", [5, False])
def test_a_crash_mid_epoch_resumes_from_the_state_at_the_crash_only_with_save_last(
    sqlite_uri: str, save_last: int | bool
) -> None:
    t = Training()
    with pytest.raises(RuntimeError, match="middle of an epoch"), t.track(save_last=save_last) as run:
        for epoch in range(3):
            t.epoch(stop_after=1 if epoch == 2 else None)
            if epoch == 0:
                at_best = t.state()
            run.log_epoch(epoch, {"val_loss": 1.0 + epoch})  # only epoch 0 improves
    at_crash = t.state()
    tags = MlflowClient(sqlite_uri).get_run(run.run_id).data.tags
    t = Training()
    with t.track(save_last=save_last, resume=run.run_id) as resumed:
        now = t.state()
    if save_last:
        # The weights, optimizer and RNG as they were when the exception left the block, labelled
        # with the last completed epoch: the resume re-runs the interrupted epoch from there.
        assert tags[TAG + "last_epoch"] == "1"
        assert resumed.start_epoch == 2
        assert_identical(at_crash, now)
    else:
        assert TAG + "last_epoch" not in tags  # off by default: nothing is written at the crash
        assert resumed.start_epoch == 1
        assert_identical(at_best["model"], now["model"])


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_save_last_every_n_epochs_keeps_one_rolling_unregistered_checkpoint(sqlite_uri: str) -> None:
    name = unique("m")
    snaps: dict[int, dict[str, torch.Tensor]] = {}
    from tests.helpers import run_sequence

    # Only epoch 0 improves; with save_last=3 a "last" is kept at epochs 3 and 6 (3 after the best).
    run, _, _ = run_sequence([1.0] + [2.0] * 7, save_last=3, registered_model=name, snapshots=snaps)
    client = MlflowClient(sqlite_uri)
    tags = client.get_run(run.run_id).data.tags
    assert (tags[TAG + "last_epoch"], tags[TAG + "last_checkpoint"]) == ("6", "checkpoints/last-epoch=0006")
    assert [a.path for a in client.list_artifacts(run.run_id, "checkpoints")] == [
        "checkpoints/last-epoch=0006"
    ]
    assert [str(v.version) for v in client.search_model_versions(f"name='{name}'")] == [
        "1"
    ]  # never registered
    assert len(client.search_logged_models(experiment_ids=[run.experiment_id])) == 1
    staged = sorted(p.name for p in (run.staging_dir / "checkpoints").iterdir())
    assert staged in ([], ["last-epoch=0006"])  # older "last" folders are gone

    model = TinyNet()
    with mlflow_best.track(
        model, torch.optim.Adam(model.parameters(), lr=0.01), resume=run.run_id, save_last=3
    ) as resumed:
        assert resumed.start_epoch == 7  # a crash after epoch 7 loses at most save_last epochs
        assert_identical(snaps[6], _weights(model))


def test_resume_takes_a_best_checkpoint_newer_than_the_last_one(sqlite_uri: str) -> None:
    from tests.helpers import run_sequence

    snaps: dict[int, dict[str, torch.Tensor]] = {}
    run, _, _ = run_sequence([1.0, 2.0, 0.5, 0.7], save_last=2, snapshots=snaps)  # last: 3; best: 2
    tags = MlflowClient(sqlite_uri).get_run(run.run_id).data.tags
    assert (tags[TAG + "best_epoch"], tags.get(TAG + "last_epoch")) == ("2", None)
    run, _, _ = run_sequence([1.0, 2.0, 0.5, 0.7, 0.8], save_last=True, snapshots=snaps)
    tags = MlflowClient(sqlite_uri).get_run(run.run_id).data.tags
    assert (tags[TAG + "best_epoch"], tags[TAG + "last_epoch"]) == ("2", "4")
    model = TinyNet()
    with mlflow_best.track(model, None, resume=run.run_id) as resumed:
        assert resumed.start_epoch == 5
        assert_identical(snaps[4], _weights(model))


def test_save_last_is_off_by_default(sqlite_uri: str) -> None:
    from tests.helpers import run_sequence

    run, _, _ = run_sequence([1.0, 2.0, 3.0])
    client = MlflowClient(sqlite_uri)
    assert not any(k.startswith(TAG + "last") for k in client.get_run(run.run_id).data.tags)
    assert client.list_artifacts(run.run_id, "checkpoints") == []
    with mlflow_best.track(TinyNet(), None, resume=run.run_id) as resumed:
        assert resumed.start_epoch == 1


def _rng_states(g: torch.Generator) -> tuple[Any, ...]:
    return torch.get_rng_state(), np.random.get_state(), random.getstate(), g.get_state()


def _draw(g: torch.Generator) -> None:
    torch.rand(5)
    np.random.rand(5)
    random.random()
    torch.rand(5, generator=g)


def _assert_same_rng(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    assert torch.equal(a[0], b[0])
    assert a[1][0] == b[1][0] and np.array_equal(a[1][1], b[1][1]) and a[1][2:] == b[1][2:]
    assert a[2] == b[2]
    assert torch.equal(a[3], b[3])


def test_restore_with_restore_rng_puts_every_rng_state_back(sqlite_uri: str) -> None:
    model = TinyNet()
    g = torch.Generator().manual_seed(3)
    with mlflow_best.track(model, None, generators={"loader": g}, model_args={"hidden": 8}) as run:
        _draw(g)
        at_checkpoint = _rng_states(g)
        run.log_epoch(0, {"val_loss": 1.0})
        _draw(g)
        run.log_epoch(1, {"val_loss": 2.0})
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    g.manual_seed(99)

    scrambled = _rng_states(g)
    mlflow_best.restore(run.run_id)  # restore_rng is off by default
    _assert_same_rng(scrambled, _rng_states(g))

    mlflow_best.restore(run.run_id, restore_rng=True, generators={"loader": g})
    _assert_same_rng(at_checkpoint, _rng_states(g))
    with pytest.warns(RuntimeWarning, match=r"generators=\{'shuffle': \.\.\.\} has no saved state"):
        mlflow_best.restore(run.run_id, restore_rng=True, generators={"shuffle": torch.Generator()})
