"""A run drawn as a timeline, and exported as a Chrome/Perfetto trace.

Each lane is one rank of one attempt. It carries:
- the attempt's span;
- the time each flash save blocked it, and the time each restore took;
- the work a failure threw away, shaded: from the round's last save to its end;
- markers for failures, torch elastic restarts and preemption.

``lanes`` builds this as plain data from the run's records. ``figure`` draws it with matplotlib (the
``timeline`` extra): ``.png`` as is, ``.html`` as a page around the SVG. ``trace`` gives the same
spans as Chrome trace events, which Perfetto and ``chrome://tracing`` open.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .summary import event_fields

if TYPE_CHECKING:
    from .records import AttemptRecord, EventRecord, RunRecord

__all__ = ["Lane", "figure", "lanes", "trace", "write"]

FAILED = frozenset({"failed", "killed", "exited", "timed_out", "preempted", "aborted"})
COLORS = {
    "attempt": "#d9e4f0",
    "save": "#2b6cb0",
    "restore": "#2f855a",
    "lost": "#e53e3e",
}


@dataclass
class Lane:
    """One rank of one attempt: spans (start, end, kind) and markers (time, kind), in seconds since
    the run was created."""

    attempt: int
    rank: int
    spans: list[tuple[float, float, str]] = field(default_factory=list)
    markers: list[tuple[float, str]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"attempt {self.attempt} · rank {self.rank}"


def lanes(record: RunRecord, attempts: Sequence[AttemptRecord], events: Sequence[EventRecord]) -> list[Lane]:
    """The run's lanes, one per (attempt, rank) that left a trace (rank 0 of every attempt at least)."""
    zero = record.created
    found: dict[tuple[int, int], Lane] = {}
    ends = {a.number: a.ended for a in attempts}
    for attempt in attempts:
        found[(attempt.number, 0)] = Lane(attempt.number, 0)
    last_save: dict[tuple[int, int, int], float] = {}  # (attempt, rank, round) -> end of its newest save
    round_ends: dict[tuple[int, int], float] = {}  # (attempt, round) -> when torch elastic restarted it
    for event in events:
        if event.attempt is None or event.attempt not in ends:
            continue
        fields = event_fields(event)
        at = event.time - zero
        if event.kind == "elastic_restart":
            round_ends[(event.attempt, int(fields.get("round") or 1) - 1)] = at
            for lane in found.values():
                if lane.attempt == event.attempt:
                    lane.markers.append((at, "restart"))
            continue
        rank = int(fields.get("rank") or 0)
        lane = found.setdefault((event.attempt, rank), Lane(event.attempt, rank))
        if event.kind in ("flash_save", "checkpoint_save"):  # the time the training loop waited
            start = at - float(fields.get("blocked", fields.get("seconds")) or 0.0)
            lane.spans.append((start, at, "save"))
            last_save[(event.attempt, rank, int(fields.get("restart") or 0))] = at
        elif event.kind in ("flash_restore", "checkpoint_restore"):
            lane.spans.append((at - float(fields.get("seconds") or 0.0), at, "restore"))
        elif event.kind == "preempted":
            lane.markers.append((at, "preempted"))
    by_attempt = {a.number: a for a in attempts}
    for (number, rank), lane in found.items():
        attempt = by_attempt[number]
        end = (attempt.ended if attempt.ended is not None else time.time()) - zero
        lane.spans.insert(0, (attempt.started - zero, end, "attempt"))
        rounds = sorted({r for (a, k, r) in last_save if a == number and k == rank} | {0})
        for round_ in rounds:
            failed_at = round_ends.get((number, round_))
            if failed_at is None and attempt.status in FAILED and round_ == max(rounds):
                failed_at = end
            if failed_at is None:
                continue
            since = last_save.get((number, rank, round_), attempt.started - zero)
            lane.spans.append((since, failed_at, "lost"))
        if attempt.status in FAILED:
            lane.markers.append((end, "failure"))
    return [found[key] for key in sorted(found)]


def figure(drawn: Sequence[Lane], title: str) -> Any:
    """A matplotlib Figure of the lanes (the ``timeline`` extra): one row per lane, spans as bars
    labelled by kind, markers as symbols."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError as exc:
        raise ImportError(
            "drawing a timeline needs matplotlib: pip install 'stalwart[timeline]' (or export the events "
            "with --trace out.json, which needs nothing)"
        ) from exc
    fig, ax = pyplot.subplots(figsize=(11, 1.2 + 0.55 * len(drawn)))
    seen: set[str] = set()
    for row, lane in enumerate(drawn):
        for kind in ("attempt", "lost", "restore", "save"):
            bars = [(start, max(end - start, 1e-3)) for start, end, k in lane.spans if k == kind]
            if not bars:
                continue
            height = 0.8 if kind == "attempt" else 0.5
            ax.broken_barh(
                bars,
                (row - height / 2, height),
                facecolors=COLORS[kind],
                alpha=0.45 if kind == "lost" else 1.0,
                label=kind if kind not in seen else None,
                gid=f"{kind}:{lane.label}",
            )
            seen.add(kind)
        for kind, symbol, color in (
            ("failure", "X", "#c53030"),
            ("restart", "v", "#744210"),
            ("preempted", "s", "#553c9a"),
        ):
            times = [t for t, k in lane.markers if k == kind]
            if times:
                ax.scatter(
                    times,
                    [row] * len(times),
                    marker=symbol,
                    s=90,
                    color=color,
                    zorder=3,
                    label=kind if kind not in seen else None,
                    gid=f"{kind}:{lane.label}",
                )
                seen.add(kind)
    ax.set_yticks(range(len(drawn)), [lane.label for lane in drawn])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the run started")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def write(fig: Any, path: str | Path) -> Path:
    """Write the figure: ``.png``, ``.svg``, or ``.html`` (a page around the SVG)."""
    import io

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".png", ".svg"):
        fig.savefig(path, dpi=120)
    elif suffix == ".html":
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg")
        title = fig.axes[0].get_title() if fig.axes else "run"
        path.write_text(
            f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
            f"<body>{buffer.getvalue()}</body></html>"
        )
    else:
        raise ValueError(
            f"{path}: the timeline is written as .png, .svg or .html, not {suffix or 'no suffix'}"
        )
    return path


def trace(drawn: Sequence[Lane], title: str) -> dict:
    """The lanes as a Chrome trace (JSON object format): a process per attempt, a thread per rank,
    spans as complete events and markers as instant events; times in microseconds."""
    out: list[dict] = []
    for lane in drawn:
        out.append(
            {
                "ph": "M",
                "name": "process_name",
                "pid": lane.attempt,
                "args": {"name": f"attempt {lane.attempt}"},
            }
        )
        out.append(
            {
                "ph": "M",
                "name": "thread_name",
                "pid": lane.attempt,
                "tid": lane.rank,
                "args": {"name": f"rank {lane.rank}"},
            }
        )
        for start, end, kind in lane.spans:
            out.append(
                {
                    "ph": "X",
                    "name": kind,
                    "cat": "stalwart",
                    "pid": lane.attempt,
                    "tid": lane.rank,
                    "ts": round(start * 1e6),
                    "dur": max(1, round((end - start) * 1e6)),
                }
            )
        for at, kind in lane.markers:
            out.append(
                {
                    "ph": "i",
                    "s": "t",
                    "name": kind,
                    "pid": lane.attempt,
                    "tid": lane.rank,
                    "ts": round(at * 1e6),
                }
            )
    return {"traceEvents": out, "displayTimeUnit": "ms", "otherData": {"run": title}}
