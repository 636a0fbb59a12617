"""DCP through the flash writer against DCP's FileSystemWriter and stalwart's own FlashCheckpointer, two
ranks (gloo over loopback) saving the same state side by side in one run.

    python benchmarks/dcp.py --size 1GiB [--repeats 3] [--root /dev/shm/stalwart-bench-dcp]

Every rank saves ``--size`` of its own tensors (no deduplication: each rank writes all of it). Every
figure is the median over ranks and ``--repeats`` saves after ``WARMUP`` warm-up saves (steady state, as
for a training job after its first few saves: with keep=1 a rank cycles through up to 3 flash buffers,
the kept step, the one being written and one while the other rank's commit of the previous step is
still on its way, and each is allocated and faulted by the save that first needs it). The async
figure is what the caller waits for in ``dcp.async_save`` (the writer's staging copy, into memory it
keeps from save to save); "one plain copy" is ``copy_`` of the same tensors into tensors that already
exist.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
import warnings
from pathlib import Path

WARMUP = 3  # saves before the timed ones: every buffer a rank cycles through exists by then

ROWS = [
    ("copy", "one plain copy (copy_ into existing tensors)"),
    ("fs_default", "dcp.save, FileSystemWriter to /dev/shm (defaults)"),
    ("fs", "dcp.save, FileSystemWriter to /dev/shm, 2 threads"),
    ("flash_dcp", "dcp.save, FlashStorageWriter"),
    ("flash_cp", "FlashCheckpointer.save, blocking"),
    ("flash_cp_async", "FlashCheckpointer.save, async: caller blocked"),
    ("dcp_async", "dcp.async_save, FlashStorageWriter: caller blocked"),
]


def _state(rank: int, total: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(rank)
    piece = 64 * 2**20
    return {f"r{rank}.t{i}": torch.randn(piece // 4, generator=gen) for i in range(max(total // piece, 1))}


def _worker(rank: int, world: int, port: int, total: int, repeats: int, root: str, out: str) -> None:
    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import stalwart as sw

    dist.init_process_group("gloo", rank=rank, world_size=world)
    state = _state(rank, total)
    times: dict[str, list[float]] = {key: [] for key, _ in ROWS}

    def timed(key: str, fn) -> None:
        dist.barrier()
        start = time.perf_counter()
        fn()
        times[key].append(time.perf_counter() - start)

    def phase(key: str, save, after=None, close=None) -> None:
        """One method at a time (memory): ``WARMUP`` warm-up saves, then ``repeats`` timed ones; then
        freed."""
        for step in range(WARMUP + repeats):
            timed(key, lambda step=step: save(step))
            if after is not None:
                after(step)
            if step < WARMUP:
                times[key].pop()
        if close is not None:
            close()

    targets = {k: torch.empty_like(v) for k, v in state.items()}

    def copy(step: int) -> None:
        for key, tensor in state.items():
            targets[key].copy_(tensor)

    phase("copy", copy)
    targets.clear()

    def drop_fs(step: int) -> None:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(Path(root, f"fs-{step}"), ignore_errors=True)

    def fs(step: int, threads: int = 2) -> None:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(Path(root, f"fs-{step}"), thread_count=threads))

    phase("fs_default", lambda step: fs(step, 1), after=drop_fs)
    phase("fs", fs, after=drop_fs)
    writer = sw.FlashStorageWriter("dcp", root=root, keep=1, replicas=0)
    phase(
        "flash_dcp",
        lambda step: dcp.save(state, checkpoint_id=step, storage_writer=writer),
        close=writer.close,
    )
    flash = sw.FlashCheckpointer("cp", root=root, keep=1, replicas=0, async_save=False)
    phase("flash_cp", lambda step: flash.save(step, state), close=flash.close)
    flash_async = sw.FlashCheckpointer("cp-async", root=root, keep=1, replicas=0, async_save=True)
    phase(
        "flash_cp_async",
        lambda step: flash_async.save(step, state),
        lambda step: flash_async.wait(),
        flash_async.close,
    )
    async_writer = sw.FlashStorageWriter("dcp-async", root=root, keep=1, replicas=0)
    futures = []
    phase(
        "dcp_async",
        lambda step: futures.append(dcp.async_save(state, checkpoint_id=step, storage_writer=async_writer)),
        lambda step: futures.pop().result(timeout=600),
        async_writer.close,
    )
    Path(out, f"rank{rank}.json").write_text(json.dumps(times))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    from two_ranks import run_two_ranks

    from stalwart.quantities import parse_bytes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GiB", help="bytes per rank (default 1GiB)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", default="/dev/shm/stalwart-bench-dcp")
    args = parser.parse_args()
    total = parse_bytes(args.size.replace("GiB", "Gi").replace("MiB", "Mi"), "size")
    shutil.rmtree(args.root, ignore_errors=True)
    per_rank = run_two_ranks(_worker, total, args.repeats, args.root)
    shutil.rmtree(args.root, ignore_errors=True)
    median = {key: statistics.median(t for rank in per_rank for t in rank[key]) for key, _ in ROWS}
    print(f"# DCP through the flash tier: 2 ranks x {args.size}, median of {args.repeats} saves per rank")
    print(f"# {platform.node()} {os.cpu_count()} cpus, python {platform.python_version()}")
    print(f"| {'operation':54} | {'seconds':>8} | {'GB/s':>6} |")
    print(f"|{'-' * 56}|{'-' * 10}|{'-' * 8}|")
    for key, label in ROWS:
        print(f"| {label:54} | {median[key]:8.4f} | {total / median[key] / 1e9:6.2f} |")
    print()
    print(f"| {'ratio':59} | measured | target |")
    print(f"|{'-' * 61}|{'-' * 10}|{'-' * 8}|")
    ratios = [
        (
            "FlashStorageWriter dcp.save vs FileSystemWriter (defaults)",
            median["fs_default"] / median["flash_dcp"],
            ">= 5",
        ),
        (
            "FlashStorageWriter dcp.save vs FileSystemWriter, 2 threads",
            median["fs"] / median["flash_dcp"],
            ">= 5",
        ),
        (
            "FlashStorageWriter dcp.save vs FlashCheckpointer (blocking)",
            median["flash_cp"] / median["flash_dcp"],
            ">= 0.5",
        ),
        (
            "FlashStorageWriter dcp.save vs FlashCheckpointer (async)",
            median["flash_cp_async"] / median["flash_dcp"],
            ">= 0.5",
        ),
        ("dcp.async_save blocked / one plain copy", median["dcp_async"] / median["copy"], "<= 1.5"),
    ]
    for label, value, target in ratios:
        print(f"| {label:59} | {value:8.2f} | {target:>6} |")


if __name__ == "__main__":
    main()
