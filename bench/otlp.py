"""Trace ingest beside socket ingest: how fast GenAI spans become durable steps.

    python -m bench.otlp [--episodes 2000] [--batch 512]

A real daemon with ``traces.enabled`` on a temporary state dir. One sender posts OTLP/HTTP
protobuf requests of ``--batch`` spans (as an SDK's BatchSpanProcessor sends them) over one
kept-alive loopback connection, each answered 200 only once its steps are in the spool; then the
same number of steps go over the agents' socket as msgpack ``step`` messages with one closing
flush. Each agent run is an ``invoke_agent`` span with four ``execute_tool``/``chat`` children.
The table gives spans (or steps) per second acknowledged, and until DuckDB has them all.
"""

from __future__ import annotations

import argparse
import http.client
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from bench._daemon import bench_config
from bench._host import machine
from reflexd.testing import LocalDaemon, deep_merge, poll
from reflexd.wire.connection import Connection
from reflexd.wire.protocol import Flush, Step

STEPS_PER_EPISODE = 4
TOOLS = ("search", "calculator", "browser", "code")


def _kv(key: str, value: Any) -> KeyValue:
    if isinstance(value, str):
        return KeyValue(key=key, value=AnyValue(string_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(int_value=int(value)))


def agent_run(rng: random.Random, n: int, t0: int) -> list[Span]:
    """One agent run: its invoke_agent span and four children, children first as exporters send them."""
    trace = rng.randbytes(16)
    root = rng.randbytes(8)
    spans = []
    for k in range(STEPS_PER_EPISODE):
        tool = rng.choice(TOOLS)
        start = t0 + k * 1_000_000
        spans.append(Span(
            trace_id=trace, span_id=rng.randbytes(8), parent_span_id=root, name=f"execute_tool {tool}",
            start_time_unix_nano=start, end_time_unix_nano=start + 800_000,
            attributes=[_kv("gen_ai.operation.name", "execute_tool"), _kv("gen_ai.tool.name", tool),
                        _kv("gen_ai.usage.input_tokens", rng.randint(50, 500))],
        ))
    head = Span(
        trace_id=trace, span_id=root, name="invoke_agent bench", start_time_unix_nano=t0,
        end_time_unix_nano=t0 + STEPS_PER_EPISODE * 1_000_000,
        attributes=[_kv("gen_ai.operation.name", "invoke_agent"), _kv("gen_ai.agent.name", "bench-agent")],
    )
    head.events.add(name="gen_ai.evaluation.result", attributes=[_kv("gen_ai.evaluation.score.value", float(n % 2))])
    return [*spans, head]


def requests_of(episodes: int, batch: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    t0 = time.time_ns()
    spans = [s for n in range(episodes) for s in agent_run(rng, n, t0 + n * 10_000_000)]
    bodies = []
    for i in range(0, len(spans), batch):
        req = ExportTraceServiceRequest()
        rs = req.resource_spans.add()
        rs.resource.attributes.append(_kv("service.name", "bench-svc"))
        rs.scope_spans.add().spans.extend(spans[i : i + batch])
        bodies.append(req.SerializeToString())
    return bodies


def post_all(port: int, bodies: list[bytes]) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.monotonic()
    for body in bodies:
        conn.request("POST", "/v1/traces", body=body, headers={"Content-Type": "application/x-protobuf"})
        reply = conn.getresponse()
        data = reply.read()
        if reply.status != 200:
            raise RuntimeError(f"the receiver answered {reply.status}: {data[:200]!r}")
    elapsed = time.monotonic() - t0
    conn.close()
    return elapsed


def socket_steps(path: str, episodes: int) -> float:
    rng = random.Random(2)
    steps = [
        Step(agent="bench-agent", episode=f"s{n}", index=k, observation={"service": "bench-svc"},
             action=rng.choice(TOOLS), reward=float(n % 2) if k == STEPS_PER_EPISODE - 1 else 0.0,
             done=k == STEPS_PER_EPISODE - 1, id=f"s{n}:{k}")
        for n in range(episodes) for k in range(STEPS_PER_EPISODE)
    ]
    with Connection(path, timeout=600) as conn:
        t0 = time.monotonic()
        for i in range(0, len(steps), 1000):
            conn.send(steps[i : i + 1000])
        conn.send([Flush(req=1)])
        conn.receive()
        return time.monotonic() - t0


def _measure(root: Path, sock: Path, bodies: list[bytes], episodes: int, batch: int) -> tuple[list[tuple], int]:
    """Both paths' rows for the table, and the episodes the daemon assembled from the traces."""
    spans = episodes * (STEPS_PER_EPISODE + 1)
    steps = episodes * STEPS_PER_EPISODE
    config = deep_merge(bench_config(root / "state", sock, 1000), {
        "traces": {"enabled": True, "path": str(sock.parent / "t.sock"), "port": 0},
    })
    rows = []
    with LocalDaemon(root, config) as d:
        port = d.status().traces["ports"][0]
        t0 = time.monotonic()
        acked = post_all(port, bodies)
        poll(lambda: d.status().experience.get("steps", 0) >= steps, 600, "the traced steps in DuckDB")
        loaded = time.monotonic() - t0
        rows.append(("OTLP/HTTP protobuf", f"{len(bodies)} requests of {batch} spans", spans, acked, loaded))
        t0 = time.monotonic()
        acked = socket_steps(d.socket, episodes)
        poll(lambda: d.status().experience.get("steps", 0) >= 2 * steps, 600, "the socket's steps in DuckDB")
        loaded = time.monotonic() - t0
        rows.append(("socket msgpack `step`", "batches of 1000, one flush", steps, acked, loaded))
        return rows, d.status().traces["episodes"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.otlp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--episodes", type=int, default=2000, help="agent runs (each 5 spans, 4 of them steps)")
    ap.add_argument("--batch", type=int, default=512, help="spans per OTLP request (default 512, the SDK's batch size)")
    args = ap.parse_args(argv)
    bodies = requests_of(args.episodes, args.batch)
    with tempfile.TemporaryDirectory(prefix="reflexd-bench-otlp-") as state, \
            tempfile.TemporaryDirectory(prefix="rx-") as sockets:  # a short path: a socket's is capped at 108 bytes
        rows, episodes = _measure(Path(state), Path(sockets) / "r.sock", bodies, args.episodes, args.batch)
    host = machine(("msgspec", "anyio", "duckdb", "opentelemetry-proto", "protobuf"))
    print(f"machine: {host['cpu']}, {host['usable_cpus']} cpus, python {host['python']}, {host['date']}", file=sys.stderr)
    print(f"\n{'path':<24}{'sent as':<34}{'items':>8}{'acked/s':>12}{'in DuckDB/s':>14}")
    for path, how, n, acked, loaded in rows:
        print(f"{path:<24}{how:<34}{n:>8}{n / acked:>12,.0f}{n / loaded:>14,.0f}")
    print(f"\nepisodes assembled from the traces: {episodes} of {args.episodes}")
    return 0 if episodes == args.episodes else 1


if __name__ == "__main__":
    sys.exit(main())
