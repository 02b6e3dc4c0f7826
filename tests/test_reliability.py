"""Nothing lost, loudly: refusals are not outages, threads cannot die silently, one writer per run."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

import mlflow_best
from mlflow_best._errors import CheckpointError, ConfigError, UnsentError
from mlflow_best._registry import Publisher
from mlflow_best._staging import StagingLock, read_rejected, read_unsent
from tests._server import die_with_parent
from tests.helpers import TinyNet, unique


def _wait(predicate: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_a_refused_item_is_recorded_and_never_blocks_the_items_after_it(store: str) -> None:
    """A registered model deleted mid-run: MLflow refuses that version; every later epoch still lands."""
    client = MlflowClient(store)
    name = unique("refused")
    with (
        pytest.raises(UnsentError, match=r"refused by MLflow \(.*\)") as caught,
        pytest.warns(RuntimeWarning, match=r"MLflow refused best checkpoint epoch=0001"),
        mlflow_best.track(TinyNet(), None, experiment=unique("e"), registered_model=name) as run,
    ):
        run.log_epoch(0, {"val_loss": 1.0})
        _wait(lambda: run.best.version is not None, "version 1")
        client.delete_registered_model(name)
        run.log_epoch(1, {"val_loss": 0.5})  # improves: its version is refused
        for epoch in range(2, 6):
            run.log_epoch(epoch, {"val_loss": 0.9})
        _wait(lambda: run._pipeline is not None and run._pipeline.in_flight == 0, "the queue")
        run.log_epoch(6, {"val_loss": 0.8})  # the refusal is warned about here, in this thread
    message = str(caught.value)
    assert "best checkpoint epoch=0001" in message and "not found" in message  # with MLflow's reason
    assert len(caught.value.pending) == 1
    history = client.get_metric_history(run.run_id, "val_loss")
    assert sorted(m.step for m in history) == list(range(7))  # each epoch once, also those after the refusal
    assert client.get_run(run.run_id).info.status == "FINISHED"
    rejected = read_rejected(run.staging_dir)
    assert [op.seq for op, _ in rejected] and "epoch=0001" in rejected[0][0].name  # type: ignore[union-attr]
    assert read_unsent(run.staging_dir) == []  # a refusal is not retried by sync
    assert mlflow_best.sync(run.run_id) == 0


def test_quick_epochs_are_coalesced_into_few_calls_each_row_once_in_order(sqlite_uri: str) -> None:
    model = torch.nn.Linear(300, 300)  # a checkpoint that takes a moment: the epochs queue up behind it
    with mlflow_best.track(
        model, None, experiment=unique("e"), model_args={"in_features": 300, "out_features": 300},
        verbose=False,
    ) as run:
        for epoch in range(400):
            metrics = {"val_loss": 1.0 if epoch == 0 else 2.0, "lr": 0.1, "step_time": float(epoch)}
            run.log_epoch(epoch, metrics)
        pipeline = run._pipeline
    assert pipeline is not None
    history = MlflowClient(sqlite_uri).get_metric_history(run.run_id, "step_time")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [float(e) for e in range(400)]
    assert len(history) == 400
    # 400 epochs of 4 metrics fit in 2 calls of 1000: far fewer calls than epochs, even if the queue
    # drained now and then.
    assert pipeline.calls < 100, pipeline.calls


def test_warnings_as_errors_in_the_program_never_kill_the_upload_thread(sqlite_uri: str) -> None:
    """Under simplefilter("error") the refusal's warning is raised in the training thread; the run ends."""
    client = MlflowClient(sqlite_uri)
    name = unique("werror")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Raised at log_epoch(2) in this thread; leaving the block then lists the refused item (as a
        # warning too, since the block already raises).
        with (
            pytest.raises(RuntimeWarning, match=r"refused by MLflow \(Registered Model"),
            mlflow_best.track(
                TinyNet(), None, experiment=unique("e"), registered_model=name, verbose=False
            ) as run,
        ):
            run.log_epoch(0, {"val_loss": 1.0})
            _wait(lambda: run.best.version is not None, "version 1")
            client.delete_registered_model(name)
            run.log_epoch(1, {"val_loss": 0.5})
            _wait(lambda: run._pipeline is not None and run._pipeline.in_flight == 0, "the queue")
            run.log_epoch(2, {"val_loss": 0.9})
    assert run._pipeline is not None and run._pipeline.died is None
    got = client.get_run(run.run_id)
    assert got.info.status == "FAILED"  # ended, with the block's exception: never left RUNNING
    assert sorted(m.step for m in client.get_metric_history(run.run_id, "val_loss")) == [0, 1]


def test_a_dead_upload_thread_is_reported_at_the_next_log_epoch_and_the_run_still_ends(
    sqlite_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Publisher.__call__
    calls = {"n": 0}

    def dies_once(self: Publisher, ops: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise SystemExit("a bug that escapes every handler")
        real(self, ops)  # type: ignore[arg-type]

    monkeypatch.setattr(Publisher, "__call__", dies_once)
    with (
        pytest.raises(UnsentError, match=r"(?s)upload thread stopped \(SystemExit.*- metrics of epoch 1\n"),
        mlflow_best.track(TinyNet(), None, experiment=unique("e"), verbose=False) as run,
    ):
        run.log_epoch(0, {"val_loss": 1.0})
        run.log_epoch(1, {"val_loss": 2.0})
        _wait(lambda: run._pipeline is not None and run._pipeline.died is not None, "the thread to die")
        run.log_epoch(2, {"val_loss": 3.0})
    assert run.history[-1].epoch == 1  # the refused call changed nothing
    client = MlflowClient(sqlite_uri)
    assert client.get_run(run.run_id).info.status == "FAILED"  # the final flush sent the rest and ended it
    assert sorted(m.step for m in client.get_metric_history(run.run_id, "val_loss")) == [0, 1]


def test_a_failing_state_copy_at_crash_time_still_ends_the_run(sqlite_uri: str) -> None:
    model = TinyNet()
    with (
        pytest.raises(KeyError, match="boom"),
        pytest.warns(RuntimeWarning, match="state at the crash could"),
        mlflow_best.track(model, None, experiment=unique("e"), save_last=5, verbose=False) as run,
    ):
        run.log_epoch(0, {"val_loss": 1.0})
        run.log_epoch(1, {"val_loss": 2.0})
        run.log_epoch(2, {"val_loss": 3.0})
        model.to("meta")  # its state can no longer be copied
        raise KeyError("boom")
    assert MlflowClient(sqlite_uri).get_run(run.run_id).info.status == "FAILED"


def test_a_snapshot_that_fails_leaves_best_unchanged_and_never_leaks_a_slot(sqlite_uri: str) -> None:
    model = TinyNet()
    with mlflow_best.track(model, None, experiment=unique("e"), verbose=False) as run:
        run.log_epoch(0, {"val_loss": 1.0})
        model.to("meta")
        for epoch in (1, 2):  # as many failures as the pool has slots: a leak would leave none
            with pytest.raises(CheckpointError, match=r"could not copy the training state of epoch \d.*meta"):
                run.log_epoch(epoch, {"val_loss": 0.5})
            assert (run.best.epoch, run.best.value) == (0, 1.0)
        model.to_empty(device="cpu")
        done = threading.Event()

        def improve() -> None:
            run.log_epoch(3, {"val_loss": 0.25})
            done.set()

        worker = threading.Thread(target=improve, daemon=True)
        worker.start()
        worker.join(60)
        assert done.is_set(), "the next improvement waited for a snapshot slot that was never given back"
    assert run.best.epoch == 3 and run.improvements == [0, 3]


def test_unsent_error_survives_pickle() -> None:
    error = UnsentError("2 item(s) did not reach MLflow", "/tmp/staging", ["metrics of epoch 3", "run end"])
    again = pickle.loads(pickle.dumps(error))
    assert (str(again), again.staging_dir, again.pending) == (str(error), error.staging_dir, error.pending)


def test_sync_and_a_second_resume_of_a_live_run_are_refused_naming_the_holder(sqlite_uri: str) -> None:
    with mlflow_best.track(TinyNet(), None, experiment=unique("e"), verbose=False) as run:
        run.log_epoch(0, {"val_loss": 1.0})
        with pytest.raises(ConfigError, match=r"cannot sync run .* in use by process \d+ on .*still running"):
            mlflow_best.sync(run.run_id)
        with (
            pytest.raises(ConfigError, match=r"still being tracked.*in use by process \d+"),
            mlflow_best.track(TinyNet(), None, resume=run.run_id, verbose=False),
        ):
            pytest.fail("a second writer of the same run must not start")
        run.log_epoch(1, {"val_loss": 0.5})
    client = MlflowClient(sqlite_uri)
    assert client.get_run(run.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.run_id, "val_loss")] == [0, 1]


def test_a_lease_held_on_another_machine_is_refused_until_it_expires(
    sqlite_uri: str, tmp_path: Path
) -> None:
    with mlflow_best.track(TinyNet(), None, experiment=unique("e"), verbose=False) as first:
        first.log_epoch(0, {"val_loss": 1.0})
    client = MlflowClient(sqlite_uri)
    # As another machine's live run leaves it: RUNNING, its lease renewed a moment ago.
    client.update_run(first.run_id, "RUNNING")
    until = int((time.time() + 90) * 1000)
    lease = json.dumps({"holder": "node-7:4242", "until_ms": until})
    client.set_tag(first.run_id, "mlflow_best.lease", lease)
    with (
        pytest.raises(ConfigError, match=r"still being tracked by node-7:4242 .*stop the first one"),
        mlflow_best.track(TinyNet(), None, resume=first.run_id, staging_dir=str(tmp_path / "other")),
    ):
        pytest.fail("refused")
    assert client.get_run(first.run_id).info.status == "RUNNING"  # the refusal changed nothing
    # Expired (the holder was killed and stopped renewing): the resume goes ahead.
    expired = json.dumps({"holder": "node-7:4242", "until_ms": int((time.time() - 1) * 1000)})
    client.set_tag(first.run_id, "mlflow_best.lease", expired)
    with mlflow_best.track(TinyNet(), None, resume=first.run_id, verbose=False) as again:
        again.log_epoch(1, {"val_loss": 0.5})
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert json.loads(client.get_run(first.run_id).data.tags["mlflow_best.lease"])["until_ms"] == 0


def test_folders_left_by_killed_writes_are_cleaned_at_the_next_start(
    sqlite_uri: str, tmp_path: Path
) -> None:
    root = tmp_path / "staging"
    def tracked() -> mlflow_best.Run:
        return mlflow_best.track(
            TinyNet(), None, experiment=unique("e"), staging_dir=str(root), verbose=False
        )

    with tracked() as old:
        old.log_epoch(0, {"val_loss": 1.0})
    checkpoints = root / old.run_id / "checkpoints"
    junk = [checkpoints / ".tmp-epoch=0003-abc", checkpoints / ".del-x"]
    for folder in junk:
        folder.mkdir(parents=True)
        (folder / "model.pt").write_bytes(b"\0" * 100_000)
    live = root / "someone-else-training"
    (live / "checkpoints" / ".tmp-epoch=0001-def").mkdir(parents=True)
    holder = StagingLock(live)
    assert holder.try_acquire()
    try:
        with tracked() as r:
            r.log_epoch(0, {"val_loss": 1.0})
    finally:
        holder.release()
    assert not any(folder.exists() for folder in junk)
    assert (live / "checkpoints" / ".tmp-epoch=0001-def").exists()  # a live writer's folder is left alone


DDP_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    import mlflow_best

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}", rank=rank, world_size=world)
    errors = []
    with mlflow_best.track(torch.nn.Linear(4, 2), None, experiment=sys.argv[3], verbose=False,
                           model_args={"in_features": 4, "out_features": 2}) as run:
        run.log_epoch(0, {"val_loss": 1.0})
        bad = "oops" if rank == 1 else 0.5  # only rank 1 passes a value that is not a number
        try:
            run.log_epoch(1, {"val_loss": bad})
        except mlflow_best.MetricError as e:
            errors.append(str(e))
        run.log_epoch(1, {"val_loss": 0.5})  # every rank goes on together: nobody is left in a collective
    dist.barrier()
    dist.destroy_process_group()
    with open(f"{sys.argv[2]}/rank{rank}.json", "w") as f:
        json.dump({"errors": errors, "best": run.best.epoch}, f)
    """
)


@pytest.mark.slow
def test_a_bad_metric_on_any_rank_raises_on_every_rank(sqlite_uri: str, tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER, encoding="utf-8")
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        with open(tmp_path / f"rank{rank}.log", "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, str(script), str(tmp_path / "init"), str(tmp_path), unique("ddp")],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, preexec_fn=die_with_parent,
            ))
    try:
        for rank, p in enumerate(procs):
            try:
                code = p.wait(timeout=180)
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {rank} hangs: {(tmp_path / f'rank{rank}.log').read_text()[-2000:]}")
            assert code == 0, (tmp_path / f"rank{rank}.log").read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(result["errors"]) == 1, (rank, result)
        assert re.match(r"rank 1: metric 'val_loss' is 'oops' \(str\), not a number", result["errors"][0])
        assert result["best"] == 1
