"""The memory-first checkpoint tier: state in pre-faulted tmpfs buffers, committed per rank per step.

Read a save from the top down: ``checkpointer`` (policy: when, where) -> ``engine`` (save, load,
background commit, the durable copy) -> ``rankstore`` (one rank's objects: commit order, retention,
verification) -> ``copier`` (the one copy, with checksums) -> ``buffers`` (the mmap'd pool) and
``layout`` (names on disk); ``objects`` is the byte format and ``board`` says which steps are safe.
Several nodes: ``cluster`` (joining, recovery) over ``replication`` (placement, server, sender) and
``transport`` (the authenticated wire). ``durable`` is the fsspec copy, ``dcp`` the
torch.distributed.checkpoint adapter.
"""
