"""Recovering an object from peers straight into the caller's tensors (``stalwart.flash.recovery``).

Two nodes' replication servers run in this process, each over a flash root holding the same committed
object (as a node and its replica do); a replaced node's restore asks both at once.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from stalwart.flash.copier import Copier
from stalwart.flash.engine import FlashEngine
from stalwart.flash.layout import FlashLayout
from stalwart.flash.objects import CorruptObjectError, Header, load_meta
from stalwart.flash.recovery import Head, Landing, fetch_head, plan_landing, receive
from stalwart.flash.replica_server import ReplicationServer
from stalwart.flash.replication import Peer, ask
from stalwart.flash.transport import Connection
from stalwart.flash.tree import TensorRef

SECRET = b"s" * 32
CHUNK = 64 * 2**10  # small chunks: many of them, and tensors that straddle their boundaries


def saved_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    tied = torch.randn(7, generator=generator)
    return {
        "big": torch.randn(300_000, generator=generator),  # 1.2 MB: many chunks
        "half": torch.randn(33_333, generator=generator).to(torch.bfloat16),
        "flags": torch.rand(1001, generator=generator) > 0.5,  # odd size: padding follows
        "ints": torch.arange(70_000, dtype=torch.int64),
        "grid": torch.randn(300, 200, generator=generator),
        "tied_a": tied,
        "tied_b": tied,  # stored once
        "empty": torch.empty(0),
    }


@pytest.fixture
def holders(tmp_path: Path):
    """Step 7 of rank 0 on nodes a and b (b's a byte-identical replica), each served by its own server."""
    layout_a = FlashLayout(tmp_path / "node-a", "job")
    with FlashEngine(layout_a, world_size=1, chunk_size=CHUNK) as engine:
        engine.save(7, saved_state())
    shutil.copytree(tmp_path / "node-a", tmp_path / "node-b")
    layout_b = FlashLayout(tmp_path / "node-b", "job")
    copier = Copier(1)
    servers = [ReplicationServer(layout, SECRET, copier, "127.0.0.1") for layout in (layout_a, layout_b)]
    peers = {rank: Peer(rank, "ab"[rank], srv.address) for rank, srv in enumerate(servers)}
    yield peers, servers, (layout_a, layout_b)
    for srv in servers:
        srv.close()
    copier.close()


def landing_for(head: Head, state: dict[str, torch.Tensor]) -> Landing:
    skeleton, entries = load_meta(head.meta)
    tensors = [key for key in skeleton if isinstance(skeleton[key], TensorRef)]
    return plan_landing(head.header, [(entries[skeleton[key]], state[key]) for key in tensors])


def empty_state() -> dict[str, torch.Tensor]:
    state = {key: torch.zeros_like(value) for key, value in saved_state().items()}
    state["grid"] = torch.zeros(200, 300).t()  # not contiguous: lands in scratch, copied in at the end
    return state


def count_requests(monkeypatch: pytest.MonkeyPatch, srv: ReplicationServer) -> tuple[list, list[dict]]:
    """The sessions ``srv`` opens (one per connection) and the get requests it serves."""
    sessions: list = []
    asked: list[dict] = []
    session, serve = srv._serve, srv._get

    def opened(conn: Connection) -> None:
        sessions.append(conn.peer)
        session(conn)

    def counted(conn: Connection, request: dict) -> bool:
        asked.append(request)
        return serve(conn, request)

    monkeypatch.setattr(srv, "_serve", opened)
    monkeypatch.setattr(srv, "_get", counted)
    return sessions, asked


def flip_data_byte(layout: FlashLayout, at: int) -> None:
    path = layout.object_path(7, 0)
    header = Header.unpack(path.read_bytes()[:4096], where="test")
    with open(path, "r+b") as file:
        file.seek(header.data_offset + at)
        byte = file.read(1)
        file.seek(header.data_offset + at)
        file.write(bytes([byte[0] ^ 0x01]))


def test_an_object_lands_in_the_callers_tensors_from_every_holder_at_once(holders, monkeypatch) -> None:
    peers, servers, _ = holders
    counted = [count_requests(monkeypatch, srv) for srv in servers]
    head = fetch_head(peers[0], 7, 0, SECRET)
    assert head.header.chunks > 8
    state = empty_state()
    addresses = {key: value.data_ptr() for key, value in state.items()}
    landing = landing_for(head, state)
    assert receive(peers, [0, 1], head, landing, SECRET) == (True, [])
    expected = saved_state()
    # contiguous tensors hold their bytes already, in their own memory; the transposed one, and the
    # second of two tensors saved as one, wait for the verified copy
    waiting = {"grid", "tied_b"}
    assert all(torch.equal(state[k], expected[k]) for k in expected if k not in waiting)
    assert not any(state[k].any() for k in waiting)
    landing.finish()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert {key: value.data_ptr() for key, value in state.items()} == addresses
    # streams go to both holders at once (which serves how many pieces depends on their speed)
    assert all(sessions for sessions, _ in counted), "a stream to each holder"
    ranges = sorted((r["offset"], r["length"]) for _, asked in counted for r in asked)
    assert ranges[0][0] == head.header.data_offset
    assert all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(ranges))  # every byte once, none twice
    assert ranges[-1][0] + ranges[-1][1] == head.header.data_offset + head.header.data_size


