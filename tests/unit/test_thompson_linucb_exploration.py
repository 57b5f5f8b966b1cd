"""Thompson sampling, LinUCB and inverse gap weighting on gaps in standard errors (igw_z) over the
online head: Thompson's probabilities are P(argmax) of the posterior draws, computed; igw_z's are
squarecb's with each gap in the two actions' standard errors; all three are handed the head's
posterior spread, before and beside a model; every logged probability is the one its choice was
drawn with; and all three learn."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from reflexd.config import ExplorationConfig, OnlineConfig, parse_config
from reflexd.deciding import exploring
from reflexd.deciding.choosing import Chooser
from reflexd.deciding.online import OnlineHead
from reflexd.extensions import EXPLORATION, available, load_explorer
from reflexd.plugins.exploration import igw_z, squarecb, thompson, ucb, win_probabilities

CHI2_999 = {2: 13.816, 3: 16.266, 4: 18.467}  # chi-square critical values at the 0.999 quantile


def monte_carlo(means: list[float], spreads: list[float], draws: int = 400_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((draws, len(means))) * np.array(spreads) + np.array(means)
    return np.bincount(values.argmax(axis=1), minlength=len(means)) / draws


def chi_square(counts: np.ndarray, p: np.ndarray) -> float:
    expected = counts.sum() * p
    return float(((counts - expected) ** 2 / expected).sum())


# ---- Thompson's probabilities ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("means", "spreads"),
    [
        ([0.0, 0.1, 0.2], [1.0, 1.0, 1.0]),
        ([0.5, 1.0, 0.0, 0.9], [0.1, 0.3, 0.9, 0.2]),
        ([0.0, 0.05, 0.1, 0.3, 0.2], [2.0, 0.05, 0.3, 0.01, 0.2]),  # spreads 200× apart
        ([0.5, 1.0, 0.0, 0.9], [0.1, 0.0, 0.9, 0.2]),  # a point mass among normals
        ([0.0, 0.0, 0.0], [0.0, 0.1, 1.0]),
        ([1e6, 1e6 + 1.0, 1e6 - 0.5], [1.0, 1.0, 2.0]),  # far from 0
        ([0.2, 0.7], [0.3, 0.4]),  # two actions: in closed form
        ([0.2, 0.7], [0.0, 0.4]),
        ([0.1 * i for i in range(8)], [0.3, 0.5, 0.2, 0.4, 0.6, 0.1, 0.3, 0.2]),
    ],
)
def test_thompson_probabilities_are_those_of_the_argmax_of_the_draws(means: list[float], spreads: list[float]) -> None:
    p = np.array(win_probabilities(means, spreads))
    assert p.sum() == pytest.approx(1.0, abs=1e-12) and (p >= 0).all()
    np.testing.assert_allclose(p, monte_carlo(means, spreads), atol=1e-2)


def test_point_masses_that_tie_share_their_wins() -> None:
    p = win_probabilities([0.2, 0.2, 0.1], [0.0, 0.0, 0.3])
    assert p[0] == pytest.approx(p[1], abs=1e-12)
    # the normal wins when its draw is above 0.2: P = 1 - Φ(1/3)
    assert p[2] == pytest.approx(0.5 * math.erfc((0.2 - 0.1) / 0.3 / math.sqrt(2)), abs=2e-3)


def test_thompson_mixes_a_uniform_floor_and_sums_to_one() -> None:
    cfg = ExplorationConfig(strategy="thompson", epsilon_min=0.04)
    means, spreads = [0.0, 3.0, 0.1, -2.0], [0.01, 0.01, 0.5, 0.01]  # actions 0 and 3 all but never win
    p = exploring.distribution(cfg, means, spreads, t=5)
    assert sum(p) == pytest.approx(1.0, abs=1e-12)
    assert min(p) >= 0.04 / 4 - 1e-15
    win = win_probabilities(means, spreads)
    assert p == pytest.approx([0.96 * w + 0.01 for w in win], abs=1e-15)


def test_thompson_without_spread_is_greedy_with_the_floor_and_refuses_what_is_not_a_number() -> None:
    cfg = ExplorationConfig(strategy="thompson", epsilon_min=0.03)
    assert thompson(cfg, [0.1, 0.5, 0.2], [0.0, 0.0, 0.0], 0) == pytest.approx([0.01, 0.98, 0.01])
    assert thompson(cfg, [0.1, 0.5, 0.2], None, 0) == pytest.approx([0.01, 0.98, 0.01])
    for scores, spread in [([math.nan, 0.5], [0.1, 0.1]), ([0.1, 0.5], [math.inf, 0.1]), ([0.1, 0.5], [-0.1, 0.1]),
                           ([0.1, 0.5], [math.nan, 0.1])]:
        with pytest.raises(ValueError, match="thompson"):
            thompson(cfg, scores, spread, 0)


def test_thompson_is_deterministic() -> None:
    args = ([0.3, 0.1, 0.25, 0.05], [0.2, 0.4, 0.1, 0.3])
    assert win_probabilities(*args) == win_probabilities(*args)


# ---- LinUCB: ucb over the head's spread ---------------------------------------------------------


def test_both_are_registered_and_linucb_is_ucb() -> None:
    assert {"thompson", "linucb"} <= set(available(EXPLORATION))
    assert load_explorer("linucb") is ucb
    cfg = ExplorationConfig(strategy="linucb", epsilon=0.1, ucb_c=2.0)
    # 0.5 + 2·0.3 beats 1.0 + 2·0: the optimistic score wins, epsilon spread over all
    assert exploring.distribution(cfg, [0.5, 1.0, 0.2], [0.3, 0.0, 0.1], 0) == pytest.approx([0.1 / 3 + 0.9, 0.1 / 3, 0.1 / 3])


def test_the_config_accepts_each_name() -> None:
    config = parse_config("exploration:\n  strategy: thompson\nagents:\n  a:\n    exploration:\n      strategy: linucb\n"
                          "  b:\n    exploration:\n      strategy: igw_z\n")
    assert (config.exploration.strategy, config.agents["a"].exploration.strategy) == ("thompson", "linucb")
    assert config.agents["b"].exploration.strategy == "igw_z"


def test_the_strategy_says_whose_spread_it_is_handed() -> None:
    for strategy in ("thompson", "linucb", "igw_z"):
        assert exploring.spread_from(strategy, True) == exploring.spread_from(strategy, False) == "head"
    assert (exploring.spread_from("ucb", True), exploring.spread_from("ucb", False)) == ("model", "head at unit noise")
    assert (exploring.spread_from("squarecb", True), exploring.spread_from("squarecb", False)) == ("model", None)


# ---- igw_z: squarecb on gaps in standard errors --------------------------------------------------


def test_igw_z_weighs_each_gap_in_the_two_actions_standard_errors() -> None:
    assert load_explorer("igw_z") is igw_z
    cfg = ExplorationConfig(strategy="igw_z", gamma=10.0, gamma_exponent=0.5)
    # gap 0.5 over √(0.3² + 0.4²) = 0.5: z = 1, so 1 / (2 + 10·√(3+1)·1) at t = 3
    p = exploring.distribution(cfg, [0.2, 0.7], [0.3, 0.4], 3)
    assert p == pytest.approx([1 / 22, 21 / 22], abs=1e-15)
    # the same gaps, a head sure of one and not of the other: the sure one is left sooner than by
    # squarecb, the other later
    p = exploring.distribution(cfg, [0.5, 1.0, 0.5], [0.05, 0.05, 2.0], 0)
    assert p[0] < squarecb(cfg, [0.5, 1.0, 0.5], None, 0)[0] < p[2] and sum(p) == pytest.approx(1.0, abs=1e-15)
    assert min(p) > 0.0


def test_igw_z_without_a_spread_is_squarecb_and_point_masses_are_certain() -> None:
    cfg = ExplorationConfig(strategy="igw_z")
    scores = [0.1, 0.9, 0.4]
    assert igw_z(cfg, scores, None, 7) == squarecb(cfg, scores, None, 7)
    # spreads of 0 (a model's ensemble of one): squarecb's gaps, so that every action is still drawn
    assert igw_z(cfg, [0.3, 0.9, 0.9], [0.0, 0.0, 0.0], 4) == squarecb(cfg, [0.3, 0.9, 0.9], None, 4)
    assert min(igw_z(cfg, [0.3, 0.5, 0.45], [0.0, 0.0, 0.0], 0)) > 0.0
    # spreads far past floating point's squares
    assert igw_z(cfg, [0.0, 1.0], [1e200, 1e200], 0) == pytest.approx([0.5, 0.5])
    for bad in ([0.1, float("nan"), 0.2], [0.1, -0.1, 0.2], [0.1, 0.2]):
        with pytest.raises(ValueError):
            igw_z(cfg, scores, bad, 0)


# ---- in the chooser -------------------------------------------------------------------------


def contexts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"task": rng.choice(["code", "chat", "math"]), "user": f"u{rng.randrange(20)}"} for _ in range(n)]


def chooser(head: OnlineHead | None, seed: int = 1, source: object = None, **exploration: object) -> Chooser:
    cfg = ExplorationConfig(**exploration)  # type: ignore[arg-type]
    return Chooser(source, lambda agent, manifest: cfg, seed, head)  # type: ignore[arg-type]


class FakeScorer:
    version = "v0001"
    manifest = None

    def __init__(self, scores: list[float], spread: list[float]) -> None:
        self.scores, self.spread = np.array(scores), np.array(spread)

    def score(self, context, actions):
        return self.scores, self.spread


class FakeSource:
    def __init__(self, scorer: FakeScorer) -> None:
        self.scorer, self.error = scorer, None


def teach(head: OnlineHead, n: int = 60, score: dict[str, float] | None = None) -> None:
    rng = random.Random(4)
    for i, ctx in enumerate(contexts(n, seed=3)):
        action = rng.choice(["a", "b", "c"])
        head.remember(f"t{i}", "agent", action, head.features(ctx), None if score is None else score[action])
        head.learn(f"t{i}", (0.6 if action == "b" else 0.2) + rng.gauss(0, 0.2))


@pytest.mark.parametrize("strategy", ["thompson", "linucb", "igw_z"])
def test_before_any_model_exploration_reads_the_heads_spread(strategy: str) -> None:
    head = OnlineHead(OnlineConfig())
    teach(head, 40)
    c = chooser(head, strategy=strategy, epsilon=0.1, ucb_c=1.0)
    ctx = {"task": "code", "user": "u3"}
    x, ids = head.features(ctx), ["a", "b", "c"]
    # decay 0: epsilon does not move with t
    spread = head.spread("agent", x, ids, noise=True)  # in reward units: noise 0.2, not 1
    assert all(a < 0.6 * b for a, b in zip(spread, head.spread("agent", x, ids)))
    expected = exploring.distribution(c.exploration_for("agent", None), head.means("agent", x, ids), spread, t=0)
    assert c.choose("agent", ctx, ids).probs == expected
    scored = c.score("agent", ctx, ids)
    assert scored.spread == spread


@pytest.mark.parametrize("strategy", ["thompson", "linucb", "igw_z"])
def test_beside_a_model_exploration_reads_the_heads_spread_not_the_models(strategy: str) -> None:
    model = {"a": 0.3, "b": 0.5, "c": 0.1}
    head = OnlineHead(OnlineConfig())
    source = FakeSource(FakeScorer(list(model.values()), [5.0, 0.0, 0.0]))  # the model's spread would pick a
    c = chooser(head, source=source, strategy=strategy, epsilon=0.1, ucb_c=1.0, epsilon_min=0.01)
    c.choose("agent", {"task": "chat"}, ["a", "b", "c"])  # the model goes live: the head follows it
    teach(head, 60, model)
    ctx, ids = {"task": "code", "user": "u3"}, ["a", "b", "c"]
    x, scores = head.features(ctx), list(model.values())
    spread = head.spread("agent", x, ids, scores, noise=True)
    assert spread != head.spread("agent", x, ids, noise=True)  # the model's score is one of the head's inputs
    t = c._clock(None)  # igw_z's gamma grows with it; thompson and linucb (decay 0) do not read it
    choice = c.choose("agent", ctx, ids)
    expected = exploring.distribution(c.exploration_for("agent", None), head.means("agent", x, ids, scores), spread, t)
    assert choice.probs == pytest.approx(expected, abs=1e-15) and choice.model_version == "v0001"
    assert choice.probs[0] < 0.5  # not the model's spread's pick
    assert c.score("agent", ctx, ids).spread == spread
    # without a head, the model's spread is all there is
    alone = chooser(None, source=source, strategy=strategy, epsilon=0.1, ucb_c=1.0, epsilon_min=0.01)
    assert alone.choose("agent", ctx, ids).probs == exploring.distribution(
        alone.exploration_for("agent", None), scores, [5.0, 0.0, 0.0], t=0)


@pytest.mark.parametrize("strategy", ["thompson", "linucb", "igw_z"])
def test_each_logged_probability_is_the_one_the_choice_was_drawn_with(strategy: str) -> None:
    head = OnlineHead(OnlineConfig())
    # gamma_exponent 0: igw_z's probabilities, like the others', do not move with the clock
    c = chooser(head, seed=42, strategy=strategy, epsilon=0.2, ucb_c=0.5, epsilon_min=0.05, gamma_exponent=0.0)
    mirror = random.Random(42)  # the chooser's draws, replayed
    world = random.Random(1)
    for ctx in contexts(300, seed=2):
        choice = c.choose("agent", ctx, ["a", "b", "c", "d"])
        assert exploring.sample(choice.probs, mirror.random()) == choice.index
        assert choice.prob == choice.probs[choice.index] and abs(sum(choice.probs) - 1.0) < 1e-12
        c.learn(choice.id, world.gauss(0.5 if choice.action == "b" else 0.3, 0.3))
    # with the head held still, the frequencies of many draws agree with the logged probabilities
    ctx = {"task": "code", "user": "u1"}
    counts = np.zeros(4)
    logged = None
    for _ in range(30_000):
        choice = c.choose("agent", ctx, ["a", "b", "c", "d"])
        counts[choice.index] += 1
        logged = choice.probs if logged is None else logged
        assert choice.probs == logged and choice.strategy == strategy
    p = np.array(logged)
    assert (p > 0).all() and p.max() < 0.99  # something to test: every action is drawn
    assert chi_square(counts, p) < CHI2_999[3], (counts, p)


@pytest.mark.parametrize("strategy", ["thompson", "linucb", "igw_z"])
def test_on_a_seeded_bandit_the_head_learns_the_best_arm(strategy: str) -> None:
    """The best action depends on the task; no model, so only the head can learn it."""
    best = {"code": "large", "chat": "small", "math": "tools"}
    head = OnlineHead(OnlineConfig())
    c = chooser(head, strategy=strategy, epsilon=0.05, epsilon_min=0.01, ucb_c=0.5)
    rng = random.Random(11)
    hits = []
    for ctx in contexts(600, seed=5):
        choice = c.choose("agent", ctx, ["small", "large", "tools"])
        reward = (1.0 if choice.action == best[ctx["task"]] else 0.0) + rng.gauss(0, 0.3)
        c.learn(choice.id, reward)
        hits.append(choice.action == best[ctx["task"]])
    # it starts knowing nothing (igw_z acts soonest on what it learns: 24 of the first 30 here)...
    assert sum(hits[:30]) < (27 if strategy == "igw_z" else 24)
    assert sum(hits[-200:]) / 200 > 0.85  # ...and is mostly right within a few hundred decisions
    for task, action in best.items():
        probs = c.score("agent", {"task": task, "user": "u1"}, ["small", "large", "tools"]).probs
        assert ["small", "large", "tools"][int(np.argmax(probs))] == action
