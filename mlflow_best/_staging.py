"""The staging folder of a run, written and read here only.

    <staging root>/<run_id>/
        run.json          what ``sync`` needs to replay into the same run (written atomically)
        journal.jsonl     one line per operation, appended before it is queued
        sent.jsonl        {"seq": n} once MLflow has operation n; {"seq": n, "rejected": why} if refused
        lock              held (flock) by the one process that writes this folder: a training run or ``sync``
        checkpoints/      one folder per checkpoint; ``.tmp-*`` / ``.del-*`` are half-written / half-deleted
        plots/            the metric plot logged at the end

A journal line is a record of one of the operation types below; every field is checked when read
back, and a file a record names must lie inside the folder: replaying a hostile or damaged journal
never uploads anything that is not the run's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from mlflow_best._cache import tree_size
from mlflow_best._config import home
from mlflow_best._errors import CheckpointError, ConfigError
from mlflow_best._files import write_atomically

JOURNAL = "journal.jsonl"
SENT = "sent.jsonl"
RUN_FILE = "run.json"
LOCK_FILE = "lock"
CHECKPOINTS = "checkpoints"
_LEFTOVER_PREFIXES = (".tmp-", ".del-")


def staging_root(staging_dir: str | os.PathLike[str] | None) -> Path:
    """The folder that holds one staging folder per run: ``staging_dir=``, else ``$MLFLOW_BEST_HOME/runs``."""
    return Path(staging_dir) if staging_dir else home() / "runs"


# -- operations --------------------------------------------------------------------------------
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
    """One line naming an operation for a warning or an error ("metrics of epoch 3", ...)."""
    if isinstance(op, MetricsOp):
        return f"metrics of epoch {op.epoch}"
    if isinstance(op, CheckpointOp):
        return f"{op.kind} checkpoint {op.name} (local copy: {op.folder})"
    if isinstance(op, TagsOp):
        return f"run tags {sorted(op.tags)}"
    if isinstance(op, ArtifactOp):
        return f"artifact {op.artifact_path}/{Path(op.path).name} (local copy: {op.path})"
    return f"run end (status {op.status})"


def as_metrics(op: CheckpointOp) -> MetricsOp:
    """What is left to send of a checkpoint whose files were never completely written: its epoch's metrics."""
    return MetricsOp(op.seq, op.epoch, op.metrics, op.timestamp_ms)


# -- the journal -------------------------------------------------------------------------------
def _sent_records(staging: Path) -> dict[int, str | None]:
    """seq -> None (sent) or MLflow's reason (rejected), from ``sent.jsonl``."""
    done: dict[int, str | None] = {}
    path = staging / SENT
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            raw = json.loads(line)
            seq = int(raw["seq"])
        except (ValueError, KeyError, TypeError, RecursionError):
            continue  # a torn last line from a killed process
        reason = raw.get("rejected") if isinstance(raw, dict) else None
        done[seq] = str(reason) if reason is not None else None
    return done


def read_journal(staging: Path) -> list[Op]:
    """Every operation journaled in a staging folder, in order, each checked field by field.

    A torn last line (a process killed mid-write) is skipped: that operation was never handed to the
    pipeline. Any other line that does not parse, or whose fields have the wrong types, or whose
    files lie outside the staging folder, is a ``CheckpointError`` naming the line and the field:
    replaying it could upload a file that is not the run's.
    """
    journal = staging / JOURNAL
    if not journal.is_file():
        return []
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
        ops.append(op)
    return ops


def read_unsent(staging: Path) -> list[Op]:
    """The journaled operations that MLflow has neither confirmed nor refused, in order."""
    done = _sent_records(staging)
    return [op for op in read_journal(staging) if op.seq not in done]


