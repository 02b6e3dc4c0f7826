"""A live run is leased to one process: the ``mlflow_best.lease`` run tag, across machines.

On one machine the staging folder's lock (``_staging.StagingLock``) already keeps a second writer
out. Across machines the tracking store is all two processes share: the holder writes
``{"holder": "host:pid", "until_ms": ...}`` when the block starts, renews it every ``HEARTBEAT_S``
from the upload thread, and sets ``until_ms`` to 0 when the block ends. A second ``resume=`` of a
RUNNING run is refused while the lease is live, unless its holder is a process of this machine
that no longer exists.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from mlflow_best._errors import ConfigError

LEASE_TAG = "mlflow_best.lease"
LEASE_S = 120.0
HEARTBEAT_S = 30.0


def me() -> str:
    """This process, as a lease names it: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def value(released: bool = False) -> str:
    """The lease tag's value: this process, until ``LEASE_S`` from now (0 once released)."""
    until = 0 if released else int((time.time() + LEASE_S) * 1000)
    return json.dumps({"holder": me(), "until_ms": until})


def alive(holder: str) -> bool:
    """False when ``holder`` ("host:pid") is a process of this machine that no longer exists."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine: only its lease's expiry tells
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def check(run: Any) -> None:
    """Raise ``ConfigError`` when another live process (on any machine) holds ``run``'s lease."""
    raw = run.data.tags.get(LEASE_TAG)
    if not raw or run.info.status != "RUNNING":
        return
    try:
        lease = json.loads(raw)
        holder, until = str(lease["holder"]), float(lease["until_ms"])
    except (ValueError, KeyError, TypeError):
        return
    now = time.time() * 1000
    if holder == me() or until <= now or not alive(holder):
        return
    raise ConfigError(
        f"resume={run.info.run_id!r}: the run is still being tracked by {holder} (its lease, renewed "
        f"every {HEARTBEAT_S:.0f} s, runs until "
        f"{time.strftime('%H:%M:%S UTC', time.gmtime(until / 1000))}, {(until - now) / 1000:.0f} s from "
        "now). A second copy of the same job would log every epoch twice: stop the first one (its lease "
        "then ends at once, or expires if it was killed), or start a new run (resume=None)"
    )
