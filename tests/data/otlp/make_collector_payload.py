"""Write the request bodies an OpenTelemetry Collector's ``otlphttp`` exporter sends for one batch.

Run from the repository root: ``.venv/bin/python tests/data/otlp/make_collector_payload.py``.
README.md beside this file says what the bodies hold and which of the Collector's habits they keep.
"""

from __future__ import annotations

import base64
import json
import struct
import zlib
from pathlib import Path

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

HERE = Path(__file__).resolve().parent
T0 = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z, in ns: fixed, so the files never change
MS = 1_000_000
# W3C sampled, and the OTLP 1.1 "has is_remote" bit: what pdata carries over from an SDK's export
FLAGS_LOCAL = 0x101
FLAGS_REMOTE_PARENT = 0x301


def kv(key: str, value: object) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


def span(trace: str, span_id: str, parent: str, name: str, kind: int, start_ms: int, end_ms: int,
         attrs: dict[str, object], error: str | None = None, flags: int = FLAGS_LOCAL) -> Span:
    s = Span(
        trace_id=bytes.fromhex(trace), span_id=bytes.fromhex(span_id), parent_span_id=bytes.fromhex(parent),
        name=name, kind=kind, start_time_unix_nano=T0 + start_ms * MS, end_time_unix_nano=T0 + end_ms * MS,
        attributes=[kv(k, v) for k, v in attrs.items()], flags=flags,
    )
    if error is not None:
        s.status.CopyFrom(Status(code=Status.STATUS_CODE_ERROR, message=error))
    return s


