"""OTLP/HTTP trace bodies (reflexd.collect.otlp): protobuf and JSON, compressed or not, and what is refused."""

from __future__ import annotations

import base64
import gzip
import json
import time
import zlib

import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from reflexd.collect import otlp
from reflexd.errors import TraceError

TRACE = "5b8efff798038103d269b633813fc60c"
SPAN = "eee19b7ec3c1b174"
PARENT = "eee19b7ec3c1b173"
LIMIT = 1 << 20


def a_request() -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value="svc")))
    span = rs.scope_spans.add().spans.add()
    span.CopyFrom(
        Span(
            trace_id=bytes.fromhex(TRACE), span_id=bytes.fromhex(SPAN), parent_span_id=bytes.fromhex(PARENT),
            name="chat m", kind=Span.SPAN_KIND_CLIENT, start_time_unix_nano=1544712660000000000,
            end_time_unix_nano=1544712661000000000, status=Status(code=Status.STATUS_CODE_ERROR, message="boom"),
            attributes=[
                KeyValue(key="gen_ai.operation.name", value=AnyValue(string_value="chat")),
                KeyValue(key="gen_ai.usage.input_tokens", value=AnyValue(int_value=9_007_199_254_740_993)),
            ],
        )
    )
    link = span.links.add()
    link.trace_id, link.span_id = bytes.fromhex(TRACE), bytes.fromhex(PARENT)
    return req


def otlp_json(req: ExportTraceServiceRequest) -> dict:
    """The OTLP JSON encoding: protobuf's JSON mapping, with hex ids and integer enums."""
    raw = json_format.MessageToDict(req, use_integers_for_enums=True)
    for rs in raw["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for span in ss["spans"]:
                for obj in (span, *span.get("links", ())):
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if key in obj:
                            obj[key] = base64.b64decode(obj[key]).hex()
    return raw


def refused(body: bytes, content_type: str = "application/x-protobuf", encoding: str | None = None, limit: int = LIMIT) -> TraceError:
    with pytest.raises(TraceError) as info:
        otlp.decode_request(body, content_type, encoding, limit)
    assert info.value.code == "bad_trace"
    return info.value


# ---- what is read -------------------------------------------------------------------------


def test_a_protobuf_body_decodes_into_its_request() -> None:
    req = a_request()
    decoded, encoding = otlp.decode_request(req.SerializeToString(), "application/x-protobuf", None, LIMIT)
    assert decoded == req and encoding == otlp.PROTOBUF


def test_an_otlp_json_body_with_hex_ids_decodes_into_the_same_request() -> None:
    req = a_request()
    body = json.dumps(otlp_json(req)).encode()
    assert '"traceId": "5b8efff7' in body.decode()  # hex, as OTLP JSON has it (not base64)
    decoded, encoding = otlp.decode_request(body, "application/json", None, LIMIT)
    assert decoded == req and encoding == otlp.JSON
    # the int64 beyond a double's precision came as a string and is exact
    assert decoded.resource_spans[0].scope_spans[0].spans[0].attributes[1].value.int_value == 9_007_199_254_740_993


def test_json_as_other_writers_send_it_is_read_too() -> None:
    # upper-case hex, nanoseconds as numbers, original field names, enum names, and fields this
    # version does not know (which the OTLP spec says receivers must ignore)
    raw = {
        "resource_spans": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "svc"}}]},
            "scope_spans": [{"spans": [{
                "trace_id": TRACE.upper(), "span_id": SPAN.upper(), "parent_span_id": "", "name": "x",
                "kind": "SPAN_KIND_SERVER", "start_time_unix_nano": 1544712660000000000, "end_time_unix_nano": "1544712661000000000",
                "flags": 257, "a_field_from_the_future": {"x": 1},
            }]}],
        }],
        "unknown_top_level": True,
    }
    decoded, _ = otlp.decode_request(json.dumps(raw).encode(), "Application/JSON; charset=utf-8", None, LIMIT)
    span = decoded.resource_spans[0].scope_spans[0].spans[0]
    assert span.trace_id.hex() == TRACE and span.span_id.hex() == SPAN and span.parent_span_id == b""
    assert span.kind == Span.SPAN_KIND_SERVER and span.end_time_unix_nano == 1544712661000000000


@pytest.mark.parametrize("coding", ["gzip", "GZIP", "x-gzip"])
def test_a_gzip_body_is_inflated(coding: str) -> None:
    req = a_request()
    decoded, _ = otlp.decode_request(gzip.compress(req.SerializeToString()), "application/x-protobuf", coding, LIMIT)
    assert decoded == req


def test_deflate_in_the_zlib_format_or_raw_is_inflated() -> None:
    body = a_request().SerializeToString()
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    for compressed in (zlib.compress(body), raw.compress(body) + raw.flush()):
        assert otlp.decompress(compressed, "deflate", LIMIT) == body


