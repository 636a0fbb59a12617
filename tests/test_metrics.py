"""Checkpoint figures for loggers and Prometheus (stalwart.metrics), and the steps a restore threw away."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stalwart import metrics
from stalwart.runtime import events


def test_figures_give_each_consumer_only_what_happened_since_it_last_asked() -> None:
    tally = metrics.Tally()
    a, b = metrics.Figures(source=tally), metrics.Figures(prefix="ckpt.", source=tally)
    assert a.new() == {}
    tally.add("flash_save", {"step": 5, "blocked": 0.0125, "bytes": 3 * 2**20})
    tally.add("flash_save", {"step": 10, "blocked": 0.002, "bytes": 2**20})
    assert a.new() == {"stalwart/save_blocked_ms": 2.0, "stalwart/save_mb": 1.0}  # the newest save
    assert a.new() == {}
    tally.add("flash_restore", {"step": 10, "source": "peer", "seconds": 0.25, "lost": 3, "saved_by": None})
    assert a.new() == {
        "stalwart/restore_ms": 250.0,
        "stalwart/restore_step": 10,
        "stalwart/steps_lost": 3,
        "stalwart/restore_source": 1,
    }
    assert b.new() == {  # another consumer has its own position
        "ckpt.save_blocked_ms": 2.0,
        "ckpt.save_mb": 1.0,
        "ckpt.restore_ms": 250.0,
        "ckpt.restore_step": 10,
        "ckpt.steps_lost": 3,
        "ckpt.restore_source": 1,
    }
    tally.add("flash_restore", {"step": 10, "source": "flash", "seconds": 0.5, "lost": None})
    assert a.new() == {
        "stalwart/restore_ms": 500.0,
        "stalwart/restore_step": 10,
        "stalwart/restore_source": 0,
    }
    counts, sums, _, by_source = tally.snapshot()
    assert counts["flash_save"] == 2 and sums["flash_save", "bytes"] == 4 * 2**20
    assert by_source == {"peer": 1, "flash": 1}


def test_reached_before_reads_rank_0_of_earlier_rounds_only(tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "runs" / "r1"

    def write(attempt: int, name: str, *lines: list) -> None:
        path = run / f"attempt-{attempt}" / "events" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '[1.0, 0, 0, "progr')  # torn

    write(
        0, "rank0-pid11.jsonl", [1.0, 0, 0, "progress", {"step": 17}], [2.0, 0, 0, "flash_save", {"step": 15}]
    )
    write(0, "rank1-pid12.jsonl", [1.0, 1, 0, "progress", {"step": 40}])  # another rank: not read
    write(
        1,
        "rank0-pid21.jsonl",
        [3.0, 0, 1, "progress", {"step": 23}],
        [4.0, 0, 1, "durable_upload", {"step": 99}],
    )
    write(1, f"rank0-pid{os.getpid()}.jsonl", [5.0, 0, 2, "progress", {"step": 50}])  # this process
    monkeypatch.setenv("STALWART_ATTEMPT_DIR", str(run / "attempt-1"))
    assert events.reached_before() == 23
    monkeypatch.delenv("STALWART_ATTEMPT_DIR")
    assert events.reached_before() is None  # outside a task nothing is known


def test_prometheus_endpoint_from_the_environment_serves_this_process_figures(tmp_path: Path) -> None:
    """STALWART_PROMETHEUS_PORT alone turns the endpoint on; a scrape sees saves, restores by tier and
    the newest step."""
    pytest.importorskip("prometheus_client")
    code = textwrap.dedent(
        """
        import urllib.request
        import torch
        import stalwart as sw
        from stalwart import metrics

        state = {"w": torch.arange(1024, dtype=torch.float32)}
        saver = sw.FlashCheckpointer("prom", root=ROOT)
        for step in (1, 2, 3):
            saver.maybe_save(step, state)
        saver.close()
        again = sw.FlashCheckpointer("prom", root=ROOT)
        assert again.restore({"w": torch.zeros(1024)}) == 3
        again.close()
        port = metrics.serve_prometheus(0)  # the endpoint the checkpointer started: asked again, the same
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
            print(reply.read().decode())
        metrics.stop_prometheus()
        """
    ).replace("ROOT", repr(str(tmp_path)))
    env = {**os.environ, "STALWART_PROMETHEUS_PORT": "0"}
    env.pop("STALWART_ATTEMPT_DIR", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = set(proc.stdout.splitlines())
    assert "stalwart_flash_saves_total 3.0" in lines
    assert 'stalwart_flash_restores_total{source="flash"} 1.0' in lines
    assert "stalwart_step 3.0" in lines
    saved = [line for line in lines if line.startswith("stalwart_flash_save_bytes_total ")]
    assert len(saved) == 1 and float(saved[0].split()[1]) >= 3 * 4096  # three saves of 4 KiB (and RNG)
    blocked = [line for line in lines if line.startswith("stalwart_flash_save_blocked_seconds_total ")]
    assert len(blocked) == 1 and float(blocked[0].split()[1]) > 0


def test_bad_prometheus_settings_are_refused(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("prometheus_client")
    for port in (-1, 70000, "9000", True):
        with pytest.raises(ValueError, match=r"is not accepted; use an int in 0\.\.65535"):
            metrics.serve_prometheus(port)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="addr='' is not accepted"):
        metrics.serve_prometheus(0, addr="")
    monkeypatch.setenv("STALWART_PROMETHEUS_PORT", "nine")
    import stalwart as sw

    with pytest.raises(
        ValueError, match="STALWART_PROMETHEUS_PORT='nine' is not accepted; use a port number"
    ):
        sw.FlashCheckpointer("bad-port", root=tmp_path)


def test_a_restore_that_finds_nothing_counts_every_step_reached_before_as_lost(tmp_path: Path) -> None:
    """Attempt 0 reached step 5 and saved nothing; attempt 1's restore finds no checkpoint and starts
    over: 5 steps lost (this once raised TypeError on rank 0, subtracting None)."""
    attempt0 = tmp_path / "runs" / "r1" / "attempt-0" / "events"
    attempt0.mkdir(parents=True)
    (attempt0 / "rank0-pid1.jsonl").write_text(json.dumps([1.0, 0, 0, "progress", {"step": 5}]) + "\n")
    code = textwrap.dedent(
        """
        import torch
        import stalwart as sw
        from stalwart import metrics

        flash = sw.FlashCheckpointer("nothing", root=ROOT)
        assert flash.restore({"w": torch.zeros(4)}) is None
        flash.close()
        print(metrics.tally.snapshot()[2]["flash_restore"]["lost"])
        """
    ).replace("ROOT", repr(str(tmp_path / "flash")))
    env = {**os.environ, "STALWART_ATTEMPT_DIR": str(tmp_path / "runs" / "r1" / "attempt-1")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "5"
