"""What a run cost, from its records: where each attempt (and each elastic restart round in it) resumed
from, and a goodput summary: wall time, time training, time blocked in saves, time restoring, and the
steps recomputed after each failure (the newest step a round reached, less the step the next round
resumed from). Rank 0 speaks for the run: its saves block training, and every rank restores the same
step.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .records import AttemptRecord, EventRecord, RunRecord

__all__ = ["FREQUENT", "event_fields", "summarize"]

FREQUENT = frozenset({"flash_save", "progress", "durable_upload", "checkpoint_save"})  # counted, not listed


def event_fields(event: EventRecord) -> dict[str, Any]:
    """The fields an attempt recorded with ``event`` (``runtime.events``); {} for the runner's own."""
    try:
        fields = json.loads(event.message or "")
    except ValueError:
        return {}
    return fields if isinstance(fields, dict) else {}


def summarize(record: RunRecord, attempts: Sequence[AttemptRecord], events: Sequence[EventRecord]) -> dict:
    """The run's rounds (attempt and restart round: where each resumed from, the newest step it reached)
    and its goodput, as plain data (``stalwart show --json`` prints it)."""
    rounds: dict[tuple[int, int], dict[str, Any]] = {}
    blocked = restoring = 0.0
    saves = saved_bytes = uploads = 0
    restarts: dict[int, int] = {}
    for event in events:
        if event.attempt is None:
            continue
        if event.kind == "elastic_restart":
            restarts[event.attempt] = restarts.get(event.attempt, 0) + 1
            continue
        fields = event_fields(event)
        if fields.get("rank") != 0:
            continue
        key = (event.attempt, int(fields.get("restart") or 0))
        current = rounds.setdefault(
            key, {"attempt": key[0], "round": key[1], "resumed": None, "reached": None}
        )
        step = fields.get("step")
        if event.kind == "flash_restore":
            current["resumed"] = {
                "step": step,
                "source": fields.get("source"),
                "seconds": fields.get("seconds"),
                "saved_by": fields.get("saved_by"),
            }
            restoring += float(fields.get("seconds") or 0.0)
        elif event.kind in ("flash_save", "progress", "preempted") and isinstance(step, int):
            current["reached"] = max(step, current["reached"] or step)
            if event.kind == "flash_save":
                saves += 1
                blocked += float(fields.get("blocked") or 0.0)
                saved_bytes += int(fields.get("bytes") or 0)
        elif event.kind == "durable_upload":
            uploads += 1
        elif event.kind == "checkpoint_save":  # the task checkpoint: the loop waits for all of it
            saves += 1
            blocked += float(fields.get("seconds") or 0.0)
            saved_bytes += int(fields.get("bytes") or 0)
        elif event.kind == "checkpoint_restore":
            restoring += float(fields.get("seconds") or 0.0)
    ordered = [rounds[key] for key in sorted(rounds)]
    lost = []
    for before, after in itertools.pairwise(ordered):
        if before["reached"] is not None and after["resumed"] is not None:
            resumed = after["resumed"]["step"]
            lost.append(
                {
                    "after": {"attempt": before["attempt"], "round": before["round"]},
                    "reached": before["reached"],
                    "resumed": resumed,
                    "steps": max(0, before["reached"] - (resumed or 0)),
                }
            )
    wall = (record.ended or time.time()) - record.created
    in_attempts = sum(a.duration if a.duration is not None else time.time() - a.started for a in attempts)
    return {
        "rounds": ordered,
        "restarts": {str(number): count for number, count in sorted(restarts.items())},
        "goodput": {
            "wall_seconds": round(wall, 3),
            "attempt_seconds": round(in_attempts, 3),
            "training_seconds": round(max(0.0, in_attempts - blocked - restoring), 3),
            "save_blocked_seconds": round(blocked, 6),
            "restore_seconds": round(restoring, 6),
            "saves": saves,
            "saved_bytes": saved_bytes,
            "durable_uploads": uploads,
            "steps_recomputed": sum(item["steps"] for item in lost),
        },
        "lost": lost,
    }
