"""Every MLflow call that publishes a checkpoint: LoggedModel, model version, alias, run tags.

Each step records what it did in ``op.progress`` so a retry after a failure (a dead server, a lost
response) resumes at the failed step instead of creating a second model or version.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow_best import _signing as signing
from mlflow_best._checkpoint import LAST_PREFIX, CheckpointId, logged_model_name, manifest_sha256
from mlflow_best._criterion import Criterion
from mlflow_best._retention import Candidate, aliases_of, to_prune
from mlflow_best._staging import ArtifactOp, CheckpointOp, EndOp, MetricsOp, Op, TagsOp, discard_folder
from mlflow_best._tags import (
    MODEL_VERSIONS_TAG,
    TAG,
    V_EPOCH,
    V_MODE,
    V_MODEL_ID,
    V_MONITOR,
    V_PRUNED,
    V_RUN,
    V_SHA,
    V_VALUE,
)
from mlflow_best._upload import upload_folder

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException



def alias_holder(client: MlflowClient, name: str, alias: str) -> Any | None:
    """The model version ``name@alias`` points at, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if not is_missing(e):
            raise
        return None


def is_missing(error: MlflowException) -> bool:
    """True for "no such run / model / version / alias" (a missing alias is INVALID_PARAMETER_VALUE)."""
    if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
        return True
    return error.error_code == "INVALID_PARAMETER_VALUE" and "not found" in error.message.lower()


def link_version(
    client: MlflowClient, model_id: str, name: str, version: str, tags: dict[str, str] | None = None
) -> None:
    """Tag the LoggedModel with its version the way ``mlflow.register_model`` does, so the UI shows it
    registered (``mlflow.modelVersions``, a JSON list of ``{"name", "version"}``); idempotent.

    ``create_model_version`` writes that tag through a tracking server but not on a database store;
    an entry already there (any spelling of the version) is kept, not repeated. ``tags``: the
    LoggedModel's tags when the caller knows them (it just created the model): saves reading them.
    """
    if tags is None:
        tags = client.get_logged_model(model_id).tags or {}
    try:
        linked = json.loads(tags.get(MODEL_VERSIONS_TAG) or "[]")
    except ValueError:
        linked = []
    if not isinstance(linked, list):
        linked = []
    new: dict[str, str] = {TAG + "version": version}
    if not any(
        isinstance(e, dict) and e.get("name") == name and str(e.get("version")) == version for e in linked
    ):
        new[MODEL_VERSIONS_TAG] = json.dumps([*linked, {"name": name, "version": int(version)}])
    client.set_logged_model_tags(model_id, new)


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    """Create the registered model if it does not exist (safe against a concurrent creator).

    One call whether or not it exists: creating first and reading "already exists" as success costs
    what a lookup costs, and saves the lookup when the model is new. A server that refuses the
    creation otherwise (a user allowed to write versions of an existing model but not to create
    models) is asked whether the model exists before the refusal is raised.
    """
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            name, tags={TAG + "managed": "true"}, description="Checkpoints kept by mlflow_best.track"
        )
    except MlflowException as e:
        if e.error_code == "RESOURCE_ALREADY_EXISTS":
            return
        try:
            client.get_registered_model(name)
        except MlflowException:
            raise e from None


def best_version(client: MlflowClient, name: str, monitor: str, criterion: Criterion) -> Any | None:
    """The registered version with the best recorded value of ``monitor`` (earliest wins a tie)."""
    return pick_best(_all_versions(client, name), monitor, criterion)


def pick_best(versions: list[Any], monitor: str, criterion: Criterion) -> Any | None:
    """The best of ``versions`` by their recorded ``monitor`` value (earliest wins a tie); pure.

    Only versions recorded for this monitor and mode, not pruned, with a finite value count; with a
    team key (``MLFLOW_BEST_SIGNING_KEY``), only those whose tags a key holder wrote.
    """
    best: Any | None = None
    best_value = math.nan
    secret = signing.key()
    for v in versions:
        tags = v.tags or {}
        if tags.get(V_MONITOR) != monitor or tags.get(V_MODE) != criterion.mode or V_PRUNED in tags:
            continue
        if secret is not None and not signing.tags_signed(secret, tags):
            continue  # with a team key, only versions whose tags a key holder wrote can hold the alias
        try:
            value = float(tags[V_VALUE])
        except (KeyError, ValueError):
            continue
        if not math.isfinite(value):
            continue
        if best is None or criterion.better(value, best_value) or (
            value == best_value and int(v.version) < int(best.version)
        ):
            best, best_value = v, value
    return best


