"""The restore cache (``$MLFLOW_BEST_HOME/cache``): its seal, its size bound, and partial downloads.

    cache/                 0700
      .key                 the seal's HMAC key (0600)
      <sha256>/            a complete checkpoint, named by its manifest's sha256 (files read-only)
        .sealed.json       which files were hashed (below)
      weights/<sha256>/    manifest and weights only (``load_model``)
      .download-<id>/      a download in progress; ``.download-<id>.lock`` is flock-ed by its process
      .stale-<id>/         an entry set aside while others may still read it (removed after an hour)

An entry only ever appears by an atomic rename of a complete, size-checked download, so a crash
leaves at most a ``.download-*`` folder, never a partial entry; its lock dies with its process, and
the next restore removes it. Entries are used least-recently-used first: each use touches the
entry's folder, and after each restore the oldest entries beyond ``MLFLOW_BEST_CACHE_MAX_BYTES``
(default 5 GB) are deleted, never the one that restore uses.

The seal records which cached files were hashed, so a warm restore need not hash again.

A cache entry is hashed the first time it is loaded. Then the identity of each verified file (inode,
size, modification and change times, read with ``fstat`` on the descriptor whose bytes were hashed)
is recorded in ``.sealed.json``, with an HMAC under a key only this user can read
(``$MLFLOW_BEST_HOME/cache/.key``, ``0600`` in a ``0700`` folder). A later load reads the file once,
``fstat``s the same descriptor after reading, and skips the hash only when that identity is still the
sealed one: a file replaced by rename has another inode, a file written in place has another change
time (which no program can set back), and a rewritten seal fails its HMAC. Anything else is hashed.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlflow_best._errors import ConfigError
from mlflow_best._files import write_atomically

try:
    import fcntl
except ImportError:  # Windows: leftovers are recognised by age only
    fcntl = None  # type: ignore[assignment]

SEAL = ".sealed.json"
_KEY = ".key"
WEIGHTS = "weights"
MAX_BYTES_ENV = "MLFLOW_BEST_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 5_000_000_000
_ENTRY = re.compile(r"^[0-9a-f]{64}$")
_DOWNLOAD, _STALE, _EVICTED = ".download-", ".stale-", ".evicted-"
_STALE_AGE_S = 3600.0


def max_bytes() -> int:
    """The cache's size bound in bytes: ``MLFLOW_BEST_CACHE_MAX_BYTES``, else 5 GB."""
    raw = os.environ.get(MAX_BYTES_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_MAX_BYTES
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(
            f"{MAX_BYTES_ENV}={raw!r} is not a number of bytes; set it to an integer such as "
            f"{DEFAULT_MAX_BYTES} (5 GB), or 0 to keep only the checkpoint being restored"
        )
    return value


def touch(entry: Path) -> None:
    """Mark a cache entry used now (its folder's mtime): the least recently used go first."""
    with contextlib.suppress(OSError):
        os.utime(entry)


def _entries(root: Path) -> Iterator[Path]:
    for folder in (root, root / WEIGHTS):
        with contextlib.suppress(OSError):
            for entry in folder.iterdir():
                if _ENTRY.match(entry.name) and entry.is_dir():
                    yield entry


def tree_size(folder: Path) -> int:
    """Bytes in the files below ``folder`` (or of ``folder`` itself, a file); vanished files count 0."""
    if folder.is_file():
        return folder.stat().st_size
    total = 0
    for top, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(top, name)).st_size
    return total


def enforce_limit(root: Path, in_use: Path) -> list[Path]:
    """Delete the least recently used entries until the cache fits ``max_bytes()``; return them.

    ``in_use`` (the entry the current restore loads) is never deleted, even when it alone is larger.
    """
    limit = max_bytes()
    found = []
    for entry in _entries(root):
        with contextlib.suppress(OSError):
            found.append((entry.stat().st_mtime, tree_size(entry), entry))
    total = sum(size for _, size, _ in found)
    evicted: list[Path] = []
    for _, size, entry in sorted(found, key=lambda f: f[0]):
        if total <= limit:
            break
        if entry == in_use:
            continue
        aside = entry.parent / f"{_EVICTED}{uuid.uuid4().hex[:8]}"
        try:
            os.replace(entry, aside)  # gone from the cache at once; a reader with open files keeps them
        except OSError:
            continue
        shutil.rmtree(aside, ignore_errors=True)
        total -= size
        evicted.append(entry)
    return evicted


