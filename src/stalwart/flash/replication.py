"""Replicas of committed objects on peer nodes, and pulling them back after a node is lost.

Where replicas go is ``placement``'s (a ring of nodes). Each rank runs a small server
(threads) that receives replicas into pre-faulted pool buffers, verifies every checksum, renames them
into the step directory and writes their commit record; it also serves objects to a rank that lost
its own. A sender thread replicates the newest committed step (an older one still queued is
skipped), with bounded retries and socket timeouts, so a slow or dead peer never blocks training.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol

from ..checks import int_at_least
from .acceptor import Acceptor, RefusalLog
from .board import Board
from .buffers import Buffer, BufferPool, FlashSpaceError
from .copier import Copier
from .layout import CommitRecord, FlashLayout
from .objects import HEADER_SIZE, PACKED_HEADER_SIZE, CorruptObjectError, Header
from .placement import Peer, RingPlacement
from .shelf import VerifiedObject, verify_mapped
from .transport import (
    HANDSHAKE_DEADLINE,
    HANDSHAKE_SLOTS,
    Connection,
    PeerClosed,
    ProtocolError,
    record_from_wire,
    short,
    typed_int,
)

__all__ = [
    "Peer",
    "ReplicaKeeper",
    "ReplicationServer",
    "Replicator",
    "RingPlacement",
    "ask",
    "held_by",
    "pull",
]

log = logging.getLogger(__name__)

_OBJECT = re.compile(r"^steps/step-(\d{12})/rank-(\d{5})\.obj$")


class ReplicaKeeper:
    """The replicas of one source rank held on this node: a buffer pool of their own, and retention."""

    def __init__(self, layout: FlashLayout, source: int, keep: int, board: Board) -> None:
        self.layout, self.source, self.keep, self.board = layout, source, keep, board
        self.pool = BufferPool(layout.job_dir / "pool" / f"replica-{source:05d}")
        self.mutex = threading.Lock()
        self.held: dict[int, Buffer | None] = {}  # step -> buffer mapped here (None: found on disk)
        for step in layout.steps():
            record = layout.read_commit(step, source)
            # a step saved by another world size is not a replica of this one (``reshard``)
            if (
                record is not None
                and record.world_size == board.world_size
                and layout.object_path(step, source).exists()
            ):
                self.held[step] = None

    def accept(self, record: CommitRecord, buffer: Buffer) -> None:
        """Commit a verified replica. The same replica again (a sender that gave up waiting for the reply
        resends it) changes nothing; a different object of the same step replaces the old one by rename,
        whole or not at all: the sender's is of the timeline training is on."""
        with self.mutex:
            existing = self.layout.read_commit(record.step, self.source)
            if existing is not None and existing.objects == record.objects:
                self.pool.release(buffer)  # a duplicate: the committed replica stays as it is
                return
            if existing is not None:
                log.warning(
                    "flash replication: the replica of step %d of rank %d is replaced by a different one "
                    "(an abandoned timeline's was still here)",
                    record.step,
                    self.source,
                )
                self.layout.remove_commit(record.step, self.source)  # record first, as every drop does
            previous = self.held.pop(record.step, None)
            buffer.move(self.layout.object_path(record.step, self.source))
            self.layout.write_commit(record)
            self.held[record.step] = buffer
            if previous is not None:
                previous.close()  # its file was replaced by the rename: unmapping frees its pages
        self.retain()

    def retain(self) -> None:
        with self.mutex:
            safe = [s for s in sorted(self.held) if self.board.safe(s)]
            if len(safe) <= self.keep:
                return
            for step in [s for s in sorted(self.held) if s < safe[-self.keep]]:
                self._drop(step)

    def drop_other_than(self, keep_steps: Callable[[int], bool]) -> None:
        with self.mutex:
            for step in [s for s in self.held if not keep_steps(s)]:
                self._drop(step)

    def _drop(self, step: int) -> None:
        self.layout.remove_commit(step, self.source)
        buffer = self.held.pop(step)
        if buffer is not None:
            self.pool.release(buffer)
        elif self.layout.object_path(step, self.source).exists():
            self.pool.adopt(self.layout.object_path(step, self.source))
        self.layout.remove_step_if_abandoned(step)

    def close(self) -> None:
        with self.mutex:
            for buffer in self.held.values():
                if buffer is not None:
                    buffer.close()
            self.pool.close()