def test_a_corrupt_copy_is_detected_and_its_pieces_come_from_another_holder(holders) -> None:
    peers, _, (_, layout_b) = holders
    flip_data_byte(layout_b, 5 * CHUNK + 17)  # node b's copy rots after it was committed
    head = fetch_head(peers[0], 7, 0, SECRET)
    state = empty_state()
    landing = landing_for(head, state)
    assert receive(peers, [1, 0], head, landing, SECRET, sleep=lambda _: None) == (True, [])
    landing.finish()
    assert all(torch.equal(state[k], v) for k, v in saved_state().items())

    alone = landing_for(head, empty_state())
    ok, problems = receive(peers, [1], head, alone, SECRET, sleep=lambda _: None)
    assert not ok and len(problems) == 1
    kind, message = problems[0]
    assert kind == "corrupt" and "data checksum mismatch" in message
    assert f"bytes {4096 + 5 * CHUNK}-" in message  # the chunk is named


def test_a_holder_that_is_gone_leaves_the_work_to_the_others(holders) -> None:
    peers, servers, _ = holders
    servers[1].close()
    head = fetch_head(peers[0], 7, 0, SECRET)
    state = empty_state()
    landing = landing_for(head, state)
    assert receive(peers, [0, 1], head, landing, SECRET, sleep=lambda _: None) == (True, [])
    landing.finish()
    assert all(torch.equal(state[k], v) for k, v in saved_state().items())

    started = time.monotonic()
    ok, problems = receive(peers, [1], head, landing_for(head, empty_state()), SECRET, sleep=lambda _: None)
    assert not ok and problems[0][0] == "error" and "rank 1" in problems[0][1]
    assert time.monotonic() - started < 30


def test_a_head_whose_metadata_rotted_is_refused(holders) -> None:
    peers, _, (layout_a, _) = holders
    path = layout_a.object_path(7, 0)
    header = Header.unpack(path.read_bytes()[:4096], where="test")
    with open(path, "r+b") as file:
        file.seek(header.meta_offset + 3)
        byte = file.read(1)
        file.seek(header.meta_offset + 3)
        file.write(bytes([byte[0] ^ 0x80]))
    with pytest.raises(CorruptObjectError, match="metadata checksum mismatch"):
        fetch_head(peers[0], 7, 0, SECRET)
    assert fetch_head(peers[1], 7, 0, SECRET).meta  # the other node's copy is intact


@pytest.mark.parametrize(
    ("offset", "length"),
    [(-1, 10), (0, 0), (0, 10**12), ("0", 10), (True, 10), (0, None)],
)
def test_a_range_outside_the_object_is_refused_and_the_connection_stays_usable(
    holders, offset: object, length: object
) -> None:
    peers, _, _ = holders
    conn = Connection.connect(peers[0].address, SECRET)
    try:
        with pytest.raises(ConnectionError, match="not a range of the"):
            ask(conn, "get", peers[0], 7, 0, offset=offset, length=length)  # type: ignore[arg-type]
        reply, record = ask(conn, "head", peers[0], 7, 0)
        assert record.step == 7 and reply["ok"] is True
    finally:
        conn.close()


