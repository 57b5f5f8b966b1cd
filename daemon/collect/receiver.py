"""The OTLP/HTTP trace receiver: ``POST /v1/traces`` on a Unix socket of its own and a loopback port.

HTTP/1.1 kept as small as the metrics endpoint's (``reflexd.service.endpoint``), with what OTLP
exporters need besides: request bodies (``Content-Length`` required, ``traces.max_body_bytes``
at most), persistent connections (the Python SDK's requests session and the Collector's Go
client keep theirs open) and ``Expect: 100-continue``.

Who may send: on the Unix socket (``traces.path``, mode 0660, given ``socket.group``) the peer's
SO_PEERCRED credentials and groups, checked against the agents' socket's allow-list by the
server's own check (``Server.allowed``); on the TCP port (``traces.port``, loopback only) the
uid owning the peer's end of the connection, as ``/proc/net/tcp`` shows it, with that user's
groups. Checked at every request, so a reload applies at once.

What is answered, as the OTLP/HTTP specification says:

- 200 and an ``ExportTraceServiceResponse`` in the request's encoding, once the messages its
  spans became are durable in the spool (what a flush waits for on the socket) and the steps
  left waiting for their episode are in the journal. Spans that could not be taken in are counted
  in ``partial_success.rejected_spans``, with why in ``error_message``, and dead-lettered.
- 400 (the body does not decode), 413 (too large, decompressed too) and 415 (a media type or
  content coding not read here), each with a ``google.rpc.Status``, the body dead-lettered; 411
  without a Content-Length; 403 to a peer not allowed; 404 and 405 elsewhere.
- 503 with ``Retry-After`` when the spool or the journal does not take them within
  ``socket.request_timeout``: a status exporters retry, so nothing is lost, and ids (trace id +
  span id) make the resend a no-op for what did get through.

A dead letter keeps a body's bytes only with ``traces.capture_content`` (and
``redaction.dead_letter_raw``): they may hold message content the operator did not opt in to.
"""

from __future__ import annotations

import os
import pwd
import socket
import struct
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol, Sequence

import anyio
from anyio.abc import Listener, SocketAttribute

from reflexd import log
from reflexd.collect import otlp
from reflexd.collect.episodes import Assembler, Plan
from reflexd.collect.journal import Journal
from reflexd.collect.spans import Rules, problems
from reflexd.config import Config
from reflexd.errors import ConfigError, RequestTimeout, StorageError, TraceError
from reflexd.service.endpoint import (
    MAX_REQUEST_BYTES,
    Slots,
    accept_each,
    close_stream,
    loopback_listeners,
    unix_listener,
)
from reflexd.service.redact import Redactor
from reflexd.service.server import peer_credentials, peer_groups
from reflexd.service.store import DeadLetter
from reflexd.wire.protocol import ExperienceEvent

_log = log.get("reflexd.collect")
PATH = "/v1/traces"
MAX_CONNECTIONS = 64
READ_BYTES = 1 << 16
RETRY_AFTER_SECONDS = 1
LINGER_SECONDS = 2.0  # reading what a refused client still sends, before closing
MAX_REASONS = 5  # rejected spans named in a reply's error_message (and a dead letter), the rest counted
# A function that makes events durable (as a flush does on the socket) and queues dead letters.
Submit = Callable[[Sequence[ExperienceEvent], Sequence[DeadLetter]], Awaitable[None]]


class Peers(Protocol):
    """Who may send, and the redaction rules in force: the agents' socket server has both."""

    redactor: Redactor

    def allowed(self, uid: int, groups: frozenset[int]) -> bool: ...


def durably(ingest: Any, settings: Callable[[], Config]) -> Submit:
    """The ``Submit`` of the daemon's ``Ingest``: events are queued, then waited for until they
    are in the spool (``RequestTimeout`` after ``socket.request_timeout``), as a flush waits."""

    async def submit(events: Sequence[ExperienceEvent], dead: Sequence[DeadLetter]) -> None:
        limit = settings().socket.request_timeout
        with anyio.move_on_after(limit) as queued:  # a stalled queue is a 503, never a hung exporter
            await ingest.submit(events, dead)
        if queued.cancelled_caught:
            raise RequestTimeout("traces: the spans could not be queued", limit)
        if events:
            await ingest.barrier_within(limit, "traces: the spans are not durable in the spool")

    return submit


