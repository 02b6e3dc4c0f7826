"""The on-disk checkpoint format: a folder of files plus ``manifest.json``.

    <name>/
      model.pt            the model's state_dict (torch.save; loads with weights_only=True)
      training_state.pt   optimizer, scheduler, GradScaler, RNG states, epoch, metrics
      MLmodel, requirements.txt, python_env.yaml, conda.yaml
                          what makes the folder an MLflow model (written by ``_pyfunc``)
      code/...            ``track(code_paths=...)``, shipped for serving
      manifest.json       format version, sha256 + size of every file, classes, model_args, versions

The manifest lists the flat files under ``files`` and the files below ``code/`` under ``code``
(optional: checkpoints written before models were MLflow models have neither the MLflow files nor
``code``, and still read).

A folder is written under a temporary name (every file fsynced), then renamed into place and the
parent fsynced: a reader never sees a half-written checkpoint under its final name.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import uuid
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import torch

from mlflow_best import _signing as signing
from mlflow_best._errors import CheckpointError, ConfigError, UnsafeCheckpointError

FORMAT = "mlflow_best.checkpoint"
FORMAT_VERSION = 1
@dataclass(frozen=True)
class CheckpointId:
    """Which checkpoint this is (kind, epoch, monitor, value), and every name derived from it.

    ``best`` checkpoints are named by their epoch and monitored value (``epoch=0006-val_loss=0.6000``);
    the rolling ``last`` one by its epoch (``last-epoch=0006``). Each name is one safe path component:
    the folder in the staging area, the display name, the LoggedModel name (no dots), and for
    ``last`` the run artifact path it is uploaded to.
    """

    kind: str
    epoch: int
    monitor: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in ("best", "last"):
            raise ConfigError(f"a checkpoint's kind is 'best' or 'last', got {self.kind!r}")
        if self.epoch < 0:
            raise ConfigError(f"a checkpoint's epoch is >= 0, got {self.epoch!r}")
        if self.kind == "best" and not math.isfinite(self.value):
            raise ConfigError(f"a best checkpoint needs a finite {self.monitor}, got {self.value!r}")

    @property
    def name(self) -> str:
        """The folder and display name: ``epoch=0006-val_loss=0.6000`` or ``last-epoch=0006``."""
        if self.kind == "last":
            return f"{LAST_PREFIX}{self.epoch:04d}"
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.monitor).strip("._") or "metric"
        if len(stem) > 64:
            stem = f"{stem[:48]}-{hashlib.sha1(self.monitor.encode()).hexdigest()[:8]}"
        shown = f"{self.value:.4f}" if abs(self.value) < 1e6 else f"{self.value:.4e}"
        return f"epoch={self.epoch:04d}-{stem}={shown}"

    @property
    def logged_model_name(self) -> str:
        """The LoggedModel name: MLflow refuses '.', '/', ':', '%' and quotes there."""
        return logged_model_name(self.name)

    @property
    def artifact_path(self) -> str:
        """Where a ``last`` checkpoint lives in the run's artifacts (``checkpoints/last-epoch=0006``)."""
        return f"checkpoints/{self.name}"

    @staticmethod
    def last_epoch_of(folder_name: str) -> int | None:
        """The epoch of a ``last-epoch=NNNN`` name, or None for any other name."""
        if not folder_name.startswith(LAST_PREFIX):
            return None
        digits = folder_name[len(LAST_PREFIX):]
        return int(digits) if digits.isdigit() else None


LAST_PREFIX = "last-epoch="


def logged_model_name(name: str) -> str:
    """``name`` as a LoggedModel name: MLflow refuses '.', '/', ':', '%' and quotes there."""
    return "".join("_" if c in "./:%\"'" else c for c in name)


MANIFEST = "manifest.json"
MODEL_FILE = "model.pt"
TRAINING_FILE = "training_state.pt"
CODE_DIR = "code"
_CHUNK = 8 << 20
# Files that make a checkpoint folder more than state dicts (an MLflow model, shipped code):
# relative path -> content, rendered by the disk thread from the checkpoint's manifest fields.
ExtraFiles = Callable[[Mapping[str, Any]], Mapping[str, bytes]]


