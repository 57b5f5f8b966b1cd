"""Durable ingest: sender processes stream pre-encoded Decision frames and wait for the Ack.

Each sender (a process: see _procs) encodes its frames and connects before the start signal, so
the clock covers only the sending and the daemon's work: from the first write to the Ack of the
closing Flush, which the daemon sends only once everything before it is committed to DuckDB.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from reflexd.connection import Connection
from reflexd.protocol import MSGPACK, Ack, Flush, FrameReader, Inbound, decode_inbound
from reflexd.store import Store

from _procs import Gate, run_together
from _workload import chunks, decision_frames

ACK_TIMEOUT = 600.0


def _sender(socket: str, prefix: str, n: int, seed: int, gate: Gate, results: Any) -> None:
    writes = chunks(decision_frames(prefix, n, seed))
    size = sum(map(len, writes))
    with Connection(socket, timeout=ACK_TIMEOUT) as conn:
        gate.ready()
        t0 = time.monotonic()
        for data in writes:
            conn.send_raw(data)
        conn.send([Flush(req=1)])
        errors = 0
        while True:
            reply = conn.receive()
            if isinstance(reply, Ack) and reply.req == 1:
                break
            errors += 1  # an Error reply: a frame was dead-lettered
        t1 = time.monotonic()
    results.put({"t0": t0, "t1": t1, "sent": n, "acked": reply.count, "errors": errors, "bytes": size})


def run_senders(socket: str, senders: int, total: int, prefix: str, seed: int = 1) -> dict[str, Any]:
    """``total`` events split over ``senders`` processes; rate over the first send → last Ack."""
    per = total // senders
    got = run_together(_sender, [(socket, f"{prefix}{k}", per, seed + k) for k in range(senders)])
    seconds = max(r["t1"] for r in got) - min(r["t0"] for r in got)
    sent = sum(r["sent"] for r in got)
    acked = sum(r["acked"] for r in got)
    errors = sum(r["errors"] for r in got)
    if acked != sent or errors:
        raise RuntimeError(f"ingest lost events: sent {sent}, acknowledged {acked}, {errors} errors")
    nbytes = sum(r["bytes"] for r in got)
    return {
        "senders": senders,
        "events": sent,
        "seconds": seconds,
        "events_per_s": sent / seconds,
        "mb_per_s": nbytes / seconds / 1e6,
        "frame_bytes": nbytes / sent,
    }


def decode_ceilings(n: int, prefix: str, seed: int = 1) -> dict[str, float]:
    """In-process rates on the bytes a sender sent (same prefix and seed), no socket: a ceiling."""
    frames = decision_frames(prefix, n, seed)
    payloads = [f[4:] for f in frames]
    decoder = msgspec.msgpack.Decoder(Inbound)  # the daemon's type: the tagged union of inbound messages
    t0 = time.perf_counter()
    for p in payloads:
        decoder.decode(p)
    pure = n / (time.perf_counter() - t0)

    # the daemon's own parser: length-prefix framing over 64 KiB reads, then decode_inbound
    reader = FrameReader(MSGPACK, 1 << 20)
    writes = chunks(frames)
    t0 = time.perf_counter()
    for data in writes:
        for frame in reader.feed(data):
            decode_inbound(frame, MSGPACK)
    parsed = n / (time.perf_counter() - t0)
    return {"pure_decode_per_s": pure, "frame_and_decode_per_s": parsed}


def store_ceiling(n: int, batch: int, seed: int = 98) -> dict[str, float]:
    """Store.write alone on a fresh DuckDB file, in the daemon's batch size: the storage ceiling."""
    decoder = msgspec.msgpack.Decoder(Inbound)
    events = [decoder.decode(f[4:]) for f in decision_frames("store", n, seed)]
    with tempfile.TemporaryDirectory(prefix="reflexd-bench-store-") as tmp:
        with Store(Path(tmp) / "ceiling.duckdb") as store:
            t0 = time.perf_counter()
            for i in range(0, n, batch):
                store.write(events[i : i + batch], time.time())
            seconds = time.perf_counter() - t0
    return {"store_write_per_s": n / seconds}
