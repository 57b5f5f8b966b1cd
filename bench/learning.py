"""reflexd learning-quality benchmark: contextual-bandit streams, reflexd through its real path vs VW.

    python -m bench.learning [--quick] [--seeds N] [--min-decisions N] [--reflexd PRESET ...]

Streams are made the standard way for contextual-bandit evaluation (Bietti, Agarwal & Langford,
"A Contextual Bandit Bake-off", JMLR 2021): scikit-learn's bundled classification datasets with
each class an action and reward 1[action == label], plus two synthetic non-linear streams
(bench/learning_streams.py). Reward is counted progressively: what a learner earns on an example
before it learns from it.

reflexd runs through its real path: a ``python -m reflexd run`` subprocess on a fresh state dir
per stream × seed × preset, ``reflexd.Policy`` deciding in-process (ONNX + exploration, exact
propensities), ``policy.reward`` for rewards, and at each retraining point ``policy.flush()``,
the protocol ``Train`` request (trainer subprocess → ONNX → gate → promotion) and a wait for the
client to hot-swap to the promoted version — so the cadence is deterministic. Retraining happens
where the daemon's own scheduler (``reflexd.learning.runs.due_after``) would run it with the default
``trainer`` settings: after 6 examples (``first_run_rows``; runs on fewer than 13 are
cross-fitted), then each time the stream has grown by ``growth`` (25%: 8, 10, 13, 17, 22, ...)
until that is ``min_new_examples`` (1000), then every 1000
(``--growth`` and ``--cadence`` change them). Early and often, so the time to a first model is
part of what is measured. Streams shorter than ``--min-decisions`` / ``--seeds`` examples run
more seeds, so that every stream's mean averages at least that many decisions.

Peers on the same streams and seeds (bench/learning_peers.py): Vowpal Wabbit --cb_explore_adf with
epsilon-greedy 0.05 and 0.1, SquareCB and RegCB-opt; uniform random; and the full-information
ceiling. Prints the table (with reflexd's difference from the best VW seed by seed, and reward by
decision range), writes bench/out/learning.json and bench/out/learning.png.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from bench import learning_peers as peers
from bench import learning_streams as streams
from bench._daemon import HUGE, BenchDaemon
from bench._host import machine
from reflexd.client.policy import Policy
from reflexd.config import Config, TrainerConfig
from reflexd.errors import ReflexdError
from reflexd.learning.runs import run_points
from reflexd.registry import Registry
from reflexd.split import first_run_rows
from reflexd.testing import deep_merge
from reflexd.wire.protocol import Train

OUT_DIR = Path(__file__).resolve().parent / "out"
WAIT_WINDOW = 0.1  # rewards.wait_window: decisions mature right after they are sent
LIBRARIES = ("numpy", "onnxruntime", "torch", "vowpalwabbit", "scikit-learn", "duckdb")

# reflexd configurations. "defaults" changes nothing that affects learning (only what the bench
# needs: a short wait window, training only when asked, every joined example in the snapshot).
PRESETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    # the other built-in learner: the action set as tokens attending to the context
    "transformer": {"trainer": {"learner": "transformer"}},
    # the defaults, deploying the gated candidate itself rather than its refit on every row
    "no-refit": {"trainer": {"refit_below": 0}},
    # what the defaults were before the benchmark tuned them: epsilon-greedy 0.1, a gate that
    # promotes a replacement only on a 95% interval with no margin and at least 10 holdout rows
    # (a first model on 4, so the first run comes at 18), no refit and no cross-fitted early runs
    "previous": {
        "exploration": {"strategy": "epsilon_greedy"},
        "gate": {
            "confidence": 0.95, "margin": 0.0, "min_holdout": 10, "first_min_holdout": 4, "point_estimate_below": 0
        },
        "trainer": {"refit_below": 0, "cross_fit_from": 0},
    },
}


DEFAULT_PRESETS = ["defaults", "transformer"]


def progress(msg: str) -> None:
    print(f"[learning {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def schedule(preset: str, n: int, growth: float, cadence: int) -> list[int]:
    """Example counts under ``n`` after which reflexd retrains with ``preset``: where its scheduler
    would, with ``trainer.growth`` and ``min_new_examples`` set to ``--growth`` and ``--cadence``."""
    config = msgspec.convert(deep_merge(msgspec.to_builtins(Config()), PRESETS[preset]), Config)
    trainer = msgspec.structs.replace(config.trainer, growth=growth, min_new_examples=cadence)
    return run_points(trainer, n, first_run_rows(config))


def _points(growth: float, cadence: int) -> str:
    """The defaults' schedule in words: its first points, where growth hands over, the cadence after."""
    points = [0, *schedule("defaults", 10**7, growth, cadence)]
    # the last point reached by growth: the next gap is the cadence
    grown = next(i for i in range(1, len(points) - 1) if points[i + 1] - points[i] == cadence)
    shown = [str(p) for p in points[1 : grown + 1]]
    if len(shown) > 10:
        shown = [*shown[:8], "...", *shown[-2:]]
    return f"{', '.join(shown)}, then every {cadence}"