class _HashingWriter:
    """A file object that hashes what passes through, so nothing is read back to checksum it."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.size += view.nbytes
        written: int = self._f.write(view)
        return written

    def flush(self) -> None:
        self._f.flush()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_file(obj: Any, path: Path) -> dict[str, Any]:
    with open(path, "wb") as f:
        writer = _HashingWriter(f)
        torch.save(obj, writer)  # type: ignore[arg-type]
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": writer.sha256.hexdigest(), "bytes": writer.size}


def _write_bytes(data: bytes, path: Path) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def write_checkpoint(
    parent: Path,
    name: str,
    model_state: Any,
    training_state: Any,
    meta: dict[str, Any],
    extra: ExtraFiles | None = None,
) -> Path:
    """Write a checkpoint folder ``parent/name`` atomically and return its path.

    ``extra(meta)`` gives more files (relative path -> bytes) written and listed in the manifest with
    the state dicts: the MLflow model files and shipped code.

    An existing folder of that name is replaced (used for the rolling "last" checkpoint): the old one
    is moved aside first, so at every instant one complete folder exists under ``name`` or ``name.old``.
    """
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files = {
            MODEL_FILE: _save_file(model_state, tmp / MODEL_FILE),
            TRAINING_FILE: _save_file(training_state, tmp / TRAINING_FILE),
        }
        code: dict[str, dict[str, Any]] = {}
        for rel, data in (extra(meta) if extra is not None else {}).items():
            (code if "/" in rel else files)[rel] = _write_bytes(data, tmp / rel)
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "files": files}
        if code:
            manifest["code"] = code
        manifest_bytes = Manifest.to_json(manifest)
        _write_bytes(manifest_bytes, tmp / MANIFEST)
        secret = signing.key()
        if secret is not None:
            _write_bytes(signing.sign_manifest(secret, manifest_bytes), tmp / signing.SIGNATURE_FILE)
        for sub in {(tmp / rel).parent for rel in code}:
            _fsync_dir(sub)
        _fsync_dir(tmp)
        final = parent / name
        old = parent / f"{name}.old"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def manifest_sha256(folder: Path) -> str:
    """The checkpoint's identity: the sha256 of its manifest, which holds every file's sha256."""
    return file_sha256(folder / MANIFEST)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` of a checkpoint folder."""

    path: Path
    data: dict[str, Any]
    sha256: str = ""

    @property
    def epoch(self) -> int:
        return int(self.data["epoch"])

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        files: dict[str, dict[str, Any]] = self.data["files"]
        return files

    @property
    def all_files(self) -> dict[str, dict[str, Any]]:
        """Every listed file, by path relative to the folder: ``files`` and the shipped ``code``."""
        return {**self.files, **self.data.get("code", {})}

    @property
    def model(self) -> dict[str, Any]:
        """How the model is rebuilt (class or factory, args, parameters): see ``_recipe``."""
        model: dict[str, Any] = self.data["model"]
        return model

    @property
    def optimizer(self) -> dict[str, Any] | None:
        """How the optimizer is rebuilt (class and parameter groups), or None."""
        optimizer: dict[str, Any] | None = self.data.get("optimizer")
        return optimizer

    @property
    def metrics(self) -> dict[str, float]:
        return {str(k): float(v) for k, v in self.data["metrics"].items()}

    @property
    def run_id(self) -> str | None:
        run_id = self.data.get("run_id")
        return None if run_id is None else str(run_id)

    @property
    def mode(self) -> Literal["min", "max"]:
        return "max" if self.data.get("mode") == "max" else "min"

    @property
    def value(self) -> float:
        return float(self.data.get("value", math.nan))

    @classmethod
    def from_json(cls, folder: Path, raw: bytes) -> Manifest:
        """Parse and type-check manifest bytes read from ``folder``; a ``CheckpointError`` names the field."""
        return parse_manifest(folder, raw)

    @staticmethod
    def to_json(data: Mapping[str, Any]) -> bytes:
        """The bytes written as ``manifest.json`` (and hashed, and signed): sorted keys, one encoding."""
        return json.dumps(data, indent=2, sort_keys=True).encode("utf-8")


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "format_version": int,
    "epoch": int,
    "files": dict,
    "model": dict,
    "metrics": dict,
}


