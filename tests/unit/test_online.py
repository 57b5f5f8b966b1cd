"""The online head (reflexd.deciding.online): exact ridge regression, learning from the first
decisions, and probabilities that stay exactly the ones each choice was drawn from."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from reflexd.config import ExplorationConfig, OnlineConfig, RewardConfig
from reflexd.deciding import exploring
from reflexd.deciding.choosing import Chooser
from reflexd.deciding.online import OnlineHead

CHI2_999 = {2: 13.816, 3: 16.266}  # chi-square critical values at the 0.999 quantile


def contexts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"task": rng.choice(["code", "chat", "math"]), "difficulty": rng.random(), "user": f"u{rng.randrange(40)}"}
        for _ in range(n)
    ]


def chooser(head: OnlineHead, seed: int = 1, **exploration: object) -> Chooser:
    cfg = ExplorationConfig(**exploration)
    return Chooser(None, lambda agent, manifest: cfg, seed, head)


def rewarded(
    head: OnlineHead, action: str, rows: list[dict], rng: np.random.Generator, mean: float, sd: float
) -> tuple[np.ndarray, np.ndarray]:
    """``action`` of agent "a" rewarded at each of ``rows``, rewards N(mean, sd²): its inputs and rewards."""
    xs, ys = [], []
    for i, ctx in enumerate(rows):
        xs.append(head.features(ctx))
        ys.append(float(rng.normal(mean, sd)))
        head.remember(f"{action}{i}", "a", action, xs[-1], None)
        assert head.learn(f"{action}{i}", ys[-1])
    return np.array(xs), np.array(ys)


def ridge(X: np.ndarray, Y: np.ndarray, penalty: float, bias_mean: float) -> tuple[np.ndarray, np.ndarray]:
    """The closed form: the posterior precision and mean of a ridge regression whose bias (the
    input every context has, second to last) has prior mean ``bias_mean``, the others 0."""
    precision = X.T @ X + penalty * np.eye(X.shape[1])
    prior = np.zeros(X.shape[1])
    prior[-2] = bias_mean
    return precision, np.linalg.solve(precision, X.T @ Y + penalty * prior)


def test_the_head_is_exactly_the_ridge_regression_and_its_posterior() -> None:
    head = OnlineHead(OnlineConfig(prior=2.0))
    X, Y = rewarded(head, "left", contexts(400), np.random.default_rng(3), 0.3, 1.0)
    # the agent's first arm regresses from its first reward: the bias's prior mean
    precision, theta = ridge(X, Y, 2.0, Y[0])
    probe = head.features({"task": "chat", "difficulty": 0.25, "user": "u7", "new_key": "unseen"})
    (mean,) = head.means("a", probe, ["left"])
    assert mean == pytest.approx(float(theta @ probe), abs=1e-9)
    (spread,) = head.spread("a", probe, ["left"])
    assert spread == pytest.approx(float(np.sqrt(probe @ np.linalg.solve(precision, probe))), rel=1e-9)
    # an action never rewarded keeps its prior: the agent's mean reward, variance |x|²/prior
    assert head.means("a", probe, ["right"]) == [pytest.approx(Y.mean(), abs=1e-12)]
    assert head.spread("a", probe, ["right"]) == pytest.approx([float(np.sqrt(probe @ probe / 2.0))])
    # another agent's arm is its own, and it has learned nothing: the prior's 0
    assert head.means("b", probe, ["left"]) == [0.0]
    assert head.prior_mean("a", "left") == Y[0] and head.prior_mean("a", "right") is None


def test_an_arm_made_after_rewards_is_the_ridge_regression_from_the_agents_mean_reward() -> None:
    head = OnlineHead(OnlineConfig(prior=2.0))
    rng = np.random.default_rng(4)
    _, before = rewarded(head, "left", contexts(50), rng, 0.7, 0.5)
    X, Y = rewarded(head, "right", contexts(200, seed=9), rng, 0.2, 1.0)
    mu = float(np.mean(before))  # the agent's mean reward when "right" first learned
    assert head.prior_mean("a", "right") == pytest.approx(mu, abs=1e-12)
    # inputs never seen stay at their prior
    _, theta = ridge(X, Y, 2.0, mu)
    probe = head.features({"task": "math", "difficulty": 0.6, "user": "u3", "new_key": "unseen"})
    (mean,) = head.means("a", probe, ["right"])
    assert mean == pytest.approx(float(theta @ probe), abs=1e-9)
    # an action with no arm: the mean of every reward learned so far
    assert head.means("a", probe, ["up"]) == [pytest.approx(np.mean(np.concatenate([before, Y])), abs=1e-12)]


@pytest.mark.parametrize(("shift", "batched"), [(10.0, False), (-3.5, False), (1000.0, False), (10.0, True)])
def test_rewards_shifted_by_a_constant_shift_every_mean_by_it_and_change_no_decision(shift: float, batched: bool) -> None:
    """The prior mean is the agent's mean reward, so where the rewards' zero is changes nothing:
    the same decisions (and so the same probabilities) whatever the constant; rewards learned
    together (``later``, ``apply``) as well as one by one."""
    heads = [OnlineHead(OnlineConfig()), OnlineHead(OnlineConfig())]
    rng = random.Random(6)
    ids = ["small", "medium", "large"]
    chosen = [[], []]
    for i, ctx in enumerate(contexts(300, seed=2)):
        reward = rng.random() + (0.5 if ctx["task"] == "code" else 0.0)
        for k, head in enumerate(heads):
            x = head.features(ctx)
            means = head.means("a", x, ids) if head.knows("a", ids) else [0.0, 0.0, 0.0]
            action = ids[exploring.argmax(means)] if i % 3 else ids[i % 7 % 3]  # greedy, and every third by rote
            chosen[k].append(action)
            head.remember(f"d{i}", "a", action, x, None)
            earned = reward + (shift if k else 0.0) + (0.2 if action == "large" else 0.0)
            if not batched:
                assert head.learn(f"d{i}", earned)
                continue
            head.later(f"d{i}", earned)
            if i % 60 == 59:  # 60 at a time: an action's 16 or more as one update of their rank
                assert head.apply() == 60
    assert chosen[0] == chosen[1]
    probe = heads[0].features({"task": "chat", "difficulty": 0.5, "user": "u1"})
    assert heads[1].means("a", probe, ids + ["never"]) == pytest.approx(
        [m + shift for m in heads[0].means("a", probe, ids + ["never"])], abs=1e-9 * max(1.0, abs(shift)))
    assert heads[1].spread("a", probe, ids) == pytest.approx(heads[0].spread("a", probe, ids), rel=1e-9)


def test_only_the_first_reward_of_a_remembered_decision_is_learned() -> None:
    head = OnlineHead(OnlineConfig(pending=3))
    x = head.features({"k": 1})
    for i in range(5):
        head.remember(f"d{i}", "a", "left", x, None)
    assert not head.learn("d0", 1.0) and not head.learn("d1", 1.0)  # the oldest were let go
    assert head.learn("d4", 1.0) and not head.learn("d4", 1.0)
    assert head.stats()["updates"] == 1 and head.stats()["pending"] == 2


def test_arms_are_bounded() -> None:
    head = OnlineHead(OnlineConfig(max_arms=4))
    x = head.features({"k": 1})
    for i in range(10):
        head.remember(f"d{i}", "a", f"act{i}", x, None)
        head.learn(f"d{i}", 1.0)
    assert head.stats()["arms"] == 4
    assert head.knows("a", ["act9"]) and not head.knows("a", ["act0"])


def test_beside_a_new_model_the_head_serves_its_scores_and_learns_what_they_miss() -> None:
    """Before any model the head learned the task's best action; a model goes live whose scores
    are right for code and wrong for chat. The head serves the model's scores for actions it has
    learned nothing about beside it, then learns from the rewards what they miss."""
    rng = random.Random(8)
    truth = {("code", "small"): 0.2, ("code", "large"): 0.8, ("chat", "small"): 0.7, ("chat", "large"): 0.3}
    head = OnlineHead(OnlineConfig())
    ids = ["small", "large"]
    for i in range(300):
        task, action = rng.choice(["code", "chat"]), rng.choice(ids)
        head.remember(f"a{i}", "agent", action, head.features({"task": task}), None)
        head.learn(f"a{i}", truth[task, action] + rng.gauss(0, 0.1))
    head.remember("pending", "agent", "small", head.features({"task": "code"}), None)
    head.follow("v0001")
    assert head.stats()["arms"] == 0 and not head.learn("pending", 1.0)  # afresh, old inputs dropped
    model = {("code", "small"): 0.2, ("code", "large"): 0.8, ("chat", "small"): 0.3, ("chat", "large"): 0.7}
    chat, code = head.features({"task": "chat"}), head.features({"task": "code"})
    assert head.means("agent", chat, ids, [model["chat", a] for a in ids]) == [0.3, 0.7]
    for i in range(400):
        task, action = rng.choice(["code", "chat"]), rng.choice(ids)
        head.remember(f"b{i}", "agent", action, head.features({"task": task}), model[task, action])
        head.learn(f"b{i}", truth[task, action] + rng.gauss(0, 0.1))
    small, large = head.means("agent", chat, ids, [model["chat", a] for a in ids])
    assert small - large == pytest.approx(0.4, abs=0.1)  # corrected where the model was wrong
    small, large = head.means("agent", code, ids, [model["code", a] for a in ids])
    assert large - small == pytest.approx(0.6, abs=0.1)  # and left where it was right
    head.follow("v0001")
    assert head.stats()["arms"] == 2  # the same model again changes nothing


def same_head(a: OnlineHead, b: OnlineHead, agent: str, ids: list[str], scores: list[float] | None) -> None:
    for ctx in contexts(5, seed=9):
        x = a.features(ctx)
        assert a.means(agent, x, ids, scores) == pytest.approx(b.means(agent, x, ids, scores), abs=1e-9)
        assert a.spread(agent, x, ids, scores) == pytest.approx(b.spread(agent, x, ids, scores), abs=1e-9)


def test_a_new_model_starts_a_head_that_first_relearns_the_newest_rewards_beside_its_scores() -> None:
    """``warm_rows``: with a new live model the head starts afresh and relearns the newest rewards of
    the decisions it was handed a source for, each beside the new model's score of it: the same head
    as one that had learned those rewards beside that model."""
    rng = random.Random(4)
    ids = ["small", "large"]
    head = OnlineHead(OnlineConfig(warm_rows=30))
    decisions = []
    for i, ctx in enumerate(contexts(50)):
        action, reward = rng.choice(ids), rng.random()
        head.remember(f"d{i}", "agent", action, head.features(ctx), None, source=i)
        head.learn(f"d{i}", reward)
        decisions.append((ctx, action, reward))
    head.remember("other", "agent", "small", head.features({"k": 1}), None)  # no source: not relearned
    head.learn("other", 5.0)
    asked: list[list[int]] = []

    def rescore(sources: list[int]) -> list[float | None]:
        asked.append(sources)
        return [None if i == 45 else 0.1 * (i % 7) for i in sources]  # the model cannot score decision 45

    head.follow("v0001", rescore)
    assert asked == [list(range(20, 50))]  # the newest 30, oldest first
    assert head.stats()["warmed"] == 29 and head.base == "v0001"
    beside = OnlineHead(OnlineConfig(warm_rows=0))
    beside.follow("v0001")
    for i in range(20, 50):
        ctx, action, reward = decisions[i]
        if i != 45:
            beside.remember(f"d{i}", "agent", action, beside.features(ctx), 0.1 * (i % 7))
            beside.learn(f"d{i}", reward)
    same_head(head, beside, "agent", ids, [0.3, -0.2])
    # back to no model: the same rewards relearned with none
    head.follow(None)
    alone = OnlineHead(OnlineConfig(warm_rows=0))
    for i in range(20, 50):
        ctx, action, reward = decisions[i]
        alone.remember(f"d{i}", "agent", action, alone.features(ctx), None)
        alone.learn(f"d{i}", reward)
    # each arm made where a head learning them one by one makes it: the first at its first reward
    assert head.prior_mean("agent", decisions[20][1]) == decisions[20][2] == alone.prior_mean("agent", decisions[20][1])
    assert head.stats()["warmed"] == 30
    same_head(head, alone, "agent", ids, None)


def test_with_warm_rows_0_or_no_rescore_a_new_model_starts_an_empty_head() -> None:
    for cfg, rescore in ((OnlineConfig(warm_rows=0), lambda s: [0.0] * len(s)), (OnlineConfig(), None)):
        head = OnlineHead(cfg)
        head.remember("d", "agent", "small", head.features({"k": 1}), None, source=0)
        head.learn("d", 1.0)
        head.follow("v0001", rescore)
        assert head.stats()["arms"] == 0 and head.stats()["warmed"] == 0


def test_a_reward_for_a_decision_made_beside_another_model_is_only_relearned_later() -> None:
    """An agent thread may decide with the model served before and remember after the head moved
    on: that decision's score is the old model's, so the head beside the new one does not learn
    it; it is kept to relearn beside the next model."""
    head = OnlineHead(OnlineConfig(warm_rows=10))
    head.follow("v0002")
    x = head.features({"task": "code"})
    head.remember("late", "agent", "small", x, -3.0, source=0, model="v0001")
    assert not head.learn("late", 1.0)
    assert head.stats()["arms"] == 0 and head.stats()["updates"] == 0
    head.prepare("v0003", lambda sources: [0.5 for _ in sources])
    head.follow("v0003")
    assert head.stats()["warmed"] == 1


def test_a_rescore_that_fails_leaves_a_head_started_empty_and_the_model_served() -> None:
    head = OnlineHead(OnlineConfig())
    head.remember("d", "agent", "small", head.features({"k": 1}), None, source=0)
    head.learn("d", 1.0)

    def broken(sources: list) -> list:
        raise RuntimeError("onnxruntime says no")

    head.follow("v0001", broken)
    assert head.base == "v0001" and head.stats()["arms"] == 0 and head.stats()["warmed"] == 0


def test_warm_rows_raised_by_a_reload_keeps_rewards_from_then_on() -> None:
    head = OnlineHead(OnlineConfig(warm_rows=0))
    head.settings = OnlineConfig(warm_rows=5)  # what a reload does
    for i in range(8):
        head.remember(f"d{i}", "agent", "small", head.features({"k": i}), None, source=i)
        head.learn(f"d{i}", 1.0)
    asked = []
    head.follow("v0001", lambda sources: asked.extend(sources) or [0.0] * len(sources))
    assert asked == [3, 4, 5, 6, 7] and head.stats()["warmed"] == 5


def test_forgetting_an_agent_drops_what_the_head_holds_of_it() -> None:
    head = OnlineHead(OnlineConfig())
    for agent in ("gone", "kept"):
        for i in range(3):
            head.remember(f"{agent}{i}", agent, "small", head.features({"k": i}), None, source=(agent, i))
            head.learn(f"{agent}{i}", 1.0)
        head.remember(f"{agent}-waiting", agent, "small", head.features({"k": 9}), None, source=(agent, 9))
    head.forget("gone")
    assert not head.knows("gone", ["small"]) and head.knows("kept", ["small"])
    assert all(agent != "gone" for agent, _ in head._sources.values())
    assert not head.learn("gone-waiting", 1.0) and head.learn("kept-waiting", 1.0)
    asked: list = []
    head.follow("v0001", lambda sources: asked.extend(sources) or [0.0] * len(sources))
    assert asked and all(agent == "kept" for agent, _ in asked)


def test_what_is_forgotten_stays_forgotten() -> None:
    """Contexts kept for decisions no longer awaiting a reward (``pending`` below ``warm_rows``)
    go too, and arms a ``prepare`` relearned while the agent was forgotten are not installed."""
    head = OnlineHead(OnlineConfig(pending=2, warm_rows=10))
    for i in range(5):
        head.remember(f"d{i}", "gone", "small", head.features({"k": i}), None, source=("gone", i))
    head.remember("r", "gone", "small", head.features({"k": 9}), None, source=("gone", 9))
    head.learn("r", 1.0)

    def forgetting(sources: list) -> list:
        head.forget("gone")  # meanwhile, on another thread
        return [0.0] * len(sources)

    head.prepare("v0001", forgetting)
    assert not head._sources
    head.follow("v0001", lambda sources: [0.0] * len(sources))
    assert not head.knows("gone", ["small"]) and head.stats()["warmed"] == 0


def test_an_action_not_yet_learned_beside_a_model_is_served_the_models_score() -> None:
    head = OnlineHead(OnlineConfig())
    x = head.features({"task": "code"})
    head.remember("d", "agent", "small", x, 0.7)
    head.learn("d", 0.9)
    small, large = head.means("agent", x, ["small", "large"], [0.7, 0.4])
    assert large == 0.4  # nothing learned of it beside this model: its score as it is
    # learned: one ridge step (penalty model_prior, 1) from 0 on the inputs, the score 0.7 among them
    xx = float(x @ x) + 0.7**2
    assert small == pytest.approx(xx * 0.9 / (1 + xx), rel=1e-12)


def test_before_any_model_the_head_learns_the_best_action_within_a_few_hundred_decisions() -> None:
    """A world where the best action depends on the task; no model, so only the head can learn it."""
    best = {"code": "large", "chat": "small", "math": "tools"}
    head = OnlineHead(OnlineConfig())
    c = chooser(head, strategy="squarecb")
    rng = random.Random(11)
    hits = []
    for ctx in contexts(600, seed=5):
        choice = c.choose("agent", ctx, ["small", "large", "tools"])
        assert choice.model_version is None
        reward = (1.0 if choice.action == best[ctx["task"]] else 0.0) + rng.gauss(0, 0.3)
        c.learn(choice.id, reward)
        hits.append(choice.action == best[ctx["task"]])
    assert sum(hits[:30]) < 24  # it starts knowing nothing...
    assert sum(hits[-200:]) / 200 > 0.85  # ...and is mostly right within a few hundred decisions
    assert c.score("agent", {"task": "math", "difficulty": 0.5}, ["small", "large", "tools"]).probs[2] > 0.5


def test_with_a_default_action_the_default_is_served_while_the_head_learns() -> None:
    head = OnlineHead(OnlineConfig())
    c = chooser(head, strategy="epsilon_greedy", epsilon=0.2, default_action="small")
    for i, ctx in enumerate(contexts(50)):
        choice = c.choose("agent", ctx, ["small", "large"])
        assert choice.strategy == "default" and choice.probs == pytest.approx([0.9, 0.1])
        c.learn(choice.id, 1.0 if choice.action == "large" else 0.0)
    assert head.stats()["updates"] == 50


@pytest.mark.parametrize("strategy", ["squarecb", "epsilon_greedy", "softmax", "ucb"])
def test_each_logged_probability_is_the_one_the_choice_was_drawn_with(strategy: str) -> None:
    head = OnlineHead(OnlineConfig())
    # gamma_exponent 0: squarecb's distribution does not narrow with t, so it is still for the count below
    c = chooser(head, seed=42, strategy=strategy, epsilon=0.2, temperature=0.5, gamma_exponent=0.0)
    mirror = random.Random(42)  # the chooser's draws, replayed
    world = random.Random(1)
    for ctx in contexts(300, seed=2):
        choice = c.choose("agent", ctx, ["a", "b", "c"])
        assert exploring.sample(choice.probs, mirror.random()) == choice.index
        assert choice.prob == choice.probs[choice.index] and abs(sum(choice.probs) - 1.0) < 1e-9
        c.learn(choice.id, world.random() + (0.5 if choice.action == "b" else 0.0))
    # with the head held still, the frequencies of many draws agree with the logged probabilities
    ctx = {"task": "code", "difficulty": 0.5, "user": "u1"}
    counts = np.zeros(3)
    logged = None
    for _ in range(30_000):
        choice = c.choose("agent", ctx, ["a", "b", "c"])
        counts[choice.index] += 1
        logged = choice.probs if logged is None else logged
        assert choice.probs == logged
    p = np.array(logged)
    kept = p > 0
    expected = counts.sum() * p[kept]
    stat = float(((counts[kept] - expected) ** 2 / expected).sum())
    assert stat < CHI2_999[max(int(kept.sum()) - 1, 2)], (stat, counts, p)


def test_apprentice_mode_serves_the_agents_own_choice_and_counts_agreement() -> None:
    """The agent's own default is right for code and wrong for chat; the head learns both beside it."""
    best = {"code": "large", "chat": "small"}
    head = OnlineHead(OnlineConfig())
    c = chooser(head, strategy="epsilon_greedy", epsilon=0.3, epsilon_min=0.0)
    rng = random.Random(2)
    agreed = {"code": 0, "chat": 0}
    for i in range(800):
        task = rng.choice(["code", "chat"])
        before = dict(c.apprentice)
        choice = c.choose("agent", {"task": task}, ["small", "large"], default="large")
        assert choice.strategy == "default" and choice.model_version is None
        assert choice.probs == pytest.approx([0.15, 0.85])  # the default, and epsilon's share elsewhere
        if i >= 400:
            agreed[task] += c.apprentice["agreed"] - before["agreed"]
        c.learn(choice.id, 1.0 if choice.action == best[task] else 0.0)
    # the learned policy agrees with the agent where the agent is right, and not where it is wrong
    assert agreed["code"] > 0.9 * 200 * 0.9 and agreed["chat"] < 20
    assert c.apprentice["compared"] >= 795
    with pytest.raises(ValueError, match="not among the actions"):
        c.choose("agent", {"task": "code"}, ["small", "large"], default="medium")


