"""Where replicas go, and how a rank names its node and its address to its peers.

A ring of nodes (DESIGN decision 4): rank r's replicas go to the ranks with r's local index on the next
``replicas`` nodes, so any node count >= 2 works (ML Flashpoint's pairing of node i with i XOR 1 needs an
even count). Nodes are told apart by a node key, and peers reach a rank at its replication host.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from .. import config
from ..checks import int_at_least

__all__ = ["Peer", "RingPlacement", "node_key", "replica_host"]


@dataclass(frozen=True)
class Peer:
    """A rank of the job as the replication layer sees it."""

    rank: int
    node: str  # ranks with the same node key share a flash root
    address: tuple[str, int]


class RingPlacement:
    """Replicas on the next ``replicas`` nodes of a ring, same local index (a small, replaceable strategy)."""

    def __init__(self, replicas: int = 1) -> None:
        int_at_least("replicas", replicas, 0)
        self.replicas = replicas

    def nodes(self, peers: list[Peer]) -> list[list[int]]:
        """Ranks per node, nodes ordered by their lowest rank."""
        by_node: dict[str, list[int]] = {}
        for peer in sorted(peers, key=lambda p: p.rank):
            by_node.setdefault(peer.node, []).append(peer.rank)
        return sorted(by_node.values(), key=lambda ranks: ranks[0])

    def targets(self, rank: int, peers: list[Peer]) -> list[int]:
        nodes = self.nodes(peers)
        home = next(i for i, ranks in enumerate(nodes) if rank in ranks)
        index = nodes[home].index(rank)
        count = min(self.replicas, len(nodes) - 1)
        return [
            nodes[(home + k) % len(nodes)][index % len(nodes[(home + k) % len(nodes)])]
            for k in range(1, count + 1)
        ]

    def sources(self, rank: int, peers: list[Peer]) -> list[int]:
        """The ranks whose replicas ``rank`` receives."""
        return [p.rank for p in peers if rank in self.targets(p.rank, peers)]


def replica_host() -> str:
    """The address peers reach this process at: STALWART_REPLICATION_HOST, else loopback when the job's
    master is local, else the address of the interface that routes to the master."""
    explicit = config.replication_host()
    if explicit:
        return explicit
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        resolved = socket.gethostbyname(master)
    except OSError:
        return "127.0.0.1"
    if resolved.startswith("127.") or resolved == socket.gethostbyname(socket.gethostname()):
        return "127.0.0.1" if resolved.startswith("127.") else resolved
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # no packet is sent by connect()
        probe.connect((resolved, 9))
        return probe.getsockname()[0]


def node_key() -> str:
    """Ranks with the same key share a flash root: STALWART_NODE, else torch elastic's GROUP_RANK, else the
    host name."""
    return config.node_name() or os.environ.get("GROUP_RANK") or socket.gethostname()
