"""The metrics and health endpoint: GET /metrics, /healthz and /readyz over minimal HTTP/1.1.

It runs on the daemon's event loop, on a Unix socket (``metrics.path``) and, when configured, a
loopback TCP port (``metrics.port``). Each exchange is one request and one reply, then the
connection is closed; the request is capped in size, the exchange in time
(``metrics.timeout``), and connections in number. Nothing it does blocks: the counters are read
in memory when scraped (``reflexd.service.metrics``).
"""

from __future__ import annotations

import grp
import os
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import Listener
from prometheus_client import CONTENT_TYPE_LATEST

from reflexd import log
from reflexd.config import Config
from reflexd.errors import SocketError
from reflexd.service.metrics import Metrics
from reflexd.service.server import give_group, prepare_path

_log = log.get("reflexd.endpoint")
MAX_REQUEST_BYTES = 8192
MAX_CONNECTIONS = 16
SOCKET_MODE = 0o660
HEARTBEAT_SECONDS = 0.1
READY_WITHIN_SECONDS = 1.0  # the event loop must have run its heartbeat this recently to be ready
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class Endpoint:
    """Listens where ``config.metrics`` says and answers scrapes and health checks for ``daemon``."""

    def __init__(self, config: Config, daemon: Any) -> None:
        self.config = config
        self.daemon = daemon
        self.metrics = Metrics(daemon, lambda: self.lag)
        self.listeners: list[Listener[Any]] = []
        self.path: Path | None = None
        self.beat = time.monotonic()  # the heartbeat's last run
        self.lag = 0.0  # how late it ran
        self.slots = Slots(MAX_CONNECTIONS)

    @property
    def enabled(self) -> bool:
        m = self.config.metrics
        return m.path is not None or m.port is not None

    async def open_listeners(self) -> None:
        """Bind the Unix socket and the TCP port; SocketError if either cannot be used."""
        m = self.config.metrics
        if m.path is not None:
            self.listeners.append(await unix_listener("metrics.path", Path(m.path), self.config.socket.group))
            self.path = Path(m.path)  # once made: closing removes it
        if m.port is not None:
            self.listeners.extend(await loopback_listeners("metrics.port", m.host, m.port))

    async def serve(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._heartbeat)
            for listener in self.listeners:
                tg.start_soon(self._accept, listener, tg)
            _log.info("metrics endpoint ready", path=self.config.metrics.path, port=self.config.metrics.port)

    async def aclose(self) -> None:
        for listener in self.listeners:
            try:
                await listener.aclose()
            except OSError:
                pass
        self.listeners = []
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    # ---- health --------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        while True:
            due = time.monotonic() + HEARTBEAT_SECONDS
            await anyio.sleep(HEARTBEAT_SECONDS)
            self.beat = time.monotonic()
            self.lag = max(0.0, self.beat - due)

    def readiness(self) -> list[str]:
        """Why the daemon is not ready: empty when storage is writable and the event loop answers."""
        reasons = []
        error = self.daemon.ingest.storage_error
        if error:
            reasons.append(f"storage is not writable: {error}")
        stalled = max(time.monotonic() - self.beat, self.lag)
        if stalled > READY_WITHIN_SECONDS:
            reasons.append(f"the event loop did not answer for {stalled:.1f} s")
        return reasons

    # ---- HTTP ----------------------------------------------------------------------------

    async def _accept(self, listener: Listener[Any], tg: anyio.abc.TaskGroup) -> None:
        await accept_each(listener, tg, self._handle, self.slots.take, "metrics endpoint")

    async def _handle(self, stream: Any) -> None:
        try:
            with anyio.move_on_after(self.config.metrics.timeout):
                try:
                    reply = await self._exchange(stream)
                    if reply is not None:
                        await stream.send(reply)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError):
                    pass
        except Exception:  # a bug costs this exchange, never the daemon
            _log.exception("metrics request failed")
        finally:
            self.slots.give()
            await close_stream(stream)

    async def _exchange(self, stream: Any) -> bytes | None:
        head = b""
        while b"\r\n\r\n" not in head and b"\n\n" not in head:
            if len(head) > MAX_REQUEST_BYTES:
                return _reply(431, b"request too large\n")
            try:
                head += await stream.receive(4096)
            except anyio.EndOfStream:
                return None
        parts = head.split(b"\n", 1)[0].strip().split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return _reply(400, b"bad request\n")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method != b"GET":
            return _reply(405, b"only GET\n", extra=b"Allow: GET\r\n")
        return self.route(target)

    def route(self, target: bytes) -> bytes:
        if target == b"/metrics":
            try:
                body = self.metrics.exposition()
            except Exception as exc:
                _log.exception("collecting metrics failed")
                return _reply(500, f"collecting metrics failed: {type(exc).__name__}\n".encode())
            return _reply(200, body, CONTENT_TYPE_LATEST)
        if target == b"/healthz":
            return _reply(200, b"ok\n")
        if target == b"/readyz":
            reasons = self.readiness()
            body = msgspec.json.encode({"ready": not reasons, "reasons": reasons}) + b"\n"
            return _reply(503 if reasons else 200, body, "application/json")
        return _reply(404, b"not found: try /metrics, /healthz or /readyz\n")


def _reply(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8", extra: bytes = b"") -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\nCache-Control: no-store\r\n"
    ).encode()
    return head + extra + b"\r\n" + body


async def unix_listener(key: str, path: Path, group: int | str | None) -> Listener[Any]:
    """A listening socket at ``path``, mode 0660, given ``group`` (socket.group) with its directory,
    after the same directory checks as the agents' socket; SocketError naming ``key`` if it cannot be made."""
    try:
        prepare_path(path)
        listener = await anyio.create_unix_listener(path, mode=SOCKET_MODE)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and exc.filename != str(path) else ""
        raise SocketError(f"{key} {path}: {exc.strerror or exc}{where}") from None
    os.chmod(path, SOCKET_MODE)
    if group is not None:
        gid = group if isinstance(group, int) else grp.getgrnam(group).gr_gid
        give_group(path.parent, gid)
        give_group(path, gid)
    return listener


async def loopback_listeners(key: str, host: str, port: int) -> list[Listener[Any]]:
    """TCP listeners on ``host``:``port`` (0: a free one); SocketError naming ``key`` if it is taken."""
    try:
        multi = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as exc:
        raise SocketError(f"{key}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return list(multi.listeners)


class Slots:
    """Connections open at once, up to ``limit``: ``take`` one (False when none is left), ``give`` it back."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    def take(self) -> bool:
        if self.open >= self.limit:
            return False
        self.open += 1
        return True

    def give(self) -> None:
        self.open -= 1


async def accept_each(
    listener: Listener[Any], tg: anyio.abc.TaskGroup, handle: Any, take: Any, what: str
) -> None:
    """Accept connections until ``listener`` closes, each handled by ``handle(stream)`` in ``tg``
    if ``take()`` (which counts it) says there is room, else closed at once. Failing to accept
    (out of descriptors, say) is logged once and tried again."""
    failing = False
    while True:
        try:
            stream = await listener.accept()
        except anyio.ClosedResourceError:
            return
        except (anyio.BrokenResourceError, OSError) as exc:
            if not failing:
                _log.error(f"{what} cannot accept connections", error=str(exc.__cause__ or exc))
            failing = True
            await anyio.sleep(0.1)
            continue
        failing = False
        if not take():
            await close_stream(stream)
            continue
        tg.start_soon(handle, stream)


async def close_stream(stream: Any) -> None:
    with anyio.CancelScope(shield=True):
        try:
            await stream.aclose()
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
