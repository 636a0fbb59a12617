"""stalwart: PyTorch training as durable tasks.

Declare what a task needs, let it fail, and resume from the newest state that survived. The public
names below are imported lazily (PEP 562), so ``import stalwart`` stays fast and never imports torch,
fsspec or the Kubernetes client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

_EXPORTS: dict[str, str] = {
    # configuration
    "Resources": "stalwart.resources",
    "Device": "stalwart.accelerators",
    "GPU": "stalwart.accelerators",
    "TPU": "stalwart.accelerators",
    "Neuron": "stalwart.accelerators",
    "AMD_GPU": "stalwart.accelerators",
    "HABANA_GAUDI": "stalwart.accelerators",
    "RetryStrategy": "stalwart.retry",
    "Backoff": "stalwart.retry",
    "NonRetryableError": "stalwart.retry",
    "NonRecoverableError": "stalwart.errors",
    "Timeout": "stalwart.timeout",
    "TaskEnvironment": "stalwart.environment",
    "Task": "stalwart.environment",
    "Elastic": "stalwart.elastic",
    "RunPolicy": "stalwart.elastic",
    # running
    "ctx": "stalwart.context",
    "TaskContext": "stalwart.context",
    "run": "stalwart.runtime.runner",
    "with_runcontext": "stalwart.runtime.runner",
    "Run": "stalwart.runtime.runner",
    "RunFailedError": "stalwart.errors",
    "RuntimeUserError": "stalwart.errors",
    "RuntimeSystemError": "stalwart.errors",
    "OOMError": "stalwart.errors",
    # checkpoints
    "Checkpoint": "stalwart.checkpoint.task",
    "CheckpointInfo": "stalwart.checkpoint.task",
    "CorruptCheckpointError": "stalwart.checkpoint.task",
    "latest_checkpoint": "stalwart.checkpoint.latest",
    # the memory-first tier
    "FlashCheckpointer": "stalwart.flash.checkpointer",
    "FlashStorageWriter": "stalwart.flash.dcp",
    "FlashStorageReader": "stalwart.flash.dcp",
    "FlashError": "stalwart.flash.errors",
    "FlashSpaceError": "stalwart.flash.errors",
    "FlashRestoreError": "stalwart.flash.errors",
    "Preempted": "stalwart.flash.preemption",
}

__all__ = [  # spelled out for linters and IDEs; a test checks it matches _EXPORTS
    "AMD_GPU",
    "GPU",
    "HABANA_GAUDI",
    "TPU",
    "Backoff",
    "Checkpoint",
    "CheckpointInfo",
    "CorruptCheckpointError",
    "Device",
    "Elastic",
    "FlashCheckpointer",
    "FlashError",
    "FlashRestoreError",
    "FlashSpaceError",
    "FlashStorageReader",
    "FlashStorageWriter",
    "Neuron",
    "NonRecoverableError",
    "NonRetryableError",
    "OOMError",
    "Preempted",
    "Resources",
    "RetryStrategy",
    "Run",
    "RunFailedError",
    "RunPolicy",
    "RuntimeSystemError",
    "RuntimeUserError",
    "Task",
    "TaskContext",
    "TaskEnvironment",
    "Timeout",
    "__version__",
    "ctx",
    "latest_checkpoint",
    "run",
    "with_runcontext",
]


def __getattr__(name: str) -> Any:
    if name == "errors":  # ``sw.errors.OOMError``, as ``flyte.errors``: a module, loaded when asked for
        return importlib.import_module("stalwart.errors")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stalwart' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from .accelerators import AMD_GPU, GPU, HABANA_GAUDI, TPU, Device, Neuron
    from .checkpoint.latest import latest_checkpoint
    from .checkpoint.task import Checkpoint, CheckpointInfo, CorruptCheckpointError
    from .context import TaskContext, ctx
    from .elastic import Elastic, RunPolicy
    from .environment import Task, TaskEnvironment
    from .errors import NonRecoverableError, OOMError, RunFailedError, RuntimeSystemError, RuntimeUserError
    from .flash.checkpointer import FlashCheckpointer
    from .flash.dcp import FlashStorageReader, FlashStorageWriter
    from .flash.errors import FlashError, FlashRestoreError, FlashSpaceError
    from .flash.preemption import Preempted
    from .resources import Resources
    from .retry import Backoff, NonRetryableError, RetryStrategy
    from .runtime.runner import Run, run, with_runcontext
    from .timeout import Timeout
