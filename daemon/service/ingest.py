"""From decoded events to durable rows: a writer appends batches to the spool, a loader moves them into DuckDB.

Connection handlers ``submit`` events. The writer appends them in batches to the spool
(``reflexd.service.spool``) and fsyncs, from a worker thread, and only then releases the flush barriers
that let a connection acknowledge. The loader takes whole spool segments into the store behind it,
so DuckDB's insert rate bounds how far the spool grows, not how fast events are acknowledged.

Two bounds push back on senders: events held in memory (``queue_size``) and spool bytes not yet
loaded (``spool_bytes``). When either is full, handlers stop reading and the kernel pushes back.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from reflexd import log
from reflexd.config import IngestConfig
from reflexd.errors import RejectedData, RequestTimeout, StorageError
from reflexd.service.spool import Spool
from reflexd.service.store import DeadLetter
from reflexd.wire.protocol import ExperienceEvent, Outcome

_log = log.get("reflexd.ingest")
POLL_SECONDS = 0.002
# loaded spool bytes kept for a checkpoint, past which one is taken without waiting for the interval
CHECKPOINT_BYTES = 64 << 20
GAVE_UP = object()  # what a retried storage call returns when it stopped trying


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
    id_taken: int = 0  # of the dead letters: acknowledged decisions whose id another decision holds
    queued: int = 0  # in memory, not yet in the spool
    spooled: int = 0  # in the spool (durable), not yet loaded into DuckDB
    recovered: int = 0  # events a previous run spooled, loaded at start-up
    refused: int = 0  # events in spool lines the store refused, kept in spool/rejected/
    restored: int = 0  # events the store had lost (a damaged or missing WAL), loaded again from spool/loaded/
    write_errors: int = 0
    client_dropped: int = 0  # events clients reported dropping because their buffer was full
    unlogged: int = 0  # socket decisions served while the queue was full, so not stored
    by_type: dict[str, int] = field(default_factory=dict)


class _Retry:
    """Retry a failing storage call with backoff; report the failure once, and the recovery."""

    def __init__(self, counters: Counters, what: str, meanwhile: str) -> None:
        self.counters, self.what, self.meanwhile = counters, what, meanwhile
        self.error: str | None = None

    async def run(self, fn: Any, *args: Any, give_up: Any = lambda: False) -> Any:
        """``fn(*args)`` in a worker thread until it succeeds, or GAVE_UP once ``give_up()`` after a failure."""
        delay = 0.1
        while True:
            try:
                result = await anyio.to_thread.run_sync(fn, *args)
            except RejectedData:
                raise  # the same data would be refused again
            except StorageError as exc:
                # nothing is lost: the batch stays where it is (memory or spool) and is retried
                self.counters.write_errors += 1
                if self.error != str(exc):
                    _log.error(f"{self.what} failed; {self.meanwhile}", error=str(exc))
                self.error = str(exc)
                if give_up():
                    return GAVE_UP
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self.error is not None:
                _log.info(f"{self.what} succeeds again")
                self.error = None
            return result


class Ingest:
    def __init__(self, store: Any, spool: Spool, limits: IngestConfig) -> None:
        self.store = store
        self.spool = spool
        self.limits = limits
        # the stream itself is unbounded: the bound is on events queued, checked in submit
        send, recv = anyio.create_memory_object_stream[_Item](math.inf)
        self._send: ObjectSendStream[_Item] = send
        self._recv: ObjectReceiveStream[_Item] = recv
        self._room = anyio.Event()  # set (and replaced) after every append
        self.counters = Counters()
        self._spool_retry = _Retry(self.counters, "appending to the spool", "not acknowledging until it succeeds")
        self._load_retry = _Retry(
            self.counters, "loading the spool into the store", "acknowledged events wait in the spool and are retried"
        )
        self._dead: list[Any] = []  # dead letters are not acknowledged events: they wait in memory
        self._appended = 0  # batches appended to the spool
        self._loaded = 0  # of those, batches loaded into the store
        self._wake_loader = anyio.Event()
        self._load_done = anyio.Event()  # set (and replaced) after every load
        self._writer_done = False
        self._closing = False
        self._unchecked_since: float | None = None  # when a loaded segment first waited for a checkpoint
        self._checkpoint_error: str | None = None
        # told of each batch's accepted outcomes at once (the online head learns before the store has them)
        self.on_outcomes: Callable[[list[Outcome]], object] | None = None

    @property
    def storage_error(self) -> str | None:
        return self._spool_retry.error or self._load_retry.error

    @property
    def backlog(self) -> int:
        """Events accepted and not yet in the store: in memory or in the spool."""
        return self.counters.queued + self.counters.spooled

    def configure(self, limits: IngestConfig) -> None:
        """Apply reloaded settings; they take effect from the next batch."""
        self.limits = limits
        self.spool.segment_bytes = limits.segment_bytes

    def _full(self, n: int) -> bool:
        # one chunk is always let through, so a chunk larger than the bound cannot wedge ingest
        queued = self.counters.queued
        return queued > 0 and queued + n > self.limits.queue_size

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
        if self.on_outcomes is not None:
            try:
                outcomes = [event for event in events if type(event) is Outcome]
                if outcomes:
                    self.on_outcomes(outcomes)
            except Exception:  # the events are queued: learning from them beside must not fail the batch
                _log.exception("the online head could not learn from an outcome")

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

    async def barrier(self, loaded: bool = False) -> None:
        """Return once everything submitted before this call is durable (in the spool).

        With ``loaded``, wait until it is in the store too, so queries see it.
        """
        done = anyio.Event()
        self._send.send_nowait(_Item(barrier=done))
        await done.wait()
        if loaded:
            target = self._appended
            while self._loaded < target or self._dead or self.spool.leftovers_pending:
                self._wake_loader.set()
                await self._load_done.wait()

    async def barrier_within(self, seconds: float, what: str, loaded: bool = False) -> None:
        """``barrier``, or RequestTimeout naming ``what`` (and the store's error) after ``seconds``."""
        with anyio.move_on_after(seconds) as waited:
            await self.barrier(loaded=loaded)
        if waited.cancelled_caught:
            raise RequestTimeout(what, seconds, self.storage_error)

    def close(self) -> None:
        """No more submissions; the writer and the loader drain what is queued and return.

        A failing disk or store is not waited for meanwhile: what is spooled stays there for the
        next start, and a batch that cannot be spooled was never acknowledged.
        """
        self._closing = True
        self._send.close()
        self._load_done.set()  # a writer waiting for room in the spool stops waiting
        self._wake_loader.set()

    async def run(self) -> None:
        """The writer and the loader; returns once closed, with everything loaded."""
        async with anyio.create_task_group() as tg:
            self._wake_loader.set()  # segments a previous run left are loaded first
            tg.start_soon(self._load_loop)
            try:
                await self._write_loop()
            finally:
                self._writer_done = True
                self._wake_loader.set()

    # ---- the writer: memory → spool ------------------------------------------------------

    async def _write_loop(self) -> None:
        async with self._recv:
            while True:
                try:
                    first = await self._recv.receive()
                except anyio.EndOfStream:
                    return
                batch = await self._gather(first)
                await self._append(batch)

    async def _gather(self, first: _Item) -> list[_Item]:
        """Collect queued items into one batch, waiting up to flush_interval for it to fill.

        Never cancels a pending receive: anyio drops an item handed to a receive that is
        cancelled at the same moment, and a dropped item here is an acknowledged event lost.
        So the wait is a short sleep between non-blocking receives.
        """
        batch = [first]
        n = len(first.events)
        deadline = time.monotonic() + self.limits.flush_interval
        while n < self.limits.batch_size and first.barrier is None:
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

    async def _append(self, batch: list[_Item]) -> None:
        events = [e for item in batch for e in item.events]
        self._dead.extend(d for item in batch for d in item.dead)
        if events:
            # the loader falling behind (or a failing store) stops the spool growing past its bound
            while self.spool.pending_bytes >= self.limits.spool_bytes and not self._closing:
                self._wake_loader.set()
                await self._load_done.wait()
            appended = await self._spool_retry.run(self.spool.append, events, time.time(), give_up=self._is_closing)
            if appended is GAVE_UP:
                _log.warning("stopping; events never acknowledged were not spooled", events=len(events))
                return
            self._appended += 1
        c = self.counters
        c.queued -= len(events)  # dead letters stay queued until the loader writes them
        c.spooled += len(events)
        for item in batch:
            if item.barrier is not None:
                item.barrier.set()
        self._room.set()
        self._room = anyio.Event()
        self._wake_loader.set()

    # ---- the loader: spool → store -------------------------------------------------------

    async def _load_loop(self) -> None:
        if not await self._restore():
            return
        while True:
            with anyio.move_on_after(self._checkpoint_wait()):
                await self._wake_loader.wait()
            if not self._wake_loader.is_set():  # store.checkpoint_interval passed with nothing to load
                await self._checkpoint()
                continue
            self._wake_loader = anyio.Event()
            finished = self._writer_done  # read before taking, so nothing appended after is missed
            target = self._appended
            for segment in await anyio.to_thread.run_sync(self.spool.take):
                result = await self._load(segment)
                if result is GAVE_UP:
                    _log.warning("stopping with events in the spool; they are loaded at the next start")
                    return
                self.spool.loaded(segment)
                self._count_loaded(segment, result)
                if self._unchecked_since is None:
                    self._unchecked_since = time.monotonic()
                if self.spool.unchecked_bytes >= CHECKPOINT_BYTES:
                    await self._checkpoint()
            if self._checkpoint_wait() <= 0:
                await self._checkpoint()
            if self._dead:
                dead, self._dead = self._dead, []
                try:
                    if await self._load_retry.run(self.store.dead_letter, dead, give_up=self._stopping) is GAVE_UP:
                        return
                except RejectedData as exc:  # the frames were refused anyway; losing their record is logged
                    _log.error("the store refused dead letters", count=len(dead), error=str(exc))
                self.counters.dead_letters += len(dead)
                self.counters.queued -= len(dead)
            self._loaded = target
            self._load_done.set()
            self._load_done = anyio.Event()
            if finished:
                await self._checkpoint()  # a clean stop leaves nothing for the next start to load again
                self.spool.close()
                return

    async def _load(self, segment: Path, restoring: bool = False) -> Any:
        """Load one segment, retried while the store fails; line by line if it refuses the whole."""
        try:
            return await self._load_retry.run(self.store.load, segment, give_up=self._stopping)
        except RejectedData as exc:
            if restoring:  # its refused lines were set aside when it was first loaded
                found = await self._load_retry.run(self.store.load_each_line, segment, give_up=self._stopping)
                return found if found is GAVE_UP else found[0]
            return await self._load_line_by_line(segment, exc)

    async def _restore(self) -> bool:
        """Load spool/loaded/ again, before anything else: segments an earlier run loaded and had not
        seen checkpointed. Ids are keys, so this adds nothing unless the store lost what the
        segments hold, with a write-ahead log that was damaged or deleted; then it says so.
        False if it stopped (the segments stay for the next start)."""
        restored = 0
        for segment in list(self.spool.to_restore):
            result = await self._load(segment, restoring=True)
            if result is GAVE_UP:
                _log.warning("stopping with segments in spool/loaded/; they are loaded again at the next start")
                return False
            self.spool.restored(segment)
            restored += result.inserted
        if restored:
            self.counters.restored += restored
            _log.error(
                "the store had lost acknowledged events it had loaded (a damaged or missing write-ahead log,"
                " or an older database file); restored them from spool/loaded/",
                events=restored, store=str(getattr(self.store, "path", "")),
            )
        if self.spool.unchecked():
            await self._checkpoint()
        return True

    def _checkpoint_wait(self) -> float:
        """Seconds until loaded segments are due a checkpoint (inf with none waiting)."""
        if self._unchecked_since is None:
            return math.inf
        return max(0.0, self._unchecked_since + self.store.checkpoint_interval - time.monotonic())

    async def _checkpoint(self) -> None:
        """Checkpoint the store, then delete the loaded segments it made redundant. A failure is
        logged (once) and the segments are kept: the next attempt comes an interval later."""
        try:
            await self.checkpoint()
        except StorageError as exc:
            if self._checkpoint_error != str(exc):
                _log.error("checkpointing the store failed; loaded spool segments are kept until one succeeds", error=str(exc))
            self._checkpoint_error = str(exc)
        else:
            if self._checkpoint_error is not None:
                _log.info("checkpointing the store succeeds again")
            self._checkpoint_error = None
        self._unchecked_since = time.monotonic() if self.spool.unchecked() else None

    async def checkpoint(self) -> None:
        """Write everything loaded so far into the database file, then delete those segments from
        spool/loaded/; StorageError if the checkpoint fails (the segments are kept)."""
        await anyio.to_thread.run_sync(self._checkpoint_now)

    def _checkpoint_now(self) -> None:
        done = self.spool.unchecked()  # loaded (committed) before the checkpoint starts
        self.store.checkpoint()
        self.spool.checkpointed(done)

    async def _load_line_by_line(self, segment: Path, exc: RejectedData) -> Any:
        """A segment the store refuses would stop ingest for good: load what it can, set aside the rest.

        Events are validated before they are spooled, so this takes a bug or a damaged file; the
        refused lines are kept in the spool's rejected/ folder and each gets a dead letter.
        """
        _log.error("the store refused a spool segment; loading it line by line", segment=segment.name, error=str(exc))
        found = await self._load_retry.run(self.store.load_each_line, segment, give_up=self._stopping)
        if found is GAVE_UP:
            return GAVE_UP
        result, refused = found
        for aside in refused:
            line, events = aside.line, aside.events
            try:
                kept: Any = await anyio.to_thread.run_sync(self.spool.reject, segment, line)
            except OSError as exc:  # its first dead_letter_bytes are still in the dead letter
                _log.error("could not keep a refused spool line", segment=segment.name, error=str(exc))
                kept = "no file (it could not be written)"
            others = f"; the line's other {aside.loaded} events were loaded" if aside.loaded else ""
            _log.error(
                "events of a spool line the store refused were set aside",
                segment=segment.name, events=events, loaded=aside.loaded, kept=str(kept), error=aside.reason,
            )
            letter = DeadLetter(
                received_at=time.time(), peer_uid=None, peer_pid=None, code="refused_by_store",
                reason=f"{aside.reason}; {events} events set aside in {kept}{others}",
                raw=line[: self.limits.dead_letter_bytes], raw_size=len(line),
            )
            # not counted as a dead letter: `refused` counts its events instead
            try:
                await self._load_retry.run(self.store.dead_letter, [letter], give_up=self._stopping)
            except RejectedData as exc:
                _log.error("the store refused the dead letter of a refused spool line", error=str(exc))
            if segment not in self.spool.leftovers:
                self.counters.spooled -= events
            self.counters.refused += events
        return result

    def _is_closing(self) -> bool:
        return self._closing

    def _stopping(self) -> bool:
        # once closing, a failing store is not waited for: the spool keeps the events
        return self._closing or self._writer_done

    def _count_loaded(self, segment: Path, result: Any) -> None:
        c = self.counters
        if result.taken:
            _log.warning("decisions not stored: another decision holds their id", decisions=result.taken,
                         see="SELECT reason FROM dead_letters WHERE code = 'id_taken'")
        if segment in self.spool.leftovers:
            # spooled by a previous run: this run's received/stored balance covers only its own
            c.recovered += result.inserted
            _log.info("loaded a segment a previous run left in the spool", segment=segment.name, events=result.inserted)
            return
        c.spooled -= result.inserted + result.duplicates + result.taken
        c.stored += result.inserted
        c.duplicates += result.duplicates
        c.dead_letters += result.taken
        c.id_taken += result.taken
        for name in ("decisions", "outcomes", "steps", "events"):
            c.by_type[name] = c.by_type.get(name, 0) + getattr(result, name)
