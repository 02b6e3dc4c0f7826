"""Optional authenticity: HMAC-SHA256 signatures with a team key (``MLFLOW_BEST_SIGNING_KEY``).

The sha256 in the manifest and on the version protects against corruption, partial writes and a
changed file; it cannot protect against a writer who can change both the files and the tags. With a
key set, ``track`` signs every checkpoint:

- ``manifest.sig`` in the checkpoint folder: the HMAC of the manifest's bytes (which hold every
  file's sha256 and the identity fields: run id, epoch, monitor, value);
- the tag ``mlflow_best.signature`` on the LoggedModel and the version: the HMAC of the identity the
  registry shows (manifest sha256, run id, epoch, monitor, mode, value), so the alias can be moved
  only to versions whose tags were written by a key holder, without downloading anything.

``restore``, ``load_model`` and the pyfunc loader refuse unsigned or mis-signed checkpoints when a key
is set. Without a key nothing is signed or checked.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow_best._errors import CheckpointError

ENV = "MLFLOW_BEST_SIGNING_KEY"
SIGNATURE_FILE = "manifest.sig"
TAG = "mlflow_best.signature"


def key() -> bytes | None:
    """The signing key from the environment, or None when signing is off."""
    value = os.environ.get(ENV)
    return value.encode("utf-8") if value else None


def key_id(secret: bytes) -> str:
    """A short public name for the key (never the key): which key signed, for error messages."""
    return hashlib.sha256(b"mlflow_best key id:" + secret).hexdigest()[:12]


def _mac(secret: bytes, data: bytes) -> str:
    return hmac.new(secret, data, hashlib.sha256).hexdigest()


def sign_manifest(secret: bytes, manifest_bytes: bytes) -> bytes:
    """The content of ``manifest.sig``."""
    body = {"alg": "HMAC-SHA256", "key_id": key_id(secret), "mac": _mac(secret, manifest_bytes)}
    return json.dumps(body, sort_keys=True).encode("utf-8")


def check_manifest(secret: bytes, folder: Path, manifest_bytes: bytes, signature: bytes | None) -> None:
    """Refuse a checkpoint that is unsigned or whose manifest was not signed by ``secret``."""
    where = folder / SIGNATURE_FILE
    if signature is None:
        raise CheckpointError(
            f"{where} is missing: {ENV} is set, so only signed checkpoints are loaded, and this one is "
            "unsigned (written without the key, or by someone who does not hold it); it was not loaded"
        )
    try:
        body = json.loads(signature.decode("utf-8"))
        mac = body["mac"]
        signer = body.get("key_id")
        if not isinstance(mac, str):
            raise TypeError("mac")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{where} is not a valid signature file ({e!r}); it was not loaded") from e
    if not hmac.compare_digest(mac, _mac(secret, manifest_bytes)):
        mine = key_id(secret)
        other = "" if signer == mine else f" (signed by key {signer!r}, this key is {mine!r})"
        raise CheckpointError(
            f"{where}: the signature does not match the manifest{other}: the checkpoint was changed after "
            "it was signed, or signed with another key; it was not loaded"
        )


def identity(tags: Mapping[str, Any]) -> bytes:
    """What the registry shows of a checkpoint, in one canonical byte string."""
    fields = ("sha256", "run_id", "epoch", "monitor", "mode", "value")
    return json.dumps({f: str(tags.get(f, "")) for f in fields}, sort_keys=True).encode("utf-8")


def sign_tags(secret: bytes, tags: Mapping[str, Any]) -> str:
    """The ``mlflow_best.signature`` tag for a version or LoggedModel with these tags."""
    return _mac(secret, identity(tags))


def tags_signed(secret: bytes, tags: Mapping[str, Any]) -> bool:
    """True when ``tags`` carry a signature by ``secret`` over their own identity fields."""
    mac = tags.get(TAG)
    return isinstance(mac, str) and hmac.compare_digest(mac, sign_tags(secret, tags))
