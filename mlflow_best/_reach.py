"""Bounded waits on the tracking store: scoped HTTP settings and a quick "does it answer?" probe.

MLflow's HTTP client retries an unreachable server for about four minutes by default, silently. Every
path that talks to the store (``restore``, ``load_model``, ``promote``, the CLI, ``track``) runs inside
``reach(uri)``: MLflow's retry and timeout settings are bounded for the duration of the call (a user's
own setting wins) and put back afterwards, and a server that does not answer at all is reported at
once as ``TrackingStoreUnreachableError`` naming the URI: an outage, told apart from a refusal (an
answer that says no), which keeps MLflow's own message.

The settings live in ``os.environ`` because that is where MLflow reads them, at each request, so
they are process-wide while a scope is open: nested and concurrent scopes (a restore inside a
``track`` block, two threads) are counted, and the last one out restores what was there before.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Mapping
from urllib.parse import urlsplit, urlunsplit

from mlflow_best._errors import TrackingStoreUnreachableError

# Each MLflow call gives up after ~2.5 s on a refused connection and ~35 s on a server that
# accepts but never answers (3 tries of 10 s); the probe below catches most outages in under PROBE_S.
HTTP_BOUNDS: Mapping[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
QUIET_DOWNLOADS: Mapping[str, str] = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
PROBE_S = 5.0
_DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}

_lock = threading.Lock()
_depth: dict[str, int] = {}  # key -> open scopes that asked for it
_ours: dict[str, str] = {}  # key -> the value a scope set (absent: the user's own value was kept)


@contextlib.contextmanager
def scoped_env(settings: Mapping[str, str]) -> Iterator[None]:
    """Set each of ``settings`` the user has not set, for the duration; then put the environment back.

    A key the user set (before the first scope opened) keeps the user's value. When the last open
    scope closes, a key a scope set is removed again, unless someone changed it meanwhile.
    """
    with _lock:
        for key, value in settings.items():
            if _depth.get(key, 0) == 0 and key not in os.environ:
                os.environ[key] = value
                _ours[key] = value
            _depth[key] = _depth.get(key, 0) + 1
    try:
        yield
    finally:
        with _lock:
            for key in settings:
                _depth[key] -= 1
                if _depth[key] == 0:
                    del _depth[key]
                    ours = _ours.pop(key, None)
                    if ours is not None and os.environ.get(key) == ours:
                        del os.environ[key]


def bounded_http() -> contextlib.AbstractContextManager[None]:
    """MLflow's HTTP retries and timeouts bounded (``HTTP_BOUNDS``) for the duration of the block."""
    return scoped_env(HTTP_BOUNDS)


def shown_uri(uri: str) -> str:
    """``uri`` with any password replaced by ``***``: safe in an error message or a log."""
    try:
        parts = urlsplit(uri)
        if parts.password is None:
            return uri
        netloc = parts.netloc.rsplit("@", 1)
        user = netloc[0].split(":", 1)[0]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))
    except ValueError:
        return uri


def probe(uri: str, timeout: float = PROBE_S) -> None:
    """Raise ``TrackingStoreUnreachableError`` unless the store at ``uri`` answers within ``timeout``.

    An HTTP(S) server answers when it sends any response at all (a 404 or a 401 is an answer: what
    it means is MLflow's to say). A database URI with a host answers when its port accepts a TCP
    connection. Local stores (``sqlite:``, ``file:``) and schemes this cannot check (``databricks``)
    are not probed.
    """
    try:
        parts = urlsplit(uri)
        scheme = parts.scheme.split("+", 1)[0].lower()
        host, port = parts.hostname, parts.port
    except ValueError:
        return  # a URI MLflow itself will refuse, with its own message
    if not host:
        return
    started = time.monotonic()
    if scheme in ("http", "https"):
        reason = _http_silent(uri, timeout)
    elif scheme in _DB_PORTS:
        reason = _tcp_silent(host, port or _DB_PORTS[scheme], timeout)
    else:
        return
    if reason is not None:
        took = time.monotonic() - started
        raise TrackingStoreUnreachableError(
            f"the tracking store at {shown_uri(uri)!r} did not answer ({reason}; gave up after "
            f"{took:.1f} s): "
            "check that the server is running and that --tracking-uri / MLFLOW_TRACKING_URI names it",
            shown_uri(uri),
        )


def _http_silent(uri: str, timeout: float) -> str | None:
    import requests

    try:
        # Through the same proxies and certificates as MLflow's own requests (requests reads the
        # environment); the response is closed unread.
        with requests.get(uri.rstrip("/") + "/health", timeout=(timeout, timeout), stream=True):
            return None
    except requests.exceptions.SSLError:
        return None  # it answered; whether its certificate is trusted is MLflow's to report
    except requests.exceptions.ConnectTimeout:
        return f"no connection within {timeout:g} s"
    except requests.exceptions.ReadTimeout:
        return f"connected, but no response within {timeout:g} s"
    except requests.exceptions.ConnectionError as e:
        return _reason(e)
    except requests.exceptions.RequestException as e:
        return _reason(e)


def _tcp_silent(host: str, port: int, timeout: float) -> str | None:
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except TimeoutError:
        return f"no connection to {host}:{port} within {timeout:g} s"
    except OSError as e:
        return f"{host}:{port}: {e.strerror or e}"


def _reason(error: BaseException) -> str:
    text = str(error)
    for needle, said in (
        ("Connection refused", "connection refused"),
        ("Name or service not known", "unknown host"),
        ("nodename nor servname", "unknown host"),
        ("Temporary failure in name resolution", "unknown host"),
        ("No route to host", "no route to host"),
        ("Network is unreachable", "network unreachable"),
        ("timed out", "timed out"),
    ):
        if needle in text:
            return said
    return text[:200]


@contextlib.contextmanager
def reach(uri: str, *, probe_first: bool = True) -> Iterator[None]:
    """Bounded HTTP settings for the block, after checking that ``uri`` answers (``probe``)."""
    with bounded_http():
        if probe_first:
            probe(uri)
        yield
