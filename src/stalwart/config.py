"""Where stalwart keeps things, from environment variables, so every process of a run agrees.

The local runner, its attempt processes, their torch elastic workers and Kubernetes pods all read the
same variables, which is how a fresh process finds its run, attempt and checkpoint store.
"""

from __future__ import annotations

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
