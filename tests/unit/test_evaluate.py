"""Evaluating any policy (``reflexd.learning.evaluate``): naming policies, the numbers reported beside
each estimate (effective sample size, agreement, bounds) and the whole evaluation on known truth."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from reflexd.config import ExplorationConfig
from reflexd.errors import EvaluationError, PolicySpecError
from reflexd.features import FeatureSpec
from reflexd.learning import evaluate as ev
from reflexd.learning import ope
from reflexd.learning.dataset import from_records
from reflexd.learning.gate import target_probs
from reflexd.manifest import build_manifest
from reflexd.wire.protocol import probability_tables

SPEC = FeatureSpec(context_dim=8, action_dim=8, seed=0)

# ---- naming a policy -------------------------------------------------------------------------


def test_each_form_of_policy_is_read() -> None:
    assert ev.parse_policy("v0003") == ev.PolicySpec(text="v0003", kind="model", version="v0003")
    assert ev.parse_policy(" live ").version == "live"
    assert ev.parse_policy("action:large") == ev.PolicySpec(text="action:large", kind="action", action="large")
    assert ev.parse_policy("action:a:b").action == "a:b"  # everything after the first colon
    assert ev.parse_policy("file:/tmp/p.ndjson").path == "/tmp/p.ndjson"
    found = ev.parse_policy("v0012@strategy=softmax, temperature=0.5")
    assert (found.kind, found.version, found.settings) == ("exploration", "v0012", (("strategy", "softmax"), ("temperature", "0.5")))


@pytest.mark.parametrize(
    "text, message",
    [
        ("router", "not a policy; expected a model version (v0003), live, action:ID, file:PATH"),
        ("v3", "not a policy"),
        ("action:", "action: needs an action id"),
        ("file:", "file: needs a path"),
        ("v0003@", "key=value pairs"),
        ("v0003@temperature", "key=value pairs"),
        ("v0003@temprature=0.5", "'temprature' is not an exploration setting; expected one of strategy, epsilon"),
        ("v0003@epsilon=0.1,epsilon=0.2", "epsilon is given twice"),
    ],
)
def test_a_policy_that_cannot_be_read_says_why(text: str, message: str) -> None:
    with pytest.raises(PolicySpecError, match=message.replace("(", r"\(").replace(")", r"\)")) as raised:
        ev.parse_policy(text)
    assert raised.value.code == "policy_spec" and raised.value.policy == text.strip()


def test_exploration_settings_are_laid_over_the_models_own() -> None:
    base = ExplorationConfig(strategy="squarecb", gamma=20.0, epsilon=0.2, epsilon_min=0.05)
    cfg = ev.apply_settings("p", base, [("strategy", "softmax"), ("temperature", "0.5")])
    assert (cfg.strategy, cfg.temperature, cfg.gamma, cfg.epsilon) == ("softmax", 0.5, 20.0, 0.2)
    assert ev.apply_settings("p", base, [("default_action", "none")]).default_action is None


@pytest.mark.parametrize(
    "settings, message",
    [
        ([("epsilon", "lots")], "epsilon: 'lots' is not a number"),
        ([("epsilon", "nan")], "epsilon: 'nan' is not a finite number"),
        ([("epsilon", "2")], "exploration epsilon: Expected `float` <= 1"),
        ([("temperature", "0")], "exploration temperature: Expected `float` > 0"),
        ([("strategy", "boltzmann")], "'boltzmann' is not an exploration strategy; expected one of epsilon_greedy"),
        ([("epsilon", "0.001")], r"epsilon_min \(0.01\) must not exceed epsilon \(0.001\): set epsilon_min too"),
    ],
)
def test_exploration_settings_are_checked_as_the_config_file_is(settings: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(PolicySpecError, match=message):
        ev.apply_settings("v0003@x", ExplorationConfig(strategy="epsilon_greedy"), settings)


def test_a_setting_the_strategy_does_not_read_is_refused_rather_than_ignored() -> None:
    squarecb = ExplorationConfig(strategy="squarecb")
    with pytest.raises(PolicySpecError, match="epsilon changes nothing under squarecb, which reads gamma, gamma_exponent"):
        ev.apply_settings("v0003@epsilon=0.5", squarecb, [("epsilon", "0.5")])
    assert ev.apply_settings("p", squarecb, [("strategy", "epsilon_greedy"), ("epsilon", "0.5")]).epsilon == 0.5
    assert ev.apply_settings("p", squarecb, [("gamma", "20"), ("default_action", "a")]).gamma == 20.0
    # softmax and thompson read a floor with no epsilon over it: one above the model's epsilon is theirs to have
    for strategy in ("softmax", "thompson"):
        floor = [("strategy", strategy), ("epsilon_min", "0.2")]
        assert ev.apply_settings("p", ExplorationConfig(epsilon=0.1), floor).epsilon_min == 0.2


def test_on_a_line_whose_agents_explore_differently_a_setting_is_refused_only_where_none_reads_it() -> None:
    own = {"left": ExplorationConfig(strategy="squarecb"), "right": ExplorationConfig(strategy="epsilon_greedy", epsilon=0.2)}
    configs = ev.apply_to_agents("v0003@epsilon=0.5", own.__getitem__, ["left", "right", "left"], [("epsilon", "0.5")])
    assert sorted(configs) == ["left", "right"]
    assert configs["right"].epsilon == 0.5 and configs["left"] == ExplorationConfig(strategy="squarecb", epsilon=0.5)
    with pytest.raises(
        PolicySpecError,
        match="temperature changes nothing under squarecb, which reads gamma, gamma_exponent; nor under epsilon_greedy, which reads",
    ):
        ev.apply_to_agents("v0003@temperature=0.5", own.__getitem__, ["left", "right"], [("temperature", "0.5")])
    # one agent alone is refused as before
    with pytest.raises(PolicySpecError, match="epsilon changes nothing under squarecb"):
        ev.apply_to_agents("v0003@epsilon=0.5", own.__getitem__, ["left"], [("epsilon", "0.5")])


# ---- the numbers beside each estimate -----------------------------------------------------------


def test_effective_sample_size() -> None:
    assert ev.effective_sample_size(np.ones(50)) == pytest.approx(50.0)
    assert ev.effective_sample_size(np.array([0.0, 0.0, 7.0, 0.0])) == pytest.approx(1.0)
    # (1 + 2 + 3)² / (1 + 4 + 9) = 36 / 14
    assert ev.effective_sample_size(np.array([1.0, 2.0, 3.0])) == pytest.approx(36 / 14)
    assert ev.effective_sample_size(np.zeros(5)) == 0.0


def test_agreement_counts_the_likeliest_valid_action_first_of_ties() -> None:
    pi = np.array([[0.7, 0.3, 0.0], [0.5, 0.5, 0.0], [0.1, 0.2, 0.0], [0.2, 0.8, 0.0]])
    mask = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 1]], dtype=bool)
    chosen = np.array([0, 1, 1, 1])
    # row 0 agrees; row 1 ties, the first (0) is likeliest: disagrees; row 2 agrees; row 3 agrees
    assert ev.agreement(pi, mask, chosen) == pytest.approx(0.75)
    # padding never wins, even with the largest value
    assert ev.agreement(np.array([[0.1, 0.0, 5.0]]), np.array([[1, 1, 0]], dtype=bool), np.array([0])) == 1.0


def test_an_interval_inside_the_rewards_is_not_clipped() -> None:
    terms = np.array([0.2, 0.4, 0.6, 0.8] * 25)
    found = ev.bounded(terms, 0.95, 0.0, 1.0)
    assert not found.clipped
    assert (found.bounded_lower, found.bounded_upper) == (found.lower, found.upper)
    raw = ope.estimate(terms, 0.95)
    assert (found.value, found.stderr, found.lower, found.upper) == (raw.value, raw.stderr, raw.lower, raw.upper)


def test_an_interval_reaching_outside_the_rewards_is_flagged_and_bounded() -> None:
    # DR terms on 0/1 rewards can be negative: the raw interval goes below 0
    terms = np.array([-0.9, 0.1, 0.0, 0.05, -0.4, 0.2])
    found = ev.bounded(terms, 0.95, 0.0, 1.0)
    assert found.clipped and found.lower < 0.0
    assert found.bounded_lower == 0.0 and found.bounded_upper == found.upper
    above = ev.bounded(np.array([3.0, 0.0, 2.0, 0.5]), 0.95, 0.0, 1.0)
    assert above.clipped and above.upper > 1.0 and above.bounded_upper == 1.0
    # wholly outside: bounded to the nearest edge, never inverted
    outside = ev.bounded(np.array([5.0, 5.1, 4.9]), 0.95, 0.0, 1.0)
    assert (outside.bounded_lower, outside.bounded_upper) == (1.0, 1.0) and outside.clipped


# ---- policies as distributions -------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["squarecb", "epsilon_greedy", "softmax", "ucb"])
@pytest.mark.parametrize("t", [0, 37])
def test_built_in_exploration_at_once_equals_the_plugins_row_by_row(strategy: str, t: int) -> None:
    rng = np.random.default_rng(3)
    n = 400
    scores = rng.normal(size=(n, 5))
    spread = rng.random((n, 5))
    mask = rng.random((n, 5)) < 0.7
    mask[:, 0] = True
    mask[::9] = [True, False, False, False, False]  # single-action rows
    scores[::5, 2] = scores[::5, 0]  # ties
    cfg = ExplorationConfig(strategy=strategy, decay=0.05, temperature=0.3, epsilon=0.2, epsilon_min=0.02, ucb_c=2.0)
    fast = ev.exploration_probs(cfg, scores, spread, mask, t)
    np.testing.assert_allclose(fast, target_probs(cfg, scores, spread, mask, t), rtol=0, atol=1e-12)
    assert (fast[~mask] == 0).all()


def records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """A log of two agents choosing among a, b, c (some decisions offer only a and b)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        actions = ["a", "b", "c"] if i % 4 else ["a", "b"]
        p = np.full(len(actions), 1.0 / len(actions))
        k = int(rng.choice(len(actions), p=p))
        out.append(
            {
                "id": f"d{i}", "agent": "left" if i % 3 else "right", "received_at": float(i),
                "context": {"x": float(rng.normal()), "kind": ["u", "v"][i % 2]},
                "actions": actions, "chosen": actions[k], "prob": float(p[k]),
                "reward": float(rng.random() < (0.8 if actions[k] == "b" else 0.3)),
            }
        )
    return out


