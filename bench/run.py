"""reflexd benchmark: one command, one table, every figure measured in this run on real parts.

    python bench/run.py            (or: make bench)

A real daemon subprocess on a temporary state dir, its real Unix socket and DuckDB file, a model
trained by its real trainer subprocess and loaded by the real client. Progress goes to stderr;
the table to stdout; everything measured also to bench/out/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench's own helpers (bench/_*.py)

import _decide  # noqa: E402
import _ingest  # noqa: E402
import _train  # noqa: E402
from _daemon import BenchDaemon  # noqa: E402
from _host import machine  # noqa: E402
from reflexd.config import IngestConfig  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "out"
SETTLE_SECONDS = 1.0
LIBRARIES = ("msgspec", "anyio", "duckdb", "pyarrow", "numpy", "onnxruntime", "torch")


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- the run -----------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict[str, Any]:
    r: dict[str, Any] = {}
    daemon = BenchDaemon(train_rows=args.train_rows)
    try:
        progress("starting the daemon")
        t0 = time.perf_counter()
        daemon.start()
        r["daemon"] = {"pid": daemon.pid, "start_seconds": time.perf_counter() - t0}
        time.sleep(SETTLE_SECONDS)
        r["daemon"]["idle_rss"] = daemon.rss()
        progress(f"daemon pid {daemon.pid}, idle RSS {daemon.rss() / 2**20:.0f} MiB")

        for senders in (1, 4):
            progress(f"durable ingest: {args.events} decisions from {senders} sender process(es)")
            res = _ingest.run_senders(daemon.socket, senders, args.events, prefix=f"ing{senders}-")
            r[f"ingest_{senders}"] = res
            progress(f"  {res['events_per_s']:,.0f} events/s ({res['seconds']:.2f} s)")
        # the peak is read after each step too, to tell which step set it
        r["daemon"]["peak_after"] = {"ingest": daemon.peak_rss()}

        progress(f"in-process ceilings: decode {args.events}, Store.write {args.store_events}")
        r["ceilings"] = _ingest.decode_ceilings(args.events, prefix="ing1-0")  # the 1-sender run's frames
        r["ceilings"].update(_ingest.store_ceiling(args.store_events, IngestConfig().batch_size))

        progress(f"training: {args.train_rows} decisions with outcomes, then Train")
        r["experience"] = _train.send_experience(daemon, args.train_rows)
        _train.wait_matured(daemon)
        r["train"] = _train.train(daemon)
        t = r["train"]
        progress(f"  {t['outcome']} {t['version']} in {t['seconds']:.1f} s ({t['train_rows']} rows); {t['gate']}")
        r["daemon"]["peak_after"]["training"] = daemon.peak_rss()

        progress(f"in-process decide: {args.decides} × policy.decide")
        r["decide_inproc"] = _decide.in_process(daemon.socket, str(daemon.state_dir), args.decides)

        progress(f"socket decide: 1 client × {args.socket_decides}")
        r["decide_socket_1"] = _decide.over_socket(daemon.socket, 1, args.socket_decides)
        per_client = max(1, args.socket_decides // 4)
        progress(f"socket decide: 8 clients × {per_client}")
        r["decide_socket_8"] = _decide.over_socket(daemon.socket, 8, per_client)

        status = daemon.status()
        r["final_status"] = {"ingest": status.ingest, "experience": status.experience, "backlog": status.backlog}
        r["daemon"]["rss_end"] = daemon.rss()
        r["daemon"]["peak_rss"] = daemon.peak_rss()
        r["daemon"]["peak_after"]["decide"] = r["daemon"]["peak_rss"]
    except KeyboardInterrupt:
        progress("interrupted")
        raise
    except Exception:
        progress(f"failed; daemon log tail:\n{daemon.log_tail()}")
        raise
    finally:
        progress("stopping the daemon")
        daemon.stop()
    return r


# ---- the table ---------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _lat(d: dict[str, Any]) -> str:
    return f"p50 {d['p50_us']:.1f} / p99 {d['p99_us']:.1f} / p99.9 {d['p999_us']:.1f} µs"


def _peak_step(peak_after: dict[str, int]) -> str:
    """The first step after which VmHWM had its final value."""
    final = max(peak_after.values())
    return next(step for step, value in peak_after.items() if value == final)


def rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    i1, i4, c = r["ingest_1"], r["ingest_4"], r["ceilings"]
    t, d = r["train"], r["decide_inproc"]
    s1, s8 = r["decide_socket_1"], r["decide_socket_8"]
    return [
        ("ingest, 1 sender (durable)", f"{i1['events_per_s']:,.0f} events/s",
         f"{i1['events']:,} × {i1['frame_bytes']:.0f} B msgpack in 64 KiB writes, first send → Ack: "
         f"{i1['seconds']:.2f} s, {i1['mb_per_s']:.0f} MB/s"),
        ("ingest, 4 sender processes", f"{i4['events_per_s']:,.0f} events/s",
         f"{i4['events']:,} events, {i4['seconds']:.2f} s"),
        ("  ref: msgspec decode alone", f"{c['pure_decode_per_s']:,.0f} events/s",
         "same frames, in-process, results discarded (ceiling)"),
        ("  ref: FrameReader + decode", f"{c['frame_and_decode_per_s']:,.0f} events/s",
         "the daemon's parser on 64 KiB chunks, no socket"),
        ("  ref: Store.write alone", f"{c['store_write_per_s']:,.0f} events/s",
         f"DuckDB file, {IngestConfig().batch_size:,}-event batches (the daemon's), in-process"),
        ("adaptation (Train → live)", f"{t['seconds']:.1f} s",
         f"{t['train_rows']:,} rows trained (+{t['holdout_rows']:,} holdout); gate said {t['outcome']}, "
         f"made live by {t['promoted_by']}"),
        ("  trainer subprocess", f"{t['trainer_seconds']:.1f} s",
         f"fit {t['fit_seconds']:.1f} s ({t['epochs']} epochs), ONNX export {t['export_seconds']:.1f} s, rest torch "
         "import, load, parity; runs at SCHED_IDLE, so any other load slows it"),
        ("  daemon side", f"{t['seconds'] - t['trainer_seconds']:.1f} s",
         "snapshot to Parquet, gate (off-policy evaluation on the holdout), registry, promotion"),
        ("  trainer peak RSS", _mib(t["trainer_peak_rss"]), "the trainer subprocess (torch); gone after the run"),
        ("decide in-process", f"{d['p50_us']:.1f} µs p50",
         f"{_lat(d)}; Policy.decide, {d['n']:,} calls, model {d['model_version']}"),
        ("  ref: feature hashing", f"{d['parts']['hash']['p50_us']:.1f} µs p50",
         f"{_lat(d['parts']['hash'])}; 10-key context + 5 actions"),
        ("  ref: bare onnxruntime run", f"{d['parts']['onnx_run']['p50_us']:.1f} µs p50",
         f"{_lat(d['parts']['onnx_run'])}; session.run on pre-hashed inputs"),
        ("decide over socket, 1 client", f"{s1['per_s']:,.0f} req/s",
         f"{_lat(s1)}; sequential request/response, {s1['requests']:,} requests"),
        ("decide over socket, 8 clients", f"{s8['per_s']:,.0f} req/s",
         f"8 processes, {s8['requests']:,} requests; per request p50 {s8['p50_us']:.0f} / p99 {s8['p99_us']:.0f} µs"),
        ("daemon RSS idle", _mib(r["daemon"]["idle_rss"]), f"{SETTLE_SECONDS:g} s after start (start took "
         f"{r['daemon']['start_seconds']:.1f} s)"),
        ("daemon RSS peak", _mib(r["daemon"]["peak_rss"]),
         f"VmHWM at the end, reached during {_peak_step(r['daemon']['peak_after'])}; "
         f"{_mib(r['daemon']['rss_end'])} at the end, "
         f"{r['final_status']['experience'].get('decisions', 0):,} decisions stored"),
    ]


def _load(avg: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in avg)


def table(r: dict[str, Any], m: dict[str, Any]) -> str:
    libs = " ".join(f"{k} {v}" for k, v in m["libraries"].items())
    head = [
        f"reflexd benchmark — {m['date']}",
        f"machine: {m['nproc']} CPUs ({m['usable_cpus']} usable), {m['cpu']}, Linux {m['kernel']}, Python {m['python']}",
        f"libraries: {libs}",
        f"load average (1/5/15 min) at start {_load(m['loadavg_start'])}, at end {_load(m['loadavg_end'])}; "
        f"bench took {r['bench_seconds']:.0f} s",
    ]
    if m["loadavg_start"][0] > 0.5 * m["nproc"]:
        head.append("WARNING: the machine was busy before the bench started; figures are noisier than usual")
    head.append("")
    body = [("metric", "value", "reference / notes")] + rows(r)
    w0 = max(len(x[0]) for x in body)
    w1 = max(len(x[1]) for x in body)
    lines = [f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in body]
    lines.insert(1, f"{'-' * w0}  {'-' * w1}  {'-' * 40}")
    return "\n".join(head + lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=200_000, help="decisions per ingest run (default 200k)")
    p.add_argument("--store-events", type=int, default=100_000, help="events for the Store.write reference")
    p.add_argument("--train-rows", type=int, default=20_000, help="decisions with outcomes to train on")
    p.add_argument("--decides", type=int, default=20_000, help="timed in-process decisions")
    p.add_argument("--socket-decides", type=int, default=5_000, help="Decide requests from the single client")
    args = p.parse_args(argv)

    m = machine(LIBRARIES)
    started = time.perf_counter()
    r = measure(args)
    r["bench_seconds"] = time.perf_counter() - started
    m["loadavg_end"] = os.getloadavg()
    progress(f"done in {r['bench_seconds']:.0f} s")
    text = table(r, m)
    print(text)
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "results.json").write_text(json.dumps({"machine": m, "args": vars(args), "results": r}, indent=2))
    (OUT_DIR / "results.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
