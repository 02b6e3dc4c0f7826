"""``write_atomically``: the one way a single file is written (run.json, the plot, --out, a linked upload)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from mlflow_best._files import write_atomically


def test_a_reader_sees_the_old_file_or_the_new_one_never_half(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "state.bin"  # the folder is created
    sizes = [1 << 20, 3 << 20]
    write_atomically(target, lambda tmp: tmp.write_bytes(b"a" * sizes[0]))
    seen: set[tuple[int, bytes]] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            data = target.read_bytes()
            seen.add((len(data), bytes(set(data))))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(20):
            fill, size = (b"b", sizes[1]) if i % 2 == 0 else (b"a", sizes[0])

            def write(tmp: Path, fill: bytes = fill, size: int = size) -> None:
                with open(tmp, "wb") as f:  # in pieces, so a reader of the temporary name would see half
                    for _ in range(size >> 16):
                        f.write(fill * (1 << 16))

            write_atomically(target, write, fsync=i == 0)
    finally:
        stop.set()
        reader.join()
    assert seen <= {(sizes[0], b"a"), (sizes[1], b"b")}, sorted(seen)[:4]
    assert target.read_bytes() == b"a" * sizes[0]
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.bin"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "run.json"
    target.write_text('{"run_id": "old"}')

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text('{"run_id": "ne')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(target, half_then_fail, fsync=True)
    assert target.read_text() == '{"run_id": "old"}'
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]
