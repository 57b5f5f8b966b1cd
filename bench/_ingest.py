"""Durable ingest: sender processes stream pre-encoded Decision frames and wait for the Ack.

Each sender (a process: see _procs) encodes its frames and connects before the start signal, so
the clock covers only the sending and the daemon's work: from the first write to the Ack of the
closing Flush, which the daemon sends only once everything before it is fsynced to its spool.
The bench then times until DuckDB has loaded it all, the rate ingest can sustain.
"""

from __future__ import annotations

import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from bench._procs import Gate, run_together
from bench._workload import chunks, decision_frames
from reflexd.service.spool import Spool
from reflexd.service.store import Store
from reflexd.wire.framing import JSON, MSGPACK, FrameReader, decode_inbound, decode_reply, encode_frame
from reflexd.wire.protocol import Ack, Flush, Inbound

ACK_TIMEOUT = 600.0


def _await_ack_json(sock: socket.socket) -> tuple[int, int]:
    """Read NDJSON replies up to the flush's ack: (acknowledged count, error replies)."""
    buf, errors = b"", 0
    while True:
        data = sock.recv(1 << 16)
        if not data:
            raise RuntimeError("the daemon closed the connection before the ack")
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            reply = msgspec.json.decode(line)
            if reply.get("type") == "ack" and reply.get("req") == 1:
                return reply["count"], errors
            errors += 1  # an Error reply: a frame was dead-lettered


def _sender(socket_path: str, prefix: str, n: int, seed: int, framing: str, gate: Gate, results: Any) -> None:
    writes = chunks(decision_frames(prefix, n, seed, framing))
    size = sum(map(len, writes))
    flush = encode_frame(Flush(req=1), framing)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(ACK_TIMEOUT)
        sock.connect(socket_path)
        gate.ready()
        t0 = time.monotonic()
        for data in writes:
            sock.sendall(data)
        sock.sendall(flush)
        if framing == JSON:
            acked, errors = _await_ack_json(sock)
        else:
            reader, errors, acked = FrameReader(MSGPACK, 1 << 20), 0, -1
            while acked < 0:
                for frame in reader.feed(sock.recv(1 << 16) or b""):
                    reply = decode_reply(frame, MSGPACK)
                    if isinstance(reply, Ack) and reply.req == 1:
                        acked = reply.count
                    else:
                        errors += 1
        t1 = time.monotonic()
    results.put({"t0": t0, "t1": t1, "sent": n, "acked": acked, "errors": errors, "bytes": size})


def run_senders(
    socket: str, senders: int, total: int, prefix: str, framing: str = MSGPACK, seed: int = 1, status: Any = None
) -> dict[str, Any]:
    """``total`` events split over ``senders`` processes; rate over the first send → last Ack.

    With ``status`` (a callable returning the daemon's status), also the time until the last
    event is loaded into DuckDB: the sustained rate, as opposed to the acknowledged one.
    """
    per = total // senders
    got = run_together(_sender, [(socket, f"{prefix}{k}", per, seed + k, framing) for k in range(senders)])
    loaded_at = None
    if status is not None:
        while status().backlog:
            time.sleep(0.005)
        loaded_at = time.monotonic()
    start = min(r["t0"] for r in got)
    seconds = max(r["t1"] for r in got) - start
    sent = sum(r["sent"] for r in got)
    acked = sum(r["acked"] for r in got)
    errors = sum(r["errors"] for r in got)
    if acked != sent or errors:
        raise RuntimeError(f"ingest lost events: sent {sent}, acknowledged {acked}, {errors} errors")
    nbytes = sum(r["bytes"] for r in got)
    return {
        "senders": senders,
        "framing": framing,
        "events": sent,
        "seconds": seconds,
        "events_per_s": sent / seconds,
        "loaded_per_s": sent / (loaded_at - start) if loaded_at else None,
        "mb_per_s": nbytes / seconds / 1e6,
        "frame_bytes": nbytes / sent,
    }


def decode_ceilings(n: int, prefix: str, framing: str = MSGPACK, seed: int = 1) -> dict[str, float]:
    """In-process rates on the bytes a sender sent (same prefix and seed), no socket: a ceiling."""
    frames = decision_frames(prefix, n, seed, framing)
    if framing == JSON:
        payloads = [f[:-1] for f in frames]  # without the newline
        decoder: Any = msgspec.json.Decoder(Inbound)
    else:
        payloads = [f[4:] for f in frames]  # without the length prefix
        decoder = msgspec.msgpack.Decoder(Inbound)  # the daemon's type: the tagged union of inbound messages
    t0 = time.perf_counter()
    for p in payloads:
        decoder.decode(p)
    pure = n / (time.perf_counter() - t0)

    # the daemon's own parser: framing over 64 KiB reads, then decode_inbound
    reader = FrameReader(framing, 1 << 20)
    writes = chunks(frames)
    t0 = time.perf_counter()
    for data in writes:
        for frame in reader.feed(data):
            decode_inbound(frame, framing)
    parsed = n / (time.perf_counter() - t0)
    return {"pure_decode_per_s": pure, "frame_and_decode_per_s": parsed}


def store_ceiling(n: int, batch: int, seed: int = 98) -> dict[str, float]:
    """The two halves of durable ingest alone, in the daemon's batch size, on fresh files.

    Spool append (JSON-encode a batch, write, fdatasync) bounds how fast events can be
    acknowledged; Store.load (DuckDB's JSON reader into the keyed tables) bounds sustained ingest.
    """
    decoder = msgspec.msgpack.Decoder(Inbound)
    events = [decoder.decode(f[4:]) for f in decision_frames("store", n, seed)]
    with tempfile.TemporaryDirectory(prefix="reflexd-bench-store-") as tmp:
        spool = Spool(Path(tmp) / "spool", segment_bytes=16 << 20)
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            spool.append(events[i : i + batch], time.time())
        spool_seconds = time.perf_counter() - t0
        with Store(Path(tmp) / "ceiling.duckdb") as store:
            t0 = time.perf_counter()
            for segment in spool.take():
                store.load(segment)
            load_seconds = time.perf_counter() - t0
    return {"spool_append_per_s": n / spool_seconds, "store_load_per_s": n / load_seconds}