def _paged(search: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
    """Every item of a paginated MLflow search, all pages."""
    out: list[Any] = []
    token: str | None = None
    while True:
        page = search(*args, page_token=token, **kwargs)
        out.extend(page)
        token = page.token
        if not token:
            return out


def name_filter(name: str) -> str:
    """An MLflow search clause matching registered model ``name``, whatever characters it holds.

    MLflow's filter grammar has no escape inside a quoted value (``'bob\\'s'`` and ``'bob''s'`` are
    read as other names, and a backslash before the closing quote swallows it), so a name with a
    single quote or a backslash is matched with ``LIKE``, each of those characters a one-character
    wildcard. That can also match other names: callers keep the exact ones (``versions_named``).
    """
    if "'" not in name and "\\" not in name:
        return f"name='{name}'"
    return "name LIKE '" + "".join("_" if c in "'\\" else c for c in name) + "'"


def _all_versions(
    client: MlflowClient, name: str, run_id: str | None = None, newer_than: int | None = None
) -> list[Any]:
    """Every version of registered model ``name`` (of ``run_id``'s only, or numbered above
    ``newer_than`` only, when given)."""
    query = name_filter(name) + (f" and run_id='{run_id}'" if run_id else "")
    if newer_than is not None:
        query += f" and version_number > {int(newer_than)}"
    return [v for v in _paged(client.search_model_versions, query, max_results=1000) if v.name == name]


def known_models(client: MlflowClient, limit: int = 20) -> str:
    """``'a', 'b', ...`` the registered models of the store (at most ``limit``), for error messages."""
    from mlflow.exceptions import MlflowException

    try:
        page = client.search_registered_models(max_results=limit)
    except MlflowException:
        return "the list could not be read"
    names = ", ".join(repr(m.name) for m in page)
    if not names:
        return "no registered models"
    return names + (", ..." if page.token else "")


def _is_duplicate(error: MlflowException) -> bool:
    """A unique-key refusal of the database behind MLflow (sqlite or PostgreSQL): the row exists."""
    text = error.message.lower()
    return "unique" in text or "duplicate" in text


_ALIAS_ATTEMPTS = 10
# A private generator: drawing from the global `random` in this background thread would change the
# user's Python RNG stream and break bit-identical resume.
_JITTER = random.Random()


def move_alias_to_best(
    client: MlflowClient, name: str, alias: str, monitor: str, criterion: Criterion, mine: str | None = None
) -> str | None:
    """Point ``alias`` at the best version of ``name`` across all runs; return that version.

    Re-reading all versions (instead of comparing with the holder only) makes concurrent writers
    converge. A writer returns only when (a) it *read* the alias on the best version it can see, or
    (b) its own write of the alias is followed by a search that still finds that version best. In
    (b) a stale write by another process after ours is followed by that process's own search, which
    sees our version (it existed before our write) and repairs the alias.

    ``mine``: the version this call just registered. When the search finds it best, the alias is
    set without reading its holder first (that read could only say "move it"): three calls for a
    new best (search, set, search), two for a version that is not (search, read holder). The
    checks after the first search only fetch the versions numbered above those already seen: a
    version that can beat the target is one registered since.
    """
    from mlflow.exceptions import MlflowException

    versions = _all_versions(client, name)
    seen = max((int(v.version) for v in versions), default=0)
    best = pick_best(versions, monitor, criterion)
    written: str | None = None
    for attempt in range(_ALIAS_ATTEMPTS):
        if attempt:
            newer = _all_versions(client, name, newer_than=seen)
            seen = max([seen, *(int(v.version) for v in newer)])
            best = pick_best([*([best] if best is not None else []), *newer], monitor, criterion)
        if best is None:
            return None
        target = str(best.version)
        if target == written:
            return target
        if written is not None:
            # Another writer's version turned up between our write and our check: not in lockstep.
            time.sleep(_JITTER.uniform(0.01, 0.05 * attempt))
        if target != mine or written is not None:
            found = alias_holder(client, name, alias)
            if found is not None and str(found.version) == target:
                return target
        try:
            client.set_registered_model_alias(name, alias, target)
        except MlflowException as e:
            # Two writers creating the alias in the same instant: the database refuses the second
            # insert (PostgreSQL: UniqueViolation, sent as BAD_REQUEST). Re-read instead of failing.
            if not _is_duplicate(e):
                raise
            time.sleep(_JITTER.uniform(0.01, 0.05 * (attempt + 1)))
            continue
        written = target
    raise MlflowException(
        f"alias {alias!r} of registered model {name!r} kept moving during {_ALIAS_ATTEMPTS} attempts to "
        "point it at the best version; the upload is retried"
    )


class Publisher:
    """Sends the pipeline's operations to one MLflow run, in order."""

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        experiment_id: str,
        monitor: str,
        criterion: Criterion,
        registered_model: str | None,
        alias: str | None,
        on_registered: Callable[[CheckpointOp], None] | None = None,
        keep: int | None = None,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.monitor = monitor
        self.criterion = criterion
        self.registered_model = registered_model
        self.alias = alias
        self.on_registered = on_registered
        self.keep = keep
        # Ops journaled before this publisher existed are replays (sync, resume) of another process.
        self._since_ms = int(time.time() * 1000)
        self._best: tuple[float, int] | None = None  # what the run's best_* tags show, once known

    def __call__(self, ops: Sequence[Op]) -> None:
        """Send one batch: metric items in a single ``log_batch``, any other item alone."""
        from mlflow.entities import RunTag

        if len(ops) != 1 or isinstance(ops[0], MetricsOp):
            if not all(isinstance(op, MetricsOp) for op in ops):
                raise TypeError("only metric items are sent together")
            metrics = [m for op in ops for m in self._metrics(op, model_id=None)]  # type: ignore[arg-type]
            self.client.log_batch(self.run_id, metrics=metrics)
            return
        op = ops[0]
        if isinstance(op, CheckpointOp):
            if op.kind == "last":
                self._publish_last(op)
            else:
                self._publish_best(op)
        elif isinstance(op, TagsOp):
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in op.tags.items()])
        elif isinstance(op, ArtifactOp):
            self.client.log_artifact(self.run_id, op.path, op.artifact_path)
        elif isinstance(op, EndOp):
            self.client.set_terminated(self.run_id, op.status)

    def _metrics(self, op: MetricsOp | CheckpointOp, model_id: str | None) -> list[Metric]:
        from mlflow.entities import Metric

        return [
            Metric(k, v, op.timestamp_ms, op.epoch, model_id=model_id, run_id=self.run_id)
            for k, v in op.metrics.items()
        ]

    def _publish_best(self, op: CheckpointOp) -> None:
        """LoggedModel (created with its tags), files, READY, version, alias, then one ``log_batch``
        with the epoch's metrics (linked to the model) and the run's ``best_*`` tags together.

        About nine calls per improvement; each step is recorded in ``op.progress``, so a retry
        resumes at the failed step. A refusal part way (MLflow said no: the item is dropped) still
        sends the epoch's metrics first, so the run's history has no hole.
        """
        from mlflow.entities import RunTag

        from mlflow_best._replay import is_refusal

        p = op.progress
        folder = Path(op.folder)
        if "sha256" not in p:
            p["sha256"] = manifest_sha256(folder)
        tags = {
            V_EPOCH: str(op.epoch),
            V_MONITOR: self.monitor,
            V_MODE: self.criterion.mode,
            V_VALUE: repr(op.value),
            V_SHA: p["sha256"],
            V_RUN: self.run_id,
            TAG + "checkpoint": op.name,
        }
        secret = signing.key()
        if secret is not None:
            tags[signing.TAG] = signing.sign_tags(secret, tags)
        # A retry (the last attempt failed: its answer may have been lost after MLflow acted) or a
        # replay of another process's journal: look for what already exists before creating more.
        if p.get("tried") or op.timestamp_ms < self._since_ms:
            self._resume_progress(p)
        p["tried"] = True
        try:
            self._register(op, p, tags, folder)
        except Exception as e:
            if is_refusal(e) and "metrics" not in p:
                with contextlib.suppress(Exception):
                    self.client.log_batch(self.run_id, metrics=self._metrics(op, model_id=p.get("model_id")))
                    p["metrics"] = True
            raise
        model_id = p["model_id"]
        run_tags: dict[str, str] = {} if self._behind_best(op) else {
            TAG + "best_epoch": str(op.epoch),
            TAG + "best_value": repr(op.value),
            TAG + "best_model_id": model_id,
            TAG + "best_sha256": p["sha256"],
            TAG + "best_checkpoint": op.name,
        }
        if run_tags and "version" in p:
            run_tags[TAG + "best_version"] = p["version"]
        # Logged once, with the model id: the run's history gets one row per epoch and the
        # LoggedModel shows the same numbers (a repeat after a lost answer is a no-op in MLflow).
        metrics = [] if p.get("metrics") else self._metrics(op, model_id=model_id)
        if metrics or run_tags:
            self.client.log_batch(
                self.run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in run_tags.items()]
            )
            p["metrics"] = True
        if run_tags:
            self._best = (op.value, op.epoch)
        if self.keep is not None:
            self._prune(self.keep)
        if self.on_registered is not None:
            self.on_registered(op)

    def _register(self, op: CheckpointOp, p: dict[str, Any], tags: dict[str, str], folder: Path) -> None:
        """The LoggedModel, its files, READY, the version, the alias and the version link (as needed)."""
        from mlflow.entities import LoggedModelOutput
        from mlflow.exceptions import MlflowException

        if "model_id" not in p:
            lm = self.client.create_logged_model(
                self.experiment_id,
                name=logged_model_name(op.name),
                source_run_id=self.run_id,
                tags=tags,
                params={"epoch": str(op.epoch), "monitor": self.monitor, "mode": self.criterion.mode},
            )
            p["model_id"], p["location"], p["fresh"] = lm.model_id, lm.artifact_location, True
        model_id = p["model_id"]
        if "artifacts" not in p:
            if "location" not in p:
                p["location"] = self.client.get_logged_model(model_id).artifact_location
            upload_folder(self.client.tracking_uri, p["location"], folder)
            p["artifacts"] = True
        if "finalized" not in p:
            try:
                self.client.log_outputs(self.run_id, [LoggedModelOutput(model_id, op.epoch)])
            except MlflowException as e:
                if not _is_duplicate(e):  # recorded by an attempt whose answer was lost, or a killed process
                    raise
            self.client.finalize_logged_model(model_id, "READY")
            p["finalized"] = True
        if not self.registered_model:
            return
        if "version" not in p:
            mv = self.client.create_model_version(
                self.registered_model,
                source=self._version_source(model_id, p.get("location")),
                run_id=self.run_id,
                tags={**tags, V_MODEL_ID: model_id},
                model_id=model_id,
                description=f"{op.name} of run {self.run_id}",
            )
            p["version"] = str(mv.version)
        if self.alias and "alias" not in p:
            move_alias_to_best(self.client, self.registered_model, self.alias, self.monitor, self.criterion,
                               mine=p["version"])
            p["alias"] = True
        if "model_tagged" not in p:
            # A model this attempt created has only the tags it was created with (and, through a
            # server, the link create_model_version wrote, which the same value replaces).
            link_version(self.client, model_id, self.registered_model, p["version"],
                         tags=dict(tags) if p.get("fresh") else None)
            p["model_tagged"] = True

    def _behind_best(self, op: CheckpointOp) -> bool:
        """A replay of an older process's checkpoint that the run's ``best_*`` tags have moved past.

        Items of this process arrive in order, each better than the last; a replayed one (``sync``,
        a resume) may be older than what the run already shows, and its tags must not move back.
        """
        if op.timestamp_ms >= self._since_ms and self._best is None:
            return False
        if self._best is None:
            tags = self.client.get_run(self.run_id).data.tags
            if TAG + "best_value" not in tags:
                return False
            try:
                self._best = (float(tags[TAG + "best_value"]), int(tags.get(TAG + "best_epoch", "-1")))
            except ValueError:
                return False
        value, epoch = self._best
        if op.epoch == epoch:
            return False
        return op.epoch < epoch or not self.criterion.improves(op.value, value)

    def _prune(self, keep: int) -> None:
        """Delete the files of this run's checkpoints outside the ``keep`` best; tag them as pruned.

        Versions are tagged, not deleted: their lineage (run, epoch, metrics) stays visible in the
        registry and version numbers keep no gaps; ``restore`` names the pruning when asked for one.
        A checkpoint whose version holds any alias (``track``'s own, a promoted ``@champion``, in any
        registered model it was registered into) is never pruned (``_retention.to_prune``). The tag
        comes first and the files go last, so no reader ever finds a version untagged without files.
        """
        models = {
            m.model_id: m
            for m in _search_logged_models(self.client, self.experiment_id, self.run_id)
            if (m.tags or {}).get(V_MONITOR) == self.monitor
            and (m.tags or {}).get(V_MODE, self.criterion.mode) == self.criterion.mode
            and V_PRUNED not in (m.tags or {})
            and str(m.status).endswith("READY")
        }
        registrations = {model_id: self._registrations(m) for model_id, m in models.items()}
        names = {name for regs in registrations.values() for name, _ in regs}
        aliases = self._aliases(names)
        candidates = []
        for model_id, m in models.items():
            try:
                epoch, value = int(m.tags[V_EPOCH]), float(m.tags[V_VALUE])
            except (KeyError, ValueError):
                continue  # not a checkpoint this run can rank: kept
            candidates.append(Candidate(model_id, epoch, value, aliases_of(registrations[model_id], aliases)))
        doomed = to_prune(candidates, keep, self.criterion.mode)
        if not doomed:
            return
        for c in doomed:
            for name, version in registrations[c.id]:
                _unless_missing(self.client.set_model_version_tag, name, version, V_PRUNED, "true")
            self.client.set_logged_model_tags(c.id, {V_PRUNED: "true"})
        # An alias set while this ran (a promote racing the prune) wins: untag, keep the files.
        fresh = self._aliases(names)
        for c in doomed:
            if aliases_of(registrations[c.id], fresh):
                for name, version in registrations[c.id]:
                    _unless_missing(self.client.delete_model_version_tag, name, version, V_PRUNED)
                self.client.delete_logged_model_tag(c.id, V_PRUNED)
                continue
            _delete_artifacts(models[c.id].artifact_location)

    def _registrations(self, model: Any) -> list[tuple[str, str]]:
        """Every ``(registered model, version)`` made from a LoggedModel, as its tags record them."""
        tags = model.tags or {}
        found: set[tuple[str, str]] = set()
        if self.registered_model and tags.get(TAG + "version"):
            found.add((self.registered_model, str(tags[TAG + "version"])))
        try:
            linked = json.loads(tags.get(MODEL_VERSIONS_TAG) or "[]")
        except ValueError:
            linked = []
        for entry in linked if isinstance(linked, list) else []:
            if isinstance(entry, dict) and entry.get("name") and entry.get("version") is not None:
                found.add((str(entry["name"]), str(entry["version"])))
        return sorted(found)

    def _aliases(self, names: set[str]) -> dict[str, dict[str, str]]:
        """``{alias: version}`` of each registered model in ``names`` (a deleted one has none)."""
        from mlflow.exceptions import MlflowException

        out: dict[str, dict[str, str]] = {}
        for name in sorted(names):
            try:
                held = self.client.get_registered_model(name).aliases or {}
            except MlflowException as e:
                if not is_missing(e):
                    raise
                held = {}
            out[name] = {str(a): str(v) for a, v in held.items()}
        return out

    def _version_source(self, model_id: str, location: str | None = None) -> str:
        """``models:/<id>``, unless MLflow's database registry would resolve it in the wrong store.

        The SQL registry looks ``models:/<id>`` up through the *global* tracking URI (not the
        client's); with ``track(tracking_uri=...)`` pointing elsewhere, that lookup fails forever.
        The LoggedModel's own artifact location is then the source; the ``mlflow_best.model_id``
        tag keeps the link for ``restore``.
        """
        import mlflow

        uri = self.client.tracking_uri
        scheme = uri.split(":", 1)[0].split("+", 1)[0]
        if scheme in ("sqlite", "postgresql", "mysql", "mssql") and uri != mlflow.get_tracking_uri():
            return str(location or self.client.get_logged_model(model_id).artifact_location)
        return f"models:/{model_id}"

    def _resume_progress(self, p: dict[str, Any]) -> None:
        """Pick up where an earlier attempt stopped publishing this checkpoint (found by its sha256).

        A server that died after creating the LoggedModel or the version but before answering, or a
        process killed before it marked the op as sent, leaves them behind; an attempt that started
        over would register the same checkpoint twice.
        """
        if "model_id" not in p:
            for m in _search_logged_models(self.client, self.experiment_id, self.run_id):
                if (m.tags or {}).get(V_SHA) == p["sha256"]:
                    p["model_id"] = m.model_id
                    if str(m.status).endswith("READY"):  # finalized only after its files were complete
                        p.update(artifacts=True, finalized=True)
                    break
        if self.registered_model and "model_id" in p and "version" not in p:
            for v in _all_versions(self.client, self.registered_model, run_id=self.run_id):
                if (v.tags or {}).get(V_SHA) == p["sha256"]:
                    p["version"] = str(v.version)
                    break

    def _publish_last(self, op: CheckpointOp) -> None:
        from mlflow.entities import RunTag

        p = op.progress
        folder = Path(op.folder)
        path = CheckpointId("last", op.epoch, self.monitor, op.value).artifact_path
        if "sha256" not in p:
            p["sha256"] = manifest_sha256(folder)
        if "artifacts" not in p:
            self.client.log_artifacts(self.run_id, str(folder), artifact_path=path)
            p["artifacts"] = True
        previous = self.client.get_run(self.run_id).data.tags.get(TAG + "last_checkpoint")
        if "metrics" not in p and op.metrics:
            self.client.log_batch(self.run_id, metrics=self._metrics(op, model_id=None))
            p["metrics"] = True
        # Only after the new files are complete does the pointer move: a crash in between leaves
        # the previous "last" checkpoint in place and valid.
        self.client.log_batch(
            self.run_id,
            tags=[
                RunTag(TAG + "last_checkpoint", path),
                RunTag(TAG + "last_epoch", str(op.epoch)),
                RunTag(TAG + "last_sha256", p["sha256"]),
            ],
        )
        if previous and previous != path:
            _delete_run_artifacts(self.client, self.run_id, previous)
        _delete_older_local_lasts(folder, op.epoch)


