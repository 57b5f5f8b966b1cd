"""reflexd benchmark: one command, one table, every figure measured in this run on real parts.

    python -m bench.perf           (or: make bench)

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

from bench import _decide, _ingest, _train
from bench._daemon import BenchDaemon
from bench._host import machine
from reflexd.config import IngestConfig

OUT_DIR = Path(__file__).resolve().parent / "out"
SETTLE_SECONDS = 1.0
INGEST_FRAMINGS = ("msgpack", "json")
INGEST_SENDERS = (1, 8)
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

        ingest_started = time.time()
        for framing in INGEST_FRAMINGS:
            for senders in INGEST_SENDERS:
                progress(f"durable ingest: {args.events} {framing} decisions from {senders} sender process(es)")
                res = _ingest.run_senders(
                    daemon.socket, senders, args.events, prefix=f"ing{framing}{senders}-", framing=framing,
                    status=daemon.status,
                )
                r[f"ingest_{framing}_{senders}"] = res
                progress(f"  acknowledged {res['events_per_s']:,.0f} events/s, loaded {res['loaded_per_s']:,.0f}/s")
        r["daemon"]["ingest_peak_rss"] = daemon.peak_rss_between(ingest_started, time.time())
        # the peak is read after each step too, to tell which step set it
        r["daemon"]["peak_after"] = {"ingest": daemon.peak_rss()}

        progress(f"in-process ceilings: decode {args.events}, spool and DuckDB load {args.store_events}")
        r["ceilings"] = {
            framing: _ingest.decode_ceilings(args.events, f"ing{framing}1-0", framing)  # the 1-sender run's frames
            for framing in INGEST_FRAMINGS
        }
        r["ceilings"].update(_ingest.store_ceiling(args.store_events, IngestConfig().batch_size))

        r["adaptation"] = []
        with _train.Clients(daemon) as clients:
            for run in (1, 2):  # the second run finds its architecture's ONNX graph cached
                progress(f"adaptation {run}: {args.train_rows:,} new decisions with outcomes, then Train")
                t = _train.adaptation(daemon, clients, args.train_rows, run)
                r["adaptation"].append(t)
                progress(f"  {t['outcome']} {t['version']}, all clients on it {t['seconds']:.1f} s after Train; {t['gate']}")
        r["daemon"]["training_peak_rss"] = max(
            daemon.peak_rss_between(t["requested_at"], t["requested_at"] + t["reply_seconds"]) for t in r["adaptation"]
        )
        r["daemon"]["peak_after"]["training"] = daemon.peak_rss()

        progress(f"in-process decide: {args.decides} × policy.decide, beside its parts, numpy and Vowpal Wabbit")
        r["decide_inproc"] = _decide.in_process(daemon.socket, str(daemon.state_dir), args.decides)

        r["decide_socket"] = _decide.socket_runs(
            daemon.socket, daemon.pid, args.socket_decides, args.pipelined_decides, progress
        )

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


def _peak_step(peak_after: dict[str, int]) -> str:
    """The first step after which VmHWM had its final value."""
    final = max(peak_after.values())
    return next(step for step, value in peak_after.items() if value == final)


def _ingest_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    c = r["ceilings"]
    out = []
    for framing in INGEST_FRAMINGS:
        for senders in INGEST_SENDERS:
            i = r[f"ingest_{framing}_{senders}"]
            out.append((
                f"ingest, {framing}, {senders} sender{'s' if senders > 1 else ''}", f"{i['events_per_s']:,.0f} events/s",
                f"{i['events']:,} × {i['frame_bytes']:.0f} B in 64 KiB writes, first send → Ack (fsynced): "
                f"{i['seconds']:.2f} s; all loaded into DuckDB at {i['loaded_per_s']:,.0f}/s",
            ))
        out += [
            (f"  ref: msgspec {framing} decode", f"{c[framing]['pure_decode_per_s']:,.0f} events/s",
             "same bytes, in-process, results discarded (the ceiling for Python-side work)"),
            ("  ref: FrameReader + decode", f"{c[framing]['frame_and_decode_per_s']:,.0f} events/s",
             "the daemon's parser on 64 KiB chunks, no socket"),
        ]
    batch = IngestConfig().batch_size
    return out + [
        ("  ref: spool append alone", f"{c['spool_append_per_s']:,.0f} events/s",
         f"JSON-encode + write + fdatasync, {batch:,}-event batches (the daemon's), in-process"),
        ("  ref: DuckDB load alone", f"{c['store_load_per_s']:,.0f} events/s",
         "Store.load of those spool segments into the keyed tables (sustained-ingest ceiling)"),
    ]


def rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    d = r["decide_inproc"]
    return [
        *_ingest_rows(r),
        *_train.table_rows(r["adaptation"]),
        *_decide.inproc_rows(d),
        *_decide.socket_rows(r["decide_socket"]),
        ("daemon RSS idle", _mib(r["daemon"]["idle_rss"]), f"{SETTLE_SECONDS:g} s after start, no model yet (start "
         f"took {r['daemon']['start_seconds']:.1f} s); target ≤ 120 MB"),
        ("daemon RSS peak, ingest", _mib(r["daemon"]["ingest_peak_rss"]),
         "highest VmRSS sampled (every 10 ms) during the durable-ingest runs above; target ≤ 200 MB"),
        ("daemon RSS peak, training", _mib(r["daemon"]["training_peak_rss"]),
         "highest VmRSS sampled from Train to its reply in either adaptation run: Parquet snapshot, waiting on "
         "the trainer, gate"),
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
    p = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=200_000, help="decisions per ingest run (default 200k)")
    p.add_argument("--store-events", type=int, default=100_000, help="events for the spool-append and DuckDB-load references")
    p.add_argument("--train-rows", type=int, default=100_000, help="joined decisions per adaptation run")
    p.add_argument("--decides", type=int, default=20_000, help="timed in-process decisions")
    p.add_argument("--socket-decides", type=int, default=5_000, help="Decide requests from the sequential client")
    p.add_argument("--pipelined-decides", type=int, default=40_000, help="Decide requests per pipelined socket run")
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
