"""Steps waiting for their episode, on disk: spans acknowledged must survive a restart.

``<state_dir>/traces/waiting.jsonl`` is a file of JSON lines, each adding records (``{"add":
[...]}``) or dropping them by key (``{"drop": [...]}``), appended and fsynced before the receiver
answers 200. At start it is replayed; a last line cut short by a crash was never acknowledged
(its fsync never returned) and is skipped. Once the file has grown well past what still waits,
it is rewritten whole (``atomic_write``) with only that. The records hold what the receiver keeps
of a span and nothing more: ids, outcomes and the allowed, redacted attributes.

Calls here block (they write and fsync): the receiver runs them in a worker thread, one at a time.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from reflexd import log
from reflexd.collect.spans import SpanRecord
from reflexd.durable import atomic_write, private_dir
from reflexd.errors import StateDirError, StorageError

_log = log.get("reflexd.collect")
FILE_NAME = "waiting.jsonl"
COMPACT_AFTER = 10_000  # records added since the last rewrite before one is considered


class _Line(msgspec.Struct, omit_defaults=True):
    add: list[SpanRecord] = []
    drop: list[str] = []


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_Line).decode


class Journal:
    """The append-only file of waiting records."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / FILE_NAME
        self._fd: int | None = None
        self._added = 0  # records appended since the file was last rewritten

    def load(self) -> list[SpanRecord]:
        """The records still waiting, as the file says; the file is rewritten with just those."""
        refusal = private_dir(self.directory, "the steps waiting for their episode")
        if refusal is not None:
            raise StateDirError(refusal)
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            raise StorageError(f"reading {self.path} failed: {exc.strerror or exc}") from None
        waiting: dict[str, SpanRecord] = {}
        lines = data.split(b"\n")
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                line = _decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                if number == len(lines):  # no newline after it: cut short by a crash, never acknowledged
                    continue
                _log.error("a line of the waiting steps' journal cannot be read; skipped", path=str(self.path), line=number, error=str(exc))
                continue
            for record in line.add:
                waiting[record.key] = record
            for key in line.drop:
                waiting.pop(key, None)
        records = list(waiting.values())
        self.compact(records)
        return records

    def write(self, add: list[SpanRecord], drop: list[str]) -> None:
        """Append one line and fsync it; StorageError if that fails."""
        if not add and not drop:
            return
        data = _encode(_Line(add=add, drop=drop)) + b"\n"
        start = None
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            start = os.fstat(self._fd).st_size
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError as exc:
            # a line half written would run into the next one, and load would skip both: cut it off
            if self._fd is not None and start is not None:
                try:
                    os.ftruncate(self._fd, start)
                except OSError:
                    pass
            self.close()
            raise StorageError(f"writing {self.path} failed: {exc.strerror or exc}") from None
        self._added += len(add)

    def due(self, live: int) -> bool:
        """Whether the file holds enough that no longer waits to be worth rewriting."""
        return self._added >= COMPACT_AFTER and self._added > 2 * live

    def compact(self, live: list[SpanRecord]) -> None:
        """Rewrite the file with only ``live``; StorageError if that fails (the old file stays)."""
        self.close()
        data = _encode(_Line(add=live)) + b"\n" if live else b""
        atomic_write(self.path, data)  # the directory is private (0750, the daemon's)
        self._added = 0

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
