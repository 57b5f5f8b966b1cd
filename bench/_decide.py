"""Deciding: in-process through ``reflexd.Policy``, and over the socket with ``Decide`` requests."""

from __future__ import annotations

import gc
import os
import selectors
import socket as sock
import struct
import threading
import time
from typing import Any, Callable

import msgspec
import numpy as np

from bench._baselines import VW_ARGS, VW_TRAIN, NumpyGraph, VowpalWabbit, vw_lines
from bench._procs import Gate, run_together
from bench._workload import AGENT, DecideWorkload
from reflexd.client.policy import Policy
from reflexd.wire.connection import Connection
from reflexd.wire.framing import MSGPACK, encode_frame
from reflexd.wire.protocol import Decide, Decided

MODEL_WAIT = 30.0
BLOCK = 500  # calls of one kind in a row before the next kind's turn
VW_POOL = 1000  # decisions parsed for VW ahead of time, predicted in turn
_LEN = struct.Struct(">I")
_decided = msgspec.msgpack.Decoder(Decided).decode


def percentiles(ns: np.ndarray) -> dict[str, float]:
    us = ns / 1000.0
    return {
        "p50_us": float(np.percentile(us, 50)),
        "p99_us": float(np.percentile(us, 99)),
        "p999_us": float(np.percentile(us, 99.9)),
        "mean_us": float(us.mean()),
        "n": int(len(us)),
    }


def _timed(n: int, call: Callable[[int], Any]) -> np.ndarray:
    """Per-call wall time in ns; perf_counter_ns itself costs well under 0.1 µs."""
    out = np.empty(n, dtype=np.int64)
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        call(i)
        out[i] = clock() - t0
    return out


class _RunQueue:
    """This thread's time spent runnable but not running (another task had its CPU), from the
    scheduler's own accounting: how much of a slow call was the machine rather than the call."""

    def __init__(self) -> None:
        self.fd = os.open(f"/proc/self/task/{threading.get_native_id()}/schedstat", os.O_RDONLY)

    def waited_ns(self) -> int:
        return int(os.pread(self.fd, 128, 0).split()[1])

    def close(self) -> None:
        os.close(self.fd)