def run_reflexd(stream: streams.Stream, seed: int, preset: str, points: list[int]) -> dict[str, Any]:
    daemon = BenchDaemon(
        train_rows=HUGE,
        overrides=deep_merge({"rewards": {"wait_window": WAIT_WINDOW}, "log": {"level": "warning"}}, PRESETS[preset]),
    )
    earned = np.zeros(stream.n)
    versions: list[str | None] = []
    runs: list[dict[str, Any]] = []
    agent = f"{stream.name}-{seed}"
    registry = Registry(daemon.line_folder(agent))
    due = set(points)
    t0 = time.perf_counter()
    train_seconds = 0.0
    try:
        daemon.start()
        policy = Policy(
            agent, socket=daemon.socket, state_dir=daemon.state_dir, seed=seed, refresh_interval=0.05
        )
        try:
            for i in range(stream.n):
                choice = policy.decide(stream.contexts[i], stream.actions)
                r = float(stream.reward[i, choice.index])
                earned[i] = r
                versions.append(choice.model_version)
                policy.reward(choice.id, r)
                if i + 1 in due:
                    tr = time.perf_counter()
                    if not policy.flush(60):
                        raise RuntimeError(f"flush timed out: {policy.stats()}")
                    # the flush is acknowledged after the daemon stamped the events' arrival, so
                    # past the wait window they have all matured (checked below, and counted in
                    # the table should a run ever train on fewer)
                    time.sleep(WAIT_WINDOW + 0.05)
                    try:
                        message = daemon.request(Train(agent=agent), timeout=900).message
                    except ReflexdError as exc:
                        message = f"failed: {exc}"
                    outcome = message.split()[0]
                    run = {"at": i + 1, "outcome": outcome, "message": message}
                    if outcome in ("promoted", "rejected"):
                        version = message.split()[1].rstrip(":")
                        manifest = registry.manifest(version)
                        run["learner"] = manifest.learner
                        run["rows"] = manifest.training.experience
                        if run["rows"] != i + 1:
                            progress(f"{stream.name} seed {seed}: trained on {run['rows']} of {i + 1} examples")
                    if outcome == "promoted":
                        deadline = time.monotonic() + 60
                        while policy.model_version != version:
                            if time.monotonic() > deadline:
                                raise RuntimeError(f"the client did not load {version}: {policy.stats()}")
                            time.sleep(0.01)
                    run["seconds"] = time.perf_counter() - tr
                    train_seconds += run["seconds"]
                    runs.append(run)
            policy.flush(60)
        finally:
            policy.close()
    except Exception:
        progress(f"reflexd failed; daemon log tail:\n{daemon.log_tail()}")
        raise
    finally:
        daemon.stop()
    return {
        "earned": earned,
        "wall": time.perf_counter() - t0,
        "train_seconds": train_seconds,
        "runs": runs,
        "promoted": sum(r["outcome"] == "promoted" for r in runs),
        "first_model_at": next((i for i, v in enumerate(versions) if v is not None), None),
    }


