"""An attempt of an elastic task: torch elastic runs ``nproc_per_node`` workers of the task on this node.

The attempt process is the torch elastic agent (``elastic_launch``, c10d rendezvous): it restarts the
worker group up to ``max_restarts`` times, and after that the attempt fails and task-level retries
take over. Workers find the task the way an attempt does, read ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``
through ``ctx()``, and rank 0's return value is the task's output: it stays pickled until the runner,
where the task's script is ``__main__``, unpickles it. A worker that raises leaves a report that names
the first failure of the group (``elastic_failures``); a NonRetryableError there ends the attempt
without restarting the group. SIGTERM to the agent reaches the workers; if they saved their step and
stopped (``FlashCheckpointer``), the attempt was preempted, not failed.

Several nodes rendezvous at ``STALWART_RDZV_ENDPOINT`` (or ``PET_RDZV_ENDPOINT``, which the Kubeflow
training operator sets); one node picks a free port on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import config
from ..atomic import write_atomic
from ..elastic import Elastic
from ..flash.preemption import Preempted
from . import events
from .elastic_failures import (
    WorkerFailedError,
    any_non_retryable,
    attempt_result,
    clear_reports,
    first_failure,
    peer_loss,
    preemption_reported,
    write_report,
)
from .loader import call, leave_process_group, load, read_spec
from .processes import die_with_parent
from .protocol import AttemptSpec, dumps_output, failure_result

__all__ = ["launch"]

OUTPUT_FILE = "rank0-output.pkl"


class RendezvousFailed(RuntimeError):
    """The other nodes of an elastic task did not join in time."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _endpoint(elastic: Elastic) -> str:
    endpoint = config.rdzv_endpoint() or os.environ.get("PET_RDZV_ENDPOINT")  # Kubeflow's
    if endpoint:
        return endpoint
    if elastic.max_nodes > 1:
        raise RendezvousFailed(
            f"nnodes={elastic.nnodes!r} needs a rendezvous endpoint shared by the nodes: set "
            f"{config.RDZV_ENDPOINT_ENV}=HOST:PORT (the same on every node), or run the task with nnodes=1"
        )
    return f"127.0.0.1:{_free_port()}"


@dataclass
class _Rounds:
    failed: int = 0  # worker-group rounds that failed


@contextlib.contextmanager
def _agent_watching_reports(attempt_dir: Path) -> Iterator[_Rounds]:
    """Have torch elastic's agent count failed rounds and not restart after a NonRetryableError.

    ``launch_agent`` builds a ``LocalElasticAgent`` and offers no hook between "a worker failed" and
    "restart the group", so the agent class is swapped, for this call, for a subclass that reads the
    workers' reports there. Should torch rename these internals, restarts simply happen as before.
    """
    import torch.distributed.launcher.api as launcher

    base = getattr(launcher, "LocalElasticAgent", None)
    rounds = _Rounds()
    if base is None or not hasattr(base, "_monitor_workers"):
        yield rounds  # another torch: no hook, so group restarts go on as torch decides
        return

    class Agent(base):  # type: ignore[misc, valid-type]
        def _monitor_workers(self, worker_group: Any) -> Any:
            result = super()._monitor_workers(worker_group)
            if result.is_failed():
                rounds.failed += 1
                if any_non_retryable(result.failures, attempt_dir):
                    self._remaining_restarts = 0
                if self._remaining_restarts > 0:  # torch elastic restarts the worker group next
                    events.record(
                        "elastic_restart", round=rounds.failed, failed_ranks=sorted(result.failures)
                    )
            return result

    launcher.LocalElasticAgent = Agent  # type: ignore[misc]
    try:
        yield rounds
    finally:
        launcher.LocalElasticAgent = base  # type: ignore[misc]