def _unless_missing(call: Callable[..., Any], *args: Any) -> None:
    """``call(*args)``; a version deleted by hand is nothing to tag, any other failure is raised."""
    from mlflow.exceptions import MlflowException

    try:
        call(*args)
    except MlflowException as e:
        if not is_missing(e):
            raise


def _search_logged_models(client: MlflowClient, experiment_id: str, run_id: str) -> list[Any]:
    query = f"source_run_id = '{run_id}'"
    return _paged(client.search_logged_models, [experiment_id], filter_string=query, max_results=100)


def _delete_artifacts(artifact_uri: str, path: str | None = None) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    # A stale folder costs storage only; tags point at what is current.
    with contextlib.suppress(NotImplementedError, MlflowException, OSError):
        get_artifact_repository(artifact_uri).delete_artifacts(path)  # type: ignore[no-untyped-call]


def _delete_older_local_lasts(folder: Path, epoch: int) -> None:
    """Remove the staged "last" folders this one supersedes (MLflow's pointer has moved past them)."""
    for sibling in folder.parent.glob(f"{LAST_PREFIX}*"):
        older = CheckpointId.last_epoch_of(sibling.name)
        if older is not None and older < epoch:
            discard_folder(sibling)


def _delete_run_artifacts(client: MlflowClient, run_id: str, path: str) -> None:
    _delete_artifacts(client.get_run(run_id).info.artifact_uri, path)
