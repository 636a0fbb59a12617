"""``torch.distributed.checkpoint`` storage on the flash tier, on one node or many:
``FlashStorageWriter`` and ``FlashStorageReader`` for ``dcp.save``, ``dcp.async_save`` and ``dcp.load``.

DCP plans what each rank writes; the writer puts all of a rank's items into one flash object of the
step (one copy, chunk checksums, commit record last), through the same engine ``FlashCheckpointer``
uses: replicas on peer nodes in a ring, a durable copy every few steps, retention that drops a step
only once a newer one is whole. The coordinator commits its object last, carrying DCP's global
metadata (``steps``), so a step is complete exactly when every rank's object is committed somewhere.

Reading finds the newest whole step across the nodes and the durable store (or the one asked for),
and each rank obtains the objects its read plan touches from the cheapest tier that holds them intact:
its node's tmpfs, a peer node, the durable store. Any rank may read any rank's object, so DCP's
planner reshards between world sizes and mesh shapes as it does with ``FileSystemReader``.
"""

from .reader import FlashStorageReader
from .steps import FlashItem
from .writer import FlashStorageWriter

__all__ = ["FlashItem", "FlashStorageReader", "FlashStorageWriter"]
