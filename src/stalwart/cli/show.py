"""``stalwart runs`` and ``stalwart show``: the SQLite run records under ``$STALWART_HOME``, as tables.

Tables use rich on a terminal and plain aligned columns when piped, for grep and scripts.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import config
from .errors import CliError

if TYPE_CHECKING:
    from ..runtime.records import RunRecord, RunRecords

__all__ = ["LOG_TAIL_LINES", "cmd_runs", "cmd_show", "open_records"]

LOG_TAIL_LINES = 50
_SHORT_COLUMNS = frozenset({"#", "status", "attempt", "attempts", "exit code", "duration", "size", "time"})
_STATUS_STYLES = {
    "succeeded": "green",
    "failed": "red",
    "killed": "red",
    "exited": "red",
    "running": "yellow",
    "aborted": "magenta",
}


def open_records() -> RunRecords | None:
    """The run records, or None when nothing ever ran here (reading must not create a database)."""
    db = config.home() / "runs.db"
    if not db.exists():
        return None
    from ..runtime.records import RunRecords

    return RunRecords(db)


def cmd_runs(limit: int = 20, as_json: bool = False) -> int:
    """``stalwart runs``: the newest ``limit`` runs, one row each; ``as_json``: a JSON list."""
    books = open_records()
    records = books.list_runs(limit) if books else []
    if as_json:
        runs = [
            {
                "id": r.id,
                "task": r.task,
                "status": r.status,
                "attempts": len(books.attempts(r.id)) if books else 0,
                "created": r.created,
                "ended": r.ended,
                "checkpoint_uri": r.checkpoint_uri,
                "inputs": r.inputs,
            }
            for r in records
        ]
        print(json.dumps(runs, indent=2))
        return 0
    if books is None or not records:
        print(f"No runs yet (home: {config.home()})")
        return 0
    rows = [
        [
            record.id,
            record.task,
            record.status,
            str(len(books.attempts(record.id))),
            _local_time(record.created),
            _run_duration(record),
        ]
        for record in records
    ]
    _print_table(["id", "task", "status", "attempts", "started", "duration"], rows, status_column=2)
    return 0


def cmd_show(
    run_id: str,
    *,
    logs: bool = False,
    as_json: bool = False,
    timeline: str | None = None,
    trace: str | None = None,
) -> int:
    """``stalwart show RUN_ID``: one run's record, output, attempts (where each resumed from), goodput,
    checkpoints and events (and logs); ``--json``: the same as data."""
    from ..runtime.summary import FREQUENT, summarize

    records = open_records()
    record = _resolve_run(records, run_id)
    assert records is not None
    attempts = records.attempts(record.id)
    all_events = records.events(record.id)
    summary = summarize(record, attempts, all_events)
    output = _output_text(record, attempts)
    if timeline or trace:
        _export(timeline, trace, record, attempts, all_events)
    if as_json:
        print(json.dumps(_as_data(record, attempts, output, summary, all_events, FREQUENT), indent=2))
        return 0
    inputs = ", ".join(f"{name}={value}" for name, value in record.inputs.items()) or "(none)"
    header = [
        ("run", record.id),
        ("task", record.task),
        ("status", record.status),
        ("created", _local_time(record.created)),
        ("duration", _run_duration(record)),
        ("attempts", f"{len(attempts)} (at most {record.max_attempts} in the last launch)"),
        ("checkpoints", record.checkpoint_uri or "-"),
        ("inputs", inputs),
    ]
    if output is not None:
        header.append(("output", output))
    if record.error:
        header.append(("error", record.error))
    width = max(len(key) for key, _ in header)
    for key, value in header:
        print(f"{key:<{width}}  {value}")

    print()
    _print_table(
        ["#", "status", "exit code", "duration", "resumed from", "restarts", "error", "log dir"],
        [
            [
                str(a.number),
                a.status,
                _exit_text(a.exit_code),
                _duration(a.duration) if a.ended is not None else _so_far(a.started),
                _resumed_text(summary["rounds"], a.number),
                str(summary["restarts"].get(str(a.number), 0)),
                a.error or "",
                a.log_dir or "",
            ]
            for a in attempts
        ],
        title="Attempts",
        status_column=1,
        empty="Attempts: none",
    )

    print()
    _print_goodput(summary)

    print()
    _print_checkpoints(record.checkpoint_uri)

    print()
    _print_table(
        ["time", "attempt", "kind", "message"],
        [
            [_event_time(e.time), "" if e.attempt is None else str(e.attempt), e.kind, e.message or ""]
            for e in all_events
            if e.kind not in FREQUENT
        ],
        title="Events",
        empty="Events: none",
    )
    if logs:
        _print_logs(attempts)
    return 0


def _export(
    timeline_file: str | None,
    trace_file: str | None,
    record: RunRecord,
    attempts: Sequence[Any],
    all_events: Sequence[Any],
) -> None:
    """``--timeline FILE`` and ``--trace FILE``: the run drawn, and as a Chrome/Perfetto trace."""
    from ..runtime import timeline

    drawn = timeline.lanes(record, attempts, all_events)
    title = f"run {record.id} ({record.task}, {record.status})"
    if timeline_file:
        try:
            fig = timeline.figure(drawn, title)
            path = timeline.write(fig, timeline_file)
        except (ImportError, ValueError) as exc:
            raise CliError(str(exc), 2) from None
        print(f"timeline of run {record.id} written to {path}", file=sys.stderr)
    if trace_file:
        Path(trace_file).write_text(json.dumps(timeline.trace(drawn, title)))
        print(
            f"trace of run {record.id} written to {trace_file} (open it in ui.perfetto.dev)", file=sys.stderr
        )


def _output_text(record: RunRecord, attempts: Sequence[Any]) -> str | None:
    """The output of a succeeded run as text (cut at 500 characters), or None."""
    if record.status != "succeeded":
        return None
    winner = next((a for a in reversed(attempts) if a.status == "succeeded" and a.log_dir), None)
    if winner is None:
        return None
    from ..runtime.outcome import load_output

    try:
        text = repr(load_output(winner.log_dir))
    except Exception as exc:  # its classes may live in the task's script, not importable here
        return f"(cannot be shown here: {type(exc).__name__}: {exc})"[:500]
    return text if len(text) <= 500 else text[:497] + "..."


def _resumed_text(rounds: list[dict], attempt: int) -> str:
    """Where each round of an attempt resumed from: "step 25 (flash)", "fresh"; rounds after the first
    (torch elastic restarts) as "r1: ...". Empty when nothing was recorded (no flash restore)."""
    parts = []
    for item in rounds:
        if item["attempt"] != attempt or item["resumed"] is None:
            continue
        resumed = item["resumed"]
        text = "fresh" if resumed["step"] is None else f"step {resumed['step']} ({resumed['source']})"
        if resumed.get("saved_by"):
            text += f" saved by {resumed['saved_by']} ranks"
        parts.append(text if item["round"] == 0 else f"r{item['round']}: {text}")
    return "; ".join(parts)


def _print_goodput(summary: dict) -> None:
    goodput = summary["goodput"]
    print("Goodput")
    rows = [
        ("wall time", _duration(goodput["wall_seconds"])),
        ("in attempts", _duration(goodput["attempt_seconds"])),
        ("training", _duration(goodput["training_seconds"])),
        (
            "blocked in saves",
            f"{_fine_duration(goodput['save_blocked_seconds'])} over {goodput['saves']} saves "
            f"({_size(goodput['saved_bytes'])})",
        ),
        ("restoring", _fine_duration(goodput["restore_seconds"])),
        ("steps recomputed", str(goodput["steps_recomputed"])),
    ]
    for item in summary["lost"]:
        where = f"attempt {item['after']['attempt']} round {item['after']['round']}"
        rows.append(
            (
                "",
                f"after {where}: reached step {item['reached']}, resumed from {item['resumed']}: "
                f"{item['steps']}",
            )
        )
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def _as_data(
    record: RunRecord,
    attempts: Sequence[Any],
    output: str | None,
    summary: dict,
    all_events: Sequence[Any],
    frequent: frozenset[str],
) -> dict:
    return {
        "run": record.id,
        "task": record.task,
        "status": record.status,
        "created": record.created,
        "ended": record.ended,
        "inputs": record.inputs,
        "output": output,
        "error": record.error,
        "checkpoint_uri": record.checkpoint_uri,
        "attempts": [
            {
                "number": a.number,
                "status": a.status,
                "exit_code": a.exit_code,
                "started": a.started,
                "ended": a.ended,
                "error": a.error,
                "log_dir": a.log_dir,
                "restarts": summary["restarts"].get(str(a.number), 0),
                "rounds": [r for r in summary["rounds"] if r["attempt"] == a.number],
            }
            for a in attempts
        ],
        "goodput": summary["goodput"],
        "lost": summary["lost"],
        "events": [
            {"time": e.time, "attempt": e.attempt, "kind": e.kind, "message": e.message}
            for e in all_events
            if e.kind not in frequent
        ],
    }


def _resolve_run(records: RunRecords | None, ref: str) -> RunRecord:
    """The run with id ``ref``, else the one run whose id starts with it."""
    if records is not None:
        exact = records.get_run(ref)
        if exact is not None:
            return exact
        matches = records.find_runs(ref) if ref else []
        if len(matches) == 1:
            return matches[0]
        if matches:
            shown = "\n".join(
                f"  {m.id}  {m.task}  {m.status}  {_local_time(m.created)}" for m in matches[:20]
            )
            more = f"\n  ... and {len(matches) - 20} more" if len(matches) > 20 else ""
            raise CliError(f"{ref!r} matches {len(matches)} runs; give more of the id:\n{shown}{more}", 2)
    raise CliError(f"no run matches {ref!r} (home: {config.home()}); `stalwart runs` lists them", 1)


def _print_checkpoints(uri: str | None) -> None:
    if not uri:
        print("Checkpoints: no checkpoint store recorded")
        return
    try:
        from ..checkpoint.task import Checkpoint

        infos = Checkpoint(uri, storage_options=config.storage_options_from_env()).list()
    except Exception as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"Checkpoints: could not list {uri}: {type(exc).__name__}: {message[:300]}")
        return
    _print_table(
        ["name", "attempt", "kind", "size", "created"],
        [[i.name, str(i.attempt), i.kind, _size(i.size), _local_time(i.created)] for i in infos],
        title="Checkpoints",
        empty="Checkpoints: none saved",
    )


def _print_logs(attempts: Sequence[Any]) -> None:
    from ..runtime.protocol import STDERR_FILE, STDOUT_FILE

    for attempt in attempts:
        for name in (STDOUT_FILE, STDERR_FILE):
            print()
            if not attempt.log_dir:
                print(f"--- attempt {attempt.number} {name}: no log directory recorded ---")
                continue
            path = Path(attempt.log_dir) / name
            if not path.exists():
                print(f"--- attempt {attempt.number} {name}: missing ({path}) ---")
                continue
            lines, more = _tail_lines(path, LOG_TAIL_LINES)
            if more:
                scope = f"last {len(lines)} lines"
            else:
                scope = f"{len(lines)} line{'s' * (len(lines) != 1)}" if lines else "empty"
            print(f"--- attempt {attempt.number} {name} ({scope}) ---")
            for line in lines:
                print(line)


def _tail_lines(path: Path, count: int, block: int = 65536) -> tuple[list[str], bool]:
    """The last ``count`` lines of a file, read from its end (logs can be large); (lines, more before)."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        position = fh.tell()
        data = b""
        while position > 0 and data.count(b"\n") <= count and len(data) < 16 * 2**20:
            step = min(block, position)
            position -= step
            fh.seek(position)
            data = fh.read(step) + data
    lines = data.decode("utf-8", errors="replace").splitlines()
    more = position > 0 or len(lines) > count
    return lines[-count:], more


