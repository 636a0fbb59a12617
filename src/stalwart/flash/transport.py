"""The wire between replication peers: an HMAC handshake, then framed requests and raw object bytes.

Every connection proves it belongs to the job: the server sends a nonce, the client answers with the
HMAC (job secret) of both nonces, and the server proves itself the same way. A frame is a 4-byte
length and a JSON header; object bytes follow a header raw, sent with ``os.sendfile`` straight from
the tmpfs file and received with ``recv_into`` straight into a mapped buffer. Every socket has a
timeout; nothing waits forever on a slow or dead peer.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import socket
import struct
from typing import Any, BinaryIO

__all__ = ["TIMEOUT", "AuthError", "Connection"]

TIMEOUT = 30.0  # seconds any single socket operation may take
_MAGIC = b"STWR\x01"
_NONCE = 16
_MAX_HEADER = 1 << 20


class AuthError(ConnectionError):
    """The peer could not prove it knows the job secret (or spoke another protocol)."""


def _mac(secret: bytes, role: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(secret, role + first + second, hashlib.sha256).digest()


class Connection:
    """One authenticated connection; ``server_handshake`` / ``connect`` make one."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock, self.peer = sock, peer
        sock.settimeout(TIMEOUT)

    @classmethod
    def connect(cls, address: tuple[str, int], secret: bytes, timeout: float = 5.0) -> Connection:
        sock = socket.create_connection(address, timeout=timeout)
        conn = cls(sock, f"{address[0]}:{address[1]}")
        try:
            hello = conn._recv_exact(len(_MAGIC) + _NONCE)
            if not hello.startswith(_MAGIC):
                raise AuthError(f"{conn.peer} does not speak the stalwart replication protocol")
            server_nonce, client_nonce = hello[len(_MAGIC) :], secrets.token_bytes(_NONCE)
            sock.sendall(client_nonce + _mac(secret, b"C", server_nonce, client_nonce))
            proof = conn._recv_exact(32)
            if not hmac.compare_digest(proof, _mac(secret, b"S", client_nonce, server_nonce)):
                raise AuthError(f"{conn.peer} could not prove it belongs to this job")
        except BaseException:
            sock.close()
            raise
        return conn

    @classmethod
    def server_handshake(cls, sock: socket.socket, peer: str, secret: bytes) -> Connection:
        conn = cls(sock, peer)
        server_nonce = secrets.token_bytes(_NONCE)
        sock.sendall(_MAGIC + server_nonce)
        answer = conn._recv_exact(_NONCE + 32)
        client_nonce, mac = answer[:_NONCE], answer[_NONCE:]
        if not hmac.compare_digest(mac, _mac(secret, b"C", server_nonce, client_nonce)):
            raise AuthError(f"refused a peer from {peer} without the job secret")
        sock.sendall(_mac(secret, b"S", client_nonce, server_nonce))
        return conn

    # frames

    def send_header(self, header: dict[str, Any]) -> None:
        body = json.dumps(header, separators=(",", ":")).encode()
        self.sock.sendall(struct.pack(">I", len(body)) + body)

    def recv_header(self) -> dict[str, Any]:
        (size,) = struct.unpack(">I", self._recv_exact(4))
        if size > _MAX_HEADER:
            raise ConnectionError(f"{self.peer} sent a {size}-byte header; the limit is {_MAX_HEADER}")
        value = json.loads(self._recv_exact(size))
        if not isinstance(value, dict):
            raise ConnectionError(f"{self.peer} sent a header that is not an object")
        return value

    # bulk bytes

    def send_file(self, file: BinaryIO, size: int) -> None:
        """Send the first ``size`` bytes of an open file without copying them through user space.

        ``socket.sendfile`` (``os.sendfile`` underneath) waits for room in the socket buffer within the
        timeout; a bare ``os.sendfile`` on a socket with a timeout fails with EAGAIN once it is full.
        """
        sent = self.sock.sendfile(file, 0, size)
        if sent != size:
            raise ConnectionError(f"{self.peer} took {sent} of {size} bytes")

    def recv_into(self, view: memoryview) -> None:
        """Fill ``view`` (e.g. a mapped buffer) from the socket."""
        done, size = 0, len(view)
        while done < size:
            got = self.sock.recv_into(view[done:], min(size - done, 8 * 2**20))
            if got == 0:
                raise ConnectionError(f"{self.peer} closed the connection after {done} of {size} bytes")
            done += got

    def _recv_exact(self, size: int) -> bytes:
        buffer = bytearray(size)
        self.recv_into(memoryview(buffer))
        return bytes(buffer)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
