"""Hostile clients against a real replication server on 127.0.0.1.

A client without the job secret must never delay one that has it: idle and slow-loris connections,
garbage and wrong secrets hold no slot an authenticated peer needs. A client with the secret that sends
malformed requests is refused with a reply and a log line, and the server keeps serving. Every refusal
is logged, and no exception escapes a server thread as a traceback on stderr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import secrets
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from stalwart.flash import transport
from stalwart.flash.board import LocalBoard
from stalwart.flash.buffers import BufferPool
from stalwart.flash.copier import Copier
from stalwart.flash.engine import FlashEngine
from stalwart.flash.layout import CommitRecord, FlashLayout
from stalwart.flash.replica_server import ReplicaKeeper, ReplicationServer
from stalwart.flash.replication import Peer, pull
from stalwart.flash.shelf import RankShelf
from stalwart.flash.transport import HANDSHAKE_DEADLINE, AuthError, Connection, record_from_wire
from stalwart.flash.tree import TensorRef

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

SECRET = b"s" * 32
PUT_NAME = "steps/step-000000000009/rank-00001.obj"
WAIT = 30.0  # bound on waiting for a condition; reached only when the behaviour is wrong


# the node under attack


@pytest.fixture
def node(tmp_path: Path) -> tuple[FlashLayout, CommitRecord, bytes]:
    """Node a holds a committed step 7 of rank 0; rank 1's step 9 (on node b) is a replica to put."""
    layout = FlashLayout(tmp_path / "node-a", "job")
    with FlashEngine(layout, world_size=1) as engine:
        engine.save(7, {"w": torch.arange(1000.0)})
    source = FlashLayout(tmp_path / "node-b", "job")
    copier = Copier(1)
    writer = RankShelf(source, 1, 2, keep=2, copier=copier)
    writer.commit_staged(
        9, writer.stage({"w": TensorRef(0)}, [torch.ones(2000)], chunk_size=4096, hash_now=True)
    )
    writer.close()
    copier.close()
    record = source.read_commit(9, 1)
    return layout, record, source.object_path(9, 1).read_bytes()[: record.objects[0]["size"]]


@contextlib.contextmanager
def serving(layout: FlashLayout, **options: Any) -> Iterator[ReplicationServer]:
    copier = Copier(2)
    server = ReplicationServer(layout, SECRET, copier, "127.0.0.1", **options)
    server.keepers[1] = ReplicaKeeper(layout, 1, keep=2, board=LocalBoard(layout, 1))
    try:
        yield server
    finally:
        server.close()
        copier.close()


@pytest.fixture
def thread_tracebacks() -> Iterator[list[str]]:
    """Exceptions that escape any thread during the test (each would print a traceback on stderr)."""
    seen: list[str] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        seen.append(
            f"{args.exc_type.__name__}: {args.exc_value} (thread {getattr(args.thread, 'name', '?')})"
        )
        previous(args)

    threading.excepthook = hook
    try:
        yield seen
    finally:
        threading.excepthook = previous


# legitimate peers


def legitimate_pull(address: tuple[str, int], directory: Path) -> float:
    """Pull and check step 7 of rank 0, as a replaced node does; return the seconds it took."""
    pool, copier = BufferPool(directory / f"pool-{secrets.token_hex(4)}"), Copier(1)
    try:
        started = time.monotonic()
        record, verified = pull(Peer(0, "a", address), 7, 0, SECRET, pool, copier)
        elapsed = time.monotonic() - started
        data = torch.frombuffer(bytearray(verified.buffer.view[4096 : 4096 + 4000]), dtype=torch.float32)
        assert record.step == 7 and torch.equal(data, torch.arange(1000.0))
        pool.release(verified.buffer)
        del verified
        return elapsed
    finally:
        pool.close()
        copier.close()


def legitimate_put(address: tuple[str, int], record: CommitRecord, payload: bytes) -> dict:
    """Offer rank 1's step 9 as a replica, the way a peer's replicator does; return the answer."""
    conn = Connection.connect(address, SECRET)
    try:
        conn.send_header({"op": "put", "object": PUT_NAME, "size": len(payload), "commit": record.__dict__})
        conn.sock.sendall(payload)
        return conn.recv_header()
    finally:
        conn.close()


