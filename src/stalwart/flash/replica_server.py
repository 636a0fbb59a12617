"""What a node runs for its peers: it keeps the replicas other ranks send it, and serves any committed
object it holds to a rank that lost its own.

A ``ReplicationServer`` (threads) receives replicas into pre-faulted pool buffers, verifies every checksum,
renames them into the step directory and writes their commit record; each source rank's replicas are
kept by a ``ReplicaKeeper`` with its own pool and retention. The sending side is ``replication``'s.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable

from ..checks import int_at_least
from .acceptor import Acceptor, RefusalLog
from .board import Board
from .buffers import Buffer, BufferPool, FlashSpaceError
from .copier import Copier
from .layout import CommitRecord, FlashLayout
from .objects import HEADER_SIZE, PACKED_HEADER_SIZE, Header
from .replication import lower_priority
from .shelf import verify_mapped
from .transport import (
    HANDSHAKE_DEADLINE,
    HANDSHAKE_SLOTS,
    OBJECT_NAME,
    Connection,
    PeerClosed,
    ProtocolError,
    record_from_wire,
    short,
    typed_int,
)

__all__ = ["ReplicaKeeper", "ReplicationServer"]

log = logging.getLogger(__name__)

_MAX_LISTED = 20_000  # objects a listing names (a frame holds at most 1 MiB)


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
        match = OBJECT_NAME.match(name) if isinstance(name, str) else None
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
