"""The memory-first checkpoint tier: state in pre-faulted tmpfs buffers, committed per rank per step.

Read a save from the top down: ``checkpointer`` (policy: when, where) -> ``engine`` (save, load,
background commit) -> ``shelf`` (one rank's objects in tmpfs: commit order, retention, verification)
-> ``copier`` (the one copy, with checksums) -> ``buffers`` (the mmap'd pool) and ``layout`` (names
on disk); ``tree`` turns a state dict into tensors and a skeleton, ``objects`` is the byte format
(sizes, sealing, verification), ``board`` says which steps are safe, ``capacity`` what a
configuration needs, ``errors`` what is raised. A restore: ``restore`` (the newest step any tier holds
intact). Several nodes: ``cluster`` (joining, pulls) over ``placement`` (the ring),
``replica_server`` (what a node keeps and serves for its peers), ``replication`` (the sender, pulls),
``transport`` (the authenticated wire) and ``acceptor`` (handshakes of unknown clients). The durable
copy: ``uploader`` (one at a time, failures as lag) over ``durable`` (the fsspec format). ``dcp`` is the
torch.distributed.checkpoint adapter.
"""