@dataclass
class TraceCounters:
    """What the receiver did since start (for status and metrics)."""

    requests: int = 0  # answered, whatever the answer
    spans: int = 0  # in requests answered 200
    steps: int = 0  # Step messages made durable
    episodes: int = 0
    late_steps: int = 0  # steps stored after their episode (a child that outlived its parent)
    expired: int = 0  # steps stored without their invoke_agent span (timeout, root, or max_pending_spans)
    rejected_spans: int = 0  # counted in partial_success
    refused_steps: int = 0  # acknowledged steps refused later with their episode (no agent name)
    bad_requests: int = 0  # answered 400, 411, 413 or 415
    forbidden: int = 0  # answered 403
    unavailable: int = 0  # answered 503: not durable in time
    reward_errors: int = 0  # reward expressions with no value (0 stored)
    by_status: dict[int, int] = field(default_factory=dict)


class _Peer:
    __slots__ = ("uid", "pid", "groups", "where")

    def __init__(self, uid: int | None, pid: int | None, groups: frozenset[int], where: str) -> None:
        self.uid, self.pid, self.groups, self.where = uid, pid, groups, where


class TraceReceiver:
    """Listens where ``traces`` says; maps what it receives and hands it to ``submit``.

    ``settings`` returns the config in force (a reload reaches the mapping at the next request;
    the listeners stay as they were opened). ``peers`` decides who may send and carries the
    redaction rules (the daemon's ``Server``). ``submit`` makes events durable (``durably``).
    """

    def __init__(self, settings: Callable[[], Config], peers: Peers, submit: Submit) -> None:
        self.settings = settings
        self.peers = peers
        self.submit = submit
        self.counters = TraceCounters()
        self.listeners: list[Listener[Any]] = []
        self.path: Path | None = None
        self.ports: list[int] = []  # the TCP ports listened on (traces.port 0: the one picked)
        self.slots = Slots(MAX_CONNECTIONS)
        self.assembler: Assembler | None = None
        self.journal: Journal | None = None
        self._journal_lock = anyio.Lock()
        self._rules: Rules | None = None
        self._rules_for: tuple[Any, Any] = (None, None)

    @property
    def waiting(self) -> int:
        """Steps (and the spans linking them) waiting for their episode."""
        return self.assembler.waiting if self.assembler is not None else 0

    # ---- running -------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; with ``traces.enabled`` false, return at once.

        Started with ``TaskGroup.start``: a mapping the config gets wrong (ConfigError), a
        journal that cannot be read or a socket that cannot be bound (SocketError) fail the
        start, before the daemon says it is ready.
        """
        cfg = self.settings()
        if not cfg.traces.enabled:
            task_status.started()
            return
        found = problems(cfg.traces)
        if found:
            raise ConfigError("traces", found)
        rules = self._current_rules()
        journal = Journal(cfg.state_path / "traces")
        waiting = await anyio.to_thread.run_sync(journal.load)
        self.journal = journal
        self.assembler = Assembler(rules, cfg.traces.episode_timeout, cfg.traces.max_pending_spans)
        self.assembler.restore(waiting)
        try:
            await self._open_listeners(cfg)
            async with anyio.create_task_group() as tg:
                for listener in self.listeners:
                    tg.start_soon(self._accept, listener, tg)
                tg.start_soon(self._expire_loop)
                _log.info("trace receiver ready", path=str(self.path), ports=self.ports, waiting=len(waiting))
                task_status.started()
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        for listener in self.listeners:
            with anyio.CancelScope(shield=True):
                try:
                    await listener.aclose()
                except OSError:
                    pass
        self.listeners = []
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None
        if self.journal is not None:
            self.journal.close()

    async def _open_listeners(self, cfg: Config) -> None:
        traces = cfg.traces
        self.listeners.append(await unix_listener("traces.path", Path(traces.path), cfg.socket.group))
        self.path = Path(traces.path)  # once made: closing removes it
        if traces.port is not None:
            tcp = await loopback_listeners("traces.port", traces.host, traces.port)
            self.listeners.extend(tcp)
            self.ports = sorted({listener.extra(SocketAttribute.local_port) for listener in tcp})

    def _current_rules(self) -> Rules:
        """The mapping for the config in force, compiled again when it (or redaction) changed.

        A reload that breaks it keeps the last good one (logged): ``reflexd check-config``
        reports the problem, and spans go on being taken in meanwhile.
        """
        traces, redactor = self.settings().traces, self.peers.redactor
        if self._rules_for[0] is not traces or self._rules_for[1] is not redactor:
            self._rules_for = (traces, redactor)
            try:
                rules = Rules(traces, redactor)
            except ValueError as exc:
                if self._rules is None:
                    raise ConfigError("traces", [str(exc)]) from None
                _log.error("the traces section's new mapping is wrong; keeping the one in force", error=str(exc))
            else:
                self._rules = rules
                if self.assembler is not None:
                    self.assembler.rules = rules
                    self.assembler.timeout = traces.episode_timeout
                    self.assembler.max_waiting = traces.max_pending_spans
        assert self._rules is not None
        return self._rules

    async def _expire_loop(self) -> None:
        while True:
            timeout = self.settings().traces.episode_timeout
            await anyio.sleep(min(5.0, max(0.05, timeout / 4)))
            self._current_rules()
            assert self.assembler is not None
            try:
                plan = self.assembler.expire(time.time())
            except Exception:  # a bug costs this pass, never the daemon: what it took waits for a restart's replay of the journal
                _log.exception("assembling the episodes past traces.episode_timeout failed")
                continue
            if not (plan.events or plan.dead or plan.taken):
                continue
            try:
                await self._durable(plan, [self._dead(None, "refused_steps", reason, b"", 0) for reason in plan.dead])
            except (RequestTimeout, StorageError) as exc:
                _log.warning("steps past traces.episode_timeout are not durable yet; trying again", error=str(exc))
            except Exception:  # a bug: the steps wait again (failed), and the receiver goes on
                _log.exception("sending out the steps past traces.episode_timeout failed")

    async def _durable(self, plan: Plan, dead: list[DeadLetter]) -> None:
        """Make ``plan`` durable: its messages in the spool, then the journal; undone if either fails."""
        assert self.assembler is not None and self.journal is not None
        try:
            if plan.events or dead:
                await self.submit(plan.events, dead)
            if plan.journal or plan.done:
                async with self._journal_lock:
                    await anyio.to_thread.run_sync(self.journal.write, plan.journal, plan.done)
        except BaseException:
            self.assembler.failed(plan)
            raise
        self.assembler.committed(plan)
        c = self.counters
        c.steps += plan.steps
        c.episodes += plan.episodes
        c.late_steps += plan.late_steps
        c.expired += plan.expired
        c.refused_steps += plan.refused
        c.reward_errors += plan.reward_errors
        if self.journal.due(self.assembler.waiting):
            async with self._journal_lock:
                try:
                    await anyio.to_thread.run_sync(self.journal.compact, self.assembler.live())
                except StorageError as exc:  # the file stays as it was, only larger
                    _log.warning("rewriting the waiting steps' journal failed", error=str(exc))

    async def forget(self, agent: str) -> int:
        """Drop the steps waiting for ``agent``'s episodes, in memory and in the journal."""
        if self.assembler is None or self.journal is None:
            return 0
        async with self._journal_lock:
            dropped = self.assembler.forget(agent)
            if dropped:
                await anyio.to_thread.run_sync(self.journal.compact, self.assembler.live())
        return dropped

    # ---- HTTP ----------------------------------------------------------------------------

    async def _accept(self, listener: Listener[Any], tg: anyio.abc.TaskGroup) -> None:
        await accept_each(listener, tg, self._handle, self.slots.take, "trace receiver")

    async def _handle(self, stream: Any) -> None:
        try:
            # /proc/net/tcp and the user database are files: read off the event loop
            peer = await anyio.to_thread.run_sync(_peer_of, stream)
            if not self._allowed(peer):  # refused at once: a stranger holds no slot while it dawdles
                self.counters.forbidden += 1
                _log.warning("trace connection refused", peer_uid=peer.uid, peer_pid=peer.pid, peer=peer.where)
                why = f"uid {peer.uid} is not allowed" if peer.uid is not None else "cannot tell who is connecting"
                await self._send(stream, 403, _refusal(403, why, otlp.JSON))
                await _linger(stream)
                return
            buffer = bytearray()
            while await self._exchange(stream, buffer, peer):
                pass
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError):
            pass
        except Exception:  # a bug costs this connection, never the daemon
            _log.exception("trace request failed")
        finally:
            self.slots.give()
            await close_stream(stream)

    async def _exchange(self, stream: Any, buffer: bytearray, peer: _Peer) -> bool:
        """Read one request and answer it; whether the connection may carry another."""
        cfg = self.settings()
        head: bytes | None = None
        encoding = otlp.JSON  # what an error is answered in until the request says otherwise
        with anyio.move_on_after(cfg.traces.timeout) as reading:
            try:
                head = await _read_head(stream, buffer)
                if head is None:
                    return False
                method, target, headers, keep_alive = _parse_head(head)
                if not self._allowed(peer):
                    self.counters.forbidden += 1
                    _log.warning("trace request refused", peer_uid=peer.uid, peer_pid=peer.pid, peer=peer.where)
                    raise TraceError(f"uid {peer.uid} is not allowed" if peer.uid is not None else "cannot tell who is connecting", 403)
                if target.split("?", 1)[0] != PATH:
                    raise TraceError(f"not found: this receiver takes POST {PATH}", 404)
                if method != "POST":
                    raise TraceError(f"only POST {PATH}", 405)
                length = _content_length(headers)
                refused = None
                try:
                    encoding = otlp.encoding_of(headers.get("content-type"))
                except TraceError as exc:
                    refused = exc
                limit = cfg.traces.max_body_bytes
                if refused is None and length > limit:
                    refused = TraceError(f"a body of {length} bytes is over the limit of {limit} (traces.max_body_bytes)", 413)
                if refused is not None:  # answered before its body is read: the connection ends with it
                    await self._reject(peer, refused, b"", length)
                    raise refused
                if headers.get("expect", "").lower() == "100-continue":
                    await stream.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = await _read_body(stream, buffer, length)
            except TraceError as exc:
                if exc.status in (400, 411, 431):
                    self.counters.bad_requests += 1
                await self._send(stream, exc.status, _refusal(exc.status, exc.reason, encoding))
                await _linger(stream)
                return False
        if reading.cancelled_caught:
            if head is not None or buffer:  # stopped half-way through a request
                await self._send(stream, 408, _refusal(408, "the request took too long to arrive", encoding))
            return False
        status, reply = await self._export(body, headers, encoding, peer)
        await self._send(stream, status, reply)
        return keep_alive and status != 503

    async def _export(self, body: bytes, headers: dict[str, str], encoding: str, peer: _Peer) -> tuple[int, bytes]:
        cfg = self.settings()
        rules = self._current_rules()
        now = time.time()

        def decoded() -> tuple[Any, str]:
            # decompressing, parsing and mapping a body of up to max_body_bytes: not on the event loop
            request, found = otlp.decode_request(body, headers.get("content-type"), headers.get("content-encoding"), cfg.traces.max_body_bytes)
            return rules.extract(request, now), found

        try:
            extracted, encoding = await anyio.to_thread.run_sync(decoded)
        except TraceError as exc:
            await self._reject(peer, exc, body, len(body))
            return exc.status, _response(exc.status, otlp.encode_status(encoding, exc.status, exc.reason), encoding)
        assert self.assembler is not None
        plan = self.assembler.add(extracted.records, now)
        rejected = extracted.rejected + plan.rejected
        dead = [self._dead(peer, "refused_steps", reason, b"", 0) for reason in plan.dead]
        if extracted.rejected:
            dead.append(self._dead(peer, "rejected_spans", _summary(extracted.rejected, extracted.spans), body, len(body)))
        try:
            await self._durable(plan, dead)
        except (RequestTimeout, StorageError) as exc:
            self.counters.unavailable += 1
            _log.warning("trace request answered 503: not durable in time", error=str(exc))
            return 503, _response(503, otlp.encode_status(encoding, 503, str(exc)), encoding, extra=f"Retry-After: {RETRY_AFTER_SECONDS}\r\n", close=True)
        self.counters.spans += extracted.spans
        self.counters.rejected_spans += len(rejected)
        message = _summary(rejected, extracted.spans) if rejected else ""
        return 200, _response(200, otlp.encode_response(encoding, len(rejected), message), encoding)

    def _allowed(self, peer: _Peer) -> bool:
        return peer.uid is not None and self.peers.allowed(peer.uid, peer.groups)

    async def _reject(self, peer: _Peer, exc: TraceError, raw: bytes, size: int) -> None:
        """Dead-letter a request refused whole (400, 413 or 415); dead letters are queued, not waited for."""
        self.counters.bad_requests += 1
        code = "too_large" if exc.status == 413 else exc.code
        try:
            await self.submit((), [self._dead(peer, code, exc.reason, raw, size)])
        except (RequestTimeout, StorageError) as failed:  # the refusal is answered whatever becomes of its record
            _log.warning("a refused trace request was not dead-lettered", error=str(failed))

    def _dead(self, peer: _Peer | None, code: str, reason: str, raw: bytes, size: int) -> DeadLetter:
        cfg = self.settings()
        keep = cfg.traces.capture_content and cfg.redaction.dead_letter_raw  # bodies may hold message content
        return DeadLetter(
            received_at=time.time(),
            peer_uid=peer.uid if peer is not None else None,
            peer_pid=peer.pid if peer is not None else None,
            code=code,
            reason=reason,
            raw=raw[: cfg.ingest.dead_letter_bytes] if keep else b"",
            raw_size=size,
        )

    async def _send(self, stream: Any, status: int, data: bytes) -> None:
        self.counters.requests += 1
        self.counters.by_status[status] = self.counters.by_status.get(status, 0) + 1
        await stream.send(data)