def read_rejected(staging: Path) -> list[tuple[Op, str]]:
    """The journaled operations MLflow refused, with its reason, in order."""
    done = _sent_records(staging)
    return [(op, reason) for op in read_journal(staging) if (reason := done.get(op.seq)) is not None]


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
    inside = {"folder": root / CHECKPOINTS} if isinstance(op, CheckpointOp) else (
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
    """Append-only record of operations and of which ones MLflow took or refused."""

    def __init__(self, staging: Path, on_warning: Any = None) -> None:
        staging.mkdir(parents=True, exist_ok=True)
        self.staging = staging
        self._seq = self._max_seq(staging)
        self._ops = open(staging / JOURNAL, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._sent = open(staging / SENT, "a", encoding="utf-8")  # noqa: SIM115
        self._lock = threading.Lock()
        self._failed = False
        self._on_warning = on_warning

    @staticmethod
    def _max_seq(staging: Path) -> int:
        path = staging / JOURNAL
        if not path.is_file():
            return 0
        top = 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                top = max(top, int(json.loads(line)["seq"]))
            except (ValueError, KeyError, TypeError, RecursionError):
                continue
        return top

    def set_warning_sink(self, sink: Any) -> None:
        """Where the journal's one disk-full warning goes (the pipeline's notices, from its threads)."""
        self._on_warning = sink

    def next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def record(self, op: Op) -> None:
        line = json.dumps({k: v for k, v in asdict(op).items() if k != "progress"}) + "\n"
        self._append(self._ops, line)  # into the page cache: survives the process, costs a syscall

    def mark_sent(self, ops: Sequence[Op]) -> None:
        self._append(self._sent, "".join(json.dumps({"seq": op.seq}) + "\n" for op in ops))

    def mark_rejected(self, op: Op, reason: str) -> None:
        self._append(self._sent, json.dumps({"seq": op.seq, "rejected": reason[:2000]}) + "\n")

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
                    message = (
                        f"mlflow_best: cannot write the journal in {self.staging} ({e}); training goes on "
                        "and MLflow still gets everything, but a crash now could lose unsent metrics. "
                        "Free disk space or pass staging_dir= elsewhere."
                    )
                    if self._on_warning is not None:
                        self._on_warning(message)
                    else:
                        warnings.warn(message, RuntimeWarning, stacklevel=4)

    def close(self) -> None:
        for f in (self._ops, self._sent):
            # A full disk was already warned about in _append; what MLflow has is not affected.
            with contextlib.suppress(OSError):
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(OSError):
                f.close()


# -- run.json ----------------------------------------------------------------------------------
def write_run_file(staging: Path, info: dict[str, Any]) -> None:
    """Write ``run.json`` atomically (temp file, fsync, rename): a kill never leaves half of it."""
    text = json.dumps(info, indent=2)
    write_atomically(staging / RUN_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync=True)


def read_run_file(staging: Path) -> dict[str, Any]:
    """``run.json`` of a staging folder; a damaged one is a ``CheckpointError`` that says what to do."""
    path = staging / RUN_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(info, dict) or not isinstance(info.get("run_id"), str):
            raise ValueError("no 'run_id' string")
        for key in ("experiment_id", "monitor", "mode"):
            if not isinstance(info.get(key), str):
                raise ValueError(f"no {key!r} string")
    except (ValueError, RecursionError) as e:
        raise CheckpointError(
            f"{path} is damaged ({e}); it records which run and tracking store the staging folder "
            f"belongs to. Restore it from a backup, or rewrite it with the run's run_id, experiment_id, "
            "tracking_uri, monitor and mode"
        ) from e
    return info


# -- one writer per staging folder -------------------------------------------------------------
class StagingLock:
    """An exclusive ``flock`` on ``<staging>/lock``: one process writes a staging folder at a time.

    The kernel drops the lock when its holder dies, so a killed run never blocks the next one; the
    file names the holder (host, pid, since) for the message given to whoever is refused.
    """

    def __init__(self, staging: Path) -> None:
        self.staging = staging
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            raw = json.loads((self.staging / LOCK_FILE).read_text(encoding="utf-8"))
            return f"process {raw['pid']} on {raw['host']} (since {raw['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def try_acquire(self) -> bool:
        self.staging.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.staging / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        text = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)
        self._fd = fd
        return True

    def acquire(self, what: str, fix: str) -> None:
        """Take the lock or raise ``ConfigError`` naming its holder (``what``, ``fix`` word the message)."""
        if not self.try_acquire():
            raise ConfigError(
                f"{what}: its staging folder {self.staging} is in use by {self.holder()}, which is still "
                f"running. {fix}"
            )

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def leftovers(staging: Path) -> list[Path]:
    """Half-written (``.tmp-*``) and half-deleted (``.del-*``) folders a killed process left behind."""
    found: list[Path] = []
    for sub in (staging / CHECKPOINTS, staging):
        with contextlib.suppress(OSError):
            found.extend(p for p in sub.iterdir() if p.name.startswith(_LEFTOVER_PREFIXES))
    return found


def sweep(root: Path, *, held: Path | None = None) -> int:
    """Remove what killed writes left in every staging folder under ``root`` that no live process holds.

    ``held`` is a staging folder whose lock the caller already holds (swept without asking again).
    Returns the number of bytes freed.
    """
    freed = 0
    try:
        folders = [p for p in root.iterdir() if p.is_dir()]
    except OSError:
        return 0
    for staging in folders:
        junk = leftovers(staging)
        if not junk:
            continue
        lock = StagingLock(staging)
        if staging != held and not lock.try_acquire():
            continue  # a live writer: its .tmp-* may be the checkpoint it is writing now
        try:
            for path in junk:
                freed += tree_size(path)
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        path.unlink()
        finally:
            lock.release()
    return freed


def discard_folder(folder: Path) -> None:
    """Delete a staged checkpoint folder; renamed to a dot-name first, so a process killed mid-delete
    never leaves a partial folder under a checkpoint's name (dot-names are never read as one)."""
    trash = folder.with_name(f".del-{folder.name}-{os.getpid()}-{threading.get_ident()}")
    try:
        os.replace(folder, trash)
    except OSError:
        return  # already gone
    shutil.rmtree(trash, ignore_errors=True)
