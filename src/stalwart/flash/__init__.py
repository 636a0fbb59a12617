"""The memory-first checkpoint tier: state in pre-faulted tmpfs buffers, committed per rank per step.

Read a save from the top down: ``checkpointer`` (policy: when, where) -> ``engine`` (save, load,
background commit, retention) -> ``copier`` (the one copy, with checksums) -> ``buffers`` (the mmap'd
pool) and ``layout`` (names on disk); ``objects`` is the byte format, ``durable`` the fsspec copy and
``dcp`` the torch.distributed.checkpoint adapter.
"""
