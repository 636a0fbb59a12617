"""``Elastic`` and ``RunPolicy``: how a task runs as a torch elastic job (configuration only).

The fields and defaults are flytekit's (``flytekitplugins.kfpytorch.Elastic``) so a Flyte user's
configuration carries over. Locally, the runner hands them to ``torch.distributed`` elastic launch; on
a cluster they become a Kubeflow ``PyTorchJob`` (``elasticPolicy``, ``runPolicy``) or a ``TrainJob``
(see ``stalwart.kubernetes.manifests``). Nothing here imports torch: a bad value fails when the task
is declared, not minutes later on a node.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .checks import int_at_least

__all__ = ["CLEAN_POD_POLICIES", "DEFAULT_RDZV_CONFIGS", "START_METHODS", "Elastic", "RunPolicy"]

START_METHODS = ("spawn", "fork")
CLEAN_POD_POLICIES = ("None", "Running", "All")

DEFAULT_RDZV_CONFIGS: Mapping[str, int] = MappingProxyType({"timeout": 900, "join_timeout": 900})
"""Fifteen minutes, as flytekit: some pods start on a node that still has to scale up or pull the image."""

_NNODES = re.compile(r"^\s*(\d+)\s*(?::\s*(\d+)\s*)?$")
_INT32_MAX = 2**31 - 1  # Kubernetes' int32 fields
_SECONDS = " (seconds)"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_nnodes(value: object) -> tuple[int, int]:
    """(min, max) nodes from ``4`` or ``"2:4"`` (``"4"`` too, as torchrun's ``--nnodes`` takes it)."""
    accepted = "an int >= 1 or 'min:max' with 1 <= min <= max, e.g. 2 or '2:4'"
    if _is_int(value):
        if not 1 <= value <= _INT32_MAX:  # type: ignore[operator]
            raise ValueError(f"nnodes={value!r} is not accepted; use {accepted}")
        return value, value  # type: ignore[return-value]
    match = _NNODES.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"nnodes={value!r} is not accepted; use {accepted}")
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) is not None else low
    if low < 1 or high > _INT32_MAX:
        raise ValueError(f"nnodes={value!r}: node counts must be >= 1; use {accepted}")
    if low > high:
        raise ValueError(
            f"nnodes={value!r}: min {low} is larger than max {high}; use 'min:max' with min <= max, or an int"
        )
    return low, high


def _check_rdzv_configs(value: object) -> dict[str, Any]:
    """Merge over the defaults; timeouts are whole seconds because torch reads them with ``int()``."""
    if not isinstance(value, Mapping):
        raise ValueError(
            f"rdzv_configs={value!r} is not accepted; use a dict such as "
            "{'timeout': 1200, 'join_timeout': 900}"
        )
    merged: dict[str, Any] = dict(DEFAULT_RDZV_CONFIGS)
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise ValueError(
                f"rdzv_configs key {key!r} is not accepted; keys are option names like 'timeout'"
            )
        if key.endswith("timeout"):
            if not _is_int(item) or item < 1:
                raise ValueError(
                    f"rdzv_configs[{key!r}]={item!r} is not accepted; use a whole number of seconds >= 1"
                )
        elif not isinstance(item, (str, int, float, bool)):
            raise ValueError(
                f"rdzv_configs[{key!r}]={item!r} is not accepted; values are str, int, float or bool"
            )
        merged[key] = item
    return merged


@dataclass(frozen=True)
class RunPolicy:
    """What Kubernetes does with a finished or stuck job (Kubeflow's ``runPolicy``).

    Args:
        clean_pod_policy: which pods to delete when the job ends: ``"None"``, ``"Running"`` or
            ``"All"``; ``None`` leaves the operator's default.
        ttl_seconds_after_finished: delete the job this many seconds after it ends.
        active_deadline_seconds: fail the job when it runs longer than this.
        backoff_limit: how many times the operator restarts failing pods before failing the job.
    """

    clean_pod_policy: str | None = None
    ttl_seconds_after_finished: int | None = None
    active_deadline_seconds: int | None = None
    backoff_limit: int | None = None

    def __post_init__(self) -> None:
        if self.clean_pod_policy is not None and self.clean_pod_policy not in CLEAN_POD_POLICIES:
            raise ValueError(
                f"clean_pod_policy={self.clean_pod_policy!r} is not accepted; use one of "
                f"{', '.join(repr(p) for p in CLEAN_POD_POLICIES)} or None"
            )
        if self.ttl_seconds_after_finished is not None:
            int_at_least(
                "ttl_seconds_after_finished",
                self.ttl_seconds_after_finished,
                0,
                maximum=_INT32_MAX,
                note=_SECONDS,
            )
        if self.active_deadline_seconds is not None:
            int_at_least(
                "active_deadline_seconds", self.active_deadline_seconds, 1, maximum=_INT32_MAX, note=_SECONDS
            )
        if self.backoff_limit is not None:
            int_at_least("backoff_limit", self.backoff_limit, 0, maximum=_INT32_MAX)