def run_pair(name: str, seed: int, args: argparse.Namespace) -> tuple[str, int, dict[str, dict[str, Any]]]:
    """Every learner on one stream and seed: (stream note, length, label → result)."""
    stream = streams.build(name, seed, args.limit)
    jobs: list[tuple[str, Any]] = [
        ("uniform", lambda: peers.run_uniform(stream, seed)),
        *[(label, lambda a=a: peers.run_vw(stream, a, seed)) for label, a in peers.VW_CONFIGS.items()],
        ("full-info linear", lambda: peers.run_full_info_linear(stream, seed)),
        ("full-info mlp", lambda: peers.run_full_info_mlp(stream, seed)),
        *[
            (f"reflexd {p}", lambda p=p: run_reflexd(stream, seed, p, schedule(p, stream.n, args.growth, args.cadence)))
            for p in args.reflexd
        ],
    ]
    out: dict[str, dict[str, Any]] = {}
    for label, job in jobs:
        r = job()
        r["mean"] = float(np.mean(r["earned"]))
        progress(f"{name} seed {seed} {label}: {r['mean']:.4f} ({r['wall']:.1f} s)")
        out[label] = r
    best = stream.expected.max(axis=1)
    out["oracle (expected)"] = {"mean": float(best.mean()), "wall": 0.0, "earned": best}
    return stream.note, stream.n, out


