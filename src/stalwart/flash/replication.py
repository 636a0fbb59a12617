"""Replicas of committed objects on peer nodes, the sending side, and pulling objects back after a
node is lost.

Where replicas go is ``placement``'s (a ring of nodes); what receives and serves them on each node is
``replica_server``'s. A sender thread replicates every committed step in order (one in flight and one
waiting), with bounded retries and socket timeouts, so a slow or dead peer never blocks training.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

from .board import Board
from .buffers import Buffer
from .copier import Copier
from .layout import CommitRecord, FlashLayout
from .objects import CorruptObjectError
from .placement import Peer, RingPlacement
from .shelf import VerifiedObject, verify_mapped
from .transport import Connection, object_name, record_from_wire, short, typed_int

__all__ = ["Peer", "Replicator", "RingPlacement", "ask", "held_by", "lower_priority", "pull"]

log = logging.getLogger(__name__)


def lower_priority() -> None:
    """Make the calling thread yield the CPU to training (Linux threads carry their own nice value)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def held_by(peer: Peer, secret: bytes) -> tuple[bool, list[tuple[int, int, int]]]:
    """What the node of ``peer`` holds: whether the job has a directory there, and (step, rank, world
    size) of every committed object in its flash root. Answered by the peer's server, whatever its
    training process is doing."""
    conn = Connection.connect(peer.address, secret)
    try:
        conn.send_header({"op": "list"})
        reply = conn.recv_header()
    finally:
        conn.close()
    held, job = reply.get("held"), reply.get("job")
    if reply.get("ok") is not True or not isinstance(held, list) or not isinstance(job, bool):
        raise ConnectionError(f"rank {peer.rank} did not list its objects: {str(reply.get('error'))[:300]}")
    items = []
    for item in held:
        if not (isinstance(item, list) and len(item) == 3 and all(typed_int(v) and v >= 0 for v in item)):
            raise ConnectionError(f"rank {peer.rank} listed a malformed object {short(item)}")
        items.append((item[0], item[1], item[2]))
    return job, items


def ask(
    conn: Connection, op: str, peer: Peer, step: int, rank: int, **extra: int
) -> tuple[dict, CommitRecord]:
    """Send ``op`` for the object of (``step``, ``rank``); the reply and its commit record, checked."""
    conn.send_header({"op": op, "object": object_name(step, rank), **extra})
    reply = conn.recv_header()
    if reply.get("ok") is not True:
        raise ConnectionError(
            f"rank {peer.rank} cannot serve step {step} of rank {rank}: {str(reply.get('error'))[:300]}"
        )
    try:
        record = record_from_wire(reply.get("commit"))
    except ValueError as exc:
        raise ConnectionError(f"rank {peer.rank} sent a bad commit record for step {step}: {exc}") from None
    if (record.step, record.rank) != (step, rank):
        raise ConnectionError(
            f"rank {peer.rank} answered for step {step} of rank {rank} with step {record.step} of rank "
            f"{record.rank}"
        )
    return reply, record


class Pool(Protocol):
    """Where a pulled object lands: a rank's shelf, or a bare buffer pool."""

    def acquire(self, size: int) -> Buffer: ...

    def release(self, buffer: Buffer) -> None: ...


def pull(
    peer: Peer, step: int, rank: int, secret: bytes, pool: Pool, copier: Copier
) -> tuple[CommitRecord, VerifiedObject]:
    """Fetch a committed object from a peer into a buffer of ``pool``, verified, not yet renamed."""
    conn = Connection.connect(peer.address, secret)
    try:
        reply, record = ask(conn, "get", peer, step, rank)
        size = reply.get("size")
        if not typed_int(size) or size != record.objects[0]["size"]:
            raise ConnectionError(
                f"rank {peer.rank} answered for step {step} of rank {rank} with size {short(size)}, "
                f"committed with {record.objects[0]['size']}"
            )
        where = f"{object_name(step, rank)} from rank {peer.rank}"
        buffer = pool.acquire(size)
        try:
            conn.recv_into(buffer.view[:size])
            verified = verify_mapped(buffer, record, copier, where=where)
        except BaseException as exc:
            pool.release(buffer)
            if isinstance(exc, (OSError, ValueError)) or not isinstance(exc, Exception):
                raise
            raise CorruptObjectError(f"{where}: malformed object ({type(exc).__name__}: {exc})") from exc
        return record, verified
    finally:
        conn.close()


