"""Progress bars for checkpoint uploads and downloads.

Multi-gigabyte checkpoint transfers can take minutes; a bar tells an interactive user the job is not hung.
In logs, CI and small transfers a bar is noise, so it is shown only for large transfers to a terminal, and
everything else gets a no-op object with the same interface. rich is imported only when a bar is drawn.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import IO, Any

from .. import config
from ..config import NO_PROGRESS_ENV

__all__ = ["DEFAULT_THRESHOLD", "NO_PROGRESS_ENV", "TransferProgress", "transfer_progress"]

DEFAULT_THRESHOLD = 64 * 2**20

# Two live bars on one terminal garble each other (and rich refuses two live displays per console), so
# concurrent transfers, e.g. uploads on background threads, get a bar only for the first one.
_ACTIVE_BAR = threading.Lock()


class TransferProgress:
    """Progress sink for one transfer. The base class only counts bytes; it is the no-op without a bar."""

    enabled = False

    def __init__(self, description: str, total_bytes: int) -> None:
        self.description = description
        self.total_bytes = total_bytes
        self.completed = 0
        self._lock = threading.Lock()

    def update(self, nbytes: int) -> None:
        """Record ``nbytes`` more bytes transferred (negative values rewind, e.g. a restarted transfer)."""
        with self._lock:
            self.completed += nbytes
        self._advance(nbytes)

    def _advance(self, nbytes: int) -> None:
        pass

    def _finish(self) -> None:
        pass


class _RichTransferProgress(TransferProgress):
    enabled = True

    def __init__(self, description: str, total_bytes: int, progress: Any, task_id: Any) -> None:
        super().__init__(description, total_bytes)
        self._progress = progress
        self._task_id = task_id

    def _advance(self, nbytes: int) -> None:
        self._progress.update(self._task_id, advance=nbytes)

    def _finish(self) -> None:
        # The transfer succeeded: show it as complete even if the source under-reported bytes.
        if self.completed < self.total_bytes:
            self._progress.update(self._task_id, completed=self.total_bytes)


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or closed
        return False


def _bar_wanted(total_bytes: int, threshold: int, stream: Any) -> bool:
    return total_bytes >= threshold and config.progress_bars() and _is_tty(stream)


@contextlib.contextmanager
def transfer_progress(
    description: str,
    total_bytes: int,
    *,
    threshold: int = DEFAULT_THRESHOLD,
    stream: IO[str] | None = None,
) -> Iterator[TransferProgress]:
    """Context manager yielding a :class:`TransferProgress` to ``update()`` as bytes move.

    A rich bar (bytes, speed, ETA) is drawn on ``stream`` (default: stderr) only if ``total_bytes >=
    threshold``, the stream is a terminal, ``STALWART_NO_PROGRESS`` is unset or empty, and no other bar is
    live; otherwise the yielded object is a cheap no-op. On a clean exit the bar is drawn as complete.
    """
    for name, value in (("total_bytes", total_bytes), ("threshold", threshold)):
        if not isinstance(value, int):
            raise TypeError(f"{name} must be an int number of bytes, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    out = sys.stderr if stream is None else stream
    if not _bar_wanted(total_bytes, threshold, out) or not _ACTIVE_BAR.acquire(blocking=False):
        yield TransferProgress(description, total_bytes)
        return
    try:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(file=out, force_terminal=True),
            # Swapping sys.stdout/sys.stderr is unsafe when transfers run on background threads.
            redirect_stdout=False,
            redirect_stderr=False,
        )
        with progress:
            bar = _RichTransferProgress(
                description, total_bytes, progress, progress.add_task(description, total=total_bytes)
            )
            yield bar
            bar._finish()
    finally:
        _ACTIVE_BAR.release()
