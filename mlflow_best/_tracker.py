"""The context manager: start or resume a run, log every epoch, hand improvements to the pipeline."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch

from mlflow_best import _console as console
from mlflow_best import _distributed as dist
from mlflow_best import _errors
from mlflow_best import _lease as lease
from mlflow_best import _lifecycle as lifecycle
from mlflow_best import _training as training
from mlflow_best._checkpointer import Checkpointer
from mlflow_best._config import TrackConfig
from mlflow_best._errors import (
    ConfigError,
    MetricError,
    MlflowBestError,
    TrackingStoreError,
    UnsentError,
)
from mlflow_best._lease import LEASE_TAG
from mlflow_best._metrics import check_epoch, check_metrics
from mlflow_best._plot import EpochPoint, plot_filename, render_metric_plot
from mlflow_best._pyfunc import ModelFiles
from mlflow_best._reach import bounded_http, probe
from mlflow_best._recipe import (
    check_model_recipe,
    class_path,
    load_model_state,
)
from mlflow_best._registry import Publisher, alias_holder
from mlflow_best._replay import sync_staging
from mlflow_best._resume import earlier_points, warn_relogged
from mlflow_best._staging import (
    ArtifactOp,
    CheckpointOp,
    EndOp,
    Journal,
    MetricsOp,
    StagingLock,
    TagsOp,
    describe,
    staging_root,
    sweep,
    write_run_file,
)
from mlflow_best._state import capture_rng, to_plain, unwrap_model
from mlflow_best._tags import TAG
from mlflow_best._version import __version__
from mlflow_best._writer import Pipeline

if TYPE_CHECKING:
    from mlflow import MlflowClient



@dataclass
class Best:
    """The best epoch so far: its number, monitored value, and registered version once published."""

    epoch: int | None = None
    value: float | None = None
    version: str | None = None
    model_id: str | None = None


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
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"model={type(model).__name__} must be a torch.nn.Module")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"optimizer={type(optimizer).__name__} must be a torch.optim.Optimizer or None")
        for name, obj in (("scheduler", scheduler), ("scaler", scaler)):
            if obj is not None and not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise ConfigError(f"{name}={type(obj).__name__} has no state_dict/load_state_dict; pass None")
        if generators is not None and not all(isinstance(g, torch.Generator) for g in generators.values()):
            raise ConfigError("generators= must map names to torch.Generator objects, e.g. {'loader': g}")
        self._leader = dist.rank() == 0
        # Found here, not at restore in another program days later: model_args that do not fit, a
        # model its recorded class cannot rebuild (warned once).
        check_model_recipe(model, model_factory, config.model_args, warn=self._leader)
        # Once, here: the signature costs a forward pass, and a bad example or path fails before any
        # run exists. Every checkpoint's MLmodel is rendered from this by the disk thread.
        self._model_files = ModelFiles.for_run(unwrap_model(model), input_example, code_paths)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.generators = dict(generators or {})
        self.config = config
        self.run_id: str = ""
        self.experiment_id: str = ""
        self.start_epoch = 0
        self.best = Best()
        self.staging_dir = Path()
        self.tracking_uri = ""
        self.improvements: list[int] = []
        self._last_epoch: int | None = None
        self._last_metrics: dict[str, float] = {}
        self._last_saved_epoch: int | None = None
        self._pipeline: Pipeline | None = None
        self._checkpointer = Checkpointer(model, optimizer, scheduler, scaler, self.generators, config)
        self._client: MlflowClient | None = None
        self._fluent = False
        self._valid_keys: set[str] = set()
        self._owns_run = True  # False inside the user's own mlflow.start_run(): its owner ends it
        self._entered = False
        self._closed = False
        self._lock: StagingLock | None = None
        # MLflow's HTTP client retries for ~4 minutes by default; our pipeline retries on its own, off
        # the training loop, so while the block runs each single call is kept short (then put back).
        self._scope = contextlib.ExitStack()
        self._status_before_resume = "FAILED"
        # The monitored value per epoch, for the console lines and the plot logged at the end.
        self.history: list[EpochPoint] = []
        self._t_enter = time.monotonic()
        self._t_epoch = self._t_enter

    # -- start -----------------------------------------------------------------------------------
    def __enter__(self) -> Run:
        failure: BaseException | None = None
        if self._leader:
            try:
                self._start()
            except BaseException as e:
                failure = e
        # The other ranks wait here for rank 0's run. If rank 0 could not start it, they must fail
        # too, with its reason, instead of waiting in this broadcast forever.
        message: dict[str, Any] | None = None
        if self._leader and failure is not None:
            message = {"error": (type(failure).__name__, str(failure))}
        elif self._leader:
            state = (self.run_id, self.experiment_id, self.start_epoch, self.best, self._resume_payload())
            message = {"state": state}
        message = dist.broadcast(message)
        if failure is not None:
            raise failure
        assert message is not None
        if "error" in message:
            name, text = message["error"]
            cls = getattr(_errors, name, None)
            if not (isinstance(cls, type) and issubclass(cls, MlflowBestError)) or cls is UnsentError:
                cls = TrackingStoreError
            rank = dist.rank()
            raise cls(f"rank 0 could not start the MLflow run, so rank {rank} stops too ({name}: {text})")
        self.run_id, self.experiment_id, self.start_epoch, self.best, payload = message["state"]
        if not self._leader and payload is not None:
            self._apply(payload[0], payload[1], rank=dist.rank())
        self._resume_state: Any = None
        self._entered = True
        return self

    def _resume_payload(self) -> Any:
        return getattr(self, "_resume_state", None)

    def _start(self) -> None:
        self._scope.enter_context(bounded_http())
        try:
            self._open()
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        """Put back what the block changed for the process: MLflow's HTTP settings, the staging lock."""
        self._scope.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _open(self) -> None:
        import mlflow
        from mlflow import MlflowClient
        from mlflow.entities import RunTag

        cfg = self.config
        self.tracking_uri = cfg.tracking_uri or mlflow.get_tracking_uri()
        probe(self.tracking_uri)  # a server that does not answer is said in seconds, naming the URI
        client = MlflowClient(tracking_uri=self.tracking_uri)
        self._client = client
        same_store = cfg.tracking_uri is None or cfg.tracking_uri == mlflow.get_tracking_uri()
        spec = lifecycle.RunSpec(cfg, self.tracking_uri, self._params(), self._own_tags(), same_store)
        # Checked before a run is created or changed, so a bad staging dir leaves nothing behind.
        opened = lifecycle.open_run(client, spec, before=lambda: _check_writable(self._staging_root()),
                                    claim=self._claim)
        run, self._owns_run, self._status_before_resume = opened
        self.run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id
        self.staging_dir = self._staging_for(self.run_id)
        if self._lock is None:
            self._take_lock(self.run_id)
        sweep(self._staging_root(), held=self.staging_dir)  # what killed writes left, here and elsewhere
        leftovers: list[Any] = []
        if cfg.resume is not None:
            # What the previous process left unsent goes first, in order, before anything new.
            leftovers = sync_staging(
                client, self.staging_dir, quiet=True, timeout=cfg.offline_timeout, resuming=True
            ).unsent
        journal = Journal(self.staging_dir)
        _write_run_file(self.staging_dir, self.run_id, self.experiment_id, self.tracking_uri, cfg)
        publisher = Publisher(
            client,
            self.run_id,
            self.experiment_id,
            cfg.monitor,
            cfg.criterion,
            cfg.registered_model,
            cfg.alias,
            on_registered=self._on_registered,
            keep=cfg.keep,
        )
        self._pipeline = Pipeline(
            journal,
            publisher,
            extra_files=self._model_files,
            replay_first=leftovers,
            heartbeat=lambda: client.log_batch(self.run_id, tags=[RunTag(LEASE_TAG, lease.value())]),
            heartbeat_every=lease.HEARTBEAT_S,
        )
        if cfg.resume is not None:
            try:
                self._load_latest(client)
            except BaseException:
                # A checkpoint that does not fit (or cannot be read) must not leave the run
                # RUNNING with idle threads: put its status back and stop the pipeline.
                self._pipeline.submit(TagsOp(journal.next_seq(), {LEASE_TAG: lease.value(released=True)}))
                if self._owns_run:
                    self._pipeline.submit(EndOp(journal.next_seq(), self._status_before_resume))
                self._pipeline.close(offline_timeout=5.0)
                self._closed = True
                raise
            self.history, logged_until = earlier_points(client, self.run_id, cfg, self.start_epoch)
            if self._last_epoch is not None:  # resumed from a checkpoint (else warned already)
                warn_relogged(self.run_id, self.start_epoch, logged_until, cfg.save_last_every)
        self._t_enter = self._t_epoch = time.monotonic()
        if same_store and self._owns_run:
            # The run is the active fluent run inside the block, so mlflow.log_* calls land in it.
            lifecycle.push(run)
            self._fluent = True

    def _claim(self, run: Any) -> None:
        """Before anything is written into an existing run: one live process per run, here and elsewhere."""
        lease.check(run)
        self._take_lock(run.info.run_id)

    def _take_lock(self, run_id: str) -> None:
        """One process writes a run at a time: a second resume of a live run is refused here."""
        _check_writable(self._staging_root())
        lock = StagingLock(self._staging_for(run_id))
        lock.acquire(
            f"run {run_id} is still being tracked",
            "A second copy of the same job would log every epoch twice: stop the first one, or start "
            "a new run (resume=None)",
        )
        self._lock = lock

    def _own_tags(self) -> dict[str, str]:
        cfg = self.config
        tags = {
            TAG + "version": __version__,
            TAG + "monitor": cfg.monitor,
            TAG + "mode": cfg.mode,
        }
        if cfg.registered_model:
            tags[TAG + "registered_model"] = cfg.registered_model
            if cfg.alias:
                tags[TAG + "alias"] = cfg.alias
        return tags

    def _params(self) -> dict[str, str]:
        cfg = self.config
        net = unwrap_model(self.model)
        params: dict[str, Any] = {
            "monitor": cfg.monitor,
            "mode": cfg.mode,
            "min_delta": cfg.min_delta,
            "model_class": class_path(net),
            "model_parameters": sum(p.numel() for p in net.parameters()),
        }
        if self.optimizer is not None:
            params["optimizer_class"] = class_path(self.optimizer)
            group = self.optimizer.param_groups[0]
            for key, value in group.items():
                if key != "params" and isinstance(value, (int, float, str, bool, tuple, torch.Tensor)):
                    params[f"optimizer.{key}"] = to_plain(value)
        if self.scheduler is not None:
            params["scheduler_class"] = class_path(self.scheduler)
        params.update(cfg.params or {})
        return {str(k): str(v)[:6000] for k, v in params.items()}

    def _staging_root(self) -> Path:
        return staging_root(self.config.staging_dir)

    def _staging_for(self, run_id: str) -> Path:
        return self._staging_root() / run_id

    # -- resume ----------------------------------------------------------------------------------
    def _load_latest(self, client: MlflowClient) -> None:
        from mlflow_best._restore import latest_checkpoint

        tags = client.get_run(self.run_id).data.tags
        if TAG + "best_value" in tags:
            self.best = Best(
                epoch=int(tags[TAG + "best_epoch"]),
                value=float(tags[TAG + "best_value"]),
                version=tags.get(TAG + "best_version"),
                model_id=tags.get(TAG + "best_model_id"),
            )
        found = latest_checkpoint(client, self.run_id)
        if found is None:
            warnings.warn(
                f"mlflow_best: run {self.run_id} has no checkpoint yet; resuming at epoch 0 with the "
                "model and optimizer as given",
                RuntimeWarning,
                stacklevel=4,
            )
            return
        model_state, training_state = found
        self._apply(model_state, training_state, rank=0)
        self._resume_state = (model_state, training_state) if dist.active() else None
        self.start_epoch = training.epoch_of(training_state) + 1
        self._last_epoch = training.epoch_of(training_state)
        self._last_saved_epoch = self._last_epoch

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
            self._raise_if_broken()
            # What the background threads had to say, said here (before this epoch changes anything:
            # under a warnings-as-errors filter this call then fails as a whole).
            self._emit_notices()
        try:
            epoch, values = self._check_metrics(epoch, metrics)
            problem = None
        except MetricError as e:
            problem = e
        if dist.active():
            # A bad metric on any rank stops every rank here, before the next collective.
            problems = dist.gather(None if problem is None else str(problem))
            bad = [(r, text) for r, text in enumerate(problems) if text is not None]
            if bad:
                raise MetricError(f"rank {bad[0][0]}: {bad[0][1]}") from problem
        if problem is not None:
            raise problem
        value = values[self.config.monitor]
        decision = (False, False, value)
        if self._leader:
            improved = self.config.criterion.improves(value, self.best.value)
            every = self.config.save_last_every
            last_due = (
                not improved
                and every > 0
                and (self._last_saved_epoch is None or epoch - self._last_saved_epoch >= every)
            )
            decision = (improved, last_due, value)
        # Rank 0's value too: run.best must read the same on every rank, not each rank's local metric.
        improved, last_due, value = dist.broadcast(decision)
        rngs = dist.gather(capture_rng(self.generators)) if (improved or last_due) and dist.active() else None
        previous = self.best
        if self._leader:
            if improved:
                values[f"best_{self.config.monitor}"] = value
            elif previous.value is not None:
                values[f"best_{self.config.monitor}"] = previous.value
            if improved or last_due:
                # The copy comes first: a state that cannot be copied fails here, with run.best as it was.
                self._checkpoint(epoch, values, "best" if improved else "last", rngs)
            else:
                self._require_pipeline().submit(
                    MetricsOp(self._require_pipeline().journal.next_seq(), epoch, values, _now_ms())
                )
        self._last_epoch = epoch
        if improved:
            self.best = Best(epoch=epoch, value=value)
            self.improvements.append(epoch)
        if self._leader:
            self._last_metrics = values
            self.history.append(EpochPoint(epoch, value, bool(improved)))
            self._print_epoch(epoch, values, previous, bool(improved), bool(last_due))
        return bool(improved)

    def _emit_notices(self) -> None:
        """Warnings the background threads collected, emitted here in the training thread."""
        if self._pipeline is not None:
            for message in self._pipeline.notices.take():
                warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _raise_if_broken(self) -> None:
        pipeline = self._require_pipeline()
        why = pipeline.check()
        if why is None:
            return
        from mlflow_best._staging import read_unsent

        try:
            lines = [describe(op) for op in read_unsent(self.staging_dir)]
        except MlflowBestError:
            lines = []
        raise UnsentError(
            f"mlflow_best: {why}; nothing more of run {self.run_id} reaches MLflow from this process. "
            f"{len(lines)} item(s) are not sent yet:\n  - " + "\n  - ".join(lines or ["(none)"]) +
            f"\nThey are kept in {self.staging_dir}; leaving the block sends what it can and ends the run, "
            f"and `mlflow-best sync {self.run_id}` sends the rest later",
            str(self.staging_dir),
            lines,
        )

    def _check_metrics(self, epoch: int, metrics: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
        epoch = check_epoch(epoch, self._last_epoch)
        return epoch, check_metrics(metrics, self.config.monitor, self._valid_keys)

    def _checkpoint(self, epoch: int, values: dict[str, float], kind: str, rngs: list[Any] | None) -> None:
        pipeline = self._require_pipeline()
        self._checkpointer.take(pipeline, self.staging_dir, self.run_id, epoch, values, kind, rngs)
        self._last_saved_epoch = epoch

    def _on_registered(self, op: CheckpointOp) -> None:
        if self.best.epoch == op.epoch:
            self.best.version = op.progress.get("version")
            self.best.model_id = op.progress.get("model_id")

    def _require_pipeline(self) -> Pipeline:
        if self._pipeline is None or self._closed:
            raise ConfigError(
                "log_epoch called outside the `with mlflow_best.track(...) as run:` block; "
                "call it inside the block (the run has ended or not started)"
            )
        return self._pipeline

    def _print_epoch(
        self, epoch: int, values: dict[str, float], previous: Best, improved: bool, last_saved: bool
    ) -> None:
        now = time.monotonic()
        took, self._t_epoch = now - self._t_epoch, now
        if not self._verbose():
            return
        line = console.epoch_line(
            epoch,
            values,
            self.config.monitor,
            previous=(previous.epoch, previous.value),
            best=(self.best.epoch, self.best.value),
            improved=improved,
            last_saved=last_saved,
            took=took,
        )
        print(line, flush=True)

    def _verbose(self) -> bool:
        if self.config.verbose is not None:
            return self.config.verbose
        return sys.stdout.isatty()

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
        pipeline = self._require_pipeline()
        problems: list[str] = []
        try:
            if (
                crashed
                and self.config.save_last_every
                and self._last_epoch is not None
                and self._last_saved_epoch != self._last_epoch
            ):
                # The seed practice: a crash must not lose progress. The state as it is now,
                # labelled with the last completed epoch, so resume continues from here.
                try:
                    self._checkpoint(self._last_epoch, dict(self._last_metrics), "last", None)
                except Exception as e:  # the run still ends; the error is said below
                    problems.append(f"the state at the crash could not be saved ({e})")
            try:
                self._submit_plot(pipeline)
            except Exception as e:
                problems.append(f"the plot could not be drawn ({e!r})")
            tags = {**self._summary_tags(), LEASE_TAG: lease.value(released=True)}
            pipeline.submit(TagsOp(pipeline.journal.next_seq(), tags))
        finally:
            # Whatever happened above, the run is ended: never left RUNNING.
            if self._owns_run:
                pipeline.submit(EndOp(pipeline.journal.next_seq(), status))
            self._closed = True
            pending = pipeline.close(self.config.offline_timeout, progress=console.progress_line)
            if self._fluent:
                lifecycle.pop(self.run_id)
            if pipeline.died is not None and any(isinstance(op, EndOp) for op in pending):
                self._end_directly(status)
            self._release()
        rejected = pipeline.rejected
        if self._verbose():
            self._print_summary(status, pending, rejected)
        warning: Warning | None = None
        try:
            self._emit_notices()
            for problem in problems:
                warnings.warn(f"mlflow_best: run {self.run_id}: {problem}", RuntimeWarning, stacklevel=4)
        except Warning as w:  # the user's filter turned one into an error: raised after the list below
            warning = w
        if pending or rejected:
            lines = [f"{describe(op)}: refused by MLflow ({why})" for op, why in rejected]
            lines += [describe(op) for op in pending]
            raise UnsentError(
                f"mlflow_best: {len(lines)} item(s) of run {self.run_id} did not reach MLflow at "
                f"{self.tracking_uri!r}:\n  - " + "\n  - ".join(lines) + f"\nLocal copies are kept in "
                f"{self.staging_dir} (each checkpoint in the folder named above, every metric in "
                f"{self.staging_dir / 'journal.jsonl'}). "
                + ("When the server is back, upload the unsent ones into the same run with "
                   f"mlflow_best.sync({self.run_id!r}) or `mlflow-best sync {self.run_id}`"
                   + (f" --staging-dir {self.config.staging_dir}" if self.config.staging_dir else "")
                   + "." if pending else "Refused items are not retried: fix what MLflow named."),
                str(self.staging_dir),
                lines,
            ) from warning
        if warning is not None:
            raise warning

    def _end_directly(self, status: str) -> None:
        """The upload thread died and the final flush could not end the run: one last direct call."""
        if self._client is None:
            return
        with contextlib.suppress(Exception):
            self._client.set_terminated(self.run_id, status)

    def _summary_tags(self) -> dict[str, str]:
        return {TAG + "improvements": ",".join(str(e) for e in self.improvements)[:5000] or "none"}

    def _submit_plot(self, pipeline: Pipeline) -> None:
        """Draw the monitored metric into the staging folder; the pipeline uploads it like the rest."""
        if not self.history:
            return
        name = plot_filename(self.config.monitor)
        try:
            path = render_metric_plot(
                self.staging_dir / "plots" / name, self.history, self.config.monitor, self.config.mode
            )
        except Exception as e:  # a picture is never worth failing the run's end
            warnings.warn(f"mlflow_best: could not draw plots/{name} ({e!r}); the run is complete without it",
                          RuntimeWarning, stacklevel=4)
            return
        pipeline.submit(ArtifactOp(pipeline.journal.next_seq(), str(path), "plots"))

    def _print_summary(self, status: str, pending: list[Any], rejected: list[Any]) -> None:
        cfg, b = self.config, self.best
        registered = (cfg.registered_model, b.version) if cfg.registered_model and b.version else None
        holder = self._alias_holder() if registered and cfg.alias and not pending else None
        text = console.summary(
            run_id=self.run_id,
            status=status,
            epochs=len(self.history),
            elapsed=time.monotonic() - self._t_enter,
            monitor=cfg.monitor,
            best=(b.epoch, b.value),
            improvements=len(self.improvements),
            registered=registered,
            alias=(cfg.alias, holder) if cfg.alias and holder is not None else None,
            plot=f"plots/{plot_filename(cfg.monitor)}" if self.history and not pending else None,
            ui=console.ui_hint(self.tracking_uri, self.experiment_id, self.run_id),
            pending=len(pending),
            rejected=len(rejected),
        )
        print(text, flush=True)

    def _alias_holder(self) -> str | None:
        """The version the alias points at now; it may belong to another run's better epoch."""
        from mlflow.exceptions import MlflowException

        if self._client is None or not self.config.registered_model or not self.config.alias:
            return None
        try:
            mv = alias_holder(self._client, self.config.registered_model, self.config.alias)
        except MlflowException:
            return None  # only a line of the summary: never worth failing the run's end
        return None if mv is None else str(mv.version)


def _check_writable(root: Path) -> None:
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


def _now_ms() -> int:
    return int(time.time() * 1000)


def _write_run_file(
    staging: Path, run_id: str, experiment_id: str, tracking_uri: str, cfg: TrackConfig
) -> None:
    """What ``sync`` needs to replay this staging folder into the same run from another process."""
    write_run_file(
        staging,
        {
            "run_id": run_id,
            "experiment_id": experiment_id,
            "tracking_uri": tracking_uri,
            "monitor": cfg.monitor,
            "mode": cfg.mode,
            "min_delta": cfg.min_delta,
            "registered_model": cfg.registered_model,
            "alias": cfg.alias,
            "keep": cfg.keep,
        },
    )
