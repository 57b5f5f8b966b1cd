"""Exact regret on the demo's world after a model goes live, by how the online head follows it.

    python -m bench.promotion [--seeds 1 2 3 4 5 6] [--before 3000] [--after 3000]

The demo's world (``reflexd.tools.demo.World``, whose expected rewards are known, so regret is
exact) is logged by the online head alone for ``--before`` decisions, as ``bench.served`` does;
the default learner is fit on them (as the gate's candidate would be); then the next ``--after``
decisions (the same contexts for every rule) are served:

- ``no model``: the head goes on alone (what a refused candidate leaves);
- ``warm_rows 0``: the model goes live and the head starts afresh beside it, empty;
- ``warm_rows N``: the head starts afresh and first relearns the newest N rewards beside the
  model's scores (``online.warm_rows``, the default 1000).

Prints mean regret per decision after the promotion, per seed and over seeds (lower is better).
"""

from __future__ import annotations

import argparse
import random
from typing import Any

import numpy as np

from bench.served import CONFIG, SPEC, logged
from reflexd.config import OnlineConfig
from reflexd.deciding import exploring
from reflexd.deciding.online import OnlineHead
from reflexd.learning.dataset import Batch, from_records
from reflexd.tools.demo import World

RULES: dict[str, int | None] = {"no model": None, "warm_rows 0": 0, "warm_rows 1000": 1000, "warm_rows 3000": 3000}


def inputs(batch: Batch, i: int) -> np.ndarray:
    x = np.zeros(SPEC.context_dim + 2)
    x[:-2] = batch.context[i]
    x[-2] = 1.0
    return x


def serve(
    seed: int, logs: Batch, past: np.ndarray, contexts: list[dict[str, Any]], scores: np.ndarray, warm: int | None
) -> float:
    """Mean exact regret per decision over ``contexts``, served as rule ``warm`` says."""
    world = World(seed)
    ids = [a["id"] for a in world.actions]
    head = OnlineHead(OnlineConfig(warm_rows=warm or 0), SPEC)
    for i in range(len(logs)):  # the head that logged them, learned again (its own decisions: a source each)
        head.remember(logs.ids[i], "agent", logs.action_ids[i][int(logs.chosen[i])], inputs(logs, i), None, i)
        head.learn(logs.ids[i], float(logs.reward[i]))
    if warm is not None:
        head.follow("candidate", lambda rows: [float(past[r, int(logs.chosen[r])]) for r in rows])
    rng = random.Random(seed * 7 + 3)  # the same draws for every rule
    regret = 0.0
    for i, context in enumerate(contexts):
        x = head.features(context)
        model = scores[i, : len(ids)].tolist() if warm is not None else None
        p = exploring.distribution(CONFIG.exploration, head.means("agent", x, ids, model), None, len(logs) + i)
        expected = [world.expected(context, a) for a in ids]
        regret += max(expected) - sum(q * e for q, e in zip(p, expected))
        k = exploring.sample(p, rng.random())
        head.remember(f"n{i}", "agent", ids[k], x, model[k] if model is not None else None)
        head.learn(f"n{i}", world.reward(context, ids[k]))
    return regret / len(contexts)


def run(seed: int, before: int, after: int) -> dict[str, float]:
    import torch

    from reflexd.plugins.learners.mlp import MLPLearner

    logs = logged(seed, before)
    model = MLPLearner().fit(logs, CONFIG.trainer, seed, None)
    world = World(seed + 1000)
    contexts = [world.context() for _ in range(after)]
    served = from_records(
        [{"id": str(i), "agent": "agent", "received_at": float(i), "prob": 1.0, "reward": 0.0, "context": c,
          "actions": world.actions, "chosen": world.actions[0]["id"]} for i, c in enumerate(contexts)],
        SPEC,
    )
    with torch.inference_mode():
        scores = model(torch.from_numpy(served.context), torch.from_numpy(served.actions))[0].double().numpy()
        past = model(torch.from_numpy(logs.context), torch.from_numpy(logs.actions))[0].double().numpy()
    return {name: serve(seed, logs, past, contexts, scores, warm) for name, warm in RULES.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.promotion", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument(
        "--before", type=int, default=3_000, help="decisions logged by the head before the model (default 3000)"
    )
    parser.add_argument("--after", type=int, default=3_000, help="decisions served after it (default 3000)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    found: list[dict[str, float]] = []
    print(f"{'seed':<6}" + "".join(f"{name:>16}" for name in RULES), flush=True)
    for seed in args.seeds:
        found.append(run(seed, args.before, args.after))
        print(f"{seed:<6}" + "".join(f"{found[-1][name]:>16.4f}" for name in RULES), flush=True)
    print(f"{'mean':<6}" + "".join(f"{np.mean([r[name] for r in found]):>16.4f}" for name in RULES))
    print(f"\nmean regret per decision over the {args.after} decisions after the model went live "
          f"({args.before} logged by the head before it), lower is better")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
