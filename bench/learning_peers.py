"""The learners reflexd is compared with on each stream (bench/learning.py).

- Vowpal Wabbit ``--cb_explore_adf`` in-process (the bake-off's reference implementation), fed the
  ADF text format: a shared line with the context's features, one line per action with its id (and
  the action's own features where the stream has them); ``-q sa`` crosses them, as the bake-off
  does, so the linear model has a per-action weight on every context feature. The action is drawn
  from the pmf VW returns, and VW learns the chosen action's cost (1 − reward) and probability.
- uniform random.
- the full-information ceiling: a supervised learner that sees every action's reward (the label),
  predicting each example before learning from it.

Every learner returns the per-example reward it earned (progressive: before learning from it).
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from bench.learning_streams import Stream

VW_CONFIGS = {
    "vw eps=0.05": "--cb_explore_adf --epsilon 0.05",
    "vw eps=0.1": "--cb_explore_adf --epsilon 0.1",
    "vw squarecb": "--cb_explore_adf --squarecb",
    "vw regcb-opt": "--cb_explore_adf --regcbopt",
}
VW_COMMON = "-q sa --quiet"


def run_vw(stream: Stream, args: str, seed: int) -> dict[str, Any]:
    from vowpalwabbit import Workspace

    rng = np.random.default_rng(seed)
    vw = Workspace(f"{args} {VW_COMMON} --random_seed {seed}")
    action_lines = [f"|a {a}" for a in stream.vw_actions]
    earned = np.zeros(stream.n)
    chosen = np.zeros(stream.n, dtype=np.int64)
    t0 = time.perf_counter()
    for i in range(stream.n):
        shared = f"shared |s {stream.vw_shared[i]}"
        pmf = np.asarray(vw.predict([shared, *action_lines]), dtype=np.float64)
        pmf = np.clip(pmf, 0.0, None)
        pmf /= pmf.sum()
        a = int(rng.choice(len(pmf), p=pmf))
        r = stream.reward[i, a]
        earned[i] = r
        chosen[i] = a
        lines = [shared, *action_lines]
        lines[1 + a] = f"0:{1.0 - r:.6f}:{pmf[a]:.6f} {action_lines[a]}"
        vw.learn(lines)
    wall = time.perf_counter() - t0
    vw.finish()
    return {"earned": earned, "chosen": chosen, "wall": wall}


def run_uniform(stream: Stream, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    chosen = rng.integers(0, stream.n_actions, stream.n)
    earned = stream.reward[np.arange(stream.n), chosen]
    return {"earned": earned, "chosen": chosen, "wall": time.perf_counter() - t0}


def run_full_info_linear(stream: Stream, seed: int) -> dict[str, Any]:
    """Online linear learner on the true label (classification: logistic SGD; else per-action SGD regression)."""
    from sklearn.linear_model import SGDClassifier, SGDRegressor

    n, k = stream.n, stream.n_actions
    earned = np.zeros(n)
    t0 = time.perf_counter()
    if stream.kind == "classification":
        labels = stream.reward.argmax(axis=1)
        clf = SGDClassifier(loss="log_loss", random_state=seed)
        classes = np.arange(k)
        for i in range(n):
            x = stream.X[i : i + 1]
            a = int(clf.predict(x)[0]) if i else 0
            earned[i] = stream.reward[i, a]
            clf.partial_fit(x, labels[i : i + 1], classes=classes)
    else:
        regs = [SGDRegressor(random_state=seed, learning_rate="invscaling", eta0=0.05) for _ in range(k)]
        for i in range(n):
            x = stream.X[i : i + 1]
            a = int(np.argmax([r.predict(x)[0] for r in regs])) if i else 0
            earned[i] = stream.reward[i, a]
            for j, r in enumerate(regs):
                r.partial_fit(x, stream.reward[i, j : j + 1])
    return {"earned": earned, "wall": time.perf_counter() - t0}


def run_full_info_mlp(stream: Stream, seed: int, step: int = 8) -> dict[str, Any]:
    """Online MLP (64 hidden, Adam) regressing every action's reward; updated every ``step`` examples,
    each example predicted before it is learned from."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor

    n = stream.n
    earned = np.zeros(n)
    mlp = MLPRegressor(hidden_layer_sizes=(64,), learning_rate_init=0.003, random_state=seed)
    fitted = False
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            x = stream.X[lo:hi]
            if fitted:
                a = np.argmax(mlp.predict(x).reshape(hi - lo, -1), axis=1)
            else:
                a = np.zeros(hi - lo, dtype=np.int64)
            earned[lo:hi] = stream.reward[np.arange(lo, hi), a]
            mlp.partial_fit(x, stream.reward[lo:hi])
            fitted = True
    return {"earned": earned, "wall": time.perf_counter() - t0}
