"""The OTLP/HTTP trace receiver end to end: the OpenTelemetry SDK's own exporter, a Collector's
recorded batch and raw HTTP, on the loopback port and the Unix socket, into a real spool and store.

The receiver runs in-process on an event loop of its own thread (an anyio blocking portal), with
the daemon's Ingest, Spool and Store behind ``durably``, as the daemon wires them; the SDK and the
HTTP clients, which block, run in the test's thread.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import urllib3
from anyio.from_thread import start_blocking_portal
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.trace import Status, StatusCode

from reflexd.collect import receiver as receiver_module
from reflexd.collect.receiver import TraceReceiver, durably
from reflexd.config import Config, IngestConfig, SocketConfig, TracesConfig
from reflexd.errors import RequestTimeout
from reflexd.service.ingest import Ingest
from reflexd.service.redact import Redactor
from reflexd.service.spool import Spool
from reflexd.service.store import Store

DATA = Path(__file__).resolve().parents[1] / "data" / "otlp"
TIMEOUT = 10.0
SECRET = "4111 1111 1111 1111"


class Peers:
    """The socket server's part the receiver uses: who may send (here: whoever the test says)."""

    def __init__(self, allow: bool = True) -> None:
        self.redactor = Redactor()
        self.allow = allow
        self.asked: list[int] = []

    def allowed(self, uid: int, groups: frozenset[int]) -> bool:
        self.asked.append(uid)
        return self.allow


class Live:
    """A receiver serving on a Unix socket and a loopback port, a real store behind it."""

    def __init__(self, root: Path, sock_dir: Path, peers: Peers | None = None, **traces: Any) -> None:
        self.root, self.peers = root, peers or Peers()
        traces = {"enabled": True, "path": str(sock_dir / "traces.sock"), "port": 0, **traces}
        self.config = Config(
            state_dir=str(root / "state"),
            socket=SocketConfig(path=str(sock_dir / "reflexd.sock"), request_timeout=TIMEOUT),
            ingest=IngestConfig(flush_interval=0.005),
            traces=TracesConfig(**traces),
        )
        self.fail_next = 0  # submits to fail as a store too slow would (RequestTimeout)

    def __enter__(self) -> Live:
        self._portal_cm = start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        (self.root / "state").mkdir(parents=True, exist_ok=True, mode=0o750)
        self.store = Store(self.root / "state" / "r.duckdb")
        self.ingest = Ingest(self.store, Spool(self.root / "state" / "spool", 1 << 20), self.config.ingest)
        self._ingest_run = self.portal.start_task_soon(self.ingest.run)
        self.start()
        return self

    def start(self) -> None:
        durable = durably(self.ingest, lambda: self.config)

        async def submit(events: Any, dead: Any) -> None:
            if self.fail_next and events:
                self.fail_next -= 1
                raise RequestTimeout("traces: the spans are not durable in the spool", TIMEOUT)
            await durable(events, dead)

        self.receiver = TraceReceiver(lambda: self.config, self.peers, submit)
        self._run, _ = self.portal.start_task(self.receiver.run)

    def stop(self) -> None:
        self._run.cancel()
        try:
            self._run.result(TIMEOUT)
        except BaseException:  # noqa: BLE001  (cancelled, as asked)
            pass

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
            self.portal.call(self.ingest.close)
            self._ingest_run.result(TIMEOUT)
        finally:
            self.store.close()
            self._portal_cm.__exit__(None, None, None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.receiver.ports[0]}/v1/traces"

    def rows(self, sql: str) -> list[tuple]:
        self.portal.call(partial(self.ingest.barrier, loaded=True))
        with self.store._lock:
            return self.store._con.execute(sql).fetchall()

    def steps(self) -> list[tuple]:
        return self.rows('SELECT agent, episode, idx, action, reward, done, id, observation FROM steps ORDER BY episode, idx')

    def wait_for_steps(self, n: int) -> list[tuple]:
        deadline = time.monotonic() + TIMEOUT
        while True:
            found = self.steps()
            if len(found) >= n or time.monotonic() > deadline:
                return found
            time.sleep(0.02)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="rx-"))  # socket paths are limited to 108 bytes
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


