"""The Unix socket: who may connect, how frames are read, where each message goes.

Experience events go to ingest in chunk-sized lists; requests are answered in order on the same
connection. The decide requests read in one go are scored together, and all the replies to one
read go out in one write. A bad frame gets an Error reply and a dead-letter row; the connection
lives on unless the framing itself is lost (an oversize length prefix).
"""

from __future__ import annotations

import errno
import grp
import os
import socket
import stat
import struct
import time
from pathlib import Path
from typing import Any, Protocol

import anyio
import msgspec
from anyio.abc import SocketListener, SocketStream
from anyio.lowlevel import checkpoint

from reflexd import log
from reflexd.config import Config
from reflexd.durable import private_dir
from reflexd.errors import Forbidden, FrameError, ReflexdError, SocketError
from reflexd.service.ingest import Ingest
from reflexd.service.metrics import DecideLatency
from reflexd.service.redact import Redactor
from reflexd.service.store import DeadLetter
from reflexd.wire.framing import FrameReader, decode_inbound, encode_frame, framing_of, req_of
from reflexd.wire.protocol import (
    EXPERIENCE_TYPES,
    Ack,
    Adopt,
    Decide,
    Decision,
    Error,
    Flush,
    Forget,
    Learned,
    Promote,
    ReqId,
    Rollback,
)

_log = log.get("reflexd.server")
_CRED = struct.Struct("3i")
_GID = struct.Struct("I")  # gid_t
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13; the socket module does not name it
_MAX_GROUPS_BYTES = 65536 * _GID.size  # NGROUPS_MAX
_groups_unreadable_logged = False
READ_BYTES = 1 << 16
FD_HEADROOM = 64
# requests that change what is served or delete data: answered only for administrators (Server.admin)
ADMIN_REQUESTS = (Adopt, Promote, Rollback, Forget)



def prepare_path(path: Path) -> None:
    """Make the socket's directory (0750, ours) and clear a stale socket; refuse anything else."""
    refusal = private_dir(path.parent, "the socket")
    if refusal is not None:
        raise SocketError(refusal)
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


def peer_groups(sock: socket.socket, pid: int, gid: int) -> frozenset[int]:
    """The peer's primary group and its supplementary groups, read once per connection.

    SO_PEERGROUPS (Linux 4.13) gives the groups the peer had when it connected, from the socket
    itself. Without it they are read from ``/proc/PID/status`` (``Groups:``), which reflects the
    process now and which ``ProtectProc=invisible`` hides for other users' processes; if neither
    can be read, only the primary group counts.
    """
    groups = _socket_groups(sock)
    if groups is None:
        groups = _proc_groups(pid)
    if groups is None:
        global _groups_unreadable_logged
        if not _groups_unreadable_logged:
            _groups_unreadable_logged = True
            _log.warning(
                "cannot read peers' supplementary groups (no SO_PEERGROUPS, /proc/PID/status unreadable);"
                " only their primary group is checked",
                peer_pid=pid,
            )
        groups = ()
    return frozenset((gid, *groups))


def _socket_groups(sock: socket.socket) -> tuple[int, ...] | None:
    size = 64 * _GID.size
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE and size < _MAX_GROUPS_BYTES:
                size = min(size * 16, _MAX_GROUPS_BYTES)  # more groups than the buffer holds
                continue
            return None  # ENOPROTOOPT: a kernel older than 4.13
        return tuple(gid for (gid,) in _GID.iter_unpack(raw[: len(raw) - len(raw) % _GID.size]))


def _proc_groups(pid: int) -> tuple[int, ...] | None:
    if pid <= 0:  # a peer in a pid namespace that does not map to ours
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return None


class Handler(Protocol):
    """What answers the requests a connection reads (the daemon). The server checks the peer first:
    ``ADMIN_REQUESTS`` reach ``request`` only from administrators (``Server.admin``)."""

    # (reply, decisions to log) for each decide; the reply alone (Scored) for one with ``log`` false
    def decide(self, msgs: list[Decide]) -> list[tuple[Any, list[Decision]] | Any]: ...

    async def request(self, msg: msgspec.Struct) -> msgspec.Struct: ...

    # online-head updates clients share (not stored): learned here and passed on
    def learned(self, msgs: list[Learned]) -> None: ...


