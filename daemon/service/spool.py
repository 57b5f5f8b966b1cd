"""The ingest spool: accepted events are appended here and fsynced before anyone is acknowledged.

DuckDB loads ~150k rows/s at best (MEASUREMENTS.md), and building its input in Python costs as
much again; acknowledging only after the insert capped ingest below both. Appending a batch as
one JSON line costs ~2 µs per event, after which the daemon may acknowledge: the events are on
disk. The store later loads whole segment files with DuckDB's own JSON reader, off the event
loop and outside the GIL (``Store.load``).

A segment is a file of lines, one per batch, each line::

    {"received_at": ..., "line": n, "decisions": [...], "outcomes": [...], "steps": [...], "events": [...]}

Nothing is lost to a crash: segments still on disk at start-up are loaded before anything new, a
torn last line (a batch that was never acknowledged) is cut off, and loading a segment twice
changes nothing, because ids are keys and an event sent without an id gets one derived from its
place in its segment.
"""

from __future__ import annotations

import json
import os
import re
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from reflexd.durable import atomic_write, fsync_path
from reflexd.errors import StorageError
from reflexd.features import as_stored
from reflexd.wire.protocol import Decision, EpisodeEnd, Event, Outcome, Step

SUFFIX = ".ndjson"
# A batch whose line would be longer is split over several lines: DuckDB's reader holds a line
# whole (twice over), within store.memory_limit_mb.
LINE_BYTES = 8 << 20
_NAME = re.compile(r"^(\d{12})-[0-9a-f]{12}\.ndjson$")
_TYPES: dict[type, str] = {Decision: "decisions", Outcome: "outcomes", Step: "steps", Event: "events"}


# msgpack can carry Ext values, which JSON cannot: their bytes are kept rather than fail
_encode = msgspec.json.Encoder(enc_hook=as_stored).encode


class _Raw(bytes):
    """JSON punctuation already written, as opposed to a value still to encode."""


def plain_json(value: Any) -> bytes:
    """JSON text for any decoded value, without recursion; what JSON cannot hold becomes its repr.

    For what msgspec refuses: array map keys from msgpack, and values nested about as deep as the
    decoder admits (encoding those recursively can pass the recursion limit).
    """
    out: list[bytes] = []
    todo: list[Any] = [value]
    while todo:
        item = todo.pop()
        if type(item) is _Raw:
            out.append(item)
            continue
        if isinstance(item, msgspec.Struct):  # an Action among a decision's actions
            item = msgspec.structs.asdict(item)
        elif isinstance(item, msgspec.msgpack.Ext):
            item = as_stored(item)
        if isinstance(item, dict):
            parts: list[Any] = [_Raw(b"{")]
            for i, (k, v) in enumerate(item.items()):
                key = k if isinstance(k, str) else repr(k)
                parts += [_Raw((b"," if i else b"") + _encode(key) + b":"), v]
            parts.append(_Raw(b"}"))
        elif isinstance(item, (list, tuple)):
            parts = [_Raw(b"[")]
            for i, v in enumerate(item):
                parts += [_Raw(b","), v] if i else [v]
            parts.append(_Raw(b"]"))
        else:
            try:
                out.append(_encode(item))
            except (TypeError, msgspec.EncodeError):
                out.append(_encode(repr(item)))
            continue
        todo.extend(reversed(parts))
    return b"".join(out)


def _encode_event(event: Any) -> bytes:
    try:
        return _encode(event)
    except (TypeError, msgspec.EncodeError, RecursionError):
        # every field through the fallback; the event's own JSON shape (field names) is kept
        fields = msgspec.structs.asdict(event)
        return _encode({k: msgspec.Raw(plain_json(v)) for k, v in fields.items()})


def encode_line(events: Sequence[Decision | Outcome | Step | Event], received_at: float, line: int) -> bytes:
    """One batch as one spool line (with its newline)."""
    groups: dict[str, list[Any]] = {"decisions": [], "outcomes": [], "steps": [], "events": []}
    for event in events:
        if type(event) is EpisodeEnd:  # kept as the event it is stored as
            event = event.as_event()
        name = _TYPES.get(type(event))
        if name is None:
            raise TypeError(f"the spool keeps decisions, outcomes, steps and events, not {type(event).__name__}")
        groups[name].append(event)
    head = b'{"received_at":%s,"line":%d' % (_encode(received_at), line)
    parts = [head]
    for name, rows in groups.items():
        try:
            body = _encode(rows)
        except (TypeError, msgspec.EncodeError, RecursionError):
            body = b"[" + b",".join(_encode_event(e) for e in rows) + b"]"
        parts.append(b',"%s":%s' % (name.encode(), body))
    parts.append(b"}\n")
    return b"".join(parts)


