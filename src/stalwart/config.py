"""Every ``STALWART_*`` environment variable, read here and nowhere else, so every process of a run
agrees on where things are.

The local runner, its attempt processes, their torch elastic workers and Kubernetes pods all read the
same variables, which is how a fresh process finds its run, attempt and checkpoint store. The names
are constants here (writers set them for child processes); the functions below read and check them.
``check_store_url`` checks a checkpoint store's URL where it is declared, so a mistyped scheme or a
missing s3fs fails there, once, instead of in every attempt.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HOME_ENV = "STALWART_HOME"
CHECKPOINT_STORE_ENV = "STALWART_CHECKPOINT_STORE"
STORAGE_OPTIONS_ENV = "STALWART_STORAGE_OPTIONS"
FLASH_ROOT_ENV = "STALWART_FLASH_ROOT"
NO_PROGRESS_ENV = "STALWART_NO_PROGRESS"  # set and not empty: no progress bars

# Set by the runner for each attempt process (and inherited by its children).
RUN_ID_ENV = "STALWART_RUN_ID"
ATTEMPT_ENV = "STALWART_ATTEMPT"
MAX_ATTEMPTS_ENV = "STALWART_MAX_ATTEMPTS"
TASK_ENV = "STALWART_TASK"
CHECKPOINT_URI_ENV = "STALWART_CHECKPOINT_URI"
CHECKPOINT_PATH_ENV = "STALWART_CHECKPOINT_PATH"
ATTEMPT_DIR_ENV = "STALWART_ATTEMPT_DIR"  # where an attempt's processes write their events
IMPORTING_ENV = "STALWART_IMPORTING_TASK_MODULE"  # set while a task's module is imported

# Where the processes of a job meet: several nodes, and the flash tier's replication.
RDZV_ENDPOINT_ENV = "STALWART_RDZV_ENDPOINT"  # HOST:PORT of the torch elastic rendezvous
NODE_ENV = "STALWART_NODE"  # ranks with the same value share a flash root
REPLICATION_HOST_ENV = "STALWART_REPLICATION_HOST"  # the address peers reach this process at

# Set by the user: serve checkpoint figures to Prometheus from every FlashCheckpointer's process.
PROMETHEUS_PORT_ENV = "STALWART_PROMETHEUS_PORT"  # plus LOCAL_RANK; 0 picks free ports
PROMETHEUS_ADDR_ENV = "STALWART_PROMETHEUS_ADDR"  # default 127.0.0.1

TASK_VARIABLES = (
    RUN_ID_ENV,
    ATTEMPT_ENV,
    MAX_ATTEMPTS_ENV,
    TASK_ENV,
    CHECKPOINT_URI_ENV,
    CHECKPOINT_PATH_ENV,
)


def _get(name: str) -> str | None:
    """The variable's value, or None when it is unset or empty."""
    return os.environ.get(name) or None


def home() -> Path:
    """The home directory: run records, attempt logs and (by default) the checkpoint store."""
    raw = _get(HOME_ENV)
    return Path(raw).expanduser() if raw else Path.home() / ".stalwart"


def checkpoint_store(option: str | None, task: str | None, otherwise: str) -> tuple[str, str]:
    """The checkpoint store and where it was named, for error messages: the run's option, else the
    task's, else ``$STALWART_CHECKPOINT_STORE``, else ``otherwise`` (the local runner's store under
    the home directory, or a pod's own disk)."""
    if option:
        return option, "checkpoint_store"
    if task:
        return task, "checkpoint_store"
    named = _get(CHECKPOINT_STORE_ENV)
    if named:
        return named, CHECKPOINT_STORE_ENV
    return otherwise, "checkpoint_store"


def local_checkpoint_store(home_dir: Path) -> str:
    """The local runner's checkpoint store when nothing names one: ``checkpoints`` under its home."""
    return (home_dir / "checkpoints").resolve().as_uri()