class Server:
    """Accepts connections, hands experience to ``ingest`` and requests to ``handler``."""

    def __init__(self, config: Config, ingest: Ingest, handler: Handler) -> None:
        self.ingest = ingest
        self.handler = handler
        self.decider = _Decider(self)
        self.connections = 0
        self.refused = 0
        self.shed = 0  # connections turned away because the daemon was out of file descriptors
        self.idle_closed = 0
        self.revoked = 0
        self.forbidden = 0  # administrative requests refused to peers that are not administrators
        self._peers: set[_Peer] = set()
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Take a (re)loaded config: its redaction rules are compiled here, once, with their key, and
        open connections of peers it no longer allows are ended."""
        self.redactor = Redactor.from_config(config.redaction)
        self.config = config
        self.allowed_gids = frozenset(config.socket.allowed_gids) | _group_ids(config.socket.group)
        self.admin_gids = frozenset(config.socket.admin_gids)
        for peer in list(self._peers):
            if not self.allowed(peer.uid, peer.groups):
                peer.revoke()
                self.revoked += 1
                _log.warning("connection ended: its peer is no longer allowed", peer_uid=peer.uid, peer_pid=peer.pid)

    def allowed(self, uid: int, groups: frozenset[int]) -> bool:
        """Root, the daemon's own uid, ``socket.allowed_uids``, and members (primary or supplementary)
        of ``socket.allowed_gids`` or of ``socket.group``, the group the socket is given; and the
        administrators (``admin``)."""
        if uid in (0, os.getuid()) or uid in self.config.socket.allowed_uids:
            return True
        return not groups.isdisjoint(self.allowed_gids) or self.admin(uid, groups)

    def admin(self, uid: int, groups: frozenset[int]) -> bool:
        """Who may send ``ADMIN_REQUESTS``: root, the daemon's own uid, ``socket.admin_uids``, and
        members (primary or supplementary) of ``socket.admin_gids``. Checked at each request, so a
        reload applies from the next one."""
        if uid in (0, os.getuid()) or uid in self.config.socket.admin_uids:
            return True
        return not groups.isdisjoint(self.admin_gids)

    async def serve(self, listener: SocketListener) -> None:
        """Accept connections until cancelled. Out of file descriptors, the daemon turns new
        connections away with a "busy" error (a descriptor is kept spare for that) and goes on."""
        spare: int | None = _spare_fd()
        async with anyio.create_task_group() as tg:
            while True:
                try:
                    stream = await listener.accept()
                except anyio.BrokenResourceError as exc:
                    cause = exc.__cause__
                    if not (isinstance(cause, OSError) and cause.errno in (errno.EMFILE, errno.ENFILE)):
                        raise
                    spare = await self._shed(listener, spare, cause)
                    continue
                tg.start_soon(self.handle, stream)

    async def _shed(self, listener: SocketListener, spare: int | None, cause: OSError) -> int | None:
        if not self.shed:
            _log.error(
                "out of file descriptors: turning connections away (raise LimitNOFILE, or lower socket.max_connections)",
                error=str(cause),
            )
        self.shed += 1
        self.refused += 1
        if spare is not None:
            os.close(spare)  # room for one: accept the connection waiting, tell it why, close it
            try:
                stream = await listener.accept()
            except anyio.BrokenResourceError:
                pass
            else:
                async with stream:
                    await self._try_send(stream, _busy("the daemon is out of file descriptors"))
        await anyio.sleep(0.05)  # the backlog waits in the kernel meanwhile
        return _spare_fd()

    async def handle(self, stream: SocketStream) -> None:
        async with stream:
            try:
                pid, uid, gid = peer_credentials(stream)
                groups = peer_groups(stream.extra(anyio.abc.SocketAttribute.raw_socket), pid, gid)
            except OSError:
                return
            if not self.allowed(uid, groups):
                self.refused += 1
                _log.warning("connection refused", peer_uid=uid, peer_gid=gid, peer_pid=pid)
                await self._try_send(stream, encode_frame(Error(code="forbidden", message=f"uid {uid} is not allowed"), "json"))
                return
            sock_cfg = self.config.socket
            # root and the daemon's own user keep a few slots others cannot fill, so status always answers
            cap = sock_cfg.max_connections + (sock_cfg.reserved_connections if uid in (0, os.getuid()) else 0)
            if self.connections >= cap:
                self.refused += 1
                await self._try_send(stream, _busy("too many connections"))
                return
            self.connections += 1
            peer = _Peer(stream.extra(anyio.abc.SocketAttribute.raw_socket), pid, uid, groups)
            self._peers.add(peer)
            try:
                await self._serve(stream, peer)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError):
                pass
            finally:
                self._peers.discard(peer)
                self.connections -= 1

    @staticmethod
    async def _try_send(stream: SocketStream, data: bytes) -> None:
        try:
            await stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass

    async def _serve(self, stream: SocketStream, peer: _Peer) -> None:
        # Straight to the raw socket: the stream's send takes a turn of the event loop even when
        # the write would not block, and its checks add up; with request/reply clients that cost
        # 18 µs of CPU per request, against 11 µs this way. Only a read or write that would
        # block waits.
        sock = peer.sock
        data = await _receive(sock, time.monotonic() + self.config.socket.idle_timeout)
        if not data or peer.revoked:
            if data is None:
                self.idle_closed += 1
            return
        framing = framing_of(data[0])
        reader = FrameReader(framing, self.config.socket.max_frame_bytes)
        conn = _Connection(self, sock, framing, peer.pid, peer.uid, peer.groups)
        frame_started: float | None = None
        while True:
            seen = conn.seq
            await conn.process(reader.feed(data))
            if reader.fatal:
                return
            # Waiting between frames is fine, up to socket.idle_timeout; a frame left half-sent
            # is not, however slowly its bytes trickle in: the clock runs from its first byte.
            if not reader.incomplete:
                frame_started = None
            elif frame_started is None or conn.seq != seen:
                frame_started = time.monotonic()
            cfg = self.config.socket
            idle_until = time.monotonic() + cfg.idle_timeout
            deadline = idle_until if frame_started is None else min(idle_until, frame_started + cfg.frame_timeout)
            data = await _receive(sock, deadline)
            if peer.revoked:
                await conn.refuse(Error(code="forbidden", message=f"uid {peer.uid} is no longer allowed"))
                return
            if data is None:
                short = reader.cut_short()
                if short is not None:
                    conn.reject(short)
                if reader.incomplete:
                    await conn.abandon(reader.abandon(), cfg.frame_timeout)
                else:
                    self.idle_closed += 1
                    await conn.finish()
                return
            if not data:  # the peer is done sending: the stream's end ends its last line
                await conn.process(reader.end())
                if reader.incomplete:
                    await conn.abandon(reader.abandon())
                await conn.finish()
                return


class _Peer:
    """An open connection's socket and credentials, so a reload can end it."""

    __slots__ = ("sock", "pid", "uid", "groups", "revoked")

    def __init__(self, sock: socket.socket, pid: int, uid: int, groups: frozenset[int]) -> None:
        self.sock, self.pid, self.uid, self.groups = sock, pid, uid, groups
        self.revoked = False

    def revoke(self) -> None:
        self.revoked = True
        try:
            self.sock.shutdown(socket.SHUT_RD)  # wakes its reader, which sees ``revoked``
        except OSError:
            pass


