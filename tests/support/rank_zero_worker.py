"""A gloo rank for tests/integrations/test_integration_lightning_wrap.py (no framework import: fast)."""

from __future__ import annotations

import json
from pathlib import Path

from processes import init_gloo

from stalwart.integrations import from_rank_zero


def ask(rank: int, port: int, out: str) -> None:
    """Asks rank 0 for a value, then for one whose making fails on rank 0; writes what it got."""
    init_gloo(rank, 2, port)
    got = from_rank_zero(lambda: {"step": 35, "rank": rank}, "a value")
    try:
        from_rank_zero(lambda: 1 / 0, "the checkpoint to resume from")
        raised = None
    except Exception as exc:
        raised = f"{type(exc).__name__}: {exc}"
    Path(out, f"{rank}.json").write_text(json.dumps({"got": got, "raised": raised}))
