"""OTLP/HTTP trace bodies: a request's media type, content coding and decoding, and the replies.

A request body is an ``ExportTraceServiceRequest`` (``opentelemetry.proto``), protobuf
(``application/x-protobuf``) or the OTLP JSON encoding (``application/json``), sent as is or
compressed (``Content-Encoding: gzip`` or ``deflate``). Both encodings are read by the
protobuf library's own parsers. OTLP JSON differs from protobuf's canonical JSON mapping in one
way that matters: trace and span ids are hex, not base64, so they are turned into base64 before
``json_format`` reads the rest (lowerCamelCase or original field names, int64 as strings or
numbers, enums as integers or names, unknown fields ignored, as the OTLP spec asks of receivers).

Replies are encoded as the request was: an ``ExportTraceServiceResponse`` (with
``partial_success`` when spans were rejected) or, for a request refused whole, a
``google.rpc.Status``. Every failure is a ``TraceError`` naming what is wrong, with its HTTP
status: 400 (does not decode), 413 (too large, once decompressed too), 415 (media type or
content coding not read here).
"""

from __future__ import annotations

import base64
import zlib
from typing import Any

import msgspec
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from reflexd.errors import TraceError

PROTOBUF = "protobuf"
JSON = "json"
# the media type each encoding is answered in
CONTENT_TYPES = {PROTOBUF: "application/x-protobuf", JSON: "application/json"}
_MEDIA = {"application/x-protobuf": PROTOBUF, "application/protobuf": PROTOBUF, "application/json": JSON}
_ID_HEX = {"traceId": 32, "trace_id": 32, "spanId": 16, "span_id": 16, "parentSpanId": 16, "parent_span_id": 16}
# google.rpc.Code for each HTTP status the receiver answers with a Status
RPC_CODES = {400: 3, 403: 7, 404: 5, 405: 12, 408: 4, 411: 3, 413: 8, 415: 3, 431: 3, 500: 13, 503: 14}