def _group_ids(group: str | int | None) -> frozenset[int]:
    if group is None:
        return frozenset()
    if isinstance(group, int):
        return frozenset((group,))
    try:
        return frozenset((grp.getgrnam(group).gr_gid,))
    except KeyError:  # removed since the config was checked: no one is let in by it
        return frozenset()


def give_group(path: Path, gid: int) -> None:
    """chown ``path`` to group ``gid``, only if it has another: under the unit's system-call filter
    (no @chown) a chown fails even when it would change nothing."""
    if os.stat(path).st_gid != gid:
        os.chown(path, -1, gid)


def _busy(message: str) -> bytes:
    return encode_frame(Error(code="busy", message=message), "json")


def _spare_fd() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return None


def fd_budget_problems(config: Config) -> list[str]:
    """Warnings when the connection caps cannot fit the process's file-descriptor limit."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    sock = config.socket
    # besides connections: the store, the spool, the trainer's pipes, models, logs
    needed = sock.max_connections + sock.reserved_connections + FD_HEADROOM
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return []
    return [
        f"socket.max_connections: {sock.max_connections} connections, {sock.reserved_connections} reserved "
        f"and about {FD_HEADROOM} other files need {needed} file descriptors, but this process may open "
        f"{soft} (ulimit -n, or LimitNOFILE= in the unit); connections past that are turned away"
    ]


async def _receive(sock: socket.socket, deadline: float | None) -> bytes | None:
    """The next bytes read (b"" once the peer is gone), or None if ``deadline`` passes first.

    Yields to the event loop first, so that a connection with data always waiting cannot starve
    the others, and so that what arrives meanwhile is read in the same call.
    """
    await checkpoint()
    while deadline is None or time.monotonic() < deadline:
        try:
            return sock.recv(READ_BYTES)
        except BlockingIOError:
            pass
        except OSError:  # reset by the peer: as good as gone
            return b""
        if deadline is None:
            await anyio.wait_readable(sock)
        else:
            with anyio.move_on_after(deadline - time.monotonic()):
                await anyio.wait_readable(sock)
    return None


async def _send(sock: socket.socket, data: bytes) -> None:
    """Write all of ``data``, waiting only while the socket's buffer is full."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await anyio.wait_writable(sock)


