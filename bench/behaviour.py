"""The behaviour model on a simulated tool-using agent: one command, one table.

    python -m bench.behaviour [--episodes N] [--default-epochs N] [--steps N] [--models small,default]

For a small model and the issue's default (LSTM, hidden 256, 3 layers, dropout 0.1, RMSprop
α 0.99), each trained by the real entry point (``python -m reflexd.trainer.behaviour``, one
thread) on a Parquet steps snapshot of ``reflexd.learning.agentsim.ToolAgent`` episodes:

- training: fit, export and whole-run wall time, and the run's CPU time;
- the ONNX parity difference (torch's sequence forward against onnxruntime step by step);
- calibration on the held-out (newest 20%) episodes: next-action Brier and NLL beside the same
  scores of the agent's true policy, the reliability gap, success Brier;
- propensities: mean absolute error of the estimated propensity against the true one on fresh
  episodes;
- unusual trajectories: planted loops / repeated failures / unlikely episodes caught, and normal
  episodes flagged;
- early warning: ``EpisodeWatch.step`` latency per step (p50, p99) on the model published to a
  registry, one thread, for the float graph (``full_precision=True``) and the int8 one (the
  default), timed in alternating rounds so the machine's load falls on both alike; and the
  largest difference between the two watches' predictions on the same steps.
Writes bench/out/behaviour.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from reflexd.client.watch import EpisodeWatch
from reflexd.deciding.behaviour import BEHAVIOUR_DIR, BehaviourModel, BehaviourRegistry, read_behaviour_run
from reflexd.learning.agentsim import ToolAgent, true_probs
from reflexd.learning.propensity import estimate_propensities, unusual
from reflexd.learning.steps import write_steps

OUT = Path(__file__).resolve().parent / "out" / "behaviour.json"
SMALL = {"hidden": 32, "layers": 1, "embedding": 8, "head_hidden": 32, "epochs": 15, "context_dim": 32,
         "optimizer": "adam", "learning_rate": 0.003}
DEFAULT: dict[str, Any] = {}  # every BehaviourSettings default: hidden 256, 3 layers, dropout 0.1, RMSprop


def _truth_scores(episodes: list, vocab: list[str]) -> tuple[float, float]:
    brier, nll = [], []
    for ep in episodes:
        for o, a in zip(ep.observations, ep.actions):
            p = true_probs(o)
            brier.append(sum((p.get(v, 0.0) - (v == a)) ** 2 for v in vocab[1:]))
            nll.append(-np.log(max(p[a], 1e-12)))
    return float(np.mean(brier)), float(np.mean(nll))


def latency(watches: dict[str, EpisodeWatch], episodes: list, steps: int, rounds: int = 10) -> dict[str, list[float]]:
    """[p50, p99 wall, p50, p99 of the thread's CPU time] µs of ``EpisodeWatch.step`` per watch,
    ``steps`` each, in ``rounds`` alternating rounds. The CPU time leaves out the time the thread
    waited for a CPU, which on a loaded machine is most of the wall-clock p99."""
    pool = [(ep.episode, o, a, r) for ep in episodes for o, a, r in zip(ep.observations, ep.actions, ep.rewards)]
    for watch in watches.values():
        assert watch.model is not None
        for key, o, a, r in pool[:2000]:  # warm-up
            watch.step("w" + key, o, a, r)
    times: dict[str, list[int]] = {name: [] for name in watches}
    cpu: dict[str, list[int]] = {name: [] for name in watches}
    at = dict.fromkeys(watches, 0)
    clock, thread = time.perf_counter_ns, time.thread_time_ns
    for k in range(rounds):
        for name, watch in watches.items():
            want = steps * (k + 1) // rounds
            got, used, i = times[name], cpu[name], at[name]
            while len(got) < want:
                key, o, a, r = pool[i % len(pool)]
                c0, t0 = thread(), clock()
                watch.step(key, o, a, r)
                t1, c1 = clock(), thread()
                got.append(t1 - t0)
                used.append(c1 - c0)
                i += 1
                if i % len(pool) == 0:
                    for ep in episodes:
                        watch.end(ep.episode)
            at[name] = i
    out = {}
    for name in watches:
        wall, used = np.array(times[name]) / 1000, np.array(cpu[name]) / 1000
        out[name] = [float(np.percentile(x, q)) for x in (wall, used) for q in (50, 99)]
    return out


def deviation(fast: EpisodeWatch, full: EpisodeWatch, episodes: list) -> tuple[float, float]:
    """The largest |int8 − float| over every step of ``episodes``: (in P(success), in an action probability)."""
    success = action = 0.0
    for ep in episodes:
        for o, a, r in zip(ep.observations, ep.actions, ep.rewards):
            p, q = fast.step("d" + ep.episode, o, a, r), full.step("d" + ep.episode, o, a, r)
            success = max(success, abs(p.success - q.success))
            action = max(action, max(abs(p.next_action_probs[k] - v) for k, v in q.next_action_probs.items()))
        fast.end("d" + ep.episode)
        full.end("d" + ep.episode)
    return success, action


def run(name: str, settings: dict[str, Any], episodes: int, steps: int, root: Path) -> dict[str, Any]:
    agent = ToolAgent(seed=1)
    eps = agent.episodes(episodes)
    snapshot = root / f"{name}.parquet"
    write_steps(str(snapshot), eps)
    out = root / name
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "reflexd.trainer.behaviour", str(snapshot), str(out), "--config", json.dumps(settings)],
        check=False, capture_output=True, text=True,
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{name}: trainer exited {proc.returncode}: {proc.stderr[-2000:]}")
    manifest = read_behaviour_run(out)
    models = root / f"models-{name}"
    registry = BehaviourRegistry(models / BEHAVIOUR_DIR)
    registry.promote(registry.add_run(out).version)
    model = BehaviourModel.from_dir(out)
    holdout = eps[len(eps) - manifest.training.holdout_episodes:]
    true_brier, true_nll = _truth_scores(holdout, manifest.vocabulary)
    fresh = ToolAgent(seed=2).episodes(500, prefix="t")
    est = estimate_propensities(model, fresh)
    truth = [true_probs(o)[a] for ep in fresh for o, a in zip(ep.observations, ep.actions)]
    mae = float(np.mean(np.abs(np.array([e.prob for e in est]) - np.array(truth))))
    planted = ToolAgent(seed=3)
    kinds = {"loop": "loop", "failures": "repeated_failure", "unlikely": "unlikely"}
    caught = {}
    for kind, flag in kinds.items():
        bad = planted.episodes(100, kind, kind[0])
        found = {(u.episode, u.kind) for u in unusual(bad, model)}
        caught[kind] = sum((ep.episode, flag) in found for ep in bad) / len(bad)
    flagged = len({u.episode for u in unusual(fresh, model)}) / len(fresh)
    cal = manifest.calibration
    gap = sum(b.count * abs(b.predicted - b.observed) for b in cal.bins) / max(1, sum(b.count for b in cal.bins))
    fast, full = EpisodeWatch(models), EpisodeWatch(models, full_precision=True)
    assert (fast.precision, full.precision) == ("int8", "fp32"), (fast.precision, fast.error, manifest.training.int8_refused)
    timed = latency({"fp32": full, "int8": fast}, fresh, steps)
    dev_success, dev_action = deviation(fast, full, fresh)
    t = manifest.training
    return {
        "model": name, "settings": settings, "episodes": episodes, "train_episodes": t.episodes - t.holdout_episodes,
        "steps": t.steps, "epochs": t.epochs, "fit_s": t.fit_seconds, "export_s": t.export_seconds,
        "run_wall_s": wall, "cpu_s": t.cpu_seconds, "parity_diff": t.parity_diff, "parity_ok": t.parity_ok,
        "brier": cal.brier, "true_brier": true_brier, "nll": cal.nll, "true_nll": true_nll, "accuracy": cal.accuracy,
        "reliability_gap": gap, "success_brier": cal.success_brier, "propensity_mae": mae,
        "caught": caught, "normal_flagged": flagged,
        "watch_fp32_p50_us": timed["fp32"][0], "watch_fp32_p99_us": timed["fp32"][1],
        "watch_int8_p50_us": timed["int8"][0], "watch_int8_p99_us": timed["int8"][1],
        "watch_fp32_cpu_p50_us": timed["fp32"][2], "watch_fp32_cpu_p99_us": timed["fp32"][3],
        "watch_int8_cpu_p50_us": timed["int8"][2], "watch_int8_cpu_p99_us": timed["int8"][3],
        "int8_deviation_success": dev_success, "int8_deviation_action": dev_action,
        "int8_parity_diff": t.int8_parity_diff, "int8_seconds": t.int8_seconds,
        "model_bytes": (out / "model.onnx").stat().st_size,
        "int8_bytes": (out / manifest.int8.file).stat().st_size if manifest.int8 else None,
        "nll_threshold": manifest.nll_threshold,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=2000)
    parser.add_argument("--default-epochs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20_000, help="EpisodeWatch steps timed per model and graph")
    parser.add_argument("--models", default="small,default", help="which models to run (small, default)")
    args = parser.parse_args()
    rows = []
    chosen = {"small": SMALL, "default": {**DEFAULT, "epochs": args.default_epochs}}
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if not names or set(names) - set(chosen):
        parser.error(f"--models takes a comma-separated list of {', '.join(chosen)}")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows.append(run(name, chosen[name], args.episodes, args.steps, Path(tmp)))
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(rows, indent=2))
    load = os.getloadavg()
    print(f"load average {load_before[0]:.2f} before, {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min) "
          f"after, {os.cpu_count()} CPUs; {args.episodes} episodes (80% train)\n")
    print("| model | epochs | fit s | export s | run wall s | parity diff | Brier (truth) | NLL (truth) "
          "| reliability gap | success Brier | propensity MAE | loops / failures / unlikely caught | normal flagged |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["caught"]
        print(
            f"| {r['model']} | {r['epochs']} | {r['fit_s']:.1f} | {r['export_s']:.1f} | {r['run_wall_s']:.1f} "
            f"| {r['parity_diff']:.1e} | {r['brier']:.3f} ({r['true_brier']:.3f}) | {r['nll']:.3f} ({r['true_nll']:.3f}) "
            f"| {r['reliability_gap']:.3f} | {r['success_brier']:.3f} | {r['propensity_mae']:.3f} "
            f"| {c['loop']:.0%} / {c['failures']:.0%} / {c['unlikely']:.0%} | {r['normal_flagged']:.1%} |"
        )
    print("\nEarly warning (EpisodeWatch.step, one thread, µs per step; CPU: the thread's CPU time):\n")
    print("| model | fp32 p50 | fp32 p99 | int8 p50 | int8 p99 | fp32 CPU p50 / p99 | int8 CPU p50 / p99 "
          "| int8 − fp32, max, P(success) / action prob | int8 parity diff (training) | fp32 / int8 bytes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['watch_fp32_p50_us']:.0f} | {r['watch_fp32_p99_us']:.0f} "
            f"| {r['watch_int8_p50_us']:.0f} | {r['watch_int8_p99_us']:.0f} "
            f"| {r['watch_fp32_cpu_p50_us']:.0f} / {r['watch_fp32_cpu_p99_us']:.0f} "
            f"| {r['watch_int8_cpu_p50_us']:.0f} / {r['watch_int8_cpu_p99_us']:.0f} "
            f"| {r['int8_deviation_success']:.4f} / {r['int8_deviation_action']:.4f} | {r['int8_parity_diff']:.4f} "
            f"| {r['model_bytes']:,} / {r['int8_bytes']:,} |"
        )


if __name__ == "__main__":
    main()
