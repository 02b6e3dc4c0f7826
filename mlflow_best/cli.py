"""``mlflow-best``: demo, runs, restore, promote and sync from the shell.

Errors are one line on stderr, ``error: <what is wrong>; <how to fix it>``, with exit status 1 for a
failed operation and 2 for bad usage (click's convention); tracebacks are kept for real bugs.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from mlflow_best._errors import MlflowBestError

_URI_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in this folder)."
_PT_SUFFIXES = (".pt", ".pth", ".bin")


def _use_store(uri: str | None, *, must_exist: bool) -> str:
    """Point MLflow at ``uri`` (or its default) and return it.

    MLflow creates an empty sqlite database for any path it is given: a command that only reads
    (``runs``, ``restore``, ``promote``) run from the wrong folder would litter an empty
    ``mlflow.db`` and report "nothing found". Refuse that with the path instead. A server that does
    not answer is a ``TrackingStoreUnreachableError`` naming the URI.
    """
    import mlflow

    from mlflow_best._reach import probe

    if uri:
        mlflow.set_tracking_uri(uri)
    current = str(mlflow.get_tracking_uri())
    probe(current)  # an unreachable server is reported at once, by its URI, not after minutes of retries
    if must_exist and current.startswith("sqlite:///") and ":memory:" not in current:
        path = Path(current[len("sqlite:///") :].split("?", 1)[0])
        if not path.is_file():
            raise click.ClickException(
                f"no MLflow database at {path.resolve()} (tracking URI {current}); run this from the folder "
                "that holds mlflow.db, or pass --tracking-uri / set MLFLOW_TRACKING_URI"
            )
    return current


class _Group(click.Group):
    """Turns our own errors and MLflow's into one line and a non-zero exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        from mlflow_best._reach import bounded_http

        try:
            # Every command gives up on an unreachable server within seconds, as track() does.
            with bounded_http():
                return super().invoke(ctx)
        except click.UsageError:
            raise  # click shows the usage line with it and exits 2
        except click.ClickException as e:
            _fail(e.format_message())
        except MlflowBestError as e:
            _fail(str(e))
        except Exception as e:
            # Looked up, not imported: `--help` and usage errors must not pay for importing MLflow,
            # and an error raised before MLflow was imported cannot be one of its own.
            mlflow_errors = sys.modules.get("mlflow.exceptions")
            if mlflow_errors is not None and isinstance(e, mlflow_errors.MlflowException):
                _fail(f"MLflow refused the call: {e.message}")
            raise


def _printable(text: str) -> str:
    """``text`` with terminal control characters escaped: names and tags come from the store, and a
    hostile writer could put escape sequences there that rewrite or hide what the terminal shows."""
    return "".join(
        c if c in "\n\t" or not (ord(c) < 32 or 0x7F <= ord(c) <= 0x9F) else f"\\x{ord(c):02x}"
        for c in text
    )


def _echo(text: str, err: bool = False) -> None:
    click.echo(_printable(text), err=err)


def _fail(message: str) -> NoReturn:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    _echo(f"error: {first}", err=True)
    sys.exit(1)


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Run `mlflow-best COMMAND --help` for a command's options.",
)
@click.version_option(package_name="mlflow-best", prog_name="mlflow-best")
def main() -> None:
    """Keep the best PyTorch model in MLflow, and get it back anywhere.

    Every command talks to the tracking store given by --tracking-uri, else $MLFLOW_TRACKING_URI,
    else sqlite:///mlflow.db in the current folder.

    \b
    A day with it:
      mlflow-best demo                            train the digits demo (seconds, CPU)
      mlflow-best runs                            every tracked run, best first
      mlflow-best promote digits-mlp              point @champion at the best version
      mlflow-best restore models:/digits-mlp@champion --out best.pt
      mlflow-best sync RUN_ID                     upload what a run could not send
    """
    # MLflow draws a tqdm bar per download: noise around a one-line report. A user's setting wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@main.command(short_help="Train the digits demo through track() (seconds, CPU).")
