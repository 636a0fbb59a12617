"""Worker functions for the concurrent-restore tests (importable by ``spawn`` children; no torch here)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import traceback
from pathlib import Path
from typing import Any

import stalwart as sw


def write_tree(root: Path, seed: int, files: int = 8) -> None:
    """``files`` files of 0.5-2 MiB in a few subdirectories (a sharded state dict, say)."""
    rng = random.Random(seed)
    for i in range(files):
        path = root / f"shard{i % 3}" / f"part-{i}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randint(2**19, 2**21)))


def digest_tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every regular file under ``root`` (what a reader sees, in full)."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def view(restored: Path | None, kind: str) -> Any:
    """What a task sees of a restored checkpoint: the files of a directory, or the payload's digest."""
    if restored is None:
        return None
    if kind == "directory":
        return digest_tree(restored)
    return hashlib.sha256(restored.read_bytes()).hexdigest()


def load_rounds(
    index: int,
    uri: str,
    options: dict | None,
    base: str,
    rounds: int,
    kind: str,
    expected: Any,
    barrier: Any,
    out: str,
) -> None:
    """Every process restores attempt 1's checkpoint into the same directory at once, ``rounds`` times
    (a fresh shared directory per round), and records what it saw; ``out/result-<index>.json``."""
    results = []
    for round_ in range(rounds):
        try:
            barrier.wait(timeout=120)  # all readers start together: the elastic workers of one node
            cp = sw.Checkpoint(uri, attempt=1, path=Path(base) / f"round{round_}", storage_options=options)
            restored = cp.load_sync()
            seen = view(restored, kind)
            # read it again once every reader has restored: nobody may tear a view already handed out
            barrier.wait(timeout=120)
            again = view(restored, kind)
            results.append(
                {
                    "round": round_,
                    "ok": seen == expected and again == expected,
                    "seen": seen,
                    "again": again,
                    "path": str(restored),
                }
            )
        except Exception:
            results.append({"round": round_, "ok": False, "error": traceback.format_exc()})
            barrier.abort()  # the others must not wait for a reader that crashed
            break
    Path(out, f"result-{index}.json").write_text(json.dumps(results))


env = sw.TaskEnvironment(name="restore-tests")


@env.task(retries=1, elastic=sw.Elastic(nproc_per_node=4, max_restarts=0, monitor_interval=0.2))
def ranks_restore_a_directory(seed: int) -> dict:
    """Attempt 0: rank 0 saves a directory of 8 files, then every rank fails. Attempt 1: the 4 ranks load
    ``ctx().checkpoint`` together, as any training script's ranks do; rank 0 returns what each one saw."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    context = sw.ctx()
    if context.attempt == 0:
        if context.rank == 0:
            src = Path(tempfile.mkdtemp(prefix="restore-tree-"))
            write_tree(src, seed)
            context.checkpoint.save_sync(src)
        dist.barrier()
        raise RuntimeError("the first attempt fails after its checkpoint")
    try:
        restored = context.checkpoint.load_sync()
        seen = {"path": str(restored), "files": digest_tree(restored)}
    except Exception:
        seen = {"error": traceback.format_exc()}
    dist.barrier()  # every rank has restored: nobody may tear what another was handed
    if "error" not in seen:
        seen["again"] = digest_tree(Path(seen["path"]))
    views: list = [None] * context.world_size
    dist.all_gather_object(views, seen)
    dist.destroy_process_group()
    return {"views": views}