def _refusal(status: int, message: str, encoding: str) -> bytes:
    """A refusal's reply, after which the connection is closed (its body may not have been read)."""
    extra = "Allow: POST\r\n" if status == 405 else ""
    return _response(status, otlp.encode_status(encoding, status, message), encoding, extra=extra, close=True)


def _response(status: int, body: bytes, encoding: str, extra: str = "", close: bool = False) -> bytes:
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: {otlp.CONTENT_TYPES[encoding]}\r\n"
        f"Content-Length: {len(body)}\r\n{'Connection: close' + chr(13) + chr(10) if close else ''}{extra}\r\n"
    )
    return head.encode() + body


def _summary(reasons: list[str], spans: int) -> str:
    shown = "; ".join(reasons[:MAX_REASONS])
    more = f"; and {len(reasons) - MAX_REASONS} more" if len(reasons) > MAX_REASONS else ""
    return f"{len(reasons)} of {spans} spans rejected: {shown}{more}"


async def _linger(stream: Any) -> None:
    """End a connection whose request body was left unread without losing the reply.

    Closed with unread bytes waiting, a TCP socket sends a reset, which can reach the client
    before it has read the reply; so the sending side is shut first and what the client still
    sends is read and dropped, for a short while.
    """
    with anyio.move_on_after(LINGER_SECONDS):
        try:
            await stream.send_eof()
            while await stream.receive(READ_BYTES):
                pass
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass


