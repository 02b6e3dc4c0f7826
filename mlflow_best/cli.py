"""``mlflow-best``: demo, runs, restore, promote and sync from the shell."""

from __future__ import annotations

import math
import sys
from typing import Any

import click

from mlflow_best._errors import MlflowBestError

_URI_HELP = "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)."


def _set_uri(uri: str | None) -> None:
    import mlflow

    if uri:
        mlflow.set_tracking_uri(uri)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MlflowBestError as e:
            click.echo(f"error: {str(e).splitlines()[0]}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlflow-best")
def main() -> None:
    """Keep the best PyTorch model in MLflow, and get it back anywhere."""


@main.command()
@click.option("--epochs", default=15, show_default=True, help="Epochs to train.")
@click.option("--lr", default=0.01, show_default=True, help="Adam learning rate.")
@click.option("--hidden", default=64, show_default=True, help="Hidden units of the MLP.")
@click.option("--experiment", default="digits", show_default=True)
@click.option("--registered-model", default="digits-mlp", show_default=True)
@click.option("--tracking-uri", default=None, help=_URI_HELP)
def demo(epochs: int, lr: float, hidden: int, experiment: str, registered_model: str, tracking_uri: str | None) -> None:
    """Train a small MLP on scikit-learn's bundled digits data through track()."""
    from mlflow_best._demo import run_demo

    _set_uri(tracking_uri)
    run_demo(epochs=epochs, lr=lr, hidden=hidden, experiment=experiment, registered_model=registered_model)


@main.command()
@click.option("--experiment", "-e", default=None, help="Experiment name (default: all experiments).")
@click.option("--tracking-uri", default=None, help=_URI_HELP)
def runs(experiment: str | None, tracking_uri: str | None) -> None:
    """A table of tracked runs: status, best metric, best epoch, version, alias; best first."""
    import mlflow
    from mlflow import MlflowClient

    from mlflow_best._registry import TAG

    _set_uri(tracking_uri)
    client = MlflowClient()
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise click.ClickException(f"experiment {experiment!r} does not exist")
        ids = [exp.experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    found = mlflow.search_runs(ids, filter_string=f"tags.`{TAG}monitor` != ''", output_format="list")
    rows = []
    for r in found:
        tags = r.data.tags
        value = float(tags.get(TAG + "best_value", "nan"))
        mode = tags.get(TAG + "mode", "min")
        alias = ""
        model, version = tags.get(TAG + "registered_model"), tags.get(TAG + "best_version")
        if model and version:
            try:
                mv = client.get_model_version(model, version)
                alias = ",".join(mv.aliases)
            except Exception:
                alias = ""
        rows.append({
            "run_id": r.info.run_id, "run_name": r.info.run_name, "status": r.info.status,
            "monitor": tags.get(TAG + "monitor", ""), "best": value, "mode": mode,
            "best_epoch": tags.get(TAG + "best_epoch", "-"), "version": version or "-",
            "alias": alias or "-",
        })
    if not rows:
        click.echo("no runs tracked by mlflow_best here")
        return
    rows.sort(key=lambda x: (math.isnan(x["best"]), x["best"] if x["mode"] == "min" else -x["best"]))
    import pandas as pd

    frame = pd.DataFrame(rows)
    frame["best"] = frame["best"].map(lambda v: "-" if math.isnan(v) else f"{v:.4f}")
    click.echo(frame.to_string(index=False))


@main.command()
@click.argument("ref")
@click.option("--device", default="cpu", show_default=True, help="Where to load the model (cpu, cuda:0, ...).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the weights as a plain state_dict (.pt) or safetensors (.safetensors) file.")
@click.option("--tracking-uri", default=None, help=_URI_HELP)
def restore(ref: str, device: str, out: str | None, tracking_uri: str | None) -> None:
    """Restore REF (run id, runs:/ID, models:/NAME/VERSION, models:/NAME@ALIAS) and report it."""
    import mlflow_best

    _set_uri(tracking_uri)
    r = mlflow_best.restore(ref, device=device)
    params = sum(p.numel() for p in r.model.parameters())
    click.echo(
        f"restored {type(r.model).__name__} ({params:,} parameters) from epoch {r.epoch} of run {r.run_id}"
        + (f", version {r.version}" if r.version else "")
        + f" onto {device}"
    )
    click.echo("metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in r.metrics.items()))
    if out:
        state = {k: v.detach().cpu().contiguous() for k, v in r.model.state_dict().items()}
        if out.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(state, out)
        else:
            import torch

            torch.save(state, out)
        click.echo(f"wrote {out}")


@main.command()
@click.argument("name")
@click.option("--version", "version", default=None, help="Version to promote.")
@click.option("--best", "best", is_flag=True, help="Promote the best version by its recorded metric.")
@click.option("--alias", default="champion", show_default=True)
@click.option("--tracking-uri", default=None, help=_URI_HELP)
def promote(name: str, version: str | None, best: bool, alias: str, tracking_uri: str | None) -> None:
    """Point ALIAS of registered model NAME at a version (--version V or --best)."""
    import mlflow_best

    if (version is None) == (not best):
        raise click.UsageError("pass exactly one of --version V or --best")
    _set_uri(tracking_uri)
    p = mlflow_best.promote(name, version=version, alias=alias)
    why = f" (best {p.monitor}={p.value:.4f}, mode {p.mode})" if best and p.value is not None else ""
    was = f", was v{p.previous}" if p.previous else ""
    click.echo(f"{name}@{alias} -> v{p.version}{why}{was}")


@main.command()
@click.argument("run_id")
@click.option("--staging-dir", default=None, help="The staging_dir= given to track(), if any.")
@click.option("--tracking-uri", default=None, help="Tracking URI (default: the one the run used).")
def sync(run_id: str, staging_dir: str | None, tracking_uri: str | None) -> None:
    """Upload what RUN_ID could not send (server down, process killed) into that run."""
    import mlflow_best

    n = mlflow_best.sync(run_id, tracking_uri=tracking_uri, staging_dir=staging_dir)
    click.echo(f"sent {n} item(s) of run {run_id}")