@pytest.fixture
def live(tmp_path: Path, sock_dir: Path) -> Iterator[Live]:
    with Live(tmp_path, sock_dir, reward="success - 0.001 * tokens") as running:
        yield running


def agent_run(provider: TracerProvider, fail_refund: bool = True) -> None:
    """One run of a support agent, traced as the GenAI semantic conventions say."""
    tracer = provider.get_tracer("support.agent")
    attrs = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "support", "gen_ai.provider.name": "openai"}
    with tracer.start_as_current_span("invoke_agent support", attributes=attrs) as agent:
        with tracer.start_as_current_span("chat gpt-4o-mini", attributes={
            "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o-mini", "gen_ai.usage.input_tokens": 400,
            "gen_ai.usage.output_tokens": 100, "gen_ai.input.messages": f'[{{"role":"user","content":"card {SECRET}"}}]',
        }):
            pass
        with tracer.start_as_current_span("execute_tool lookup_order", attributes={
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup_order", "gen_ai.tool.type": "function",
            "gen_ai.tool.call.arguments": f'{{"card": "{SECRET}"}}',
        }):
            pass
        with tracer.start_as_current_span("execute_tool issue_refund", attributes={
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "issue_refund",
        }) as refund:
            if fail_refund:
                refund.set_status(Status(StatusCode.ERROR, "refund window closed"))
                refund.set_attribute("error.type", "RefundDenied")
        agent.add_event("gen_ai.evaluation.result", {"gen_ai.evaluation.name": "resolved", "gen_ai.evaluation.score.value": 1.0})


def provider_for(exporter: OTLPSpanExporter, batch: bool) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "support-svc"}))
    provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    return provider


# ---- the OpenTelemetry SDK's own exporter -------------------------------------------------------


@pytest.mark.parametrize(("batch", "compression"), [(True, Compression.Gzip), (False, Compression.NoCompression)])
def test_the_sdk_exporter_on_the_loopback_port_delivers_episodes_as_steps(live: Live, batch: bool, compression: Compression) -> None:
    # Simple: one request per span, the children before their parent; Batch: one request, gzipped
    provider = provider_for(OTLPSpanExporter(endpoint=live.url, compression=compression, timeout=TIMEOUT), batch)
    agent_run(provider)
    assert provider.force_flush(int(TIMEOUT * 1000))
    provider.shutdown()
    rows = live.wait_for_steps(3)
    assert [(r[0], r[2], r[3], r[5]) for r in rows] == [
        ("support", 0, "gpt-4o-mini", False), ("support", 1, "lookup_order", False), ("support", 2, "issue_refund", True),
    ]
    assert len({r[1] for r in rows}) == 1 and all(r[6].startswith(r[1][:32]) for r in rows)  # ids: trace + span
    assert rows[2][4] == pytest.approx(1 - 0.001 * 500)  # the episode succeeded; its steps used 500 tokens
    assert all(SECRET not in r[7] for r in rows)  # message content never stored
    (episode,) = live.rows("SELECT data FROM events WHERE kind = 'episode'")
    assert json.loads(episode[0])["score"] == 1.0
    # asked when each connection opens, and again at each request (a reload may have revoked the peer since)
    assert live.receiver.counters.rejected_spans == 0 and set(live.peers.asked) == {os.getuid()}
    assert len(live.peers.asked) > live.receiver.counters.requests


def test_the_sdk_exporter_reaches_the_unix_socket_through_a_requests_session(live: Live) -> None:
    session = requests.Session()
    session.mount("http://reflexd/", UnixAdapter(str(live.receiver.path)))
    exporter = OTLPSpanExporter(endpoint="http://reflexd/v1/traces", session=session, compression=Compression.Gzip)
    provider = provider_for(exporter, batch=True)
    for _ in range(3):
        agent_run(provider, fail_refund=False)
    assert provider.force_flush(int(TIMEOUT * 1000))
    provider.shutdown()
    rows = live.wait_for_steps(9)
    assert len(rows) == 9 and len({r[1] for r in rows}) == 3
    assert [r[4] for r in rows if r[5]] == pytest.approx([1 - 0.5] * 3)


