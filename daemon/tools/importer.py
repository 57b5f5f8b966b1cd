"""Importing decisions logged by another policy: ``reflexd import FILE``.

Two formats are read, one function each, both yielding, in the order they should be sent, a
``Record`` (one Decision or Outcome message, with the line it came from) or a ``Rejected`` (a
line that could not be used, and why: ``file:line: reason``). A bad line never stops the import.

- ``ndjson``: reflexd's own events, one JSON object per line as on the socket (``decision`` and
  ``outcome`` messages; see docs/protocol.md). Every decision is sent together with
  its outcomes, wherever they are in the file, so the daemon's reward join (which compares
  arrival times) sees them arrive together. Outcomes without an ``id`` get one derived from the
  line's bytes (and how often the same bytes came before), so re-importing stores nothing twice.
- ``dsjson``: Vowpal Wabbit's decision service JSON (``cb_explore_adf``). Each line holds the
  shared context and ``_multi`` action objects in ``c``, the chosen action (``_labelIndex``,
  0-based, or ``_label_Action`` / ``a[0]``, 1-based), its probability ``_label_probability``,
  the ranking ``a`` with probabilities ``p``, the cost ``_label_cost`` (reward = -cost),
  ``EventId`` and ``Timestamp``. Reward-only lines (``RewardValue`` + ``EventId``) become outcomes.
- ``obd``: the Open Bandit Dataset's CSV (``timestamp, item_id, position, click, propensity_score``
  and user columns). Each row is one slot of a three-slot slate: a decision with ``slot`` =
  position - 1 and the ``slate`` of its impression (the rows sharing a timestamp and user), offering
  every item of the campaign, with OBD's propensity as ``prob``, and an outcome (reward = click).

Ids are stable (the decision id is the logged ``id`` / ``EventId``), so importing a file twice
stores every event once; the daemon counts the second copy as duplicates. Imported decisions keep
their original time as ``ts``. ``send`` streams the records to the daemon in batches, each
followed by a flush the daemon acknowledges once the batch is durable.

This module never imports torch.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Union

import msgspec

from reflexd.errors import BadLine, ImportFileError
from reflexd.wire.protocol import Ack, Decision, Error, Flush, Outcome

Format = Literal["ndjson", "dsjson", "obd"]
FORMATS: tuple[str, ...] = ("ndjson", "dsjson", "obd")
DSJSON_AGENT = "imported"
OBD_AGENT = "imported"
DEFAULT_BATCH = 1000


class Record(msgspec.Struct, frozen=True):
    line: int
    message: Union[Decision, Outcome]


class Rejected(msgspec.Struct, frozen=True):
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


Item = Union[Record, Rejected]




_any = msgspec.json.Decoder()
_event = msgspec.json.Decoder(Union[Decision, Outcome])


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, stripped bytes) of every non-blank line."""
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                raw = raw.strip()
                if raw:
                    yield number, raw
    except OSError as exc:
        raise ImportFileError(path, exc.strerror or str(exc)) from None


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()[:32]


def _problem(exc: msgspec.MsgspecError) -> str:
    return str(exc).replace(" - at `$`", "").replace("`$.", "`")


def _check(path: str) -> str:
    path = os.fspath(path)
    if not Path(path).is_file():
        raise ImportFileError(path, "no such file" if not Path(path).exists() else "not a regular file")
    return path


# ---- reflexd NDJSON ----------------------------------------------------------------------


class Propensities:
    """Estimates of the logged probability for decisions logged without one, from the live
    behaviour model (``reflexd.learning.propensity``); each such decision is marked with the
    strategy ``estimated:behaviour <version>``, so evaluation and training can tell them apart."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.strategy = f"estimated:behaviour {model.version}"
        self.estimated = 0

    def fill(self, obj: dict[str, Any]) -> dict[str, Any]:
        from reflexd.features import action_ids
        from reflexd.learning.propensity import decision_propensities

        offered = action_ids(obj.get("actions") or [])
        (prob,) = decision_propensities(self.model, [obj.get("context") or {}], [offered], [obj.get("chosen")])
        self.estimated += 1
        return {**obj, "prob": float(prob), "probs": None, "strategy": self.strategy}


def _ndjson_event(
    raw: bytes, agent: str | None, estimate: Propensities | None = None, checking: bool = False
) -> Decision | Outcome:
    """One line as a message. With ``estimate``, a decision without ``prob`` gets the behaviour
    model's estimate (``checking``: a stand-in, for a pass that only tells lines apart)."""
    if estimate is not None:
        try:
            obj = _any.decode(raw)
        except msgspec.DecodeError as exc:
            raise BadLine(f"not valid JSON ({exc})") from None
        if isinstance(obj, dict) and obj.get("type") == "decision" and "prob" not in obj:
            raw = msgspec.json.encode({**obj, "prob": 1.0, "probs": None} if checking else estimate.fill(obj))
    try:
        msg = _event.decode(raw)
    except msgspec.ValidationError as exc:
        kind = obj = None
        try:
            obj = _any.decode(raw)
            kind = obj.get("type") if isinstance(obj, dict) else None
        except msgspec.DecodeError:
            pass
        if isinstance(obj, dict) and kind not in ("decision", "outcome"):
            raise BadLine(f"expected a decision or an outcome, got type {kind!r}") from None
        raise BadLine(f"invalid {kind}: {_problem(exc)}") from None
    except msgspec.DecodeError as exc:
        raise BadLine(f"not valid JSON ({exc})") from None
    if agent is not None:
        msg = msgspec.structs.replace(msg, agent=agent)
    return msg