def _interleaved(
    calls: dict[str, Callable[[int], Any]], n: int, block: int = BLOCK
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-call wall time and run-queue wait (ns) of each of ``calls`` on indices 0..n-1, taken
    in turns of ``block`` calls, so whatever else the machine does falls on all of them alike."""
    out = {name: (np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)) for name in calls}
    clock = time.perf_counter_ns
    rq = _RunQueue()
    waited = rq.waited_ns
    try:
        for start in range(0, n, block):
            for name, call in calls.items():
                times, waits = out[name]
                for i in range(start, min(n, start + block)):
                    w0 = waited()
                    t0 = clock()
                    call(i)
                    times[i] = clock() - t0
                    waits[i] = waited() - w0
    finally:
        rq.close()
    return out


def _summary_of(ns: np.ndarray, waits: np.ndarray) -> dict[str, float]:
    """Percentiles, and how much of the slowest 1% was spent waiting for a CPU."""
    slow = ns >= np.percentile(ns, 99)
    share = min(1.0, float(waits[slow].sum() / ns[slow].sum()))
    return {**percentiles(ns), "slowest_1pct_us": float(ns[slow].mean() / 1000), "slowest_1pct_runqueue": share}


class _GcWatch:
    """Counts the cyclic collector's passes while timing, and the longest one."""

    def __init__(self) -> None:
        self.passes = 0
        self.longest_ns = 0
        self._t0 = 0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter_ns()
        else:
            self.passes += 1
            self.longest_ns = max(self.longest_ns, time.perf_counter_ns() - self._t0)


def in_process(socket: str, state_dir: str, n: int, warmup: int = 1000, seed: int = 11) -> dict[str, Any]:
    """``policy.decide`` on the issue's decision (20-key context, 10 actions × 3 features) with the
    live model, its sender shipping every decision to the daemon; beside it, in turns: its parts
    (feature hashing, bare onnxruntime), the same graph in numpy, and Vowpal Wabbit's predict."""
    w = DecideWorkload(seed)
    contexts = [w.context() for _ in range(n)]
    actions = w.actions
    vw = VowpalWabbit([w.context() for _ in range(VW_TRAIN)], actions, seed)
    policy = Policy(AGENT, socket=socket, state_dir=state_dir, seed=seed)
    watch = _GcWatch()
    try:
        deadline = time.monotonic() + MODEL_WAIT
        while policy.model_version is None:  # the sender thread loads the model on its first refresh
            if time.monotonic() > deadline:
                raise RuntimeError(f"Policy did not load a model: {policy.stats()}")
            time.sleep(0.01)
        scorer = policy.models.scorer
        _, model = policy.models.registry.load(scorer.version)
        others = _references(scorer, model, vw, contexts, actions)
        calls = {"decide": lambda i: policy.decide(contexts[i], actions), **others}
        for call in calls.values():
            for i in range(warmup):
                call(i % n)
        # The bench's own setup (contexts, VW's parsed examples) is out of the collector's way, as
        # an agent's long-lived state would be after gc.freeze(); what decide allocates is not.
        gc.collect()
        gc.freeze()
        gc.callbacks.append(watch)
        try:
            lat = _interleaved(calls, n)
        finally:
            gc.callbacks.remove(watch)
            gc.unfreeze()
        flushed = policy.flush(60)
        stats = policy.stats()
    finally:
        policy.close()
        vw.close()
    if not flushed or stats["dropped"] or stats["rejected"]:
        raise RuntimeError(f"in-process decisions were not all stored: {stats}")
    decide = _summary_of(*lat.pop("decide"))
    refs = {name: _summary_of(*got) for name, got in lat.items()}
    return {
        **decide,
        "model_version": policy.model_version,
        "strategy": scorer.manifest.exploration.strategy,
        "context_keys": len(contexts[0]),
        "actions": len(actions),
        "action_features": len(actions[0]["features"]),
        "block": BLOCK,
        "gc_passes": watch.passes,
        "gc_longest_us": watch.longest_ns / 1000,
        "refs": refs,
        "vw_args": VW_ARGS,
        "vw_faster_x": {  # how many times faster decide is than VW's predict, at each percentile
            name: {q: refs[name][q] / decide[q] for q in ("p50_us", "p99_us", "p999_us")}
            for name in ("vw_predict", "vw_parse_predict")
        },
    }


def _references(
    scorer: Any, model: bytes, vw: VowpalWabbit, contexts: list[dict[str, Any]], actions: list[Any]
) -> dict[str, Callable[[int], Any]]:
    """The parts of a decision alone, and other ways to make the same decision."""
    hasher = scorer.hasher
    spec = scorer.manifest.features
    hashed = [hasher.context(c)[None] for c in contexts]
    hashed_actions = hasher.actions(actions)[None]
    # onnxruntime as decide calls it: inputs and outputs bound once, the context copied in
    session = scorer.session
    ctx_in = np.zeros((1, spec.context_dim), dtype=np.float32)
    acts_in = hashed_actions.copy()
    binding = session.io_binding()
    binding.bind_cpu_input("context", ctx_in)
    binding.bind_cpu_input("actions", acts_in)
    for name in ("scores", "spread"):
        binding.bind_output(name, "cpu")
    ctx_buf = np.zeros(spec.context_dim, dtype=np.float32)
    graph = NumpyGraph(model)
    want = session.run(None, {"context": hashed[0], "actions": hashed_actions})
    got = graph.run(hashed[0], hashed_actions)
    if not all(np.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(want, got)):
        raise RuntimeError("the numpy reference does not compute what onnxruntime does")
    parsed = [vw.parse(vw_lines(c, actions)) for c in contexts[:VW_POOL]]
    lines = [vw_lines(c, actions) for c in contexts]
    return {
        "hash": lambda i: (hasher.context(contexts[i], out=ctx_buf), hasher.actions(actions)),
        "onnx": lambda i: (np.copyto(ctx_in, hashed[i]), session.run_with_iobinding(binding)),
        "numpy": lambda i: graph.run(hashed[i], hashed_actions),
        "vw_predict": lambda i: vw.predict(parsed[i % VW_POOL]),
        "vw_parse_predict": lambda i: vw.predict(lines[i]),
    }


def _lat(d: dict[str, Any]) -> str:
    return f"p50 {d['p50_us']:.1f} / p99 {d['p99_us']:.1f} / p99.9 {d['p999_us']:.1f} µs"


def inproc_rows(d: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The table's in-process rows: decide, then what it is made of and what it competes with."""
    refs, x = d["refs"], d["vw_faster_x"]
    shape = f"{d['context_keys']}-key context, {d['actions']} actions × {d['action_features']} features"

    def times(q: str) -> str:
        return f"{x['vw_predict'][q]:.2f}×"

    return [
        ("decide in-process", f"{d['p50_us']:.1f} µs p50",
         f"{_lat(d)}; Policy.decide ({shape}): hash, model {d['model_version']}, {d['strategy']}, event logged; "
         f"{d['n']:,} calls in turns of {d['block']} with the refs below; {d['gc_passes']} GC passes"),
        ("  its slowest 1%", f"{d['slowest_1pct_us']:.0f} µs mean",
         f"{d['slowest_1pct_runqueue']:.0%} of it waiting for a CPU (the daemon storing these decisions and "
         f"other load share the {os.cpu_count()} cores); VW predict's slowest 1%: "
         f"{refs['vw_predict']['slowest_1pct_us']:.0f} µs, {refs['vw_predict']['slowest_1pct_runqueue']:.0%} waiting"),
        ("  ref: feature hashing", f"{refs['hash']['p50_us']:.1f} µs p50",
         f"{_lat(refs['hash'])}; the context, and the action set (cached)"),
        ("  ref: bare onnxruntime", f"{refs['onnx']['p50_us']:.1f} µs p50",
         f"{_lat(refs['onnx'])}; run_with_iobinding on pre-hashed inputs, as decide runs it"),
        ("  ref: the model in numpy", f"{refs['numpy']['p50_us']:.1f} µs p50",
         f"{_lat(refs['numpy'])}; the same ONNX graph, node by node"),
        ("  ref: VW predict", f"{refs['vw_predict']['p50_us']:.1f} µs p50",
         f"{_lat(refs['vw_predict'])}; vowpalwabbit Workspace('{d['vw_args']}').predict on pre-parsed "
         "examples (1 shared + 10 action lines): no hashing of fresh input, nothing logged"),
        ("  ref: VW parse + predict", f"{refs['vw_parse_predict']['p50_us']:.1f} µs p50",
         f"{_lat(refs['vw_parse_predict'])}; the same decision from its text lines: parse, predict, finish"),
        ("decide vs VW predict", f"{times('p50_us')} p50",
         f"VW's time ÷ decide's (above 1: decide is faster): p99 {times('p99_us')}, p99.9 {times('p999_us')}; "
         f"over VW parse + predict: p50 {x['vw_parse_predict']['p50_us']:.2f}×, p99 {x['vw_parse_predict']['p99_us']:.2f}×"),
    ]


def _decide_client(socket: str, n: int, seed: int, gate: Gate, results: Any) -> None:
    """One agent asking the daemon to decide, one request at a time."""
    w = DecideWorkload(seed)
    requests = [Decide(agent=AGENT, context=w.context(), actions=w.actions, req=i) for i in range(n)]
    with Connection(socket, timeout=60) as conn:
        conn.request(requests[0])  # connection warm
        gate.ready()
        t0 = time.monotonic()
        lat = _timed(n, lambda i: conn.request(requests[i]))
        t1 = time.monotonic()
        last = conn.request(requests[0])
    assert isinstance(last, Decided)
    results.put({"t0": t0, "t1": t1, "n": n, "lat": lat, "model_version": last.model_version})


def over_socket(socket: str, clients: int, per_client: int, seed: int = 21) -> dict[str, Any]:
    """``clients`` processes each sending ``per_client`` sequential Decide requests."""
    got = run_together(_decide_client, [(socket, per_client, seed + k) for k in range(clients)])
    return _summary(got, clients=clients)


def _summary(got: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    seconds = max(r["t1"] for r in got) - min(r["t0"] for r in got)
    total = sum(r["n"] for r in got)
    return {
        **extra,
        "requests": total,
        "seconds": seconds,
        "per_s": total / seconds,
        "model_version": got[0]["model_version"],
        **percentiles(np.concatenate([r["lat"] for r in got])),
    }


class _Pipe:
    """One client connection keeping ``window`` Decide requests in flight.

    A request's latency runs from the write that carried it to the read that brought its reply,
    as the agent that sent it would see it.
    """

    def __init__(self, path: str, frames: list[bytes], window: int) -> None:
        self.sock = sock.socket(sock.AF_UNIX, sock.SOCK_STREAM)
        self.sock.settimeout(MODEL_WAIT)
        self.sock.connect(path)
        self.frames = frames
        self.window = window
        self.sent = 0
        self.got = 0
        self.sent_at = np.zeros(len(frames), dtype=np.int64)
        self.lat = np.zeros(len(frames), dtype=np.int64)
        self.buf = b""
        self.version: str | None = None

    @property
    def done(self) -> bool:
        return self.got == len(self.frames)

    def send(self, n: int) -> None:
        end = min(self.sent + n, len(self.frames))
        if end > self.sent:
            self.sent_at[self.sent : end] = time.perf_counter_ns()
            self.sock.sendall(b"".join(self.frames[self.sent : end]))
            self.sent = end

    def warm(self, frame: bytes) -> None:
        """One request and its reply before the clock starts."""
        self.sock.sendall(frame)
        buf = b""
        while len(buf) < 4 or len(buf) < 4 + _LEN.unpack_from(buf)[0]:
            data = self.sock.recv(1 << 16)
            if not data:
                raise RuntimeError("the daemon closed a decide connection")
            buf += data
        self.version = _decided(buf[4:]).model_version

    def receive(self) -> None:
        """Take the replies that arrived; send as many new requests as were answered."""
        data = self.sock.recv(1 << 16)
        now = time.perf_counter_ns()
        if not data:
            raise RuntimeError("the daemon closed a decide connection")
        buf = self.buf + data if self.buf else data
        pos, got = 0, self.got
        while len(buf) - pos >= 4:
            size = _LEN.unpack_from(buf, pos)[0]
            if len(buf) - pos - 4 < size:
                break
            # an Error reply fails this decode: every request must be answered with a decision
            reply = _decided(buf[pos + 4 : pos + 4 + size])
            if reply.req != got:
                raise RuntimeError(f"reply to request {reply.req} came where {got} was due")
            self.lat[got] = now - self.sent_at[got]
            got += 1
            pos += 4 + size
        self.buf = buf[pos:]
        self.send(got - self.got)
        self.got = got


def _pipelined_client(path: str, conns: int, window: int, per_conn: int, seed: int, gate: Gate, results: Any) -> None:
    """``conns`` agents in one process (multiplexed with epoll), each keeping ``window`` requests in flight."""
    pipes = []
    for k in range(conns):
        w = DecideWorkload(seed + k)
        frames = [
            encode_frame(Decide(agent=AGENT, context=w.context(), actions=w.actions, req=i), MSGPACK)
            for i in range(per_conn)
        ]
        pipe = _Pipe(path, frames, window)
        pipe.warm(encode_frame(Decide(agent=AGENT, context=w.context(), actions=w.actions, req=-1), MSGPACK))
        pipes.append(pipe)
    sel = selectors.EpollSelector()
    for pipe in pipes:
        sel.register(pipe.sock, selectors.EVENT_READ, pipe)
    gc.freeze()  # the prepared requests are no work for the collector while timing
    gate.ready()
    cpu0, t0 = time.process_time(), time.monotonic()
    for pipe in pipes:
        pipe.send(window)
    left = conns
    while left:
        ready = sel.select(MODEL_WAIT)
        if not ready:
            raise RuntimeError(f"no decide reply for {MODEL_WAIT:g} s")
        for key, _ in ready:
            pipe = key.data
            pipe.receive()
            if pipe.done:
                sel.unregister(pipe.sock)
                left -= 1
    t1, cpu1 = time.monotonic(), time.process_time()
    for pipe in pipes:
        pipe.sock.close()
    results.put({
        "t0": t0, "t1": t1, "n": conns * per_conn, "cpu": cpu1 - cpu0,
        "lat": np.concatenate([p.lat for p in pipes]), "model_version": pipes[0].version,
    })


def pipelined(
    socket: str, clients: int, window: int, per_client: int, daemon_pid: int, seed: int = 31
) -> dict[str, Any]:
    """``clients`` connections from one load process, each keeping ``window`` decides in flight;
    with the CPU time the daemon (all its threads) and the load process spent per decision."""
    before = _cpu_seconds(daemon_pid)
    got = run_together(_pipelined_client, [(socket, clients, window, per_client, seed)])
    daemon_cpu = _cpu_seconds(daemon_pid) - before
    out = _summary(got, clients=clients, window=window)
    out["daemon_cpu_us"] = daemon_cpu / out["requests"] * 1e6
    out["client_cpu_us"] = got[0]["cpu"] / out["requests"] * 1e6
    return out


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its threads (fields 14 and 15 of /proc/pid/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# (clients, requests each keeps in flight): one agent pipelining; as many requests in flight from
# 32 agents asking one at a time; those agents pipelining
PIPELINED = ((1, 32), (32, 1), (32, 8))


def socket_runs(
    socket: str, daemon_pid: int, sequential: int, pipelined_total: int, log: Callable[[str], Any]
) -> dict[str, Any]:
    """Socket decide: one agent asking one decision at a time (latency), then each of PIPELINED."""
    log(f"socket decide: 1 client × {sequential:,}, one request at a time")
    out: dict[str, Any] = {"sequential": over_socket(socket, 1, sequential)}
    runs = out["pipelined"] = []
    for clients, window in PIPELINED:
        log(f"socket decide: {clients} client(s) × {pipelined_total // clients:,}, {window} in flight each")
        runs.append(pipelined(socket, clients, window, pipelined_total // clients, daemon_pid))
        log(f"  {runs[-1]['per_s']:,.0f} decisions/s, p99 {runs[-1]['p99_us']:,.0f} µs")
    return out


def socket_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The table's socket rows: the sequential client's latency, then the pipelining clients."""
    s = r["sequential"]
    out = [
        ("decide over socket, 1 client", f"{s['per_s']:,.0f} req/s",
         f"{_lat(s)}; sequential request/response, {s['requests']:,} requests (same decision as in-process)"),
    ]
    for p in r["pipelined"]:
        who = "1 client" if p["clients"] == 1 else f"{p['clients']} clients"
        out.append((
            f"decide over socket, {who}, window {p['window']}", f"{p['per_s']:,.0f} req/s",
            f"{_lat(p)} per request (sent → reply read), {p['clients'] * p['window']} in flight, "
            f"{p['requests']:,} requests; daemon CPU {p['daemon_cpu_us']:.0f} µs/decision (all threads, logging "
            f"included), load generator {p['client_cpu_us']:.0f} µs (one process, epoll); "
            "target ≥ 50,000/s, p99 ≤ 1 ms",
        ))
    return out