def names_agent(raw: bytes, agent: str) -> bool:
    """Whether raw JSON or msgpack, however damaged or cut short, has an ``agent`` member ``agent``."""
    if msgspec.msgpack.encode("agent") + msgspec.msgpack.encode(agent) in raw:
        return True
    return re.search(rb'"agent"\s*:\s*' + re.escape(_encode(agent)), raw) is not None


def _without_agent(line: bytes, agent: str) -> tuple[bytes | None, int]:
    """A spool line without ``agent``'s events (None when nothing is left), and how many went."""
    try:
        batch = msgspec.json.decode(line)
        if not isinstance(batch, dict):
            raise TypeError
        decisions = {d.get("id") for d in batch.get("decisions") or () if d.get("agent") == agent}
        gone = 0
        for key in _TYPES.values():
            events = batch.get(key) or []
            kept = [e for e in events if not _belongs(e, key, agent, decisions)]
            gone += len(events) - len(kept)
            batch[key] = kept
    except (msgspec.DecodeError, AttributeError, TypeError, RecursionError):
        return (None, 1) if names_agent(line, agent) else (line, 0)
    if not gone:
        return line, 0
    if not any(batch[key] for key in _TYPES.values()):
        return None, gone
    # plain_json: the line may hold values nested deeper than msgspec encodes recursively
    return plain_json(batch), gone


def _belongs(event: dict[str, Any], key: str, agent: str, decisions: set[Any]) -> bool:
    if event.get("agent") == agent:
        return True
    return key == "outcomes" and event.get("agent") is None and event.get("decision_id") in decisions


# ---- a damaged line, event by event ------------------------------------------------------

_GROUPS = {"decision": "decisions", "outcome": "outcomes", "step": "steps", "event": "events"}
_STRUCTS: dict[str, type] = {"decision": Decision, "outcome": Outcome, "step": Step, "event": Event}
# every event is encoded with its type tag first, so this is where each one starts
_START = re.compile(rb'\{"type":"(decision|outcome|step|event)"')
_HEAD = re.compile(rb'\{"received_at":[-+0-9.eE]+,"line":(\d+)')
_KEY = re.compile(rb'"(decisions|outcomes|steps|events)":')
# what lies between the events of a line: commas, brackets, the names of the groups
_GLUE = re.compile(rb'(?:[\[\]{},:\s]|"(?:decisions|outcomes|steps|events)":)*')
_GLUE_END = re.compile(rb'(?:[\[\]{},:\s]|"(?:decisions|outcomes|steps|events)":)*\Z')


class LineParts(msgspec.Struct, frozen=True, kw_only=True):
    """A spool line taken apart by ``split_line``."""

    head: bytes  # '{"received_at":...,"line":n', as the line had it
    events: list[tuple[str, bytes]]  # each event that still reads as one: (group, its JSON, with its id)
    damaged: list[tuple[str, bytes]]  # the bytes between them that do not: (group, bytes)
    damaged_events: int  # how many events those bytes held, counted by where each starts (at least 1 a span)


def split_line(line: bytes, segment: str) -> LineParts | None:
    """A line the store refused, taken apart event by event; None if its head cannot be read.

    Each event is read on its own from where its type tag starts: one damaged byte costs the event
    it is in, not the line. An event sent without an id is given the one loading the line would have
    given it (``segment.line.index``, from its place in its group), so loading the parts again, or
    the whole line after a repair, stores nothing twice.
    """
    head = _HEAD.match(line)
    if head is None:
        return None
    number = int(head[1])
    text = line.decode("latin-1")  # a character per byte: offsets in the text are offsets in the line
    decoder = json.JSONDecoder()
    events: list[tuple[str, bytes]] = []
    damaged: list[tuple[str, bytes]] = []
    group, index, lost = "decisions", 0, 0  # the group being read, the next event's place in it

    def between(start: int, end: int) -> None:
        """Read the bytes between two events: glue, or damage (kept, and its events counted)."""
        nonlocal group, index, lost
        gap = line[start:end]
        lead = _GLUE.match(gap).end()  # type: ignore[union-attr]
        for key in _KEY.findall(gap[:lead]):
            group, index = key.decode(), 0
        if lead == len(gap):
            return
        trail = _GLUE_END.search(gap, lead).start()  # type: ignore[union-attr]
        core = gap[lead:trail]
        starts = [m.start() for m in _START.finditer(core)]
        damaged.append((group, core))
        lost += max(1, len(starts))
        keys = list(_KEY.finditer(core))
        if keys:  # the damage runs into the next group
            group, index = keys[-1][1].decode(), sum(1 for s in starts if s > keys[-1].start())
        else:
            index += max(1, len(starts))
        for key in _KEY.findall(gap[trail:]):
            group, index = key.decode(), 0

    pos = head.end()
    for found in _START.finditer(line, pos):
        start = found.start()
        if start < pos or line[start - 1 : start] not in (b",", b"["):
            continue  # inside an event already read, or not where an event can start
        try:
            end = decoder.raw_decode(text, start)[1]
            event = msgspec.json.decode(line[start:end], type=_STRUCTS[found[1].decode()])
        except (ValueError, msgspec.DecodeError, RecursionError):
            continue  # damaged: its bytes are kept with the gap they lie in
        between(pos, start)
        raw = line[start:end]
        if event.id is None:
            raw = _encode(msgspec.structs.replace(event, id=f"{segment}.{number}.{index}"))
        index += 1
        events.append((_GROUPS[found[1].decode()], raw))
        pos = end
    between(pos, len(line))
    return LineParts(head=head[0], events=events, damaged=damaged, damaged_events=lost)


