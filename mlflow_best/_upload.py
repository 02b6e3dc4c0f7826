"""Putting a written checkpoint folder into MLflow's artifact store, with as little work as the store allows.

* **A local store** (a path or ``file:``, MLflow's default ``./mlruns``): the staged files are
  hard-linked into place, so a checkpoint is written once, not written and then copied (a second
  full write of every byte). Where a link is impossible (another filesystem, a store that refuses
  links) the file is copied, as MLflow would. Each file lands under a temporary name and is renamed,
  so a reader never sees half a file.
* **A tracking server** (``mlflow-artifacts:``, ``http(s):``): the files are sent a few at a time
  (largest first) instead of one after another.
* **Anything else** (S3, GCS, Azure, ...): MLflow's own ``log_artifacts``.

The repository is resolved with the run's tracking URI, so ``mlflow-artifacts:/`` locations go to
the server ``track(tracking_uri=...)`` names, not to the process's global one.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlflow_best._files import write_atomically

PARALLEL_UPLOADS = 4


def upload_folder(tracking_uri: str, artifact_uri: str, folder: Path) -> str:
    """Put every file of ``folder`` at ``artifact_uri``; returns how: linked, parallel or mlflow."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    repo = get_artifact_repository(artifact_uri, tracking_uri=tracking_uri)
    files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)
    if isinstance(repo, LocalArtifactRepository):
        target = Path(repo.artifact_dir)
        for path in files:
            link_or_copy(path, target / path.relative_to(folder))
        return "linked"
    if isinstance(repo, HttpArtifactRepository) and len(files) > 1:

        def put(path: Path) -> None:
            parent = path.parent.relative_to(folder).as_posix()
            repo.log_artifact(str(path), None if parent == "." else parent)  # type: ignore[no-untyped-call]

        workers = min(PARALLEL_UPLOADS, len(files))
        with ThreadPoolExecutor(workers, thread_name_prefix="mlflow_best-put") as pool:
            for _ in pool.map(put, files):  # the first failure is raised here, after the rest ended
                pass
        return "parallel"
    repo.log_artifacts(str(folder))  # type: ignore[no-untyped-call]
    return "mlflow"


def link_or_copy(source: Path, dest: Path) -> None:
    """``dest`` holds ``source``'s bytes: a hard link where possible, else a copy; renamed into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        if dest.exists() and os.path.samefile(source, dest):
            return  # a retry after the link was made
    except OSError:
        pass

    def link(tmp: Path) -> None:
        try:
            os.link(source, tmp)
        except OSError:  # another filesystem (EXDEV), or links not allowed there
            shutil.copyfile(source, tmp)

    write_atomically(dest, link)
