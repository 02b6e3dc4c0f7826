"""One way to send journaled operations to MLflow: the upload thread, the final flush and ``sync`` use it.

Each failure is classified before anything else happens:

* an **outage** (unreachable, timeout, HTTP 5xx / 429, a locked database) is retried with backoff;
  the items wait, in order, and nothing after them overtakes them;
* a **refusal** (HTTP 4xx such as ``INVALID_PARAMETER_VALUE``, or an error no retry can mend) is
  recorded as rejected with MLflow's reason, named in one warning, and the queue moves on, so one
  bad item never blocks the items after it.

Metric items waiting next to each other are coalesced into as few ``log_batch`` calls as MLflow's
limit allows (in order, each row still once): quick epochs no longer cost one round trip each.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mlflow_best._errors import CheckpointError
from mlflow_best._lease import LEASE_TAG
from mlflow_best._staging import (
    RUN_FILE,
    CheckpointOp,
    EndOp,
    Journal,
    MetricsOp,
    Op,
    TagsOp,
    as_metrics,
    describe,
)

# One log_batch request carries at most this many metrics (MLflow's MAX_METRICS_PER_BATCH): a
# coalesced batch is one request, so it is taken or refused whole, never half-logged.
MAX_METRICS_PER_CALL = 1000

# Error codes that mean "not now" although MLflow maps them below 500.
_RETRY_CODES = {"ABORTED", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED", "TEMPORARILY_UNAVAILABLE",
                "DEADLINE_EXCEEDED", "INTERNAL_ERROR", "DATA_LOSS", "CANCELLED"}
# 5xx codes that are answers about the request, not about the server's health.
_REFUSE_CODES = {"INVALID_STATE", "NOT_IMPLEMENTED"}

Outcome = Literal["sent", "rejected", "offline"]


def is_refusal(error: BaseException) -> bool:
    """True when MLflow (or the request itself) said no: retrying the same item cannot succeed."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        code = str(error.error_code)
        if code in _REFUSE_CODES:
            return True
        if code in _RETRY_CODES:
            return False
        return int(error.get_http_status_code()) < 500  # type: ignore[no-untyped-call]
    if type(error).__name__ == "OperationalError":  # SQLAlchemy: a locked or unreachable database
        return False
    if isinstance(error, FileNotFoundError):
        return True  # the local copy it would upload is gone: waiting will not bring it back
    # requests' errors are OSErrors too (a dropped connection, a timeout): those pass. Anything else
    # (a warning turned into an error, a bug) fails the same way every time.
    return not isinstance(error, (OSError, TimeoutError, ConnectionError))


def short(error: BaseException) -> str:
    """The first line of an error, at most 200 characters."""
    text = str(getattr(error, "message", None) or error).strip().splitlines()
    first = text[0] if text else type(error).__name__
    return f"{type(error).__name__}: {first[:200]}" if not text else first[:200]


@dataclass
class Notices:
    """Warnings from background threads, emitted later by the training thread.

    A thread never calls ``warnings.warn`` itself: under ``-W error`` (or
    ``warnings.simplefilter("error")``) that would raise inside the thread and kill it.
    """

    _items: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, message: str) -> None:
        with self._lock:
            self._items.append(message)

    def take(self) -> list[str]:
        with self._lock:
            items, self._items = self._items, []
        return items


def coalesce(first: Op, more: Callable[[], Op | None]) -> tuple[list[Op], Op | None]:
    """``first`` and the metric items right behind it that fit in one call; returns the item that stopped it.

    ``more()`` returns the next waiting item, or None when nothing waits.
    """
    if not isinstance(first, MetricsOp):
        return [first], None
    batch: list[Op] = [first]
    size = len(first.metrics)
    while (nxt := more()) is not None:
        if not isinstance(nxt, MetricsOp) or size + len(nxt.metrics) > MAX_METRICS_PER_CALL:
            return batch, nxt
        batch.append(nxt)
        size += len(nxt.metrics)
    return batch, None