@contextlib.contextmanager
def partial_dir(folder: Path) -> Iterator[Path]:
    """A fresh ``.download-<id>`` folder in ``folder`` for one download, removed afterwards.

    While it exists, this process holds an exclusive ``flock`` on ``.download-<id>.lock``: the lock
    is released by the kernel when the process dies, however it dies, which tells ``sweep`` that the
    folder is a leftover.
    """
    name = f"{_DOWNLOAD}{uuid.uuid4().hex[:12]}"
    lock = folder / f"{name}.lock"
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        tmp = folder / name
        tmp.mkdir(mode=0o700)
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.suppress(OSError):
                lock.unlink()
    finally:
        os.close(fd)


def _abandoned(lock: Path) -> bool:
    """True when no living process holds ``lock`` (its owner died, or finished)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases the lock taken above


def sweep(folder: Path, stale_age_s: float = _STALE_AGE_S) -> None:
    """Remove what killed processes left in ``folder``: downloads whose process is gone (at once),
    entries that were being evicted, and set-aside stale entries nobody can still be reading."""
    now = time.time()
    with contextlib.suppress(OSError):
        for item in folder.iterdir():
            name = item.name
            if name.startswith(_DOWNLOAD):
                if name.endswith(".lock"):
                    if not (folder / name[: -len(".lock")]).exists() and _abandoned(item):
                        with contextlib.suppress(OSError):
                            item.unlink()
                    continue
                lock = folder / f"{name}.lock"
                # Without a lock file: written by an older version, recognised by age.
                gone = _abandoned(lock) if lock.exists() else _older(item, now, stale_age_s)
                if gone:
                    shutil.rmtree(item, ignore_errors=True)
                    with contextlib.suppress(OSError):
                        lock.unlink()
            elif name.startswith(_EVICTED) or (name.startswith(_STALE) and _older(item, now, stale_age_s)):
                shutil.rmtree(item, ignore_errors=True)


def _older(path: Path, now: float, age_s: float) -> bool:
    try:
        return now - path.stat().st_mtime > age_s
    except OSError:
        return False


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _key(cache: Path) -> bytes | None:
    path = cache / _KEY
    with contextlib.suppress(OSError):
        data = path.read_bytes()
        if len(data) == 32:
            return data
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        with contextlib.suppress(OSError):
            data = path.read_bytes()
            return data if len(data) == 32 else None
        return None
    except OSError:
        return None
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


class Seal:
    """The seal of one cache entry (a folder directly under the cache)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._key = _key(folder.parent)
        self._files = self._read()

    def _mac(self, files: dict[str, Any]) -> str:
        assert self._key is not None
        body = json.dumps({"folder": self.folder.name, "files": files}, sort_keys=True).encode()
        return hmac.new(self._key, body, hashlib.sha256).hexdigest()

    def _read(self) -> dict[str, Any]:
        if self._key is None:
            return {}
        try:
            raw = json.loads((self.folder / SEAL).read_text(encoding="utf-8"))
            files, mac = raw["files"], raw["mac"]
            typed = isinstance(files, dict) and isinstance(mac, str)
            if typed and hmac.compare_digest(mac, self._mac(files)):
                return dict(files)
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return {}

    def holds(self, name: str, sha256: str, before: os.stat_result, after: os.stat_result) -> bool:
        """True when the bytes just read through one descriptor are the ones hashed before."""
        record = self._files.get(name)
        ident = _identity(after)
        return (
            isinstance(record, dict)
            and record.get("sha256") == sha256
            and record.get("id") == ident
            and _identity(before) == ident
        )

    def add(self, name: str, sha256: str, before: os.stat_result, after: os.stat_result) -> None:
        """Record a file whose bytes, read between ``before`` and ``after``, hashed to ``sha256``.

        Nothing is recorded when the file changed while it was read: those bytes were hashed, but
        the file now holds others.
        """
        if self._key is None or _identity(before) != _identity(after):
            return
        st = after
        self._files = {**self._read(), name: {"sha256": sha256, "id": _identity(st)}}
        text = json.dumps({"files": self._files, "mac": self._mac(self._files)})
        with contextlib.suppress(OSError):
            write_atomically(self.folder / SEAL, lambda tmp: tmp.write_text(text, encoding="utf-8"))
