"""What a tracked run prints: the line per epoch, the summary at the end, the UI hint, the progress line.

Pure formatting: each function gets the numbers and returns text (or prints one line); ``Run``
decides when to print.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence

from mlflow_best._shell import command, ui_page


def fmt(value: float | None) -> str:
    """4 decimals for the usual range; scientific where 4 decimals would print 0.0000 or a wall of digits."""
    if value is None:
        return "-"
    if value != 0 and math.isfinite(value) and not 1e-3 <= abs(value) < 1e6:
        return f"{value:.3e}"
    return f"{value:.4f}"


def mark() -> str:
    # A terminal or log file that cannot encode the check mark would raise in print().
    try:
        "✓".encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "*"
    return "✓"


def ui_hint(tracking_uri: str, experiment_id: str, run_id: str) -> list[str]:
    """How to look at this run: the server's page, or the `mlflow ui` command for a database store."""
    if tracking_uri.startswith(("http://", "https://")):
        return [ui_page(tracking_uri, experiment_id, run_id)]
    if "://" in tracking_uri and not tracking_uri.startswith(("databricks", "file:")):
        return [f"{command('mlflow')} ui --backend-store-uri {tracking_uri}",
                f"then {ui_page('http://127.0.0.1:5000', experiment_id, run_id)}"]
    return []


def epoch_line(
    epoch: int,
    values: Mapping[str, float],
    monitor: str,
    *,
    previous: tuple[int | None, float | None],
    best: tuple[int | None, float | None],
    improved: bool,
    last_saved: bool,
    took: float,
) -> str:
    """One epoch's line, e.g.

    ``epoch   3  val_loss=0.4210  | ✓ new best val_loss (was 0.5000, epoch 1), checkpoint taken  [0.21 s]``
    """
    shown = "  ".join(f"{k}={fmt(v)}" for k, v in values.items() if k != f"best_{monitor}")
    if improved:
        was = "first" if previous[1] is None else f"was {fmt(previous[1])}, epoch {previous[0]}"
        status = f"{mark()} new best {monitor} ({was}), checkpoint taken"
    elif best[1] is not None:
        status = f"best {monitor}={fmt(best[1])} at epoch {best[0]}"
        status += ", last state saved" if last_saved else ""
    else:
        status = f"no finite {monitor} yet"
    return f"epoch {epoch:3d}  {shown}  | {status}  [{took:.2f} s]"


def summary(
    *,
    run_id: str,
    status: str,
    epochs: int,
    elapsed: float,
    monitor: str,
    best: tuple[int | None, float | None],
    improvements: int,
    registered: tuple[str, str] | None,
    alias: tuple[str, str] | None,
    plot: str | None,
    ui: Sequence[str],
    pending: int,
    rejected: int,
) -> str:
    """The lines printed when the block ends: the run, its best epoch, the version, the plot, the UI."""
    lines = [f"mlflow_best: run {run_id} {status}, {epochs} epoch(s) in {elapsed:.1f} s"]
    if best[0] is None or best[1] is None:
        lines.append(f"  best          no finite {monitor} was logged, so nothing was checkpointed")
    else:
        lines.append(f"  best          {monitor}={fmt(best[1])} at epoch {best[0]} "
                     f"({improvements} improvement(s), each checkpointed)")
    if registered is not None:
        name, version = registered
        line = f"  registered    {name} v{version}  (models:/{name}/{version})"
        if alias is not None:
            alias_name, holder = alias
            line += f"; @{alias_name} -> v{holder}" + (
                "" if holder == version else " (a better version from another run)"
            )
        lines.append(line)
    if plot is not None:
        lines.append(f"  plot          {plot} in the run's artifacts")
    if ui:
        lines.append(f"  open the UI   {ui[0]}")
        lines.extend(f"                {more}" for more in ui[1:])
    if pending:
        lines.append(f"  not sent      {pending} item(s); see the error below")
    if rejected:
        lines.append(f"  refused       {rejected} item(s) by MLflow; see the error below")
    return "\n".join(lines)


def progress_line(in_flight: int, elapsed: float) -> None:
    """The line the end of the block prints each second while uploads are still going."""
    print(
        f"mlflow_best: finishing {in_flight} upload(s) to MLflow… {elapsed:.0f} s",
        file=sys.stderr,
        flush=True,
    )
