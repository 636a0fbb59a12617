"""Which steps are safe to build on: every rank committed them (and, with replication, every rank's
replicas are committed on their peers). Retention asks the board before it drops an older step.

One node: the commit records in the shared step directory are the board. Many nodes: no node sees
another's files, so ranks post facts to the job's torch.distributed store (a key per rank per step,
idempotent). Keys live under a generation token that changes at every restore, so facts about steps
of an abandoned timeline never count for the steps saved after it.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from .layout import FlashLayout

__all__ = ["Board", "LocalBoard", "StoreBoard"]

log = logging.getLogger(__name__)


class Board(Protocol):
    world_size: int

    def committed(self, step: int, rank: int) -> None: ...

    def replicated(self, step: int, rank: int) -> None: ...

    def gave_up(self, step: int, rank: int) -> None: ...

    def safe(self, step: int) -> bool: ...

    def new_generation(self, token: str) -> None: ...


class LocalBoard:
    """One node, no replication: a step is safe once every rank's commit record is in its directory."""

    def __init__(self, layout: FlashLayout, world_size: int) -> None:
        self.layout, self.world_size = layout, world_size

    def committed(self, step: int, rank: int) -> None:
        pass  # the commit record itself is the fact

    def replicated(self, step: int, rank: int) -> None:
        pass

    def gave_up(self, step: int, rank: int) -> None:
        pass

    def safe(self, step: int) -> bool:
        return self.layout.is_complete(step, self.world_size)

    def new_generation(self, token: str) -> None:
        pass


class StoreBoard:
    """Many nodes: facts as keys in the job's c10d store (a clone of the client, safe off the main thread)."""

    def __init__(
        self, store: Any, job_id: str, world_size: int, *, replicated: bool, generation: str
    ) -> None:
        self.store = store
        self.job_id, self.world_size, self.needs_replicas = job_id, world_size, replicated
        self.generation = generation

    def _key(self, kind: str, step: int, rank: int) -> str:
        return f"stalwart/flash/{self.job_id}/{self.generation}/{kind}/{step}/{rank}"

    def committed(self, step: int, rank: int) -> None:
        self.store.set(self._key("c", step, rank), "1")

    def replicated(self, step: int, rank: int) -> None:
        self.store.set(self._key("r", step, rank), "1")

    def gave_up(self, step: int, rank: int) -> None:
        """The rank could not replicate ``step``: it counts as kept without its replicas, so that
        retention goes on and a replication outage does not fill tmpfs step after step."""
        self.store.set(self._key("u", step, rank), "1")

    def safe(self, step: int) -> bool:
        ranks = range(self.world_size)
        try:
            if not self.store.check([self._key("c", step, rank) for rank in ranks]):
                return False
            if not self.needs_replicas or self.store.check([self._key("r", step, rank) for rank in ranks]):
                return True
            return all(
                self.store.check([self._key("r", step, rank)])
                or self.store.check([self._key("u", step, rank)])
                for rank in ranks
            )
        except Exception as exc:  # the store is gone (job ending): nothing is known to be safe
            log.debug("flash board: store check failed: %s", exc)
            return False

    def new_generation(self, token: str) -> None:
        self.generation = token
