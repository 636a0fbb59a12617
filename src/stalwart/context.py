"""``ctx()``: what the running task knows about itself (run id, attempt, ranks, checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from . import config

if TYPE_CHECKING:
    from .checkpoint.task import Checkpoint

__all__ = ["TaskContext", "ctx"]


@dataclass(frozen=True)
class TaskContext:
    """The context of one attempt of one run.

    Everything comes from environment variables the runner sets, so it is the same in the attempt
    process, in its torch elastic workers and in a Kubernetes pod.
    """

    run_id: str | None
    attempt: int
    max_attempts: int
    task_name: str | None
    checkpoint_uri: str | None
    checkpoint_path: Path | None
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    node_rank: int = 0  # this node among the job's nodes (torch elastic's GROUP_RANK)
    nnodes: int = 1  # nodes in the job now (GROUP_WORLD_SIZE; it changes with an elastic job's size)
    local_world_size: int = 1  # ranks on this node
    restart_attempt: int = 0  # torch elastic's worker-group restart round within this attempt

    @property
    def attempt_number(self) -> int:
        """The attempt's number from 0, as the Flyte SDK names it (``attempt``)."""
        return self.attempt

    @property
    def in_task(self) -> bool:
        """True inside an attempt started by ``stalwart.run`` (or a pod of a stalwart task)."""
        return self.run_id is not None

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt + 1 >= self.max_attempts

    @cached_property
    def checkpoint(self) -> Checkpoint:
        """The task checkpoint of this run: ``load_sync()`` returns what earlier attempts saved."""
        if self.run_id is None or self.checkpoint_uri is None:
            raise RuntimeError(
                "ctx().checkpoint exists only inside a task run by stalwart.run(task, ...) or "
                "`stalwart run FILE.py TASK`; outside a run, construct stalwart.Checkpoint(uri, attempt=...)"
            )
        from .checkpoint.task import Checkpoint

        return Checkpoint(
            self.checkpoint_uri,
            attempt=self.attempt,
            path=self.checkpoint_path,
            storage_options=config.storage_options_from_env(),
        )


_VARIABLES = (
    *config.TASK_VARIABLES,
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "TORCHELASTIC_RESTART_COUNT",
)
_current: tuple[tuple, TaskContext] | None = None


def ctx() -> TaskContext:
    """The current task context; outside a run, ``run_id`` is None and ``in_task`` is False.

    The same object comes back while the environment is unchanged, so ``ctx().checkpoint`` is one
    Checkpoint for the whole attempt.
    """
    global _current
    key = config.variables(_VARIABLES)
    if _current is None or _current[0] != key:
        _current = (key, _build())
    return _current[1]


def _build() -> TaskContext:
    return TaskContext(
        **config.task_identity(),
        rank=config.int_variable("RANK", 0),
        local_rank=config.int_variable("LOCAL_RANK", 0),
        world_size=config.int_variable("WORLD_SIZE", 1),
        node_rank=config.int_variable("GROUP_RANK", 0),
        nnodes=config.int_variable("GROUP_WORLD_SIZE", 1),
        local_world_size=config.int_variable("LOCAL_WORLD_SIZE", 1),
        restart_attempt=config.int_variable("TORCHELASTIC_RESTART_COUNT", 0),
    )