# hostile clients


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed ``sock`` (reads whatever it sent, without waiting)."""
    try:
        timeout = sock.gettimeout()
        sock.settimeout(0.0)
    except OSError:
        return True
    try:
        while True:
            if not sock.recv(4096):
                return True
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(timeout)


def wait_closed(sock: socket.socket, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if closed_by_server(sock):
            return True
        time.sleep(0.05)
    return False


def port_of(sock: socket.socket) -> int:
    return sock.getsockname()[1]


class Holders:
    """Unauthenticated clients that keep connections open: idle ones, and slow-loris ones that send one
    handshake byte every ``every`` seconds. Each reconnects as soon as the server drops it, as an
    attacker would, so they stay connected for as long as they run."""

    def __init__(
        self, address: tuple[str, int], idle: int, loris: int, every: float = 1.0, *, reconnect: bool = True
    ) -> None:
        self.address, self.every, self.reconnect = address, every, reconnect
        self.kinds = ["idle"] * idle + ["loris"] * loris
        self.sockets = [self._open() for _ in self.kinds]
        self.dropped: list[int] = []  # local ports of connections the server closed
        self.dropped_loris: list[int] = []  # bytes each slow-loris one had sent when it was dropped
        self.sent = [0] * len(self.kinds)
        self._lock = threading.Lock()  # one thread at a time touches the sockets
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-hostile-holders", daemon=True)
        self._thread.start()

    def _open(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=WAIT)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            with self._lock:
                self._tick()

    def _tick(self) -> None:
        for i, sock in enumerate(self.sockets):
            if not closed_by_server(sock) and self.kinds[i] == "loris":
                with contextlib.suppress(OSError):
                    sock.sendall(b"\x00")
                    self.sent[i] += 1
            if sock.fileno() >= 0 and closed_by_server(sock):
                self.dropped.append(port_of(sock))
                if self.kinds[i] == "loris":
                    self.dropped_loris.append(self.sent[i])
                sock.close()
                if self.reconnect:
                    self.sockets[i], self.sent[i] = self._open(), 0

    def connected(self) -> int:
        with self._lock:
            return sum(sock.fileno() >= 0 and not closed_by_server(sock) for sock in self.sockets)

    def wait_dropped(self, count: int) -> bool:
        deadline = time.monotonic() + WAIT
        while len(self.dropped) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return len(self.dropped) >= count

    def close(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        for sock in self.sockets:
            sock.close()


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def header(value: object) -> bytes:
    return frame(json.dumps(value).encode())


def put_request(record: CommitRecord, size: int | None = None, **commit: Any) -> dict:
    size = record.objects[0]["size"] if size is None else size
    return {"op": "put", "object": PUT_NAME, "size": size, "commit": {**record.__dict__, **commit}}


def bad_object(record: CommitRecord, **entry: Any) -> list[dict]:
    return [{**record.objects[0], **entry}]


def malformed(record: CommitRecord) -> dict[str, tuple[bytes, str]]:
    """Requests a peer holding the secret may send by mistake or malice: the bytes on the wire, and a
    word the server's error reply must contain (it says what was wrong)."""
    size = record.objects[0]["size"]
    nested = b"[" * 100_000 + b"]" * 100_000
    return {
        "deeply nested JSON": (frame(nested), "nested"),
        "deeply nested JSON inside an object": (frame(b'{"op":' + nested + b"}"), "nested"),
        "bytes that are not JSON": (frame(b"\xff\xfe{not json"), "JSON"),
        "a JSON list, not an object": (header([1, 2, 3]), "object"),
        "an operation that is not a string": (header({"op": ["get"]}), "operation"),
        "a get without an object name": (header({"op": "get"}), "object name"),
        "objects='x'": (header(put_request(record, objects="x")), "objects"),
        "objects=[]": (header(put_request(record, objects=[])), "objects"),
        "objects=[1]": (header(put_request(record, objects=[1])), "objects"),
        "an object entry without header_hash": (
            header(put_request(record, objects=[{"name": "rank-00001.obj", "size": size}])),
            "header_hash",
        ),
        "an object entry with a string size": (
            header(put_request(record, objects=bad_object(record, size="12"))),
            "size",
        ),
        "a commit record that is a string": (
            header({"op": "put", "object": PUT_NAME, "size": size, "commit": "x"}),
            "commit record",
        ),
        "a commit record with an unknown field": (header(put_request(record, bogus=1)), "bogus"),
        "a commit record with step '9'": (header(put_request(record, step="9")), "step"),
        "a commit record with rank >= world_size": (header(put_request(record, world_size=1)), "rank"),
        "a commit record with host=5": (header(put_request(record, host=5)), "host"),
        "size=True": (header(put_request(record, size=True)), "size"),
        "size='12'": (header(put_request(record, size="12")), "size"),
        "a negative size": (
            header(put_request(record, size=-1, objects=bad_object(record, size=-1))),
            "size",
        ),
        "a huge size": (
            header(put_request(record, size=2**62, objects=bad_object(record, size=2**62))),
            "size",
        ),
        "a size other than the commit record's": (header(put_request(record, size=size + 1)), "size"),
    }


