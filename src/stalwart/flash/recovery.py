"""Recovering a rank's object from peers straight into the caller's tensors.

A replaced node starts with an empty flash root. Pulling the object into a fresh tmpfs buffer and then
copying it out cost 4.6 s for 1 GiB here, most of it faulting memory the VM had not touched lately,
against 0.1 s for a local restore. The caller's tensors are already in memory, so the bytes go there:

1. the head (packed header and metadata region) comes first, checked against the commit record: it
   says where each tensor's bytes lie in the object, and the checksum of every data chunk;
2. the data region is received in pieces over several connections at once (one or more to every node
   that holds a copy; a single TCP stream over loopback moves ~2 GB/s, four move ~5 GB/s here), each
   piece into the memory it belongs in: a tensor's own bytes, or scratch for alignment padding and for
   tensors that cannot take bytes in place (not contiguous, not on the CPU);
3. every chunk is hashed as it lands, while it is in cache, and compared with its checksum. A copy
   found corrupt is never asked again; its pieces go to the other holders. Nothing is reported restored
   until every chunk is verified, and the scratch tensors are copied in only then.

The caller's tensors hold unverified bytes while this runs. A restore that then fails raises
(``FlashRestoreError``), and so does any use of those bytes: ``FlashEngine.load`` says so.
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import xxhash

from .layout import CommitRecord
from .objects import (
    PACKED_HEADER_SIZE,
    CorruptObjectError,
    Header,
    TensorEntry,
    plan_tensors,
    unpack_hashes,
    verify_header,
    verify_meta,
)
from .placement import Peer
from .replication import ask
from .transport import TIMEOUT, Connection, object_name, short, typed_int

if TYPE_CHECKING:
    import torch

__all__ = ["Head", "Landing", "UnfitState", "fetch_head", "plan_landing", "pull_head", "receive"]

log = logging.getLogger(__name__)

STREAMS = 4  # connections per recovery: enough to keep both cores busy over loopback
_PIECE = 32 * 2**20  # bytes a stream asks for at a time; its chunks are verified as they land
_SLOWEST = 4 * 2**20  # bytes per second below which a piece goes to another stream (and holder)


class UnfitState(Exception):
    """The caller's state cannot take the object (a tensor of another shape or dtype); ``__cause__``
    is the error to raise. The object itself is fine, so this is not a reason to try another step."""


@dataclass(frozen=True)
class Head:
    """A committed object's record, header, metadata and chunk checksums, verified."""

    record: CommitRecord
    header: Header
    meta: bytes  # the metadata (skeleton and tensor table), chunk checksums cut off
    hashes: tuple[int, ...]


def fetch_head(peer: Peer, step: int, rank: int, secret: bytes) -> Head:
    """The head of the object of (``step``, ``rank``) on ``peer``, checked against its commit record."""
    conn = Connection.connect(peer.address, secret)
    try:
        reply, record = ask(conn, "head", peer, step, rank)
        sizes = reply.get("header"), reply.get("meta")
        if sizes[0] != PACKED_HEADER_SIZE:
            raise ConnectionError(f"rank {peer.rank} announced a header of {short(sizes[0])} bytes")
        if not typed_int(sizes[1]) or not 0 < sizes[1] <= record.objects[0]["size"]:
            raise ConnectionError(f"rank {peer.rank} announced a meta region of {short(sizes[1])} bytes")
        raw = bytearray(PACKED_HEADER_SIZE + sizes[1])
        conn.recv_into(memoryview(raw))
    finally:
        conn.close()
    where = f"{object_name(step, rank)} from rank {peer.rank}"
    header = verify_header(bytes(raw[:PACKED_HEADER_SIZE]), record, where)
    region = bytes(raw[PACKED_HEADER_SIZE:])
    meta = verify_meta(region, header, where)
    if header.end > record.objects[0]["size"]:
        raise CorruptObjectError(f"{where}: header names {header.end} bytes, more than the object holds")
    return Head(record, header, meta, unpack_hashes(region[len(meta) :], header.chunks))


def pull_head(peer: Peer, step: int, rank: int, secret: bytes) -> bytes:
    """The verified metadata of a committed object on ``peer``, without its tensor bytes."""
    return fetch_head(peer, step, rank, secret).meta


def _writable(address: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_ubyte * nbytes).from_address(address)).cast("B")


@dataclass
class Landing:
    """Where each byte of an object's data region lands: per chunk, the memory that holds it, in order."""

    chunks: list[list[memoryview]]
    deferred: list[tuple[Any, Any]]  # (received, target): copied in once every chunk is verified
    keep: list[Any] = field(default_factory=list)  # what the views point into stays alive
    context: Any = None  # the caller's own (the engine keeps the skeleton and made tensors here)
    written: list[Any] = field(default_factory=list)  # tensors whose own memory takes bytes unverified

    def finish(self) -> None:
        """Copy what landed in scratch into its tensors (call only after ``receive`` succeeded)."""
        for source, target in self.deferred:
            target.copy_(source)