_MAX_MANIFEST = 16 << 20


def read_manifest(folder: Path) -> Manifest:
    """Parse and type-check ``folder/manifest.json``; raise a CheckpointError naming file and field."""
    return parse_manifest(folder, _manifest_bytes(folder))


def _manifest_bytes(folder: Path) -> bytes:
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: {folder} is not an mlflow_best checkpoint (a checkpoint from another "
            "library, or an incomplete download); restore a reference that mlflow_best.track logged"
        )
    with open(path, "rb") as f:
        data = f.read(_MAX_MANIFEST + 1)
    if len(data) > _MAX_MANIFEST:
        raise CheckpointError(f"{path} is over {_MAX_MANIFEST:,} bytes; not a manifest mlflow_best wrote")
    return data


def parse_manifest(folder: Path, raw: bytes) -> Manifest:
    """Parse and type-check a manifest's bytes; any malformation is a CheckpointError naming the field."""
    path = folder / MANIFEST
    try:
        return _parse_manifest(folder, path, raw)
    except CheckpointError:
        raise
    except (RecursionError, MemoryError) as e:
        raise CheckpointError(f"{path} is nested too deeply ({type(e).__name__}); refused") from e
    except Exception as e:  # a field of an unexpected type deep inside: never an undocumented error
        raise CheckpointError(f"{path} is malformed ({type(e).__name__}: {str(e)[:200]}); refused") from e


def _parse_manifest(folder: Path, path: Path, raw: bytes) -> Manifest:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({str(e)[:200]}); the checkpoint is damaged") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, expected a JSON object")
    if data.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: field 'format' is {data.get('format')!r}, expected {FORMAT!r}; this is not an "
            "mlflow_best checkpoint"
        )
    for field, kind in _REQUIRED.items():
        if field not in data:
            raise CheckpointError(f"{path}: required field {field!r} is missing")
        if not isinstance(data[field], kind) or isinstance(data[field], bool):
            raise CheckpointError(
                f"{path}: field {field!r} is {data[field]!r} ({type(data[field]).__name__}), "
                f"expected {getattr(kind, '__name__', kind)}"
            )
    if data["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {data['format_version']} is newer than this mlflow_best reads "
            f"({FORMAT_VERSION}); upgrade mlflow_best (pip install -U mlflow-best)"
        )
    if data["epoch"] < 0:
        raise CheckpointError(f"{path}: field 'epoch' is {data['epoch']!r}, expected an int >= 0")
    for fname in (MODEL_FILE, TRAINING_FILE):
        if fname not in data["files"]:
            raise CheckpointError(
                f"{path}: field 'files' does not list {fname!r}; the manifest is incomplete"
            )
    for fname, entry in data["files"].items():
        if not isinstance(fname, str) or fname in ("", ".", "..") or "/" in fname or "\\" in fname:
            raise CheckpointError(
                f"{path}: field 'files' lists {fname!r}, expected a plain file name inside the checkpoint "
                "folder; refused"
            )
        _check_entry(path, "files", fname, entry)
    code = data.get("code", {})
    if not isinstance(code, dict):
        raise CheckpointError(f"{path}: field 'code' is {code!r}, expected an object of path -> entry")
    for rel, entry in code.items():
        parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
        if len(parts) < 2 or parts[0] != CODE_DIR or any(p in ("", ".", "..") for p in parts) or "\\" in rel:
            raise CheckpointError(
                f"{path}: field 'code' lists {rel!r}, expected a relative path below {CODE_DIR}/ inside the "
                "checkpoint folder; refused"
            )
        _check_entry(path, "code", rel, entry)
    for name, value in data["metrics"].items():
        if not _is_number(value):
            raise CheckpointError(
                f"{path}: field 'metrics.{name}' is {value!r} ({type(value).__name__}), expected a number"
            )
    model = data["model"]
    if not isinstance(model.get("class"), str):
        raise CheckpointError(
            f"{path}: field 'model.class' is {model.get('class')!r}, expected 'module:ClassName'"
        )
    if model.get("args") is not None and not isinstance(model["args"], dict):
        raise CheckpointError(
            f"{path}: field 'model.args' is {model['args']!r}, expected an object or null"
        )
    optimizer = data.get("optimizer")
    if optimizer is not None and not (
        isinstance(optimizer, dict) and isinstance(optimizer.get("class"), str)
    ):
        raise CheckpointError(
            f"{path}: field 'optimizer' is {optimizer!r}, "
            "expected null or {'class': 'module:ClassName', ...}"
        )
    _check_optional(path, data)
    return Manifest(folder, data, hashlib.sha256(raw).hexdigest())


