"""A legitimate pull from a replication server while clients without the job secret attack it.

    python benchmarks/replication_hostile.py --size 64MiB --hostile 16 [--rounds 5 --repeats 3]

Three processes on this machine: a peer (its replication server, holding one committed object of
``--size``), this one (pulling the object into a warm buffer pool, as a rank recovering from its peer
does), and the attackers: ``--hostile`` clients, a quarter idle, a quarter slow-loris (one handshake
byte every 2 s), a quarter sending 48 bytes of garbage, a quarter answering with a wrong secret. Each
reconnects as soon as it is dropped (garbage and wrong secrets after ``--pause`` seconds), so they stay
connected while the attack is on. Rounds of pulls alone and pulls under attack alternate, so both see
the same load on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing as mp
import os
import secrets
import select
import shutil
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from stalwart.flash.buffers import BufferPool
from stalwart.flash.copier import Copier
from stalwart.flash.engine import FlashEngine
from stalwart.flash.layout import FlashLayout
from stalwart.flash.replica_server import ReplicationServer
from stalwart.flash.replication import Peer, pull
from stalwart.flash.transport import Connection
from stalwart.quantities import parse_bytes

SECRET = b"k" * 32


class Counter(logging.Handler):
    """Counts the lines the server logs (refusals), instead of printing them."""

    def __init__(self) -> None:
        super().__init__()
        self.lines = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += 1


def peer_server(address_queue: mp.Queue, root: str, size: int, stop: mp.Event) -> None:
    """The peer node: one committed object of ``size`` bytes, served by its replication server."""
    counter = Counter()
    logger = logging.getLogger("stalwart.flash")
    logger.addHandler(counter)
    logger.propagate = False
    layout = FlashLayout(root, "bench")
    with FlashEngine(layout, keep=1) as engine:
        engine.save(1, {"w": torch.randn(size // 4, generator=torch.Generator().manual_seed(0))})
    copier = Copier()
    server = ReplicationServer(layout, SECRET, copier, "127.0.0.1")
    address_queue.put(server.address)
    stop.wait()
    server.close()
    copier.close()
    address_queue.put(counter.lines)


def hostile(kind: str, address: tuple[str, int], pause: float, shared: dict) -> None:
    """One attacker of ``kind``: while the attack is on, it keeps a connection, reconnecting when
    dropped; when the attack is off, it holds none."""
    active, done, made, open_ = shared["active"], shared["done"], shared["made"], shared["open"]
    while not done.is_set():
        if not active.wait(0.1):
            continue
        try:
            if kind == "wrong secret":
                with contextlib.suppress(ConnectionError):
                    Connection.connect(address, b"x" * 32).close()
                with made.get_lock():
                    made.value += 1
                time.sleep(pause)
                continue
            with socket.create_connection(address, timeout=30) as sock:
                with made.get_lock(), open_.get_lock():
                    made.value += 1
                    open_.value += 1
                try:
                    if kind == "garbage":
                        sock.sendall(secrets.token_bytes(48))
                    while active.is_set():  # until the server drops it, or the attack ends
                        readable, _, _ = select.select([sock], [], [], 2.0 if kind == "slow-loris" else 0.1)
                        if readable and not sock.recv(4096):
                            break
                        if kind == "slow-loris" and not readable:
                            sock.sendall(b"\x00")
                finally:
                    with open_.get_lock():
                        open_.value -= 1
            if kind == "garbage":
                time.sleep(pause)
        except OSError:
            time.sleep(pause)


def attackers(address: tuple[str, int], count: int, pause: float, shared: dict) -> None:
    kinds = ["idle", "slow-loris", "garbage", "wrong secret"]
    threads = [
        threading.Thread(target=hostile, args=(kinds[i % 4], address, pause, shared), daemon=True)
        for i in range(count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def attack(shared: dict, count: int, on: bool) -> None:
    """Start the attack and wait until every client has connected, or end it and wait until none is."""
    if on:
        holders = sum(i % 4 < 2 for i in range(count))  # the idle and slow-loris ones
        shared["made"].value = 0
        shared["active"].set()
        while shared["made"].value < count or shared["open"].value < holders:
            time.sleep(0.01)
    else:
        shared["active"].clear()
        while shared["open"].value:
            time.sleep(0.01)


def timed_pulls(address: tuple[str, int], repeats: int, pool: BufferPool, copier: Copier) -> tuple[list, int]:
    times, failures = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        try:
            _, verified = pull(Peer(0, "peer", address), 1, 0, SECRET, pool, copier)
        except (OSError, ValueError) as exc:
            failures += 1
            print(f"  pull failed after {time.perf_counter() - started:.3f} s: {exc}", flush=True)
            continue
        times.append(time.perf_counter() - started)
        pool.release(verified.buffer)
        del verified
    return times, failures


def describe(times: list[float]) -> str:
    if not times:
        return "no pull succeeded"
    return f"median {statistics.median(times) * 1e3:7.1f} ms, max {max(times) * 1e3:7.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="64MiB", help="bytes of the object, e.g. 64MiB")
    parser.add_argument("--hostile", type=int, default=16, help="attacking clients")
    parser.add_argument("--repeats", type=int, default=3, help="pulls per round and condition")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of pulls alone, then attacked")
    parser.add_argument("--pause", type=float, default=0.1, help="seconds between garbage/wrong-secret tries")
    parser.add_argument("--root", default="/dev/shm/stalwart-bench-hostile")
    args = parser.parse_args()
    size = parse_bytes(args.size.replace("GiB", "Gi").replace("MiB", "Mi"), "size")
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    context = mp.get_context("spawn")
    print(
        f"{size / 2**20:.0f} MiB object, {args.hostile} hostile clients, {os.cpu_count()} cores", flush=True
    )

    queue: mp.Queue = context.Queue()
    stop_peer = context.Event()
    peer = context.Process(target=peer_server, args=(queue, str(root / "peer"), size, stop_peer))
    peer.start()
    address = tuple(queue.get(timeout=120))
    pool, copier = BufferPool(root / "pool"), Copier()
    timed_pulls(address, 2, pool, copier)  # warm-up: the pool's buffer exists from now on

    shared = {
        "active": context.Event(),
        "done": context.Event(),
        "made": context.Value("i", 0),
        "open": context.Value("i", 0),
    }
    attacker = context.Process(target=attackers, args=(address, args.hostile, args.pause, shared))
    attacker.start()
    alone, attacked, alone_failed, attacked_failed = [], [], 0, 0
    for _ in range(args.rounds):  # interleaved, so both see the same machine load
        times, failed = timed_pulls(address, args.repeats, pool, copier)
        alone += times
        alone_failed += failed
        attack(shared, args.hostile, on=True)
        times, failed = timed_pulls(address, args.repeats, pool, copier)
        attacked += times
        attacked_failed += failed
        attack(shared, args.hostile, on=False)
    shared["done"].set()
    attacker.join()
    stop_peer.set()
    logged = queue.get(timeout=60)
    peer.join()
    pool.close()
    copier.close()
    shutil.rmtree(root, ignore_errors=True)

    print()
    print(f"| {'legitimate pull of ' + args.size:45s} | {'time':31s} | failed |")
    print(f"|{'-' * 47}|{'-' * 33}|--------|")
    print(f"| {'no other client':45s} | {describe(alone):31s} | {alone_failed:6d} |")
    label = f"{args.hostile} hostile clients connected"
    print(f"| {label:45s} | {describe(attacked):31s} | {attacked_failed:6d} |")
    print()
    print(f"lines the server logged about them: {logged}")
    ok = (
        not attacked_failed
        and attacked
        and statistics.median(attacked) <= 2 * statistics.median(alone) + 0.05
    )
    print(
        f"{'PASS' if ok else 'MISS'}  every pull succeeds with hostile clients, median <= 2 x alone + 50 ms"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
