"""Replication over loopback, side by side in one run: throughput against a plain sendfile, training
step time with and without replication, and recovering an empty node from its peer.

    python benchmarks/replication.py --size 1GiB [--repeats 3]

Two processes stand for two nodes on this machine: a peer (its replication server) and this one (the
rank whose objects are replicated, or the replaced node that pulls them back).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import statistics
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
from stalwart.flash.recovery import fetch_head, receive
from stalwart.flash.replication import Peer, ReplicaKeeper, ReplicationServer, Replicator
from stalwart.quantities import parse_bytes

SECRET = b"k" * 32


def make_state(total: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    count = max(1, total // (64 * 2**20))
    return {f"t{i}": torch.randn(total // count // 4, generator=generator) for i in range(count)}


def plain_receiver(port_queue: mp.Queue, size: int, repeats: int, root: str) -> None:
    """The limit's other end: receive ``size`` bytes into a mapped, pre-faulted buffer, ``repeats`` times."""
    buffer = Buffer.allocate(Path(root) / "plain-receive.buf", size)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port_queue.put(server.getsockname()[1])
        for _ in range(repeats):
            conn, _ = server.accept()
            with conn:
                view, done = buffer.view, 0
                while done < size:
                    done += conn.recv_into(view[done:], min(size - done, 8 * 2**20))
                conn.sendall(b"k")
    buffer.close()


def peer_server(address_queue: mp.Queue, root: str, stop: mp.Event) -> None:
    """The peer node: a replication server keeping rank 0's replicas."""
    layout = FlashLayout(root, "bench")
    server = ReplicationServer(layout, SECRET, Copier(), "127.0.0.1")
    server.keepers[0] = ReplicaKeeper(layout, 0, keep=2, board=LocalBoard(layout, 1))
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
    engine.save(next(steps), state)
    object_size = layout.read_commit(1, 0).objects[0]["size"]

    # 1. the limit: a plain sendfile of the same bytes between two processes
    ports: mp.Queue = context.Queue()
    receiver = context.Process(target=plain_receiver, args=(ports, object_size, args.repeats + 1, str(root)))
    receiver.start()
    port = ports.get(timeout=60)
    plain = []
    for i in range(args.repeats + 1):
        fd = os.open(layout.object_path(1, 0), os.O_RDONLY)
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            offset = 0
            while offset < object_size:
                offset += os.sendfile(sock.fileno(), fd, offset, object_size - offset)
            sock.recv(1)
        os.close(fd)
        if i:
            plain.append(time.perf_counter() - started)
    receiver.join()

    # 2. replication to a peer process (PUT: sendfile, received into its pool buffer, verified, committed)
    addresses: mp.Queue = context.Queue()
    stop = context.Event()
    # a daemon: if the benchmark fails, the exit does not wait for a peer still serving
    peer = context.Process(target=peer_server, args=(addresses, str(root / "peer"), stop), daemon=True)
    peer.start()
    target = Peer(1, "peer", tuple(addresses.get(timeout=60)))
    replicator = Replicator(
        layout, 0, [target], SECRET, LocalBoard(layout, 1), engine.shelf.pin, engine.shelf.unpin
    )
    replicated = []
    for i in range(args.repeats + 2):
        step = next(steps)
        engine.save(step, state)
        started = time.perf_counter()
        replicator.submit(layout.read_commit(step, 0))
        replicator.wait()
        if i >= 2:  # steady state: the peer's pool buffers exist
            replicated.append(time.perf_counter() - started)
    assert not replicator.failures, replicator.failures

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
    from_peer, from_durable = [], []
    for i in range(args.repeats):
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
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
