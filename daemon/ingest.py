"""From decoded events to durable rows: one writer task batches everything into the store.

Connection handlers ``submit`` events; the writer commits them in batches from a worker thread
(DuckDB must not block the event loop) and only then releases the flush barriers that let a
connection acknowledge. The queue between them is bounded, so a store that falls behind makes
handlers stop reading and the kernel pushes back on senders.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from . import log
from .errors import StorageError
from .protocol import ExperienceEvent

_log = log.get("reflexd.ingest")
POLL_SECONDS = 0.002


@dataclass
class _Item:
    events: Sequence[ExperienceEvent] = ()
    dead: Sequence[Any] = ()
    barrier: anyio.Event | None = None


@dataclass
class Counters:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    queued: int = 0
    write_errors: int = 0
    client_dropped: int = 0  # events clients reported dropping because their buffer was full
    unlogged: int = 0  # socket decisions served while the queue was full, so not stored
    by_type: dict[str, int] = field(default_factory=dict)


class Ingest:
    def __init__(self, store: Any, batch_size: int, flush_interval: float, queue_size: int) -> None:
        self.store = store
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.queue_size = queue_size
        # the stream itself is unbounded: the bound is on events queued, checked in submit
        send, recv = anyio.create_memory_object_stream[_Item](math.inf)
        self._send: ObjectSendStream[_Item] = send
        self._recv: ObjectReceiveStream[_Item] = recv
        self._room = anyio.Event()  # set (and replaced) after every commit
        self.counters = Counters()
        self.storage_error: str | None = None

    def configure(self, batch_size: int, flush_interval: float, queue_size: int) -> None:
        """Apply reloaded settings; they take effect from the next batch."""
        self.batch_size, self.flush_interval, self.queue_size = batch_size, flush_interval, queue_size

    def _full(self, n: int) -> bool:
        # one chunk is always let through, so a chunk larger than the bound cannot wedge ingest
        queued = self.counters.queued
        return queued > 0 and queued + n > self.queue_size

    async def submit(self, events: Sequence[ExperienceEvent], dead: Sequence[Any] = ()) -> None:
        """Queue events for the writer, waiting while ``queue_size`` events are already queued.

        The wait is the backpressure: the caller stops reading its socket meanwhile.
        """
        n = len(events) + len(dead)
        if not n:
            return
        while self._full(n):
            await self._room.wait()
        self.counters.received += n
        self.counters.queued += n
        self._send.send_nowait(_Item(events=events, dead=dead))

    def offer(self, events: Sequence[ExperienceEvent]) -> bool:
        """Queue events without waiting; False (and counted) when the queue is full.

        For decisions the daemon itself made: serving them must not wait on a stalled store.
        """
        if self._full(len(events)):
            self.counters.unlogged += len(events)
            return False
        self.counters.received += len(events)
        self.counters.queued += len(events)
        self._send.send_nowait(_Item(events=events))
        return True

    async def barrier(self) -> None:
        """Return once everything submitted before this call is durable."""
        done = anyio.Event()
        self._send.send_nowait(_Item(barrier=done))
        await done.wait()

    def close(self) -> None:
        """No more submissions; the writer drains what is queued and returns."""
        self._send.close()

    async def run(self) -> None:
        """The writer loop; returns once closed and drained."""
        async with self._recv:
            while True:
                try:
                    first = await self._recv.receive()
                except anyio.EndOfStream:
                    return
                batch = await self._gather(first)
                await self._commit(batch)

    async def _gather(self, first: _Item) -> list[_Item]:
        """Collect queued items into one batch, waiting up to flush_interval for it to fill.

        Never cancels a pending receive: anyio drops an item handed to a receive that is
        cancelled at the same moment, and a dropped item here is an acknowledged event lost.
        So the wait is a short sleep between non-blocking receives.
        """
        batch = [first]
        n = len(first.events)
        deadline = time.monotonic() + self.flush_interval
        while n < self.batch_size and first.barrier is None:
            try:
                item = self._recv.receive_nowait()
            except anyio.WouldBlock:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or any(i.barrier for i in batch):
                    break
                await anyio.sleep(min(remaining, POLL_SECONDS))
                continue
            except anyio.EndOfStream:
                break
            batch.append(item)
            n += len(item.events)
        return batch

    async def _commit(self, batch: list[_Item]) -> None:
        events = [e for item in batch for e in item.events]
        dead = [d for item in batch for d in item.dead]
        delay = 0.1
        while True:
            try:
                if dead:
                    await anyio.to_thread.run_sync(self.store.dead_letter, dead)
                    self.counters.dead_letters += len(dead)
                    self.counters.queued -= len(dead)
                    dead = []
                result = await anyio.to_thread.run_sync(self.store.write, events, time.time())
                break
            except StorageError as exc:
                # Nothing is acknowledged while writes fail; the batch stays in memory and is retried.
                self.counters.write_errors += 1
                if self.storage_error != str(exc):
                    _log.error("store write failed; not acknowledging until it succeeds", error=str(exc))
                self.storage_error = str(exc)
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
        if self.storage_error is not None:
            _log.info("store writes succeed again")
            self.storage_error = None
        c = self.counters
        c.stored += result.inserted
        c.duplicates += result.duplicates
        c.queued -= len(events)
        for name in ("decisions", "outcomes", "steps", "events"):
            c.by_type[name] = c.by_type.get(name, 0) + getattr(result, name)
        for item in batch:
            if item.barrier is not None:
                item.barrier.set()
        self._room.set()
        self._room = anyio.Event()
