"""The download cache's seal: which cached files were hashed, so a warm restore need not hash again.

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
import secrets
import uuid
from pathlib import Path
from typing import Any

SEAL = ".sealed.json"
_KEY = ".key"


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
        tmp = self.folder / f".seal-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(OSError):
            body = {"files": self._files, "mac": self._mac(self._files)}
            tmp.write_text(json.dumps(body), encoding="utf-8")
            os.replace(tmp, self.folder / SEAL)
        with contextlib.suppress(OSError):
            tmp.unlink()