def test_spans_sent_again_after_a_lost_reply_are_stored_once(live: Live) -> None:
    body = (DATA / "collector-traces.pb.gz").read_bytes()
    for _ in range(2):
        status, _, _ = http(live, "POST", body=body, headers={"Content-Encoding": "gzip"})
        assert status == 200
    assert len(live.steps()) == 5 and live.rows("SELECT count(*) FROM events WHERE kind = 'episode'") == [(2,)]


# ---- a Collector's otlphttp exporter -------------------------------------------------------------


COLLECTOR_HEADERS = {"User-Agent": "OpenTelemetry Collector Contrib/0.139.0 (linux/amd64)", "Content-Encoding": "gzip"}


@pytest.mark.parametrize("encoding", ["proto", "json"])
def test_a_recorded_collector_batch_is_taken_in_whole(live: Live, encoding: str) -> None:
    if encoding == "proto":
        body, content_type = (DATA / "collector-traces.pb.gz").read_bytes(), "application/x-protobuf"
    else:  # otlphttp with encoding: json, gzipped as it does by default
        body, content_type = gzip.compress((DATA / "collector-traces.json").read_bytes()), "application/json"
    status, headers, reply = http(live, "POST", body=body, headers={**COLLECTOR_HEADERS, "Content-Type": content_type})
    assert status == 200 and headers["content-type"] == content_type
    assert reply in (b"", b"{}")  # everything accepted: no partial_success
    rows = live.steps()
    support = [r for r in rows if r[0] == "support-desk"]
    assert [(r[2], r[3], r[5]) for r in support] == [
        (0, "gpt-4o-mini", False), (1, "lookup_order", False), (2, "issue_refund", False), (3, "gpt-4o-mini", True),
    ]
    assert {r[1] for r in support} == {"4bf92f3577b34da6a3ce929d0e0e4736" + "9c2a1b0e6f4d3a21"}
    billing = [r for r in rows if r[0] == "billing-bot"]  # its invoke_agent span names no agent: its service does
    assert [(r[2], r[3], r[5]) for r in billing] == [(0, "fetch_invoice", True)]
    stored = json.dumps(live.rows("SELECT observation FROM steps") + live.rows("SELECT data FROM events"))
    for content in ("4111", "12 Elm St", "order_id", "SELECT * FROM invoices", "curl/8.5.0"):
        assert content not in stored
    outcome = {json.loads(d)["action"]: json.loads(d) for (d,) in live.rows("SELECT data FROM events WHERE kind = 'step_outcome'")}
    assert outcome["issue_refund"]["error_type"] == "RefundDenied" and outcome["issue_refund"]["success"] is False
    (score,) = live.rows("SELECT data->>'score' FROM events WHERE kind = 'episode' AND agent = 'support-desk'")[0]
    assert float(score) == 0.75


# ---- HTTP as the specification says ----------------------------------------------------------------