@pytest.fixture
def connected():
    """Two ends of an authenticated-looking connection (no handshake: only the byte transport)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    ends = Connection(client, "client"), Connection(accepted, "server")
    yield ends
    for end in ends:
        end.close()


def test_frames_are_not_held_back_waiting_for_acknowledgements(connected) -> None:
    """A reply header and its bytes are two small writes: with Nagle's algorithm the second waited for
    the delayed ACK of the first, 40 ms per request (a head fetch took 43 ms, now 1 ms)."""
    for end in connected:
        assert end.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_bulk_transfers_to_a_stalled_peer_time_out(connected, tmp_path: Path) -> None:
    """Bulk bytes move on a blocking socket bounded by the kernel's timeouts: a peer that stops reading
    (or sending) still fails the transfer after the timeout, never hangs it."""
    sender, receiver = connected
    payload = tmp_path / "payload"
    payload.write_bytes(b"x" * 64 * 2**20)  # more than the socket buffers hold
    sender.sock.settimeout(0.5)
    started = time.monotonic()
    with open(payload, "rb") as file, pytest.raises(TimeoutError, match=r"took no bytes for 0\.5 s"):
        sender.send_file(file, 64 * 2**20)
    assert time.monotonic() - started < 10
    assert sender.sock.gettimeout() == 0.5  # the Python timeout is back for the frames that follow

    receiver.sock.settimeout(0.5)
    receiver.recv_into(memoryview(bytearray(1024)))  # what was sent arrives
    with pytest.raises(TimeoutError, match=r"sent nothing for 0\.5 s"):
        receiver.recv_into(memoryview(bytearray(256 * 2**20)))


@pytest.fixture
def one_node(tmp_path: Path):
    """A node whose server serves what the test saves there."""
    layout = FlashLayout(tmp_path / "node-a", "job")
    copier = Copier(1)
    srv = ReplicationServer(layout, SECRET, copier, "127.0.0.1")
    yield layout, Peer(0, "a", srv.address)
    srv.close()
    copier.close()


def test_an_object_without_tensor_bytes_is_recovered_from_its_head_alone(one_node) -> None:
    layout, peer = one_node
    with FlashEngine(layout, world_size=1) as engine:
        engine.save(2, {"epoch": 3, "empty": torch.empty(0)})
    head = fetch_head(peer, 2, 0, SECRET)
    assert head.header.chunks == 0
    landing = landing_for(head, {"empty": torch.empty(0)})
    assert receive({0: peer}, [0], head, landing, SECRET) == (True, [])


def test_tensors_sharing_memory_take_the_bytes_once(one_node) -> None:
    """Tied weights come from ``state_dict()`` as two tensors over one storage, saved as two: only one
    takes bytes from the streams (two streams writing one place could make a good copy look corrupt);
    the other is copied in once everything is verified."""
    layout, peer = one_node
    weights = torch.randn(300_000)
    with FlashEngine(layout, world_size=1, chunk_size=CHUNK) as engine:
        engine.save(2, {"embed": weights, "head": weights.clone()})
    head = fetch_head(peer, 2, 0, SECRET)
    shared = torch.zeros(300_000)
    landing = landing_for(head, {"embed": shared, "head": shared.view(300_000)})
    assert len(landing.written) == 1 and len(landing.deferred) == 1
    assert receive({0: peer}, [0], head, landing, SECRET, streams=4) == (True, [])
    landing.finish()
    assert torch.equal(shared, weights)


def test_a_load_refuses_tensors_left_with_bytes_of_a_step_not_restored() -> None:
    """A tensor that took bytes of step N from peers, when the ranks then restored an older step that
    does not hold it, cannot be trusted: the load raises instead of returning it."""
    from stalwart.flash.engine import _check_covered
    from stalwart.flash.errors import FlashRestoreError

    kept, stale = torch.zeros(3), torch.zeros(3)
    landing = Landing(chunks=[], deferred=[], written=[kept, stale])
    _check_covered([landing], [kept, stale], 5)  # the step restored filled both
    with pytest.raises(FlashRestoreError, match=r"1 tensor\(s\) .* step 4, which was, does not hold them"):
        _check_covered([landing], [kept], 4)


def test_a_peer_that_trickles_bytes_cannot_stretch_a_receive_past_its_deadline(connected) -> None:
    """Each wait for bytes is bounded by the socket's timeout, and the whole receive by its deadline:
    a byte every 0.05 s keeps the first alive, not the second (a piece then goes to another holder)."""
    sender, receiver = connected
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                sender.sock.send(b"x")
            time.sleep(0.05)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match="before the deadline"):
            receiver.recv_into(memoryview(bytearray(10_000)), deadline=time.monotonic() + 0.5)
    finally:
        stop.set()
        thread.join()
    assert 0.5 <= time.monotonic() - started < 10
