"""The replication server's front door: handshakes of clients not yet known to hold the job secret.

They run in one thread over non-blocking sockets (``Acceptor``): a client without the secret costs a
socket, never a thread or a session slot, and has ``HANDSHAKE_DEADLINE`` seconds in all to prove
itself; at most ``HANDSHAKE_SLOTS`` are pending, and a newcomer beyond them drops the oldest (a real
peer answers in one round trip, so it is almost never the oldest). Refusals are logged at a bounded
rate (``RefusalLog``), so a flood of hostile connections cannot flood the log either.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..checks import int_at_least
from .transport import ANSWER_SIZE, HANDSHAKE_DEADLINE, HANDSHAKE_SLOTS, AuthError, ServerHandshake

__all__ = ["Acceptor", "RefusalLog"]

log = logging.getLogger(__name__)


@dataclass
class _Window:
    start: float
    logged: int = 0
    unlogged: int = 0


class RefusalLog:
    """Warnings about refused peers at a bounded rate: per kind of refusal, ``burst`` lines per
    ``interval`` seconds; the rest are counted, and the count is logged when the interval ends."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 20,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger, self.burst, self.interval, self._clock = logger, burst, interval, clock
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def refuse(self, kind: str, message: str, *args: object) -> None:
        now = self._clock()
        with self._lock:
            window, ended = self._windows.get(kind), None
            if window is not None and now - window.start >= self.interval:
                ended, window = window, None
            if window is None:
                window = self._windows[kind] = _Window(now)
            log_it = window.logged < self.burst
            if log_it:
                window.logged += 1
            else:
                window.unlogged += 1
        if ended is not None:
            self._summarise(kind, ended)
        if log_it:
            self._logger.warning(message, *args)

    def flush_due(self) -> None:
        """Log the counts of intervals that have ended (called now and then by the acceptor)."""
        now = self._clock()
        with self._lock:
            ended = [
                (k, w) for k, w in self._windows.items() if w.unlogged and now - w.start >= self.interval
            ]
            for kind, _ in ended:
                del self._windows[kind]
        for kind, window in ended:
            self._summarise(kind, window)

    def flush(self) -> None:
        """Log every count not logged yet (at close)."""
        with self._lock:
            ended = [(k, w) for k, w in self._windows.items() if w.unlogged]
            for kind, _ in ended:
                del self._windows[kind]
        for kind, window in ended:
            self._summarise(kind, window)

    def _summarise(self, kind: str, window: _Window) -> None:
        if window.unlogged:
            self._logger.warning(
                "flash replication: refused %d more (%s) without a line each (at most %d lines per %.0f s)",
                window.unlogged,
                kind,
                self.burst,
                self.interval,
            )


@dataclass
class _Pending:
    peer: str
    handshake: ServerHandshake
    started: float
    answer: bytearray = field(default_factory=bytearray)


