"""What the DCP writer and reader share: checkpoint ids as steps, where an item lives, and the global
metadata riding in the coordinator's object.

Every rank's items go into one flash object per step. The coordinator's object is committed last, once
DCP's ``finish`` hands it the global metadata, and carries that metadata in its own (checksummed)
meta region: so "every rank committed" already means "the metadata exists", and the metadata moves
with that object wherever it goes (replicas on peer nodes, the durable copy) with nothing else to
keep in step.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..objects import CorruptObjectError, load_meta

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

    from ..layout import FlashLayout

__all__ = ["FORMAT", "FlashItem", "is_step_id", "metadata_of", "skeleton", "step_of"]

FORMAT = "stalwart-dcp/1"  # the skeleton of a DCP object names it, so other objects are told apart
_STEP_DIR = re.compile(r"(^|/)step-(\d{12})/?$")


@dataclass(frozen=True)
class FlashItem:
    """Where one DCP write item lives: in ``rank``'s object, ``length`` bytes from ``offset``."""

    rank: int
    offset: int
    length: int
    dtype: str | None  # None for bytes items
    shape: tuple[int, ...] | None


def step_of(checkpoint_id: object, layout: FlashLayout | None = None) -> int:
    """The step a checkpoint id names: an int, digits, or a step directory (of this job, if given)."""
    if isinstance(checkpoint_id, int) and not isinstance(checkpoint_id, bool) and checkpoint_id >= 0:
        return checkpoint_id
    if isinstance(checkpoint_id, str) and checkpoint_id.isdigit():
        return int(checkpoint_id)
    if isinstance(checkpoint_id, (str, os.PathLike)):
        path = Path(checkpoint_id)
        match = _STEP_DIR.search(path.as_posix())
        if match and (layout is None or path.parent.resolve() == layout.steps_dir.resolve()):
            return int(match.group(2))  # a step directory (of this job, when a layout is given)
    where = f" under {layout.steps_dir}" if layout is not None else ""
    raise ValueError(
        f"checkpoint_id={checkpoint_id!r} is not a flash step; use an int step or a step directory{where} "
        "such as writer.step_dir(100)"
    )


def is_step_id(checkpoint_id: object) -> bool:
    """Whether a checkpoint id names a flash step (DCP's ``validate_checkpoint_id``)."""
    try:
        step_of(checkpoint_id)
    except ValueError:
        return False
    return True


def skeleton(metadata: bytes | None) -> dict[str, Any]:
    """The skeleton of a rank's DCP object: the coordinator's carries the pickled global metadata."""
    return {"format": FORMAT} if metadata is None else {"format": FORMAT, "metadata": metadata}


def metadata_of(meta: bytes, where: str) -> Metadata:
    """The global DCP metadata carried by a coordinator object (``meta``: its verified metadata)."""
    found, _ = load_meta(meta)
    if not isinstance(found, dict) or found.get("format") != FORMAT:
        raise ValueError(
            f"{where} was not saved through FlashStorageWriter (a FlashCheckpointer object?); load it "
            "with the API that saved it"
        )
    if "metadata" not in found:
        raise CorruptObjectError(f"{where} is a DCP object without the global metadata")
    return pickle.loads(found["metadata"])
