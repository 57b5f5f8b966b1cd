"""The online head's updates made together (``_Arm.update_many``, ``OnlineHead.learn_many``,
``later``/``apply``, ``absorb_many``) leave the state the same updates made one by one leave, to
float tolerance; and a policy's rewards are learned by its background thread. (What they cost is
measured by ``python -m bench.online``.)"""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from conftest import wait_for
from reflexd.client.policy import Policy
from reflexd.config import OnlineConfig
from reflexd.deciding import online
from reflexd.deciding.online import OnlineHead, _Arm, learned
from test_online_update_cost import sparse_contexts

BOTH = ["left", "right"]


def dense_covariance(arm: _Arm, d: int) -> np.ndarray:
    """The covariance over all ``d`` inputs' rows: arms that saw inputs in another order hold them in other rows."""
    out = np.zeros((d, d))
    out[np.ix_(arm.features, arm.features)] = arm.covariance()
    return out


@pytest.mark.parametrize(("keys", "prior", "n"), [(3, 1.0, 400), (10, 2.0, 700), (40, 0.5, 900)])
def test_updates_made_together_equal_the_same_updates_one_by_one(keys: int, prior: float, n: int) -> None:
    d = 130
    xs = sparse_contexts(n, d, keys, seed=keys)
    targets = np.random.default_rng(1).normal(0.4, 1.0, size=n)
    together, one_by_one = _Arm(d), _Arm(d)
    # every kind of batch: one, fewer than the rows kept, enough to fold them, more than the buffer
    sizes = [1, 2, 5, online._DEFERRED - 1, online._DEFERRED, 3 * online._DEFERRED, 7, 1, 64]
    i = step = 0
    while i < n:
        k = sizes[step % len(sizes)]
        together.update_many(xs[i : i + k], targets[i : i + k], prior)
        for x, y in zip(xs[i : i + k], targets[i : i + k]):
            one_by_one.update(x, float(y), prior)
        i, step = i + k, step + 1
        covariances = dense_covariance(together, d), dense_covariance(one_by_one, d)
        np.testing.assert_allclose(*covariances, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(together.state.weights, one_by_one.state.weights, rtol=1e-9, atol=1e-12)
        assert together.residual == pytest.approx(one_by_one.residual, rel=1e-9)
        assert together.n == one_by_one.n and together.state.noise == pytest.approx(one_by_one.state.noise, rel=1e-9)
    # and both are the closed-form ridge regression
    theta = np.linalg.solve(xs.T @ xs + prior * np.eye(d), xs.T @ targets)
    np.testing.assert_allclose(together.state.weights, theta, rtol=1e-7, atol=1e-9)


def test_a_state_once_read_is_not_changed_by_later_updates_made_together() -> None:
    d = 40
    xs = sparse_contexts(120, d, 6, seed=4)
    arm = _Arm(d)
    arm.update_many(xs[:20], np.ones(20), 1.0)
    arm.update_many(xs[20:23], np.ones(3), 1.0)  # rows kept beside the base
    state = arm.state
    assert state.r == 3
    before = [a.copy() if isinstance(a, np.ndarray) else a for a in state]
    visible = state.down[: state.r].copy()
    for start in (23, 26, 40, 90):  # rows appended past this state's r, then folded into new bases
        arm.update_many(xs[start : start + 3 + start % 7], np.zeros(3 + start % 7), 1.0)
    for kept, now in zip(before, state):
        if isinstance(kept, np.ndarray) and now is not state.down:
            np.testing.assert_array_equal(kept, now)
    np.testing.assert_array_equal(state.down[: state.r], visible)


def remembered(head: OnlineHead, rng: np.random.Generator, n: int, model: str | None = None) -> list[str]:
    ids = []
    for i in range(n):
        x = head.features({"task": ["code", "chat", "mail"][i % 3], "user": f"u{rng.integers(20)}"})
        score = None if model is None else float(rng.normal(0.5, 0.2))
        head.remember(f"d{i}", "a", BOTH[i % 2], x, score, source=i, model=model)
        ids.append(f"d{i}")
    return ids


def test_learn_many_learns_what_learn_learns_one_by_one() -> None:
    rng = np.random.default_rng(3)
    heads = [OnlineHead(OnlineConfig(warm_rows=50)) for _ in range(2)]
    shared: list[list[tuple]] = [[], []]
    for head, out in zip(heads, shared):
        head.on_update = lambda *update, out=out: out.append(update[:3])
    ids = remembered(heads[0], np.random.default_rng(3), 60)
    rewards = [(decision, float(r)) for decision, r in zip(ids, rng.normal(size=60))]
    remembered(heads[1], np.random.default_rng(3), 60)
    # a reward that is not a number, and a decision no head remembers, are not learned
    rewards += [("d59", float("nan")), ("unknown", 1.0)]
    assert heads[0].learn_many(rewards) == 60
    assert [heads[1].learn(decision, reward) for decision, reward in rewards].count(True) == 60
    probe = heads[0].features({"task": "chat", "user": "u4"})
    assert heads[0].means("a", probe, BOTH) == pytest.approx(heads[1].means("a", probe, BOTH), abs=1e-12)
    assert heads[0].spread("a", probe, BOTH) == pytest.approx(heads[1].spread("a", probe, BOTH), rel=1e-9)
    assert heads[0].stats() == heads[1].stats()
    assert sorted(shared[0]) == sorted(shared[1]) and len(shared[0]) == 60
    assert [r[:2] + r[3:] for r in heads[0]._recent] == [r[:2] + r[3:] for r in heads[1]._recent]


def test_a_reward_handed_on_for_later_is_learned_at_the_next_apply() -> None:
    head = OnlineHead(OnlineConfig())
    ids = remembered(head, np.random.default_rng(4), 30)
    probe = head.features({"task": "code", "user": "u1"})
    for decision in ids:
        head.later(decision, 1.0)
    assert head.means("a", probe, ["left"]) == [0.0] and head.updates == 0 and head.waiting == 30
    assert head.apply() == 30
    assert head.updates == 30 and head.waiting == 0 and head.means("a", probe, ["left"])[0] > 0.5
    assert head.apply() == 0  # nothing more waiting


def test_learn_many_beside_a_model_learns_only_the_decisions_made_beside_it() -> None:
    head = OnlineHead(OnlineConfig())
    head.follow("v0001")
    rng = np.random.default_rng(5)
    beside = remembered(head, rng, 20, model="v0001")
    before = [f"old{i}" for i in range(10)]
    for decision in before:  # decisions made beside the last model: their scores were another model's
        head.remember(decision, "a", "left", head.features({"task": "code"}), 0.3, model="v0000")
    assert head.learn_many([(d, 1.0) for d in beside + before]) == 20
    assert head.updates == 20


def test_an_outcome_naming_another_agent_teaches_nothing_and_leaves_the_decision_waiting() -> None:
    head = OnlineHead(OnlineConfig())
    for agent in ("alpha", "beta"):
        head.remember(f"{agent}-1", agent, "left", head.features({"task": "code"}), None)
    # beta names alpha's decision: not its reward; then each names its own
    assert head.learn_many([("alpha-1", 1.0)], ["beta"]) == 0 and head.stats()["pending"] == 2
    assert head.learn_many([("alpha-1", 1.0), ("beta-1", 0.0)], ["alpha", "beta"]) == 2
    assert head.updates == 2


def test_a_reused_decision_id_stays_the_first_decisions_as_in_the_store() -> None:
    head = OnlineHead(OnlineConfig())
    head.remember("d", "alpha", "left", head.features({"task": "code"}), None)
    head.remember("d", "beta", "right", head.features({"task": "chat"}), None)  # dead-lettered by the store
    assert head.learn_many([("d", 1.0)], ["beta"]) == 0
    assert head.learn_many([("d", 1.0)], ["alpha"]) == 1 and head.prior_mean("alpha", "left") is not None
    assert head.prior_mean("beta", "right") is None


def test_absorb_many_learns_what_absorb_learns_one_by_one() -> None:
    teacher = OnlineHead(OnlineConfig())
    updates = []
    teacher.on_update = lambda agent, action, decision, x, reward, beside: updates.append(
        learned(teacher, agent, action, decision, x, reward, beside))
    rng = np.random.default_rng(6)
    ids = remembered(teacher, rng, 40)
    teacher.learn_many([(d, float(r)) for d, r in zip(ids, rng.normal(size=40))])
    # an input the head does not have; corrections to another model's scores
    bad = [
        msgspec.structs.replace(updates[0], index=[10**6], value=[1.0]),
        msgspec.structs.replace(updates[1], base="v0009"),
    ]
    together, one_by_one = OnlineHead(OnlineConfig()), OnlineHead(OnlineConfig())
    assert together.absorb_many(updates + bad) == 40
    absorbed = [one_by_one.absorb(u.agent, u.action, u.base, u.beside, u.index, u.value, u.target) for u in updates]
    absorbed += [one_by_one.absorb(u.agent, u.action, u.base, u.beside, u.index, u.value, u.target) for u in bad]
    assert absorbed.count(True) == 40
    probe = teacher.features({"task": "mail", "user": "u2"})
    for head in (together, one_by_one):
        assert head.means("a", probe, BOTH) == pytest.approx(teacher.means("a", probe, BOTH), abs=1e-12)
        assert head.absorbed == 40


def test_an_arm_dropped_and_made_again_within_a_batch_is_made_where_one_by_one_makes_it() -> None:
    """max_arms drops the least recent arm while a batch is learned: made again within it, it
    starts from the mean before its reward, as one by one, not from 0."""
    heads = [OnlineHead(OnlineConfig(max_arms=2)) for _ in range(2)]
    before = [("up", 10.0), ("left", 11.0)]
    batch = [("right", 10.5), ("up", 10.2), ("right", 10.9), ("up", 10.4)]
    for head in heads:
        for i, (action, reward) in enumerate(before):
            head.remember(f"b{i}", "a", action, head.features({"task": "code", "i": i}), None)
            head.learn(f"b{i}", reward)
        for i, (action, _) in enumerate(batch):
            head.remember(f"d{i}", "a", action, head.features({"task": "chat", "i": i}), None)
    together, one_by_one = heads
    assert together.learn_many([(f"d{i}", reward) for i, (_, reward) in enumerate(batch)]) == 4
    for i, (_, reward) in enumerate(batch):
        assert one_by_one.learn(f"d{i}", reward)
    assert list(together._arms) == list(one_by_one._arms) == [("a", "right"), ("a", "up")]
    # "up" was dropped when "right" was made, and made again at the mean of the three rewards before it
    assert together.prior_mean("a", "up") == one_by_one.prior_mean("a", "up") == pytest.approx((10.0 + 11.0 + 10.5) / 3)
    probe = together.features({"task": "chat", "i": 9})
    ids = ["up", "right", "left"]
    assert together.means("a", probe, ids) == pytest.approx(one_by_one.means("a", probe, ids), abs=1e-9)


def test_a_process_that_makes_an_arm_on_an_absorbed_update_makes_it_at_the_senders_prior_mean() -> None:
    """Processes that learned different rewards of an agent before have different mean rewards:
    an arm made on another's update starts where the sender's did, so both learn the same arm."""
    teacher, receiver = OnlineHead(OnlineConfig()), OnlineHead(OnlineConfig())
    updates = []
    teacher.on_update = lambda agent, action, decision, x, reward, beside: updates.append(
        learned(teacher, agent, action, decision, x, reward, beside))
    for head, reward in ((teacher, 0.9), (receiver, 0.1)):  # each a reward of its own for "up" first
        head.remember("own", "a", "up", head.features({"task": "code"}), None)
        head.learn("own", reward)
    updates.clear()
    ids = remembered(teacher, np.random.default_rng(8), 30)
    teacher.learn_many([(d, 1.0) for d in ids])
    made_at = {u.action: u.prior_mean for u in updates}
    assert made_at == {"left": 0.9, "right": pytest.approx((0.9 + 1.0) / 2)}  # the mean when each first learned
    assert receiver.absorb_many(updates) == 30
    probe = teacher.features({"task": "chat", "user": "u2"})
    assert receiver.means("a", probe, BOTH) == pytest.approx(teacher.means("a", probe, BOTH), abs=1e-12)
    # without the sender's prior mean, the receiver's own: its arm is another
    alone = OnlineHead(OnlineConfig())
    alone.remember("own", "a", "up", alone.features({"task": "code"}), None)
    alone.learn("own", 0.1)
    stripped = [msgspec.structs.replace(u, prior_mean=None) for u in updates]
    assert alone.absorb_many(stripped) == 30
    assert alone.prior_mean("a", "left") == 0.1
    assert alone.means("a", probe, BOTH) != pytest.approx(teacher.means("a", probe, BOTH), abs=1e-6)
    # a prior mean that is not a number teaches nothing
    assert not alone.absorb("a", "down", None, False, [0], [1.0], 1.0, prior_mean=float("inf"))


def test_a_policy_learning_in_batches_learns_its_rewards_on_its_background_thread(tmp_path) -> None:
    """With ``batch_learning``, and no daemon at all: the head learns within the sender's interval
    (or at ``flush``). Without it, at once."""
    at_once = Policy("router", socket=tmp_path / "none.sock", models=tmp_path / "models")
    try:
        at_once.reward(at_once.decide({"task": "code"}, ["a", "b", "c"]).id, 1.0)
        assert at_once.stats()["online"]["updates"] == 1
        with pytest.raises(TypeError, match="decision_id must be the str id a decision returned, not NoneType"):
            at_once.reward(None, 1.0)  # type: ignore[arg-type]
        assert at_once.stats()["enqueued"] == 2  # the decision and its reward, not the refused one
    finally:
        at_once.close(timeout=0.01)
    policy = Policy("router", socket=tmp_path / "none.sock", models=tmp_path / "models", batch_learning=True)
    try:
        choices = [policy.decide({"task": "code"}, ["a", "b", "c"]) for _ in range(20)]
        for choice in choices:
            policy.reward(choice.id, 1.0)
        wait_for(lambda: policy.stats()["online"]["updates"] == 20, 10, "the rewards learned by the sender thread")
        assert policy.stats()["online"]["waiting"] == 0
        more = policy.decide({"task": "code"}, ["a", "b", "c"])
        policy.reward(more.id, 0.0)
        assert not policy.flush(timeout=0.01)  # nothing reaches a daemon that is not there
        assert policy.stats()["online"]["updates"] == 21  # but flush learned the reward at once
    finally:
        policy.close(timeout=0.01)


def test_relearning_beside_a_new_model_equals_learning_the_same_rewards_beside_it_one_by_one() -> None:
    """100 rewards of one action, relearned in steps of at most ``_MOST``, the last one short."""
    rng = np.random.default_rng(7)
    rows = [({"task": ["code", "chat"][i % 2], "user": f"u{rng.integers(30)}"}, float(rng.normal(0.5, 0.3)))
            for i in range(100)]
    scores = [0.1 + 0.008 * i for i in range(100)]
    relearned, reference = OnlineHead(OnlineConfig(warm_rows=200)), OnlineHead(OnlineConfig(warm_rows=200))
    for i, (context, reward) in enumerate(rows):
        relearned.remember(f"d{i}", "a", "left", relearned.features(context), None, source=i)
        relearned.learn(f"d{i}", reward)
    relearned.follow("v0001", lambda sources: [scores[i] for i in sources])
    reference.follow("v0001")
    for i, (context, reward) in enumerate(rows):  # the same rewards, beside the model from the start
        reference.remember(f"d{i}", "a", "left", reference.features(context), scores[i])
        reference.learn(f"d{i}", reward)
    assert relearned.warmed == 100 and relearned._arms["a", "left"].n == reference._arms["a", "left"].n == 100
    probe = relearned.features({"task": "chat", "user": "u3"})
    means = [head.means("a", probe, ["left"], [0.4]) for head in (relearned, reference)]
    spreads = [head.spread("a", probe, ["left"], [0.4]) for head in (relearned, reference)]
    assert means[0] == pytest.approx(means[1], abs=1e-12) and spreads[0] == pytest.approx(spreads[1], rel=1e-9)


def test_learning_together_keeps_the_arms_learning_one_by_one_keeps() -> None:
    """``max_arms`` drops the arm rewarded least recently, whether rewards come one by one or together."""
    heads = [OnlineHead(OnlineConfig(max_arms=3)) for _ in range(2)]
    order = ["A", "B", "C", "D", "A", "A", "A", "A"]  # A's last reward is the newest: it stays
    for head in heads:
        for i, action in enumerate(order):
            head.remember(f"d{i}", "a", action, head.features({"k": str(i)}), None)
    heads[0].learn_many([(f"d{i}", 1.0) for i in range(len(order))])
    for i in range(len(order)):
        heads[1].learn(f"d{i}", 1.0)
    assert list(heads[0]._arms) == list(heads[1]._arms) == [("a", "C"), ("a", "D"), ("a", "A")]


def test_a_reward_handed_on_is_learned_before_its_decision_expires() -> None:
    """``expire`` first learns what ``later`` was handed: else the default would be learned for a
    decision whose reward came in time, and the reward then dropped."""
    now = [0.0]
    rewards = type("Rewards", (), {"wait_window": 10.0, "default": 0.0})()  # an agent's rewards settings
    head = OnlineHead(OnlineConfig(), rewards=lambda agent: rewards, clock=lambda: now[0])
    x = head.features({"task": "code"})
    head.remember("d1", "a", "left", x, None)
    head.later("d1", 1.0)
    now[0] = 11.0  # its wait window has ended
    assert head.expire() == 0 and head.defaults == 0 and head.updates == 1
    assert head.means("a", x, ["left"])[0] > 0.3