def test_decisions_without_an_outcome_teach_the_default_reward_once_their_wait_window_passes() -> None:
    """Only clicks are reported (reward 1), as many agents do; no click means rewards.default (0).
    Learning the clicks alone, the head would favour whichever action it tried most."""
    rates = {"a": 0.35, "b": 0.5}
    clock = [0.0]
    head = OnlineHead(OnlineConfig(), rewards=lambda agent: RewardConfig(wait_window=5.0, default=0.0), clock=lambda: clock[0])
    c = Chooser(None, lambda agent, manifest: ExplorationConfig(), 3, head)
    rng = random.Random(6)
    chose_b = []
    for _ in range(3000):
        choice = c.choose("agent", {"k": 1}, ["a", "b"])
        chose_b.append(choice.action == "b")
        if rng.random() < rates[choice.action]:
            c.learn(choice.id, 1.0)
        clock[0] += 0.1
        head.expire()
    assert sum(chose_b[-1000:]) > 800
    assert head.stats()["defaults"] > 1000


def test_the_default_is_not_learned_before_the_wait_window_ends_nor_after_an_outcome() -> None:
    clock = [0.0]
    head = OnlineHead(OnlineConfig(), rewards=lambda agent: RewardConfig(wait_window=30.0, default=-1.0), clock=lambda: clock[0])
    x = head.features({"k": 1})
    head.remember("waits", "agent", "a", x, None)
    head.remember("rewarded", "agent", "a", x, None)
    assert head.learn("rewarded", 1.0)
    clock[0] = 29.0
    assert head.expire() == 0
    clock[0] = 31.0
    assert head.expire() == 1
    assert head.stats()["defaults"] == 1 and head.stats()["updates"] == 2 and head.stats()["pending"] == 0


