"""The Unix socket: who may connect, how frames are read, where each message goes.

Experience events go to ingest in chunk-sized lists; requests are answered in order on the same
connection. A bad frame gets an Error reply and a dead-letter row; the connection lives on
unless the framing itself is lost (an oversize length prefix).
"""

from __future__ import annotations

import math
import os
import socket
import stat
import struct
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import SocketStream

from . import log
from .errors import FrameError, ReflexdError
from .ingest import Ingest
from .store import DeadLetter
from .protocol import (
    EXPERIENCE_TYPES,
    Ack,
    Decide,
    Error,
    Flush,
    Forget,
    FrameReader,
    decode_inbound,
    encode_frame,
    framing_of,
)

_log = log.get("reflexd.server")
_CRED = struct.Struct("3i")
READ_BYTES = 1 << 16


class SocketError(ReflexdError):
    """The socket path cannot be used."""


def prepare_path(path: Path) -> None:
    """Make the socket's directory (0750, ours) and clear a stale socket; refuse anything else."""
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    # whoever can write to the directory can swap the socket under us
    dir_st = os.stat(path.parent)
    if dir_st.st_uid != os.geteuid():
        raise SocketError(f"{path.parent} belongs to uid {dir_st.st_uid}, not to the daemon; refusing to put the socket there")
    if dir_st.st_mode & 0o022:
        raise SocketError(
            f"{path.parent} is writable by group or others (mode {stat.S_IMODE(dir_st.st_mode):04o}); "
            "refusing to put the socket there"
        )
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise SocketError(f"{path} is a symbolic link; refusing to use it as the socket")
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
    except ConnectionRefusedError:
        path.unlink()  # stale socket left by a daemon that died
        return
    except OSError as exc:
        raise SocketError(f"{path}: cannot probe the existing socket: {exc.strerror}") from None
    finally:
        probe.close()
    raise SocketError(f"{path}: another daemon is already listening there")


def peer_credentials(stream: SocketStream) -> tuple[int, int, int]:
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    return _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))


class Server:
    """Accepts connections; ``daemon`` answers requests (``decide`` and the async ``request``)."""

    def __init__(self, daemon: Any, ingest: Ingest) -> None:
        self.daemon = daemon
        self.ingest = ingest
        self.connections = 0
        self.refused = 0

    @property
    def config(self) -> Any:
        return self.daemon.config

    def allowed(self, uid: int, gid: int) -> bool:
        sock = self.config.socket
        return uid in (0, os.getuid()) or uid in sock.allowed_uids or gid in sock.allowed_gids

    async def handle(self, stream: SocketStream) -> None:
        async with stream:
            try:
                pid, uid, gid = peer_credentials(stream)
            except OSError:
                return
            if not self.allowed(uid, gid):
                self.refused += 1
                _log.warning("connection refused", peer_uid=uid, peer_gid=gid, peer_pid=pid)
                await self._try_send(stream, encode_frame(Error(code="forbidden", message=f"uid {uid} is not allowed"), "json"))
                return
            if self.connections >= self.config.socket.max_connections:
                self.refused += 1
                await self._try_send(stream, encode_frame(Error(code="busy", message="too many connections"), "json"))
                return
            self.connections += 1
            try:
                await self._serve(stream, pid, uid)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError):
                pass
            finally:
                self.connections -= 1

    @staticmethod
    async def _try_send(stream: SocketStream, data: bytes) -> None:
        try:
            await stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass

    async def _serve(self, stream: SocketStream, pid: int, uid: int) -> None:
        try:
            data = await stream.receive(READ_BYTES)
        except anyio.EndOfStream:
            return
        framing = framing_of(data[0])
        reader = FrameReader(framing, self.config.socket.max_frame_bytes)
        conn = _Connection(self, stream, framing, pid, uid)
        frame_started: float | None = None
        while True:
            seen = conn.seq
            await conn.process(reader.feed(data))
            if reader.fatal:
                return
            # Waiting between frames is fine; a frame left half-sent is not, however slowly its
            # bytes trickle in: the clock runs from the frame's first byte.
            if not reader.incomplete:
                frame_started = None
            elif frame_started is None or conn.seq != seen:
                frame_started = time.monotonic()
            timeout = self.config.socket.frame_timeout
            deadline = math.inf if frame_started is None else frame_started + timeout - time.monotonic()
            with anyio.move_on_after(max(deadline, 0.0)) as waited:
                try:
                    data = await stream.receive(READ_BYTES)
                except anyio.EndOfStream:
                    await conn.finish()
                    return
            if waited.cancelled_caught:
                await conn.abandon(reader.abandon(), timeout)
                return