def test_a_constant_action_is_one_on_that_action_and_must_be_offered_everywhere() -> None:
    batch = from_records(records(12), SPEC)
    pi = ev.constant_probs("action:b", "b", batch.action_ids, batch.mask)
    assert (pi.sum(axis=1) == 1).all() and (pi[:, 1] == 1).all()
    with pytest.raises(EvaluationError, match=r"action:c: 3 of 12 decisions in the window did not offer 'c'") as raised:
        ev.constant_probs("action:c", "c", batch.action_ids, batch.mask)
    assert raised.value.code == "evaluation"


def write_lines(path: Path, lines: list[Any]) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def table(path: str) -> dict[str, Any]:
    """What reflexd evaluate and Policy.evaluate send for ``file:PATH``."""
    return probability_tables([f"file:{path}"])[f"file:{path}"]


def test_a_file_gives_each_decisions_distribution(tmp_path: Path) -> None:
    batch = from_records(records(6), SPEC)
    lines = [{"id": f"d{i}", "probs": {"a": 0.25, "b": 0.75}} for i in range(6)]
    lines.insert(2, {"id": "elsewhere", "probs": {"z": 1.0}})  # another window's decision: ignored
    pi = ev.file_probs("file:p", table(write_lines(tmp_path / "p.ndjson", lines + [""])), batch.ids, batch.action_ids, batch.mask)
    np.testing.assert_array_equal(pi[:, :2], np.tile([0.25, 0.75], (6, 1)))
    assert (pi[:, 2] == 0).all()