def encoding_of(content_type: str | None) -> str:
    """PROTOBUF or JSON for a Content-Type header (parameters such as charset ignored); 415 otherwise."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    try:
        return _MEDIA[media]
    except KeyError:
        raise TraceError(
            f"Content-Type {content_type or '(none)'!r} is not read here; send application/x-protobuf or application/json",
            status=415,
        ) from None


def decompress(body: bytes, coding: str | None, limit: int) -> bytes:
    """The body with its Content-Encoding undone, refused (413) once it grows past ``limit`` bytes.

    The output is capped while it is produced, so a small body that inflates enormously (a
    "zip bomb") costs no more than ``limit`` bytes of memory.
    """
    coding = (coding or "identity").strip().lower()
    if coding == "identity":
        return body
    if coding in ("gzip", "x-gzip"):
        coding = "gzip"
        wbits = 16 + zlib.MAX_WBITS
    elif coding == "deflate":
        # RFC 9110's deflate is the zlib format; some clients send raw deflate, told apart by its header
        wbits = zlib.MAX_WBITS if body[:1] and (body[0] & 0x0F) == 8 and int.from_bytes(body[:2], "big") % 31 == 0 else -zlib.MAX_WBITS
    else:
        raise TraceError(f"Content-Encoding {coding!r} is not read here; send gzip, deflate or none", status=415)
    out = bytearray()
    data = body
    try:
        while True:
            inflater = zlib.decompressobj(wbits)
            out += inflater.decompress(data, limit + 1 - len(out))
            if len(out) > limit:
                raise TraceError(
                    f"the body inflates to more than {limit} bytes (traces.max_body_bytes)", status=413
                )
            if not inflater.eof:
                raise TraceError(f"the {coding} body is cut short")
            data = inflater.unused_data
            # gzip allows members one after another (RFC 1952); anything after a zlib stream is garbage
            if not data or coding != "gzip":
                break
    except zlib.error as exc:
        raise TraceError(f"the body is not valid {coding}: {exc}") from None
    if data:
        raise TraceError(f"{len(data)} bytes follow the end of the {coding} stream")
    return bytes(out)


def parse(body: bytes, encoding: str) -> ExportTraceServiceRequest:
    """The request a (decompressed) body holds; TraceError (400) naming what does not decode."""
    request = ExportTraceServiceRequest()
    if encoding == PROTOBUF:
        try:
            request.ParseFromString(body)
        except (DecodeError, RecursionError) as exc:
            raise TraceError(f"not an OTLP ExportTraceServiceRequest in protobuf: {exc or 'cannot be parsed'}") from None
        return request
    try:
        raw = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise TraceError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise TraceError("the JSON body must be an object, an OTLP ExportTraceServiceRequest")
    _hex_ids_to_base64(raw)
    try:
        json_format.ParseDict(raw, request, ignore_unknown_fields=True)
    except (json_format.ParseError, RecursionError, TypeError, ValueError) as exc:
        raise TraceError(f"not an OTLP ExportTraceServiceRequest in JSON: {exc}") from None
    return request


def decode_request(
    body: bytes, content_type: str | None, content_encoding: str | None, limit: int
) -> tuple[ExportTraceServiceRequest, str]:
    """The request and its encoding (PROTOBUF or JSON), from the body and its headers."""
    encoding = encoding_of(content_type)
    return parse(decompress(body, content_encoding, limit), encoding), encoding


def encode_response(encoding: str, rejected: int = 0, message: str = "") -> bytes:
    """An ``ExportTraceServiceResponse``: ``partial_success`` is set when spans were rejected or
    there is something to say (the spec's warning form: 0 rejected and a message)."""
    response = ExportTraceServiceResponse()
    if rejected or message:
        response.partial_success.CopyFrom(ExportTracePartialSuccess(rejected_spans=rejected, error_message=message))
    return _encode(response, encoding)


def encode_status(encoding: str, http_status: int, message: str) -> bytes:
    """A ``google.rpc.Status`` (code from the HTTP status, and the message) for a refused request."""
    return _encode(_Status(code=RPC_CODES.get(http_status, 2), message=message), encoding)


def _encode(message: Any, encoding: str) -> bytes:
    if encoding == JSON:
        return json_format.MessageToJson(message, indent=None).encode()
    return message.SerializeToString()


def _hex_ids_to_base64(raw: dict[str, Any]) -> None:
    """OTLP JSON's hex trace and span ids, in place, as the base64 ``json_format`` reads for bytes."""
    for rs_i, rs in enumerate(_items(raw, "resourceSpans", "resource_spans")):
        for ss_i, ss in enumerate(_items(rs, "scopeSpans", "scope_spans")):
            for span_i, span in enumerate(_items(ss, "spans")):
                where = f"resourceSpans[{rs_i}].scopeSpans[{ss_i}].spans[{span_i}]"
                _fix_ids(span, where)
                for link_i, link in enumerate(_items(span, "links")):
                    _fix_ids(link, f"{where}.links[{link_i}]")


def _items(obj: Any, *names: str) -> list[Any]:
    if not isinstance(obj, dict):
        return []
    for name in names:
        value = obj.get(name)
        if isinstance(value, list):
            return value
    return []


def _fix_ids(obj: Any, where: str) -> None:
    if not isinstance(obj, dict):
        return
    for key, digits in _ID_HEX.items():
        value = obj.get(key)
        if not isinstance(value, str) or value == "":
            continue  # an empty id (a root's parent) is the empty bytes either way
        if len(value) != digits:
            raise TraceError(f"{where}.{key}: {value[:64]!r} is not {digits} hex digits")
        try:
            obj[key] = base64.b64encode(bytes.fromhex(value)).decode()
        except ValueError:
            raise TraceError(f"{where}.{key}: {value!r} is not {digits} hex digits") from None


def _status_type() -> Any:
    """``google.rpc.Status`` (code, message) built from its descriptor, in a pool of its own: the
    googleapis protos are not a dependency, and a private pool cannot clash with them if loaded."""
    proto = descriptor_pb2.FileDescriptorProto(name="reflexd/collect/google_rpc_status.proto", package="google.rpc", syntax="proto3")
    status = proto.message_type.add(name="Status")
    status.field.add(name="code", json_name="code", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
                     label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    status.field.add(name="message", json_name="message", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                     label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.Status"))


_Status = _status_type()
