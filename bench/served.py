"""How the demo's candidates would serve: judged on their scores, or beside the online head.

    python -m bench.served [--seeds 1 2 3 4] [--decisions 10000] [--at 3000 10000]

The demo's world (``reflexd.tools.demo.World``) is logged by the online head alone, exploring
epsilon-greedy 0.1 as the demo's client does before any model. At each snapshot size the default
learner is fit on all but the newest fifth, and the gate (``learning.gate.compare``, DR) judges
it on that fifth against the logging policy, with the candidate's policy taken as:

- ``scores``: exploration over the model's scores, as the gate judges a candidate;
- ``fresh head, prior P``: as a client serves a new model, beside an online head started afresh
  with ridge penalty P, learning each holdout reward in turn (the rows replayed in order, so each
  row's probabilities depend only on the rows before it);
- ``warm head``: beside a head that first learned the training rows beside the model's scores.

Prints the mean difference from the logging policy over seeds (and each seed's), per snapshot size.
"""

from __future__ import annotations

import argparse
import random
from typing import Any

import numpy as np

from reflexd.config import Config, ExplorationConfig, OnlineConfig
from reflexd.deciding import exploring
from reflexd.deciding.online import OnlineHead
from reflexd.features import FeatureSpec
from reflexd.learning import gate
from reflexd.learning.dataset import Batch, from_records, split_holdout
from reflexd.manifest import Training
from reflexd.tools.demo import DEMO_EXPLORATION, World

CONFIG = Config(exploration=ExplorationConfig(**DEMO_EXPLORATION))
SPEC = FeatureSpec(CONFIG.features.context_dim, CONFIG.features.action_dim, CONFIG.features.seed)


def logged(seed: int, n: int) -> Batch:
    """``n`` decisions in the demo's world, made by the online head alone with exact probabilities."""
    world, head, rng = World(seed), OnlineHead(CONFIG.online, SPEC), random.Random(seed)
    ids = [a["id"] for a in world.actions]
    records = []
    for i in range(n):
        context = world.context()
        x = head.features(context)
        known = head.knows("agent", ids)
        p = exploring.distribution(CONFIG.exploration, head.means("agent", x, ids), None, i) if known else [1 / len(ids)] * len(ids)
        k = exploring.sample(p, rng.random())
        reward = world.reward(context, ids[k])
        head.remember(str(i), "agent", ids[k], x, None)
        head.learn(str(i), reward)
        records.append(
            {"id": str(i), "agent": "agent", "received_at": float(i), "prob": p[k], "reward": reward,
             "context": context, "actions": world.actions, "chosen": ids[k]}
        )
    return from_records(records, SPEC)


def beside_head(rows: Batch, scores: np.ndarray, prior: float, t: int, warm: tuple[Batch, np.ndarray] | None = None) -> np.ndarray:
    """[N, A]: the policy a client serves over ``scores`` beside a fresh head (``warm``: one that
    first learned those rows beside their scores), learning each row's reward after deciding it."""
    head = OnlineHead(OnlineConfig(model_prior=prior), FeatureSpec(context_dim=rows.context.shape[1]))
    head.follow("candidate")  # arms born beside a model start from its scores
    x = np.zeros(rows.context.shape[1] + 2)
    x[-2] = 1.0

    def learn(batch: Batch, model_scores: np.ndarray, i: int, ids: list[str], model: list[float]) -> None:
        chosen = int(batch.chosen[i])
        head.remember(batch.ids[i], batch.agents[i], ids[chosen], x, model[chosen])
        head.learn(batch.ids[i], float(batch.reward[i]))

    if warm is not None:
        batch, model_scores = warm
        for i in range(len(batch)):
            x[:-2] = batch.context[i]
            valid = batch.mask[i]
            learn(batch, model_scores, i, batch.action_ids[i], model_scores[i, valid].tolist())
    out = np.zeros(rows.mask.shape)
    for i in range(len(rows)):
        valid = rows.mask[i]
        ids = rows.action_ids[i]
        x[:-2] = rows.context[i]
        model = scores[i, valid].tolist()
        out[i, valid] = exploring.distribution(CONFIG.exploration, head.means(rows.agents[i], x, ids, model), None, t + i)
        learn(rows, scores, i, ids, model)
    return out


def judge(seed: int, batch: Batch, n: int) -> dict[str, float]:
    import torch

    from reflexd.plugins.learners.mlp import MLPLearner

    train, holdout = split_holdout(batch.take(range(n)), CONFIG.trainer.holdout_fraction)
    model = MLPLearner().fit(train, CONFIG.trainer, seed, None)
    def score(rows: Batch) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(rows.context), torch.from_numpy(rows.actions))[0].double().numpy()

    scores, train_scores = score(holdout), score(train)
    t = Training(train_rows=len(train), holdout_rows=len(holdout)).experience
    mask = holdout.mask
    policies: dict[str, Any] = {"scores": gate.target_probs(CONFIG.exploration, scores, None, mask, t)}
    for prior in (1.0, 10.0, 100.0):
        policies[f"fresh head, prior {prior:g}"] = beside_head(holdout, scores, prior, t)
    policies["warm head, prior 1"] = beside_head(holdout, scores, 1.0, t, (train, train_scores))
    q_hat = np.where(mask, scores, 0.0)
    return {
        name: gate.compare(pi, None, holdout.chosen, holdout.prob, holdout.reward, q_hat, CONFIG.gate, gate.LOGGED_POLICY).difference
        for name, pi in policies.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.served", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--decisions", type=int, default=10_000)
    parser.add_argument("--at", type=int, nargs="+", default=[3_000, 10_000], help="snapshot sizes")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    found: dict[int, list[dict[str, float]]] = {n: [] for n in args.at}
    for seed in args.seeds:
        batch = logged(seed, max(args.decisions, *args.at))
        for n in args.at:
            found[n].append(judge(seed, batch, n))
            print(f"seed {seed}, {n} decisions: " + ", ".join(f"{k} {v:+.3f}" for k, v in found[n][-1].items()), flush=True)
    print("\ndifference from the logging policy (DR on the newest fifth), mean over seeds")
    names = list(found[args.at[0]][0])
    print(f"{'policy':<24}" + "".join(f"{n:>10}" for n in args.at))
    for name in names:
        print(f"{name:<24}" + "".join(f"{np.mean([r[name] for r in found[n]]):>+10.3f}" for n in args.at))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