@pytest.mark.parametrize(
    "lines, error, message",
    [
        ([{"id": "d0", "probs": {"a": 1.0}}], EvaluationError, r"no probabilities for 5 of the 6 decisions in the window \(the first: 'd1'\)"),
        ([{"id": "d0", "probs": {"a": 0.5, "b": 0.4}}], PolicySpecError, r"decision 'd0': probabilities sum to 0.9, not 1"),
        ([{"id": "d0", "probs": {"c": 1.0}}], PolicySpecError, r"decision 'd0' did not offer 'c'"),
        ([{"id": "d1", "probs": {"a": -0.5, "b": 1.5}}], PolicySpecError, r"the probability of 'a' must be a finite number ≥ 0"),
    ],
)
def test_a_file_that_does_not_cover_the_window_is_refused(tmp_path: Path, lines: list[Any], error: type, message: str) -> None:
    batch = from_records(records(6), SPEC)
    with pytest.raises(error, match=message):
        ev.file_probs("file:p", table(write_lines(tmp_path / "p.ndjson", lines)), batch.ids, batch.action_ids, batch.mask)


@pytest.mark.parametrize(
    "lines, message",
    [
        (["not json"], r"p.ndjson:1: not a JSON object"),
        ([{"id": "d0"}], r'p.ndjson:1: needs "id" \(a decision id\) and "probs"'),
        ([{"id": "d1", "probs": {"a": 1}}, {"id": "d1", "probs": {"b": 1}}], r"p.ndjson:2: decision 'd1' has a line already"),
    ],
)
def test_the_sender_names_the_line_of_a_file_it_cannot_read(tmp_path: Path, lines: list[Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        table(write_lines(tmp_path / "p.ndjson", lines))


def test_a_missing_file_is_named() -> None:
    with pytest.raises(ValueError, match="cannot read /nonexistent/p.ndjson: No such file"):
        table("/nonexistent/p.ndjson")


def test_the_daemon_never_opens_a_path_a_peer_names() -> None:
    # file: policies' probabilities come with the request; without them the policy is refused
    with pytest.raises(PolicySpecError, match="did not come with the request"):
        ev.file_probs("file:/dev/zero", None, ["d0"], [["a"]], np.ones((1, 1), bool))


# ---- the evaluation on known truth ---------------------------------------------------------------


def test_each_policy_reproduces_the_estimators_and_the_logging_policy_is_the_mean_reward() -> None:
    batch = from_records(records(600, seed=1), SPEC)
    constant = ev.constant_probs("action:b", "b", batch.action_ids, batch.mask)
    uniform = batch.mask / batch.mask.sum(axis=1, keepdims=True)
    q_hat = np.where(batch.mask, 0.5, 0.0)
    rows = ev.evaluate(batch, [("action:b", "action", constant), ("uniform", "file", uniform)], q_hat, 0.9)

    base = rows[0]
    assert (base.policy, base.kind, base.agreement, base.dm, base.versus_logging) == (ev.LOGGING, "logging", None, None, None)
    assert base.value.value == pytest.approx(batch.reward.mean(), abs=1e-12) and base.ess == 600
    assert base.ips == base.snips == base.dr == base.value

    args = (batch.chosen, batch.prob, batch.reward)
    for row, pi in ((rows[1], constant), (rows[2], uniform)):
        for name, found in (("ips", ope.ips(pi, *args, 0.9)), ("snips", ope.snips(pi, *args, 0.9)),
                            ("dm", ope.dm(pi, q_hat, 0.9)), ("dr", ope.dr(pi, *args, q_hat, 0.9))):
            mine = getattr(row, name)
            assert (mine.value, mine.lower, mine.upper) == pytest.approx((found.value, found.lower, found.upper), abs=1e-12)
        assert row.value == row.dr  # the headline, with a reward model
        diff = ope.estimate(ope.dr_terms(pi, *args, q_hat) - batch.reward, 0.9)
        assert row.versus_logging.value == pytest.approx(diff.value, abs=1e-12)
        w = pi[np.arange(len(batch)), batch.chosen] / batch.prob
        assert row.ess == pytest.approx(w.sum() ** 2 / (w**2).sum())
    # the logging policy was uniform: the uniform policy's weights are all 1
    assert rows[2].ess == pytest.approx(600) and rows[2].ips.value == pytest.approx(batch.reward.mean())
    assert rows[1].agreement == pytest.approx((batch.chosen == 1).mean())
    # the truth: b pays 0.8, the logging policy about (0.8 + 0.3 + 0.3·3/4) / (3 - 1/4) ≈ 0.48
    assert rows[1].value.lower > base.value.upper


def test_without_a_reward_model_dr_and_dm_are_left_out_and_snips_is_the_headline() -> None:
    batch = from_records(records(40), SPEC)
    rows = ev.evaluate(batch, [("action:a", "action", ev.constant_probs("action:a", "a", batch.action_ids, batch.mask))])
    assert rows[1].dr is None and rows[1].dm is None and rows[1].value == rows[1].snips
    assert rows[0].dr is None


def test_snips_is_left_out_when_a_policy_never_takes_a_logged_action() -> None:
    recs = [r | {"chosen": "a"} for r in records(10)]
    batch = from_records(recs, SPEC)
    row = ev.evaluate(batch, [("action:b", "action", ev.constant_probs("action:b", "b", batch.action_ids, batch.mask))])[1]
    assert row.snips is None and row.ips.value == 0.0 and row.ess == 0.0 and row.value == row.ips


def test_too_few_decisions_is_an_error() -> None:
    with pytest.raises(EvaluationError, match="the window holds 1 usable matured decision; at least 2"):
        ev.evaluate(from_records(records(1), SPEC), [])


# ---- models: fake scorers over hashed actions -----------------------------------------------------


class FakeScorer:
    """Scores each action by a fixed linear function of its hashed vector, like a tiny ONNX model."""

    def __init__(self, version: str, weights: np.ndarray, exploration: dict[str, Any], experience: int = 100,
                 agent_exploration: dict[str, Any] | None = None) -> None:
        self.version = version
        self.weights = weights
        self.manifest = build_manifest(
            {"version": version, "parent": None, "created": 0.0, "learner": "mlp", "features": msgspec.to_builtins(SPEC),
             "exploration": exploration, "agent_exploration": agent_exploration or {},
             "training": {"train_rows": experience}, "sha256": "0" * 64}
        )

    def score_batch(self, context: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = (actions @ self.weights).astype(np.float32)
        return scores, np.full_like(scores, 0.1)


def weights_for(values: dict[str, float]) -> np.ndarray:
    """Weights under which each action id's hashed vector scores ``values[id]``."""
    from reflexd.features import Hasher

    vectors = Hasher(SPEC).actions(list(values))
    found, *_ = np.linalg.lstsq(vectors.astype(np.float64), np.array(list(values.values())), rcond=None)
    return found


GOOD = weights_for({"a": 0.3, "b": 0.8, "c": 0.3})
BAD = weights_for({"a": 0.8, "b": 0.1, "c": 0.6})


def test_run_evaluates_model_versions_with_their_own_exploration_and_settings_of_ones_own() -> None:
    batch = from_records(records(800, seed=2), SPEC)
    models = {
        "v0001": FakeScorer("v0001", BAD, {"strategy": "epsilon_greedy", "epsilon": 0.1}),
        "v0002": FakeScorer("v0002", GOOD, {"strategy": "epsilon_greedy", "epsilon": 0.2},
                            agent_exploration={"right": {"strategy": "epsilon_greedy", "epsilon": 0.5}}),
    }
    loaded: list[str] = []

    def load(version: str) -> FakeScorer:
        loaded.append(version)
        return models[version]

    found = ev.run(["v0001", "live", "v0002@epsilon=0.05", "action:a"], lambda spec: batch, load, "v0002",
                   confidence=0.95, estimator="dr")
    assert [r.policy for r in found.rows] == [ev.LOGGING, "v0001", "live", "v0002@epsilon=0.05", "action:a"]
    assert found.reward_model == "v0002" and found.estimator == "dr" and found.decisions == 800
    assert (found.reward_min, found.reward_max) == (0.0, 1.0)
    assert sorted(set(loaded)) == ["v0001", "v0002"]

    scores, spread = models["v0002"].score_batch(batch.context, batch.actions)
    q_hat = np.where(batch.mask, scores.astype(np.float64), 0.0)
    left = np.array([a == "left" for a in batch.agents])
    pi = np.zeros(batch.mask.shape)
    for rows, eps in ((left, 0.2), (~left, 0.5)):  # each agent explores as the manifest says
        cfg = ExplorationConfig(strategy="epsilon_greedy", epsilon=eps)
        pi[rows] = target_probs(cfg, scores[rows], spread[rows], batch.mask[rows], 100)
    dr = ope.dr(pi, batch.chosen, batch.prob, batch.reward, q_hat)
    live = found.rows[2]
    assert (live.version, live.kind) == ("v0002", "model")
    assert live.dr.value == pytest.approx(dr.value, abs=1e-9) and live.dr.upper == pytest.approx(dr.upper, abs=1e-9)
    # the same model exploring less on both agents: closer to the best action, worth more
    tuned = found.rows[3]
    assert tuned.kind == "exploration" and tuned.exploration["epsilon"] == 0.05 and tuned.value.value > live.value.value
    assert found.rows[1].value.upper < live.value.lower  # the bad model is clearly worse
    assert found.rows[1].agreement < live.agreement


def test_run_without_any_model_leaves_out_dr_and_cannot_discover() -> None:
    batch = from_records(records(50), SPEC)
    found = ev.run(["action:b"], lambda spec: batch, lambda v: pytest.fail("no model to load"), None)
    assert found.reward_model is None and found.estimator == "snips" and found.rows[1].dr is None
    with pytest.raises(PolicySpecError, match="'live': no model is live"):
        ev.run(["live"], lambda spec: batch, lambda v: None, None)
    with pytest.raises(EvaluationError, match="discover needs a model"):
        ev.run(["action:b"], lambda spec: batch, lambda v: None, None, discover_settings=True)


def test_discovery_recommends_the_best_lower_bound_only_above_the_logging_policys() -> None:
    batch = from_records(records(3000, seed=4), SPEC)
    good = FakeScorer("v0002", GOOD, {"strategy": "squarecb", "gamma": 1.0})
    found = ev.run([], lambda spec: batch, lambda v: good, "v0002", discover_settings=True)
    rec = found.discovery
    assert rec is not None and rec.model == "v0002" and rec.estimator == "dr"
    assert len(rec.candidates) == 1 + len(ev.DISCOVERY_GRID)
    lowers = [c.value.lower for c in rec.candidates]
    assert lowers == sorted(lowers, reverse=True)
    assert rec.policy == rec.candidates[0].policy and rec.value == rec.candidates[0].value
    assert rec.value.lower > found.rows[0].value.lower
    # the model's own setting explores a lot (gamma 1): a greedier setting is recommended
    assert rec.policy != "v0002" and "best lower bound" in rec.reason

    bad = FakeScorer("v0001", BAD, {"strategy": "squarecb"})
    none = ev.run(["v0001"], lambda spec: batch, lambda v: bad, None, discover_settings=True).discovery
    assert none is not None and none.policy is None and none.value is None
    assert none.reason.startswith("none recommended: the best lower bound of the 18 settings tried")
    assert none.candidates[0].value.lower <= found.rows[0].value.lower