def _check_optional(path: Path, data: dict[str, Any]) -> None:
    """Fields restore reads beyond the required ones: each of the type it is read as, or absent."""
    checks: list[tuple[str, Any, tuple[type, ...]]] = [
        ("value", data.get("value"), (int, float, type(None))),
        ("monitor", data.get("monitor"), (str, type(None))),
        ("mode", data.get("mode"), (str, type(None))),
        ("run_id", data.get("run_id"), (str, type(None))),
        ("kind", data.get("kind"), (str, type(None))),
        ("model.factory", data["model"].get("factory"), (str, type(None))),
        ("model.memory_format", data["model"].get("memory_format"), (str, type(None))),
        ("scheduler", data.get("scheduler"), (dict, type(None))),
    ]
    optimizer = data.get("optimizer")
    if isinstance(optimizer, dict):
        checks.append(("optimizer.defaults", optimizer.get("defaults"), (dict, type(None))))
        groups = optimizer.get("groups")
        checks.append(("optimizer.groups", groups, (list, type(None))))
        for i, group in enumerate(groups if isinstance(groups, list) else []):
            names = group.get("params") if isinstance(group, dict) else None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise CheckpointError(
                    f"{path}: field 'optimizer.groups[{i}]' is {str(group)[:80]!r}, expected an object whose "
                    "'params' is a list of parameter names"
                )
    for field, value, kinds in checks:
        if not isinstance(value, kinds) or isinstance(value, bool):
            got = f"{str(value)[:80]!r} ({type(value).__name__})"
            raise CheckpointError(f"{path}: field {field!r} is {got}; refused")
    if data.get("mode") not in (None, "min", "max"):
        raise CheckpointError(f"{path}: field 'mode' is {data['mode']!r}, expected 'min' or 'max'")
    if data["epoch"] > 10**9:
        raise CheckpointError(f"{path}: field 'epoch' is {data['epoch']}, not a plausible epoch; refused")
    for field in ("files", "code"):
        for name, entry in (data.get(field) or {}).items():
            if entry["bytes"] < 0 or len(entry["sha256"]) != 64:
                raise CheckpointError(f"{path}: field '{field}.{name}' is {entry!r}; refused")


def open_checkpoint(folder: Path, expected_sha256: str | None = None) -> Manifest:
    """The manifest of ``folder``, read once: its bytes must hash to ``expected_sha256`` (what MLflow
    recorded) when given, and carry a valid signature when ``MLFLOW_BEST_SIGNING_KEY`` is set."""
    raw = _manifest_bytes(folder)
    actual = hashlib.sha256(raw).hexdigest()
    if expected_sha256 is not None and actual != expected_sha256:
        raise CheckpointError(
            f"{folder / MANIFEST} has sha256 {actual[:12]}…, but MLflow recorded {expected_sha256[:12]}… for "
            "this checkpoint: the stored manifest was changed; it was not loaded"
        )
    manifest = parse_manifest(folder, raw)
    secret = signing.key()
    if secret is not None:
        sig_path = folder / signing.SIGNATURE_FILE
        signature = sig_path.read_bytes()[:4096] if sig_path.is_file() else None
        signing.check_manifest(secret, folder, raw, signature)
    return manifest