def parse_ndjson(
    path: str | os.PathLike[str], agent: str | None = None, estimate: Propensities | None = None
) -> Iterator[Item]:
    """reflexd's own decision and outcome lines; each decision comes with its outcomes.

    ``agent``, when given, replaces the agent of every decision and outcome. ``estimate``, when
    given, fills in the probability of decisions logged without one.
    """
    path = _check(path)
    # first pass: outcomes, grouped by decision, and every bad line (outcomes are small)
    outcomes: dict[str, list[Record]] = {}
    skip: set[int] = set()
    rejected: dict[int, str] = {}
    seen: dict[bytes, int] = {}
    for number, raw in _lines(path):
        try:
            msg = _ndjson_event(raw, agent, estimate, checking=True)
        except BadLine as exc:
            rejected[number] = exc.reason
            continue
        if isinstance(msg, Outcome):
            if msg.id is None:
                key = hashlib.sha256(raw).digest()
                seen[key] = seen.get(key, 0) + 1
                msg = msgspec.structs.replace(msg, id="o-" + _digest(raw, str(seen[key]).encode()))
            outcomes.setdefault(msg.decision_id, []).append(Record(number, msg))
            skip.add(number)
    # second pass: decisions in file order, each followed by its outcomes
    for number, raw in _lines(path):
        if number in rejected:
            yield Rejected(path, number, rejected[number])
        elif number not in skip:
            try:
                decision = _ndjson_event(raw, agent, estimate)
            except BadLine as exc:  # only if the file changed between the two passes
                yield Rejected(path, number, exc.reason)
                continue
            if not isinstance(decision, Decision):
                yield Rejected(path, number, "the file changed while it was being imported")
                continue
            yield Record(number, decision)
            yield from outcomes.pop(decision.id, ())
    # outcomes of decisions not in this file (the daemon may hold them already)
    yield from sorted((r for group in outcomes.values() for r in group), key=lambda r: r.line)


# ---- Vowpal Wabbit DSJSON ----------------------------------------------------------------

_FRACTION = re.compile(r"(\.\d{6})\d+")


