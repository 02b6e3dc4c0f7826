"""A block's connection to MLflow: the run it opened, its staging folder and lock, and the pipeline.

``open_connection`` is what entering a ``track`` block does on rank 0 (check the store, open the run,
take the staging folder, replay a previous process's leftovers, start the pipeline); ``Connection``
is what the block logs through, and ``Connection.finish`` is what leaving it does (the final tags,
the end of the run, the wait for the queue, the process's settings put back). The errors that say
what did not reach MLflow are worded here, once, for the training thread and for the block's end.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mlflow_best import _lease as lease
from mlflow_best import _lifecycle as lifecycle
from mlflow_best._config import TrackConfig
from mlflow_best._errors import ConfigError, MlflowBestError, UnsentError
from mlflow_best._lease import LEASE_TAG
from mlflow_best._plot import EpochPoint, plot_filename, render_metric_plot
from mlflow_best._pyfunc import ModelFiles
from mlflow_best._reach import bounded_http, probe
from mlflow_best._recipe import class_path
from mlflow_best._registry import Publisher, alias_holder
from mlflow_best._replay import sync_staging
from mlflow_best._staging import (
    ArtifactOp,
    CheckpointOp,
    EndOp,
    Journal,
    Op,
    StagingLock,
    TagsOp,
    describe,
    read_unsent,
    staging_root,
    sweep,
    write_run_file,
)
from mlflow_best._state import to_plain, unwrap_model
from mlflow_best._tags import TAG
from mlflow_best._version import __version__
from mlflow_best._writer import Pipeline

if TYPE_CHECKING:
    from mlflow import MlflowClient


@dataclass
class Connection:
    """An open block's run in MLflow and the pipeline that carries everything into it."""

    config: TrackConfig
    client: MlflowClient
    tracking_uri: str
    run: Any  # the mlflow Run entity as opened
    owns_run: bool  # False inside the user's own mlflow.start_run(): its owner ends it
    status_before: str  # put back when a resume fails
    staging_dir: Path
    pipeline: Pipeline
    same_store: bool
    # What the block changed for the process (MLflow's HTTP settings, the staging lock), put back at the end.
    scope: contextlib.ExitStack
    fluent: bool = False

    @property
    def run_id(self) -> str:
        return str(self.run.info.run_id)

    @property
    def experiment_id(self) -> str:
        return str(self.run.info.experiment_id)

    def activate(self) -> None:
        """Make the run MLflow's active fluent run inside the block, so ``mlflow.log_*`` lands in it."""
        if self.same_store and self.owns_run:
            lifecycle.push(self.run)
            self.fluent = True

    def abort(self) -> None:
        """A resume that failed: the run's status put back, the pipeline stopped, nothing left RUNNING."""
        journal = self.pipeline.journal
        self.pipeline.submit(TagsOp(journal.next_seq(), {LEASE_TAG: lease.value(released=True)}))
        if self.owns_run:
            self.pipeline.submit(EndOp(journal.next_seq(), self.status_before))
        self.pipeline.close(offline_timeout=5.0)
        self.scope.close()

    def submit_plot(self, history: list[EpochPoint]) -> None:
        """Draw the monitored metric into the staging folder; the pipeline uploads it like the rest."""
        if not history:
            return
        cfg = self.config
        path = render_metric_plot(self.staging_dir / "plots" / plot_filename(cfg.monitor), history,
                                  cfg.monitor, cfg.mode)
        self.pipeline.submit(ArtifactOp(self.pipeline.journal.next_seq(), str(path), "plots"))

    def finish(self, status: str, tags: Mapping[str, str], progress_every: float = 1.0) -> list[Op]:
        """Send the final tags, end the run (if the block owns it), wait for the queue; return what is unsent.

        While uploads remain, a progress line goes to stderr once per ``progress_every`` seconds.

        Whatever fails on the way, the end of the run is submitted and the process's settings put back.
        """
        pipeline = self.pipeline
        try:
            released = {**tags, LEASE_TAG: lease.value(released=True)}
            pipeline.submit(TagsOp(pipeline.journal.next_seq(), released))
        finally:
            if self.owns_run:
                pipeline.submit(EndOp(pipeline.journal.next_seq(), status))
            from mlflow_best._console import progress_line

            pending = pipeline.close(
                self.config.offline_timeout, progress=progress_line, every=progress_every
            )
            if self.fluent:
                lifecycle.pop(self.run_id)
            if pipeline.died is not None and any(isinstance(op, EndOp) for op in pending):
                # The upload thread died and the final flush could not end the run: one last direct call.
                with contextlib.suppress(Exception):
                    self.client.set_terminated(self.run_id, status)
            self.scope.close()
        return pending

    def alias_holder(self) -> str | None:
        """The version the alias points at now (it may be another run's better epoch), for the summary."""
        from mlflow.exceptions import MlflowException

        cfg = self.config
        if not cfg.registered_model or not cfg.alias:
            return None
        try:
            mv = alias_holder(self.client, cfg.registered_model, cfg.alias)
        except MlflowException:
            return None  # only a line of the summary: never worth failing the run's end
        return None if mv is None else str(mv.version)

    def broken(self, why: str) -> UnsentError:
        """A background thread stopped: what is not sent yet, raised in the training thread."""
        try:
            lines = [describe(op) for op in read_unsent(self.staging_dir)]
        except MlflowBestError:
            lines = []
        return UnsentError(
            f"mlflow_best: {why}; nothing more of run {self.run_id} reaches MLflow from this process. "
            f"{len(lines)} item(s) are not sent yet:\n  - " + "\n  - ".join(lines or ["(none)"]) +
            f"\nThey are kept in {self.staging_dir}; leaving the block sends what it can and ends the run, "
            f"and `mlflow-best sync {self.run_id}` sends the rest later",
            str(self.staging_dir),
            lines,
        )

    def unsent(self, pending: list[Op], rejected: list[tuple[Op, str]]) -> UnsentError:
        """What did not reach MLflow by the end of the block, and how to send it."""
        lines = [f"{describe(op)}: refused by MLflow ({why})" for op, why in rejected]
        lines += [describe(op) for op in pending]
        if pending:
            staging_arg = f" --staging-dir {self.config.staging_dir}" if self.config.staging_dir else ""
            fix = ("When the server is back, upload the unsent ones into the same run with "
                   f"mlflow_best.sync({self.run_id!r}) or `mlflow-best sync {self.run_id}`{staging_arg}.")
        else:
            fix = "Refused items are not retried: fix what MLflow named."
        return UnsentError(
            f"mlflow_best: {len(lines)} item(s) of run {self.run_id} did not reach MLflow at "
            f"{self.tracking_uri!r}:\n  - " + "\n  - ".join(lines) + f"\nLocal copies are kept in "
            f"{self.staging_dir} (each checkpoint in the folder named above, every metric in "
            f"{self.staging_dir / 'journal.jsonl'}). " + fix,
            str(self.staging_dir),
            lines,
        )


