"""What reflexd keeps of a span: the OpenTelemetry GenAI semantic conventions, read as ``traces`` says.

Each span of an export request becomes a ``SpanRecord`` of one of three roles, by its
``gen_ai.operation.name``:

==================================  ==========================================================
span                                record
==================================  ==========================================================
``invoke_agent``                    ``episode``: of the agent ``gen_ai.agent.name`` names (or, by
                                    ``traces.missing_agent``, the resource's ``service.name``)
an operation in ``traces.steps``    ``step``: its action is the attribute ``traces.steps`` names
(``execute_tool``, ``chat``, ...)   for it (``gen_ai.tool.name``, ``gen_ai.request.model``)
any other                           ``link``: its ids alone, so that a step below it can still
                                    find its episode
==================================  ==========================================================

Episodes and steps carry their outcomes: ``success`` (status not ERROR and no ``error.type``),
``error.type``, start and end, ``gen_ai.usage.input_tokens`` / ``output_tokens`` and ``score``,
the mean ``gen_ai.evaluation.score.value`` of the span's ``gen_ai.evaluation.result`` events.
``attrs`` is what becomes observation: the span's and its resource's attributes on the allow-list
(``traces.attributes``), a step's action attribute left out (it is the action, not what the
agent saw), dotted keys nested (``gen_ai.request.model`` → ``{"gen_ai": {"request": {"model":
...}}}``, so redaction paths read as they do for the socket), then redacted. Message content
(``CONTENT_ATTRIBUTES``) never passes the allow-list; with ``traces.capture_content`` every
attribute is kept instead, redacted too. Span events other than evaluations are never kept.

A span whose ids are not OTLP's (16 and 8 bytes, not all zero), that has no start time, or a
step without its action attribute, is rejected with the reason; so is an episode without an agent
name when ``traces.missing_agent`` is ``reject`` (its record is kept, with no agent, so that its
steps are refused with it).
"""

from __future__ import annotations

import base64
import math
import re
from typing import Any, Iterable, Literal

import msgspec
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from reflexd.collect.reward import Expression, problem
from reflexd.config import TracesConfig
from reflexd.errors import RedactionError
from reflexd.service.redact import Redactor

EPISODE_OPERATION = "invoke_agent"
OPERATION = "gen_ai.operation.name"
AGENT_NAME = "gen_ai.agent.name"
SERVICE_NAME = "service.name"
ERROR_TYPE = "error.type"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
EVALUATION_EVENT = "gen_ai.evaluation.result"
EVALUATION_SCORE = "gen_ai.evaluation.score.value"
# the semantic conventions' content attributes, and the older flattened gen_ai.prompt.0.content form
CONTENT_ATTRIBUTES = frozenset({
    "gen_ai.input.messages",
    "gen_ai.output.messages",
    "gen_ai.system_instructions",
    "gen_ai.tool.call.arguments",
    "gen_ai.tool.call.result",
    "gen_ai.tool.definitions",
    "gen_ai.prompt",
    "gen_ai.completion",
    "gen_ai.retrieval.documents",
    "gen_ai.retrieval.query.text",
    "gen_ai.evaluation.explanation",
})
_CONTENT_FORM = re.compile(r"^gen_ai\.(prompt|completion)\.\d")
# what a span says of its outcome: kept as the step's outcome, never in an observation, where a
# model would learn from what it cannot know when it decides
OUTCOME_PREFIXES = ("gen_ai.response.", "gen_ai.usage.", "gen_ai.evaluation.", ERROR_TYPE)
MAX_NAME = 256  # an agent id or action id, as the wire's Id allows
MAX_PARENT_HOPS = 256  # a chain of parents longer than this is taken as broken (or a loop)
_ZERO_TRACE = bytes(16)
_ZERO_SPAN = bytes(8)

Role = Literal["episode", "step", "link"]


class SpanRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One span as kept: ids, role, outcomes and allowed attributes; never anything else.

    ``received`` is when the receiver first took it (epoch seconds): steps wait from then for
    their episode, across restarts too (``reflexd.collect.journal`` keeps these records).
    """

    trace: str  # 32 hex digits
    span: str  # 16 hex digits
    parent: str | None = None
    role: Role
    operation: str | None = None
    agent: str | None = None  # an episode's agent (None: refused, traces.missing_agent: reject); a step's own
    service: str | None = None  # the resource's service.name
    action: str | None = None  # a step's
    start: float = 0.0
    end: float = 0.0
    success: bool = True
    error_type: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    score: float | None = None
    attrs: dict[str, Any] = {}
    received: float = 0.0

    @property
    def key(self) -> str:
        return self.trace + self.span

    @property
    def seconds(self) -> float:
        return max(0.0, self.end - self.start)


class Extracted(msgspec.Struct, frozen=True):
    """A request's spans, read: the records kept, the reason for each span rejected, the span count."""

    records: list[SpanRecord]
    rejected: list[str]
    spans: int