def test_a_reward_that_is_not_a_finite_number_teaches_nothing() -> None:
    head = OnlineHead(OnlineConfig())
    c = Chooser(None, lambda agent, manifest: ExplorationConfig(), 1, head)
    choice = c.choose("agent", {"k": 1}, ["a", "b"])
    assert not c.learn(choice.id, float("nan")) and not c.learn(choice.id, float("inf"))
    assert c.learn(choice.id, 1.0)  # still remembered: the bad reward did not consume it
    c.choose("agent", {"k": 1}, ["a", "b"])  # and deciding still works


def test_a_default_action_the_agent_does_not_offer_leaves_the_head_in_charge() -> None:
    head = OnlineHead(OnlineConfig())
    c = chooser(head, strategy="epsilon_greedy", epsilon=0.1, default_action="elsewhere")
    for _ in range(100):
        choice = c.choose("agent", {"k": 1}, ["a", "b"])
        c.learn(choice.id, 1.0 if choice.action == "b" else 0.0)
    assert c.choose("agent", {"k": 1}, ["a", "b"]).probs == pytest.approx([0.05, 0.95])


def test_beside_a_model_the_head_learns_how_far_to_trust_its_scores() -> None:
    """The model's score is one more input of the head, its weight learned from a prior of 0. The
    reward follows something the context does not show the head: a model that knows it (its
    score is the expected reward) is trusted, weight near 1; one whose scores are noise is not,
    weight near 0, and the head's means are then the rewards' average."""
    rng = random.Random(3)
    ids = ["small", "large"]
    for kind in ("right", "noise"):
        head = OnlineHead(OnlineConfig())
        head.follow("v0001")
        for i in range(800):
            hidden, action = rng.random(), rng.choice(ids)
            score = hidden if kind == "right" else rng.random()
            head.remember(f"d{i}", "agent", action, head.features({"task": "code"}), score)
            head.learn(f"d{i}", hidden + rng.gauss(0, 0.1))
        weight = [head._arms["agent", a].state.weights[-1] for a in ids]
        x = head.features({"task": "code"})
        if kind == "right":
            assert min(weight) > 0.9
            assert head.means("agent", x, ids, [0.2, 0.8]) == pytest.approx([0.2, 0.8], abs=0.05)
        else:
            assert max(abs(w) for w in weight) < 0.1
            assert head.means("agent", x, ids, [0.2, 0.8]) == pytest.approx([0.5, 0.5], abs=0.06)