def test_gzip_members_one_after_another_are_read_as_one_body() -> None:
    assert otlp.decompress(gzip.compress(b"abc") + gzip.compress(b"def"), "gzip", LIMIT) == b"abcdef"


def test_an_empty_request_is_a_request() -> None:
    decoded, _ = otlp.decode_request(b"", "application/x-protobuf", "identity", LIMIT)
    assert decoded == ExportTraceServiceRequest()


# ---- what is refused, and why ----------------------------------------------------------------


@pytest.mark.parametrize("content_type", [None, "", "text/plain", "application/grpc", "application/jsonl"])
def test_other_media_types_are_refused_with_415(content_type: str | None) -> None:
    err = refused(b"{}", content_type)
    assert err.status == 415 and "application/x-protobuf" in err.reason


@pytest.mark.parametrize("coding", ["br", "zstd", "snappy"])
def test_other_content_codings_are_refused_with_415(coding: str) -> None:
    err = refused(b"x", encoding=coding)
    assert err.status == 415 and coding in err.reason


def test_a_body_that_is_not_protobuf_is_refused_with_400() -> None:
    err = refused(b"\xff\xff\xff\xff garbage")
    assert err.status == 400 and "protobuf" in err.reason


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "must be an object"),
        (b'{"resourceSpans": 3}', "resourceSpans"),
        (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"startTimeUnixNano": "soon"}]}]}]}', "startTimeUnixNano"),
    ],
)
def test_a_body_that_is_not_otlp_json_is_refused_with_400_naming_what(body: bytes, words: str) -> None:
    err = refused(body, "application/json")
    assert err.status == 400 and words in err.reason


@pytest.mark.parametrize("bad", ["abc", "zz" * 16, TRACE + "00"])
def test_a_trace_id_that_is_not_32_hex_digits_is_named_with_its_place(bad: str) -> None:
    raw = otlp_json(a_request())
    raw["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["links"][0]["traceId"] = bad
    err = refused(json.dumps(raw).encode(), "application/json")
    assert err.status == 400
    assert "resourceSpans[0].scopeSpans[0].spans[0].links[0].traceId" in err.reason and "32 hex digits" in err.reason


def test_compressed_bodies_that_do_not_inflate_are_refused_with_400() -> None:
    whole = gzip.compress(a_request().SerializeToString())
    assert "cut short" in refused(whole[: len(whole) // 2], encoding="gzip").reason
    assert "not valid gzip" in refused(b"definitely not gzip", encoding="gzip").reason
    assert "follow the end" in refused(zlib.compress(b"x") + b"trailing", encoding="deflate").reason


def test_a_body_that_inflates_past_the_limit_is_refused_with_413_without_inflating_it_all() -> None:
    # half a GiB of zeros in half a MiB: 512 gzip members of a MiB each, one after another
    bomb = gzip.compress(bytes(1 << 20)) * 512
    started = time.perf_counter()
    err = refused(bomb, encoding="gzip", limit=1 << 20)
    assert err.status == 413 and "traces.max_body_bytes" in err.reason
    assert time.perf_counter() - started < 1.0  # stopped at the limit, not after 512 MiB
    assert refused(gzip.compress(bytes(8 << 20)), encoding="gzip", limit=1 << 20).status == 413
    exact = gzip.compress(bytes(1000))
    assert otlp.decompress(exact, "gzip", 1000) == bytes(1000)
    assert refused(exact, encoding="gzip", limit=999).status == 413


# ---- replies --------------------------------------------------------------------------------


def test_a_full_success_is_an_empty_response_in_either_encoding() -> None:
    assert otlp.encode_response(otlp.PROTOBUF) == b""
    assert json.loads(otlp.encode_response(otlp.JSON)) == {}


def test_a_partial_success_counts_the_rejected_spans_and_says_why() -> None:
    proto = ExportTraceServiceResponse.FromString(otlp.encode_response(otlp.PROTOBUF, 2, "two spans had no ids"))
    assert proto.partial_success.rejected_spans == 2 and proto.partial_success.error_message == "two spans had no ids"
    assert json.loads(otlp.encode_response(otlp.JSON, 2, "why")) == {"partialSuccess": {"rejectedSpans": "2", "errorMessage": "why"}}


def test_a_refusal_is_a_google_rpc_status_in_the_requests_encoding() -> None:
    status_pb2 = pytest.importorskip("google.rpc.status_pb2")  # googleapis' own, to check against
    status = status_pb2.Status.FromString(otlp.encode_status(otlp.PROTOBUF, 400, "not protobuf"))
    assert (status.code, status.message) == (3, "not protobuf")  # INVALID_ARGUMENT
    assert json.loads(otlp.encode_status(otlp.JSON, 503, "later")) == {"code": 14, "message": "later"}  # UNAVAILABLE