def test_requests_share_one_kept_alive_connection_and_100_continue_is_answered(live: Live) -> None:
    body = (DATA / "collector-traces.pb.gz").read_bytes()
    with socket.create_connection(("127.0.0.1", live.receiver.ports[0]), timeout=TIMEOUT) as s:
        for expect in (False, True):
            head = (f"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
                    f"Content-Encoding: gzip\r\nContent-Length: {len(body)}\r\n")
            if expect:
                s.sendall((head + "Expect: 100-continue\r\n\r\n").encode())
                assert read_reply(s)[0] == 100
            else:
                s.sendall(head.encode() + b"\r\n")
            s.sendall(body)
            status, headers, _ = read_reply(s)
            assert status == 200 and "connection" not in headers


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status"),
    [
        ("GET", "/v1/traces", {}, b"", 405),
        ("POST", "/v1/metrics", {"Content-Type": "application/x-protobuf"}, b"", 404),
        ("POST", "/v1/traces", {"Content-Type": "text/plain"}, b"hello", 415),
        ("POST", "/v1/traces", {"Content-Type": "application/x-protobuf", "Content-Encoding": "br"}, b"x", 415),
        ("POST", "/v1/traces", {"Content-Type": "application/x-protobuf", "Transfer-Encoding": "chunked"}, None, 411),
        ("POST", "/v1/traces", {"Content-Type": "application/x-protobuf"}, b"\xff\xff\xff\xff", 400),
        ("POST", "/v1/traces", {"Content-Type": "application/json"}, b'{"resourceSpans": [{"scopeSpans": 5}]}', 400),
        ("POST", "/v1/traces", {"Content-Type": "application/x-protobuf"}, bytes(70_000), 413),
        ("POST", "/v1/traces", {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}, gzip.compress(bytes(200_000)), 413),
    ],
)
def test_what_is_not_an_otlp_trace_export_is_refused_with_the_status_the_spec_gives(
    tmp_path: Path, sock_dir: Path, method: str, path: str, headers: dict, body: bytes | None, status: int
) -> None:
    with Live(tmp_path, sock_dir, max_body_bytes=65536) as live:
        got, reply_headers, _ = http(live, method, path, body=body, headers=headers, unix=True)
        assert got == status
        if status == 405:
            assert reply_headers["allow"] == "POST"
        if status in (400, 413, 415):
            # a google.rpc.Status in the request's encoding; in JSON when its media type is not read here
            sent = headers["Content-Type"]
            assert reply_headers["content-type"] == (sent if sent.startswith("application/") else "application/json")
            letters = live.rows("SELECT code, reason, raw, peer_uid FROM dead_letters")
            assert len(letters) == 1 and letters[0][2] == b"" and letters[0][3] == os.getuid()
            assert letters[0][0] == ("too_large" if status == 413 else "bad_trace")
        assert live.steps() == []


def test_spans_that_cannot_be_mapped_are_a_partial_success_and_dead_lettered(live: Live) -> None:
    raw = json.loads((DATA / "collector-traces.json").read_bytes())
    spans = raw["resourceSpans"][0]["scopeSpans"][1]["spans"]
    lookup = next(s for s in spans if s["name"] == "execute_tool lookup_order")
    lookup["attributes"] = [a for a in lookup["attributes"] if a["key"] != "gen_ai.tool.name"]
    status, _, reply = http(live, "POST", body=json.dumps(raw).encode(), headers={"Content-Type": "application/json"})
    assert status == 200
    partial = json.loads(reply)["partialSuccess"]
    assert partial["rejectedSpans"] == "1" and "gen_ai.tool.name" in partial["errorMessage"]
    assert len([r for r in live.steps() if r[0] == "support-desk"]) == 3
    (letter,) = live.rows("SELECT code, reason FROM dead_letters")
    assert letter[0] == "rejected_spans" and "1 of 9 spans rejected" in letter[1]


def test_a_peer_the_allow_list_refuses_is_answered_403_on_either_listener(tmp_path: Path, sock_dir: Path) -> None:
    with Live(tmp_path, sock_dir, peers=Peers(allow=False)) as live:
        body = (DATA / "collector-traces.pb.gz").read_bytes()
        for unix in (True, False):
            status, _, reply = http(live, "POST", body=body, headers={"Content-Encoding": "gzip"}, unix=unix)
            assert status == 403 and b"is not allowed" in reply
        assert live.peers.asked == [os.getuid(), os.getuid()]  # SO_PEERCRED, and /proc/net/tcp for the port
        assert live.steps() == []
    assert not (sock_dir / "traces.sock").exists()  # gone once stopped


