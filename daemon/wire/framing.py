"""Framing: messages to bytes and back, for both of the socket's framings.

Two framings share one socket, told apart by a connection's first byte: a zero byte starts a
4-byte big-endian length prefix followed by msgpack; anything else is newline-delimited JSON.
Replies use the framing of the connection they answer.
"""

from __future__ import annotations

import struct
from typing import Iterator, Literal, get_args

import msgspec

from reflexd.errors import FrameError, FrameTooLarge
from reflexd.features import as_stored
from reflexd.wire.protocol import Inbound, Reply, ReqId

JSON = "json"
MSGPACK = "msgpack"
Framing = Literal["json", "msgpack"]

_json_in = msgspec.json.Decoder(Inbound)
_msgpack_in = msgspec.msgpack.Decoder(Inbound)
_json_reply = msgspec.json.Decoder(Reply)
_msgpack_reply = msgspec.msgpack.Decoder(Reply)
# an agent's numpy numbers (a context computed with numpy or pandas) go as the values they hold
_json_enc = msgspec.json.Encoder(enc_hook=as_stored)
_msgpack_enc = msgspec.msgpack.Encoder(enc_hook=as_stored)
_LEN = struct.Struct(">I")


def framing_of(first_byte: int) -> Framing:
    return MSGPACK if first_byte == 0 else JSON


def decode_inbound(payload: bytes | memoryview, framing: Framing) -> Inbound:
    """Decode one frame's payload into a typed message, or raise FrameError naming the problem."""
    try:
        if framing == JSON:
            return _json_in.decode(payload)
        return _msgpack_in.decode(payload)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None
    except msgspec.DecodeError as exc:
        raise FrameError(str(exc), code="malformed") from None
    except RecursionError:  # msgspec recurses once per level of nesting
        raise FrameError("nested too deep to decode", code="malformed") from None
    except UnicodeDecodeError as exc:  # msgpack strings that are not UTF-8
        raise FrameError(f"invalid UTF-8 in a string: {exc.reason}", code="malformed") from None


class _Req(msgspec.Struct):
    req: ReqId = None


_json_req = msgspec.json.Decoder(_Req)
_msgpack_req = msgspec.msgpack.Decoder(_Req)
# what an unknown ``type`` is told it could be
_TYPES = ", ".join(t.__struct_config__.tag for t in get_args(Inbound))


def req_of(payload: bytes | memoryview, framing: Framing) -> ReqId:
    """The ``req`` of a frame that is no valid message, for its error to echo; None if it carries none
    that can be read. Only on the error path: a valid frame's ``req`` comes with its message."""
    try:
        return (_json_req if framing == JSON else _msgpack_req).decode(payload).req
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return None


def _invalid(exc: msgspec.ValidationError) -> FrameError:
    said = str(exc)
    if said.startswith("Invalid value") and said.endswith("at `$.type`"):
        said = f"{said}: the message types are {_TYPES}"
    return FrameError(said, code="invalid")


def decode_reply(payload: bytes | memoryview, framing: Framing) -> Reply:
    try:
        if framing == JSON:
            return _json_reply.decode(payload)
        return _msgpack_reply.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise FrameError(f"unreadable reply: {exc}") from None


def encode_frame(msg: msgspec.Struct, framing: Framing) -> bytes:
    """One framed message, ready to write."""
    if framing == JSON:
        return _json_enc.encode(msg) + b"\n"
    body = _msgpack_enc.encode(msg)
    return _LEN.pack(len(body)) + body


def encode_frames(msgs: list[msgspec.Struct], framing: Framing) -> bytes:
    return b"".join(encode_frame(m, framing) for m in msgs)


_JSON_ON_MSGPACK = (
    "; this connection is msgpack-framed (its first byte was 0), so a JSON line on it reads as a length prefix:"
    " send NDJSON on a connection of its own"
)


class FrameReader:
    """Sans-IO framer: feed bytes in, get whole frame payloads out, with a size cap.

    An over-long NDJSON line is skipped up to its newline, so the connection survives it, and
    reported there with its whole length (``FrameTooLarge.size``); one the peer never ends is
    reported by ``cut_short``. An over-long length prefix cannot be skipped safely and is fatal to
    the connection: ``fatal`` becomes true and no further frames are produced.
    """

    def __init__(self, framing: Framing, max_bytes: int) -> None:
        self.framing = framing
        self.max_bytes = max_bytes
        self.fatal = False
        self._buf = bytearray()
        self._skipping = False
        self._skipped = 0  # bytes of the over-long line skipped so far

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)

    @property
    def incomplete(self) -> bool:
        """A frame has started and not finished (including an over-long line being skipped)."""
        return bool(self._buf) or self._skipping

    def abandon(self) -> bytes:
        """Give up on the incomplete frame: return its bytes and stop producing frames."""
        self.fatal = True
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def feed(self, data: bytes) -> Iterator[bytes | FrameError]:
        if self.fatal:
            return
        self._buf += data
        if self.framing == JSON:
            yield from self._lines()
        else:
            yield from self._prefixed()

    def _lines(self) -> Iterator[bytes | FrameError]:
        buf = self._buf
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            if self._skipping:
                self._skipping = False
                yield FrameTooLarge(self._skipped + nl - start, self.max_bytes)
            else:
                line = bytes(buf[start:nl])
                if len(line) > self.max_bytes:
                    yield FrameTooLarge(len(line), self.max_bytes)
                elif line.strip():
                    yield line
            start = nl + 1
        del buf[:start]
        if self._skipping or len(buf) > self.max_bytes:
            # not kept: only its length is counted until its newline comes
            self._skipped = (self._skipped if self._skipping else 0) + len(buf)
            self._skipping = True
            buf.clear()

    def end(self) -> Iterator[bytes | FrameError]:
        """What is left when the peer has stopped sending: an NDJSON last line without its newline,
        a line all the same (``printf '%s' '{...}' | socat`` sends one), or the over-long line being
        skipped, reported with its length. A length-prefixed frame cut short stays ``incomplete``,
        for the caller to dead-letter (``abandon``)."""
        if self.framing == JSON and self.incomplete and not self.fatal:
            yield from self.feed(b"\n")

    def cut_short(self) -> FrameTooLarge | None:
        """The over-long line being skipped when the peer stopped sending, if any (its size so far)."""
        if self.framing != JSON or not self._skipping:
            return None
        self._skipping = False
        return FrameTooLarge(self._skipped, self.max_bytes)

    def _prefixed(self) -> Iterator[bytes | FrameError]:
        buf = self._buf
        start = 0
        while len(buf) - start >= 4:
            (size,) = _LEN.unpack_from(buf, start)
            if size > self.max_bytes:
                self.fatal = True
                # '{': a JSON line on a connection whose first byte made it msgpack
                hint = _JSON_ON_MSGPACK if buf[start] == 0x7B else ""
                buf.clear()
                yield FrameTooLarge(size, self.max_bytes, hint)
                return
            if len(buf) - start - 4 < size:
                break
            yield bytes(buf[start + 4 : start + 4 + size])
            start += 4 + size
        del buf[:start]
