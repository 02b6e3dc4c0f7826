"""Writing one file so that no reader ever sees half of it.

The bytes go to ``.<name>.<random>.tmp`` next to the target, then ``os.replace`` renames them into
place: a reader (the uploader, a ``sync``, another process) sees the old file or the new one, a
failed write leaves the old file as it was, and the temporary file never outlives the call.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def write_atomically(target: Path, write: Callable[[Path], object], *, fsync: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary name beside ``target``, then rename it to ``target``.

    With ``fsync=True`` the file's bytes reach the disk before the rename, so a crash of the
    machine (not only of the process) cannot leave an empty file under the final name.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
