"""SIGKILL at random points of checkpoint writes and uploads: what restore returns is always whole.

A child process trains a model whose every weight equals the epoch number, so a restored model
shows at a glance which epoch it comes from and whether its files were mixed or half-written.
Every even epoch improves and every odd one writes the rolling "last" checkpoint, so a write or an
upload is in progress at almost any instant. Once the child's first checkpoint is in MLflow, each
kill aims in turn at a checkpoint write (a ``.tmp-*`` folder exists), at pending uploads (the journal
holds a written checkpoint not yet sent) or at a random moment; where it really landed is read from
the staging folder once the child is dead, and the loop asserts that both kinds occurred.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

import mlflow_best
from mlflow_best._checkpoint import verify_checkpoint
from mlflow_best._config import home
from mlflow_best._staging import CheckpointOp, read_unsent
from tests._server import LineReader, die_with_parent
from tests.helpers import unique

pytestmark = pytest.mark.slow

KILLS = 20

# A zygote: it imports torch and mlflow_best once (seconds on 2 cores), then forks one training
# process per kill, so the loop spends its time killing rather than importing. The forked child is
# what gets SIGKILLed; it talks to the store named by MLFLOW_TRACKING_URI, inherited from the test.
CHILD = textwrap.dedent(
    """
    import os, sys, time
    import mlflow
    import torch
    import mlflow_best

    def train(experiment, name):
        model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.Linear(2048, 512))  # 8 MB
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with mlflow_best.track(model, opt, experiment=experiment, registered_model=name, save_last=True,
                               verbose=False) as run:
            print("run", run.run_id, flush=True)
            for epoch in range(100_000):
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(float(epoch))
                        opt.state[p]["momentum_buffer"] = torch.full_like(p, float(epoch))
                # Announced before log_epoch: nothing newer can exist on disk or in MLflow.
                print("log", epoch, flush=True)
                # Odd epochs are worse: they write the rolling "last" checkpoint instead.
                run.log_epoch(epoch, {"val_loss": 1000.0 - epoch if epoch % 2 == 0 else 5000.0})
                time.sleep(0.05)

    # Warm up against a throwaway store: MLflow imports and initialises much of itself lazily, and
    # every forked child would pay for it again (seconds) before its first checkpoint.
    store = os.environ["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(sys.argv[1])
    with mlflow_best.track(torch.nn.Linear(2, 2), None, registered_model="warm-up", verbose=False) as run:
        run.log_epoch(0, {"val_loss": 1.0})
    mlflow.set_tracking_uri(store)
    print("ready", flush=True)
    for command in sys.stdin:
        experiment, name = command.split()
        pid = os.fork()
        if pid == 0:
            try:
                train(experiment, name)
            finally:
                os._exit(1)  # only reached if training itself failed: the test kills this process
        print("child", pid, flush=True)
        os.waitpid(pid, 0)
        print("reaped", pid, flush=True)
    """
)


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.Linear(2048, 512))


@dataclass
class _Kill:
    """What one kill left behind, as checked by the parent."""

    aimed_at: str
    last_logged: int
    restored_epoch: int
    after_sync_epoch: int
    during_write: bool
    unsent_checkpoints: int
    staged_folders: int
    registered_ahead_of_tags: bool
    seconds: dict[str, float]

    @property
    def during_upload(self) -> bool:
        return self.unsent_checkpoints > 0


AIMS = ("write", "upload", "random")


def _writing(staging: Path) -> bool:
    """A checkpoint is being written: its temporary folder exists (renamed into place when whole)."""
    folder = staging / "checkpoints"
    try:
        return any(p.name.startswith(".tmp-") for p in folder.iterdir())
    except OSError:
        return False


def _uploads_pending(staging: Path) -> bool:
    """A checkpoint is journaled and not yet confirmed by MLflow."""
    try:
        return any(isinstance(op, CheckpointOp) for op in read_unsent(staging))
    except (OSError, ValueError):
        return False  # read while the child appends: try again


def _journaled_sent_best(staging: Path) -> list[int]:
    """Epochs of the best checkpoints the journal marks as sent (MLflow confirmed every call)."""
    unsent = {op.seq for op in read_unsent(staging)}
    epochs = []
    for line in (staging / "journal.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            raw = json.loads(line)
        except ValueError:
            continue  # the torn last line of a killed write
        if raw.get("type") == "checkpoint" and raw.get("kind") == "best" and raw["seq"] not in unsent:
            epochs.append(int(raw["epoch"]))
    return epochs


def _staged_folders_are_whole(staging: Path) -> tuple[int, bool]:
    """Every checkpoint folder under its final name verifies; only dot-prefixed temporaries may not."""
    folders = 0
    tmp = False
    for sub in sorted((staging / "checkpoints").glob("*")) if (staging / "checkpoints").is_dir() else []:
        if sub.name.startswith("."):
            # .tmp-*: a write interrupted before its atomic rename; .del-*: an interrupted delete.
            # Neither is ever read as a checkpoint.
            tmp = tmp or sub.name.startswith(".tmp-")
            continue
        if sub.name.endswith(".old"):
            continue  # the previous "last", kept until the new one is renamed into place
        verify_checkpoint(sub)  # raises CheckpointError for a half-written folder
        folders += 1
    return folders, tmp


def _check_restored(ref: str, uri: str, last_logged: int) -> int:
    restored = mlflow_best.restore(ref, model=_model(), tracking_uri=uri)
    epoch = restored.epoch
    assert 0 <= epoch <= last_logged, (
        f"restored epoch {epoch} is newer than the kill (last logged {last_logged})"
    )
    assert epoch % 2 == 0, "restore(run_id) returns the best checkpoint, and only even epochs improve"
    for name, tensor in restored.model.state_dict().items():
        assert torch.all(tensor == float(epoch)), f"{name} holds weights of another epoch than {epoch}"
    assert torch.all(restored.training_state["optimizer"]["state"][0]["momentum_buffer"] == float(epoch))
    verify_checkpoint(restored.path)
    return epoch


def _proc_state(pid: int) -> str:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError as e:
        return f"gone ({e})"
    state = next((line for line in status.splitlines() if line.startswith("State:")), "State: ?")
    return f"{state}, wchan {wchan}"


def _one_kill(
    zygote: subprocess.Popen[str], reader: LineReader, uri: str, rng: random.Random, aim: str
) -> _Kill:
    experiment, name = unique("kill"), unique("kill")
    client = MlflowClient(uri)
    assert zygote.stdin is not None
    zygote.stdin.write(f"{experiment} {name}\n")
    zygote.stdin.flush()
    pid, run_id, last_logged = 0, "", -1
    t0 = time.monotonic()
    seconds: dict[str, float] = {}
    kill_at: float | None = None
    aim_until = math.inf
    deadline = time.monotonic() + 60
    next_poll = time.monotonic()
    while kill_at is None or time.monotonic() < kill_at:
        now = time.monotonic()
        if now > deadline:
            pytest.fail(f"no checkpoint reached MLflow in 60 s (run {run_id})")
        if kill_at is None and run_id and now >= next_poll:
            # Poll the store: kill only once a checkpoint has fully reached MLflow (the run's best
            # tags are written last), so there is always a newest complete one for restore to find.
            if "mlflow_best.best_epoch" in client.get_run(run_id).data.tags:
                kill_at = now + rng.uniform(0.0, 2.0) if aim == "random" else math.inf
                aim_until = now + 10.0  # an aim not met by then kills anyway (classified below)
                seconds["first checkpoint"] = now - t0
            next_poll = now + 0.2
        if kill_at == math.inf:
            staging = home() / "runs" / run_id
            writing = _writing(staging)
            # An upload aim waits for a moment between two writes.
            between_writes = not writing and aim == "upload" and _uploads_pending(staging)
            if (aim == "write" and writing) or between_writes:
                break  # aimed: kill now
            if now > aim_until:
                break
        try:
            line = reader.next(timeout=0.05 if kill_at is None or aim == "random" else 0.002)
        except TimeoutError:
            continue
        if line is None:
            pytest.fail(f"the zygote exited ({zygote.wait()})")
        word, _, rest = line.partition(" ")
        if word == "child":
            pid = int(rest)
        elif word == "run":
            run_id = rest
        elif word == "log":
            last_logged = int(rest)
        elif word == "reaped" and pid and rest == str(pid):
            pytest.fail(f"training process {rest} exited by itself; see the zygote's log")
    os.kill(pid, signal.SIGKILL)
    while True:
        try:
            line = reader.next(timeout=60)
        except TimeoutError:
            state = _proc_state(pid)
            if state.startswith("gone"):
                # Reaped (its /proc entry is gone) but the line was not recognised: the kill itself
                # happened, which is all the checks below need.
                break
            zygote_state = _proc_state(zygote.pid)
            pytest.fail(f"SIGKILLed pid {pid} was not reaped in 60 s: {state}; zygote {zygote_state}")
        assert line is not None, "the zygote exited"
        # endswith: a child killed in the middle of a print leaves a partial line that the zygote's
        # next line is appended to.
        if line.endswith(f"reaped {pid}"):
            break
        if line.startswith("log "):
            last_logged = int(line.split()[1])  # printed before the kill, read after it

    seconds["until kill"] = time.monotonic() - t0
    staging = home() / "runs" / run_id
    folders, during_write = _staged_folders_are_whole(staging)
    unsent = [op for op in read_unsent(staging) if isinstance(op, CheckpointOp)]
    restored = _check_restored(run_id, uri, last_logged)
    # The newest checkpoint that fully reached MLflow, read from the store and the journal, not from
    # restore: the run's best tags are the last record a publish writes, after the READY LoggedModel
    # and its version; nothing the journal marks as sent may be newer than what restore returns.
    tags = client.get_run(run_id).data.tags
    newest = int(tags["mlflow_best.best_epoch"])
    tagged = client.get_logged_model(tags["mlflow_best.best_model_id"])
    assert str(tagged.status).endswith("READY") and tagged.tags["epoch"] == str(newest)
    by_epoch = {v.tags["epoch"]: v for v in client.search_model_versions(f"name='{name}'")}
    assert by_epoch[str(newest)].tags["sha256"] == tags["mlflow_best.best_sha256"]
    assert restored == newest, f"restored epoch {restored}; MLflow's newest complete checkpoint is {newest}"
    assert max(_journaled_sent_best(staging), default=0) <= restored
    # A kill between registering a version and writing the run's tags leaves a version that is
    # newer than the run's best (counted: the publish is completed by sync).
    ahead = any(int(e) > newest for e in by_epoch)
    # Upload what the killed process could not, into the same run; restore again.
    mlflow_best.sync(run_id)
    assert read_unsent(staging) == []
    after = _check_restored(run_id, uri, last_logged)
    assert after >= restored
    versions = client.search_model_versions(f"name='{name}'")
    per_epoch = Counter(v.tags["epoch"] for v in versions)
    assert all(n == 1 for n in per_epoch.values()), f"a checkpoint was registered twice: {per_epoch}"
    assert max(int(e) for e in per_epoch) == after
    seconds["total"] = time.monotonic() - t0
    return _Kill(aim, last_logged, restored, after, during_write, len(unsent), folders, ahead, seconds)


def test_sigkill_at_random_points_never_yields_a_half_written_checkpoint(
    sqlite_uri: str, tmp_path: Path
) -> None:
    script = tmp_path / "zygote.py"
    script.write_text(CHILD, encoding="utf-8")
    log = tmp_path / "zygote.log"
    rng = random.Random(20)
    with open(log, "wb") as err:
        zygote = subprocess.Popen(
            [sys.executable, str(script), f"sqlite:///{tmp_path / 'warm-up.db'}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, cwd=tmp_path,
            preexec_fn=die_with_parent,
        )
    reader = LineReader(zygote)
    kills: list[_Kill] = []
    try:
        assert reader.next(timeout=120) == "ready", log.read_text()[-3000:]
        for i in range(KILLS):
            kills.append(_one_kill(zygote, reader, sqlite_uri, rng, AIMS[i % len(AIMS)]))
    except BaseException:
        print(log.read_text()[-5000:])
        raise
    finally:
        zygote.kill()
        zygote.wait()
    during_write = sum(k.during_write for k in kills)
    during_upload = sum(k.during_upload for k in kills)
    mean = {key: sum(k.seconds[key] for k in kills) / len(kills) for key in kills[0].seconds}
    each = [
        (k.aimed_at, k.during_write, k.during_upload, k.last_logged, k.restored_epoch, k.after_sync_epoch)
        for k in kills
    ]
    print(
        f"\nkill loop: {len(kills)} kills, {len(kills)} verified restores before sync and after it; "
        f"{during_write} kills landed during a checkpoint write, {during_upload} while uploads were "
        f"pending ({sum(k.during_write and k.during_upload for k in kills)} both, "
        f"{sum(not k.during_write and not k.during_upload for k in kills)} neither); "
        f"{sum(k.registered_ahead_of_tags for k in kills)} between a version and the run's tags; "
        f"mean seconds per kill {', '.join(f'{k} {v:.1f}' for k, v in mean.items())}\n"
        f"(aimed at, during write, during upload, last epoch logged, restored, restored after sync): "
        f"{each}"
    )
    # The loop proves something only if its kills landed where it claims: in writes and in uploads.
    assert during_write >= 1, "no kill landed during a checkpoint write"
    assert during_upload >= 1, "no kill landed while uploads were pending"
