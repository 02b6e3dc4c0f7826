"""Regenerate ``mlruns.example/``: a small MLflow store to browse and restore from, from any checkout.

    python scripts/make_example_store.py            # or: make example-store

MLflow 3 refuses the plain file store, and a sqlite store made the usual way records absolute
artifact paths (``/home/me/repo/mlruns/1/...``) that break once the folder moves. So the runs are
created through a temporary ``mlflow server --serve-artifacts``: every artifact URI in the database is
then ``mlflow-artifacts:/...``, relative to whatever ``--artifacts-destination`` the viewer passes.

What it holds: three runs of the digits MLP (``hidden=16``) with different learning rates, every
improvement registered as a version of ``digits-mlp``, alias ``@best`` moved by ``track`` and
``@champion`` set by ``promote``. About 1 MB; the script fails if it grows past 2 MB or if any
absolute path of this machine ends up in the database.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "digits-mlp"
EXPERIMENT = "digits-example"
SETTINGS = [  # (run name, learning rate): one fast, one steady, one too slow to finish
    ("lr=0.05", 0.05),
    ("lr=0.01", 0.01),
    ("lr=0.002", 0.002),
]
EPOCHS = 6
LIMIT_BYTES = 2_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(store: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server",
             "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
             "--artifacts-destination", str(store / "artifacts"),
             "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited early; its log:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)
    _stop(proc)
    raise RuntimeError(f"mlflow server did not answer within 120 s; its log:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _train(url: str) -> None:
    import logging

    import torch

    import mlflow_best
    from mlflow_best._demo import DigitsMLP, evaluate, load_digits_data, train_epoch

    # MLflow logs "waiting for model version to finish creation" per version: noise here.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    data = load_digits_data(seed=0)
    for name, lr in SETTINGS:
        torch.manual_seed(0)
        model = DigitsMLP(hidden=16)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(0)
        with mlflow_best.track(
            model, opt, monitor="val_loss", mode="min", experiment=EXPERIMENT, registered_model=MODEL,
            alias="best", run_name=name, model_args={"hidden": 16},
            params={"lr": lr, "hidden": 16, "epochs": EPOCHS}, generators={"loader": gen},
            tags={"example": "mlruns.example"}, tracking_uri=url, verbose=True,
        ) as run:
            for epoch in range(EPOCHS):
                tl = train_epoch(model, opt, data, gen)
                vl, va = evaluate(model, data.x_val, data.y_val)
                run.log_epoch(epoch, {"train_loss": tl, "val_loss": vl, "val_acc": va})
    print(mlflow_best.promote(MODEL, alias="champion", tracking_uri=url))
    restored = mlflow_best.restore(f"models:/{MODEL}@champion", tracking_uri=url)
    _, acc = evaluate(restored.model, data.x_test, data.y_test)
    print(f"champion v{restored.version}: test accuracy {acc:.3f}")


def _check(store: Path, scratch: Path) -> int:
    """Fail on anything that would not survive a move: local paths in the database, or a large store."""
    db = sqlite3.connect(store / "mlflow.db")
    try:
        # MLflow's schema is ~220 tables and indexes of at least one page each: 1 KiB pages instead
        # of 4 KiB make the empty schema ~250 KB instead of ~900 KB. VACUUM applies the page size
        # and drops deleted rows; any sqlite reads either.
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("PRAGMA page_size=1024")
        db.execute("VACUUM")
        dump = "\n".join(db.iterdump())
    finally:
        db.close()
    for local in {str(store), str(scratch), str(ROOT), str(Path.home()), tempfile.gettempdir() + "/"}:
        if local in dump:
            raise RuntimeError(f"the example database holds the local path {local!r}: it breaks elsewhere")
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    if size > LIMIT_BYTES:
        raise RuntimeError(f"the example store is {size:,} bytes, over the {LIMIT_BYTES:,} byte budget")
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "mlruns.example", help="where to write the store")
    target = parser.parse_args().out.resolve()
    readme = target / "README.md"
    kept = readme.read_text(encoding="utf-8") if readme.is_file() else None
    # Built next to the target and swapped in at the end: a failure leaves the old store intact.
    build = Path(tempfile.mkdtemp(prefix=".mlruns.example-", dir=target.parent))
    build.chmod(0o755)  # mkdtemp's 0700 would make a shared checkout's store private
    scratch = Path(tempfile.mkdtemp(prefix="mlflow-best-example-"))
    os.environ["MLFLOW_BEST_HOME"] = str(scratch / "home")  # staging and cache stay out of the store
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        proc, url = _start_server(build, scratch / "server.log")
        try:
            _train(url)
        finally:
            _stop(proc)
        size = _check(build, scratch)
        if kept is not None:
            (build / "README.md").write_text(kept, encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(build, target)
    finally:
        shutil.rmtree(build, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"wrote {target} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