class Acceptor:
    """Accepts connections and runs their handshakes in one thread, then hands each authenticated
    socket to ``on_session(sock, peer)`` (which owns it from then on).

    At most ``slots`` handshakes are pending, each for at most ``deadline`` seconds in all (not per
    receive: a client sending a byte now and then is dropped all the same). When every slot is taken
    the oldest pending handshake is dropped for the newcomer: refusing newcomers instead would let a
    few slow clients lock every peer out, while a legitimate handshake takes one round trip and so is
    almost never the oldest.
    """

    def __init__(
        self,
        listener: socket.socket,
        secret: bytes,
        on_session: Callable[[socket.socket, str], None],
        refusals: RefusalLog,
        *,
        slots: int = HANDSHAKE_SLOTS,
        deadline: float = HANDSHAKE_DEADLINE,
        name: str = "stalwart-acceptor",
    ) -> None:
        int_at_least("handshake slots", slots, 1)
        if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not deadline > 0:
            raise ValueError(f"handshake deadline={deadline!r} is not accepted; use seconds > 0")
        self._listener, self._secret, self._on_session = listener, secret, on_session
        self.refusals, self.slots, self.deadline = refusals, slots, float(deadline)
        listener.setblocking(False)
        self._pending: dict[socket.socket, _Pending] = {}  # oldest first
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            while not self._closed.is_set():
                for key, _ in self._selector.select(self._next_timeout()):
                    try:
                        if key.fileobj is self._listener:
                            self._accept()
                        elif key.fileobj is self._wake_r:
                            with contextlib.suppress(OSError):
                                self._wake_r.recv(64)
                        else:
                            self._receive(key.fileobj)  # type: ignore[arg-type]
                    except Exception:  # a bug here must not stop the server accepting peers
                        log.error("flash replication: internal error in the acceptor", exc_info=True)
                        if key.fileobj in self._pending:
                            self._forget(key.fileobj)
                self._expire()
                self.refusals.flush_due()
        finally:
            for sock in list(self._pending):
                self._forget(sock)
            self._selector.close()
            for sock in (self._listener, self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    sock.close()
            self.refusals.flush()

    def _next_timeout(self) -> float:
        if not self._pending:
            return 1.0
        oldest = next(iter(self._pending.values()))
        return min(1.0, max(0.0, oldest.started + self.deadline - time.monotonic()))

    def _accept(self) -> None:
        for _ in range(self.slots):  # a bounded batch, so pending handshakes are read in between
            try:
                sock, address = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # out of file descriptors, or the client gave up already
                self.refusals.refuse("accept", "flash replication: accepting a connection failed: %s", exc)
                if self._pending:
                    self._drop(next(iter(self._pending)), "accept", "dropped to free a file descriptor")
                else:
                    self._closed.wait(0.1)  # the listener stays readable; do not spin
                return
            peer = f"{address[0]}:{address[1]}"
            if len(self._pending) >= self.slots:
                self._drop(
                    next(iter(self._pending)),
                    "handshake slots",
                    f"dropped for a newcomer ({self.slots} handshakes pending, the most allowed)",
                )
            sock.setblocking(False)
            handshake = ServerHandshake(self._secret)
            try:
                if sock.send(handshake.hello) != len(handshake.hello):
                    raise ConnectionError("the hello did not fit the socket buffer")
            except OSError as exc:
                self.refusals.refuse(
                    "handshake", "flash replication: handshake with %s failed: %s", peer, exc
                )
                sock.close()
                continue
            self._pending[sock] = _Pending(peer, handshake, time.monotonic())
            self._selector.register(sock, selectors.EVENT_READ)

    def _receive(self, sock: socket.socket) -> None:
        pending = self._pending.get(sock)
        if pending is None:
            return
        try:
            data = sock.recv(ANSWER_SIZE - len(pending.answer))
        except BlockingIOError:
            return
        except OSError as exc:
            self._drop(sock, "handshake", f"failed during the handshake ({exc})")
            return
        if not data:
            self._drop(sock, "handshake", "closed the connection during the handshake")
            return
        pending.answer += data
        if len(pending.answer) < ANSWER_SIZE:
            return
        self._forget(sock, close=False)
        try:
            proof = pending.handshake.proof(bytes(pending.answer), pending.peer)
            if sock.send(proof) != len(proof):
                raise ConnectionError("the proof did not fit the socket buffer")
        except AuthError as exc:
            self.refusals.refuse("secret", "flash replication: %s", exc)
            sock.close()
            return
        except OSError as exc:
            self.refusals.refuse(
                "handshake", "flash replication: handshake with %s failed: %s", pending.peer, exc
            )
            sock.close()
            return
        try:
            self._on_session(sock, pending.peer)
        except Exception:
            log.error("flash replication: internal error starting a session", exc_info=True)
            sock.close()

    def _expire(self) -> None:
        now = time.monotonic()
        for sock, pending in list(self._pending.items()):
            if now - pending.started < self.deadline:
                break  # oldest first: the rest are younger
            self._drop(sock, "handshake deadline", f"dropped: no handshake within {self.deadline:g} s")

    def _drop(self, sock: socket.socket, kind: str, what: str) -> None:
        pending = self._pending[sock]
        self.refusals.refuse(
            kind,
            "flash replication: %s %s after %.1f s, %d of %d handshake bytes received",
            pending.peer,
            what,
            time.monotonic() - pending.started,
            len(pending.answer),
            ANSWER_SIZE,
        )
        self._forget(sock)

    def _forget(self, sock: socket.socket, *, close: bool = True) -> None:
        self._pending.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(sock)
        if close:
            sock.close()