def _check_entry(path: Path, field: str, name: str, entry: Any) -> None:
    if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _is_int(entry.get("bytes"))):
        raise CheckpointError(
            f"{path}: field '{field}.{name}' is {entry!r}, expected {{'sha256': str, 'bytes': int}}"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def verify_checkpoint(
    folder: Path, *, check_hashes: bool = True, only: Iterable[str] | None = None
) -> Manifest:
    """Check that every file the manifest lists is there, of the right size and sha256.

    ``only``: check just these of the listed files (a reader that needs only the weights does not
    hash, or even need, the training state).
    """
    manifest = read_manifest(folder)
    listed = manifest.all_files
    wanted = listed if only is None else {n: listed[n] for n in only if n in listed}
    for fname, entry in wanted.items():
        fpath = folder / fname
        if not fpath.is_file():
            raise CheckpointError(f"{fpath} is missing; the checkpoint is incomplete")
        size = fpath.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(
                f"{fpath} is {size} bytes, the manifest says {entry['bytes']}: the file is truncated or "
                "was changed; restore another version or re-download it"
            )
        if check_hashes and file_sha256(fpath) != entry["sha256"]:
            raise CheckpointError(
                f"{fpath} fails its checksum (sha256 differs from the manifest): the file was changed or "
                "corrupted; it was not loaded"
            )
    return manifest


def load_file(path: Path, map_location: Any, data: bytes | None = None) -> Any:
    """``torch.load`` with ``weights_only=True``: anything that would run code is refused.

    With ``data``, those bytes are loaded (``path`` only names them in errors).
    """
    try:
        if data is not None:
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        return torch.load(path, map_location=map_location, weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path} was refused: loading it would execute code (it is not plain tensors and "
            f"containers). mlflow_best never loads such files; the file may have been tampered with. "
            f"Detail: {_unpickling_reason(e)}"
        ) from e
    except (RuntimeError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path} cannot be read as a torch file ({e}); the file is damaged") from e


def _unpickling_reason(error: BaseException) -> str:
    """The line of torch's weights_only message that says what was refused (not its advice to opt out)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "nsupported" in line:
            return line
    return lines[-1] if lines else type(error).__name__


# -- loading what was verified ---------------------------------------------------------------------
MAX_LOAD_ENV = "MLFLOW_BEST_MAX_LOAD_BYTES"
_DEFAULT_MAX_LOAD = 64 << 30


def max_load_bytes() -> int:
    """The most a checkpoint may declare before anything is read (``MLFLOW_BEST_MAX_LOAD_BYTES``)."""
    raw = os.environ.get(MAX_LOAD_ENV)
    if not raw:
        return _DEFAULT_MAX_LOAD
    try:
        value = int(raw)
    except ValueError as e:
        raise ConfigError(f"{MAX_LOAD_ENV}={raw!r} is not a number of bytes, e.g. 17179869184") from e
    return value


def read_verified(path: Path, entry: dict[str, Any], seal: Any = None) -> bytes:
    """The bytes of ``path``, refused unless they are exactly the size and sha256 the manifest declares.

    The file is opened once: its size is checked before anything is read, then the bytes read are
    hashed and returned, so what was verified is what the caller loads (a file swapped after the
    check cannot be loaded in its place). ``seal`` (a cache entry's ``_cache.Seal``) skips the hash
    when the descriptor read is provably the file hashed before, and records it after a hash.
    """
    declared = int(entry["bytes"])
    limit = max_load_bytes()
    if declared > limit:
        raise CheckpointError(
            f"{path}: the manifest declares {declared:,} bytes, more than the {limit:,} this process loads "
            f"({MAX_LOAD_ENV}); raise the limit if you expect a checkpoint this large. It was not read"
        )
    try:
        with open(path, "rb") as f:
            before = os.fstat(f.fileno())
            if before.st_size != declared:
                raise CheckpointError(
                    f"{path} is {before.st_size} bytes, the manifest says {declared}: the file is truncated "
                    "or was changed; restore another version or re-download it"
                )
            data = f.read(declared + 1)
            after = os.fstat(f.fileno())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete") from e
    if len(data) != declared:
        raise CheckpointError(f"{path} changed size while it was read; it was not loaded")
    if seal is not None and seal.holds(path.name, entry["sha256"], before, after):
        return data
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(
            f"{path} fails its checksum (sha256 differs from the manifest): the file was changed or "
            "corrupted; it was not loaded"
        )
    if seal is not None:
        seal.add(path.name, entry["sha256"], before, after)
    return data


def check_torch_zip(data: bytes, path: Path) -> None:
    """Refuse a torch file whose zip entries are compressed or add up to more than the file itself.

    ``torch.save`` stores entries uncompressed, so a genuine checkpoint never inflates; a compressed
    entry is how a small file would expand to gigabytes in memory (a zip bomb).
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path} cannot be read as a torch file ({e}); the file is damaged") from e
    compressed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise CheckpointError(
            f"{path} has compressed entries ({compressed[:3]}); torch.save never compresses, so the file "
            "was crafted to inflate on load. It was not loaded"
        )
    total = sum(i.file_size for i in infos)
    if total > len(data):
        raise CheckpointError(
            f"{path}: its entries declare {total:,} bytes, more than the file's {len(data):,}; refused"
        )


def read_torch_file(path: Path, entry: dict[str, Any], seal: Any = None) -> bytes:
    """The verified bytes of one torch file of a checkpoint, refused if crafted to inflate."""
    data = read_verified(path, entry, seal)
    check_torch_zip(data, path)
    return data


class TorchFile:
    """One torch file of a checkpoint, checked before it is loaded; ``load`` returns its content.

    Cold (not sealed in the cache): read once, hashed, zip-checked, and loaded from those bytes.
    Warm (a cache entry sealed after an earlier hash): loaded straight from the open descriptor,
    which ``fstat`` shows before and after to be the very file that was hashed and unchanged since
    (a rename gives another inode, a write another change time); if it changed, the bytes are read
    and hashed after all. Either way, what is loaded is what was verified.
    """

    def __init__(self, path: Path, entry: dict[str, Any], seal: Any = None) -> None:
        self.path, self.entry, self.seal = path, entry, seal
        self._data: bytes | None = None
        self._warm = False
        declared = int(entry["bytes"])
        if seal is not None and declared <= max_load_bytes():
            try:
                st: os.stat_result | None = os.stat(path)
            except OSError:
                st = None
            sha = entry["sha256"]
            self._warm = st is not None and st.st_size == declared and seal.holds(path.name, sha, st, st)
        if not self._warm:
            self._data = read_torch_file(path, entry, seal)

    def load(self, map_location: Any) -> Any:
        if self._data is not None:
            return load_file(self.path, map_location, data=self._data)
        with open(self.path, "rb") as f:
            before = os.fstat(f.fileno())
            if self.seal.holds(self.path.name, self.entry["sha256"], before, before):
                obj = _load_open(f, self.path, map_location)
                if self.seal.holds(self.path.name, self.entry["sha256"], before, os.fstat(f.fileno())):
                    return obj
        self._data = read_torch_file(self.path, self.entry, None)
        return load_file(self.path, map_location, data=self._data)


def _load_open(f: Any, path: Path, map_location: Any) -> Any:
    try:
        return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path} was refused: loading it would execute code (it is not plain tensors and "
            f"containers). Detail: {_unpickling_reason(e)}"
        ) from e
    except (RuntimeError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path} cannot be read as a torch file ({e}); the file is damaged") from e


def load_verified(path: Path, entry: dict[str, Any], map_location: Any, seal: Any = None) -> Any:
    """Read, verify and load one file of a checkpoint, from the verified bytes only."""
    return TorchFile(path, entry, seal).load(map_location)