@click.option("--epochs", default=15, show_default=True, type=click.IntRange(min=1), help="Epochs to train.")
@click.option("--lr", default=0.01, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Adam learning rate.")
@click.option("--hidden", default=64, show_default=True, type=click.IntRange(min=1), help="Hidden units.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the split, init and shuffling.")
@click.option("--experiment", default="digits", show_default=True, help="MLflow experiment name.")
@click.option("--registered-model", default="digits-mlp", show_default=True,
              help="Registry name the improvements are registered as versions of.")
@click.option("--tracking-uri", default=None, help=_URI_HELP)
def demo(epochs: int, lr: float, hidden: int, seed: int, experiment: str, registered_model: str,
         tracking_uri: str | None) -> None:
    """Train a small MLP on scikit-learn's bundled digits data through track().

    Prints a line per epoch and a summary, registers each improvement as a version of
    --registered-model with alias @best, then restores the best one and reports its test accuracy.
    Nothing is downloaded.
    """
    from mlflow_best._demo import run_demo

    _use_store(tracking_uri, must_exist=False)
    run_demo(epochs=epochs, lr=lr, hidden=hidden, experiment=experiment,
             registered_model=registered_model, seed=seed)


@main.command(short_help="List tracked runs, best first.")
@click.option("--experiment", "-e", default=None, help="Only this experiment (default: all of them).")
@click.option("--tracking-uri", default=None, help=_URI_HELP)
def runs(experiment: str | None, tracking_uri: str | None) -> None:
    """List the runs tracked by mlflow_best, best first.

    One row per run: status, monitored metric and its best value, the epoch it was reached, the
    registered version of that epoch, and the aliases pointing at that version. Runs are sorted
    best first within each metric (lower first for mode min, higher first for mode max). In
    Python, mlflow_best.runs() returns the same rows as a pandas DataFrame.
    """
    import pandas as pd

    import mlflow_best

    _use_store(tracking_uri, must_exist=True)
    found = mlflow_best.runs(experiment, all_experiments=experiment is None)
    if found.empty:
        _echo("no runs tracked by mlflow_best here; train one with `mlflow-best demo` or track()")
        return
    rows = []
    for r in found.itertuples(index=False):
        row = {
            "run_id": r.run_id,
            "run_name": r.run_name,
            "status": r.status,
            "metric": f"{r.monitor} ({r.mode})",
            "best": "-" if math.isnan(r.best_value) else f"{r.best_value:.4f}",
            "epoch": "-" if pd.isna(r.best_epoch) else str(r.best_epoch),
            "version": "-" if pd.isna(r.version) else f"{r.registered_model} v{r.version}",
            "alias": ",".join(f"@{a}" for a in r.aliases) or "-",
        }
        rows.append({"experiment": r.experiment, **row} if experiment is None else row)
    _echo(_table(rows, right={"best", "epoch"}))


def _table(rows: list[dict[str, Any]], right: set[str]) -> str:
    """Plain aligned columns: text left, numbers right, two spaces apart; greppable, no box drawing."""
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}

    def line(cells: dict[str, Any]) -> str:
        return "  ".join(
            str(cells[c]).rjust(widths[c]) if c in right else str(cells[c]).ljust(widths[c]) for c in columns
        ).rstrip()

    return "\n".join([line({c: c for c in columns}), *(line(r) for r in rows)])


@main.command(short_help="Restore a checkpoint; optionally write its weights to a file.")
@click.argument("ref")
@click.option("--device", default="cpu", show_default=True, help="Where to load it: cpu, cuda, cuda:1, ...")
@click.option("--out", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the weights as a plain state_dict: FILE.pt (torch.save) or "
                   "FILE.safetensors (needs `pip install safetensors`).")
@click.option("--tracking-uri", default=None, help=_URI_HELP)
@click.option("--import", "imports", multiple=True, metavar="MODULE",
              help="Import this module first (the one that defines the model); restore never imports what "
                   "a checkpoint names. Repeatable.")
@click.option("--trust-code", is_flag=True,
              help="Call the checkpoint's recorded model_factory even without a -> nn.Module annotation.")
