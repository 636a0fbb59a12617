"""This rank's view of a flash job spread over several nodes: peers, the board, replication, recovery.

Joining is collective (every rank constructs its engine at the same point): rank 0 draws the job
secret and a board generation, every rank starts its replication server, and the ranks gather each
other's addresses and node keys. On one node nothing of this is needed and ``join`` returns None.

Recovery (driven by ``restore``): every rank reports the (step, rank) objects its node holds, own or
replica; a step is whole when every rank's object exists somewhere, and a rank that lacks its own pulls
it from a node that has it. A replaced node with an empty flash root holds nothing and so never vetoes
a step its peers can serve.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .board import StoreBoard
from .copier import Copier
from .layout import FlashLayout
from .objects import CorruptObjectError
from .placement import Peer, RingPlacement, node_key, replica_host
from .recovery import Head, Landing, fetch_head, receive
from .replica_server import ReplicaKeeper, ReplicationServer
from .replication import Replicator, lower_priority, pull
from .shelf import RankShelf

__all__ = ["Cluster", "Introduction", "listen"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Introduction:
    """What a rank must know of the others to take its place in a job spread over nodes: the job secret
    (peers authenticate with it), the board generation, and every rank's node and replication address.
    Gathered by ``Cluster.join``, or drawn by DCP's coordinator from the ranks' plans."""

    secret: bytes = field(repr=False)
    generation: str
    members: tuple[tuple[str, tuple[str, int]], ...]  # rank -> (node key, address of its server)

    @property
    def token(self) -> str:
        """Names this formation (ranks formed from the same introduction can work together)."""
        return self.generation

    @classmethod
    def draw(cls, members: list[tuple[str, tuple[str, int]]]) -> Introduction:
        return cls(
            secrets.token_bytes(32), secrets.token_hex(8), tuple((n, (a[0], a[1])) for n, a in members)
        )


def listen() -> socket.socket:
    """A socket bound for this rank's replication server, whose address can be told to peers before the
    job secret is known (connections wait in its backlog until the server serves them)."""
    return socket.create_server((replica_host(), 0))


class Cluster:
    def __init__(
        self,
        layout: FlashLayout,
        rank: int,
        peers: list[Peer],
        secret: bytes,
        server: ReplicationServer,
        board: StoreBoard,
        placement: RingPlacement,
        copier: Copier,
    ) -> None:
        self.layout, self.rank, self.peers, self.secret = layout, rank, peers, secret
        self.server, self.board, self.placement, self.copier = server, board, placement, copier
        self.replicator: Replicator | None = None
        self.node = peers[rank].node
        self.recovered: tuple[int, list[int]] | None = None  # the last step recover() landed, and from whom

    @classmethod
    def join(
        cls,
        layout: FlashLayout,
        rank: int,
        world_size: int,
        group: Any,
        copier: Copier,
        placement: RingPlacement,
    ) -> Cluster | None:
        """Collective: returns None when every rank is on one node (the local commit files suffice)."""
        if world_size == 1:
            return None
        secret, generation = group.gather(
            (secrets.token_bytes(32), secrets.token_hex(8)) if rank == 0 else None
        )[0]
        listener = listen()
        members = group.gather((node_key(), listener.getsockname()[:2]))
        introduction = Introduction(secret, generation, tuple((node, tuple(addr)) for node, addr in members))
        return cls.form(layout, rank, introduction, listener, copier, placement)

    @classmethod
    def form(
        cls,
        layout: FlashLayout,
        rank: int,
        introduction: Introduction,
        listener: socket.socket | None,
        copier: Copier,
        placement: RingPlacement,
    ) -> Cluster | None:
        """Not collective: this rank's part of the cluster ``introduction`` describes, serving on
        ``listener`` (the socket whose address it names for this rank). None on one node."""
        world_size = len(introduction.members)
        peers = [Peer(r, node, address) for r, (node, address) in enumerate(introduction.members)]
        nodes = placement.nodes(peers)
        if len(nodes) == 1:
            if listener is not None:
                listener.close()
            if placement.replicas and rank == 0 and world_size > 1:
                log.info("flash replication is off: all %d ranks are on one node", world_size)
            return None
        if listener is None or listener.getsockname()[:2] != peers[rank].address:
            raise ValueError(
                f"rank {rank} was introduced to its peers at {peers[rank].address}, which this process does "
                "not listen on (a stale introduction: a final plan DCP's plan caching kept from before the "
                "flash engine was closed); keep the writer open between cached saves, or save without plan "
                "caching"
            )
        if placement.replicas >= len(nodes) and rank == 0:
            log.warning(
                "flash: replicas=%d with %d nodes; keeping %d", placement.replicas, len(nodes), len(nodes) - 1
            )
        host = peers[rank].address[0]
        server = ReplicationServer(layout, introduction.secret, copier, host, listener=listener)
        try:
            import torch.distributed.distributed_c10d as c10d

            store = c10d._get_default_store().clone()  # type: ignore[attr-defined]  # its own client: used off the main thread
            board = StoreBoard(
                store,
                layout.job_id,
                world_size,
                replicated=placement.replicas > 0,
                generation=introduction.generation,
            )
        except BaseException:
            server.close()
            raise
        return cls(layout, rank, peers, introduction.secret, server, board, placement, copier)

    def start(self, shelf: RankShelf, keep: int) -> None:
        """Serve and keep replicas of this rank's sources; replicate this rank's objects to its targets."""
        for source in self.placement.sources(self.rank, self.peers):
            self.server.keepers[source] = ReplicaKeeper(self.layout, source, keep, self.board)
        targets = [self.peers[t] for t in self.placement.targets(self.rank, self.peers)]
        if targets:
            self.replicator = Replicator(
                self.layout,
                self.rank,
                targets,
                self.secret,
                self.board,
                shelf.pin,
                shelf.unpin,
                on_done=shelf.retain,
            )

    # recovery

    def holders(self, shelf: RankShelf, group: Any) -> dict[tuple[int, int], list[int]]:
        """Collective: which ranks' nodes hold a committed object of (step, rank), own or replica."""
        holders: dict[tuple[int, int], list[int]] = {}
        for holder, items in enumerate(group.gather(shelf.holdings())):
            for step, rank in items:
                holders.setdefault((step, rank), []).append(holder)
        return holders

    def whole_steps(self, holders: dict[tuple[int, int], list[int]]) -> set[int]:
        """Steps whose every rank's object exists on some node."""
        world = len(self.peers)
        steps = {step for step, _ in holders}
        whole = {step for step in steps if all((step, rank) in holders for rank in range(world))}
        if steps and not whole:
            log.warning(
                "flash: no step is whole across the nodes of this job (an object of every step is missing)"
            )
        return whole

    def recover(
        self,
        step: int,
        holders: list[int],
        land: Callable[[Head], Landing],
        *,
        rounds: int = 3,
        rank: int | None = None,
    ) -> tuple[Landing | None, list[tuple[str, str]]]:
        """This rank's object of ``step`` (or ``rank``'s, saved by another world size: ``reshard``) from
        the nodes that hold it, straight into the caller's tensors
        (``recovery``): its head from one of them, then ``land(head)`` says where each byte goes, then
        the data comes from all of them at once, verified chunk by chunk.

        A peer that does not answer is asked again (``rounds`` times, backing off): under load a pull may
        time out, and giving up would restore an older step. Returns the filled landing, or None and what
        each peer said ("corrupt" or "error", with a message). ``land`` raises ``UnfitState`` when the
        caller's state cannot take the object.
        """
        source = self.rank if rank is None else rank
        remote = [h for h in holders if self.peers[h].node != self.node]
        problems: dict[int, tuple[str, str]] = {}
        head: Head | None = None
        for attempt in range(rounds):
            for holder in remote:
                if problems.get(holder, ("",))[0] == "corrupt":
                    continue  # its copy is bad: asking again would not help
                peer = self.peers[holder]
                try:
                    head = fetch_head(peer, step, source, self.secret)
                    break
                except CorruptObjectError as exc:
                    problems[holder] = ("corrupt", f"the copy on rank {holder}: {exc}")
                except (OSError, ValueError) as exc:
                    problems[holder] = ("error", f"pulling from rank {holder} ({peer.node}) failed: {exc}")
                    log.warning("flash: pulling step %d from rank %d failed: %s", step, holder, exc)
            if head is not None or all(kind == "corrupt" for kind, _ in problems.values()):
                break
            if attempt < rounds - 1:
                time.sleep(0.5 * 2**attempt)
        if head is None:
            return None, list(problems.values())
        try:
            landing = land(head)
        except CorruptObjectError as exc:  # a head consistent with its checksums, not with itself
            return None, [*problems.values(), ("corrupt", f"the copy on rank {holder}: {exc}")]
        usable = [h for h in remote if problems.get(h, ("",))[0] != "corrupt"]
        started = time.perf_counter()
        ok, more = receive(
            {h: self.peers[h] for h in usable}, usable, head, landing, self.secret, rounds=rounds
        )
        if not ok:
            return None, [p for p in problems.values() if p[0] == "corrupt"] + more
        log.info(
            "flash: rank %d recovered step %d%s from %s in %.3f s",
            self.rank,
            step,
            "" if source == self.rank else f" (saved rank {source}'s object)",
            ", ".join(f"rank {h} ({self.peers[h].node})" for h in usable),
            time.perf_counter() - started,
        )
        if source == self.rank:  # another world's object is restored, never kept (``reshard``)
            self.recovered = (step, usable)
        return landing, []

    def reseed(self, shelf: RankShelf, step: int, holders: list[int], current: Callable[[], bool]) -> None:
        """Pull this rank's object of ``step`` again, into a pool buffer, and make it this rank's own while
        ``current()`` (the step is still the one training went on from, and nothing newer was saved here).
        Run in the background after a recovery landed in the caller's tensors: until then the node holds
        no copy of its own, and losing the peer would lose the step."""
        lower_priority()
        for holder in holders:
            try:
                record, verified = pull(self.peers[holder], step, self.rank, self.secret, shelf, self.copier)
            except (OSError, ValueError) as exc:
                log.warning("flash: re-seeding step %d from rank %d failed: %s", step, holder, exc)
                continue
            with shelf.mutex:
                if current() and not any(s >= step for s in shelf.own):
                    shelf.adopt_pulled(verified, record)
                    log.info("flash: rank %d holds step %d in tmpfs again", self.rank, step)
                    return
                shelf.release(verified.buffer)
                return
        log.warning(
            "flash: rank %d holds no copy of step %d in tmpfs (its peers do) until its next save",
            self.rank,
            step,
        )

    def after_restore(self, step: int | None, group: Any, generation: str | None = None) -> None:
        """Collective (unless the ranks agreed on the new ``generation`` already): facts posted before the
        restore belong to another timeline; replicas of steps after the restored one are dropped.

        The drop comes before the collective, which no rank leaves until every rank has dropped: a peer
        that returned first and saved at once would otherwise send a replica of the new timeline that
        this rank, still cleaning up, deleted (seen under load: a node lost, and no step whole).
        """
        for keeper in self.server.keepers.values():
            keeper.drop_other_than(lambda s: step is not None and s <= step)
        self._drop_orphans_after(step)
        if generation is None:
            generation = group.gather(secrets.token_hex(8) if self.rank == 0 else None)[0]
        self.board.new_generation(generation)

    def _drop_orphans_after(self, step: int | None) -> None:
        """Objects after ``step`` in this node's flash root that no rank here owns or keeps: after a
        restart ranks may land on other nodes, and what an earlier round left of theirs would otherwise
        be offered to the next restore as if it were of the new timeline."""
        local = [peer.rank for peer in self.peers if peer.node == self.node]
        owned = set(local).union(*(self.placement.sources(rank, self.peers) for rank in local))
        for found in self.layout.steps():
            if step is not None and found <= step:
                continue
            for rank in self.layout.commits(found):
                if rank not in owned:
                    self.layout.remove_commit(found, rank)  # record first, as every drop does
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.layout.object_path(found, rank))
            self.layout.remove_step_if_abandoned(found)

    # life cycle

    def replicate(self, record: Any) -> None:
        if self.replicator is not None:
            self.replicator.submit(record)

    def wait(self, timeout: float | None = 120.0) -> None:
        if self.replicator is not None and not self.replicator.wait(timeout):
            log.warning("flash: replication still running after %.0f s", timeout)

    def close(self) -> None:
        if self.replicator is not None:
            self.replicator.close()
        self.server.close()
