"""How an attempt's end is described: exit statuses, and the OOM killer only on the kernel's evidence."""

from __future__ import annotations

import signal
from pathlib import Path

from stalwart.runtime.outcome import describe_exit, oom_kill_count


def test_oom_kill_counters_of_cgroup_v1_and_v2_are_read(tmp_path: Path) -> None:
    v2 = tmp_path / "memory.events"
    v2.write_text("low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n")
    v1 = tmp_path / "memory.oom_control"
    v1.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 7\n")
    assert oom_kill_count(v2) == 2 and oom_kill_count(v1) == 7
    assert oom_kill_count(tmp_path / "absent") is None
    (tmp_path / "other").write_text("nothing here\n")
    assert oom_kill_count(tmp_path / "other") is None


def test_this_process_counter_is_a_number_or_unknown() -> None:
    count = oom_kill_count()
    assert count is None or count >= 0


def test_sigkill_is_blamed_on_the_oom_killer_only_when_the_kernel_counted_one() -> None:
    kill = -signal.SIGKILL
    assert describe_exit(kill) == "was killed by SIGKILL"  # nothing known: say nothing
    assert describe_exit(kill, (4, 4)) == "was killed by SIGKILL"  # counted none meanwhile
    assert describe_exit(kill, (4, 5)) == (
        "was killed by SIGKILL, while the kernel's OOM killer killed 1 process of its cgroup (out of memory)"
    )
    assert describe_exit(-signal.SIGTERM, (4, 5)) == "was killed by SIGTERM"
    assert describe_exit(3) == "exited with code 3 without reporting a result"


def test_a_lost_peer_is_told_from_a_workers_own_error() -> None:
    from stalwart.runtime.elastic_failures import peer_loss

    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:41392")
    assert peer_loss(gloo) == "Connection closed by peer"
    try:
        try:
            raise gloo
        except RuntimeError as exc:
            raise ValueError("the step failed") from exc
    except ValueError as wrapped:
        assert peer_loss(wrapped) == "Connection closed by peer"  # found along the chain
    assert peer_loss(BrokenPipeError(32, "Broken pipe")) is None  # a task's own OSError is its own
    assert peer_loss(ValueError("Connection closed by peer")) is None
    assert peer_loss(RuntimeError("out of memory")) is None


def test_the_first_failure_is_a_workers_own_then_a_lost_peer_then_one_the_agent_stopped(
    tmp_path: Path,
) -> None:
    import pickle

    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from stalwart.runtime.elastic_failures import WorkerReport, first_failure, report_path
    from stalwart.runtime.protocol import AttemptResult

    def failure(rank: int, exitcode: int) -> ProcessFailure:
        return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file="/nonexistent")

    def report(rank: int, when: float, peer_lost: bool, error: str) -> None:
        result = AttemptResult(ok=False, error_type=f"builtins.{error}", error_message="m")
        path = report_path(tmp_path, 1000 + rank)
        path.write_bytes(pickle.dumps(WorkerReport(1000 + rank, rank, when, peer_lost, result)))

    # rank 0 lost its peer first (by the clock), rank 1 was stopped, rank 2 raised on its own later
    report(0, 100.0, True, "RuntimeError")
    report(2, 200.0, False, "ValueError")
    failures = {0: failure(0, 1), 1: failure(1, -signal.SIGTERM), 2: failure(2, 1)}
    first, others = first_failure(failures, tmp_path)
    assert first.rank == 2 and first.what() == "raised ValueError: m"
    assert [(f.rank, f.what(detail=False)) for f in others] == [
        (0, "lost a peer"),
        (1, "was stopped by the agent (SIGTERM)"),
    ]
    # a worker killed by a signal the agent does not send is a cause, before a lost peer
    first, _ = first_failure({0: failure(0, 1), 3: failure(3, -signal.SIGKILL)}, tmp_path)
    assert first.rank == 3 and first.what() == "was killed by SIGKILL"
    # only stopped workers: the earliest of them is all there is to name
    first, _ = first_failure({1: failure(1, -signal.SIGTERM)}, tmp_path)
    assert first.rank == 1 and first.what() == "was stopped by the agent (SIGTERM)"
