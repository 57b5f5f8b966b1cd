"""Decision streams for the learning benchmark (bench/learning.py).

Made the standard way for contextual-bandit evaluation (Bietti, Agarwal & Langford, "A Contextual
Bandit Bake-off", JMLR 2021): each labelled example is a context, each class an action, reward 1
when the chosen action is the label and 0 otherwise, examples in a fixed shuffled order per seed.
Two synthetic streams add non-linear best-action regions and noisy, context-dependent rewards with
costs; four of river's bundled datasets (``EXTRA``: segment, 7 actions; shuttle, phishing, bananas)
are asked for by name. Every stream draws its realised rewards for *every* action up front
(``reward[i, a]``), so all learners on one seed face exactly the same world; ``expected[i, a]`` is
the mean reward.

Each stream gives every learner the same information, in the form that learner takes:
- reflexd: ``contexts[i]`` (a dict) and ``actions`` (ids, or ``{"id", "features"}``);
- Vowpal Wabbit: ``vw_shared[i]`` (the shared line's features) and ``vw_actions`` (one per action);
- the full-information learner: ``X[i]`` (numeric, standardised) and the whole ``reward[i]`` row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np


@dataclass
class Stream:
    name: str
    kind: str  # "classification" (reward = 1[action == label]) or "synthetic"
    X: np.ndarray  # [n, d] numeric, standardised
    reward: np.ndarray  # [n, A] realised reward of every action, in [0, 1]
    expected: np.ndarray  # [n, A] mean reward of every action
    contexts: list[dict[str, Any]]
    actions: list[Any]
    vw_shared: list[str]
    vw_actions: list[str]
    note: str = ""

    @property
    def n(self) -> int:
        return len(self.X)

    @property
    def n_actions(self) -> int:
        return self.reward.shape[1]


# where a progressive reward is split to show when a learner earns it: the start is where a
# learner that waits for evidence pays, the rest is what it learns
RANGES = (0, 20, 50, 100, 200, 500, 1000)


def by_decision(earned: np.ndarray) -> dict[str, float]:
    """Mean reward over each range of decisions (``[0,20)``, ``[20,50)``, ... to the stream's end)
    of ``earned`` [seeds, n], every seed's run of one stream."""
    n = earned.shape[1]
    edges = [a for a in RANGES if a < n] + [n]
    return {f"[{a},{b})": float(earned[:, a:b].mean()) for a, b in zip(edges, edges[1:])}


def paired(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float | None]:
    """The mean of ``ours − theirs`` over seeds, each pair run on the same stream, and its standard
    error (None from a single seed)."""
    d = np.asarray(ours, dtype=np.float64) - np.asarray(theirs, dtype=np.float64)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None


def describe_paired(mean: float, stderr: float | None) -> str:
    return f"{mean:+.3f} ± {stderr:.3f} s.e." if stderr is not None else f"{mean:+.3f} (1 seed)"


def describe_ranges(ranges: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in ranges.items())


def _standardise(X: np.ndarray) -> np.ndarray:
    sd = X.std(axis=0)
    sd[sd == 0] = 1.0
    return ((X - X.mean(axis=0)) / sd).astype(np.float64)


def _numeric_stream(name: str, kind: str, X: np.ndarray, reward: np.ndarray, expected: np.ndarray, note: str) -> Stream:
    n_actions = reward.shape[1]
    contexts = [{f"f{j}": round(float(v), 5) for j, v in enumerate(row)} for row in X]
    shared = [" ".join(f"f{j}:{v:.5f}" for j, v in enumerate(row)) for row in X]
    return Stream(
        name=name,
        kind=kind,
        X=X,
        reward=reward,
        expected=expected,
        contexts=contexts,
        actions=[f"a{k}" for k in range(n_actions)],
        vw_shared=shared,
        vw_actions=[f"a{k}" for k in range(n_actions)],
        note=note,
    )


def classification(name: str, loader: Callable[..., Any], seed: int, limit: int | None = None) -> Stream:
    data = loader()
    X, y = np.asarray(data.data, dtype=np.float64), np.asarray(data.target)
    order = np.random.default_rng(seed).permutation(len(X))
    if limit:
        order = order[:limit]
    # standardised over the whole dataset, as the bake-off preprocesses (a fixed transform)
    classes = np.unique(y)  # every class an action, whether or not the cut holds an example of it
    X = _standardise(X)[order]
    y = y[order]
    onehot = (y[:, None] == classes[None, :]).astype(np.float64)
    note = f"{len(X)} examples, {X.shape[1]} features, {len(classes)} actions"
    return _numeric_stream(name, "classification", X, onehot, onehot, note)


def xor_ring(seed: int, n: int = 4000) -> Stream:
    """Four actions; the best one is set by XOR of the signs of (x0, x1) and by being inside a ring.

    x ∈ [-1, 1]^2 plus three pure-noise dimensions. The best action pays 1 with probability 0.8,
    every other action with probability 0.2 — no linear function of x separates the regions.
    """
    rng = np.random.default_rng(1000 + seed)
    raw = rng.uniform(-1, 1, size=(n, 5))
    x0, x1 = raw[:, 0], raw[:, 1]
    xor = (x0 * x1 > 0).astype(int)
    ring = (np.hypot(x0, x1) < 0.6).astype(int)
    best = 2 * ring + xor
    expected = np.where(np.arange(4)[None, :] == best[:, None], 0.8, 0.2)
    reward = (rng.random((n, 4)) < expected).astype(np.float64)
    X = _standardise(raw)
    note = f"{n} examples, 2 informative + 3 noise features, 4 actions, Bernoulli 0.8 / 0.2"
    return _numeric_stream("xor-ring", "synthetic", X, reward, expected, note)


# ---- the "agent strategy" world (as daemon/demo.py's World), rewards mapped into [0, 1] ------------

# the demo's own tables, so the benchmark and `reflexd demo` can never drift apart
from reflexd.tools.demo import STRATEGIES, TASKS, WEIGHTS  # noqa: E402

# demo rewards lie in about [-0.45, 1]: success − cost and latency penalties; mapped affinely
LOW, SPAN = -0.45, 1.45


def agent_strategy(seed: int, n: int = 4000) -> Stream:
    """daemon/demo.py's simulated LLM agent: Bernoulli success, tier-dependent costs, noisy latency."""
    rng = np.random.default_rng(2000 + seed)
    names = list(STRATEGIES)
    task = rng.integers(0, len(TASKS), n)
    difficulty = np.round(rng.random(n), 3)
    pro = rng.random(n) < 0.3
    tokens = np.exp(rng.normal(6, 0.8, n)).astype(int)
    expected = np.zeros((n, len(names)))
    reward = np.zeros((n, len(names)))
    u_success = rng.random((n, len(names)))
    u_latency = rng.uniform(0.7, 1.3, (n, len(names)))
    for a, name in enumerate(names):
        cost, latency, skill, slope = STRATEGIES[name]
        p = np.clip(np.array([skill[TASKS[t]] for t in task]) - slope * difficulty, 0.02, 0.99)
        wc = np.where(pro, WEIGHTS["pro"][0], WEIGHTS["free"][0])
        wl = np.where(pro, WEIGHTS["pro"][1], WEIGHTS["free"][1])
        expected[:, a] = p - wc * cost - wl * latency
        reward[:, a] = (u_success[:, a] < p) - wc * cost - wl * latency * u_latency[:, a]
    expected = (expected - LOW) / SPAN
    reward = np.clip((reward - LOW) / SPAN, 0.0, 1.0)
    contexts = [
        {"task": TASKS[t], "difficulty": float(d), "tier": "pro" if p else "free", "prompt_tokens": int(k)}
        for t, d, p, k in zip(task, difficulty, pro, tokens)
    ]
    actions = [
        {"id": name, "features": {"cost": cost, "latency": lat, "tools": "tools" in name, "retry": "retry" in name}}
        for name, (cost, lat, _, _) in STRATEGIES.items()
    ]
    onehot_task = (task[:, None] == np.arange(len(TASKS))[None, :]).astype(float)
    X = _standardise(np.column_stack([onehot_task, difficulty, pro.astype(float), np.log(tokens)]))
    shared = [
        f"task={TASKS[t]} tier={'pro' if p else 'free'} difficulty:{d:.3f} log_tokens:{math.log(k):.3f}"
        for t, d, p, k in zip(task, difficulty, pro, tokens)
    ]
    vw_actions = [
        f"a={name} cost:{cost} latency:{lat}" + (" tools" if "tools" in name else "") + (" retry" if "retry" in name else "")
        for name, (cost, lat, _, _) in STRATEGIES.items()
    ]
    note = f"{n} examples, daemon/demo.py World, 5 actions, reward=(demo reward+0.45)/1.45 clipped to [0,1]"
    return Stream("agent-strategy", "synthetic", X, reward, expected, contexts, actions, shared, vw_actions, note)


# classification datasets bundled with river (the [bench] extra): streams no default was tuned
# on, to check that what holds on the six holds beyond them
RIVER = {"segment": "ImageSegments", "shuttle": "Shuttle", "phishing": "Phishing", "bananas": "Bananas"}


def _river(dataset: str) -> Callable[[], SimpleNamespace]:
    """A loader of river's ``dataset`` shaped as sklearn's (``data``, ``target``)."""

    def load() -> SimpleNamespace:
        try:
            from river import datasets
        except ImportError as exc:
            raise SystemExit(f"{dataset} is river's: pip install -e '.[bench]' (or make bench-replay)") from exc

        rows = list(getattr(datasets, dataset)())
        keys = sorted(rows[0][0])
        return SimpleNamespace(
            data=np.array([[float(x[k]) for k in keys] for x, _ in rows]), target=np.array([str(y) for _, y in rows])
        )

    return load


def build(name: str, seed: int, limit: int | None = None) -> Stream:
    from sklearn import datasets

    loaders = {
        "digits": datasets.load_digits,
        "wine": datasets.load_wine,
        "breast_cancer": datasets.load_breast_cancer,
        "iris": datasets.load_iris,
        **{stream: _river(dataset) for stream, dataset in RIVER.items()},
    }
    if name in loaders:
        return classification(name, loaders[name], seed, limit)
    if name == "xor-ring":
        return xor_ring(seed, limit or 4000)
    if name == "agent-strategy":
        return agent_strategy(seed, limit or 4000)
    raise KeyError(name)


ALL = ("digits", "breast_cancer", "wine", "iris", "xor-ring", "agent-strategy")
# asked for by name only (``--streams segment``): river's datasets, for a check beyond ALL
EXTRA = tuple(RIVER)
