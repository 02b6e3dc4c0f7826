"""The context manager: enter a run, log every epoch, hand improvements to the pipeline, end the run.

``Run`` only wires the block together. Opening and ending the MLflow run, the staging folder and the
pipeline are ``_connection``; the decision is ``_criterion``; taking a checkpoint is ``_checkpointer``;
what a resume loads is ``_resume``; the console lines are ``_console``; rank 0's gating is ``_distributed``.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from mlflow_best import _console as console
from mlflow_best import _distributed as dist
from mlflow_best import _training as training
from mlflow_best._checkpointer import Checkpointer
from mlflow_best._config import TrackConfig
from mlflow_best._connection import Connection, open_connection, run_params
from mlflow_best._criterion import Best, decide
from mlflow_best._errors import ConfigError, MetricError, UnsentError
from mlflow_best._metrics import check_epoch, check_metrics
from mlflow_best._plot import EpochPoint, plot_filename
from mlflow_best._pyfunc import ModelFiles
from mlflow_best._recipe import check_model_recipe, load_model_state
from mlflow_best._resume import earlier_points, load_latest, warn_relogged
from mlflow_best._staging import CheckpointOp, MetricsOp
from mlflow_best._state import capture_rng, unwrap_model
from mlflow_best._tags import TAG
from mlflow_best._writer import Pipeline

__all__ = ["Best", "Run"]


class Run:
    """A tracked training run; use it through ``with mlflow_best.track(...) as run``.

    Attributes:
        run_id: the MLflow run id (also after the block).
        experiment_id: the MLflow experiment id.
        start_epoch: the first epoch to train: 0, or the epoch after the checkpoint resumed from.
        best: the best epoch so far (``Best``); ``best.version`` is filled once registered.
        staging_dir: the local folder that holds checkpoints and metrics until MLflow has them.
        history: ``EpochPoint(epoch, value, improved)`` per epoch of the monitored metric (of the
            whole run when resumed); drawn into ``plots/<monitor>.png`` at the end.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        config: TrackConfig,
        scheduler: Any = None,
        scaler: Any = None,
        generators: Mapping[str, torch.Generator] | None = None,
        model_factory: Any = None,
        input_example: Any = None,
        code_paths: Sequence[str | os.PathLike[str]] | None = None,
    ) -> None:
        self._leader = dist.rank() == 0
        # Found here, not at restore in another program days later: model_args that do not fit, a
        # model its recorded class cannot rebuild (warned once).
        check_model_recipe(model, model_factory, config.model_args, warn=self._leader)
        # Once, here: the signature costs a forward pass, and a bad example or path fails before any
        # run exists. Every checkpoint's MLmodel is rendered from this by the disk thread.
        self._model_files = ModelFiles.for_run(unwrap_model(model), input_example, code_paths)
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.generators = dict(generators or {})
        self.config = config
        self.run_id = self.experiment_id = self.tracking_uri = ""
        self.start_epoch = 0
        self.best = Best()
        self.staging_dir = Path()
        self.improvements: list[int] = []
        self.history: list[EpochPoint] = []  # the monitored value per epoch, for the console and the plot
        self._last_epoch: int | None = None
        self._last_metrics: dict[str, float] = {}
        self._last_saved_epoch: int | None = None
        self._checkpointer = Checkpointer(model, optimizer, scheduler, scaler, self.generators, config)
        self._conn: Connection | None = None
        self._valid_keys: set[str] = set()
        self._entered = self._closed = False
        self._t_enter = self._t_epoch = time.monotonic()

    # -- start -----------------------------------------------------------------------------------
    def __enter__(self) -> Run:
        state = dist.from_leader(self._start, "start the MLflow run")
        self.run_id, self.experiment_id, self.start_epoch, self.best, resumed = state
        if not self._leader and resumed is not None:
            model_state, training_state = resumed
            self._apply(model_state, training_state, rank=dist.rank())
        self._entered = True
        return self

    def _start(self) -> tuple[str, str, int, Best, Any]:
        """Rank 0: open the run (and load the ``resume=`` checkpoint); returns what all ranks need."""
        cfg = self.config
        conn = open_connection(cfg, run_params(self.model, self.optimizer, self.scheduler, cfg),
                               self._model_files, self._on_registered)
        self._conn = conn
        self.run_id, self.experiment_id = conn.run_id, conn.experiment_id
        self.tracking_uri, self.staging_dir = conn.tracking_uri, conn.staging_dir
        try:
            resumed = self._resume(conn) if cfg.resume is not None else None
        except BaseException:
            # A checkpoint that does not fit (or cannot be read) must not leave the run RUNNING
            # with idle threads: its status is put back and the pipeline stopped.
            conn.abort()
            self._closed = True
            raise
        self._t_enter = self._t_epoch = time.monotonic()
        conn.activate()
        return self.run_id, self.experiment_id, self.start_epoch, self.best, resumed

    def _resume(self, conn: Connection) -> tuple[Any, Any] | None:
        """Load the newest checkpoint into the training objects; returns it for the other ranks."""
        self.best, found = load_latest(conn.client, self.run_id)
        resumed = None
        if found is not None:
            model_state, training_state = found
            self._apply(model_state, training_state, rank=0)
            self._last_epoch = self._last_saved_epoch = training.epoch_of(training_state)
            self.start_epoch = self._last_epoch + 1
            resumed = found if dist.active() else None
        self.history, logged_until = earlier_points(conn.client, self.run_id, self.config, self.start_epoch)
        if found is not None:
            warn_relogged(self.run_id, self.start_epoch, logged_until, self.config.save_last_every)
        return resumed

    def _apply(self, model_state: Any, training_state: Any, rank: int) -> None:
        source = "the resumed checkpoint"
        load_model_state(unwrap_model(self.model), model_state, source=source)
        training.apply(
            training_state, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
            generators=self.generators, source=source, rank=rank,
        )

    # -- per epoch -------------------------------------------------------------------------------
    def log_epoch(self, epoch: int, metrics: Mapping[str, Any]) -> bool:
        """Log one epoch's metrics; checkpoint and register when the monitored metric improved.

        Returns without waiting for disk or network: the state is copied to CPU memory and the
        pipeline writes, uploads and registers it in the background.

        Args:
            epoch: the epoch number, increasing from ``run.start_epoch``; used as MLflow's step.
            metrics: name -> number (float, int, 0-d tensor, numpy scalar); must hold the monitor.

        Returns:
            True when this epoch improved on the best so far (and a checkpoint was taken).

        Raises:
            MetricError: the monitor is missing or a value is not a number (on every rank under
                ``torch.distributed``, whichever rank passed it).
            ConfigError: called outside the ``with`` block.
            CheckpointError: the training state could not be copied (e.g. a model on the ``meta``
                device); ``run.best`` is unchanged.
            UnsentError: a background thread stopped; lists what did not reach MLflow.
        """
        if not self._entered or self._closed:
            raise ConfigError(
                f"log_epoch(epoch={epoch!r}) called outside the `with mlflow_best.track(...) as run:` block "
                f"(the run {'has ended' if self._closed else 'has not started'}); call it inside the block, "
                "or resume the run with track(resume=run.run_id)"
            )
        if self._leader:
            why = self._require_pipeline().check()
            if why is not None:
                raise self._require_conn().broken(why)
            # What the background threads had to say, said here (before this epoch changes anything:
            # under a warnings-as-errors filter this call then fails as a whole).
            self._emit_notices()
        problem: MetricError | None = None
        try:
            epoch = check_epoch(epoch, self._last_epoch)
            values = check_metrics(metrics, self.config.monitor, self._valid_keys)
        except MetricError as e:
            problem = e
        dist.raise_if_any(problem)
        cfg = self.config
        value = values[cfg.monitor]
        decision = (False, False, value)
        if self._leader:
            decision = (*decide(cfg.criterion, value, self.best.value, epoch, self._last_saved_epoch,
                                cfg.save_last_every), value)
        # Rank 0's value too: run.best must read the same on every rank, not each rank's local metric.
        improved, last_due, value = dist.broadcast(decision)
        rngs = dist.gather(capture_rng(self.generators)) if (improved or last_due) and dist.active() else None
        previous = self.best
        if self._leader:
            if improved:
                values[f"best_{cfg.monitor}"] = value
            elif previous.value is not None:
                values[f"best_{cfg.monitor}"] = previous.value
            if improved or last_due:
                # The copy comes first: a state that cannot be copied fails here, with run.best as it was.
                self._checkpoint(epoch, values, "best" if improved else "last", rngs)
            else:
                pipeline = self._require_pipeline()
                now_ms = int(time.time() * 1000)
                pipeline.submit(MetricsOp(pipeline.journal.next_seq(), epoch, values, now_ms))
        self._last_epoch = epoch
        if improved:
            self.best = Best(epoch=epoch, value=value)
            self.improvements.append(epoch)
        if self._leader:
            self._last_metrics = values
            self.history.append(EpochPoint(epoch, value, bool(improved)))
            self._print_epoch(epoch, values, previous, bool(improved), bool(last_due))
        return bool(improved)

    @property
    def _pipeline(self) -> Pipeline | None:
        return None if self._conn is None else self._conn.pipeline

    def _emit_notices(self) -> None:
        """Warnings the background threads collected, emitted here in the training thread."""
        if self._pipeline is not None:
            for message in self._pipeline.notices.take():
                warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _checkpoint(self, epoch: int, values: dict[str, float], kind: str, rngs: list[Any] | None) -> None:
        pipeline = self._require_pipeline()
        self._checkpointer.take(pipeline, self.staging_dir, self.run_id, epoch, values, kind, rngs)
        self._last_saved_epoch = epoch

    def _on_registered(self, op: CheckpointOp) -> None:
        if self.best.epoch == op.epoch:
            self.best.version = op.progress.get("version")
            self.best.model_id = op.progress.get("model_id")

    def _require_conn(self) -> Connection:
        if self._conn is None or self._closed:
            raise ConfigError(
                "log_epoch called outside the `with mlflow_best.track(...) as run:` block; "
                "call it inside the block (the run has ended or not started)"
            )
        return self._conn

    def _require_pipeline(self) -> Pipeline:
        return self._require_conn().pipeline

    def _print_epoch(self, epoch: int, values: dict[str, float], previous: Best, improved: bool,
                     last_saved: bool) -> None:
        now = time.monotonic()
        took, self._t_epoch = now - self._t_epoch, now
        if self._verbose():
            print(console.epoch_line(
                epoch, values, self.config.monitor, previous=(previous.epoch, previous.value),
                best=(self.best.epoch, self.best.value), improved=improved, last_saved=last_saved, took=took,
            ), flush=True)

    def _verbose(self) -> bool:
        return self.config.verbose if self.config.verbose is not None else sys.stdout.isatty()

    # -- end -------------------------------------------------------------------------------------
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._leader:
            return None
        from mlflow.entities import RunStatus

        if exc_type is None:
            status = RunStatus.to_string(RunStatus.FINISHED)
        elif issubclass(exc_type, KeyboardInterrupt):
            status = RunStatus.to_string(RunStatus.KILLED)
        else:
            status = RunStatus.to_string(RunStatus.FAILED)
        try:
            self._finish(status, crashed=exc_type is not None)
        except UnsentError as e:
            if exc_type is None:
                raise
            warnings.warn(str(e), RuntimeWarning, stacklevel=2)
        except Exception as e:
            if exc_type is None:
                raise
            warnings.warn(
                f"mlflow_best: ending run {self.run_id} failed ({e!r}); the exception raised in the "
                "block follows",
                RuntimeWarning,
                stacklevel=2,
            )
        return None

    def _finish(self, status: str, crashed: bool) -> None:
        conn = self._require_conn()
        problems: list[str] = []
        pending: list[Any] = []
        try:
            last = self._last_epoch
            unsaved = last is not None and last != self._last_saved_epoch
            if crashed and self.config.save_last_every and last is not None and unsaved:
                # The seed practice: a crash must not lose progress. The state as it is now,
                # labelled with the last completed epoch, so resume continues from here.
                try:
                    self._checkpoint(last, dict(self._last_metrics), "last", None)
                except Exception as e:  # the run still ends; the error is said below
                    problems.append(f"the state at the crash could not be saved ({e})")
            try:
                conn.submit_plot(self.history)
            except Exception as e:  # a picture is never worth failing the run's end
                problems.append(f"could not draw plots/{plot_filename(self.config.monitor)} ({e!r}); "
                                "the run is complete without it")
        finally:
            # Whatever happened above, the run is ended: never left RUNNING.
            self._closed = True
            summary = {TAG + "improvements": ",".join(map(str, self.improvements))[:5000] or "none"}
            # A terminal sees the wait each second; a log file only a long one (a wait, not a hang).
            pending = conn.finish(status, summary, progress_every=1.0 if self._verbose() else 10.0)
        rejected = conn.pipeline.rejected
        if self._verbose():
            self._print_summary(conn, status, pending, rejected)
        warning: Warning | None = None
        try:
            self._emit_notices()
            for problem in problems:
                warnings.warn(f"mlflow_best: run {self.run_id}: {problem}", RuntimeWarning, stacklevel=4)
        except Warning as w:  # the user's filter turned one into an error: raised after the list below
            warning = w
        if pending or rejected:
            raise conn.unsent(pending, rejected) from warning
        if warning is not None:
            raise warning

    def _print_summary(self, conn: Connection, status: str, pending: list[Any], rejected: list[Any]) -> None:
        cfg, b = self.config, self.best
        registered = (cfg.registered_model, b.version) if cfg.registered_model and b.version else None
        holder = conn.alias_holder() if registered and cfg.alias and not pending else None
        print(console.summary(
            run_id=self.run_id, status=status, epochs=len(self.history),
            elapsed=time.monotonic() - self._t_enter, monitor=cfg.monitor, best=(b.epoch, b.value),
            improvements=len(self.improvements), registered=registered,
            alias=(cfg.alias, holder) if cfg.alias and holder is not None else None,
            plot=f"plots/{plot_filename(cfg.monitor)}" if self.history and not pending else None,
            ui=console.ui_hint(self.tracking_uri, self.experiment_id, self.run_id),
            pending=len(pending), rejected=len(rejected),
        ), flush=True)