class Rules:
    """``traces``'s mapping, compiled once per config (and redaction rules)."""

    def __init__(self, cfg: TracesConfig, redactor: Redactor) -> None:
        found = problems(cfg)
        if found:
            raise ValueError("; ".join(found))
        self.cfg = cfg
        self.redactor = redactor
        self.reward = Expression(cfg.reward)
        self.step_reward = Expression(cfg.step_reward)
        self.steps = dict(cfg.steps)
        self._exact = frozenset(a for a in cfg.attributes if not a.endswith("*"))
        self._prefixes = tuple(a[:-1] for a in cfg.attributes if a.endswith("*"))

    def allowed(self, key: str) -> bool:
        """Whether an attribute may be kept in an observation: never a step's outcome (kept as its outcome)."""
        if key.startswith(OUTCOME_PREFIXES):
            return False
        if self.cfg.capture_content:
            return True
        if key in CONTENT_ATTRIBUTES or _CONTENT_FORM.match(key):
            return False
        return key in self._exact or key.startswith(self._prefixes)

    def extract(self, request: ExportTraceServiceRequest, now: float) -> Extracted:
        """Every span of ``request``, read into records or rejected with its reason."""
        records: list[SpanRecord] = []
        rejected: list[str] = []
        count = 0
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            service = resource.get(SERVICE_NAME)
            service = service if isinstance(service, str) and 0 < len(service) <= MAX_NAME else None
            kept_resource = {k: v for k, v in resource.items() if self.allowed(k)}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    count += 1
                    try:
                        record = self._record(span, service, kept_resource, now)
                    except ValueError as exc:
                        rejected.append(f"{_where(span)}: {exc}")
                        continue
                    records.append(record)
                    if record.role == "episode" and record.agent is None:
                        # kept all the same, so that its steps are refused with it
                        rejected.append(f"{_where(span)}: an invoke_agent span without {AGENT_NAME} (traces.missing_agent)")
        return Extracted(records, rejected, count)

    def _record(self, span: Any, service: str | None, resource: dict[str, Any], now: float) -> SpanRecord:
        if len(span.trace_id) != 16 or span.trace_id == _ZERO_TRACE:
            raise ValueError("its trace id is not 16 bytes, not all zero")
        if len(span.span_id) != 8 or span.span_id == _ZERO_SPAN:
            raise ValueError("its span id is not 8 bytes, not all zero")
        parent = span.parent_span_id
        if parent and (len(parent) != 8 or parent == _ZERO_SPAN):
            raise ValueError("its parent span id is not 8 bytes, not all zero")
        trace, span_id, parent_id = span.trace_id.hex(), span.span_id.hex(), parent.hex() if parent else None
        operation = _operation(span.attributes)
        if operation == EPISODE_OPERATION:
            role: Role = "episode"
        elif operation in self.steps:
            role = "step"
        else:
            # a link costs its ids alone: its attributes are never read
            return SpanRecord(trace=trace, span=span_id, parent=parent_id, role="link", received=now)
        if not span.start_time_unix_nano:
            raise ValueError("it has no start time")
        attributes = _attributes(span.attributes)
        action = None
        if role == "step":
            action_key = self.steps[operation]  # type: ignore[index]
            action = _name(attributes.get(action_key), action_key)
            if action is None:
                article = "an" if operation[:1] in "aeiou" else "a"
                raise ValueError(f"{article} {operation} span without {action_key}, the action its step took")
            try:  # a step's own agent name only names an episode that has none: one it cannot use is no loss
                agent = _name(attributes.get(AGENT_NAME), AGENT_NAME)
            except ValueError:
                agent = None
        else:
            agent = _name(attributes.get(AGENT_NAME), AGENT_NAME)
            if agent is None and self.cfg.missing_agent == "service":
                agent = service
        start = span.start_time_unix_nano / 1e9
        end = max(start, span.end_time_unix_nano / 1e9)
        error_type = attributes.get(ERROR_TYPE)
        error_type = str(error_type)[:MAX_NAME] if error_type not in (None, "") else None
        kept = {**resource, **{k: v for k, v in attributes.items() if self.allowed(k)}}
        if role == "step":
            kept.pop(self.steps[operation], None)  # type: ignore[index]
        try:
            attrs = self.redactor.mapping(nest(kept))
        except RedactionError as exc:
            raise ValueError(str(exc)) from None
        return SpanRecord(
            trace=trace,
            span=span_id,
            parent=parent_id,
            role=role,
            operation=operation,
            agent=agent,
            service=service,
            action=action,
            start=start,
            end=end,
            success=span.status.code != Status.STATUS_CODE_ERROR and error_type is None,
            error_type=error_type,
            input_tokens=_count(attributes.get(INPUT_TOKENS)),
            output_tokens=_count(attributes.get(OUTPUT_TOKENS)),
            score=_score(span.events),
            attrs=attrs,
            received=now,
        )