def open_connection(
    cfg: TrackConfig,
    params: dict[str, str],
    model_files: ModelFiles,
    on_registered: Callable[[CheckpointOp], None],
) -> Connection:
    """Open (create, join or reopen) the block's run with its staging folder, lock and pipeline.

    Nothing is left behind when this raises: the HTTP settings and the lock are put back, and a bad
    staging folder is found before any run is created or changed.
    """
    scope = contextlib.ExitStack()
    # MLflow's HTTP client retries for ~4 minutes by default; our pipeline retries on its own, off
    # the training loop, so while the block runs each single call is kept short (then put back).
    scope.enter_context(bounded_http())
    try:
        return _open(cfg, params, model_files, on_registered, scope)
    except BaseException:
        scope.close()
        raise


def _open(
    cfg: TrackConfig,
    params: dict[str, str],
    model_files: ModelFiles,
    on_registered: Callable[[CheckpointOp], None],
    scope: contextlib.ExitStack,
) -> Connection:
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    tracking_uri = cfg.tracking_uri or mlflow.get_tracking_uri()
    probe(tracking_uri)  # a server that does not answer is said in seconds, naming the URI
    client = MlflowClient(tracking_uri=tracking_uri)
    same_store = cfg.tracking_uri is None or cfg.tracking_uri == mlflow.get_tracking_uri()
    root = staging_root(cfg.staging_dir)
    locked: list[StagingLock] = []

    def take_lock(run_id: str) -> None:
        # One process writes a run at a time: a second resume of a live run is refused here.
        check_writable(root)
        lock = StagingLock(root / run_id)
        lock.acquire(
            f"run {run_id} is still being tracked",
            "A second copy of the same job would log every epoch twice: stop the first one, or start "
            "a new run (resume=None)",
        )
        scope.callback(lock.release)
        locked.append(lock)

    def claim(run: Any) -> None:
        # Before anything is written into an existing run: one live process per run, here and elsewhere.
        lease.check(run)
        take_lock(run.info.run_id)

    spec = lifecycle.RunSpec(cfg, tracking_uri, params, own_tags(cfg), same_store)
    # Checked before a run is created or changed, so a bad staging dir leaves nothing behind.
    run, owns_run, status_before = lifecycle.open_run(client, spec, before=lambda: check_writable(root),
                                                      claim=claim)
    run_id, experiment_id = run.info.run_id, run.info.experiment_id
    staging = root / run_id
    if not locked:
        take_lock(run_id)
    sweep(root, held=staging)  # what killed writes left, here and elsewhere
    leftovers: list[Op] = []
    if cfg.resume is not None:
        # What the previous process left unsent goes first, in order, before anything new.
        replayed = sync_staging(client, staging, quiet=True, timeout=cfg.offline_timeout, resuming=True)
        leftovers = replayed.unsent
    write_run_file(staging, run_file(run_id, experiment_id, tracking_uri, cfg))
    publisher = Publisher(
        client, run_id, experiment_id, cfg.monitor, cfg.criterion, cfg.registered_model, cfg.alias,
        on_registered=on_registered, keep=cfg.keep,
    )
    pipeline = Pipeline(
        Journal(staging),
        publisher,
        extra_files=model_files,
        replay_first=leftovers,
        heartbeat=lambda: client.log_batch(run_id, tags=[RunTag(LEASE_TAG, lease.value())]),
        heartbeat_every=lease.HEARTBEAT_S,
    )
    return Connection(cfg, client, tracking_uri, run, owns_run, status_before, staging, pipeline,
                      same_store, scope)


