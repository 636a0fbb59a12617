"""Saving on a preemption notice: SIGTERM (what Kubernetes, SLURM and spot reclaimers send first) is
answered by one more flash save at the next step boundary, then a clean exit.

The signal handler only notes the time: a save in the middle of an optimizer step would capture a
state that never existed. ``FlashCheckpointer.maybe_save`` (or ``save``), called at every step
boundary, sees the note, saves the step at once with its replicas and durable copy, and raises
``Preempted`` (a ``SystemExit``, code 143 as for SIGTERM): the training loop ends, the task's runner
records the attempt as preempted, and the retry resumes from that step. If no step boundary comes
within the grace period, a watchdog says how many steps will be lost before the kill arrives.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

__all__ = [
    "DEFAULT_GRACE_PERIOD",
    "TERMINATION_GRACE_SECONDS",
    "Preempted",
    "StopStep",
    "check_grace_period",
    "notice",
    "watch",
]

log = logging.getLogger(__name__)

DEFAULT_GRACE_PERIOD = 25.0  # seconds a preemption save may take: fits Kubernetes' default 30 s
TERMINATION_GRACE_SECONDS = 30  # what rendered manifests give a pod between SIGTERM and SIGKILL


class Preempted(SystemExit):
    """The process was told to stop (SIGTERM) and saved its newest step first: not a crash."""

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(128 + signal.SIGTERM)
        self.message, self.step = message, step

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple:
        return (Preempted, (self.message, self.step))


class _Notice:
    """When this process was told to stop (None: it was not), and who is waiting to hear it."""

    def __init__(self) -> None:
        self.at: float | None = None
        self.installed = False
        self.previous: Any = None
        self.listeners: weakref.WeakSet[Any] = weakref.WeakSet()
        self.lock = threading.Lock()

    def handle(self, signum: int, frame: Any) -> None:
        if self.at is None:
            self.at = time.monotonic()
            log.warning("flash: SIGTERM received: saving the newest step at the next step boundary")
            for listener in list(self.listeners):
                listener.preempted_at(self.at)
        previous = self.previous
        if callable(previous):  # a handler of the application's own still hears it
            previous(signum, frame)


_notice = _Notice()


def _forked_child() -> None:
    """A forked child (a DataLoader worker) has no checkpointer of its own: SIGTERM must stop it as
    before, or its parent could not shut it down."""
    if _notice.installed:
        previous = _notice.previous
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        _notice.installed, _notice.previous, _notice.at = False, None, None
        _notice.listeners = weakref.WeakSet()
        _notice.lock = threading.Lock()


os.register_at_fork(after_in_child=_forked_child)


def notice() -> float | None:
    """The monotonic time SIGTERM arrived, or None."""
    return _notice.at


def watch(listener: Any) -> bool:
    """Answer SIGTERM for ``listener`` (its ``preempted_at(t)`` is called in the handler). The handler is
    installed once per process, from the main thread only (Python's rule); False if it could not be."""
    with _notice.lock:
        if not _notice.installed:
            if threading.current_thread() is not threading.main_thread():
                log.info("flash: not answering SIGTERM: the checkpointer was made outside the main thread")
                return False
            _notice.previous = signal.signal(signal.SIGTERM, _notice.handle)
            _notice.installed = True
        _notice.listeners.add(listener)
    return True


def take_back() -> None:
    """Answer SIGTERM with stalwart's handler alone again, after a framework installed its own over it.

    Lightning's handler, on a rank that gets SIGTERM, broadcasts from inside the handler (a collective
    the other ranks are not in: the job hangs) and ends the fit with SIGTERMException after the batch,
    before any save. The flash callback stops every rank at one saved step instead."""
    with _notice.lock:
        if not _notice.installed or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) != _notice.handle:
            signal.signal(signal.SIGTERM, _notice.handle)


def agree(key: str, proposal: int, noticed: bool) -> int | None:
    """The stop step the ranks of a job share through torch.distributed's store: ``proposal`` if this
    rank noticed first, the step another rank posted, or None (nobody was told to stop)."""
    import torch.distributed.distributed_c10d as c10d

    store = c10d._get_default_store()
    if noticed:
        return int(store.compare_set(key, "", str(proposal)))  # the first rank's proposal stands
    if store.check([key]):
        return int(store.get(key))
    return None


class StopStep:
    """The step boundary every rank of a job stops at after a preemption notice (SIGTERM).

    One rank: the boundary after its notice. Several (a node may be preempted alone): the first rank to
    get the notice posts the *next* step under ``key`` in the job's torch.distributed store, and every
    rank looks at each boundary (one store round trip). The next one: the others may be past this
    boundary already, but none can pass the next before this rank joins that step's collectives (as
    every data-parallel step has)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.step: int | None = None

    def reached(self, step: int, world_size: int) -> bool:
        if self.step is None:
            noticed = notice() is not None
            if world_size == 1:
                self.step = step if noticed else None
            else:
                self.step = agree(self.key, step + 1, noticed)
        return self.step is not None and step >= self.step


def check_grace_period(value: object) -> float:
    """``value`` in seconds if it is a number > 0; else a ValueError saying what is accepted."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(
            f"grace_period={value!r} is not accepted; use the seconds a save may take after SIGTERM (> 0; "
            f"Kubernetes kills {TERMINATION_GRACE_SECONDS} s after it)"
        )
    return float(value)


def start_watchdog(deadline: float, late: Callable[[], str | None]) -> None:
    """At ``deadline`` (monotonic), log what ``late()`` says will be lost, unless it says nothing."""

    def run() -> None:
        time.sleep(max(0.0, deadline - time.monotonic()))
        message = late()
        if message:
            log.error("flash: %s", message)

    threading.Thread(target=run, name="stalwart-preemption-watchdog", daemon=True).start()