class Sender:
    """Sends batches with retries and records each outcome in the journal."""

    def __init__(self, journal: Journal, publish: Callable[[Sequence[Op]], None], notices: Notices) -> None:
        self.journal = journal
        self._publish = publish
        self._notices = notices
        self.offline_since: float | None = None
        self.rejected: list[tuple[Op, str]] = []
        self.calls = 0

    def send(self, batch: Sequence[Op], give_up: Callable[[float], bool]) -> list[Outcome]:
        """Send ``batch``; retry outages until ``give_up(now)`` says stop. One outcome per item, in order."""
        delay = 0.25
        while True:
            try:
                self.calls += 1
                self._publish(batch)
            except Exception as e:
                if is_refusal(e):
                    if len(batch) > 1:
                        # Which item was refused? Each on its own: the others still go.
                        outcomes: list[Outcome] = []
                        for op in batch:
                            outcomes.extend(self.send([op], give_up))
                            if outcomes[-1] == "offline":
                                return outcomes + ["offline"] * (len(batch) - len(outcomes))
                        return outcomes
                    self._reject(batch[0], e)
                    return ["rejected"]
                now = time.monotonic()
                if self.offline_since is None:
                    self.offline_since = now
                    self._notices.add(
                        f"mlflow_best: could not send {describe(batch[0])} to MLflow ({short(e)}); training "
                        "goes on, everything is kept in the local staging folder "
                        f"{self.journal.staging} and retried until the run ends"
                    )
                if give_up(now):
                    return ["offline"] * len(batch)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.journal.mark_sent(list(batch))
            if self.offline_since is not None:
                gap = time.monotonic() - self.offline_since
                print(f"mlflow_best: tracking store reachable again after {gap:.0f} s", file=sys.stderr)
                self.offline_since = None
            return ["sent"] * len(batch)

    def _reject(self, op: Op, error: BaseException) -> None:
        reason = short(error)
        self.journal.mark_rejected(op, reason)
        self.rejected.append((op, reason))
        self._notices.add(
            f"mlflow_best: MLflow refused {describe(op)} ({reason}); it is recorded as rejected in "
            f"{self.journal.staging / 'sent.jsonl'} and the items after it are sent"
        )


def checked(op: Op, on_warning: Callable[[str], None] | None) -> Op:
    """A journaled checkpoint as it can be replayed: its files are verified, else only its metrics go."""
    from mlflow_best._checkpoint import verify_checkpoint

    if not isinstance(op, CheckpointOp):
        return op
    try:
        verify_checkpoint(Path(op.folder))
    except CheckpointError as e:
        if on_warning is not None:
            on_warning(f"mlflow_best: {describe(op)} was never completely written ({e}); sending that "
                       "epoch's metrics without it")
        return as_metrics(op)
    return op


@dataclass
class Replayed:
    """What a replay did: how many items went, which MLflow refused (with why), which are still waiting."""

    sent: int = 0
    rejected: list[tuple[Op, str]] = field(default_factory=list)
    unsent: list[Op] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"{describe(op)}: refused by MLflow ({why})" for op, why in self.rejected] + [
            f"{describe(op)}: not sent (the tracking store did not answer)" for op in self.unsent
        ]


def replay(sender: Sender, ops: Sequence[Op], give_up: Callable[[float], bool]) -> Replayed:
    """Send journaled ``ops`` in order (the final flush and ``sync``); stop at the first outage that lasts."""
    result = Replayed()
    queue = list(ops)
    i = 0

    def more() -> Op | None:
        nonlocal i
        if i < len(queue):
            i += 1
            return queue[i - 1]
        return None

    pending = more()
    while pending is not None:
        batch, pending = coalesce(pending, more)
        if pending is None:
            pending = more()
        before = len(sender.rejected)
        outcomes = sender.send(batch, give_up)
        result.sent += outcomes.count("sent")
        result.rejected.extend(sender.rejected[before:])
        if "offline" in outcomes:
            result.unsent = [op for op, o in zip(batch, outcomes, strict=True) if o == "offline"]
            result.unsent += ([pending] if pending is not None else []) + queue[i:]
            return result
    return result


def run_info_publisher(client: Any, info: dict[str, Any]) -> Any:
    """A ``Publisher`` for the run a staging folder's ``run.json`` describes."""
    from mlflow_best._criterion import Criterion
    from mlflow_best._registry import Publisher

    return Publisher(
        client,
        info["run_id"],
        info["experiment_id"],
        info["monitor"],
        Criterion(info["mode"], float(info.get("min_delta", 0.0))),
        info.get("registered_model"),
        info.get("alias"),
        keep=info.get("keep"),
    )