def build_line(head: bytes, events: Sequence[tuple[str, bytes]]) -> bytes:
    """A spool line of ``head`` (as ``LineParts`` has it) and JSON events, each with its group."""
    groups: dict[str, list[bytes]] = {name: [] for name in _TYPES.values()}
    for group, raw in events:
        groups.setdefault(group, []).append(raw)
    body = b"".join(b',"%s":[%s]' % (name.encode(), b",".join(rows)) for name, rows in groups.items())
    return head + body + b"}\n"


def _trim_torn_tail(path: Path) -> int:
    """Cut a segment back to its last complete line; returns the size kept."""
    with open(path, "r+b") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            f.truncate(keep)
            os.fsync(f.fileno())
    return keep


class Spool:
    """Append-only segment files in one directory; one writer appends, one loader takes segments.

    ``append`` may run in a worker thread while ``take`` runs in another; a lock keeps a segment
    from being handed to the loader in the middle of an append.
    """

    def __init__(self, directory: Path, segment_bytes: int) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._rejected_lock = threading.Lock()  # reject appends from the loader's thread, forget rewrites
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._lines = 0
        self._unchecked: dict[Path, int] = {}  # in loaded/: loaded into the store, not yet checkpointed
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._sealed, self._sizes = self._recover()
            # loaded by an earlier run, perhaps never checkpointed: loaded again before anything else
            self.to_restore = sorted(p for p in self.loaded_dir.glob("*" + SUFFIX) if _NAME.match(p.name))
            self.leftovers = frozenset(self._sealed + self.to_restore)  # written by an earlier run
        except OSError as exc:
            raise StorageError(f"cannot open the ingest spool at {directory}: {exc}") from exc
        # names in loaded/ count too: a new segment must sort after every one still waiting there
        self._counter = max((int(_NAME.match(p.name)[1]) for p in [*self._sealed, *self.to_restore]), default=0)  # type: ignore[index]
        self.pending_bytes = sum(self._sizes.values())

    def _recover(self) -> tuple[list[Path], dict[Path, int]]:
        """Segments left by an earlier run, oldest first, each cut back to its last whole line."""
        sealed, sizes = [], {}
        for path in sorted(p for p in self.directory.iterdir() if _NAME.match(p.name)):
            size = _trim_torn_tail(path)
            if size == 0:
                path.unlink()
                continue
            sealed.append(path)
            sizes[path] = size
        return sealed, sizes

    @property
    def segments(self) -> int:
        """Segments written and not yet loaded, the open one included."""
        return len(self._sealed) + (self._fd is not None)

    @property
    def leftovers_pending(self) -> bool:
        """Segments an earlier run left are still waiting to be loaded."""
        return bool(self.to_restore) or any(p in self.leftovers for p in self._sealed)

    def append(self, events: Sequence[Decision | Outcome | Step | Event], received_at: float) -> None:
        """Write one batch and fsync it; once this returns the batch survives a crash."""
        with self._lock:
            try:
                if self._fd is None:
                    self._open()
                lines = self._encode(events, received_at, self._lines)
                data = b"".join(lines)
                self._write(data)
            except OSError as exc:
                raise StorageError(f"appending {len(events)} events to the ingest spool failed: {exc}") from exc
            self._size += len(data)
            self._lines += len(lines)
            self.pending_bytes += len(data)
            if self._size >= self.segment_bytes:
                self._seal()

    @staticmethod
    def _encode(events: Sequence[Any], received_at: float, first: int) -> list[bytes]:
        """The batch as one line, or halved until each line is within LINE_BYTES."""
        line = encode_line(events, received_at, first)
        if len(line) <= LINE_BYTES or len(events) == 1:
            return [line]
        half = len(events) // 2
        head = Spool._encode(events[:half], received_at, first)
        return head + Spool._encode(events[half:], received_at, first + len(head))

    def _open(self) -> None:
        self._counter += 1
        # the random part keeps ids derived from a segment's name unique across restarts
        path = self.directory / f"{self._counter:012d}-{uuid.uuid4().hex[:12]}{SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        self._path, self._size, self._lines = path, 0, 0
        fsync_path(self.directory)  # the new file's name must survive a crash too

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
            os.fdatasync(self._fd)
        except OSError:
            # a partial line would be cut off at recovery anyway; cutting it now keeps later
            # lines readable once writes succeed again
            os.ftruncate(self._fd, self._size)
            raise

    def _seal(self) -> None:
        if self._fd is None:
            return
        os.close(self._fd)
        assert self._path is not None
        self._sealed.append(self._path)
        self._sizes[self._path] = self._size
        self._fd, self._path = None, None

    def take(self) -> list[Path]:
        """Seal the open segment and return every segment not yet loaded, oldest first."""
        with self._lock:
            self._seal()
            return list(self._sealed)

    @property
    def loaded_dir(self) -> Path:
        """Where loaded segments wait for the store's next checkpoint, one file per segment."""
        return self.directory / "loaded"

    def loaded(self, path: Path) -> None:
        """Set a segment aside in loaded/ once the store has committed it, until ``checkpointed``.

        Until DuckDB checkpoints, what it committed lives in its write-ahead log alone, and a
        damaged or lost log would lose it silently. A rename is atomic, so after a crash the
        segment is in one folder or the other, and loaded again from either (ids are keys).
        """
        with self._lock:
            self._sealed.remove(path)
            size = self._sizes.pop(path)
            self.pending_bytes -= size
        try:
            self.loaded_dir.mkdir(mode=0o700, exist_ok=True)
            kept = path.rename(self.loaded_dir / path.name)
        except OSError:
            return  # left behind, it is loaded again at the next start, harmlessly (ids are keys)
        with self._lock:
            self._unchecked[kept] = size

    def restored(self, path: Path) -> None:
        """A segment of ``to_restore`` is loaded again; it waits for the next checkpoint like the others."""
        with self._lock:
            self.to_restore.remove(path)
            self._unchecked[path] = path.stat().st_size if path.exists() else 0

    @property
    def unchecked_bytes(self) -> int:
        """Bytes of the segments in loaded/ that wait for a checkpoint."""
        with self._lock:
            return sum(self._unchecked.values())

    def unchecked(self) -> list[Path]:
        """The segments in loaded/ a checkpoint taken now makes redundant."""
        with self._lock:
            return list(self._unchecked)

    def checkpointed(self, paths: Sequence[Path]) -> None:
        """Delete segments whose events a checkpoint has written into the database file."""
        with self._lock:
            for path in paths:
                self._unchecked.pop(path, None)
        for path in paths:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass  # loaded again at the next start, harmlessly

    @property
    def rejected(self) -> Path:
        """Where lines the store refused are kept, one file per segment they came from."""
        return self.directory / "rejected"

    def reject(self, segment: Path, line: bytes) -> Path:
        """Keep a line the store refused in ``rejected/``, for an operator to look at."""
        with self._rejected_lock:
            self.rejected.mkdir(mode=0o700, exist_ok=True)
            path = self.rejected / segment.name
            with open(path, "ab") as f:
                f.write(line if line.endswith(b"\n") else line + b"\n")
                f.flush()
                os.fsync(f.fileno())
            return path

    def forget(self, agent: str) -> int:
        """Remove ``agent``'s events from the lines kept in ``rejected/``; how many went.

        An outcome goes with the agent when it names the agent, or when it was sent without one
        and its decision, in the same line, is the agent's. A line that cannot be read as a batch
        but names the agent (``names_agent``) goes whole, counted as one: its events cannot be
        told apart. Each file is replaced whole (``atomic_write``), under the lock ``reject``
        appends under, so a line refused meanwhile is never lost.
        """
        with self._rejected_lock:
            if not self.rejected.is_dir():
                return 0
            removed = 0
            for path in sorted(p for p in self.rejected.iterdir() if _NAME.match(p.name)):
                lines, gone = [], 0
                for line in path.read_bytes().split(b"\n"):
                    if not line:
                        continue
                    kept, n = _without_agent(line, agent)
                    gone += n
                    if kept is not None:
                        lines.append(kept + b"\n")
                if not gone:
                    continue
                removed += gone
                if lines:
                    atomic_write(path, b"".join(lines))
                else:
                    path.unlink()
                    fsync_path(self.rejected)
            return removed

    @staticmethod
    def events_in(line: bytes) -> int:
        """How many events a spool line holds; of a damaged line, how many start in it (at least 1)."""
        try:
            batch = msgspec.json.decode(line)
            return sum(len(batch.get(k) or ()) for k in _TYPES.values())
        except (msgspec.DecodeError, AttributeError, TypeError, RecursionError):
            return max(1, len(_START.findall(line)))

    def close(self) -> None:
        with self._lock:
            self._seal()
