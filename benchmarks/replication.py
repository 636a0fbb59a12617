"""Replication over loopback, side by side in one run: throughput against a plain sendfile, training
step time with and without replication, and recovering an empty node from its peer.

    python benchmarks/replication.py --size 1GiB [--repeats 3]

Two processes stand for two nodes on this machine: a peer (its replication server) and this one (the
rank whose objects are replicated, or the replaced node that pulls them back).

Recovery is also shown against its transport alone: a plain ``sendfile`` of the same object over as many
connections as recovery opens, into pre-faulted memory, with no checks, measured in turn with each
recovery, with the CPU time both processes spend on it: over loopback, TCP's work on both ends shares the
same cores, so that CPU time over the cores bounds from below any recovery over this transport.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import socket
import statistics
import struct
import sys
import threading
import time
from pathlib import Path

import torch

from stalwart.flash.board import LocalBoard
from stalwart.flash.buffers import Buffer
from stalwart.flash.copier import Copier
from stalwart.flash.durable import DurableTier
from stalwart.flash.engine import FlashEngine
from stalwart.flash.layout import FlashLayout
from stalwart.flash.recovery import STREAMS, fetch_head, receive
from stalwart.flash.replica_server import ReplicaKeeper, ReplicationServer
from stalwart.flash.replication import Peer, Replicator
from stalwart.quantities import parse_bytes

SECRET = b"k" * 32
KEEP = 2  # replicas the peer keeps of rank 0
SHARE = struct.Struct("<QQ")  # a plain connection's first bytes: the offset and length it carries


def make_state(total: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    count = max(1, total // (64 * 2**20))
    return {f"t{i}": torch.randn(total // count // 4, generator=generator) for i in range(count)}


def cpu_seconds() -> float:
    """User and system CPU time of this process so far, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def parts(size: int, streams: int) -> list[tuple[int, int]]:
    """(offset, length) of each connection's share of ``size`` bytes."""
    share = -(-size // streams)
    return [(at, min(share, size - at)) for at in range(0, size, share)]


def plain_receiver(port_queue: mp.Queue, size: int, repeats: int, root: str, streams: int = 1) -> None:
    """The limit's other end: receive ``size`` bytes into a mapped, pre-faulted buffer, ``repeats`` times,
    over ``streams`` connections at once; then put the CPU seconds this process spent on the queue."""
    buffer = Buffer.allocate(Path(root) / f"plain-receive-{streams}.buf", size)

    def take(conn: socket.socket) -> None:
        with conn:
            preamble = b""
            while len(preamble) < SHARE.size:
                preamble += conn.recv(SHARE.size - len(preamble))
            offset, length = SHARE.unpack(preamble)
            view, done = buffer.view[offset : offset + length], 0
            while done < length:
                done += conn.recv_into(view[done:], min(length - done, 8 * 2**20))
            conn.sendall(b"k")

    with socket.create_server(("127.0.0.1", 0), backlog=streams) as server:
        port_queue.put(server.getsockname()[1])
        spent = cpu_seconds()
        for _ in range(repeats):
            threads = [threading.Thread(target=take, args=(server.accept()[0],)) for _ in range(streams)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        port_queue.put(cpu_seconds() - spent)
    buffer.close()


def plain_send(port: int, path: Path, size: int, streams: int = 1) -> float:
    """Seconds to ``sendfile`` the first ``size`` bytes of ``path`` to ``plain_receiver`` over ``streams``
    connections at once, each its share."""

    def send(offset: int, length: int) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(SHARE.pack(offset, length))
                done = 0
                while done < length:
                    done += os.sendfile(sock.fileno(), fd, offset + done, length - done)
                sock.recv(1)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=send, args=share) for share in parts(size, streams)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def peer_server(address_queue: mp.Queue, root: str, stop: mp.Event) -> None:
    """The peer node: a replication server keeping rank 0's replicas."""
    layout = FlashLayout(root, "bench")
    server = ReplicationServer(layout, SECRET, Copier(), "127.0.0.1")
    server.keepers[0] = ReplicaKeeper(layout, 0, keep=KEEP, board=LocalBoard(layout, 1))
    address_queue.put(server.address)
    stop.wait()
    server.close()


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GiB", help="bytes per rank, e.g. 1GiB or 256Mi")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", default="/dev/shm/stalwart-bench-replication")
    args = parser.parse_args()
    size = parse_bytes(args.size.replace("GiB", "Gi").replace("MiB", "Mi"), "size")
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    (root / "peer").mkdir(parents=True)
    (root / "local").mkdir()
    context = mp.get_context("spawn")
    state = make_state(size)
    print(f"{size / 2**30:.2f} GiB per rank, {os.cpu_count()} cores, torch {torch.__version__}", flush=True)

    # this rank's committed objects, to be replicated
    layout = FlashLayout(root / "local", "bench")
    engine = FlashEngine(layout, keep=2)
    steps = iter(range(1, 10**6))
    newest = next(steps)
    engine.save(newest, state)
    object_size = layout.read_commit(newest, 0).objects[0]["size"]

    # 1. and 2. the limit, a plain sendfile of the same bytes between two processes, in turn with
    # replication to a peer process (PUT: sendfile, received into its pool buffer, verified, committed)
    ports: mp.Queue = context.Queue()
    warm = KEEP + 1  # puts that still fault in a pool buffer of the peer: it holds KEEP while one lands
    receiver = context.Process(
        target=plain_receiver, args=(ports, object_size, args.repeats + warm, str(root))
    )
    receiver.start()
    port = ports.get(timeout=60)
    addresses: mp.Queue = context.Queue()
    stop = context.Event()
    # a daemon: if the benchmark fails, the exit does not wait for a peer still serving
    peer = context.Process(target=peer_server, args=(addresses, str(root / "peer"), stop), daemon=True)
    peer.start()
    target = Peer(1, "peer", tuple(addresses.get(timeout=60)))
    replicator = Replicator(
        layout, 0, [target], SECRET, LocalBoard(layout, 1), engine.shelf.pin, engine.shelf.unpin
    )
    plain, replicated = [], []
    for i in range(args.repeats + warm):
        sent = plain_send(port, layout.object_path(newest, 0), object_size)
        newest = next(steps)
        engine.save(newest, state)
        started = time.perf_counter()
        replicator.submit(layout.read_commit(newest, 0))
        replicator.wait()
        if i >= warm:  # steady state: the receivers' buffers exist
            plain.append(sent)
            replicated.append(time.perf_counter() - started)
    assert not replicator.failures, replicator.failures
    ports.get(timeout=60)  # the plain receiver's CPU seconds
    receiver.join()

    # 3. training step time, alone and while replicating (same process, same run)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(256, 1024)

    def train_steps(n: int) -> list[float]:
        times = []
        for _ in range(n):
            started = time.perf_counter()
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - started)
        return times

    train_steps(5)
    alone_before = train_steps(20)
    busy = threading.Event()

    def keep_replicating() -> None:
        while not busy.is_set():
            step = next(steps)
            engine.save(step, state)
            replicator.submit(layout.read_commit(step, 0))
            replicator.wait()

    thread = threading.Thread(target=keep_replicating)
    thread.start()
    time.sleep(0.5)
    during = median(train_steps(40))
    busy.set()
    thread.join()
    replicator.close()
    alone = median(alone_before + train_steps(20))  # before and after, around the replicating stretch

    # 4. recovering the newest step: local flash, from the peer into an empty node, from durable on disk
    newest = max(engine.shelf.own)
    engine.save(newest + 1, state)
    newest += 1
    durable = DurableTier((root / "durable").as_uri())
    durable.upload(layout.read_commit(newest, 0), engine.shelf.pin(newest).view)
    engine.shelf.unpin(newest)
    targets = {k: torch.empty_like(v) for k, v in state.items()}
    local = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        assert engine.load(targets) == newest
        local.append(time.perf_counter() - started)
    replica = Replicator(
        layout, 0, [target], SECRET, LocalBoard(layout, 1), engine.shelf.pin, engine.shelf.unpin
    )
    replica.submit(layout.read_commit(newest, 0))
    replica.wait()
    replica.close()
    engine.close()
    newest_path, newest_size = layout.object_path(newest, 0), layout.read_commit(newest, 0).objects[0]["size"]
    receiver = context.Process(
        target=plain_receiver, args=(ports, newest_size, args.repeats, str(root), STREAMS)
    )
    receiver.start()
    port = ports.get(timeout=60)
    floor, floor_cpu, from_peer, from_durable = [], 0.0, [], []
    for i in range(args.repeats):  # the transport alone, then the two recoveries, in turn
        spent = cpu_seconds()
        floor.append(plain_send(port, newest_path, newest_size, STREAMS))
        floor_cpu += cpu_seconds() - spent
        empty = FlashLayout(root / f"empty-{i}", "bench")  # a replaced node: nothing in tmpfs
        started = time.perf_counter()
        with FlashEngine(empty, keep=2) as replaced:  # the steps of Cluster.recover, then of load
            head = fetch_head(target, newest, 0, SECRET)
            landing = replaced._landing(targets, [], head)
            assert receive({1: target}, [1], head, landing, SECRET) == (True, [])
            replaced._land(landing, targets)
            from_peer.append(time.perf_counter() - started)
        empty_durable = FlashLayout(root / f"empty-durable-{i}", "bench")
        started = time.perf_counter()
        with FlashEngine(empty_durable, keep=2, durable=durable) as fresh:
            assert fresh.load(targets) == newest and fresh.restored_from == "durable"
        from_durable.append(time.perf_counter() - started)
    assert all(torch.equal(targets[k], state[k]) for k in state), "recovered state is not bit-exact"
    floor_cpu += ports.get(timeout=60)
    receiver.join()
    stop.set()
    peer.join()
    shutil.rmtree(root, ignore_errors=True)

    limit = median(plain)
    rows = [
        ("plain sendfile between two processes (the limit)", limit),
        ("stalwart replication to a peer (verified, committed)", median(replicated)),
        ("training step, alone", alone),
        ("training step, while replicating", during),
        ("restore from local flash", median(local)),
        ("recover an empty node from its peer", median(from_peer)),
        (f"plain sendfile over {STREAMS} connections (recovery's transport)", median(floor)),
        ("recover an empty node from the durable store (local disk)", median(from_durable)),
    ]
    print()
    print(f"| {'operation':58s} | {'seconds':>8s} | {'GB/s':>6s} |")
    print(f"|{'-' * 60}|{'-' * 10}|{'-' * 8}|")
    for name, seconds in rows:
        rate = f"{object_size / seconds / 1e9:6.2f}" if "training" not in name else "      "
        print(f"| {name:58s} | {seconds:8.4f} | {rate} |")
    checks = [
        ("replication throughput >= 0.9 x plain sendfile", limit / median(replicated), 0.9, True),
        ("training step while replicating <= 1.1 x without", during / alone, 1.1, False),
        (
            "recovery from a peer <= 2 x restore from local flash",
            median(from_peer) / median(local),
            2.0,
            False,
        ),
        (
            "recovery from a peer faster than from durable (local disk)",
            median(from_peer) / median(from_durable),
            1.0,
            False,
        ),
    ]
    print()
    missed = 0
    for label, measured, bound, at_least in checks:
        ok = measured >= bound if at_least else measured < bound if bound == 1.0 else measured <= bound
        missed += not ok
        print(f"{'PASS' if ok else 'MISS'}  {label}: measured {measured:.3g}")
    # what the transport allows: recovery's ratio is the transport's own plus what recovery adds to it
    restore, transport = median(local), median(floor)
    cores = os.cpu_count() or 1
    print()
    print(
        f"the transport alone ({STREAMS} connections, no checks): {transport / restore:.3g} x restore from "
        f"local flash; recovery took {median(from_peer) / transport:.3g} x the transport alone"
    )
    spent = floor_cpu / args.repeats
    print(f"CPU of the transport alone, both ends (mean of {args.repeats}): {spent:.3g} s, {cores} cores")
    # Both ends of a loopback transfer run on this machine's cores, so even with every core busy the whole
    # time, and nothing checked, moving the bytes takes at least their CPU time over the cores.
    print(
        f"so no recovery over this transport takes less than {spent / cores:.3g} s here, with every core "
        f"busy and nothing verified: {spent / cores / restore:.3g} x restore from local flash"
    )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