def test_beside_a_model_the_posterior_over_inputs_never_seen_is_model_priors() -> None:
    head = OnlineHead(OnlineConfig(prior=1.0, model_prior=100.0))
    x = head.features({"task": "chat"})
    (alone,) = head.spread("agent", x, ["small"])
    (beside,) = head.spread("agent", x, ["small"], [0.0])
    assert beside == pytest.approx(alone / 10)


@pytest.mark.parametrize(
    "context, actions, error, match",
    [
        ({"task": "code"}, [], ValueError, "actions is empty"),
        ("code", ["a", "b"], TypeError, "context must be a dict of keys to values, not str"),
        ({"task": "code"}, "small,large", TypeError, "actions must be a list .* not str"),
        ({"task": "code"}, ["a", {"id": "a"}], ValueError, "action 'a' is offered twice"),
        ({"task": "code"}, [1, 2], TypeError, "action 1 is neither an id .str., a dict with an 'id', nor an Action"),
        ({"task": "code"}, ["a", {"name": "b"}], TypeError, "action {'name': 'b'} is neither an id"),
        ({"task": "code"}, [SimpleNamespace(id="a")], TypeError, "action namespace.id='a'. is neither an id"),
    ],
)
def test_a_malformed_decision_is_refused_with_what_is_wrong(context, actions, error, match) -> None:
    """An in-process agent's arguments are not decoded from a frame: each is checked as it comes,
    before anything is chosen or logged (a string of actions once came back as one of its letters)."""
    c = chooser(OnlineHead(OnlineConfig()))
    for choose in (lambda: c.choose("agent", context, actions), lambda: c.choose_slate("agent", context, actions, 1),
                   lambda: c.choose_many([("agent", context, actions, None, None)]),
                   lambda: c.score("agent", context, actions), lambda: c.explain("agent", context, actions)):
        with pytest.raises(error, match=match):
            choose()
    assert c._decided == 0