def own_tags(cfg: TrackConfig) -> dict[str, str]:
    """The tags every tracked run carries: what monitors it, and where its versions go."""
    tags = {TAG + "version": __version__, TAG + "monitor": cfg.monitor, TAG + "mode": cfg.mode}
    if cfg.registered_model:
        tags[TAG + "registered_model"] = cfg.registered_model
        if cfg.alias:
            tags[TAG + "alias"] = cfg.alias
    return tags


def run_params(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, scheduler: Any, cfg: TrackConfig
) -> dict[str, str]:
    """The params a tracked run records: the rule, the model's class and size, the optimizer's settings."""
    net = unwrap_model(model)
    params: dict[str, Any] = {
        "monitor": cfg.monitor,
        "mode": cfg.mode,
        "min_delta": cfg.min_delta,
        "model_class": class_path(net),
        "model_parameters": sum(p.numel() for p in net.parameters()),
    }
    if optimizer is not None:
        params["optimizer_class"] = class_path(optimizer)
        for key, value in optimizer.param_groups[0].items():
            if key != "params" and isinstance(value, (int, float, str, bool, tuple, torch.Tensor)):
                params[f"optimizer.{key}"] = to_plain(value)
    if scheduler is not None:
        params["scheduler_class"] = class_path(scheduler)
    params.update(cfg.params or {})
    return {str(k): str(v)[:6000] for k, v in params.items()}


def run_file(run_id: str, experiment_id: str, tracking_uri: str, cfg: TrackConfig) -> dict[str, Any]:
    """What ``sync`` needs to replay this staging folder into the same run from another process."""
    return {
        "run_id": run_id,
        "experiment_id": experiment_id,
        "tracking_uri": tracking_uri,
        "monitor": cfg.monitor,
        "mode": cfg.mode,
        "min_delta": cfg.min_delta,
        "registered_model": cfg.registered_model,
        "alias": cfg.alias,
        "keep": cfg.keep,
    }


def check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=f".probe-{uuid.uuid4().hex[:6]}") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ConfigError(
            f"staging_dir={str(root)!r} is not writable ({e.strerror or e}); checkpoints are written there "
            "before they are uploaded. Pass staging_dir= a writable folder or set MLFLOW_BEST_HOME"
        ) from e
