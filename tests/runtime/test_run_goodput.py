"""What a run cost, recorded from inside its attempts: flash saves and restores and the steps each
round reached, from every rank, shown by ``stalwart show`` (and ``--json``) as where each attempt
resumed from and a goodput summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import runner_tasks as tasks

import stalwart as sw
from stalwart.cli import main
from stalwart.runtime import events


def test_show_says_where_the_retry_resumed_and_what_the_kill_cost(
    stalwart_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = sw.with_runcontext(echo=False).run(tasks.trains_and_is_killed, 30, 13)
    assert run.output == {"resumed_at": 10, "w": 30.0}
    capsys.readouterr()

    assert main(["show", run.id, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["output"] == repr(run.output)
    first, second = data["attempts"]
    assert first["status"] == "killed" and second["status"] == "succeeded"
    assert first["rounds"][0]["resumed"]["step"] is None  # started fresh
    assert first["rounds"][0]["reached"] == 13  # the step it had trained to when it was killed
    assert (
        second["rounds"][0]["resumed"]["step"] == 10 and second["rounds"][0]["resumed"]["source"] == "flash"
    )
    goodput = data["goodput"]
    assert goodput["steps_recomputed"] == 3  # steps 11-13, trained again
    assert goodput["saves"] == 2 + 4  # steps 5, 10 in attempt 0; 15..30 in attempt 1
    assert goodput["saved_bytes"] >= goodput["saves"] * 4000
    assert 0 < goodput["save_blocked_seconds"] < goodput["attempt_seconds"]
    assert goodput["restore_seconds"] > 0
    assert goodput["training_seconds"] <= goodput["attempt_seconds"] <= goodput["wall_seconds"]
    assert not any(e["kind"] in ("flash_save", "progress") for e in data["events"])  # counted instead

    assert main(["show", run.id]) == 0
    text = capsys.readouterr().out
    assert "step 10 (flash)" in text and "output" in text and repr(run.output) in text
    assert "steps recomputed  3" in text and "after attempt 0 round 0: reached step 13" in text


def test_events_are_written_off_the_loop_and_torn_lines_are_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STALWART_ATTEMPT_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setattr(events, "_recorder", None)
    events.record("flash_save", step=5, blocked=0.01)
    events.progress(7)
    recorder = events._get()
    assert recorder is not None
    recorder.flush()  # what the background thread does; at most once per event
    (tmp_path / "events" / "torn.jsonl").write_text('[1.0, 0, 0, "flash_save", {"st')
    found = events.read(tmp_path)
    assert [(e.rank, e.kind, e.fields) for e in found] == [
        (3, "flash_save", {"step": 5, "blocked": 0.01}),
        (3, "progress", {"step": 7}),
    ]
    monkeypatch.setattr(events, "_recorder", None)
    monkeypatch.delenv("STALWART_ATTEMPT_DIR")
    events.record("ignored")  # outside a task: nothing, and no error
    assert events._get() is None


def test_the_timeline_draws_lanes_failures_restores_and_lost_work(
    stalwart_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stalwart.runtime import timeline
    from stalwart.runtime.records import RunRecords

    run = sw.with_runcontext(echo=False).run(tasks.trains_and_is_killed, 30, 13)
    records = RunRecords(stalwart_home / "runs.db")
    record = records.get_run(run.id)
    drawn = timeline.lanes(record, records.attempts(run.id), records.events(run.id))
    assert [lane.label for lane in drawn] == ["attempt 0 · rank 0", "attempt 1 · rank 0"]
    first, second = drawn
    assert [kind for _, kind in first.markers] == ["failure"] and second.markers == []
    lost = [span for span in first.spans if span[2] == "lost"]
    saves = [span for span in first.spans if span[2] == "save"]
    assert len(lost) == 1 and len(saves) == 2 and lost[0][0] == saves[-1][1]  # from its last save to the kill
    assert [span[2] for span in second.spans].count("restore") == 1 and "lost" not in {
        s[2] for s in second.spans
    }

    fig = timeline.figure(drawn, "t")
    axis = fig.axes[0]
    assert [t.get_text() for t in axis.get_yticklabels()] == [lane.label for lane in drawn]
    gids = {artist.get_gid() for artist in axis.get_children() if artist.get_gid()}
    assert {"failure:attempt 0 · rank 0", "lost:attempt 0 · rank 0", "restore:attempt 1 · rank 0"} <= gids
    assert "failure:attempt 1 · rank 0" not in gids

    html, png, chrome = tmp_path / "run.html", tmp_path / "run.png", tmp_path / "run.json"
    assert main(["show", run.id, "--timeline", str(html), "--trace", str(chrome)]) == 0
    assert main(["show", run.id, "--timeline", str(png)]) == 0
    page = html.read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page and "attempt 1 · rank 0" in page
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    events = json.loads(chrome.read_text())["traceEvents"]
    names = {(e["pid"], e["name"]) for e in events if e["ph"] in ("X", "i")}
    assert {(0, "attempt"), (0, "save"), (0, "lost"), (0, "failure"), (1, "restore")} <= names
    assert main(["show", run.id, "--timeline", str(tmp_path / "run.gif")]) == 2
    assert "written as .png, .svg or .html" in capsys.readouterr().err