async def _read_head(stream: Any, buffer: bytearray) -> bytes | None:
    """The request line and headers (None if the peer closed between requests)."""
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            return head
        if len(buffer) > MAX_REQUEST_BYTES:
            raise TraceError(f"the request's head is over {MAX_REQUEST_BYTES} bytes", 431)
        try:
            buffer += await stream.receive(READ_BYTES)
        except anyio.EndOfStream:
            if buffer.strip():
                raise TraceError("the request's head is cut short") from None
            return None


async def _read_body(stream: Any, buffer: bytearray, length: int) -> bytes:
    while len(buffer) < length:
        try:
            buffer += await stream.receive(max(READ_BYTES, length - len(buffer)))
        except anyio.EndOfStream:
            raise TraceError(f"the body is cut short: {len(buffer)} of {length} bytes") from None
    body = bytes(buffer[:length])
    del buffer[:length]
    return body


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str], bool]:
    """Method, target, headers (names in lower case) and whether the connection may be kept."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise TraceError("not an HTTP/1.1 request")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise TraceError(f"a header line that is not a header: {line[:100]!r}")
        name, value = name.lower(), value.strip()
        if name in headers and name == "content-length" and headers[name] != value:
            raise TraceError("two different Content-Length headers")
        headers[name] = f"{headers[name]}, {value}" if name in headers and name != "content-length" else value
    connection = headers.get("connection", "").lower()
    keep_alive = parts[2] == "HTTP/1.1" and "close" not in connection
    return parts[0], parts[1], headers, keep_alive


def _content_length(headers: dict[str, str]) -> int:
    if "transfer-encoding" in headers:
        raise TraceError("a chunked body is not read here: send it with a Content-Length", 411)
    value = headers.get("content-length")
    if value is None:
        raise TraceError("a Content-Length is required", 411)
    # ASCII digits only ("²" is a digit to str.isdigit but not to int), and no more than a byte count needs
    if not (value.isascii() and value.isdigit() and len(value) <= 19):
        raise TraceError(f"Content-Length {value[:40]!r} is not a number of bytes")
    return int(value)


# ---- peers ---------------------------------------------------------------------------------


def _peer_of(stream: Any) -> _Peer:
    """Who is at the other end: SO_PEERCRED on the Unix socket, /proc/net/tcp on the port."""
    family = stream.extra(SocketAttribute.family)
    if family == socket.AF_UNIX:
        pid, uid, gid = peer_credentials(stream)
        return _Peer(uid, pid, peer_groups(stream.extra(SocketAttribute.raw_socket), pid, gid), "unix")
    local = stream.extra(SocketAttribute.local_address)
    remote = stream.extra(SocketAttribute.remote_address)
    uid = tcp_peer_uid(family, local, remote)
    return _Peer(uid, None, _user_groups(uid) if uid is not None else frozenset(), f"tcp {remote[0]}:{remote[1]}")


def tcp_peer_uid(family: int, local: Sequence[Any], remote: Sequence[Any]) -> int | None:
    """The uid owning the peer's end of a loopback TCP connection, or None if it cannot be told.

    The kernel lists every TCP socket of this network namespace in /proc/net/tcp (tcp6), with
    the uid that created it: the peer's socket is the one whose local address is our remote
    address and whose remote address is ours.
    """
    table = "/proc/net/tcp6" if family == socket.AF_INET6 else "/proc/net/tcp"
    try:
        theirs = _proc_address(family, remote[0], remote[1])
        ours = _proc_address(family, local[0], local[1])
        with open(table, encoding="ascii") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) > 7 and fields[1] == theirs and fields[2] == ours:
                    return int(fields[7])
    except (OSError, ValueError):
        pass
    return None


def _proc_address(family: int, host: str, port: int) -> str:
    packed = socket.inet_pton(family, host.split("%", 1)[0])
    # each 32-bit word as the kernel prints it: in the host's byte order
    words = struct.unpack(f"={len(packed) // 4}I", packed)
    return "".join(f"{word:08X}" for word in words) + f":{port:04X}"


def _user_groups(uid: int) -> frozenset[int]:
    """A user's primary and supplementary groups, from the user and group databases."""
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return frozenset()
    try:
        return frozenset(os.getgrouplist(user.pw_name, user.pw_gid))
    except OSError:
        return frozenset((user.pw_gid,))