def plan_landing(
    header: Header, pairs: Sequence[tuple[TensorEntry, torch.Tensor]], context: Any = None
) -> Landing:
    """Lay the data region of ``header``'s object over the tensors of ``pairs`` (entry, target)."""
    import torch

    _, movable, _ = plan_tensors([target for _, target in pairs])
    start, end = header.data_offset, header.data_offset + header.data_size
    segments: list[tuple[int, int, int]] = []  # (offset in the object, bytes, address)
    keep: list[Any] = []
    deferred: list[tuple[Any, Any]] = []
    landed: dict[int, Any] = {}  # entry offset -> a tensor holding its bytes
    gaps: list[tuple[int, int]] = []
    taken: list[tuple[int, int]] = []  # memory ranges bytes land in directly, sorted
    written: list[Any] = []
    position = start
    for (entry, target), direct in sorted(zip(pairs, movable, strict=True), key=lambda p: p[0][0].offset):
        if entry.offset < start or entry.offset + entry.nbytes > end:
            raise CorruptObjectError(f"a tensor at bytes {entry.offset}+{entry.nbytes} lies outside the data")
        if entry.nbytes == 0:
            continue
        if entry.offset in landed:  # a second tensor saved as the same one
            deferred.append((landed[entry.offset], target))
            continue
        if entry.offset < position:
            raise CorruptObjectError(f"tensors overlap at byte {entry.offset} of the object")
        if entry.offset > position:
            gaps.append((position, entry.offset - position))
        if direct and _claim(taken, target.data_ptr(), entry.nbytes):
            segments.append((entry.offset, entry.nbytes, target.data_ptr()))
            landed[entry.offset] = target
            written.append(target)
        else:
            scratch = torch.empty(entry.nbytes, dtype=torch.uint8)
            segments.append((entry.offset, entry.nbytes, scratch.data_ptr()))
            received = scratch.view(target.dtype).view(target.shape)
            landed[entry.offset] = received
            deferred.append((received, target))
            keep.append(scratch)
        keep.append(target)
        position = entry.offset + entry.nbytes
    if position < end:
        gaps.append((position, end - position))
    if gaps:  # padding and bytes no tensor takes: hashed, then dropped
        sink = torch.empty(sum(n for _, n in gaps), dtype=torch.uint8)
        keep.append(sink)
        at = sink.data_ptr()
        for offset, n in gaps:
            segments.append((offset, n, at))
            at += n
    segments.sort()
    chunks: list[list[memoryview]] = [[] for _ in range(header.chunks)]
    for offset, nbytes, address in segments:
        done = 0
        while done < nbytes:
            at = offset + done - start
            index = at // header.chunk_size
            n = min(nbytes - done, (index + 1) * header.chunk_size - at)
            chunks[index].append(_writable(address + done, n))
            done += n
    return Landing(chunks, deferred, keep, context, written)


def _claim(taken: list[tuple[int, int]], address: int, nbytes: int) -> bool:
    """Reserve [address, address + nbytes) for bytes to land in, unless another tensor's memory overlaps it
    (tied weights saved twice): two streams writing one place could make a good copy look corrupt."""
    at = bisect.bisect_left(taken, (address, 0))
    if at > 0 and taken[at - 1][0] + taken[at - 1][1] > address:
        return False  # the tensor before it reaches into it
    if at < len(taken) and taken[at][0] < address + nbytes:
        return False  # it reaches into the tensor after it
    taken.insert(at, (address, nbytes))
    return True


def _hash(views: list[memoryview]) -> int:
    if len(views) == 1:
        return xxhash.xxh3_64_intdigest(views[0])
    state = xxhash.xxh3_64()
    for view in views:
        state.update(view)
    return state.intdigest()


@dataclass
class _Work:
    """The pieces (ranges of chunks) still to receive, shared by the streams of one recovery."""

    pieces: list[tuple[int, int]]
    problems: dict[int, tuple[str, str]] = field(default_factory=dict)  # holder -> ("corrupt"|"error", why)
    in_flight: int = 0
    changed: threading.Condition = field(default_factory=threading.Condition)

    def take(self, holder: int) -> tuple[int, int] | None:
        """The next piece; None when none is left, or this holder's copy is corrupt. While other streams
        still receive pieces this one waits: a piece they give back must find a stream to take it."""
        with self.changed:
            while True:
                if self.problems.get(holder, ("",))[0] == "corrupt":
                    return None
                if self.pieces:
                    self.in_flight += 1
                    return self.pieces.pop(0)
                if not self.in_flight:
                    return None
                self.changed.wait(1.0)  # in-flight pieces end within their sockets' timeouts

    def done(self, piece: tuple[int, int], *, received: bool) -> None:
        with self.changed:
            self.in_flight -= 1
            if not received:
                self.pieces.insert(0, piece)
            self.changed.notify_all()

    def note(self, holder: int, kind: str, message: str) -> None:
        with self.changed:
            if self.problems.get(holder, ("",))[0] != "corrupt":
                self.problems[holder] = (kind, message)
            self.changed.notify_all()


