"""What answering SIGTERM costs a training step: with several ranks, ``maybe_save`` looks at the job's
torch.distributed store at every step boundary. Two ranks (gloo over loopback), ``--calls`` calls of
``maybe_save`` that do not save, with and without ``save_on_preemption``.

    python benchmarks/preemption.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path


def _worker(rank: int, world: int, port: int, calls: int, root: str, out: str) -> None:
    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    import stalwart as sw

    dist.init_process_group("gloo", rank=rank, world_size=world)
    state = {"w": torch.zeros(1000)}
    seconds = {}
    for answer in (False, True):
        flash = sw.FlashCheckpointer(
            f"job-{answer}", root=root, every_n_steps=10**9, save_on_preemption=answer
        )
        flash.save(0, state)
        flash.wait()
        dist.barrier()
        start = time.perf_counter()
        for step in range(1, calls + 1):
            flash.maybe_save(step, state)
        seconds[str(answer)] = (time.perf_counter() - start) / calls
        dist.barrier()
        flash.close()
    Path(out, f"rank{rank}.json").write_text(json.dumps(seconds))
    dist.destroy_process_group()


def main() -> None:
    from two_ranks import run_two_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    root = tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    try:
        per_rank = run_two_ranks(_worker, args.calls, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("| maybe_save that does not save, 2 ranks | us per call |")
    print("|----------------------------------------|-------------|")
    for answer, label in (("False", "save_on_preemption=False"), ("True", "save_on_preemption=True")):
        value = max(rank[answer] for rank in per_rank) * 1e6
        print(f"| {label:38} | {value:11.1f} |")


if __name__ == "__main__":
    main()
