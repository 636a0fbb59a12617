"""Faults on one rank of a multi-rank flash job: every rank learns of them at once, none waits in a
collective for a rank that gave up, and a replication outage does not fill tmpfs (spawned gloo ranks)."""

from __future__ import annotations

import json
import multiprocessing
import socket
from pathlib import Path

import rank_workers
from processes import run_all


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(target, tmp_path: Path, world: int = 2) -> list[dict]:
    out = tmp_path / "out"
    out.mkdir()
    ctx = multiprocessing.get_context("spawn")
    port = _port()
    procs = [
        ctx.Process(target=target, args=(rank, world, port, str(tmp_path), str(out)), daemon=True)
        for rank in range(world)
    ]
    run_all(procs, 240, "rank processes")
    return [json.loads((out / f"result-{rank}.json").read_text()) for rank in range(world)]


def test_a_rank_failing_inside_a_restore_makes_every_rank_raise_at_once(tmp_path: Path) -> None:
    results = _run(rank_workers.restore_with_one_rank_failing, tmp_path)
    assert [r["raised"] for r in results] == ["FlashRestoreError"] * 2, results
    assert "rank 1: FlashSpaceError" in results[0]["message"], results[0]
    assert all(r["seconds"] < 60 for r in results), results  # not the 120 s collective timeout


def test_a_replication_outage_keeps_retention_going(tmp_path: Path) -> None:
    results = _run(rank_workers.save_with_replication_down, tmp_path)
    for result in results:  # 21 steps saved, keep=2: a few buffers held, not one per step
        assert "own" in result, result
        assert result["own"][-1] == 21 and len(result["own"]) <= 4, results
