"""Wire messages and framing: what agents and operators send, and what reflexd answers.

Two framings share one socket, told apart by a connection's first byte: a zero byte starts a
4-byte big-endian length prefix followed by msgpack; anything else is newline-delimited JSON.
Replies use the framing of the connection they answer.
"""

from __future__ import annotations

import math
import struct
from typing import Annotated, Any, Iterator, Literal, Union

import msgspec

from reflexd.errors import FrameError, FrameTooLarge
from reflexd.features import action_ids

Prob = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
ReqId = Union[int, str, None]
Context = dict[str, Any]


class _Msg(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type", kw_only=True):
    pass


def _check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number")


def _check_ts(ts: float | None) -> None:
    if ts is not None and not math.isfinite(ts):
        raise ValueError("ts must be a finite number of seconds")


class Action(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One available action; ``features`` describe it to the model (cost, latency, ...)."""

    id: Id
    features: Context = {}


ActionSpec = Union[str, Action]


# ---- experience events -------------------------------------------------------------------


class Decision(_Msg, tag="decision"):
    id: Id
    agent: Id
    context: Context
    actions: Annotated[list[ActionSpec], msgspec.Meta(min_length=1)]
    chosen: Id
    prob: Prob
    probs: list[float] | None = None
    model_version: str | None = None
    strategy: str | None = None
    ts: float | None = None

    def __post_init__(self) -> None:
        # msgspec turns these into validation errors, so such a frame is dead-lettered with the reason
        # also runs for every decision a client makes in-process, so it is kept cheap
        actions = self.actions
        # plain ids are found by the list's own (C) search; in-process actions may be plain dicts
        if self.chosen not in actions and self.chosen not in action_ids(actions):
            raise ValueError(f"chosen action {self.chosen!r} is not among the actions")
        probs = self.probs
        if probs is not None:
            if len(probs) != len(actions):
                raise ValueError(f"probs has {len(probs)} entries for {len(actions)} actions")
            # a plain sum's rounding is far inside the tolerance
            if not (min(probs) >= 0.0 and max(probs) <= 1.0 and abs(sum(probs) - 1.0) <= 1e-3):
                raise ValueError("probs must be probabilities summing to 1")
        _check_ts(self.ts)


class Outcome(_Msg, tag="outcome"):
    decision_id: Id
    reward: float
    id: Id | None = None
    agent: Id | None = None
    ts: float | None = None

    def __post_init__(self) -> None:
        _check_finite("reward", self.reward)
        _check_ts(self.ts)


class Step(_Msg, tag="step"):
    agent: Id
    episode: Id
    index: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]  # stored as a 32-bit INTEGER
    observation: Context
    action: str
    reward: float = 0.0
    done: bool = False
    id: Id | None = None
    ts: float | None = None

    def __post_init__(self) -> None:
        _check_finite("reward", self.reward)
        _check_ts(self.ts)


class Event(_Msg, tag="event"):
    agent: Id
    kind: Id
    data: Any = None
    id: Id | None = None
    ts: float | None = None


# ---- requests ----------------------------------------------------------------------------


class Flush(_Msg, tag="flush"):
    """Answered with Ack once everything the connection sent before it is durable.

    Durable means fsynced to the daemon's spool; with ``loaded``, the Ack waits until the events
    are in the store too, so queries and the next training run see them. ``dropped`` reports
    events the client had to drop (its buffer was full) since its last acknowledged flush, so the
    loss shows in the daemon's status.
    """

    req: ReqId = None
    dropped: Annotated[int, msgspec.Meta(ge=0)] = 0
    loaded: bool = False


class Decide(_Msg, tag="decide"):
    agent: Id
    context: Context
    actions: Annotated[list[ActionSpec], msgspec.Meta(min_length=1)]
    id: Id | None = None
    req: ReqId = None


class StatusRequest(_Msg, tag="status"):
    req: ReqId = None


class ModelsRequest(_Msg, tag="models"):
    req: ReqId = None


class Promote(_Msg, tag="promote"):
    version: Id
    req: ReqId = None


class Rollback(_Msg, tag="rollback"):
    req: ReqId = None


class Train(_Msg, tag="train"):
    """Start a training run now, ignoring the idle and new-data thresholds."""

    req: ReqId = None


class Forget(_Msg, tag="forget"):
    """Delete everything stored about ``agent`` (database, archive, training snapshots); answered with Done."""

    agent: Id
    req: ReqId = None


ExperienceEvent = Union[Decision, Outcome, Step, Event]
Request = Union[Flush, Decide, StatusRequest, ModelsRequest, Promote, Rollback, Train, Forget]
Inbound = Union[
    Decision, Outcome, Step, Event, Flush, Decide, StatusRequest, ModelsRequest, Promote, Rollback, Train, Forget
]
EXPERIENCE_TYPES = (Decision, Outcome, Step, Event)


# ---- replies -----------------------------------------------------------------------------


class Ack(_Msg, tag="ack"):
    """Everything this connection sent before the flush is durable; ``count`` events so far."""

    count: int
    req: ReqId = None


class Error(_Msg, tag="error"):
    code: str
    message: str
    seq: int | None = None  # index of the offending frame on this connection, from 0
    req: ReqId = None


class Decided(_Msg, tag="decided"):
    id: str
    action: str
    prob: float
    model_version: str | None
    strategy: str
    req: ReqId = None


class StatusReply(_Msg, tag="status"):
    version: str
    pid: int
    uptime: float
    state_dir: str
    socket: str
    ingest: dict[str, int]
    backlog: int
    experience: dict[str, int]
    model: dict[str, Any] | None
    trainer: dict[str, Any]
    storage: dict[str, Any]
    monitor: dict[str, Any] = {}  # automatic rollback: the live model's last comparison
    req: ReqId = None


class ModelsReply(_Msg, tag="models"):
    current: str | None
    models: list[dict[str, Any]]
    req: ReqId = None


class Done(_Msg, tag="ok"):
    message: str
    req: ReqId = None


Reply = Union[Ack, Error, Decided, StatusReply, ModelsReply, Done]


# ---- codecs ------------------------------------------------------------------------------

JSON = "json"
MSGPACK = "msgpack"
Framing = Literal["json", "msgpack"]

_json_in = msgspec.json.Decoder(Inbound)
_msgpack_in = msgspec.msgpack.Decoder(Inbound)
_json_reply = msgspec.json.Decoder(Reply)
_msgpack_reply = msgspec.msgpack.Decoder(Reply)
_json_enc = msgspec.json.Encoder()
_msgpack_enc = msgspec.msgpack.Encoder()
_LEN = struct.Struct(">I")


def framing_of(first_byte: int) -> Framing:
    return MSGPACK if first_byte == 0 else JSON


def decode_inbound(payload: bytes | memoryview, framing: Framing) -> Inbound:
    """Decode one frame's payload into a typed message, or raise FrameError naming the problem."""
    try:
        if framing == JSON:
            return _json_in.decode(payload)
        return _msgpack_in.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise FrameError(str(exc), code="invalid" if isinstance(exc, msgspec.ValidationError) else "malformed") from None
    except RecursionError:  # msgspec recurses once per level of nesting
        raise FrameError("nested too deep to decode", code="malformed") from None
    except UnicodeDecodeError as exc:  # msgpack strings that are not UTF-8
        raise FrameError(f"invalid UTF-8 in a string: {exc.reason}", code="malformed") from None


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


class FrameReader:
    """Sans-IO framer: feed bytes in, get whole frame payloads out, with a size cap.

    An over-long NDJSON line is reported once and skipped up to its newline, so the connection
    survives it. An over-long length prefix cannot be skipped safely and is fatal to the
    connection: ``fatal`` becomes true and no further frames are produced.
    """

    def __init__(self, framing: Framing, max_bytes: int) -> None:
        self.framing = framing
        self.max_bytes = max_bytes
        self.fatal = False
        self._buf = bytearray()
        self._skipping = False

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
            else:
                line = bytes(buf[start:nl])
                if len(line) > self.max_bytes:
                    yield FrameTooLarge(len(line), self.max_bytes)
                elif line.strip():
                    yield line
            start = nl + 1
        del buf[:start]
        if len(buf) > self.max_bytes:
            if not self._skipping:
                yield FrameTooLarge(len(buf), self.max_bytes)
            self._skipping = True
            buf.clear()

    def _prefixed(self) -> Iterator[bytes | FrameError]:
        buf = self._buf
        start = 0
        while len(buf) - start >= 4:
            (size,) = _LEN.unpack_from(buf, start)
            if size > self.max_bytes:
                self.fatal = True
                buf.clear()
                yield FrameTooLarge(size, self.max_bytes)
                return
            if len(buf) - start - 4 < size:
                break
            yield bytes(buf[start + 4 : start + 4 + size])
            start += 4 + size
        del buf[:start]