def receive(
    peers: dict[int, Peer],
    holders: Sequence[int],
    head: Head,
    landing: Landing,
    secret: bytes,
    *,
    streams: int = STREAMS,
    rounds: int = 3,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[bool, list[tuple[str, str]]]:
    """Fill ``landing`` with the data region of ``head``'s object from ``holders`` (ranks whose nodes
    hold a copy), verifying every chunk. Returns (True, []) when all of it landed verified, else False
    and what each holder said. A holder that does not answer is asked again, ``rounds`` times in all,
    backing off: under load a stream may time out, and giving up would restore an older step."""
    header, record = head.header, head.record
    if header.chunks == 0:
        return True, []  # no tensor bytes: the head was all of it
    wanted = 2 * max(streams, len(holders))  # pieces: a few per stream, so a slow one is helped out
    per_piece = max(1, min(_PIECE // header.chunk_size, -(-header.chunks // wanted)))
    work = _Work([(i, min(i + per_piece, header.chunks)) for i in range(0, header.chunks, per_piece)])
    for attempt in range(rounds):
        usable = [h for h in holders if work.problems.get(h, ("",))[0] != "corrupt"]
        if not usable or not work.pieces:
            break
        count = min(max(streams, len(usable)), len(work.pieces))
        threads = [
            threading.Thread(
                target=_stream,
                args=(peers[usable[i % len(usable)]], head, landing, secret, work),
                name="stalwart-recover",
                daemon=True,
            )
            for i in range(count)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()  # each stream ends: its socket has a timeout, and the pieces are finite
        if not work.pieces:
            return True, []
        if attempt < rounds - 1 and any(work.problems.get(h, ("",))[0] != "corrupt" for h in holders):
            sleep(0.5 * 2**attempt)
    left = sum(b - a for a, b in work.pieces)
    log.warning(
        "flash: recovering step %d of rank %d from peers left %d of %d chunks: %s",
        record.step,
        record.rank,
        left,
        header.chunks,
        "; ".join(message for _, message in work.problems.values()) or "no holder to ask",
    )
    return False, list(work.problems.values()) or [("error", "no peer could be asked")]


def _stream(peer: Peer, head: Head, landing: Landing, secret: bytes, work: _Work) -> None:
    """One connection to ``peer``: take pieces until none is left (or this holder is found corrupt)."""
    record = head.record
    conn: Connection | None = None
    piece: tuple[int, int] | None = None
    try:
        conn = Connection.connect(peer.address, secret)
        while (piece := work.take(peer.rank)) is not None:
            _receive_piece(conn, peer, head, landing, piece)
            work.done(piece, received=True)
            piece = None
    except CorruptObjectError as exc:
        work.note(peer.rank, "corrupt", f"the copy on rank {peer.rank}: {exc}")
    except (OSError, ValueError) as exc:
        work.note(peer.rank, "error", f"pulling from rank {peer.rank} ({peer.node}) failed: {exc}")
        log.debug("flash: a stream recovering step %d from rank %d failed: %s", record.step, peer.rank, exc)
    except Exception as exc:  # a bug: the others may still finish the pieces
        work.note(peer.rank, "error", f"pulling from rank {peer.rank} failed: {type(exc).__name__}: {exc}")
        log.error("flash: a stream recovering step %d failed", record.step, exc_info=True)
    finally:
        if piece is not None:
            work.done(piece, received=False)
        if conn is not None:
            conn.close()


def _receive_piece(
    conn: Connection, peer: Peer, head: Head, landing: Landing, piece: tuple[int, int]
) -> None:
    header, record = head.header, head.record
    first, last = piece
    offset = header.data_offset + first * header.chunk_size
    length = min(last * header.chunk_size, header.data_size) - first * header.chunk_size
    reply, served = ask(conn, "get", peer, record.step, record.rank, offset=offset, length=length)
    where = f"{object_name(record.step, record.rank)} from rank {peer.rank}"
    if served.objects != record.objects:
        raise CorruptObjectError(f"{where}: its commit record differs from the one its head was checked with")
    if (reply.get("offset"), reply.get("length")) != (offset, length):
        raise ConnectionError(
            f"rank {peer.rank} answered for bytes {short(reply.get('offset'))}+{short(reply.get('length'))}, "
            f"asked for {offset}+{length}"
        )
    deadline = time.monotonic() + TIMEOUT + length / _SLOWEST  # a trickling peer gives its piece up
    for index in range(first, last):
        views = landing.chunks[index]
        for view in views:
            conn.recv_into(view, deadline=deadline)
        if _hash(views) != head.hashes[index]:
            at = header.data_offset + index * header.chunk_size
            end = header.data_offset + min((index + 1) * header.chunk_size, header.data_size)
            raise CorruptObjectError(f"{where}: data checksum mismatch in the chunk at bytes {at}-{end}")
