"""Megatron-LM's ``dist_checkpointing.save`` through stalwart's flash strategy against Megatron's own
``torch_dist`` strategy writing to /dev/shm, two ranks (gloo over loopback), the same sharded state.

    python benchmarks/megatron.py --size 512MiB [--repeats 3] [--root /dev/shm/stalwart-bench-megatron]

Every rank holds ``--size`` of float32 shards: megatron.core ShardedTensors (each global tensor split
along its first axis between the two ranks) plus a little common state. Figures are medians over the
ranks and ``--repeats`` rounds after two warm-up rounds (steady state); each round saves once with
every method in turn.

Megatron's torch_dist strategy cannot run on a machine without CUDA: its writer
(``FileSystemWriterAsync.preload_tensors``) calls ``torch.cuda.synchronize()``, its finalization
broadcasts a tensor on ``torch.cuda.current_device()``, and so does ``AsyncCallsQueue``. The script
shows that error, then measures torch_dist with exactly those two calls sent to the CPU in this process
(``torch.cuda.synchronize`` a no-op, ``torch.cuda.current_device()`` -> "cpu"), and DCP's own
``FileSystemWriter`` of the same state as Megatron converts it (no CUDA involved at all).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

# run as a script, this file's directory comes first on sys.path and its name would hide the megatron package
# (a namespace package: a megatron.py anywhere on the path wins), so the directory goes and its launcher is
# loaded by file
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

ROWS = [
    ("copy", "one plain copy of the shards (copy_ into existing tensors)"),
    ("flash", "swm.save, FlashSaveStrategy (common state on every node)"),
    ("flash_megatron", "dist_checkpointing.save, FlashSaveStrategy"),
    ("flash_async", "swm.save async: caller blocked (copy done)"),
    ("torch_dist", "dist_checkpointing.save, torch_dist to /dev/shm [1]"),
    ("torch_dist_async", "dist_checkpointing.save torch_dist async: caller blocked [1]"),
    ("dcp_fs", "dcp.save, FileSystemWriter(thread_count=2) to /dev/shm [2]"),
]


def _shards(rank: int, total: int) -> list:
    """This rank's shard of each global tensor: 32 MiB pieces of float32."""
    import torch

    gen = torch.Generator().manual_seed(rank)
    piece = 32 * 2**20
    return [torch.randn(piece // 4 // 1024, 1024, generator=gen) for _ in range(max(total // piece, 1))]


def _sharded_state(shards: list, rank: int, world: int, step: int) -> dict:
    """What a Megatron training loop hands to dist_checkpointing.save (a new dict each save)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    state: dict = {"iteration": step, "args": {"lr": 1e-4, "layers": 24}}
    for i, local in enumerate(shards):
        state[f"layer{i}.weight"] = ShardedTensor.from_rank_offsets(
            f"layer{i}.weight", local, (0, rank, world)
        )
    return state


@contextlib.contextmanager
def _cuda_calls_on_cpu():
    import torch

    saved = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize, torch.cuda.current_device = (lambda *a, **k: None), (lambda: "cpu")
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = saved


def _worker(rank: int, world: int, port: int, total: int, repeats: int, root: str, out: str) -> None:
    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue as MegatronQueue
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    import stalwart as sw
    from stalwart.integrations import megatron as swm

    dist.init_process_group("gloo", rank=rank, world_size=world)
    times: dict[str, list[float]] = {key: [] for key, _ in ROWS}
    notes: dict[str, str] = {}

    def directory(name: str, step: int) -> str:
        path = Path(root, f"{name}-{step}")
        if rank == 0:
            path.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        return str(path)

    def drop(name: str, step: int) -> None:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(Path(root, f"{name}-{step}"), ignore_errors=True)

    shards = _shards(rank, total)
    try:  # what Megatron's own strategy does on this machine
        dist_checkpointing.save(_sharded_state(shards[:1], rank, world, 0), directory("cuda", 0))
    except AssertionError as exc:
        notes["torch_dist"] = f"{type(exc).__name__}: {exc}"
    drop("cuda", 0)

    writers = {key: sw.FlashStorageWriter(key, root=root, keep=1, replicas=0) for key in ("a", "b", "c")}
    flash, flash_megatron, flash_async = (swm.FlashSaveStrategy(w) for w in writers.values())
    queue = swm.AsyncCallsQueue()
    torch_dist = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=2)
    megatron_queue = MegatronQueue()

    def torch_dist_sync(step: int, state: dict) -> None:
        with _cuda_calls_on_cpu():
            dist_checkpointing.save(state, directory("td", step), sharded_strategy=torch_dist)

    def torch_dist_async(step: int, state: dict) -> None:
        with _cuda_calls_on_cpu():
            request = dist_checkpointing.save(
                state, directory("tda", step), sharded_strategy=torch_dist, async_sharded_save=True
            )
            megatron_queue.schedule_async_request(request)

    def torch_dist_async_done(step: int) -> None:
        with _cuda_calls_on_cpu():
            megatron_queue.maybe_finalize_async_calls(blocking=True)
        drop("tda", step)

    def dcp_fs(step: int, state: dict) -> None:
        state = {k: v for k, v in state.items() if k.startswith("layer")}
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(state, keep_only_main_replica=True)
        dcp.save(
            mcore_to_pyt_state_dict(flat, False),
            storage_writer=dcp.FileSystemWriter(directory("fs", step), thread_count=2),
            planner=MCoreSavePlanner(flatten_state_dict=False),
        )

    targets = [torch.empty_like(t) for t in shards]

    def copy(step: int, state: dict) -> None:
        for target, shard in zip(targets, shards, strict=True):
            target.copy_(shard)

    methods = {  # key: (save, after)
        "copy": (copy, None),
        "flash": (lambda step, state: swm.save(state, step, flash), None),
        "flash_megatron": (
            lambda step, state: dist_checkpointing.save(
                state, flash_megatron.checkpoint_dir(step), sharded_strategy=flash_megatron
            ),
            None,
        ),
        "flash_async": (
            lambda step, state: queue.schedule_async_request(
                swm.save(state, step, flash_async, async_save=True)
            ),
            lambda step: queue.maybe_finalize_async_calls(blocking=True),
        ),
        "torch_dist": (torch_dist_sync, lambda step: drop("td", step)),
        "torch_dist_async": (torch_dist_async, torch_dist_async_done),
        "dcp_fs": (dcp_fs, lambda step: drop("fs", step)),
    }
    # two warm-up rounds (then the flash buffers of keep=1 exist: steady state), then ``repeats`` timed
    # rounds; each round saves once with every method in turn, so a burst of load hits them alike
    for step in range(repeats + 2):
        for key, (save, after) in methods.items():
            state = _sharded_state(shards, rank, world, step)
            dist.barrier()
            start = time.perf_counter()
            save(step, state)
            elapsed = time.perf_counter() - start
            if after is not None:
                after(step)
            if step >= 2:
                times[key].append(elapsed)
    for writer in writers.values():
        writer.close()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"times": times, "notes": notes}))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    spec = importlib.util.spec_from_file_location("two_ranks", _HERE / "two_ranks.py")
    assert spec is not None and spec.loader is not None
    two_ranks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(two_ranks)
    run_two_ranks = two_ranks.run_two_ranks

    from stalwart.quantities import parse_bytes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="512MiB", help="bytes of shards per rank (default 512MiB)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", default="/dev/shm/stalwart-bench-megatron")
    args = parser.parse_args()
    total = parse_bytes(args.size.replace("GiB", "Gi").replace("MiB", "Mi"), "size")
    shutil.rmtree(args.root, ignore_errors=True)
    reports = run_two_ranks(_worker, total, args.repeats, args.root)
    shutil.rmtree(args.root, ignore_errors=True)
    median = {key: statistics.median(t for r in reports for t in r["times"][key]) for key, _ in ROWS}
    import megatron.core
    import torch

    print(f"# Megatron dist_checkpointing.save: 2 ranks x {args.size} of shards, median of {args.repeats}")
    print(
        f"# {platform.node()} {os.cpu_count()} cpus, python {platform.python_version()}, torch "
        f"{torch.__version__}, megatron-core {megatron.core.__version__}"
    )
    print(f"| {'operation':62} | {'seconds':>8} | {'GB/s':>6} |")
    print(f"|{'-' * 64}|{'-' * 10}|{'-' * 8}|")
    for key, label in ROWS:
        print(f"| {label:62} | {median[key]:8.4f} | {total / median[key] / 1e9:6.2f} |")
    print()
    print(f"| {'ratio (flash faster by)':62} | {'x':>8} |")
    print(f"|{'-' * 64}|{'-' * 10}|")
    for label, value in [
        ("torch_dist sync / swm.save", median["torch_dist"] / median["flash"]),
        (
            "torch_dist sync / dist_checkpointing.save + FlashSaveStrategy",
            median["torch_dist"] / median["flash_megatron"],
        ),
        (
            "torch_dist async blocked / swm.save async blocked",
            median["torch_dist_async"] / median["flash_async"],
        ),
        ("dcp FileSystemWriter / swm.save", median["dcp_fs"] / median["flash"]),
    ]:
        print(f"| {label:62} | {value:8.2f} |")
    print()
    print(f"[1] Megatron's torch_dist on this machine as is: {reports[0]['notes'].get('torch_dist', 'ran')}")
    print("    measured with torch.cuda.synchronize() a no-op and torch.cuda.current_device() -> 'cpu'")
    print(
        "    async on CPU: Megatron's preload of CPU tensors copies nothing; its writer is a forked process"
    )
    print("    reading a copy-on-write snapshot. On GPUs the preload copies device to host")
    print("[2] the same ShardedTensors as Megatron converts them (mcore_to_pyt_state_dict), DCP's own writer")


if __name__ == "__main__":
    main()
