"""Where stalwart keeps things, from environment variables, so every process of a run agrees.

The local runner, its attempt processes, their torch elastic workers and Kubernetes pods all read the
same variables, which is how a fresh process finds its run, attempt and checkpoint store.
``check_store_url`` checks a checkpoint store's URL where it is declared, so a mistyped scheme or a
missing s3fs fails there, once, instead of in every attempt.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

HOME_ENV = "STALWART_HOME"
CHECKPOINT_STORE_ENV = "STALWART_CHECKPOINT_STORE"
STORAGE_OPTIONS_ENV = "STALWART_STORAGE_OPTIONS"

# Set by the runner for each attempt process (and inherited by its children).
RUN_ID_ENV = "STALWART_RUN_ID"
ATTEMPT_ENV = "STALWART_ATTEMPT"
MAX_ATTEMPTS_ENV = "STALWART_MAX_ATTEMPTS"
TASK_ENV = "STALWART_TASK"
CHECKPOINT_URI_ENV = "STALWART_CHECKPOINT_URI"
CHECKPOINT_PATH_ENV = "STALWART_CHECKPOINT_PATH"
ATTEMPT_DIR_ENV = "STALWART_ATTEMPT_DIR"  # where an attempt's processes write their events

# Set by the user: serve checkpoint figures to Prometheus from every FlashCheckpointer's process.
PROMETHEUS_PORT_ENV = "STALWART_PROMETHEUS_PORT"  # plus LOCAL_RANK; 0 picks free ports
PROMETHEUS_ADDR_ENV = "STALWART_PROMETHEUS_ADDR"  # default 127.0.0.1


def home() -> Path:
    """The home directory: run records, attempt logs and (by default) the checkpoint store."""
    raw = os.environ.get(HOME_ENV)
    return Path(raw).expanduser() if raw else Path.home() / ".stalwart"


def default_checkpoint_store() -> str:
    """The durable checkpoint store when neither the run nor the environment names one."""
    raw = os.environ.get(CHECKPOINT_STORE_ENV)
    if raw:
        return raw
    return (home() / "checkpoints").resolve().as_uri()


def storage_options_from_env() -> dict:
    """fsspec options for the checkpoint store (e.g. an S3 endpoint), passed to attempt processes as JSON."""
    raw = os.environ.get(STORAGE_OPTIONS_ENV)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{STORAGE_OPTIONS_ENV} must hold a JSON object; got {raw!r} ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{STORAGE_OPTIONS_ENV} must hold a JSON object; got {raw!r}")
    return value


# The extras of this package that install an fsspec backend, by protocol.
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
_EXAMPLES = "'s3://bucket/prefix', 'gs://bucket/prefix' or 'file:///data/ckpt'"


def _protocols(url: str) -> list[str]:
    """The fsspec protocols a URL names, chained ones included ("simplecache::s3://b" -> both)."""
    parts = url.split("::")
    found = []
    for index, part in enumerate(parts):
        if "://" in part:
            found.append(part.split("://", 1)[0])
        elif index < len(parts) - 1:  # "simplecache::..." names a protocol without a path
            found.append(part)
    return found


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_store_url(
    url: object, field: str = "checkpoint_store", *, load: bool = False, here: bool = True
) -> str:
    """``url`` if fsspec can open its scheme here, else ValueError saying what to use or install.

    Reads fsspec's registry (importing fsspec, never at ``import stalwart``) and looks for the backend
    package (s3fs for ``s3://``) without importing it; ``load=True`` imports the backend too, as the
    runner does before a run's first attempt, which also catches a backend's own missing dependency.
    ``here=False`` checks the scheme only, for a store that other machines (pods) will open.
    """
    if not isinstance(url, str) or not url:
        raise ValueError(
            f"{field}={url!r} is not accepted; use an fsspec URL such as {_EXAMPLES}, or None for the "
            "default under STALWART_HOME"
        )
    protocols = [p for p in _protocols(url) if p not in ("file", "local")]
    if not protocols:
        return url  # a local path: nothing to look up
    import fsspec
    from fsspec.registry import known_implementations, registry

    for protocol in protocols:
        if protocol in registry:
            continue
        known = known_implementations.get(protocol)
        if known is None:
            raise ValueError(
                f"{field}={url!r}: fsspec knows no protocol {protocol!r}; use a URL such as {_EXAMPLES}, "
                "or a protocol of an installed fsspec implementation"
            )
        if not here:
            continue
        module = known["class"].split(".", 1)[0]
        extra = _EXTRAS.get(protocol)
        install = f'pip install "stalwart[{extra}]"' if extra else f"pip install {module}"
        if not _installed(module):
            raise ValueError(
                f"{field}={url!r} needs the {module} package for {protocol}://, which is not installed: "
                f"{install}"
            )
        if load:
            try:
                fsspec.get_filesystem_class(protocol)
            except ImportError as exc:
                raise ValueError(f"{field}={url!r} cannot be opened here: {exc} ({install})") from None
    return url