def request() -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    sdk = {"telemetry.sdk.language": "python", "telemetry.sdk.name": "opentelemetry", "telemetry.sdk.version": "1.38.0"}

    # service one: a support agent; the batch processor put two of its scopes' spans together
    rs = req.resource_spans.add(schema_url="https://opentelemetry.io/schemas/1.37.0")
    rs.resource.attributes.extend([kv("service.name", "support-desk"), kv("host.name", "worker-3"), *(kv(k, v) for k, v in sdk.items())])
    a = "4bf92f3577b34da6a3ce929d0e0e4736"
    http = rs.scope_spans.add(schema_url="https://opentelemetry.io/schemas/1.11.0")
    http.scope.name, http.scope.version = "opentelemetry.instrumentation.fastapi", "0.59b0"
    agents = rs.scope_spans.add()
    agents.scope.name, agents.scope.version = "opentelemetry.instrumentation.openai_agents", "0.1.0"
    agents.spans.extend([
        # ended first, exported first: the children of invoke_agent
        span(a, "53995c3f42cd8ad8", "9c2a1b0e6f4d3a21", "chat gpt-4o-mini", 3, 12, 840, {
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o-mini",
            "gen_ai.request.temperature": 0.2, "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
            "gen_ai.usage.input_tokens": 412, "gen_ai.usage.output_tokens": 38,
            "gen_ai.input.messages": '[{"role":"user","parts":[{"type":"text","content":"Where is order 1234? My card is 4111 1111 1111 1111"}]}]',
            "gen_ai.output.messages": '[{"role":"assistant","parts":[{"type":"tool_call","name":"lookup_order"}]}]',
        }),
        span(a, "a1b2c3d4e5f60718", "9c2a1b0e6f4d3a21", "execute_tool lookup_order", 1, 845, 1290, {
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup_order", "gen_ai.tool.type": "function",
            "gen_ai.tool.call.id": "call_7Qx", "gen_ai.tool.call.arguments": '{"order_id": "1234"}',
            "gen_ai.tool.call.result": '{"status": "shipped", "address": "12 Elm St"}',
        }),
        span(a, "0f1e2d3c4b5a6978", "9c2a1b0e6f4d3a21", "execute_tool issue_refund", 1, 1300, 1510, {
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "issue_refund", "gen_ai.tool.type": "function",
            "error.type": "RefundDenied",
        }, error="refund window closed"),
        span(a, "77aa88bb99cc00dd", "9c2a1b0e6f4d3a21", "chat gpt-4o-mini", 3, 1520, 2300, {
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o-mini",
            "gen_ai.request.temperature": 0.2, "gen_ai.usage.input_tokens": 530, "gen_ai.usage.output_tokens": 95,
        }),
    ])
    head = span(a, "9c2a1b0e6f4d3a21", "e3b0c44298fc1c14", "invoke_agent support-desk", 1, 5, 2310, {
        "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "support-desk", "gen_ai.agent.id": "asst_42",
        "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o-mini", "gen_ai.conversation.id": "conv_9",
    })
    evaluation = head.events.add(time_unix_nano=T0 + 2305 * MS, name="gen_ai.evaluation.result")
    evaluation.attributes.extend([kv("gen_ai.evaluation.name", "helpfulness"), kv("gen_ai.evaluation.score.value", 0.75),
                                  kv("gen_ai.evaluation.score.label", "good")])
    agents.spans.append(head)
    # the HTTP server span around it, whose parent is the caller's span, in another process
    http.spans.append(span(a, "e3b0c44298fc1c14", "1122334455667788", "POST /support", 2, 0, 2320, {
        "http.request.method": "POST", "http.route": "/support", "http.response.status_code": 200,
        "url.path": "/support", "user_agent.original": "curl/8.5.0",
    }, flags=FLAGS_REMOTE_PARENT))

    # service two: an agent whose invoke_agent span names no agent (its service.name does)
    rs2 = req.resource_spans.add(schema_url="https://opentelemetry.io/schemas/1.37.0")
    rs2.resource.attributes.extend([kv("service.name", "billing-bot"), *(kv(k, v) for k, v in sdk.items())])
    b = "0af7651916cd43dd8448eb211c80319c"
    scope = rs2.scope_spans.add()
    scope.scope.name = "billing.agent"
    scope.spans.extend([
        span(b, "b7ad6b7169203331", "00f067aa0ba902b7", "execute_tool fetch_invoice", 1, 100, 180, {
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "fetch_invoice", "gen_ai.tool.type": "extension",
        }),
        span(b, "5fb397be34d26b51", "b7ad6b7169203331", "SELECT invoices", 3, 110, 170, {
            "db.system.name": "postgresql", "db.query.text": "SELECT * FROM invoices WHERE id = $1",
        }),
        span(b, "00f067aa0ba902b7", "", "invoke_agent", 1, 90, 400, {
            "gen_ai.operation.name": "invoke_agent", "gen_ai.provider.name": "anthropic",
            "gen_ai.usage.input_tokens": 900, "gen_ai.usage.output_tokens": 120,
        }),
    ])
    return req


def as_pdata_json(req: ExportTraceServiceRequest) -> bytes:
    """The OTLP JSON pdata writes: lowerCamelCase, hex ids, int64 as strings, enums as integers, a
    status on every span (``{}`` when unset), no whitespace."""
    raw = json_format.MessageToDict(req, use_integers_for_enums=True)
    for rs in raw["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for s in ss["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in s:
                        s[key] = base64.b64decode(s[key]).hex()
                s.setdefault("status", {})
    return json.dumps(raw, separators=(",", ":")).encode()


def go_gzip(data: bytes) -> bytes:
    """gzip as Go's compress/gzip writes it at its default level (6): a bare header (no name, mtime
    0, XFL 0, OS 255 "unknown"), one deflate stream, the CRC-32 and the size."""
    deflate = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = deflate.compress(data) + deflate.flush()
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


def main() -> None:
    req = request()
    (HERE / "collector-traces.json").write_bytes(as_pdata_json(req))
    (HERE / "collector-traces.pb.gz").write_bytes(go_gzip(req.SerializeToString()))


if __name__ == "__main__":
    main()