def int_variable(name: str, default: int) -> int:
    """An integer variable (ours or torch elastic's, e.g. ``RANK``), ``default`` when unset or not one."""
    raw = _get(name)
    try:
        return int(raw) if raw is not None else default
    except ValueError:
        return default


def run_id() -> str | None:
    """The run this process belongs to (None outside a task)."""
    return _get(RUN_ID_ENV)


def task_identity() -> dict[str, Any]:
    """What the runner tells an attempt about itself, as ``TaskContext``'s fields (``ctx()``)."""
    path = _get(CHECKPOINT_PATH_ENV)
    return {
        "run_id": _get(RUN_ID_ENV),
        "attempt": int_variable(ATTEMPT_ENV, 0),
        "max_attempts": int_variable(MAX_ATTEMPTS_ENV, 1),
        "task_name": _get(TASK_ENV),
        "checkpoint_uri": _get(CHECKPOINT_URI_ENV),
        "checkpoint_path": Path(path) if path else None,
    }


def variables(names: tuple[str, ...]) -> tuple[str | None, ...]:
    """The raw values of ``names``, e.g. as a key that changes when any of them does."""
    return tuple(os.environ.get(name) for name in names)


def attempt_dir() -> Path | None:
    """The attempt's directory inside a task (its processes write events there), else None."""
    raw = _get(ATTEMPT_DIR_ENV)
    return Path(raw) if raw else None


def flash_root() -> Path:
    """``$STALWART_FLASH_ROOT``, else ``/dev/shm/stalwart`` (tmpfs), else the temp directory."""
    raw = _get(FLASH_ROOT_ENV)
    if raw:
        return Path(raw).expanduser()
    if Path("/dev/shm").is_dir():
        return Path("/dev/shm/stalwart")
    import tempfile

    return Path(tempfile.gettempdir()) / "stalwart-flash"


def node_name() -> str | None:
    """``$STALWART_NODE``: ranks with the same name share a flash root (None: decided otherwise)."""
    return _get(NODE_ENV)


def replication_host() -> str | None:
    """``$STALWART_REPLICATION_HOST``, the address peers reach this process at (None: found otherwise)."""
    return _get(REPLICATION_HOST_ENV)


def rdzv_endpoint() -> str | None:
    """``$STALWART_RDZV_ENDPOINT``, HOST:PORT where the nodes of a job meet."""
    return _get(RDZV_ENDPOINT_ENV)


def progress_bars() -> bool:
    """False when ``$STALWART_NO_PROGRESS`` is set (and not empty)."""
    return _get(NO_PROGRESS_ENV) is None


def importing_task() -> bool:
    """Whether a task's module is being imported now (``stalwart.run()`` there would recurse)."""
    return _get(IMPORTING_ENV) is not None


@contextlib.contextmanager
def importing() -> Iterator[None]:
    """Mark a task module's import (for ``importing_task``); the previous state comes back after."""
    saved = os.environ.get(IMPORTING_ENV)
    os.environ[IMPORTING_ENV] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(IMPORTING_ENV, None)
        else:
            os.environ[IMPORTING_ENV] = saved


def prometheus_endpoint() -> tuple[int, str] | None:
    """``$STALWART_PROMETHEUS_PORT`` (plus ``LOCAL_RANK``, so ranks of a node do not collide; 0 picks
    free ports) and ``$STALWART_PROMETHEUS_ADDR`` (default 127.0.0.1); None when the port is unset."""
    raw = _get(PROMETHEUS_PORT_ENV)
    if raw is None:
        return None
    if not raw.isdigit():
        raise ValueError(f"{PROMETHEUS_PORT_ENV}={raw!r} is not accepted; use a port number")
    port = int(raw) + int_variable("LOCAL_RANK", 0) if int(raw) else 0
    return port, _get(PROMETHEUS_ADDR_ENV) or "127.0.0.1"


def storage_options_from_env() -> dict:
    """fsspec options for the checkpoint store (e.g. an S3 endpoint), passed to attempt processes as JSON."""
    raw = _get(STORAGE_OPTIONS_ENV)
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
