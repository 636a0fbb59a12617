"""Flash tier against the memcpy limit, torch.save and DCP, side by side in one run.

    python benchmarks/flash.py --size 1GiB [--repeats 5] [--root /dev/shm/stalwart-bench]

Every figure is the median of ``--repeats`` runs after two warm-up runs (steady state: buffers and
page tables exist, as they do for a training job after its first saves). The limit is the fastest
plain copy of the state into memory that is already mapped; ratios are against it.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import mmap
import os
import platform
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from stalwart.flash.engine import FlashEngine
from stalwart.flash.layout import FlashLayout
from stalwart.quantities import parse_bytes


def make_state(total: int) -> dict[str, torch.Tensor]:
    """float32 tensors of mixed sizes: a few large, many medium, many small (like a model + optimizer)."""
    sizes = [64 * 2**20] * 8 + [4 * 2**20] * 64 + [256 * 2**10] * 256 + [16 * 2**10] * 1024
    state, used, i = {}, 0, 0
    generator = torch.Generator().manual_seed(0)
    while used < total:
        n = min(sizes[i % len(sizes)], total - used)
        state[f"t{i:05d}"] = torch.randn(max(n // 4, 1), generator=generator)
        used += state[f"t{i:05d}"].numel() * 4
        i += 1
    return state


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def median_time(
    fn: Callable[[], object], repeats: int, warmup: int = 2, after: Callable[[], object] | None = None
) -> float:
    times = []
    for i in range(warmup + repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if after is not None:
            after()
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


class MappedBuffer:
    """A pre-faulted tmpfs mapping: the destination of the memcpy limit."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.posix_fallocate(fd, 0, size)
        self.mm = mmap.mmap(fd, size)
        os.close(fd)
        self.anchor = ctypes.c_char.from_buffer(self.mm)
        self.address = ctypes.addressof(self.anchor)
        ctypes.memset(self.address, 0, size)

    def close(self) -> None:
        del self.anchor
        self.mm.close()
        self.path.unlink()


def copy_pieces(
    state: dict[str, torch.Tensor], buffer: MappedBuffer, piece: int
) -> list[tuple[int, int, int]]:
    """memmove arguments copying every tensor, in order, into the buffer, cut into ``piece``-byte pieces."""
    pieces, offset = [], 0
    for t in state.values():
        n = t.numel() * t.element_size()
        for start in range(0, n, piece):
            pieces.append((buffer.address + offset + start, t.data_ptr() + start, min(piece, n - start)))
        offset += n
    return pieces


