"""The background pipeline: training hands off, two threads write and upload, nothing is dropped.

    log_epoch ──▶ journal.jsonl (one line, page cache) ──▶ upload queue (ordered) ──▶ upload thread
        │                                                      ▲ waits for its checkpoint's file
        └─ snapshot (bounded pool) ──▶ disk thread: write + fsync + rename ──┘

Every operation is journaled before it is queued and marked in ``sent.jsonl`` once MLflow has it
(or refused it), so a process that dies (or a server that never comes back) leaves a staging folder
that ``mlflow_best.sync`` replays into the same run later. The folder's format lives in
``_staging``; how an item is sent, retried, refused and coalesced lives in ``_replay``, which the
upload thread, the final flush and ``sync`` share.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow_best._checkpoint import ExtraFiles, write_checkpoint
from mlflow_best._replay import Notices, Replayed, Sender, coalesce, replay
from mlflow_best._staging import CheckpointOp, Journal, MetricsOp, Op, as_metrics, discard_folder
from mlflow_best._state import Snapshot


@dataclass
class _DiskJob:
    snapshot: Snapshot
    parent: Path
    name: str
    meta: dict[str, Any]
    done: Future[Path]


_STOP = object()


class Pipeline:
    """Two daemon threads: one writes checkpoints to disk, one sends operations to MLflow in order.

    Neither thread can die silently: each catches everything at its top level, and the training
    thread hears of a death at its next ``log_epoch`` (``check``) or at ``close``, which then sends
    what is left itself. Warnings from the threads are collected (``notices``) and emitted by the
    training thread, so a ``-W error`` filter cannot kill a thread.
    """

    def __init__(
        self,
        journal: Journal,
        publish: Callable[[Sequence[Op]], None],
        extra_files: ExtraFiles | None = None,
        replay_first: Sequence[Op] = (),
        heartbeat: Callable[[], object] | None = None,
        heartbeat_every: float = 60.0,
    ) -> None:
        self.journal = journal
        self.notices = Notices()
        journal.set_warning_sink(self.notices.add)
        self._sender = Sender(journal, publish, self.notices)
        self._extra_files = extra_files
        self._disk_q: queue.Queue[Any] = queue.Queue()
        self._up_q: queue.Queue[Any] = queue.Queue()
        self._head: list[Any] = []  # taken from the queue, not yet done: survives a dead thread
        self._written: dict[int, Future[Path]] = {}
        self._closing = threading.Event()
        self._deadline = float("inf")
        self._offline = False  # gave up: the rest is kept for sync
        self.pending: list[Op] = []
        self.died: tuple[str, BaseException] | None = None
        self._in_flight = 0
        self._count_lock = threading.Lock()
        self._heartbeat = heartbeat
        self._heartbeat_every = heartbeat_every
        self._next_beat = time.monotonic() + heartbeat_every
        for op in replay_first:  # the leftovers of an earlier process go first, in their order
            self._count(+1)
            self._up_q.put(op)
        self._disk = threading.Thread(target=self._disk_loop, name="mlflow_best-disk", daemon=True)
        self._upload = threading.Thread(target=self._upload_loop, name="mlflow_best-upload", daemon=True)
        self._disk.start()
        self._upload.start()

    # -- producer side (training thread) ---------------------------------------------------------
    def submit(self, op: Op) -> None:
        self.journal.record(op)
        self._count(+1)
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

    @property
    def offline_since(self) -> float | None:
        return self._sender.offline_since

    @property
    def rejected(self) -> list[tuple[Op, str]]:
        return list(self._sender.rejected)

    @property
    def calls(self) -> int:
        """MLflow calls made by the upload thread so far (a coalesced batch is one)."""
        return self._sender.calls

    def check(self) -> str | None:
        """Why a background thread died, if one did (the training thread then raises)."""
        if self.died is None:
            return None
        where, error = self.died
        return f"the {where} thread stopped ({type(error).__name__}: {error})"

    def _count(self, delta: int) -> None:
        with self._count_lock:
            self._in_flight += delta

    # -- threads ---------------------------------------------------------------------------------
    def _disk_loop(self) -> None:
        try:
            while (job := self._disk_q.get()) is not _STOP:
                try:
                    job.snapshot.ready()
                    snap = job.snapshot
                    path = write_checkpoint(
                        job.parent, job.name, snap.model, snap.training, job.meta, extra=self._extra_files
                    )
                    job.done.set_result(path)
                except BaseException as e:  # reported by the upload thread, never swallowed
                    job.done.set_exception(e)
                finally:
                    job.snapshot.release()
        except BaseException as e:
            self.died = ("disk", e)
            # Nothing will write the jobs still queued: their uploads must not wait for ever.
            while True:
                try:
                    job = self._disk_q.get_nowait()
                except queue.Empty:
                    break
                if job is not _STOP and not job.done.done():
                    job.done.set_exception(RuntimeError("the disk thread stopped before writing it"))

    def _upload_loop(self) -> None:
        try:
            self._uploads()
        except BaseException as e:
            self.died = ("upload", e)

    def _next(self, block: bool) -> Any:
        """The next item: first what an earlier pass took and did not finish, then the queue."""
        if self._head:
            return self._head[0]
        while True:
            try:
                timeout = max(0.05, self._next_beat - time.monotonic()) if block else None
                item = self._up_q.get(block=block, timeout=timeout)
            except queue.Empty:
                if not block:
                    return None
                self._beat()
                continue
            self._head.append(item)
            return item

    def _beat(self) -> None:
        now = time.monotonic()
        if self._heartbeat is None or now < self._next_beat:
            return
        self._next_beat = now + self._heartbeat_every
        with contextlib.suppress(Exception):  # a missed heartbeat only shortens the lease
            self._heartbeat()

    def _pull(self) -> Any:
        """One more waiting item into ``_head`` without blocking (None when nothing waits)."""
        try:
            item = self._up_q.get_nowait()
        except queue.Empty:
            return None
        self._head.append(item)
        return item

    def _uploads(self) -> None:
        while (item := self._next(block=True)) is not _STOP:
            self._beat()
            op = self._head[0] = self._ready(item)
            if self._offline:
                self.pending.append(op)
                del self._head[0]
                self._count(-1)
                continue
            index = 1

            def more() -> Op | None:
                # Metric items right behind this one join its call; anything else stays queued first.
                nonlocal index
                if index >= len(self._head) and self._pull() is None:
                    return None
                nxt = self._head[index]
                if not isinstance(nxt, MetricsOp):
                    return None
                index += 1
                return nxt

            batch, _ = coalesce(op, more)
            outcomes = self._sender.send(batch, self._give_up)
            for done, outcome in zip(batch, outcomes, strict=True):
                if outcome == "offline":
                    self._offline = True
                    self.pending.append(done)
                elif outcome == "sent" and isinstance(done, CheckpointOp) and done.kind == "best":
                    # MLflow has it now; the staged copy only costs disk ("last" stays: it is replaced).
                    discard_folder(Path(done.folder))
            del self._head[: len(batch)]
            self._count(-len(batch))

    def _ready(self, item: Op) -> Op:
        """The item as it can be sent: a checkpoint waits for its files; one never written sends metrics."""
        future = self._written.pop(item.seq, None) if isinstance(item, CheckpointOp) else None
        if future is None:
            return item
        try:
            future.result()
        except BaseException as e:
            assert isinstance(item, CheckpointOp)
            self.notices.add(
                f"mlflow_best: the checkpoint of epoch {item.epoch} ({item.name}) could not be written "
                f"to {item.folder}: {e!r}. It is missing from MLflow; the previous best checkpoint "
                "stays intact and restorable. Free disk space or pass staging_dir= elsewhere."
            )
            return as_metrics(item)
        return item

    def _give_up(self, now: float) -> bool:
        return self._closing.is_set() and now >= self._deadline

    # -- shutdown ---------------------------------------------------------------------------------
    def close(
        self, offline_timeout: float, progress: Callable[[int, float], None] | None = None, every: float = 1.0
    ) -> list[Op]:
        """Finish every write and upload; give up on MLflow after ``offline_timeout`` s without it.

        While uploads remain, ``progress(in_flight, elapsed)`` is called once per ``every`` seconds.

        Returns the operations that did not reach MLflow (they stay journaled for ``sync``). When a
        thread died, what it left is sent from here, the same way.
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
            if progress is not None and now - last_report >= every:
                progress(self._in_flight, now - start)
                last_report = now
            if self.offline_since is None:
                # Still talking to MLflow: the deadline only counts while it is unreachable.
                self._deadline = now + offline_timeout
        self._disk.join(timeout=max(1.0, offline_timeout))
        if self.died is not None and self.died[0] == "upload":
            self._flush_after_death(offline_timeout)
        self.journal.close()
        return self.pending

    def _flush_after_death(self, offline_timeout: float) -> None:
        left: list[Any] = list(self._head)
        self._head.clear()
        while True:
            try:
                left.append(self._up_q.get_nowait())
            except queue.Empty:
                break
        # _ready never raises: a checkpoint whose write failed is sent as its metrics.
        ready: list[Op] = [self._ready(op) for op in left if op is not _STOP]
        started = time.monotonic()
        try:
            result: Replayed = replay(
                self._sender, ready,
                give_up=lambda now: now - (self._sender.offline_since or started) >= offline_timeout,
            )
        except BaseException:
            self.pending.extend(ready)
            return
        self.pending.extend(result.unsent)
