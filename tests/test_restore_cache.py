"""The restore cache is bounded (least recently used first) and a killed download leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import mlflow_best
from tests.helpers import run_sequence, unique


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in (*cache.iterdir(), *(cache / "weights").glob("*")) if len(p.name) == 64)


def _runs(n: int) -> list[str]:
    return [run_sequence([1.0], experiment=unique("lru"), verbose=False)[0].run_id for _ in range(n)]


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_the_cache_keeps_the_most_recently_used_entries_within_its_bound(
    sqlite_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c = _runs(3)
    cache = tmp_path / "cache"
    first = mlflow_best.restore(a, cache_dir=cache).path
    monkeypatch.setenv("MLFLOW_BEST_CACHE_MAX_BYTES", str(int(_size(first) * 2.5)))  # room for two
    second = mlflow_best.restore(b, cache_dir=cache).path
    inode = first.stat().st_ino
    assert mlflow_best.restore(a, cache_dir=cache).path.stat().st_ino == inode  # a hit: not downloaded again
    third = mlflow_best.restore(c, cache_dir=cache).path
    assert _entries(cache) == sorted([first.name, third.name])  # b, the least recently used, went
    assert mlflow_best.restore(b, cache_dir=cache).epoch == 0  # downloaded again when asked for
    assert _entries(cache) == sorted([second.name, third.name])
    assert not [p for p in cache.iterdir() if p.name.startswith(".evicted-")]


def test_the_entry_in_use_is_never_evicted_and_weights_only_entries_count_too(
    sqlite_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = _runs(2)
    cache = tmp_path / "cache"
    monkeypatch.setenv("MLFLOW_BEST_CACHE_MAX_BYTES", "0")  # smaller than any checkpoint
    kept = mlflow_best.restore(a, cache_dir=cache)
    assert _entries(cache) == [kept.path.name] and kept.epoch == 0
    mlflow_best.load_model(b, cache_dir=cache)
    assert [p.parent.name for p in (cache / "weights").iterdir() if len(p.name) == 64] == ["weights"]
    assert len(_entries(cache)) == 1 and kept.path.name not in _entries(cache)


def test_a_bad_cache_bound_is_refused_before_any_download(
    sqlite_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (a,) = _runs(1)
    monkeypatch.setenv("MLFLOW_BEST_CACHE_MAX_BYTES", "5GB")
    with pytest.raises(mlflow_best.ConfigError, match=r"MLFLOW_BEST_CACHE_MAX_BYTES='5GB' is not a number of "
                       r"bytes; set it to an integer such as 5000000000"):
        mlflow_best.restore(a, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


_DOWNLOADING = """
import sys, time
from pathlib import Path
from mlflow_best._cache import partial_dir
with partial_dir(Path(sys.argv[1])) as tmp:
    (tmp / "model.pt").write_bytes(b"half a checkpoint" * 1000)
    print(tmp, flush=True)
    time.sleep(600)
"""


def _downloader(cache: Path) -> tuple[subprocess.Popen[str], Path]:
    command = [sys.executable, "-c", _DOWNLOADING, str(cache)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    return child, Path(child.stdout.readline().strip())


@pytest.mark.slow
def test_a_download_killed_midway_is_removed_at_the_next_restore_a_live_one_is_not(
    sqlite_uri: str, tmp_path: Path
) -> None:
    (a,) = _runs(1)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    killed, partial = _downloader(cache)
    alive, in_progress = _downloader(cache)
    try:
        killed.kill()
        killed.wait()
        assert partial.is_dir() and partial.name.startswith(".download-")
        entry = mlflow_best.restore(a, cache_dir=cache).path
        assert not partial.exists() and not Path(f"{partial}.lock").exists()  # the dead one's: gone
        assert (in_progress / "model.pt").is_file()  # another process's download in progress: left alone
    finally:
        alive.kill()
        alive.wait()
    assert mlflow_best.restore(a, cache_dir=cache).path == entry  # a hit also sweeps
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".key")) == [entry.name]


def test_a_restore_seals_what_it_hashed_so_the_next_one_need_not_hash_again(
    sqlite_uri: str, tmp_path: Path
) -> None:
    import json
    import os

    from mlflow_best._cache import Seal

    (a,) = _runs(1)
    entry = mlflow_best.restore(a, cache_dir=tmp_path / "cache").path
    files = json.loads((entry / "manifest.json").read_text())["files"]
    seal = Seal(entry)  # read back from .sealed.json, its HMAC checked
    for name in ("model.pt", "training_state.pt"):
        st = os.stat(entry / name)
        assert seal.holds(name, files[name]["sha256"], st, st), name
    assert not [p.name for p in entry.iterdir() if p.name.endswith(".tmp")]  # nothing half-written left