@dataclass(frozen=True)
class Elastic:
    """Run a task as a torch elastic job: ``nproc_per_node`` workers on each of ``nnodes`` nodes.

    Args:
        nnodes: number of nodes, or the range ``"min:max"``; the job starts once ``min`` nodes
            joined and admits more up to ``max``.
        nproc_per_node: worker processes per node (one per GPU, usually).
        start_method: how workers are started, ``"spawn"`` or ``"fork"``.
        monitor_interval: seconds between the agent's checks of its workers.
        max_restarts: worker-group restarts before the attempt fails (then task retries take over).
        rdzv_configs: rendezvous options for torch elastic, merged over ``DEFAULT_RDZV_CONFIGS``;
            ``join_timeout`` bounds how long a node waits for the others.
        increase_shared_mem: mount a memory-backed ``/dev/shm`` in the pods (DataLoader workers and
            the flash checkpoint tier use it; the container default is 64Mi).
        run_policy: what Kubernetes does with the finished job; ``None`` for the operator's defaults.

    Like torchrun, workers get ``OMP_NUM_THREADS=1`` when ``nproc_per_node > 1`` unless the task's
    ``env_vars`` set it.
    """

    nnodes: int | str = 1
    nproc_per_node: int = 1
    start_method: str = "spawn"
    monitor_interval: int | float = 5
    max_restarts: int = 0
    rdzv_configs: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_RDZV_CONFIGS))
    increase_shared_mem: bool = True
    run_policy: RunPolicy | None = None

    def __post_init__(self) -> None:
        _parse_nnodes(self.nnodes)
        note = ", e.g. the number of GPUs per node"
        int_at_least("nproc_per_node", self.nproc_per_node, 1, maximum=_INT32_MAX, note=note)
        if self.start_method not in START_METHODS:
            raise ValueError(
                f"start_method={self.start_method!r} is not accepted; use "
                f"{' or '.join(repr(m) for m in START_METHODS)}"
            )
        interval = self.monitor_interval
        if not isinstance(interval, (int, float)) or isinstance(interval, bool) or not interval > 0:
            raise ValueError(f"monitor_interval={interval!r} is not accepted; use a number of seconds > 0")
        if not math.isfinite(interval):
            raise ValueError(f"monitor_interval={interval!r} is not accepted; use a finite number of seconds")
        int_at_least("max_restarts", self.max_restarts, 0, maximum=_INT32_MAX)
        object.__setattr__(self, "rdzv_configs", _check_rdzv_configs(self.rdzv_configs))
        if not isinstance(self.increase_shared_mem, bool):
            raise ValueError(f"increase_shared_mem={self.increase_shared_mem!r} is not accepted; use a bool")
        if self.run_policy is not None and not isinstance(self.run_policy, RunPolicy):
            raise ValueError(
                f"run_policy={self.run_policy!r} is not accepted; use stalwart.RunPolicy(...) or None"
            )

    @property
    def min_nodes(self) -> int:
        """Nodes needed before training starts."""
        return _parse_nnodes(self.nnodes)[0]

    @property
    def max_nodes(self) -> int:
        """Most nodes the job admits (the PyTorchJob's worker replicas)."""
        return _parse_nnodes(self.nnodes)[1]

    @property
    def join_timeout(self) -> int:
        """Seconds a node waits in the rendezvous for the others before the attempt fails."""
        return int(self.rdzv_configs["join_timeout"])

    @property
    def rdzv_timeout(self) -> int:
        """torch elastic's rendezvous ``timeout`` (``LaunchConfig.rdzv_configs['timeout']``)."""
        return int(self.rdzv_configs["timeout"])