def problems(cfg: TracesConfig) -> list[str]:
    """What is wrong with ``traces``'s mapping: its expressions, step operations and allow-list.

    For ``reflexd check-config`` as for the receiver, which refuses to start on any.
    """
    found = []
    for key in ("reward", "step_reward"):
        why = problem(getattr(cfg, key))
        if why is not None:
            found.append(f"traces.{key}: {why}")
    for operation, attribute in cfg.steps.items():
        if operation == EPISODE_OPERATION:
            found.append(f"traces.steps.{operation}: invoke_agent spans are episodes, not steps")
        elif not operation or not attribute:
            found.append(f"traces.steps: {operation!r}: {attribute!r} needs an operation and the attribute naming its action")
    for i, pattern in enumerate(cfg.attributes):
        if not pattern:
            found.append(f"traces.attributes.{i}: an empty attribute name")
        elif not cfg.capture_content and (pattern in CONTENT_ATTRIBUTES or _CONTENT_FORM.match(pattern)):
            found.append(
                f"traces.attributes.{i}: {pattern} is message content, never kept unless traces.capture_content is true"
            )
        else:
            admitted = _outcomes_admitted(pattern)
            if admitted:
                found.append(
                    f"traces.attributes.{i}: {pattern} admits {', '.join(admitted)}, the step's outcome, which a model"
                    " must not see when it decides: list what is known when a step starts (gen_ai.request.*, say)"
                )
    return found


def _outcomes_admitted(pattern: str) -> list[str]:
    """The outcome attributes (``OUTCOME_PREFIXES``) an allow-list entry lets into observations."""
    if pattern.endswith("*"):
        head = pattern[:-1]
        return [o + ("*" if o.endswith(".") else "") for o in OUTCOME_PREFIXES if o.startswith(head) or head.startswith(o)]
    return [pattern] if pattern.startswith(OUTCOME_PREFIXES[:-1]) or pattern == ERROR_TYPE else []


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys as nested mappings: {"a.b": 1, "a.c": 2} → {"a": {"b": 1, "c": 2}}.

    A key that would go through a value already there (``a`` = 1 beside ``a.b`` = 2) stays flat.
    """
    out: dict[str, Any] = {}
    made: set[int] = {id(out)}  # the mappings made here: a mapping value from a span is a leaf
    for key in sorted(flat):  # sorted, so a conflict always resolves the same way
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            below = node.get(part)
            if below is None:
                below = node[part] = {}
                made.add(id(below))
            elif id(below) not in made:
                node = None  # type: ignore[assignment]
                break
            node = below
        if node is None or parts[-1] in node:
            out[key] = flat[key]
        else:
            node[parts[-1]] = flat[key]
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid on ``base``, mappings merged all the way down (``over`` wins elsewhere)."""
    if not base:
        return over
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        out[key] = merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def without(mapping: dict[str, Any], dotted: str) -> dict[str, Any]:
    """``mapping`` without the nested (or flat) key ``dotted`` (a copy only if it was there)."""
    if dotted in mapping:
        return {k: v for k, v in mapping.items() if k != dotted}
    head, _, rest = dotted.partition(".")
    below = mapping.get(head)
    if not rest or not isinstance(below, dict):
        return mapping
    pruned = without(below, rest)
    if pruned is below:
        return mapping
    out = dict(mapping)
    if pruned:
        out[head] = pruned
    else:
        del out[head]
    return out


def _where(span: Any) -> str:
    return f"span {span.trace_id.hex()}/{span.span_id.hex()} {span.name[:100]!r}"


def _operation(attributes: Iterable[Any]) -> str | None:
    for kv in attributes:
        if kv.key == OPERATION:
            return kv.value.string_value or None
    return None


def _attributes(attributes: Iterable[Any]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in attributes}


def _value(value: Any) -> Any:
    """An OTLP AnyValue as JSON-ready Python (bytes as base64; NaN and infinities as None)."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "int_value":
        return value.int_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "double_value":
        number = value.double_value
        return number if math.isfinite(number) else None
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    return None


def _name(value: Any, key: str) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{key} is not a name (a string)")
    text = str(value)
    if len(text) > MAX_NAME:
        raise ValueError(f"{key} is longer than {MAX_NAME} characters")
    return text


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return None
    return int(value)


def _score(events: Iterable[Any]) -> float | None:
    scores = []
    for event in events:
        if event.name != EVALUATION_EVENT:
            continue
        for kv in event.attributes:
            if kv.key == EVALUATION_SCORE:
                score = _value(kv.value)
                if isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score):
                    scores.append(float(score))
    return sum(scores) / len(scores) if scores else None
