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
    assert (
        "worker rank 1 of the elastic task failed first: it raised ValueError: rank one is unhappy" in message
    )
    assert "elastic_tasks.py" in message and "in raises_on_rank_one" in message  # rank 1's traceback
    assert isinstance(info.value.__cause__, ValueError)  # the rank's own exception, as for a plain task
    assert str(info.value.__cause__) == "rank one is unhappy"


def test_the_first_worker_to_fail_is_named_not_the_peer_that_failed_after_it(stalwart_home: Path) -> None:
    with pytest.raises(sw.RunFailedError) as info:
        sw.run(elastic_tasks.killed_while_its_peer_waits)
    message = str(info.value)
    assert "worker rank 1 of the elastic task failed first: it was killed by SIGKILL" in message
    assert "worker rank 0 of the elastic task failed first" not in message
    assert "Connection closed by peer" not in message.split("failed first", 1)[1].split("\n", 1)[0]


def test_non_retryable_error_in_a_worker_stops_restarts_and_retries(
    stalwart_home: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "raised"
    with pytest.raises(sw.RunFailedError) as info:
        sw.run(elastic_tasks.refuses_on_rank_one, marker=str(marker))
    assert marker.read_text().splitlines() == ["attempt 0 round 0"]  # no group restart, no task retry
    assert len(info.value.run.attempts) == 1
    assert isinstance(info.value.__cause__, sw.NonRetryableError)
    assert "rank one's configuration is wrong" in str(info.value)


SCRIPT_WITH_A_CLASS = """
from dataclasses import dataclass

import stalwart as sw

env = sw.TaskEnvironment(name="cfg")


@dataclass
class Config:
    lr: float
    rank: int


@env.task(retries=2, elastic=sw.Elastic(nproc_per_node=2, monitor_interval=0.2))
def train(lr: float = 0.1) -> Config:
    with open("executions.txt", "a") as fh:
        fh.write(f"rank {sw.ctx().rank}\\n")
    return Config(lr, sw.ctx().rank)


if __name__ == "__main__":
    run = sw.run(train, lr=0.5)
    print("OUTPUT", type(run.output).__module__, run.output, len(run.attempts))
"""


def test_an_elastic_task_returns_an_object_of_a_class_of_its_script(
    stalwart_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the task writes executions.txt to its working directory
    script = tmp_path / "cfg_script.py"
    script.write_text(SCRIPT_WITH_A_CLASS)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OUTPUT __main__ Config(lr=0.5, rank=0) 1" in proc.stdout
    assert sorted((tmp_path / "executions.txt").read_text().splitlines()) == ["rank 0", "rank 1"]

    from stalwart.cli import main

    assert main(["run", str(script), "train", "--lr", "0.25", "--run-id", "cfg-cli", "-q"]) == 0
    out = capsys.readouterr().out
    assert "run cfg-cli succeeded after 1 attempt" in out and "output: Config(lr=0.25, rank=0)" in out


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
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / "support")!r})
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


def test_a_worker_whose_task_returned_leaves_no_process_group_to_the_interpreter_exit(tmp_path: Path) -> None:
    """Gloo threads alive at interpreter exit abort the process now and then ("terminate called without
    an active exception"; 5 of 40 workers here), which the agent reports as a failed worker: the worker
    destroys the group its task left once the task returned."""
    import multiprocessing
    import pickle

    from processes import run_all

    from stalwart.runtime.elastic_launch import OUTPUT_FILE
    from stalwart.runtime.protocol import SPEC_FILE, AttemptSpec

    spec = AttemptSpec(
        "elastic_tasks", "gather_ranks", elastic_tasks.__file__, list(sys.path), pickle.dumps(((), {}))
    )
    (tmp_path / SPEC_FILE).write_bytes(pickle.dumps(spec))
    port = free_port()
    reports = [tmp_path / f"rank{rank}.report" for rank in range(2)]
    context = multiprocessing.get_context("spawn")
    procs = [
        context.Process(
            target=elastic_tasks.worker_then_report, args=(str(tmp_path), rank, 2, port, str(reports[rank]))
        )
        for rank in range(2)
    ]
    run_all(procs, timeout=120, what="elastic workers")
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert pickle.loads((tmp_path / OUTPUT_FILE).read_bytes()) == [0, 1]  # rank 0's value, as always
    assert [report.read_text() for report in reports] == ["False", "False"]
