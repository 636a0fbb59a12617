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