def restore(
    ref: str,
    device: str,
    out: str | None,
    tracking_uri: str | None,
    imports: tuple[str, ...],
    trust_code: bool,
) -> None:
    """Load the model of checkpoint REF (weights only, verified) onto --device, and report what it is.

    \b
    REF is one of:
      RUN_ID or runs:/RUN_ID     that run's best checkpoint
      models:/NAME@ALIAS         the version an alias points at (e.g. @champion, @best)
      models:/NAME/VERSION       a registered version
      models:/MODEL_ID           a logged model (m-...)
      a local checkpoint folder  as written by track()

    The model is rebuilt from the class and model_args recorded at training time. Nothing the
    checkpoint names is imported: name the module that defines the model with --import mymodels.
    Only the weights are downloaded and read (as mlflow_best.load_model): the optimizer and
    training state are left alone, so this works where they cannot be rebuilt.
    """
    writer = _out_writer(out) if out else None
    _use_store(tracking_uri, must_exist=not Path(ref).is_dir())
    import importlib

    from mlflow_best._pyfunc import load_for_inference

    for module in imports:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise click.ClickException(f"--import {module}: cannot be imported here ({e})") from e
    r = load_for_inference(ref, device=device, trust_code=trust_code)
    manifest = r.manifest.data
    params = sum(p.numel() for p in r.model.parameters())
    where = f"run {r.run_id}" + (f", version {r.version}" if r.version else "")
    _echo(f"restored {type(r.model).__name__} ({params:,} parameters) from epoch {r.manifest.epoch} of "
               f"{where}, onto {device}")
    _echo("  metrics     " + "  ".join(f"{k}={float(v):.4f}" for k, v in manifest["metrics"].items()))
    model_info = manifest.get("model") or {}
    _echo(f"  monitor     {manifest.get('monitor')} ({manifest.get('mode')})")
    _echo(f"  model       {model_info.get('class')}  args={model_info.get('args')}")
    _echo(f"  verified    {r.folder}")
    if writer is not None and out is not None:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in r.model.state_dict().items()}
        _write_atomic(Path(out), lambda tmp: writer(state, tmp))
        _echo(f"  wrote       {out} ({len(state)} tensors, {Path(out).stat().st_size:,} bytes)")


def _out_writer(out: str) -> Any:
    """The save function for --out's suffix; checked before the (possibly slow) restore."""
    suffix = Path(out).suffix.lower()
    if suffix == ".safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError as e:
            raise click.ClickException(
                f"--out {out}: writing .safetensors needs the safetensors package, which is not installed "
                "here; pip install safetensors, or write a .pt file instead"
            ) from e
        return lambda state, path: save_file(state, str(path), metadata={"format": "pt"})
    if suffix in _PT_SUFFIXES:
        import torch

        return lambda state, path: torch.save(state, path)
    raise click.BadParameter(
        f"{out!r} has no known suffix; use FILE.pt (a torch state_dict) or FILE.safetensors",
        param_hint="--out",
    )


def _write_atomic(target: Path, write: Any) -> None:
    # A reader of --out never sees half a file, and an existing file survives a failed write.
    from mlflow_best._files import write_atomically

    try:
        write_atomically(target, write, fsync=True)
    except OSError as e:
        raise click.ClickException(f"--out {target}: could not write it ({e.strerror or e})") from e


@main.command(short_help="Point an alias (@champion) at the best or a given version.")
@click.argument("name")
@click.option("--version", "version", default=None, type=click.IntRange(min=1), metavar="V",
              help="Version to promote.")
@click.option("--best", "best", is_flag=True,
              help="Promote the best version by the metric track() recorded on the versions (the default).")
@click.option("--alias", default="champion", show_default=True, help="The alias to point at the version.")
@click.option("--tracking-uri", default=None, help=_URI_HELP)
def promote(name: str, version: int | None, best: bool, alias: str, tracking_uri: str | None) -> None:
    """Point ALIAS of registered model NAME at a version, and say which and why.

    Without --version, the best version is picked by the metric and mode that track() recorded on
    each version (e.g. the lowest val_loss); pruned versions are skipped.

    \b
    Examples:
      mlflow-best promote digits-mlp                  @champion -> the best version
      mlflow-best promote digits-mlp --version 3 --alias staging
    """
    import mlflow_best

    if version is not None and best:
        raise click.UsageError("pass --version V or --best, not both")
    _use_store(tracking_uri, must_exist=True)
    p = mlflow_best.promote(name, version=version, alias=alias)
    _echo(str(p))


@main.command(short_help="Upload what a run could not send to MLflow.")
@click.argument("run_id")
@click.option("--staging-dir", default=None, help="The staging_dir= given to track(), if any.")
@click.option("--tracking-uri", default=None, help="Tracking URI (default: the one the run used).")
def sync(run_id: str, staging_dir: str | None, tracking_uri: str | None) -> None:
    """Upload what RUN_ID could not send (server down, process killed) into that same run.

    Safe to repeat: what MLflow already has is not sent twice.
    """
    import mlflow_best

    n = mlflow_best.sync(run_id, tracking_uri=tracking_uri, staging_dir=staging_dir)
    done = f"nothing to send: MLflow has all of run {run_id}"
    _echo(f"sent {n} item(s) of run {run_id}" if n else done)

