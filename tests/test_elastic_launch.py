"""Elastic tasks launched locally through torch elastic: restarts, errors, several nodes, timeouts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import elastic_tasks
import pytest
import torch

import stalwart as sw
from stalwart.testing.cluster import free_port


def test_a_killed_worker_is_restarted_and_resumes_bit_exactly_from_flash(stalwart_home: Path) -> None:
    twin = sw.run(elastic_tasks.ddp, steps=6).output
    assert twin["start"] == 0 and twin["restarts"] == 0
    run = sw.run(elastic_tasks.ddp, steps=6, kill_rank=1, kill_after=3)
    out = run.output
    assert len(run.attempts) == 1  # the worker group restarted inside the attempt: no task retry
    assert out["rank"] == 0 and out["world_size"] == 2 and out["local_rank"] == 0  # rank 0's value
    assert out["restarts"] >= 1 and out["start"] == 3 and out["restored_from"] == "flash"
    assert all(torch.equal(a, b) for a, b in zip(out["weights"], twin["weights"], strict=True))
    assert out["omp_threads"] == "1"  # as torchrun sets it for nproc_per_node > 1


def test_a_worker_exception_reaches_the_caller_with_its_rank_and_traceback(stalwart_home: Path) -> None:
    with pytest.raises(sw.RunFailedError) as info:
        sw.run(elastic_tasks.raises_on_rank_one)
    message = str(info.value)
    assert "worker rank 1 of the elastic task failed" in message
    assert "ValueError: rank one is unhappy" in message and "elastic_tasks.py" in message


def test_a_lone_node_gives_up_after_the_join_timeout_and_says_why(
    stalwart_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STALWART_RDZV_ENDPOINT", f"127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(sw.RunFailedError, match="waiting for other nodes") as info:
        sw.run(elastic_tasks.lonely_node)
    assert time.monotonic() - started < 90  # join_timeout=5, plus start-up; never the 15-minute default
    assert "timed out after 5 s" in str(info.value) and "join_timeout" in str(info.value)


def test_without_an_endpoint_several_nodes_are_refused_clearly(stalwart_home: Path, monkeypatch) -> None:
    monkeypatch.delenv("STALWART_RDZV_ENDPOINT", raising=False)
    monkeypatch.delenv("PET_RDZV_ENDPOINT", raising=False)
    with pytest.raises(sw.RunFailedError, match="needs a rendezvous endpoint shared by the nodes"):
        sw.run(elastic_tasks.lonely_node)


def test_two_nodes_of_one_job_train_together(tmp_path: Path) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import elastic_tasks, stalwart as sw
        run = sw.with_runcontext(run_id="two-nodes").run(elastic_tasks.two_nodes)
        print("OUTPUT", run.output)
        """
    )
    nodes = []
    for node in range(2):
        env = {
            **os.environ,
            "STALWART_HOME": str(tmp_path / f"home-{node}"),
            "STALWART_FLASH_ROOT": str(tmp_path / f"flash-{node}"),
            "STALWART_RDZV_ENDPOINT": endpoint,
            "STALWART_NO_PROGRESS": "1",
        }
        nodes.append(
            subprocess.Popen(
                [sys.executable, "-c", script],
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    outputs = []
    for proc in nodes:
        try:
            out, _ = proc.communicate(timeout=240)
        finally:
            proc.kill()
        assert proc.returncode == 0, out
        outputs.append(next(line for line in out.splitlines() if line.startswith("OUTPUT")))
    # rank 0 (on whichever node) summed 1 + 2 across the two nodes; the other node returns nothing
    assert sorted(outputs) == ["OUTPUT 3", "OUTPUT None"]