class _Connection:
    """Per-connection state: frame counter, events not yet handed to ingest, replies to send."""

    def __init__(self, server: Server, stream: SocketStream, framing: str, pid: int, uid: int) -> None:
        self.server = server
        self.stream = stream
        self.framing = framing
        self.pid = pid
        self.uid = uid
        self.seq = 0
        self.accepted = 0
        self.events: list[Any] = []
        self.decided: list[Any] = []  # decisions made by the daemon, logged without waiting
        self.dead: list[DeadLetter] = []
        self.replies: list[bytes] = []
        self.deaf = False  # the peer stopped taking replies; what it sent is still read to the end

    async def process(self, frames: Any) -> None:
        redactor = self.server.config.redaction.redactor
        for frame in frames:
            seq = self.seq
            self.seq += 1
            if isinstance(frame, FrameError):
                self._reject(seq, frame, b"")
                continue
            try:
                msg = decode_inbound(frame, self.framing)
            except FrameError as exc:
                self._reject(seq, exc, frame)
                continue
            if isinstance(msg, EXPERIENCE_TYPES):
                if redactor.active:  # redacted once, here, before anything can store them
                    try:
                        msg = redactor.apply(msg)
                    except FrameError as exc:  # too deep to redact: refused, and its raw bytes not kept
                        self._reject(seq, exc, frame, keep_raw=False)
                        continue
                self.events.append(msg)
                self.accepted += 1
            else:
                await self._request(seq, msg)
        await self.finish()

    async def finish(self) -> None:
        # replies first: a Decided must not wait behind a store that is falling behind
        if self.replies:
            data = b"".join(self.replies)
            self.replies.clear()
            if not self.deaf:
                try:
                    await self.stream.send(data)
                except (anyio.BrokenResourceError, ConnectionError):
                    # gone without reading its replies: its events are still taken in, not dropped
                    self.deaf = True
        await self._hand_off()

    async def abandon(self, partial: bytes, waited: float) -> None:
        err = FrameError(f"incomplete frame: {len(partial)} bytes, then nothing for {waited:g} s", code="timeout")
        self._reject(self.seq, err, partial)
        self.seq += 1
        await self.finish()

    async def _hand_off(self) -> None:
        if self.decided:
            self.server.ingest.offer(self.decided)
            self.decided = []
        if self.events or self.dead:
            events, dead = self.events, self.dead
            self.events, self.dead = [], []
            await self.server.ingest.submit(events, dead)

    def _reply(self, msg: msgspec.Struct) -> None:
        self.replies.append(encode_frame(msg, self.framing))

    def _reject(self, seq: int, err: FrameError, raw: bytes, keep_raw: bool = True) -> None:
        cap = self.server.config.ingest.dead_letter_bytes
        self.dead.append(
            DeadLetter(
                received_at=time.time(),
                peer_uid=self.uid,
                peer_pid=self.pid,
                code=err.code,
                reason=err.reason,
                raw=raw[:cap] if keep_raw and self.server.config.redaction.dead_letter_raw else b"",
                raw_size=getattr(err, "size", len(raw)),  # an oversize frame's bytes are not kept
            )
        )
        self._reply(Error(code=err.code, message=err.reason, seq=seq))

    async def _request(self, seq: int, msg: Any) -> None:
        req = getattr(msg, "req", None)
        try:
            if isinstance(msg, Flush):
                await self._hand_off()
                self.server.ingest.counters.client_dropped += msg.dropped
                await self.server.ingest.barrier(loaded=msg.loaded)
                self._reply(Ack(count=self.accepted, req=req))
            elif isinstance(msg, Decide):
                # redacted before scoring too: models are trained on redacted contexts
                reply, decision = self.server.daemon.decide(self.server.config.redaction.redactor.apply(msg))
                self.decided.append(decision)
                self._reply(reply)
            elif isinstance(msg, Forget):
                await self._hand_off()  # what this connection sent before the forget is forgotten too
                self._reply(await self.server.daemon.request(msg))
            else:
                self._reply(await self.server.daemon.request(msg))
        except ReflexdError as exc:
            self._reply(Error(code=type(exc).__name__, message=str(exc), seq=seq, req=req))
        except Exception as exc:  # a bug or an unforeseen failure answers this request, not the daemon
            _log.exception("request failed", request=type(msg).__name__)
            self._reply(Error(code="internal", message=f"{type(exc).__name__}: {exc}", seq=seq, req=req))