class _Decider:
    """Answers decide requests from every connection at once.

    A lone decision's cost is mostly fixed (a model run, a pass through the exploration code), so
    the requests that all connections read in one turn of the event loop are decided together.
    The first connection to bring requests leads: it lets the event loop run the other connections
    that have data (they add theirs and wait), then decides the lot in one pass and wakes them.
    Each reply goes into its connection's reply slot, so every connection's replies keep its order.
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self._waiting: list[_Connection] = []  # the connections in the batch being formed
        self._done: anyio.Event | None = None  # set once that batch is decided
        self.latency = DecideLatency()  # one observation per batch, weighted by its requests

    async def decide(self, conn: _Connection) -> None:
        """Fill the reply slots of ``conn.decides``, and log their decisions, before returning."""
        if self._waiting:
            self._waiting.append(conn)
            await self._done.wait()  # type: ignore[union-attr]
            return
        self._waiting.append(conn)
        self._done = done = anyio.Event()
        started = time.perf_counter()
        try:
            if self.server.connections > 1:  # alone, there is no one to wait for
                await checkpoint()
        finally:  # even if cancelled: the others are waiting on this
            conns, self._waiting = self._waiting, []
            try:
                decided = self._answer(conns)
                self.latency.observe(time.perf_counter() - started, decided)
            finally:
                done.set()

    def _answer(self, conns: list[_Connection]) -> int:
        pending = [(conn, slot, seq, msg) for conn in conns for slot, seq, msg in conn.decides]
        for conn in conns:
            conn.decides = []
        try:
            answers: list[Any] = self._decide([msg for *_, msg in pending])
        except Exception:
            # one request spoilt the batch: decided one by one, so that only it gets the error
            answers = []
            for *_, seq, msg in pending:
                try:
                    answers += self._decide([msg])
                except Exception as exc:
                    answers.append(_failure(exc, seq, msg))
        for (conn, slot, _, _), answer in zip(pending, answers):
            if type(answer) is tuple:
                answer, decisions = answer
                conn.decided.extend(decisions)
            conn.replies[slot] = encode_frame(answer, conn.framing)
        return len(pending)

    def _decide(self, msgs: list[Decide]) -> list[Any]:
        redactor = self.server.redactor
        if redactor.active:  # redacted before scoring too: models are trained on redacted contexts
            msgs = [redactor.apply(msg) for msg in msgs]
        return self.server.handler.decide(msgs)


class _Connection:
    """Per-connection state: frame counter, events not yet handed to ingest, replies to send.

    Decide requests wait in ``decides`` until the next request or the end of the read, then are
    decided together (see _Decider); their replies keep their places among the others (errors,
    acks), and all of a read's replies go out in one write.
    """

    def __init__(
        self, server: Server, sock: socket.socket, framing: str, pid: int, uid: int, groups: frozenset[int] = frozenset()
    ) -> None:
        self.server = server
        self.sock = sock
        self.framing = framing
        self.pid = pid
        self.uid = uid
        self.groups = groups  # the peer's primary and supplementary groups, read when it connected
        self.seq = 0
        self.accepted = 0
        self.events: list[Any] = []
        self.decided: list[Any] = []  # decisions made by the daemon, logged without waiting
        self.dead: list[DeadLetter] = []
        self.decides: list[tuple[int, int, Decide]] = []  # (reply slot, seq, request), not yet decided
        self.learned: list[Learned] = []  # online updates shared, not yet handed on (``_share``)
        self.replies: list[bytes | None] = []  # None: the slot of a decide not yet decided
        self.deaf = False  # the peer stopped taking replies; what it sent is still read to the end

    async def process(self, frames: Any) -> None:
        redactor = self.server.redactor
        for frame in frames:
            seq = self.seq
            self.seq += 1
            if isinstance(frame, FrameError):
                self._reject(seq, frame, b"")
                continue
            try:
                msg = decode_inbound(frame, self.framing)
            except FrameError as exc:
                self._reject(seq, exc, frame, req=req_of(frame, self.framing) if exc.code == "invalid" else None)
                continue
            if type(msg) is Decide:
                self.decides.append((len(self.replies), seq, msg))
                self.replies.append(None)
            elif type(msg) is Learned:
                self.learned.append(msg)  # shared learning, never stored: no reply, nothing counted
            elif isinstance(msg, EXPERIENCE_TYPES):
                if redactor.active:  # redacted once, here, before anything can store them
                    try:
                        msg = redactor.apply(msg)
                    except FrameError as exc:  # too deep to redact: refused, and its raw bytes not kept
                        self._reject(seq, exc, frame, keep_raw=False)
                        continue
                self.events.append(msg)
                self.accepted += 1
            else:
                self._share()
                if self.decides:  # whatever came before a request is done before it is answered
                    await self.server.decider.decide(self)
                await self._request(seq, msg)
        self._share()
        if self.decides:
            await self.server.decider.decide(self)
        await self.finish()

    def _share(self) -> None:
        """Hand on the online updates read so far, together (the head learns each action's at once)."""
        if self.learned:
            learned, self.learned = self.learned, []
            self.server.handler.learned(learned)

    async def finish(self) -> None:
        # replies first: a Decided must not wait behind a store that is falling behind
        if self.replies:
            data = b"".join(self.replies)  # type: ignore[arg-type]  # every slot is filled by now
            self.replies.clear()
            if not self.deaf:
                try:
                    await _send(self.sock, data)
                except OSError:
                    # gone without reading its replies: its events are still taken in, not dropped
                    self.deaf = True
        await self._hand_off()

    async def abandon(self, partial: bytes, waited: float | None = None) -> None:
        """Dead-letter a frame left half-sent: for ``waited`` seconds, or (None) until the peer stopped sending."""
        if waited is None:
            err = FrameError(f"incomplete frame: {len(partial)} bytes, then the peer stopped sending")
        else:
            err = FrameError(f"incomplete frame: {len(partial)} bytes, then nothing for {waited:g} s", code="timeout")
        self.reject(err, partial)
        await self.finish()

    def reject(self, err: FrameError, raw: bytes = b"") -> None:
        """Dead-letter the next frame, read outside ``process`` (one cut short or left half-sent)."""
        self._reject(self.seq, err, raw)
        self.seq += 1

    async def refuse(self, err: Error) -> None:
        """End a connection whose peer is no longer allowed: what it sent since is not taken in."""
        self.replies.append(encode_frame(err, self.framing))
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

    def _reject(self, seq: int, err: FrameError, raw: bytes, keep_raw: bool = True, req: ReqId = None) -> None:
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
        self._reply(Error(code=err.code, message=err.reason, seq=seq, req=req))

    async def _request(self, seq: int, msg: Any) -> None:
        req = getattr(msg, "req", None)
        try:
            if isinstance(msg, ADMIN_REQUESTS) and not self.server.admin(self.uid, self.groups):
                # refused before anything is handed off or waited for
                self.server.forbidden += 1
                _log.warning("administrative request refused", request=msg.__struct_config__.tag, peer_uid=self.uid, peer_pid=self.pid)
                raise Forbidden(str(msg.__struct_config__.tag), self.uid)
            if isinstance(msg, Flush):
                await self._hand_off()
                self.server.ingest.counters.client_dropped += msg.dropped
                what = "in the store" if msg.loaded else "durable in the spool"
                await self.server.ingest.barrier_within(
                    self.server.config.socket.request_timeout, f"flush: the events are not {what}", loaded=msg.loaded
                )
                self._reply(Ack(count=self.accepted, req=req))
            elif isinstance(msg, Forget):
                await self._hand_off()  # what this connection sent before the forget is forgotten too
                self._reply(await self.server.handler.request(msg))
            else:
                self._reply(await self.server.handler.request(msg))
        except Exception as exc:
            self._reply(_failure(exc, seq, msg))


def _failure(exc: Exception, seq: int, msg: Any) -> Error:
    """The Error answering a request that failed; called while ``exc`` is being handled."""
    req = getattr(msg, "req", None)
    if isinstance(exc, ReflexdError):
        return Error(code=exc.code, message=str(exc), seq=seq, req=req)
    # a bug or an unforeseen failure answers this request, not the daemon
    _log.exception("request failed", request=type(msg).__name__)
    return Error(code="internal", message=f"{type(exc).__name__}: {exc}", seq=seq, req=req)
