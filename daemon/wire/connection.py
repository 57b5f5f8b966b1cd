"""A blocking connection to the daemon's socket, speaking length-prefixed msgpack.

Used by the client library's sender thread and by the CLI; the daemon itself uses anyio.
"""

from __future__ import annotations

import os
import socket
from typing import Iterable

import msgspec

from reflexd.errors import DaemonUnavailable, FrameError, RequestFailed
from reflexd.wire.framing import MSGPACK, FrameReader, decode_reply, encode_frame
from reflexd.wire.protocol import Error, Reply

DEFAULT_SOCKET = "/run/reflexd/reflexd.sock"
MAX_REPLY_BYTES = 64 << 20


def default_socket() -> str:
    return os.environ.get("REFLEXD_SOCKET", DEFAULT_SOCKET)


def _unavailable(path: str, exc: OSError, connecting: bool = False) -> DaemonUnavailable:
    return DaemonUnavailable(
        path, exc.strerror or str(exc), errno=exc.errno, connecting=connecting, timed_out=isinstance(exc, TimeoutError)
    )


class Connection:
    def __init__(self, path: str | os.PathLike[str] | None = None, timeout: float | None = 30.0) -> None:
        self.path = os.fspath(path or default_socket())
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except OSError as exc:
            self._sock.close()
            raise _unavailable(self.path, exc, connecting=True) from None
        self._reader = FrameReader(MSGPACK, MAX_REPLY_BYTES)
        self._replies: list[Reply] = []

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, msgs: Iterable[msgspec.Struct]) -> None:
        self.send_raw(b"".join(encode_frame(m, MSGPACK) for m in msgs))

    def send_raw(self, data: bytes) -> None:
        """Send already-framed bytes."""
        if not data:
            return
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise _unavailable(self.path, exc) from None

    def receive(self) -> Reply:
        """The next reply, blocking up to the timeout."""
        while not self._replies:
            try:
                data = self._sock.recv(1 << 16)
            except OSError as exc:
                raise _unavailable(self.path, exc) from None
            if not data:
                raise DaemonUnavailable(self.path, "connection closed by the daemon")
            for frame in self._reader.feed(data):
                if isinstance(frame, FrameError):
                    raise frame
                self._replies.append(decode_reply(frame, MSGPACK))
        return self._replies.pop(0)

    def request(self, msg: msgspec.Struct) -> Reply:
        """Send one request and return its reply; an Error reply raises RequestFailed."""
        self.send([msg])
        reply = self.receive()
        if isinstance(reply, Error):
            raise RequestFailed(reply.code, reply.message)
        return reply


def request(msg: msgspec.Struct, path: str | os.PathLike[str] | None = None, timeout: float = 30.0) -> Reply:
    with Connection(path, timeout) as conn:
        return conn.request(msg)
