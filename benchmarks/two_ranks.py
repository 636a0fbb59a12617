"""Run a benchmark's worker on two ranks (spawned processes, gloo over loopback) and collect what each
rank wrote to ``<out>/rank<N>.json``."""

from __future__ import annotations

import json
import multiprocessing
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


def run_two_ranks(worker: Callable[..., None], *args: object) -> list[dict]:
    """``worker(rank, world, port, *args, out)`` on ranks 0 and 1; exits with the codes if one fails."""
    with socket.socket() as sock, tempfile.TemporaryDirectory() as out:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=worker, args=(rank, 2, port, *args, out)) for rank in range(2)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(1800)
        if any(proc.exitcode for proc in procs):
            sys.exit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