def _print_table(
    headers: list[str],
    rows: list[list[str]],
    *,
    title: str | None = None,
    status_column: int | None = None,
    empty: str | None = None,
) -> None:
    """A rich table on a terminal; plain aligned columns when piped, for grep and scripts."""
    if not rows and empty is not None:
        print(empty)
        return
    rows = [[" ".join(str(cell).split()) for cell in row] for row in rows]  # one line per row
    if _is_terminal():
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(title=title, title_justify="left", title_style="bold", header_style="bold")
        for header in headers:  # short fixed-width columns never wrap; the rest fold when narrow
            table.add_column(header, overflow="fold", no_wrap=header in _SHORT_COLUMNS)
        for row in rows:
            table.add_row(
                *(
                    Text(cell, style=_STATUS_STYLES.get(cell, "") if index == status_column else "")
                    for index, cell in enumerate(row)
                )
            )
        Console().print(table)
        return
    if title:
        print(title)
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _local_time(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _event_time(timestamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp)) + f".{int(timestamp % 1 * 1000):03d}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _so_far(started: float) -> str:
    return f"{_duration(max(0.0, time.time() - started))} so far"


def _run_duration(record: RunRecord) -> str:
    if record.ended is not None:
        return _duration(record.duration)
    return _so_far(record.created) if record.status == "running" else "-"


def _exit_text(code: int | None) -> str:
    if code is None:
        return "-"
    if code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            return str(code)
    return str(code)


def _fine_duration(seconds: float) -> str:
    """Seconds a save or a restore took: milliseconds below 10 s."""
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else _duration(seconds)


def _size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
