"""What the flash tier raises, in one place, so a training loop can catch it by name.

``FlashError`` is the root: catching it catches every other. ``FlashSpaceError`` is also an ``OSError``
(ENOSPC), as code that handles a full disk expects.
"""

from __future__ import annotations

__all__ = ["FlashError", "FlashRestoreError", "FlashSpaceError"]


class FlashError(RuntimeError):
    """A flash save or restore failed (a background failure is raised by the next call)."""


class FlashSpaceError(OSError, FlashError):
    """The flash root has no room for a buffer or a commit record; nothing committed was touched."""


class FlashRestoreError(FlashError):
    """A checkpoint exists, but no tier could read it: restoring nothing would silently lose progress.

    Raised on every rank of the job alike, so no rank is left waiting in a collective.
    """
