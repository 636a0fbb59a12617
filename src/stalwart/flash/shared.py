"""One FlashEngine per rank of a job in a process, shared by the DCP writer and reader.

DCP builds storage writers and readers freely (one per save, a new one per ``async_save`` request in
the process executor), but a rank of a flash job needs one long-lived owner: the writer lock, the
buffer pool, the replication server that peers pull from and send replicas to. So the DCP adapter
asks this registry for the engine of (job, rank, world size) and the registry keeps it for the life of
the process, or until the writers using it close.

An engine a reader opened (to serve and pull objects during a load) is *idle*: no writer holds it.
A writer whose settings differ replaces it; ``close_idle`` closes it when another process is about to
own the rank (the ``async_save`` process executor). Both happen only after the load returned on every
rank (DCP's own collectives end a load), so no peer is still pulling from it.

DCP never closes its writers, so the engines still open when the interpreter exits are closed then
(background replication and uploads finish first): a thread of the engine still inside torch's C++
store client while the interpreter tears down would abort the process.
"""

from __future__ import annotations

import atexit
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .layout import FlashLayout

if TYPE_CHECKING:
    from .cluster import Introduction
    from .engine import FlashEngine

__all__ = [
    "close_all",
    "close_idle",
    "engine_for",
    "held",
    "introductions",
    "let_go",
    "listening",
    "release_idle",
    "stop_listening",
    "take_listener",
]

_lock = threading.Lock()
log = logging.getLogger(__name__)


@dataclass
class _Shared:
    engine: FlashEngine
    settings: tuple  # what the engine was built with; a writer needs its own to match
    writers: int = 0


_engines: dict[tuple[str, int, int], _Shared] = {}


def _key(layout: FlashLayout, rank: int, world_size: int) -> tuple[str, int, int]:
    return (str(layout.job_dir.resolve()), rank, world_size)


def engine_for(
    layout: FlashLayout,
    rank: int,
    world_size: int,
    settings: tuple | None,
    build: Callable[[], FlashEngine],
    *,
    introduction: Introduction | None = None,
    hold: bool = True,
) -> FlashEngine:
    """The engine of this rank, built with ``build`` if there is none (collective unless
    ``introduction`` is given: then the engine must be of that formation, and one of another is
    replaced). ``settings`` None: a reader, any engine serves; else a writer, which (with ``hold``)
    holds the engine until ``let_go`` and needs one built with the same settings."""
    key = _key(layout, rank, world_size)
    with _lock:
        shared = _engines.get(key)
    if shared is not None and settings is not None and shared.settings != settings:
        if shared.writers:
            raise ValueError(
                f"flash job {layout.job_id!r} rank {rank} is already saved in this process by a writer "
                f"with other settings ({_describe(shared.settings)}, this one {_describe(settings)}); "
                "use one writer per job, or the same settings"
            )
        _close(key, shared)  # a reader's engine: every rank replaces its own at this same point
        shared = None
    if shared is not None and introduction is not None and shared.engine.introduction != introduction:
        # the ranks formed anew (DCP's coordinator saw engines of different formations): this process's
        # writers of the rank go on with the new engine
        writers = shared.writers
        _close(key, shared)
        shared = _Shared(build(), shared.settings, writers)
        with _lock:
            _engines[key] = shared
    if shared is None:
        engine = build()
        shared = _Shared(engine, settings if settings is not None else ("reader",))
        with _lock:
            _engines[key] = shared
    if settings is not None and hold:
        shared.writers += 1
    return shared.engine


def held(layout: FlashLayout, rank: int, world_size: int) -> FlashEngine | None:
    """The engine of this rank of the job in this process, if one is open."""
    with _lock:
        shared = _engines.get(_key(layout, rank, world_size))
    return shared.engine if shared is not None else None


def introductions(layout: FlashLayout, rank: int) -> dict[int, Introduction]:
    """{world size: introduction} of the engines writers hold for this rank of the job in this process."""
    prefix = str(layout.job_dir.resolve())
    with _lock:
        return {
            key[2]: shared.engine.introduction
            for key, shared in _engines.items()
            if key[0] == prefix and key[1] == rank and shared.writers and shared.engine.introduction
        }


_listeners: dict[tuple[str, int], socket.socket] = {}


def listening(layout: FlashLayout, rank: int) -> tuple[str, int]:
    """The address of the socket this rank's next engine of the job will serve on: told to the other
    ranks in DCP's plans before the engine exists. The same until an engine takes it."""
    key = (str(layout.job_dir.resolve()), rank)
    with _lock:
        listener = _listeners.get(key)
        if listener is None:
            from .cluster import listen

            listener = _listeners[key] = listen()
        return listener.getsockname()[:2]


def take_listener(layout: FlashLayout, rank: int) -> socket.socket | None:
    """The socket ``listening`` named, for the engine about to be built (which owns it from now on)."""
    with _lock:
        return _listeners.pop((str(layout.job_dir.resolve()), rank), None)


def stop_listening(layout: FlashLayout, rank: int) -> None:
    """Close the rank's waiting socket unless an engine of the job still serves the rank in this process
    (a later save would then be told to peers through a new one)."""
    prefix = str(layout.job_dir.resolve())
    with _lock:
        if any(key[0] == prefix and key[1] == rank for key in _engines):
            return
        listener = _listeners.pop((prefix, rank), None)
    if listener is not None:
        listener.close()


def let_go(layout: FlashLayout, rank: int, world_size: int) -> None:
    """A writer is done with its engine; the last one closes it (committed steps stay)."""
    key = _key(layout, rank, world_size)
    with _lock:
        shared = _engines.get(key)
    if shared is None or shared.writers == 0:
        return
    shared.writers -= 1
    if shared.writers == 0:
        _close(key, shared)


def release_idle(layout: FlashLayout, rank: int, world_size: int) -> None:
    """Close the engine of this rank if no writer holds it (a load on one node is over: no peer pulls)."""
    key = _key(layout, rank, world_size)
    with _lock:
        shared = _engines.get(key)
    if shared is not None and not shared.writers:
        _close(key, shared)


def close_idle(layout: FlashLayout) -> None:
    """Close this job's engines no writer holds: another process is about to own their ranks."""
    prefix = str(layout.job_dir.resolve())
    with _lock:
        idle = [(key, shared) for key, shared in _engines.items() if key[0] == prefix and not shared.writers]
    for key, shared in idle:
        _close(key, shared)


def _close(key: tuple[str, int, int], shared: _Shared) -> None:
    with _lock:
        if _engines.get(key) is shared:
            del _engines[key]
    shared.engine.close()


def _describe(settings: tuple) -> str:
    return ", ".join(map(str, settings))


@atexit.register
def close_all() -> None:
    """Close every engine of this process (at exit; committed steps stay)."""
    with _lock:
        left = list(_engines.items())
        listeners = list(_listeners.values())
        _listeners.clear()
    for listener in listeners:
        listener.close()
    for key, shared in left:
        try:
            _close(key, shared)
        except Exception as exc:  # the job is ending: say what could not finish, close the rest
            log.warning("flash: closing rank %d of %s at exit failed: %s", key[1], key[0], exc)
