"""Replication pieces in one process: placement, the authenticated transport, what a server refuses."""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
from pathlib import Path

import pytest
import torch

from stalwart.flash.board import LocalBoard
from stalwart.flash.buffers import BufferPool
from stalwart.flash.copier import Copier
from stalwart.flash.engine import FlashEngine
from stalwart.flash.layout import FlashLayout
from stalwart.flash.objects import PACKED_HEADER_SIZE, CorruptObjectError, Header, load_meta, read_head
from stalwart.flash.recovery import pull_head
from stalwart.flash.replica_server import ReplicaKeeper, ReplicationServer
from stalwart.flash.replication import Peer, RingPlacement, held_by, pull
from stalwart.flash.shelf import RankShelf
from stalwart.flash.transport import AuthError, Connection, ServerHandshake
from stalwart.flash.tree import TensorRef


def peers(layout: dict[str, list[int]]) -> list[Peer]:
    return sorted(
        (Peer(rank, node, ("127.0.0.1", 1)) for node, ranks in layout.items() for rank in ranks),
        key=lambda p: p.rank,
    )


def test_ring_placement_same_local_rank_on_the_next_nodes() -> None:
    three = peers({"a": [0, 1], "b": [2, 3], "c": [4, 5]})
    ring = RingPlacement(1)
    assert [ring.targets(r, three) for r in range(6)] == [[2], [3], [4], [5], [0], [1]]
    assert RingPlacement(2).targets(0, three) == [2, 4]
    assert ring.sources(2, three) == [0]
    assert RingPlacement(5).targets(1, three) == [3, 5]  # at most nodes - 1 copies
    assert ring.targets(0, peers({"a": [0, 1]})) == []  # one node: nothing to replicate to
    odd = peers({"a": [0, 1, 2], "b": [3], "c": [4, 5]})
    assert ring.targets(2, odd) == [3] and ring.targets(3, odd) == [4]
    with pytest.raises(ValueError, match="replicas=-1"):
        RingPlacement(-1)


@pytest.fixture
def server(tmp_path: Path):
    """A node holding a committed step 7 of rank 0, and a server that keeps replicas of rank 1."""
    layout = FlashLayout(tmp_path / "node-a", "job")
    with FlashEngine(layout, world_size=1) as engine:
        engine.save(7, {"w": torch.arange(1000.0)})
    copier = Copier(2)
    srv = ReplicationServer(layout, b"s" * 32, copier, "127.0.0.1")
    srv.keepers[1] = ReplicaKeeper(layout, 1, keep=2, board=LocalBoard(layout, 1))
    yield srv, layout
    srv.close()
    copier.close()


def test_an_authenticated_peer_pulls_a_verified_object(server, tmp_path: Path) -> None:
    srv, _ = server
    pool = BufferPool(tmp_path / "pool")
    record, verified = pull(Peer(0, "a", srv.address), 7, 0, b"s" * 32, pool, Copier(1))
    assert record.step == 7 and verified.header.step == 7
    assert torch.equal(
        torch.frombuffer(bytearray(verified.buffer.view[4096 : 4096 + 4000]), dtype=torch.float32),
        torch.arange(1000.0),
    )
    del verified
    pool.close()


def test_a_peer_lists_what_its_node_holds_and_serves_an_object_head_verified(server) -> None:
    """What a DCP load asks of the other nodes inside DCP's steps, where it must not wait for their
    training processes: what each holds, and the metadata of an object without its tensor bytes."""
    srv, layout = server
    peer = Peer(0, "a", srv.address)
    assert held_by(peer, b"s" * 32) == (True, [(7, 0, 1)])
    record = layout.read_commit(7, 0)
    meta = pull_head(peer, 7, 0, b"s" * 32)
    assert meta == read_head(layout.object_path(7, 0), record)
    assert load_meta(meta)[0] == {"w": TensorRef(0)}
    with pytest.raises(ConnectionError, match="cannot serve step 8"):
        pull_head(peer, 8, 0, b"s" * 32)
    header = Header.unpack(layout.object_path(7, 0).read_bytes()[:PACKED_HEADER_SIZE], where="test")
    with open(layout.object_path(7, 0), "r+b") as file:  # a flipped byte of the metadata on that node
        file.seek(header.meta_offset)
        first = file.read(1)
        file.seek(header.meta_offset)
        file.write(bytes([first[0] ^ 0xFF]))
    with pytest.raises(CorruptObjectError, match="metadata checksum mismatch"):
        pull_head(peer, 7, 0, b"s" * 32)


