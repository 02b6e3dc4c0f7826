"""What a resumed run looks back at: its best so far, its newest checkpoint, its monitored history
(for the plot) and epochs that will be logged twice."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from mlflow_best._config import TrackConfig
from mlflow_best._criterion import Best
from mlflow_best._plot import EpochPoint
from mlflow_best._tags import TAG

if TYPE_CHECKING:
    from mlflow import MlflowClient


def load_latest(client: MlflowClient, run_id: str) -> tuple[Best, tuple[Any, Any] | None]:
    """The run's best so far (from its tags) and its newest checkpoint ``(model_state, training_state)``.

    None for the checkpoint when the run has none yet (warned: the block starts at epoch 0).
    """
    from mlflow_best._restore import latest_checkpoint

    tags = client.get_run(run_id).data.tags
    best = Best()
    if TAG + "best_value" in tags:
        best = Best(
            epoch=int(tags[TAG + "best_epoch"]),
            value=float(tags[TAG + "best_value"]),
            version=tags.get(TAG + "best_version"),
            model_id=tags.get(TAG + "best_model_id"),
        )
    found = latest_checkpoint(client, run_id)
    if found is None:
        warnings.warn(
            f"mlflow_best: run {run_id} has no checkpoint yet; resuming at epoch 0 with the "
            "model and optimizer as given",
            RuntimeWarning,
            stacklevel=6,
        )
    return best, found


def earlier_points(
    client: MlflowClient, run_id: str, cfg: TrackConfig, before: int
) -> tuple[list[EpochPoint], int | None]:
    """The monitored history of a resumed run (its plot covers every epoch), and its last logged epoch."""
    from mlflow.exceptions import MlflowException

    try:
        history = sorted(client.get_metric_history(run_id, cfg.monitor), key=lambda m: (m.step, m.timestamp))
    except MlflowException:
        return [], None
    points: list[EpochPoint] = []
    best: float | None = None
    for m in history:
        if m.step >= before or (points and points[-1].epoch == m.step):
            continue
        improved = cfg.criterion.improves(float(m.value), best)
        best = float(m.value) if improved else best
        points.append(EpochPoint(int(m.step), float(m.value), improved))
    return points, (int(history[-1].step) if history else None)


def warn_relogged(run_id: str, start_epoch: int, logged_until: int | None, save_last_every: int) -> None:
    """Resuming from a checkpoint older than the last logged epoch logs those epochs a second time."""
    if logged_until is None or logged_until < start_epoch:
        return
    epochs = f"epoch {start_epoch} was" if logged_until == start_epoch else (
        f"epochs {start_epoch}-{logged_until} were"
    )
    fix = (
        "pass save_last=True to track so a resume starts after the last epoch"
        if not save_last_every
        else f"save_last={save_last_every} saves every {save_last_every} epochs; save_last=True saves each"
    )
    warnings.warn(
        f"mlflow_best: run {run_id} resumes at epoch {start_epoch} (after its newest checkpoint), but "
        f"{epochs} already logged; they are trained and logged again (MLflow keeps both rows). "
        f"To avoid it, {fix}",
        RuntimeWarning,
        stacklevel=6,
    )