def parse_timestamp(text: Any) -> float:
    """Unix seconds of an ISO-8601 time as DSJSON writes it (``2019-06-11T18:33:27.0000000Z``)."""
    if not isinstance(text, str):
        raise BadLine(f"Timestamp must be an ISO-8601 string, not {text!r}")
    cleaned = _FRACTION.sub(r"\1", text.strip()).replace("Z", "+00:00").replace("z", "+00:00")
    try:
        when = dt.datetime.fromisoformat(cleaned)
    except ValueError:
        raise BadLine(f"Timestamp {text!r} is not an ISO-8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def _number(obj: dict[str, Any], key: str) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadLine(f"{key} must be a finite number, not {value!r}" if key in obj else f"no {key}")
    return float(value)


def _index(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadLine(f"{what} must be an integer, not {value!r}")
    return value


def _action(item: Any, position: int) -> dict[str, Any]:
    """An action object of ``_multi`` as {"id", "features"}.

    The id is the object's own ``id`` (or ``_id``) if it has one, else an ``id`` inside one of its
    namespaces (``{"action": {"id": "x", ...}}``), else its 1-based position (``action-2``).
    """
    if not isinstance(item, dict):
        raise BadLine(f"c._multi[{position}] must be an object, not {type(item).__name__}")
    for key in ("id", "_id"):
        value = item.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return {"id": str(value), "features": {k: v for k, v in item.items() if k != key}}
    for value in item.values():
        if isinstance(value, dict):
            inner = value.get("id")
            if isinstance(inner, (str, int)) and not isinstance(inner, bool):
                return {"id": str(inner), "features": item}
    return {"id": f"action-{position + 1}", "features": item}


def _dsjson_record(raw: bytes, agent: str) -> list[Decision | Outcome]:
    try:
        obj = _any.decode(raw)
    except msgspec.DecodeError as exc:
        raise BadLine(f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise BadLine("a DSJSON line must be a JSON object")
    event_id = obj.get("EventId")
    if event_id is not None and (not isinstance(event_id, str) or not event_id):
        raise BadLine(f"EventId must be a non-empty string, not {event_id!r}")
    ts = parse_timestamp(obj["Timestamp"]) if "Timestamp" in obj else None

    if "RewardValue" in obj and "c" not in obj:  # a reward that arrived after its decision was logged
        if event_id is None:
            raise BadLine("a reward line (RewardValue) needs the EventId of its decision")
        reward = _number(obj, "RewardValue")
        when = parse_timestamp(obj["EnqueuedTimeUtc"]) if "EnqueuedTimeUtc" in obj else ts
        msg = {"type": "outcome", "decision_id": event_id, "reward": reward, "id": "r-" + _digest(raw), "agent": agent}
        if when is not None:
            msg["ts"] = when
        return [_convert(msg, Outcome)]

    if obj.get("_skipLearn") is True:
        raise BadLine("marked _skipLearn (the logging service kept it out of learning)")
    c = obj.get("c")
    if not isinstance(c, dict):
        raise BadLine("no context object c" if c is None else "c must be an object")
    multi = c.get("_multi")
    if not isinstance(multi, list) or not multi:
        raise BadLine("c._multi must be a non-empty list of action objects (cb_explore_adf)")
    actions = [_action(item, i) for i, item in enumerate(multi)]
    if len({a["id"] for a in actions}) < len(actions):
        raise BadLine("two actions in c._multi share an id")
    n = len(actions)

    ranking = obj.get("a")
    if ranking is not None:
        if not isinstance(ranking, list) or not ranking:
            raise BadLine("a must be a non-empty list of 1-based action indices")
        ranking = [_index(v, "a[i]") for v in ranking]
        if any(not 1 <= v <= n for v in ranking):
            raise BadLine(f"a {ranking} names an action outside 1..{n}")
    if "_labelIndex" in obj:
        chosen = _index(obj["_labelIndex"], "_labelIndex")
    elif "_label_Action" in obj:
        chosen = _index(obj["_label_Action"], "_label_Action") - 1
    elif ranking is not None:
        chosen = ranking[0] - 1
    else:
        raise BadLine("no chosen action (_labelIndex, _label_Action or a)")
    if not 0 <= chosen < n:
        raise BadLine(f"chosen action index {chosen} is outside the {n} actions of c._multi")
    if ranking is not None and ranking[0] - 1 != chosen:
        raise BadLine(f"a[0] ({ranking[0]}) and _labelIndex ({chosen}, 0-based) disagree on the chosen action")

    prob = _number(obj, "_label_probability")
    if not 0.0 < prob <= 1.0:
        raise BadLine(f"_label_probability must be in (0, 1], not {prob!r}: off-policy evaluation divides by it")
    cost = _number(obj, "_label_cost")

    probs = None
    p = obj.get("p")
    if ranking is not None and isinstance(p, list) and len(p) == len(ranking) == n and len(set(ranking)) == n:
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p):
            probs = [0.0] * n
            for index, value in zip(ranking, p):
                probs[index - 1] = float(value)
            # VW learns from _label_probability alone: a p that disagrees with it is left out, not the event
            if abs(probs[chosen] - prob) > max(0.01 * prob, 5e-4):
                probs = None

    decision_id = event_id if event_id is not None else "dsjson-" + _digest(raw)
    context = {k: v for k, v in c.items() if k not in ("_multi", "_slots")}
    decision = {
        "type": "decision",
        "id": decision_id,
        "agent": agent,
        "context": context,
        "actions": actions,
        "chosen": actions[chosen]["id"],
        "prob": prob,
        "probs": probs,
        "strategy": "imported:dsjson",
    }
    outcome = {"type": "outcome", "decision_id": decision_id, "reward": -cost, "agent": agent}
    outcome["id"] = (decision_id + ":cost") if len(decision_id) <= 250 else "c-" + _digest(raw)
    if ts is not None:
        decision["ts"] = outcome["ts"] = ts
    return [_convert(decision, Decision), _convert(outcome, Outcome)]


def _convert(obj: dict[str, Any], kind: type) -> Any:
    try:
        return msgspec.convert(obj, kind)
    except msgspec.ValidationError as exc:
        raise BadLine(f"does not make a valid {obj['type']}: {_problem(exc)}") from None


def parse_dsjson(path: str | os.PathLike[str], agent: str | None = None) -> Iterator[Item]:
    """Vowpal Wabbit DSJSON (cb_explore_adf) lines as decisions with their outcome (reward = -cost)."""
    path = _check(path)
    agent = agent or DSJSON_AGENT
    for number, raw in _lines(path):
        try:
            messages = _dsjson_record(raw, agent)
        except BadLine as exc:
            yield Rejected(path, number, exc.reason)
            continue
        for msg in messages:
            yield Record(number, msg)


# ---- Open Bandit Dataset CSV -------------------------------------------------------------

_OBD_COLUMNS = ("timestamp", "item_id", "position", "click", "propensity_score")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _obd_rows(path: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of every row of an OBD CSV, its header checked."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in _OBD_COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise ImportFileError(path, f"not an Open Bandit Dataset CSV: no column {', '.join(missing)}")
            for row in reader:
                yield reader.line_num, row
    except OSError as exc:
        raise ImportFileError(path, exc.strerror or str(exc)) from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ImportFileError(path, f"cannot read the CSV: {exc}") from None


def _obd_int(row: dict[str, str], key: str, least: int) -> int:
    text = (row.get(key) or "").strip()
    if not (text.isascii() and text.isdigit() and len(text) < 10 and int(text) >= least):
        raise BadLine(f"{key} must be an integer from {least}, not {text!r}")
    return int(text)


def _obd_context(row: dict[str, str]) -> dict[str, Any]:
    """Every other named column: user features as strings (they are hashes), numbers as numbers."""
    context: dict[str, Any] = {}
    for key, text in row.items():
        if not key or key in _OBD_COLUMNS or text is None:  # the unnamed column is pandas' row index
            continue
        if not key.startswith("user_feature") and _NUMBER.match(text):
            context[key] = float(text)
        else:
            context[key] = text
    return context


def _obd_actions(path: str) -> int:
    """How many items the campaign has: one more than the largest item_id in the file."""
    largest = -1
    for _, row in _obd_rows(path):
        try:
            largest = max(largest, _obd_int(row, "item_id", 0))
        except BadLine:
            pass  # reported when the row itself is read
    return largest + 1


def _obd_record(row: dict[str, str], agent: str, actions: list[str]) -> list[Decision | Outcome]:
    stamp = (row.get("timestamp") or "").strip()
    ts = parse_timestamp(stamp)
    item = _obd_int(row, "item_id", 0)
    if item >= len(actions):
        raise BadLine(f"item_id {item} is outside the campaign's {len(actions)} items")
    slot = _obd_int(row, "position", 1) - 1  # OBD counts positions from 1
    if slot >= len(actions):  # a slate has at most as many slots as the campaign has items
        raise BadLine(f"position {slot + 1} is beyond the campaign's {len(actions)} items")
    click = (row.get("click") or "").strip()
    if not _NUMBER.match(click) or float(click) not in (0.0, 1.0):
        raise BadLine(f"click must be 0 or 1, not {click!r}")
    prob_text = (row.get("propensity_score") or "").strip()
    prob = float(prob_text) if _NUMBER.match(prob_text) else math.nan
    if not 0.0 < prob <= 1.0:
        raise BadLine(f"propensity_score must be in (0, 1], not {prob_text!r}: off-policy evaluation divides by it")
    context = _obd_context(row)
    # an impression: its rows share the timestamp and the user
    user = [f"{k}={v}".encode() for k, v in sorted(context.items()) if k.startswith("user_feature")]
    slate = "obd-" + _digest(stamp.encode(), *user)
    decision_id = f"{slate}-{slot}"
    decision = {
        "type": "decision",
        "id": decision_id,
        "agent": agent,
        "context": context,
        "actions": actions,
        "chosen": actions[item],
        "prob": prob,
        "strategy": "imported:obd",
        "ts": ts,
        "slot": slot,
        "slate": slate,
    }
    outcome = {
        "type": "outcome",
        "decision_id": decision_id,
        "reward": float(click),
        "id": decision_id + ":click",
        "agent": agent,
        "ts": ts,
    }
    return [_convert(decision, Decision), _convert(outcome, Outcome)]


def parse_obd(path: str | os.PathLike[str], agent: str | None = None, n_actions: int | None = None) -> Iterator[Item]:
    """Open Bandit Dataset rows as slot decisions with their outcome (reward = click).

    Every decision offers the campaign's items ``0`` .. ``n_actions - 1`` (by default one more
    than the largest item_id in the file); ``prob`` is OBD's propensity_score, the probability of
    the item at that position. A position logged twice for one impression is refused (OBD files
    are sorted by time, so an impression's rows are together).
    """
    path = _check(path)
    agent = agent or OBD_AGENT
    actions = [str(i) for i in range(n_actions if n_actions is not None else _obd_actions(path))]
    stamp, seen = None, set()
    for number, row in _obd_rows(path):
        try:
            messages = _obd_record(row, agent, actions)
        except BadLine as exc:
            yield Rejected(path, number, exc.reason)
            continue
        decision = messages[0]
        if decision.ts != stamp:
            stamp, seen = decision.ts, set()
        if decision.id in seen:
            yield Rejected(path, number, f"position {decision.slot + 1} of this impression is logged twice")
            continue
        seen.add(decision.id)
        for msg in messages:
            yield Record(number, msg)


# ---- either ------------------------------------------------------------------------------


def detect_format(path: str | os.PathLike[str]) -> Format:
    """``dsjson`` for a .dsjson file or one whose first line looks like DSJSON, ``obd`` for a .csv
    file, else ``ndjson``."""
    path = _check(path)
    if path.endswith(".dsjson"):
        return "dsjson"
    if path.endswith(".csv"):
        return "obd"
    for _, raw in _lines(path):
        try:
            obj = _any.decode(raw)
        except msgspec.DecodeError:
            return "ndjson"
        if isinstance(obj, dict) and "type" not in obj and ("_label_cost" in obj or "c" in obj or "RewardValue" in obj):
            return "dsjson"
        return "ndjson"
    return "ndjson"


def parse(
    path: str | os.PathLike[str], format: str | None = None, agent: str | None = None, estimate: Propensities | None = None
) -> Iterator[Item]:
    fmt = format or detect_format(path)
    if fmt == "ndjson":
        return parse_ndjson(path, agent, estimate)
    if fmt == "dsjson":
        return parse_dsjson(path, agent)
    if fmt == "obd":
        return parse_obd(path, agent)
    raise ImportFileError(os.fspath(path), f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def count_lines(path: str | os.PathLike[str]) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError as exc:
        raise ImportFileError(os.fspath(path), exc.strerror or str(exc)) from None


# ---- sending -----------------------------------------------------------------------------


class Summary(msgspec.Struct, kw_only=True):
    decisions: int = 0  # sent and accepted by the daemon (duplicates included)
    outcomes: int = 0
    rejected: list[Rejected] = []


def send(
    items: Iterable[Item],
    conn: Any,
    path: str,
    batch_size: int = DEFAULT_BATCH,
    on_line: Callable[[int], None] | None = None,
) -> Summary:
    """Stream records over ``conn`` (a ``reflexd.wire.connection.Connection``), flushing every batch.

    A batch is cut only between a decision's group (the decision and the outcomes that follow
    it), so a decision and its outcomes are written in the same ingest batch. Frames the daemon
    refuses come back as errors naming the frame; they are reported as rejected lines.
    ``on_line`` is called with the line number of every item, for a progress bar.
    """
    summary = Summary()
    pending: list[Record] = []
    flushes = 0
    frames = 0  # frames sent on this connection; the daemon's error replies name them by index

    def flush() -> None:
        nonlocal flushes, frames
        if not pending:
            return
        flushes += 1
        lines = {frames + i: r.line for i, r in enumerate(pending)}
        # loaded: the import's counts, and a training run right after it, see every event
        conn.send([r.message for r in pending] + [Flush(req=flushes, loaded=True)])
        frames += len(pending) + 1
        refused: set[int] = set()
        while True:
            reply = conn.receive()
            if isinstance(reply, Ack) and reply.req == flushes:
                break
            if isinstance(reply, Error):
                line = lines.get(reply.seq if reply.seq is not None else -1, 0)
                refused.add(reply.seq if reply.seq is not None else -1)
                summary.rejected.append(Rejected(path, line, f"refused by the daemon: {reply.code}: {reply.message}"))
        for i, record in enumerate(pending):
            if frames - len(pending) - 1 + i in refused:
                continue
            if isinstance(record.message, Decision):
                summary.decisions += 1
            else:
                summary.outcomes += 1
        pending.clear()

    for item in items:
        if on_line is not None:
            on_line(item.line)
        if isinstance(item, Rejected):
            summary.rejected.append(item)
            continue
        if isinstance(item.message, Decision) and len(pending) >= batch_size:
            flush()
        pending.append(item)
    flush()
    return summary