class Replicator:
    """Sends each newly committed object of this rank to its targets in order, off the training path: one
    in flight and one waiting; a third waits for a slot (memory stays bounded, every step gets replicas)."""

    def __init__(
        self,
        layout: FlashLayout,
        rank: int,
        targets: list[Peer],
        secret: bytes,
        board: Board,
        pin: Callable[[int], object],
        unpin: Callable[[int], None],
        *,
        attempts: int = 3,
        on_done: Callable[[], None] | None = None,
        retry_after: float = 30.0,
    ) -> None:
        self.layout, self.rank, self.targets, self.secret, self.board = layout, rank, targets, secret, board
        self._pin, self._unpin, self.attempts = pin, unpin, attempts
        self._on_done = on_done  # retention: a step's replicas just decided whether older steps can go
        self.retry_after = retry_after
        self._down_since: float | None = None  # replication failed: steps count as kept without replicas
        self._queue: queue.Queue[tuple[int, CommitRecord] | None] = queue.Queue(maxsize=1)
        self._lock = threading.Lock()  # submit and the sender agree on what is outstanding
        self._outstanding = 0
        self._idle = threading.Event()
        self._idle.set()
        self._connections: dict[int, Connection] = {}
        self.replicated: set[int] = set()
        self.failures: list[str] = []
        self._thread = threading.Thread(target=self._run, name="stalwart-replicator", daemon=True)
        self._thread.start()

    def submit(self, record: CommitRecord) -> None:
        """Replicate ``record``'s object, after the step already waiting (if any) was taken.

        While replication is down (the last attempt failed less than ``retry_after`` seconds ago) a step
        is not sent but counted as kept without replicas at once, so retention keeps memory bounded; the
        next step after that interval tries again."""
        down = self._down_since
        if down is not None and time.monotonic() - down < self.retry_after:
            self.board.gave_up(record.step, self.rank)
            if self._on_done is not None:
                self._on_done()
            return
        self._pin(record.step)
        with self._lock:
            self._outstanding += 1
            self._idle.clear()
        # Waits while a step is already waiting (one in flight, one queued): no step is skipped, so every
        # step becomes safe once every rank sent it. Skipping the waiting step for a newer one, as this once
        # did, let ranks skip different steps under load; no step was then replicated by every rank and
        # retention never dropped anything. A dead peer ends the wait: its send times out (down mode).
        self._queue.put((record.step, record))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until everything submitted was sent (or given up); False on timeout."""
        return self._idle.wait(timeout)

    def _done(self, step: int) -> None:
        self._unpin(step)
        with self._lock:
            self._outstanding -= 1
            if self._outstanding == 0:
                self._idle.set()

    def _run(self) -> None:
        lower_priority()
        while (item := self._queue.get()) is not None:
            step, record = item
            try:
                if all(self._send(target, record) for target in self.targets):
                    self.board.replicated(step, self.rank)
                    self.replicated.add(step)
                    self._down_since = None
                else:
                    self._down_since = time.monotonic()
                    log.warning(
                        "flash replication: step %d of rank %d has no replica; it is kept without one "
                        "(memory stays bounded), so losing this node before a later step is replicated "
                        "falls back to an older step or the durable copy",
                        step,
                        self.rank,
                    )
                    self.board.gave_up(step, self.rank)
            finally:
                self._done(step)
                if self._on_done is not None:
                    try:
                        self._on_done()
                    except Exception as exc:  # housekeeping: the sender must live on
                        log.warning("flash replication: retention after step %d failed: %s", step, exc)

    def _send(self, target: Peer, record: CommitRecord) -> bool:
        size = record.objects[0]["size"]
        for attempt in range(1, self.attempts + 1):
            try:
                conn = self._connections.get(target.rank)
                if conn is None:
                    conn = self._connections[target.rank] = Connection.connect(target.address, self.secret)
                with open(self.layout.object_path(record.step, self.rank), "rb") as file:
                    conn.send_header(
                        {
                            "op": "put",
                            "object": object_name(record.step, self.rank),
                            "size": size,
                            "commit": record.__dict__,
                        }
                    )
                    conn.send_file(file, size)
                reply = conn.recv_header()
                if reply.get("ok"):
                    return True
                raise ConnectionError(str(reply.get("error")))
            except (OSError, ValueError) as exc:
                stale = self._connections.pop(target.rank, None)
                if stale is not None:
                    stale.close()
                if attempt == self.attempts:
                    message = f"replicating step {record.step} to rank {target.rank} failed: {exc}"
                    log.warning("flash replication: %s", message)
                    self.failures.append(message)
                    return False
                time.sleep(0.2 * attempt)
        return False

    def close(self) -> None:
        with contextlib.suppress(queue.Full):  # behind a queued step, sent first (bounded by its timeouts)
            self._queue.put(None, timeout=60)
        self._thread.join(timeout=10)
        for conn in self._connections.values():
            conn.close()
