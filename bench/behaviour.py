"""The behaviour model on a simulated tool-using agent: one command, one table.

    python -m bench.behaviour [--episodes N] [--default-epochs N] [--steps N]

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
  registry, one thread.
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


def latency(models: Path, episodes: list, steps: int) -> tuple[float, float]:
    watch = EpisodeWatch(models)
    assert watch.model is not None
    pool = [(ep.episode, o, a, r) for ep in episodes for o, a, r in zip(ep.observations, ep.actions, ep.rewards)]
    for key, o, a, r in pool[:2000]:  # warm-up
        watch.step("w" + key, o, a, r)
    times = []
    clock = time.perf_counter_ns
    i = 0
    while len(times) < steps:
        key, o, a, r = pool[i % len(pool)]
        t0 = clock()
        watch.step(key, o, a, r)
        times.append(clock() - t0)
        i += 1
        if i % len(pool) == 0:
            for ep in episodes:
                watch.end(ep.episode)
    us = np.array(times) / 1000
    return float(np.percentile(us, 50)), float(np.percentile(us, 99))


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
    p50, p99 = latency(models, fresh, steps)
    t = manifest.training
    return {
        "model": name, "settings": settings, "episodes": episodes, "train_episodes": t.episodes - t.holdout_episodes,
        "steps": t.steps, "epochs": t.epochs, "fit_s": t.fit_seconds, "export_s": t.export_seconds,
        "run_wall_s": wall, "cpu_s": t.cpu_seconds, "parity_diff": t.parity_diff, "parity_ok": t.parity_ok,
        "brier": cal.brier, "true_brier": true_brier, "nll": cal.nll, "true_nll": true_nll, "accuracy": cal.accuracy,
        "reliability_gap": gap, "success_brier": cal.success_brier, "propensity_mae": mae,
        "caught": caught, "normal_flagged": flagged, "watch_p50_us": p50, "watch_p99_us": p99,
        "model_bytes": (out / "model.onnx").stat().st_size, "nll_threshold": manifest.nll_threshold,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=2000)
    parser.add_argument("--default-epochs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20_000, help="EpisodeWatch steps timed per model")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings in (("small", SMALL), ("default", {**DEFAULT, "epochs": args.default_epochs})):
            rows.append(run(name, settings, args.episodes, args.steps, Path(tmp)))
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(rows, indent=2))
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs; {args.episodes} episodes (80% train)\n")
    print("| model | epochs | fit s | export s | run wall s | parity diff | Brier (truth) | NLL (truth) "
          "| reliability gap | success Brier | propensity MAE | loops / failures / unlikely caught | normal flagged "
          "| watch p50 µs | watch p99 µs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["caught"]
        print(
            f"| {r['model']} | {r['epochs']} | {r['fit_s']:.1f} | {r['export_s']:.1f} | {r['run_wall_s']:.1f} "
            f"| {r['parity_diff']:.1e} | {r['brier']:.3f} ({r['true_brier']:.3f}) | {r['nll']:.3f} ({r['true_nll']:.3f}) "
            f"| {r['reliability_gap']:.3f} | {r['success_brier']:.3f} | {r['propensity_mae']:.3f} "
            f"| {c['loop']:.0%} / {c['failures']:.0%} / {c['unlikely']:.0%} | {r['normal_flagged']:.1%} "
            f"| {r['watch_p50_us']:.0f} | {r['watch_p99_us']:.0f} |"
        )


if __name__ == "__main__":
    main()