def sync_staging(
    client: Any, staging: Path, *, quiet: bool = False, timeout: float = 30.0, resuming: bool = False
) -> Replayed:
    """Replay a staging folder's unsent operations into its run, in order (the caller holds its lock).

    Gives up on an outage that lasts ``timeout`` seconds; what is left stays journaled. With
    ``resuming`` (a new process continues the run) the old process's end of run is superseded:
    it is not sent (the run would read FINISHED while it trains) and neither is its lease release.
    """
    import warnings

    from mlflow_best._staging import read_run_file, read_unsent

    if not (staging / RUN_FILE).is_file():
        return Replayed()
    ops = read_unsent(staging)
    if not ops:
        return Replayed()
    info = read_run_file(staging)
    notices = Notices()
    journal = Journal(staging, on_warning=notices.add)
    sender = Sender(journal, run_info_publisher(client, info), notices)
    try:
        if resuming:
            superseded = [op for op in ops if isinstance(op, EndOp)]
            journal.mark_sent(superseded)
            ops = [op for op in ops if not isinstance(op, EndOp)]
            for op in ops:
                if isinstance(op, TagsOp):
                    op.tags.pop(LEASE_TAG, None)
        started = time.monotonic()
        ready = [checked(op, None if quiet else notices.add) for op in ops]
        result = replay(sender, ready, give_up=lambda now: now - (sender.offline_since or started) >= timeout)
    finally:
        journal.close()
        for message in notices.take():
            if not quiet or "refused" in message:
                warnings.warn(message, RuntimeWarning, stacklevel=3)
    return result


def sync(
    run_id: str,
    *,
    tracking_uri: str | None = None,
    staging_dir: str | os.PathLike[str] | None = None,
    timeout: float = 30.0,
) -> int:
    """Upload what a run could not send (a dead server, a killed process) into that same run.

    Items are sent in the order they were logged; an item MLflow refuses is recorded as rejected
    and the rest still go. ``sync`` takes the staging folder's lock: a run that is still training
    (or another ``sync``) holds it, and ``sync`` is then refused with the holder's name.

    Args:
        run_id: the run whose local staging folder holds unsent metrics and checkpoints.
        tracking_uri: the MLflow tracking URI; None uses the one recorded for the run.
        staging_dir: the ``staging_dir=`` given to ``track``, if any (CLI: ``--staging-dir``).
        timeout: seconds to keep retrying a tracking store that does not answer.

    Returns:
        The number of operations sent.

    Raises:
        CheckpointNotFoundError: there is no staging folder for ``run_id`` on this machine.
        ConfigError: the run is still training (or being synced) in another process.
        UnsentError: some items were refused by MLflow or could not be sent (nothing is lost: the
            unsent ones stay journaled; call again when the server is back).
    """
    import mlflow
    from mlflow import MlflowClient

    from mlflow_best._errors import CheckpointNotFoundError, UnsentError
    from mlflow_best._reach import bounded_http
    from mlflow_best._staging import StagingLock, read_run_file, staging_root, sweep

    root = staging_root(staging_dir)
    staging = root / run_id
    if not (staging / RUN_FILE).is_file():
        raise CheckpointNotFoundError(
            f"no staging folder for run {run_id} at {staging}; pass staging_dir= (CLI: --staging-dir) "
            "if track() used one"
        )
    info = read_run_file(staging)
    lock = StagingLock(staging)
    lock.acquire(
        f"cannot sync run {run_id}",
        "Wait for it to end (it sends everything itself), or stop it first; sync then uploads what it left",
    )
    try:
        sweep(root, held=staging)
        uri = tracking_uri or info.get("tracking_uri") or mlflow.get_tracking_uri()
        with bounded_http():
            result = sync_staging(MlflowClient(tracking_uri=uri), staging, timeout=timeout)
    finally:
        lock.release()
    if result.rejected or result.unsent:
        lines = result.lines()
        raise UnsentError(
            f"mlflow_best.sync: {len(lines)} item(s) of run {run_id} still did not reach MLflow:\n  - "
            + "\n  - ".join(lines)
            + (f"\nThe unsent ones stay in {staging}; call sync again when the server answers."
               if result.unsent else ""),
            str(staging),
            lines,
        )
    return result.sent