# A node that joins a running elastic job waits forever for the rendezvous' MASTER_ADDR key when torch
# elastic shares its TCP store with the workers: the rank 0 agent of the restarted round already has its
# store and does not post the key again (torch 2.13, dynamic_rendezvous.next_rendezvous). Without sharing,
# every round posts it and the newcomer is admitted.
SHARED_STORE_OFF = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def launch(spec: AttemptSpec, attempt_dir: Path) -> bytes | None:
    """Run the task through torch elastic; returns rank 0's value, pickled (None on nodes without rank 0)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    elastic = spec.elastic
    assert elastic is not None
    if elastic.nproc_per_node > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: workers share the cores
    if elastic.min_nodes != elastic.max_nodes:
        os.environ.setdefault(SHARED_STORE_OFF, "1")
    run_id = config.run_id() or "stalwart"
    launch_config = LaunchConfig(
        min_nodes=elastic.min_nodes,
        max_nodes=elastic.max_nodes,
        nproc_per_node=elastic.nproc_per_node,
        run_id=run_id,
        role="stalwart",
        rdzv_endpoint=_endpoint(elastic),
        rdzv_backend="c10d",
        rdzv_configs=dict(elastic.rdzv_configs),
        max_restarts=elastic.max_restarts,
        monitor_interval=elastic.monitor_interval,
        start_method=elastic.start_method,
    )
    output_file = Path(attempt_dir) / OUTPUT_FILE
    output_file.unlink(missing_ok=True)
    clear_reports(attempt_dir)
    try:
        # Workers are fresh interpreters started from a command, as torchrun starts them: with a Python
        # callable, torch elastic forks workers through multiprocessing, and on this torch version the
        # first gloo process group after a worker-group restart fails to connect.
        with _agent_watching_reports(Path(attempt_dir)) as rounds:
            elastic_launch(launch_config, sys.executable)(
                "-m", "stalwart.runtime.elastic_launch", str(attempt_dir)
            )
    except RendezvousTimeoutError as exc:
        raise RendezvousFailed(
            f"rendezvous of run {run_id} at {launch_config.rdzv_endpoint} timed out after "
            f"{elastic.join_timeout} s "
            f"waiting for other nodes (nnodes={elastic.nnodes!r}): start the other nodes with the same run "
            f"id and {config.RDZV_ENDPOINT_ENV}, or lower nnodes; rdzv_configs['join_timeout'] sets the "
            f"wait ({exc})"
        ) from None
    except ChildFailedError as exc:
        first, others = first_failure(exc.failures, attempt_dir)
        raise WorkerFailedError(attempt_result(first, others, max(rounds.failed - 1, 0))) from None
    except SignalException as exc:
        # The agent was told to stop (a preemption notice to the pod's main process): it passed the
        # signal to its workers and waited for them. Workers that saved and stopped make it a preemption.
        saved = preemption_reported(attempt_dir)
        if saved is None:
            raise
        step = getattr(_unpickled(saved.result.exception), "step", None)
        raise Preempted(
            f"{saved.result.error_message} (the torch elastic agent got {signal.Signals(exc.sigval).name} "
            "and passed it to its workers)",
            step,
        ) from None
    if not output_file.exists():
        return None  # rank 0 ran on another node
    return output_file.read_bytes()


def _unpickled(payload: bytes | None) -> Any:
    try:
        return pickle.loads(payload) if payload else None
    except Exception:  # a report written by another version: the message still says it all
        return None


def run_worker(attempt_dir: str) -> None:
    """A torch elastic worker: the task itself. Rank 0 leaves its value in the attempt directory.

    A worker that raises reports it for the agent (``elastic_failures``). One that only lost a peer
    (another worker died under a collective) says so in one line instead of a traceback: the
    traceback of a consequence reads as a second failure.
    """
    from torch.distributed.elastic.multiprocessing.errors import record

    die_with_parent()  # the agent (the attempt process) may be killed before it can stop its workers
    try:
        record(_run)(attempt_dir)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        reason = peer_loss(exc)
        report = write_report(attempt_dir, failure_result(exc), reason is not None)
        if reason is None:
            raise
        print(
            f"stalwart: rank {report.rank} stopped: it lost its connection to another worker ({reason}), "
            "which failed first",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(1)


def _separate_restart_rounds() -> None:
    """Give each worker-group restart its own keys in the agent's store.

    torch 2.13 hands every restart round the agent's store without the per-round prefix older releases
    added, so the process group of round n+1 reads the addresses the dead round n published and fails
    with "Connection refused" (pytorch/pytorch#167288). Restores the prefix for the default group;
    harmless when torch fixes it (a second prefix).
    """
    import importlib

    from torch.distributed import PrefixStore

    # the module itself: ``torch.distributed.rendezvous`` as an attribute is a function of that name
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    original = getattr(rendezvous, "_create_c10d_store", None)
    if original is None or getattr(original, "stalwart_prefixed", False):
        return
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")

    def create(*args: Any, **kwargs: Any) -> Any:
        store = original(*args, **kwargs)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            return PrefixStore(f"/stalwart/restart_{restart}", store)
        return store

    create.stalwart_prefixed = True  # type: ignore[attr-defined]
    rendezvous._create_c10d_store = create  # type: ignore[attr-defined]


def _run(attempt_dir: str) -> None:
    _separate_restart_rounds()
    output = call(*load(read_spec(attempt_dir)))
    if int(os.environ.get("RANK", "0")) == 0:
        write_atomic(Path(attempt_dir) / OUTPUT_FILE, dumps_output(output), fsync=True)
    leave_process_group()


if __name__ == "__main__":
    run_worker(sys.argv[1])
