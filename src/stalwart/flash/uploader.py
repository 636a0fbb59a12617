"""The durable copy off the training path: one upload at a time, the newest step waiting, failures as lag.

A durable outage must cost neither a flash save nor memory (DESIGN decision 11). The engine hands each
durable step over and goes on. While one upload runs, the newest step handed over waits; an older one
still waiting is dropped (the newer one holds everything it had), so however long the store is down at
most two steps are held for it: the one uploading and the newest waiting. A failed upload is a warning
that says how far the durable copy lags; it becomes an error at ``wait()``/``close()``, or at the next
save with ``on_error="raise"``. Retention of the durable store runs here too, between two uploads of
this rank, which is what lets it collect what killed uploads left behind.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from ..runtime import events
from .durable import DurableTier
from .errors import FlashError
from .layout import CommitRecord

if TYPE_CHECKING:
    from .buffers import Buffer
    from .shelf import RankShelf

__all__ = ["DurableUploader"]

log = logging.getLogger(__name__)

ON_ERROR = ("warn", "raise")


class DurableUploader:
    """Uploads one rank's committed steps to a DurableTier, pinning each step's buffer until it is sent."""

    def __init__(
        self, durable: DurableTier, shelf: RankShelf, world_size: int, *, on_error: str = "warn"
    ) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_durable_error={on_error!r} is not accepted; use one of {ON_ERROR}")
        self.durable, self.shelf, self.world_size, self.on_error = durable, shelf, world_size, on_error
        self.rank = shelf.rank
        self.uploaded: int | None = None  # the newest step this rank copied to the store
        self.requested: int | None = None  # the newest step handed over
        self._failure: tuple[int, BaseException] | None = None  # the newest failure not made good since
        self._reported = True
        self._cond = threading.Condition()
        self._pending: tuple[CommitRecord, Buffer] | None = None
        self._busy = False
        self._closed = False
        self._io = threading.Lock()  # one upload (and retention) at a time, sync or background
        self._thread = threading.Thread(target=self._run, name="stalwart-durable", daemon=True)
        self._thread.start()

    @property
    def lag(self) -> int:
        """Steps of training the durable copy does not hold yet (0 when it is up to date)."""
        if self.requested is None:
            return 0
        return self.requested - (self.uploaded or 0)

    def submit(self, record: CommitRecord) -> None:
        """Upload ``record``'s step in the background; a step still waiting is dropped for it."""
        buffer = self.shelf.pin(record.step)
        with self._cond:
            dropped, self._pending = self._pending, (record, buffer)
            self.requested = max(record.step, self.requested or 0)
            self._cond.notify_all()
        if dropped is not None:
            log.warning(
                "flash: durable copy of step %d of rank %d skipped: step %d came before it could be uploaded "
                "(the store is slower than durable saves; the durable copy lags %d step(s))",
                dropped[0].step,
                self.rank,
                record.step,
                self.lag,
            )
            self._release(dropped[0].step)

    def upload_now(self, record: CommitRecord) -> None:
        """Upload ``record``'s step before returning (sync saves); a failure is handled as in the
        background."""
        buffer = self.shelf.pin(record.step)
        with self._cond:
            self.requested = max(record.step, self.requested or 0)
        try:
            self._upload(record, buffer)
        finally:
            self._release(record.step)

    def check(self) -> None:
        """With ``on_error="raise"``: raise a failure not raised yet."""
        if self.on_error == "raise":
            self._raise_failure()

    def drain(self, timeout: float | None = None) -> bool:
        """Block until nothing waits or uploads; False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending is None and not self._busy, timeout)

    def wait(self, timeout: float | None = None) -> None:
        """Block until nothing waits or uploads; raise a failure not raised yet (the copy lags)."""
        if not self.drain(timeout):
            log.warning("flash: the durable copy is still uploading after %.0f s", timeout)
        self._raise_failure()

    def restart_at(self, step: int | None, durable_steps: frozenset[int]) -> None:
        """A restore cut the timeline at ``step``: what was asked or failed after it no longer counts."""
        with self._cond:
            held = [s for s in durable_steps if step is not None and s <= step]
            self.uploaded = max(held, default=None)
            self.requested = step if step is not None and self.uploaded is not None else None
            self._failure, self._reported = None, True

    def close(self) -> None:
        try:
            self.wait()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self._thread.join(timeout=10)

    def collect_leftovers(self) -> None:
        """Collect what killed uploads of this rank left in the store (call it while nothing uploads)."""
        with self._io:
            try:
                self.durable.collect_leftovers(self.rank)
            except Exception as exc:  # housekeeping: retried after the next upload
                log.warning("flash: collecting leftovers in %s failed: %s", self.durable.url, exc)

    # the background thread

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                (record, buffer), self._pending = self._pending, None
                self._busy = True
            try:
                self._upload(record, buffer)
            finally:
                try:
                    self._release(record.step)
                except Exception as exc:  # the thread must live on: wait() and load() count on it
                    log.warning("flash: releasing step %d after its upload failed: %s", record.step, exc)
                finally:
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()

    def _upload(self, record: CommitRecord, buffer: Buffer) -> None:
        with self._io:
            started = time.monotonic()
            try:
                self.durable.upload(record, buffer.view)
            except Exception as exc:
                events.record("durable_failed", step=record.step, error=f"{type(exc).__name__}: {exc}"[:300])
                with self._cond:
                    self._failure, self._reported = (record.step, exc), False
                log.warning(
                    "flash: the durable copy of step %d of rank %d to %s failed: %s; flash saves go on, and "
                    "the durable copy lags %d step(s) (newest durable step of this rank: %s)",
                    record.step,
                    self.rank,
                    self.durable.url,
                    exc,
                    self.lag,
                    self.uploaded,
                )
                return
            with self._cond:
                self.uploaded = max(record.step, self.uploaded or 0)
                if self._failure is not None and self._failure[0] <= record.step:
                    self._failure, self._reported = None, True  # made good by a newer copy
            log.info("flash: step %d of rank %d uploaded to %s", record.step, self.rank, self.durable.url)
            events.record(
                "durable_upload",
                step=record.step,
                bytes=record.objects[0]["size"],
                seconds=round(time.monotonic() - started, 6),
            )
            try:
                self.durable.prune(self.rank, self.world_size)
            except Exception as exc:  # housekeeping: never fail a copy that committed
                log.warning("flash: durable retention in %s failed: %s", self.durable.url, exc)

    def _release(self, step: int) -> None:
        self.shelf.unpin(step)
        self.shelf.retain()

    def _raise_failure(self) -> None:
        with self._cond:
            if self._failure is None or self._reported:
                return
            self._reported = True
            step, exc = self._failure
        raise FlashError(
            f"the durable copy of flash step {step} of rank {self.rank} to {self.durable.url} failed: {exc} "
            f"(the flash save was made; the durable copy lags {self.lag} step(s))"
        ) from exc