def seeds_for(n: int, seeds: int, min_decisions: int) -> int:
    """Seeds for a stream of ``n`` examples: at least ``seeds``, and enough that its mean averages
    ``min_decisions`` decisions (a 150-example stream's mean over 3 seeds swings by ±0.05)."""
    return max(seeds, math.ceil(min_decisions / n))


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Stream × seed pairs in ``args.jobs`` worker processes: each pair runs its own daemons and
    peers, so pairs are independent and only their wall times feel the sharing."""
    length = {name: streams.build(name, 0, args.limit).n for name in args.streams}
    args.stream_seeds = {name: seeds_for(length[name], args.seeds, args.min_decisions) for name in args.streams}
    pairs = [
        (name, seed)
        for name in args.streams
        for seed in range(args.first_seed, args.first_seed + args.stream_seeds[name])
    ]
    # longest streams first, so no worker is left with a long one at the end
    queue = sorted(pairs, key=lambda pair: -length[pair[0]])
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = dict(zip(queue, pool.map(run_pair, *zip(*queue), [args] * len(queue))))
    results: dict[str, Any] = {"streams": {}}
    for name, seed in pairs:
        note, n, learners = done[name, seed]
        entry = results["streams"].setdefault(name, {"note": note, "n": n, "learners": {}})
        for label, r in learners.items():
            entry["learners"].setdefault(label, []).append(r)
    return results


def summarise(results: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for name, data in results["streams"].items():
        learners = data["learners"]
        means = {k: np.array([r["mean"] for r in v]) for k, v in learners.items()}
        best_vw = max((k for k in means if k.startswith("vw ")), key=lambda k: means[k].mean())
        for label, m in means.items():
            runs = learners[label]
            row = {
                "stream": name,
                "n": data["n"],
                "learner": label,
                "mean": float(m.mean()),
                "std": float(m.std(ddof=1)) if len(m) > 1 else 0.0,
                "seeds": [float(x) for x in m],
                "wall": float(np.mean([r["wall"] for r in runs])),
                "best_vw": label == best_vw,
                "by_decision": streams.by_decision(np.stack([r["earned"] for r in runs])),
            }
            if label.startswith("reflexd"):
                row["ratio_best_vw"] = float(m.mean() / means[best_vw].mean())
                # seed by seed, each pair on the same stream: usually far tighter than the two stds
                mean, stderr = streams.paired(m, means[best_vw])
                row["paired_best_vw"] = {"mean": mean, "stderr": stderr}
                row["promoted"] = float(np.mean([r["promoted"] for r in runs]))
                row["trainings"] = len(runs[0]["runs"])
                row["first_model_at"] = [r["first_model_at"] for r in runs]
                row["train_seconds"] = float(np.mean([r["train_seconds"] for r in runs]))
                # runs whose snapshot lacked some of the stream so far: their result is suspect
                row["short_runs"] = sum(run.get("rows", run["at"]) != run["at"] for r in runs for run in r["runs"])
            rows.append(row)
    return rows


def _seeds(meta: dict[str, Any]) -> str:
    """"3", or "3 (wine 9, iris 10; at least 1500 decisions a stream)" when short streams ran more."""
    more = {name: k for name, k in meta.get("stream_seeds", {}).items() if k != meta["seeds"]}
    extra = f" ({', '.join(f'{name} {k}' for name, k in more.items())}; at least {meta['min_decisions']} decisions a stream)"
    first = meta.get("first_seed", 0)
    start = f", from seed {first}" if first else ""
    return f"{meta['seeds']}{extra if more else ''}{start}"


def table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    m = meta["machine"]
    lines = [
        f"reflexd learning benchmark — {m['date']}",
        f"machine: {m['nproc']} cpus, {m['cpu']}, python {m['python']}, load at start {m['loadavg_start'][0]:.2f}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in m["libraries"].items()),
        f"seeds: {_seeds(meta)}; reflexd retrains (Train request, then waits for the client's hot-swap) where its "
        f"scheduler would with trainer.growth {meta['growth']:g} and min_new_examples {meta['cadence']}: after "
        f"{_points(meta['growth'], meta['cadence'])}",
        "reflexd presets: " + "; ".join(f"{p} = {json.dumps(PRESETS[p]) if PRESETS[p] else 'defaults'}" for p in meta["presets"]),
        "VW: " + "; ".join(f"{k} = `{v} {peers.VW_COMMON}`" for k, v in peers.VW_CONFIGS.items()),
        "reward: progressive (earned on each example before learning from it), mean ± std over seeds",
        "",
        f"{'stream':<15}{'n':>6}  {'learner':<22}{'progressive reward':>20}  {'/ best VW':>9}  {'wall s':>7}  notes",
    ]
    last = None
    for r in rows:
        if last is not None and r["stream"] != last:
            lines.append("")
        last = r["stream"]
        ratio = f"{r['ratio_best_vw']:.3f}" if "ratio_best_vw" in r else ""
        note = "best VW" if r["best_vw"] else ""
        if "promoted" in r:
            paired = r["paired_best_vw"]
            note = (
                f"{streams.describe_paired(paired['mean'], paired['stderr'])} vs best VW seed by seed; "
                f"{r['promoted']:.1f}/{r['trainings']} promoted, train {r['train_seconds']:.0f} s"
            )
            if r["short_runs"]:
                note += f"; {r['short_runs']} runs trained on fewer examples than seen (see the log)"
        lines.append(
            f"{r['stream']:<15}{r['n']:>6}  {r['learner']:<22}{r['mean']:>11.4f} ± {r['std']:.4f}  {ratio:>9}  {r['wall']:>7.1f}  {note}"
        )
    lines += ["", "by decision: mean reward over each range of decisions, over seeds (best VW and reflexd)"]
    for r in rows:
        if r["best_vw"] or r["learner"].startswith("reflexd"):
            lines.append(f"{r['stream']:<15}{r['learner']:<22}{streams.describe_ranges(r['by_decision'])}")
    return "\n".join(lines)


def plot(results: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["streams"])
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 8), dpi=100, squeeze=False)
    for j, name in enumerate(names):
        sub = [r for r in rows if r["stream"] == name]
        ax = axes[0][j]
        labels = [r["learner"] for r in sub]
        colors = ["tab:red" if lab.startswith("reflexd") else "tab:blue" if lab.startswith("vw") else "grey" for lab in labels]
        ax.barh(labels, [r["mean"] for r in sub], xerr=[r["std"] for r in sub], color=colors)
        ax.invert_yaxis()
        ax.set_title(f"{name} (n={sub[0]['n']})")
        ax.set_xlabel("progressive reward")
        ax.tick_params(axis="y", labelsize=8)
        ax = axes[1][j]
        for label, runs in results["streams"][name]["learners"].items():
            if label.startswith("full-info linear") or label == "uniform":
                continue
            curve = np.mean([np.cumsum(r["earned"]) / np.arange(1, len(r["earned"]) + 1) for r in runs], axis=0)
            style = "-" if label.startswith("reflexd") else ":" if label.startswith("full") or label.startswith("oracle") else "--"
            ax.plot(curve, style, label=label, lw=1.6 if label.startswith("reflexd") else 1.0)
        ax.set_xlabel("example")
        ax.set_ylabel("progressive average reward")
        ax.grid(alpha=0.3)
        if j == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.learning", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 streams, 1 seed, small: checks the command works")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per stream, at least (default 3; 1 with --quick)")
    parser.add_argument(
        "--min-decisions", type=int, default=None,
        help="short streams get more seeds, enough for this many decisions in all (default 1500; 0 with --quick)",
    )
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run from this one (default 0)")
    parser.add_argument("--streams", nargs="+", default=None, choices=streams.ALL + streams.EXTRA)
    parser.add_argument("--limit", type=int, default=None, help="examples per stream (synthetic length; dataset cap)")
    parser.add_argument(
        "--cadence", type=int, default=TrainerConfig().min_new_examples,
        help="trainer.min_new_examples: retrain every this many examples once growth asks for more (default %(default)s)",
    )
    parser.add_argument(
        "--growth", type=float, default=TrainerConfig().growth,
        help="trainer.growth: retrain sooner, once the stream has grown by this fraction (default %(default)s)",
    )
    parser.add_argument("--reflexd", nargs="+", default=None, choices=list(PRESETS), help="reflexd config presets (default: defaults transformer)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="stream × seed pairs run at once (default: one per CPU)")
    parser.add_argument("--out", default=str(OUT_DIR), help="where learning.json and learning.png go (default bench/out)")
    parser.add_argument("--tag", default="", help="suffix of the output files (learning<tag>.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.streams = args.streams or ["breast_cancer", "xor-ring"]
        args.seeds = args.seeds or 1
        args.limit = args.limit or 1500
        args.min_decisions = args.min_decisions or 0
    args.streams = args.streams or list(streams.ALL)
    args.seeds = args.seeds or 3
    args.min_decisions = 1500 if args.min_decisions is None else args.min_decisions
    args.reflexd = args.reflexd or DEFAULT_PRESETS

    started = time.perf_counter()
    meta = {"machine": machine(("reflexd", *LIBRARIES)), "seeds": args.seeds, "first_seed": args.first_seed, "min_decisions": args.min_decisions, "cadence": args.cadence, "growth": args.growth, "jobs": args.jobs, "presets": args.reflexd, "quick": args.quick}
    results = run_all(args)
    meta["stream_seeds"] = args.stream_seeds
    rows = summarise(results, args)
    meta["total_seconds"] = time.perf_counter() - started
    text = table(rows, meta)
    print(text)
    print(f"\ntotal {meta['total_seconds']:.0f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    detail = {
        name: {
            "note": d["note"],
            "n": d["n"],
            "reflexd_runs": {k: [r["runs"] for r in v] for k, v in d["learners"].items() if k.startswith("reflexd")},
        }
        for name, d in results["streams"].items()
    }
    payload = {"meta": meta, "presets": {p: PRESETS[p] for p in args.reflexd}, "rows": rows, "streams": detail, "table": text}
    suffix = args.tag or ("-quick" if args.quick else "")
    (out / f"learning{suffix}.json").write_text(json.dumps(payload, indent=1, default=float))
    plot(results, rows, out / f"learning{suffix}.png")
    progress(f"wrote {out}/learning{suffix}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