def plain_copies(
    state: dict[str, torch.Tensor], buffer: MappedBuffer, threads: int
) -> dict[str, Callable[[], object]]:
    """Plain copies of the state into mapped memory, by several strategies; the fastest is the limit."""
    whole = copy_pieces(state, buffer, 2**62)
    chunks = copy_pieces(state, buffer, 4 * 2**20)
    pool = ThreadPoolExecutor(threads)

    def run(pieces: list) -> None:
        for dst, src, n in pieces:
            ctypes.memmove(dst, src, n)

    def halves() -> None:  # each thread one contiguous share of the bytes
        total = sum(n for _, _, n in chunks)
        shares: list[list] = [[] for _ in range(threads)]
        done = 0
        for piece in chunks:
            shares[min(threads - 1, done * threads // total)].append(piece)
            done += piece[2]
        list(pool.map(run, shares))

    def counter() -> None:  # threads take 4 MiB pieces in order from a shared counter
        it = iter(chunks)

        def worker() -> None:
            for dst, src, n in it:
                ctypes.memmove(dst, src, n)

        list(pool.map(lambda _: worker(), range(threads)))

    return {
        "memcpy, 1 thread, tensor by tensor": lambda: run(whole),
        f"memcpy, {threads} threads, contiguous shares": halves,
        f"memcpy, {threads} threads, 4 MiB pieces from a counter": counter,
    }


def torch_copy(state: dict[str, torch.Tensor], buffer: MappedBuffer) -> Callable[[], None]:
    views, offset = [], 0
    for t in state.values():
        n = t.numel() * t.element_size()
        views.append(
            (torch.frombuffer(buffer.mm, dtype=torch.uint8, count=n, offset=offset), t.view(torch.uint8))
        )
        offset += n
    return lambda: [dst.copy_(src) for dst, src in views]


class RssSampler:
    """Peak growth of resident memory (anonymous, and all) while something runs, sampled every ms."""

    def __init__(self) -> None:
        self.peak_anon = self.peak_rss = 0
        self._stop = threading.Event()

    @staticmethod
    def read() -> tuple[int, int]:
        values = {}
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("RssAnon:", "VmRSS:")):
                    key, value, _ = line.split()
                    values[key] = int(value) * 1024
        return values["RssAnon:"], values["VmRSS:"]

    def __enter__(self) -> RssSampler:
        self.base_anon, self.base_rss = self.read()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            anon, rss = self.read()
            self.peak_anon = max(self.peak_anon, anon - self.base_anon)
            self.peak_rss = max(self.peak_rss, rss - self.base_rss)
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        anon, rss = self.read()
        self.peak_anon = max(self.peak_anon, anon - self.base_anon)
        self.peak_rss = max(self.peak_rss, rss - self.base_rss)


def du(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GiB", help="state size, a quantity such as 1GiB or 256Mi")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--root", default="/dev/shm/stalwart-bench", help="a tmpfs directory to write into")
    parser.add_argument(
        "--threads", type=int, default=None, help="stalwart copy threads (default: per core, <= 4)"
    )
    args = parser.parse_args()
    size = parse_bytes(args.size.replace("GiB", "Gi").replace("MiB", "Mi"), "size")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    state = make_state(size)
    total = nbytes(state)
    threads = args.threads or max(1, min(4, os.cpu_count() or 1))
    print(
        f"state: {len(state)} float32 tensors, {total / 2**30:.3f} GiB; {os.cpu_count()} cores; "
        f"torch {torch.__version__}; python {platform.python_version()}; root {root}",
        flush=True,
    )

    rows: list[tuple[str, float]] = []
    buffer = MappedBuffer(root / "limit.buf", total)
    copies = [
        (name, median_time(fn, args.repeats)) for name, fn in plain_copies(state, buffer, threads).items()
    ]
    copies.append(("torch copy_, tensor by tensor", median_time(torch_copy(state, buffer), args.repeats)))
    buffer.close()
    fastest = min(copies, key=lambda row: row[1])
    rows.append(("the limit: fastest plain copy into mapped memory (below)", fastest[1]))
    rows.extend(copies)

    target = root / "torch_save.pt"
    rows.append(
        (
            "torch.save to /dev/shm",
            median_time(lambda: torch.save(state, target), args.repeats, after=lambda: target.unlink()),
        )
    )
    for threads_dcp in (1, 2):
        path = root / f"dcp{threads_dcp}"

        def dcp_save(path: Path = path, n: int = threads_dcp) -> None:
            dcp.save(state, storage_writer=dcp.FileSystemWriter(path, thread_count=n, overwrite=True))

        rows.append(
            (
                f"DCP FileSystemWriter thread_count={threads_dcp}",
                median_time(dcp_save, args.repeats, after=lambda path=path: shutil.rmtree(path)),
            )
        )
    pending = []
    async_path = root / "dcp_async"

    def dcp_async() -> None:
        pending.append(
            dcp.async_save(
                state, storage_writer=dcp.FileSystemWriter(async_path, thread_count=2, overwrite=True)
            )
        )

    rows.append(
        (
            "DCP async_save, caller blocked",
            median_time(
                dcp_async, args.repeats, after=lambda: (pending.pop().result(), shutil.rmtree(async_path))
            ),
        )
    )

    layout = FlashLayout(root, "bench")
    engine = FlashEngine(layout, keep=2, threads=args.threads)
    step = iter(range(1, 10**9))
    rows.append(("stalwart sync save", median_time(lambda: engine.save(next(step), state), args.repeats)))
    rows.append(
        (
            "stalwart async save, caller blocked",
            median_time(
                lambda: engine.save(next(step), state, async_save=True), args.repeats, after=engine.wait
            ),
        )
    )
    tmpfs_per_rank = du(layout.job_dir)
    stored = layout.read_commit(max(engine.shelf.own), 0).objects[0]["size"]  # one object: tensors + metadata
    with RssSampler() as sync_rss:
        engine.save(next(step), state)
    with RssSampler() as async_rss:
        engine.save(next(step), state, async_save=True)
    engine.wait()
    targets = {k: torch.empty_like(v) for k, v in state.items()}
    rows.append(
        ("stalwart restore into existing tensors", median_time(lambda: engine.load(targets), args.repeats))
    )
    assert all(torch.equal(targets[k], state[k]) for k in state), "restore is not bit-exact"
    engine.close()
    shutil.rmtree(root, ignore_errors=True)

    limit = rows[0][1]  # the fastest plain copy
    print()
    print(f"| {'operation':58s} | {'seconds':>8s} | {'GB/s':>6s} | {'x limit':>7s} |")
    print(f"|{'-' * 60}|{'-' * 10}|{'-' * 8}|{'-' * 9}|")
    for name, seconds in rows:
        print(f"| {name:58s} | {seconds:8.4f} | {total / seconds / 1e9:6.2f} | {limit / seconds:7.2f} |")
    by = dict(rows)
    sync, blocked = by["stalwart sync save"], by["stalwart async save, caller blocked"]
    restore, dcp2 = by["stalwart restore into existing tensors"], by["DCP FileSystemWriter thread_count=2"]
    keep = 2
    # (target, measured, bound, True when measured must be >= bound, else <=)
    checks = [
        ("sync save >= 0.5 x the limit", limit / sync, 0.5, True),
        ("sync save >= 3 x DCP FileSystemWriter(thread_count=2)", dcp2 / sync, 3.0, True),
        ("async save blocks <= 1.5 x one plain copy", blocked / limit, 1.5, False),
        ("restore >= 0.5 x the limit", limit / restore, 0.5, True),
        ("tmpfs per rank <= (keep + 1) x state (tensor bytes)", tmpfs_per_rank / total, keep + 1, False),
        ("peak anonymous RSS growth in a sync save <= 10% of state", sync_rss.peak_anon / total, 0.1, False),
        (
            "peak anonymous RSS growth in an async save <= 10% of state",
            async_rss.peak_anon / total,
            0.1,
            False,
        ),
    ]
    print()
    overhead_kib = (stored - total) / 2**10
    per_tensor_bytes, per_stored = tmpfs_per_rank / total, tmpfs_per_rank / stored
    print(
        f"tmpfs per rank: {tmpfs_per_rank / 2**30:.4f} GiB, keep={keep}: {per_tensor_bytes:.4f} x the "
        f"tensor bytes, {per_stored:.4f} x the stored state (tensors + {overhead_kib:.0f} KiB of metadata)"
    )
    for label, sampler in (("sync", sync_rss), ("async", async_rss)):
        print(
            f"peak RSS growth during a {label} save: anonymous {sampler.peak_anon / 2**20:.1f} MiB, "
            f"all resident {sampler.peak_rss / 2**20:.1f} MiB"
        )
    print()
    missed = 0
    for label, measured, bound, at_least in checks:
        ok = measured >= bound if at_least else measured <= bound
        missed += not ok
        print(f"{'PASS' if ok else 'MISS'}  {label}: measured {measured:.4g}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
