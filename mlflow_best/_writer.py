"""The background pipeline: training hands off, two threads write and upload, nothing is dropped.

    log_epoch ──▶ journal.jsonl (one line, page cache) ──▶ upload queue (ordered) ──▶ upload thread
        │                                                      ▲ waits for its checkpoint's file
        └─ snapshot (bounded pool) ──▶ disk thread: write + fsync + rename ──┘

Every operation is journaled before it is queued and marked in ``sent.jsonl`` once MLflow has it,
so a process that dies (or a server that never comes back) leaves a staging folder that
``mlflow_best.sync`` replays into the same run later.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from mlflow_best._checkpoint import ExtraFiles, write_checkpoint
from mlflow_best._errors import CheckpointError
from mlflow_best._state import Snapshot

JOURNAL = "journal.jsonl"
SENT = "sent.jsonl"


@dataclass
class MetricsOp:
    seq: int
    epoch: int
    metrics: dict[str, float]
    timestamp_ms: int
    type: Literal["metrics"] = "metrics"


@dataclass
class CheckpointOp:
    seq: int
    epoch: int
    metrics: dict[str, float]
    timestamp_ms: int
    kind: Literal["best", "last"]
    name: str
    value: float
    folder: str
    progress: dict[str, Any] = field(default_factory=dict)
    type: Literal["checkpoint"] = "checkpoint"


@dataclass
class TagsOp:
    seq: int
    tags: dict[str, str]
    type: Literal["tags"] = "tags"


@dataclass
class EndOp:
    seq: int
    status: str
    type: Literal["end"] = "end"


@dataclass
class ArtifactOp:
    """A small file of the staging folder (the run's metric plot) to log into the run's artifacts."""

    seq: int
    path: str
    artifact_path: str
    type: Literal["artifact"] = "artifact"


Op = MetricsOp | CheckpointOp | TagsOp | ArtifactOp | EndOp
_OP_TYPES: dict[str, type[Any]] = {
    "metrics": MetricsOp,
    "checkpoint": CheckpointOp,
    "tags": TagsOp,
    "artifact": ArtifactOp,
    "end": EndOp,
}


def describe(op: Op) -> str:
    if isinstance(op, MetricsOp):
        return f"metrics of epoch {op.epoch}"
    if isinstance(op, CheckpointOp):
        return f"{op.kind} checkpoint {op.name} (local copy: {op.folder})"
    if isinstance(op, TagsOp):
        return f"run tags {sorted(op.tags)}"
    if isinstance(op, ArtifactOp):
        return f"artifact {op.artifact_path}/{Path(op.path).name} (local copy: {op.path})"
    return f"run end (status {op.status})"


def read_unsent(staging: Path) -> list[Op]:
    """The journaled operations of a staging folder that MLflow has not confirmed, in order.

    A torn last line (a process killed mid-write) is skipped: that operation was never handed to the
    pipeline. Any other line that does not parse, or whose fields have the wrong types, or whose
    files lie outside the staging folder, is a ``CheckpointError`` naming the line and the field:
    replaying it could upload a file that is not the run's.
    """
    journal = staging / JOURNAL
    if not journal.is_file():
        return []
    sent: set[int] = set()
    if (staging / SENT).is_file():
        for line in (staging / SENT).read_text(encoding="utf-8").splitlines():
            try:
                sent.add(int(json.loads(line)["seq"]))
            except (ValueError, KeyError, TypeError, RecursionError):
                continue  # a torn last line from a killed process
    ops: list[Op] = []
    lines = journal.read_text(encoding="utf-8", errors="replace").splitlines()
    root = staging.resolve()
    for number, line in enumerate(lines, 1):
        try:
            raw = json.loads(line)
            op = _OP_TYPES[raw["type"]](**raw)
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            if number == len(lines):
                continue  # a torn last line: that operation was never handed to the pipeline
            raise CheckpointError(
                f"{journal} line {number} is not a journal record ({type(e).__name__}: {str(e)[:100]}); "
                "the staging folder was damaged or edited. Remove that line to replay the rest"
            ) from e
        _check_op(op, journal, number, root)
        if op.seq not in sent:
            ops.append(op)
    return ops


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "seq": int,
    "epoch": int,
    "metrics": dict,
    "timestamp_ms": int,
    "name": str,
    "value": (int, float),
    "folder": str,
    "tags": dict,
    "status": str,
    "path": str,
    "artifact_path": str,
}


def _check_op(op: Op, journal: Path, number: int, root: Path) -> None:
    for name, kind in _FIELD_TYPES.items():
        value = getattr(op, name, None)
        if hasattr(op, name) and (not isinstance(value, kind) or isinstance(value, bool)):
            raise CheckpointError(
                f"{journal} line {number}: field {name!r} is {str(value)[:80]!r}, expected "
                f"{getattr(kind, '__name__', kind)}; the staging folder was damaged or edited"
            )
    if isinstance(op, CheckpointOp) and op.kind not in ("best", "last"):
        raise CheckpointError(f"{journal} line {number}: field 'kind' is {op.kind!r}, expected best or last")
    inside = {"folder": root / "checkpoints"} if isinstance(op, CheckpointOp) else (
        {"path": root} if isinstance(op, ArtifactOp) else {}
    )
    for name, parent in inside.items():
        target = Path(getattr(op, name)).resolve()
        if not target.is_relative_to(parent) or target == parent:
            raise CheckpointError(
                f"{journal} line {number}: field {name!r} names {getattr(op, name)!r}, which is outside the "
                f"run's staging folder {parent}; only files inside it are ever uploaded. Refused"
            )


class Journal:
    """Append-only record of operations and of which ones reached MLflow."""

    def __init__(self, staging: Path) -> None:
        staging.mkdir(parents=True, exist_ok=True)
        self.staging = staging
        self._seq = self._max_seq(staging)
        self._ops = open(staging / JOURNAL, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._sent = open(staging / SENT, "a", encoding="utf-8")  # noqa: SIM115
        self._lock = threading.Lock()
        self._failed = False

    @staticmethod
    def _max_seq(staging: Path) -> int:
        path = staging / JOURNAL
        if not path.is_file():
            return 0
        top = 0
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                top = max(top, int(json.loads(line)["seq"]))
            except (ValueError, KeyError, TypeError):
                continue
        return top

    def next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def record(self, op: Op) -> None:
        line = json.dumps({k: v for k, v in asdict(op).items() if k != "progress"}) + "\n"
        self._append(self._ops, line)  # into the page cache: survives the process, costs a syscall

    def mark_sent(self, op: Op) -> None:
        self._append(self._sent, json.dumps({"seq": op.seq}) + "\n")

    def _append(self, f: Any, line: str) -> None:
        # A full or failing disk must not stop training: the operation still goes to MLflow from
        # memory; only its crash-safety copy is missing, which is said once.
        with self._lock:
            try:
                f.write(line)
                f.flush()
            except OSError as e:
                if not self._failed:
                    self._failed = True
                    warnings.warn(
                        f"mlflow_best: cannot write the journal in {self.staging} ({e}); training goes on "
                        "and MLflow still gets everything, but a crash now could lose unsent metrics. "
                        "Free disk space or pass staging_dir= elsewhere.",
                        RuntimeWarning,
                        stacklevel=4,
                    )

    def close(self) -> None:
        for f in (self._ops, self._sent):
            # A full disk was already warned about in _append; what MLflow has is not affected.
            with contextlib.suppress(OSError):
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(OSError):
                f.close()


@dataclass
class _DiskJob:
    snapshot: Snapshot
    parent: Path
    name: str
    meta: dict[str, Any]
    done: Future[Path]


_STOP = object()


class Pipeline:
    """Two daemon threads: one writes checkpoints to disk, one sends operations to MLflow in order."""

    def __init__(
        self,
        journal: Journal,
        publish: Callable[[Op], None],
        on_warning: Callable[[str], None] | None = None,
        extra_files: ExtraFiles | None = None,
    ) -> None:
        self.journal = journal
        self._publish = publish
        self._extra_files = extra_files
        self._warn = on_warning or (lambda msg: warnings.warn(msg, RuntimeWarning, stacklevel=2))
        self._disk_q: queue.Queue[Any] = queue.Queue()
        self._up_q: queue.Queue[Any] = queue.Queue()
        self._written: dict[int, Future[Path]] = {}
        self._closing = threading.Event()
        self._deadline = float("inf")
        self.offline_since: float | None = None
        self.pending: list[Op] = []
        self._in_flight = 0
        self._count_lock = threading.Lock()
        self._disk = threading.Thread(target=self._disk_loop, name="mlflow_best-disk", daemon=True)
        self._upload = threading.Thread(target=self._upload_loop, name="mlflow_best-upload", daemon=True)
        self._disk.start()
        self._upload.start()

    # -- producer side (training thread) ---------------------------------------------------------
    def submit(self, op: Op) -> None:
        self.journal.record(op)
        with self._count_lock:
            self._in_flight += 1
        self._up_q.put(op)

    def submit_checkpoint(self, op: CheckpointOp, snapshot: Snapshot, meta: dict[str, Any]) -> None:
        done: Future[Path] = Future()
        self._written[op.seq] = done
        folder = Path(op.folder)
        self._disk_q.put(_DiskJob(snapshot, folder.parent, folder.name, meta, done))
        self.submit(op)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # -- threads ---------------------------------------------------------------------------------
    def _disk_loop(self) -> None:
        while (job := self._disk_q.get()) is not _STOP:
            try:
                job.snapshot.ready()
                snap = job.snapshot
                path = write_checkpoint(
                    job.parent, job.name, snap.model, snap.training, job.meta, extra=self._extra_files
                )
                job.done.set_result(path)
            except BaseException as e:  # surfaced by the upload thread as a warning, never swallowed
                job.done.set_exception(e)
            finally:
                job.snapshot.release()

    def _upload_loop(self) -> None:
        while (op := self._up_q.get()) is not _STOP:
            if isinstance(op, CheckpointOp) and op.seq in self._written:
                try:
                    self._written.pop(op.seq).result()
                except BaseException as e:
                    self._warn(
                        f"mlflow_best: the checkpoint of epoch {op.epoch} ({op.name}) could not be written "
                        f"to {op.folder}: {e!r}. It is missing from MLflow; the previous best checkpoint "
                        "stays intact and restorable. Free disk space or pass staging_dir= elsewhere."
                    )
                    op = MetricsOp(op.seq, op.epoch, op.metrics, op.timestamp_ms)
            if not self._send(op):
                self.pending.append(op)
                self._drain_pending()
                return
            if isinstance(op, CheckpointOp) and op.kind == "best":
                # MLflow has it now; the staged copy only costs disk ("last" stays: it is replaced).
                discard_folder(Path(op.folder))
            with self._count_lock:
                self._in_flight -= 1

    def _send(self, op: Op) -> bool:
        delay = 0.25
        while True:
            try:
                self._publish(op)
                self.journal.mark_sent(op)
                if self.offline_since is not None:
                    gap = time.monotonic() - self.offline_since
                    print(f"mlflow_best: tracking store reachable again after {gap:.0f} s", file=sys.stderr)
                    self.offline_since = None
                return True
            except Exception as e:
                now = time.monotonic()
                if self.offline_since is None:
                    self.offline_since = now
                    self._warn(
                        f"mlflow_best: could not send {describe(op)} to MLflow ({_short(e)}); training "
                        "goes on, everything is kept in the local staging folder "
                        f"{self.journal.staging} and retried until the run ends"
                    )
                if self._closing.is_set() and now >= self._deadline:
                    return False
                time.sleep(min(delay, max(0.05, self._deadline - now)))
                delay = min(delay * 2, 5.0)

    def _drain_pending(self) -> None:
        while True:
            item = self._up_q.get()
            if item is _STOP:
                return
            if isinstance(item, CheckpointOp) and item.seq in self._written:
                try:
                    self._written.pop(item.seq).result()
                except BaseException:
                    # Never written: only its metrics are left to send (sync does the same).
                    item = MetricsOp(item.seq, item.epoch, item.metrics, item.timestamp_ms)
            self.pending.append(item)

    # -- shutdown ---------------------------------------------------------------------------------
    def close(self, offline_timeout: float, progress: Callable[[int, float], None] | None = None) -> list[Op]:
        """Finish every write and upload; give up on MLflow after ``offline_timeout`` s without it.

        Returns the operations that did not reach MLflow (they stay journaled for ``sync``).
        """
        start = time.monotonic()
        self._disk_q.put(_STOP)
        self._up_q.put(_STOP)
        self._deadline = start + offline_timeout
        self._closing.set()
        last_report = start
        while self._upload.is_alive():
            self._upload.join(timeout=0.1)
            now = time.monotonic()
            if progress is not None and now - last_report >= 1.0:
                progress(self._in_flight, now - start)
                last_report = now
            if self.offline_since is None:
                # Still talking to MLflow: the deadline only counts while it is unreachable.
                self._deadline = now + offline_timeout
        self._disk.join()
        self.journal.close()
        return self.pending


def discard_folder(folder: Path) -> None:
    """Delete a staged checkpoint folder; renamed to a dot-name first, so a process killed mid-delete
    never leaves a partial folder under a checkpoint's name (dot-names are never read as one)."""
    trash = folder.with_name(f".del-{folder.name}-{os.getpid()}-{threading.get_ident()}")
    try:
        os.replace(folder, trash)
    except OSError:
        return  # already gone
    shutil.rmtree(trash, ignore_errors=True)


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else type(error).__name__
    return first[:200]