def test_a_tcp_peer_whose_user_cannot_be_told_is_refused(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(receiver_module, "tcp_peer_uid", lambda *args: None)  # /proc/net/tcp unreadable, say
    status, _, reply = http(live, "POST", body=b"")
    assert status == 403 and b"cannot tell who is connecting" in reply and live.peers.asked == []


def test_spans_not_durable_in_time_are_answered_503_and_taken_when_sent_again(live: Live) -> None:
    body = (DATA / "collector-traces.pb.gz").read_bytes()
    live.fail_next = 1
    status, headers, _ = http(live, "POST", body=body, headers={"Content-Encoding": "gzip"})
    assert status == 503 and headers["retry-after"] == "1"  # a status OTLP exporters retry
    assert live.steps() == []
    status, _, _ = http(live, "POST", body=body, headers={"Content-Encoding": "gzip"})
    assert status == 200 and len(live.steps()) == 5


def test_steps_acknowledged_before_a_restart_still_join_their_episode(live: Live) -> None:
    # the SDK with a simple processor, over the Unix socket (its path outlives a restart): every
    # span acknowledged on its own, the child long before its parent ends
    session = requests.Session()
    session.mount("http://reflexd/", UnixAdapter(str(live.receiver.path)))
    exporter = OTLPSpanExporter(endpoint="http://reflexd/v1/traces", session=session, timeout=TIMEOUT)
    provider = provider_for(exporter, batch=False)
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("invoke_agent support", attributes={"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "support"}):
        with tracer.start_as_current_span("chat m", attributes={"gen_ai.operation.name": "chat", "gen_ai.request.model": "m"}):
            pass
        assert live.receiver.waiting == 1 and live.steps() == []
        live.stop()  # the daemon restarts between the step and its episode
        live.start()
        assert live.receiver.waiting == 1  # read back from the journal
    provider.shutdown()
    rows = live.wait_for_steps(1)
    assert [(r[0], r[2], r[3], r[5]) for r in rows] == [("support", 0, "m", True)]
    assert live.receiver.waiting == 0


# ---- clients -------------------------------------------------------------------------------------


class _UnixConnection(urllib3.connection.HTTPConnection):
    def __init__(self, path: str, *args: Any, **kwargs: Any) -> None:
        super().__init__("localhost", *args, **kwargs)
        self.unix_path = path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        sock.connect(self.unix_path)
        return sock


class _UnixPool(urllib3.HTTPConnectionPool):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self.unix_path = path

    def _new_conn(self) -> _UnixConnection:
        return _UnixConnection(self.unix_path)


class UnixAdapter(requests.adapters.HTTPAdapter):
    """requests over a Unix socket: what an SDK's ``session`` needs to reach ``traces.path``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.pool = _UnixPool(path)

    def get_connection_with_tls_context(self, request: Any, verify: Any, proxies: Any = None, cert: Any = None) -> _UnixPool:
        return self.pool

    def close(self) -> None:
        self.pool.close()
        super().close()


def http(live: Live, method: str, path: str = "/v1/traces", body: bytes | None = b"", headers: dict | None = None,
         unix: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One request on a connection of its own: status, headers (lower-case names), body."""
    headers = {"Content-Type": "application/x-protobuf", **(headers or {})}
    lines = [f"{method} {path} HTTP/1.1", "Host: reflexd"] + [f"{k}: {v}" for k, v in headers.items()]
    if body is not None and "Transfer-Encoding" not in headers:
        lines.append(f"Content-Length: {len(body)}")
    if unix:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(TIMEOUT)
        s.connect(str(live.receiver.path))
    else:
        s = socket.create_connection(("127.0.0.1", live.receiver.ports[0]), timeout=TIMEOUT)
    with s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        return read_reply(s)


def read_reply(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise AssertionError(f"the connection closed before a reply: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest[:length]



@pytest.mark.parametrize("length", ["9" * 5000, "-1", "0x10"])
def test_a_content_length_that_is_no_byte_count_is_answered_400(live: Live, length: str) -> None:
    status, _, reply = http(live, "POST", body=None, headers={"Content-Length": length, "Content-Type": "application/json"})
    # before: int() raised, and the connection was dropped without a reply
    assert status == 400 and b"is not a number of bytes" in reply