def test_the_same_replica_twice_changes_nothing_and_leaks_nothing(server, tmp_path: Path) -> None:
    """A sender that gave up waiting for the reply sends a replica again: the committed one stays, and the
    second copy's buffer goes back to the pool (no mapping of a replaced file is left behind)."""
    srv, _ = server
    node_b = FlashLayout(tmp_path / "node-b", "job")
    keeper = ReplicaKeeper(node_b, 0, keep=2, board=LocalBoard(node_b, 1))
    copier = Copier(1)
    first = pull(Peer(0, "a", srv.address), 7, 0, b"s" * 32, keeper.pool, copier)
    keeper.accept(first[0], first[1].buffer)
    committed = node_b.object_path(7, 0).stat().st_ino
    again = pull(Peer(0, "a", srv.address), 7, 0, b"s" * 32, keeper.pool, copier)
    keeper.accept(again[0], again[1].buffer)
    assert node_b.object_path(7, 0).stat().st_ino == committed
    assert keeper.held[7] is first[1].buffer and [b.path for b in keeper.pool._free] == [again[1].buffer.path]
    keeper.close()
    copier.close()


def test_a_peer_without_the_job_secret_is_refused(
    server, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    srv, _ = server
    with (
        caplog.at_level(logging.WARNING, logger="stalwart.flash"),
        pytest.raises((AuthError, ConnectionError)),
    ):
        pull(Peer(0, "a", srv.address), 7, 0, b"x" * 32, BufferPool(tmp_path / "pool"), Copier(1))
    assert any("without the job secret" in r.getMessage() for r in caplog.records)


def test_names_that_leave_the_job_root_are_refused(server, caplog: pytest.LogCaptureFixture) -> None:
    srv, _ = server
    conn = Connection.connect(srv.address, b"s" * 32)
    try:
        with caplog.at_level(logging.WARNING, logger="stalwart.flash"):
            for name in ("../../etc/passwd", "/etc/passwd", "steps/step-000000000007/../../../x.obj", 7):
                conn.send_header({"op": "get", "object": name})
                reply = conn.recv_header()
                assert reply == {"ok": False, "error": "refused: not an object name of this job"}
        assert sum("refused a request for" in r.getMessage() for r in caplog.records) == 4
        conn.send_header({"op": "get", "object": "steps/step-000000000007/rank-00000.obj"})
        assert conn.recv_header()["ok"] is True  # a proper name on the same connection is served
    finally:
        conn.close()


def test_a_replica_for_a_rank_this_server_does_not_keep_is_refused(server) -> None:
    srv, layout = server
    record = layout.read_commit(7, 0)
    conn = Connection.connect(srv.address, b"s" * 32)
    try:
        conn.send_header(
            {
                "op": "put",
                "object": "steps/step-000000000007/rank-00000.obj",
                "size": record.objects[0]["size"],
                "commit": record.__dict__,
            }
        )
        assert conn.recv_header() == {"ok": False, "error": "refused: not a replica this rank keeps"}
    finally:
        conn.close()


def put(address: tuple[str, int], name: str, payload: bytes, record: object) -> dict:
    """Offer ``payload`` as a replica, the way a peer's replicator does; return the server's answer."""
    conn = Connection.connect(address, b"s" * 32)
    try:
        conn.send_header({"op": "put", "object": name, "size": len(payload), "commit": record.__dict__})
        conn.sock.sendall(payload)
        return conn.recv_header()
    finally:
        conn.close()


def test_a_corrupt_replica_is_refused_and_not_committed(server, tmp_path: Path) -> None:
    srv, layout = server
    source = FlashLayout(tmp_path / "node-b", "job")
    writer = RankShelf(source, 1, 2, keep=2, copier=Copier(1))  # rank 1 of 2, on another node
    writer.commit_staged(
        9, writer.stage({"w": TensorRef(0)}, [torch.ones(2000)], chunk_size=4096, hash_now=True)
    )
    writer.close()
    record = source.read_commit(9, 1)
    payload = bytearray(source.object_path(9, 1).read_bytes()[: record.objects[0]["size"]])
    name = "steps/step-000000000009/rank-00001.obj"
    payload[5000] ^= 0xFF  # a byte flipped on the wire
    reply = put(srv.address, name, bytes(payload), record)
    assert reply["ok"] is False and "data checksum mismatch" in reply["error"]
    assert layout.read_commit(9, 1) is None and not layout.object_path(9, 1).exists()
    payload[5000] ^= 0xFF  # the same replica, intact, is accepted and committed
    assert put(srv.address, name, bytes(payload), record) == {"ok": True}
    assert layout.read_commit(9, 1) == record and layout.object_path(9, 1).exists()


def test_objects_larger_than_the_socket_buffers_move_whole(tmp_path: Path) -> None:
    """sendfile must wait for room in the socket buffer (a 64 MB object does not fit in it)."""
    layout = FlashLayout(tmp_path / "node-a", "job")
    weights = torch.randn(16 * 2**20)
    with FlashEngine(layout) as engine:
        engine.save(3, {"w": weights})
    copier = Copier(2)
    srv = ReplicationServer(layout, b"s" * 32, copier, "127.0.0.1")
    pool = BufferPool(tmp_path / "pool")
    try:
        _, verified = pull(Peer(0, "a", srv.address), 3, 0, b"s" * 32, pool, copier)
        target: dict = {}
        with FlashEngine(FlashLayout(tmp_path / "node-b", "job")) as other:
            other._apply(verified, target)
        assert torch.equal(target["w"], weights)
        del verified
    finally:
        srv.close()
        pool.close()
        copier.close()


def serve_one_reply(reply: bytes) -> tuple[tuple[str, int], threading.Thread]:
    """A server that holds the job secret, answers one request with ``reply`` (a whole frame), closes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        with listener, listener.accept()[0] as sock:
            sock.settimeout(10)
            handshake = ServerHandshake(b"s" * 32)
            sock.sendall(handshake.hello)
            answer = b""
            while len(answer) < handshake.answer_size:
                answer += sock.recv(handshake.answer_size - len(answer))
            sock.sendall(handshake.proof(answer, "client"))
            Connection(sock, "client").recv_header()
            sock.sendall(reply)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return ("127.0.0.1", listener.getsockname()[1]), thread


def _frame(value: object) -> bytes:
    body = json.dumps(value).encode()
    return struct.pack(">I", len(body)) + body


GOOD = {"step": 7, "rank": 0, "world_size": 1, "objects": [{"name": "x", "size": 5000, "header_hash": 1}]}


@pytest.mark.parametrize(
    "reply",
    [
        {"ok": True, "size": 5000, "commit": {**GOOD, "objects": "x"}},
        {"ok": True, "size": 5000},
        {"ok": True, "size": "5000", "commit": GOOD},
        {"ok": True, "size": 5000, "commit": {**GOOD, "step": 8}},
        {"ok": True, "size": 5000, "commit": {**GOOD, "bogus": 1}},
        {"ok": True, "size": 5000, "commit": {**GOOD, "objects": [{"size": 5000}]}},
    ],
    ids=["objects='x'", "no commit", "size='5000'", "another step", "unknown field", "no header_hash"],
)
def test_pull_refuses_a_malformed_reply_with_a_connection_error(reply: dict, tmp_path: Path) -> None:
    """What a recovery catches (OSError, ValueError), never a TypeError or KeyError from deep inside."""
    address, thread = serve_one_reply(_frame(reply))
    pool = BufferPool(tmp_path / "pool")
    try:
        with pytest.raises(ConnectionError, match=r"rank 0 (sent a bad commit record|answered for step 7)"):
            pull(Peer(0, "a", address), 7, 0, b"s" * 32, pool, Copier(1))
    finally:
        thread.join(10)
        pool.close()
