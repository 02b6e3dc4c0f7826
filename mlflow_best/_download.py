"""Downloading a checkpoint from MLflow into the restore cache: checked against MLflow's records,
size-checked, sealed, and published into the cache by one atomic rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow_best._cache import WEIGHTS, enforce_limit, max_bytes, partial_dir, sweep, touch
from mlflow_best._checkpoint import (
    MANIFEST,
    MODEL_FILE,
    Manifest,
    read_manifest,
)
from mlflow_best._errors import (
    CheckpointError,
    TrackingStoreError,
)
from mlflow_best._reach import QUIET_DOWNLOADS, scoped_env
from mlflow_best._resolve import Source, check_identity
from mlflow_best._signing import SIGNATURE_FILE

if TYPE_CHECKING:
    from mlflow import MlflowClient



# -- download cache ---------------------------------------------------------------------------------
def fetch(client: MlflowClient, source: Source, cache: Path) -> Path:
    """A local copy of ``source``: from the cache when complete, else downloaded into it.

    Nothing here is trusted for loading: the loader hashes the bytes it reads against the manifest,
    and the manifest against what MLflow recorded. The cache only saves downloads; it lives in a
    ``0700`` folder with read-only files.
    """
    return download_into_cache(client, source, cache)


def download_into_cache(
    client: MlflowClient, source: Source, cache: Path, *, weights_only: bool = False
) -> Path:
    """The cache entry of ``source`` (``cache/<sha256>``), downloaded unless already complete there.

    ``weights_only``: only the manifest and the weights are needed (``load_model``); a full entry
    serves, else the two files go to ``cache/weights/<sha256>``. After each call the cache is within
    its size bound (``MLFLOW_BEST_CACHE_MAX_BYTES``), the entry returned excepted.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    if source.sha256 is None and os.path.isdir(source.artifact_uri):
        return Path(source.artifact_uri)  # a local staged copy: verified by the loader, in place
    max_bytes()  # a bad MLFLOW_BEST_CACHE_MAX_BYTES is refused before anything is downloaded
    names = [MODEL_FILE] if weights_only else None
    into = cache / WEIGHTS if weights_only else cache
    if source.sha256:
        for cached in (cache / source.sha256, *([into / source.sha256] if weights_only else [])):
            if cache_hit(cached, names):
                return _used(cache, cached)
    private_dir(into)
    sweep(into)
    stored = source.artifact_uri.rstrip("/")
    # MLflow's per-file progress bar is noise in logs and notebooks; a user's own setting wins.
    with scoped_env(QUIET_DOWNLOADS), partial_dir(into) as tmp:
        local = tmp
        try:
            if weights_only:
                stored = _download_weights(client, source, stored, tmp)
            else:
                local = Path(
                    mlflow.artifacts.download_artifacts(
                        artifact_uri=source.artifact_uri, dst_path=str(tmp), tracking_uri=client.tracking_uri
                    )
                )
                if not (local / MANIFEST).is_file() and (local / "artifacts" / MANIFEST).is_file():
                    local, stored = local / "artifacts", stored + "/artifacts"
            manifest = read_manifest(local)
            check_recorded(manifest, source)
            _check_sizes(local, manifest, names)
            seal(local)
            return _used(cache, _publish_to_cache(local, into / manifest.sha256, into))
        except CheckpointError as e:
            # Name the file where it is stored, not in the temporary download folder removed below.
            raise type(e)(str(e).replace(str(local), stored)) from e
        except MlflowException as e:
            raise TrackingStoreError(f"downloading {stored} failed: {e.message}") from e


def _used(cache: Path, entry: Path) -> Path:
    touch(entry)
    enforce_limit(cache, in_use=entry)
    sweep(cache)
    return entry


def _download_weights(client: MlflowClient, source: Source, stored: str, tmp: Path) -> str:
    """Download only ``manifest.json``, ``model.pt`` (and the signature, if any) into ``tmp``."""
    from mlflow.exceptions import MlflowException

    try:
        _download(client, stored, MANIFEST, tmp)
    except (MlflowException, OSError):
        # A version whose source is the LoggedModel's folder rather than its artifacts.
        stored += "/artifacts"
        _download(client, stored, MANIFEST, tmp)
    check_recorded(read_manifest(tmp), source)  # before the weights are downloaded
    _download(client, stored, MODEL_FILE, tmp)
    with contextlib.suppress(MlflowException, OSError, CheckpointError):
        _download(client, stored, SIGNATURE_FILE, tmp)
    return stored


def _download(client: MlflowClient, stored: str, name: str, dst: Path) -> None:
    import mlflow

    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"{stored}/{name}", dst_path=str(dst), tracking_uri=client.tracking_uri
        )
    )
    if local != dst / name:
        shutil.move(str(local), dst / name)
    if not (dst / name).is_file():
        raise CheckpointError(f"{stored}/{name} is missing; the checkpoint is incomplete")


def check_recorded(manifest: Manifest, source: Source) -> None:
    """A downloaded manifest is what MLflow recorded: the same checkpoint, and the same bytes."""
    check_identity(manifest, source)
    if source.sha256 and manifest.sha256 != source.sha256:
        raise CheckpointError(
            f"{manifest.path / MANIFEST} has sha256 {manifest.sha256[:12]}…, but MLflow recorded "
            f"{source.sha256[:12]}… for this checkpoint: the stored manifest was changed; it was not loaded"
        )


def private_dir(path: Path) -> None:
    """Create ``path`` (and parents) readable by this user only."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(OSError):
        path.chmod(0o700)


def seal(folder: Path) -> None:
    """Make a downloaded checkpoint's files read-only before it joins the cache."""
    for f in folder.rglob("*"):
        if f.is_file():
            with contextlib.suppress(OSError):
                f.chmod(0o444)


def _check_sizes(folder: Path, manifest: Manifest, names: list[str] | None = None) -> None:
    listed = manifest.all_files
    for name in names if names is not None else list(listed):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
        if path.stat().st_size != listed[name]["bytes"]:
            raise CheckpointError(
                f"{path} is {path.stat().st_size} bytes, the manifest says {listed[name]['bytes']}: the file "
                "is truncated or was changed; restore another version or re-download it"
            )


def _evict(folder: Path, cache: Path) -> None:
    with contextlib.suppress(OSError):
        os.replace(folder, cache / f".stale-{uuid.uuid4().hex[:8]}")


def _publish_to_cache(local: Path, final: Path, cache: Path) -> Path:
    """Move a verified download to ``final``, safe against other processes doing the same.

    Ranks of one node restore the same checkpoint at once: an entry another process completed is kept
    (the content is identical by its name); a stale one is moved aside, never deleted in place, so a
    reader that already holds it keeps reading whole files.
    """
    for _ in range(3):
        if cache_hit(final):
            return final
        if final.exists():
            with contextlib.suppress(OSError):
                os.replace(final, cache / f".stale-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(local, final)
            return final
        except OSError:
            continue  # another process put its copy there first: check it on the next pass
    if cache_hit(final):
        return final
    raise CheckpointError(f"{final}: the download cache kept changing under this process; retry restore")


def cache_hit(folder: Path, names: list[str] | None = None) -> bool:
    """A cached folder is used when its manifest still hashes to the folder's name and the files are
    all there at their declared sizes; their contents are hashed by the loader, at every load."""
    try:
        manifest = read_manifest(folder)
        if manifest.sha256 != folder.name:
            return False
        _check_sizes(folder, manifest, names)
        return True
    except (OSError, CheckpointError):
        return False