class ReplicationServer:
    """Receives replicas for the ranks this one keeps, and serves any committed object of this node.

    Authentication runs in an ``Acceptor`` with its own bounded pool and overall deadline, so clients
    without the job secret never hold one of the ``max_connections`` session slots. A request that is
    malformed gets an error reply and a log line; the server goes on serving everyone else.
    """

    def __init__(
        self,
        layout: FlashLayout,
        secret: bytes,
        copier: Copier,
        host: str,
        *,
        max_connections: int = 16,  # a recovery opens 4 per rank that lacks its object
        handshake_slots: int = HANDSHAKE_SLOTS,
        handshake_deadline: float = HANDSHAKE_DEADLINE,
        listener: socket.socket | None = None,
    ) -> None:
        """``listener``: a socket already bound (and listening) for this server, whose address peers
        were told before the job secret was known; else one is bound on ``host``."""
        int_at_least("max_connections", max_connections, 1)
        self.layout, self.secret, self.copier = layout, secret, copier
        self.keepers: dict[int, ReplicaKeeper] = {}
        self.refusals = RefusalLog(log)
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._sessions: dict[Connection, threading.Thread] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        if listener is None:
            listener = socket.create_server((host, 0))
        self.address: tuple[str, int] = (host, listener.getsockname()[1])
        try:
            self._acceptor = Acceptor(
                listener,
                secret,
                self._start_session,
                self.refusals,
                slots=handshake_slots,
                deadline=handshake_deadline,
                name="stalwart-replica-server",
            )
        except BaseException:
            listener.close()
            raise

    def _start_session(self, sock: socket.socket, peer: str) -> None:
        """An authenticated peer: a thread of its own if a session slot is free."""
        if self._closed.is_set():
            sock.close()
            return
        if not self._slots.acquire(blocking=False):
            self.refusals.refuse(
                "sessions",
                "flash replication: refusing %s: %d authenticated sessions are open, the most allowed",
                peer,
                self.max_connections,
            )
            sock.close()
            return
        conn = Connection(sock, peer)
        thread = threading.Thread(
            target=self._serve, args=(conn,), name="stalwart-replica-session", daemon=True
        )
        with self._lock:
            self._sessions[conn] = thread
        thread.start()

    def _serve(self, conn: Connection) -> None:
        try:
            while not self._closed.is_set():
                try:
                    request = conn.recv_header()
                except (PeerClosed, TimeoutError):
                    return  # the peer is done, or idle for longer than a socket timeout
                except ProtocolError as exc:
                    self.refusals.refuse("request", "flash replication: refused a frame: %s", exc)
                    if exc.in_sync:
                        conn.send_header({"ok": False, "error": f"refused: {exc}"})
                    return
                if not self._handle(conn, request):
                    return
        except OSError as exc:
            if not self._closed.is_set():
                self.refusals.refuse(
                    "connection", "flash replication: connection from %s failed: %s", conn.peer, exc
                )
        except Exception:  # a bug, not a peer's mistake: say so, keep serving the others
            log.error("flash replication: internal error serving %s", conn.peer, exc_info=True)
        finally:
            with self._lock:
                self._sessions.pop(conn, None)
            self._slots.release()  # before the close the peer sees, so it may reconnect at once
            conn.close()

    def _handle(self, conn: Connection, request: dict) -> bool:
        """Serve one request; False when the connection must close (unread bytes follow a refused put)."""
        op = request.get("op")
        if op == "get":
            return self._get(conn, request)
        if op == "put":
            lower_priority()  # replicas yield to training; serving a recovery (get) does not
            return self._put(conn, request)
        if op == "list":
            return self._list(conn)
        if op == "head":
            return self._head(conn, request)
        why = f"unknown operation {short(op)}; use 'get', 'put', 'list' or 'head'"
        return self._refuse(conn, request, why, keep=True)

    def _head(self, conn: Connection, request: dict) -> bool:
        """A committed object's packed header and meta region, without its tensor bytes (a reader that
        needs only the metadata: DCP's global metadata rides in the coordinator's object)."""
        parsed = self._parse(request)
        if parsed is None:
            return self._refuse(conn, request, "not an object name of this job", keep=True)
        record = self.layout.read_commit(*parsed)
        path = self.layout.object_path(*parsed)
        try:
            if record is None:
                raise FileNotFoundError(path)
            with open(path, "rb") as file:
                raw_header = file.read(PACKED_HEADER_SIZE)
                header = Header.unpack(raw_header, where=str(path))
                file.seek(header.meta_offset)
                meta_region = file.read(header.meta_size)
        except (OSError, ValueError) as exc:  # the client verifies what it gets; this it cannot read
            conn.send_header({"ok": False, "error": f"no readable object {request['object']} here: {exc}"})
            return True
        conn.send_header(
            {"ok": True, "commit": record.__dict__, "header": len(raw_header), "meta": len(meta_region)}
        )
        conn.sock.sendall(raw_header + meta_region)
        return True

    def _list(self, conn: Connection) -> bool:
        """What this node holds: [step, rank, world size] of every committed object in its flash root."""
        held = [
            [step, rank, world]
            for step, rank, world in self.layout.commit_index()
            if self.layout.object_path(step, rank).exists()
        ]
        conn.send_header({"ok": True, "job": self.layout.job_dir.is_dir(), "held": held[:_MAX_LISTED]})
        return True

    def _refuse(self, conn: Connection, request: dict, why: str, *, keep: bool) -> bool:
        self.refusals.refuse(
            "request",
            "flash replication: refused a request for %s from %s: %s",
            short(request.get("object")),
            conn.peer,
            why,
        )
        conn.send_header({"ok": False, "error": f"refused: {why}"})
        return keep

    def _parse(self, request: dict) -> tuple[int, int] | None:
        name = request.get("object")
        match = _OBJECT.match(name) if isinstance(name, str) else None
        return None if match is None else (int(match.group(1)), int(match.group(2)))

    def _put(self, conn: Connection, request: dict) -> bool:
        parsed, size = self._parse(request), request.get("size")
        keeper = self.keepers.get(parsed[1]) if parsed else None
        if keeper is None:
            return self._refuse(conn, request, "not a replica this rank keeps", keep=False)
        try:
            record = record_from_wire(request.get("commit"))
        except ValueError as exc:
            return self._refuse(conn, request, f"bad commit record: {exc}", keep=False)
        if not typed_int(size) or size != record.objects[0]["size"]:
            why = f"size={short(size)} is not the commit record's size {record.objects[0]['size']}"
            return self._refuse(conn, request, why, keep=False)
        if size < HEADER_SIZE:
            return self._refuse(conn, request, f"size {size} is smaller than an object header", keep=False)
        if (record.step, record.rank) != parsed:
            why = f"the commit record is for step {record.step} of rank {record.rank}, not this object"
            return self._refuse(conn, request, why, keep=False)
        try:
            with keeper.mutex:
                buffer = keeper.pool.acquire(size)
        except FlashSpaceError as exc:
            return self._refuse(conn, request, f"no room for a replica of size {size}: {exc}", keep=False)
        where = f"replica of {request['object']} from {conn.peer}"
        try:
            conn.recv_into(buffer.view[:size])
            verify_mapped(buffer, record, self.copier, where=where)
        except BaseException as exc:
            with keeper.mutex:
                keeper.pool.release(buffer)
            if isinstance(exc, OSError) or not isinstance(exc, Exception):
                raise
            # corrupt, or malformed beyond what its checksums describe: every byte was read, so the
            # connection stays usable
            return self._refuse(conn, request, str(exc) or type(exc).__name__, keep=True)
        keeper.accept(record, buffer)
        conn.send_header({"ok": True})
        return True

    def _get(self, conn: Connection, request: dict) -> bool:
        """A committed object, or the range ``offset``/``length`` of it (a recovery asks several nodes,
        or one over several connections, for pieces at once)."""
        parsed = self._parse(request)
        if parsed is None:
            return self._refuse(conn, request, "not an object name of this job", keep=True)
        record = self.layout.read_commit(*parsed)
        path = self.layout.object_path(*parsed)
        if record is None or not path.exists():
            conn.send_header({"ok": False, "error": f"no committed object {request['object']} here"})
            return True
        size = record.objects[0]["size"]
        offset = request.get("offset", 0)
        length = request.get("length", size - offset if typed_int(offset) else None)
        if not (typed_int(offset) and typed_int(length) and offset >= 0 and 0 < length <= size - offset):
            why = f"bytes {short(offset)}+{short(length)} are not a range of the {size}-byte object"
            return self._refuse(conn, request, why, keep=True)
        with open(path, "rb") as file:
            conn.send_header(
                {"ok": True, "size": size, "commit": record.__dict__, "offset": offset, "length": length}
            )
            conn.send_file(file, length, offset=offset)
        return True

    def close(self) -> None:
        """Stop accepting, end the sessions (their sockets are shut down) and close the keepers."""
        self._closed.set()
        self._acceptor.close()
        with self._lock:
            sessions = dict(self._sessions)
        for conn in sessions:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 5
        for thread in sessions.values():
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for keeper in self.keepers.values():
            keeper.close()


def lower_priority() -> None:
    """Make the calling thread yield the CPU to training (Linux threads carry their own nice value)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def object_name(step: int, rank: int) -> str:
    return f"steps/step-{step:012d}/rank-{rank:05d}.obj"


_MAX_LISTED = 20_000  # objects a listing names (a frame holds at most 1 MiB)


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