def refusal_lines(caplog: pytest.LogCaptureFixture, port: int) -> list[str]:
    """Warnings of the flash logger that name the client at local ``port``."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("stalwart.flash")
        and r.levelno >= logging.WARNING
        and f"127.0.0.1:{port}" in r.getMessage()
    ]


# the acceptance test of finding 14.1


def test_a_legitimate_pull_and_put_succeed_while_16_hostile_clients_are_connected(
    node, tmp_path: Path, caplog: pytest.LogCaptureFixture, thread_tracebacks: list[str]
) -> None:
    layout, record, payload = node
    caplog.set_level(logging.WARNING, logger="stalwart.flash")
    requests = malformed(record)
    chosen = [
        "deeply nested JSON",
        "objects='x'",
        "a commit record with an unknown field",
        "a negative size",
        "a huge size",
    ]
    with serving(layout) as server:
        holders = Holders(server.address, idle=3, loris=4)  # 7 unauthenticated connections, held
        refused: dict[str, int] = {}  # what each other hostile client did -> its local port
        kept: list[socket.socket | Connection] = []
        try:
            garbage = socket.create_connection(server.address, timeout=WAIT)
            garbage.sendall(secrets.token_bytes(48))
            refused["48 bytes of garbage"] = port_of(garbage)
            kept.append(garbage)
            with pytest.raises((AuthError, ConnectionError)):
                Connection.connect(server.address, b"x" * 32)
            oversized = Connection.connect(server.address, SECRET)
            oversized.sock.sendall(struct.pack(">I", 2**31))
            refused["an oversized header"] = port_of(oversized.sock)
            truncated = Connection.connect(server.address, SECRET)
            truncated.sock.sendall(frame(b'{"op": "get", "object": "x"}')[:12])
            truncated.sock.shutdown(socket.SHUT_WR)
            refused["a truncated frame"] = port_of(truncated.sock)
            kept += [oversized, truncated]
            for name in chosen:
                conn = Connection.connect(server.address, SECRET)
                conn.sock.sendall(requests[name][0])
                reply = conn.recv_header()
                assert reply["ok"] is False and reply["error"], name
                refused[name] = port_of(conn.sock)
                kept.append(conn)
            assert len(holders.kinds) + len(refused) + 1 == 16  # +1: the wrong secret
            for item in kept:  # each refused connection is closed, and its slot free, by then
                sock = item.sock if isinstance(item, Connection) else item
                assert wait_closed(sock), "the server kept a connection it refused"

            pulled = legitimate_pull(server.address, tmp_path)
            answer = legitimate_put(server.address, record, payload)
            print(f"\nlegitimate pull with 16 hostile clients connected: {pulled * 1e3:.1f} ms")
            assert answer == {"ok": True}, answer
            assert layout.read_commit(9, 1) == record
            assert pulled < HANDSHAKE_DEADLINE, f"a pull took {pulled:.1f} s"  # it waited out no hostile
        finally:
            holders.close()
            for item in kept:
                item.close()
    assert not thread_tracebacks
    for what, port in refused.items():
        assert refusal_lines(caplog, port), f"no log line for the client that sent {what}"
    assert any("without the job secret" in r.getMessage() for r in caplog.records)
    for port in holders.dropped:  # each unauthenticated connection the server dropped is logged
        assert refusal_lines(caplog, port) or summarised(caplog), f"dropping :{port} was not logged"


def summarised(caplog: pytest.LogCaptureFixture) -> int:
    """Refusals counted in rate-limited summary lines."""
    return sum(
        int(m.group(1)) for r in caplog.records if (m := re.search(r"refused (\d+) more \(", r.getMessage()))
    )


# each kind of hostile client on its own


MALFORMED = list(malformed(CommitRecord(9, 1, 2, [{"name": "x", "size": 1, "header_hash": 0}])))


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_request_from_a_peer_with_the_secret_is_refused_logged_and_survived(
    name: str, node, tmp_path: Path, caplog: pytest.LogCaptureFixture, thread_tracebacks: list[str]
) -> None:
    layout, record, payload = node
    wire, word = malformed(record)[name]
    caplog.set_level(logging.WARNING, logger="stalwart.flash")
    with serving(layout) as server:
        conn = Connection.connect(server.address, SECRET)
        try:
            conn.sock.sendall(wire)
            reply = conn.recv_header()
            port = port_of(conn.sock)
        finally:
            conn.close()
        assert reply["ok"] is False and word in reply["error"], reply
        legitimate_pull(server.address, tmp_path)  # the server keeps serving
        assert legitimate_put(server.address, record, payload) == {"ok": True}
    assert not thread_tracebacks
    assert refusal_lines(caplog, port), f"refusing {name} was not logged"
    assert layout.read_commit(9, 1) == record  # nothing of the malformed put was committed instead


@pytest.mark.parametrize(
    "wire",
    [struct.pack(">I", 2**31), frame(b'{"op": "get"}')[:9], b"\x00\x00"],
    ids=["oversized header", "truncated frame", "truncated length"],
)
def test_oversized_and_truncated_frames_are_logged(
    wire: bytes, node, tmp_path: Path, caplog: pytest.LogCaptureFixture, thread_tracebacks: list[str]
) -> None:
    layout, _, _ = node
    caplog.set_level(logging.WARNING, logger="stalwart.flash")
    with serving(layout) as server:
        conn = Connection.connect(server.address, SECRET)
        try:
            conn.sock.sendall(wire)
            conn.sock.shutdown(socket.SHUT_WR)
            assert wait_closed(conn.sock)
            port = port_of(conn.sock)
        finally:
            conn.close()
        legitimate_pull(server.address, tmp_path)
    assert not thread_tracebacks
    assert refusal_lines(caplog, port), "the refusal was not logged"


def test_a_truncated_replica_is_refused_logged_and_not_committed(
    node, tmp_path: Path, caplog: pytest.LogCaptureFixture, thread_tracebacks: list[str]
) -> None:
    layout, record, payload = node
    caplog.set_level(logging.WARNING, logger="stalwart.flash")
    with serving(layout) as server:
        conn = Connection.connect(server.address, SECRET)
        try:
            conn.send_header(
                {"op": "put", "object": PUT_NAME, "size": len(payload), "commit": record.__dict__}
            )
            conn.sock.sendall(payload[: len(payload) // 2])
            conn.sock.shutdown(socket.SHUT_WR)
            assert wait_closed(conn.sock)
            port = port_of(conn.sock)
        finally:
            conn.close()
        assert layout.read_commit(9, 1) is None
        assert legitimate_put(server.address, record, payload) == {"ok": True}
    assert not thread_tracebacks
    assert refusal_lines(caplog, port)


def test_a_slow_loris_is_dropped_at_the_handshake_deadline_not_when_it_stops(
    node, caplog: pytest.LogCaptureFixture, thread_tracebacks: list[str]
) -> None:
    """One byte every 0.5 s resets any per-receive timeout and would take 24 s to make up an answer;
    only an overall deadline ends it sooner."""
    layout, _, _ = node
    caplog.set_level(logging.WARNING, logger="stalwart.flash")
    with serving(layout) as server:
        holders = Holders(server.address, idle=1, loris=1, every=0.5, reconnect=False)
        try:
            assert holders.wait_dropped(2), "an idle or slow-loris client held its connection for 30 s"
        finally:
            holders.close()
    assert not thread_tracebacks
    assert 2 <= holders.dropped_loris[0] < 48, holders.dropped_loris  # dribbling, not done: cut short
    for port in holders.dropped:
        lines = refusal_lines(caplog, port)
        assert any("no handshake within" in line for line in lines), caplog.text


def test_unauthenticated_clients_never_hold_a_slot_an_authenticated_peer_needs(
    node, tmp_path: Path, caplog: pytest.LogCaptureFixture, thread_tracebacks: list[str]
) -> None:
    """With a long handshake deadline the hostile clients are certainly still pending during the pull:
    it does not wait for any of them."""
    layout, record, payload = node
    with serving(layout, handshake_deadline=120.0) as server:
        holders = Holders(server.address, idle=8, loris=8)
        try:
            legitimate_pull(server.address, tmp_path)
            assert legitimate_put(server.address, record, payload) == {"ok": True}
            assert holders.connected() == 16 and not holders.dropped
        finally:
            holders.close()
    assert not thread_tracebacks


def test_a_full_handshake_pool_drops_its_oldest_handshake_for_a_newcomer(
    node, tmp_path: Path, caplog: pytest.LogCaptureFixture, thread_tracebacks: list[str]
) -> None:
    """Refusing newcomers when the pool is full would let a few slow clients lock every peer out; the
    oldest pending handshake is the one to go (a legitimate handshake takes one round trip)."""
    layout, _, _ = node
    caplog.set_level(logging.WARNING, logger="stalwart.flash")
    with serving(layout, handshake_slots=4, handshake_deadline=120.0) as server:
        holders = Holders(server.address, idle=16, loris=0, every=0.1, reconnect=False)
        try:
            assert holders.wait_dropped(12), "the pool of 4 handshakes held more than 4"
            legitimate_pull(server.address, tmp_path)  # the pool is full: the oldest hostile one goes
            assert holders.wait_dropped(13) and holders.connected() == 3
            legitimate_pull(server.address, tmp_path)  # a slot was free
        finally:
            holders.close()
    assert not thread_tracebacks
    for port in holders.dropped:
        assert any("pending" in line for line in refusal_lines(caplog, port)), (
            f"dropping :{port} was not logged"
        )


def test_a_flood_of_refusals_is_logged_at_a_bounded_rate_and_counted(
    node, caplog: pytest.LogCaptureFixture, thread_tracebacks: list[str]
) -> None:
    layout, _, _ = node
    caplog.set_level(logging.WARNING, logger="stalwart.flash")
    flood = 100
    with serving(layout) as server:
        for _ in range(flood):
            with socket.create_connection(server.address, timeout=WAIT) as sock:
                sock.sendall(secrets.token_bytes(48))
                assert wait_closed(sock)
    assert not thread_tracebacks
    one_by_one = [r for r in caplog.records if "without the job secret" in r.getMessage()]
    assert len(one_by_one) < flood, "every refusal of a flood got its own line"
    assert len(one_by_one) + summarised(caplog) == flood, caplog.text


def test_refusal_log_rate(caplog: pytest.LogCaptureFixture) -> None:
    """A burst of lines per kind of refusal, then one line per interval counting the rest."""
    from stalwart.flash.acceptor import RefusalLog

    now = [0.0]
    refusals = RefusalLog(logging.getLogger("stalwart.flash"), burst=3, interval=10.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="stalwart.flash")
    for i in range(10):
        refusals.refuse("auth", "refused peer %d", i)
    refusals.refuse("deadline", "dropped peer %d", 99)
    assert [r.getMessage() for r in caplog.records] == [
        "refused peer 0",
        "refused peer 1",
        "refused peer 2",
        "dropped peer 99",
    ]
    now[0] = 10.5
    refusals.refuse("auth", "refused peer %d", 10)
    assert [r.getMessage() for r in caplog.records[4:]] == [
        "flash replication: refused 7 more (auth) without a line each (at most 3 lines per 10 s)",
        "refused peer 10",
    ]
    refusals.refuse("auth", "refused peer %d", 11)
    refusals.refuse("auth", "refused peer %d", 12)
    refusals.refuse("auth", "refused peer %d", 13)
    refusals.flush()
    assert [r.getMessage() for r in caplog.records[6:]] == [
        "refused peer 11",
        "refused peer 12",
        "flash replication: refused 1 more (auth) without a line each (at most 3 lines per 10 s)",
    ]


def test_authenticated_sessions_beyond_the_limit_are_refused_and_logged(
    node, tmp_path: Path, caplog: pytest.LogCaptureFixture, thread_tracebacks: list[str]
) -> None:
    """Session slots are for peers with the secret; when they are all taken a newcomer is told so in
    the log, and gets in once one is free."""
    layout, _, _ = node
    caplog.set_level(logging.WARNING, logger="stalwart.flash")
    with serving(layout, max_connections=1) as server:
        first = Connection.connect(server.address, SECRET)
        try:
            first.send_header({"op": "get", "object": "steps/step-000000000007/rank-00000.obj"})
            assert first.recv_header()["ok"] is True  # its session is running
            first.recv_into(memoryview(bytearray(layout.read_commit(7, 0).objects[0]["size"])))
            second = Connection.connect(server.address, SECRET)
            try:
                assert wait_closed(second.sock)
                port = port_of(second.sock)
            finally:
                second.close()
        finally:
            first.close()
        deadline = time.monotonic() + WAIT
        while True:  # the first session ends when the server sees it closed
            try:
                legitimate_pull(server.address, tmp_path)
                break
            except ConnectionError:
                assert time.monotonic() < deadline, "the session slot was never given back"
                time.sleep(0.05)
    assert not thread_tracebacks
    assert any("authenticated sessions are open" in line for line in refusal_lines(caplog, port))


def test_a_real_commit_record_passes_the_wire_check_unchanged(node) -> None:
    """The check knows every field of CommitRecord (a field added there must be added to it)."""
    _, record, _ = node
    assert record_from_wire(json.loads(record.to_json())) == record
    assert set(transport._RECORD_FIELDS) == {f.name for f in dataclasses.fields(CommitRecord)}
