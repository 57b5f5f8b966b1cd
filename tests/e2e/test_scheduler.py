"""When a training run is due: min_new_examples, and early runs while experience is scarce (trainer.growth)."""

from __future__ import annotations

import random

import msgspec
import pytest

from conftest import DaemonProcess, wait_for
from reflexd.client.policy import Policy
from reflexd.config import Config, OnlineConfig, TrainerConfig
from reflexd.errors import RequestFailed
from reflexd.learning.runs import due_after, run_points
from reflexd.split import first_run_rows, holdout_run_rows
from reflexd.wire.protocol import ModelsRequest, Train

FIRST = first_run_rows(Config())
HOLDOUT_RUN = holdout_run_rows(Config())


def test_due_after_by_hand() -> None:
    cfg = TrainerConfig(min_new_examples=1000, growth=0.25)
    assert due_after(cfg, 0, FIRST) == FIRST == 6  # cross-fitted (trainer.cross_fit_from)
    assert due_after(cfg, 6, FIRST) == 2  # ceil(1.5)
    assert due_after(cfg, 10, FIRST) == 3  # ceil(2.5): 13, which holds out 3 and trains on 10
    assert due_after(cfg, 0, HOLDOUT_RUN) == HOLDOUT_RUN == 13  # with cross-fitting off
    assert due_after(cfg, 13, FIRST) == 4  # ceil(3.25)
    assert due_after(cfg, 17, FIRST) == 5  # ceil(4.25)
    assert due_after(cfg, 3999, FIRST) == 1000  # 0.25 × 3999 rounds up to 1000
    assert due_after(cfg, 100_000, FIRST) == 1000
    assert due_after(TrainerConfig(min_new_examples=1000, growth=0), 0, FIRST) == 1000
    # never so early that the run could only fail for want of rows, never later than asked
    assert due_after(TrainerConfig(min_new_examples=5, growth=0.25), 0, HOLDOUT_RUN) == 13
    assert due_after(TrainerConfig(min_new_examples=5, growth=0), 0, HOLDOUT_RUN) == 13
    assert due_after(TrainerConfig(min_new_examples=5, growth=0), 0, FIRST) == 6
    assert due_after(TrainerConfig(min_new_examples=10, growth=0.25), 100, FIRST) == 10
    assert due_after(TrainerConfig(growth=0.001), 100, FIRST) == 1  # at least one new experience
    assert due_after(TrainerConfig(growth=0.07), 100, FIRST) == 7  # not 8, as 0.07 × 100 in floats would round up to
    # a snapshot at the max_examples cap: experience is plentiful, whatever the cap
    assert due_after(TrainerConfig(min_new_examples=1000, max_examples=2000, growth=0.25), 2000, FIRST) == 1000


def test_runs_come_early_and_geometrically_until_min_new_examples_governs() -> None:
    cfg = TrainerConfig(min_new_examples=1000, growth=0.25)
    points = run_points(cfg, 9000, FIRST)
    assert points[:11] == [6, 8, 10, 13, 17, 22, 28, 35, 44, 55, 69]
    assert run_points(cfg, 70, HOLDOUT_RUN) == points[3:11]
    gaps = [b - a for a, b in zip(points, points[1:])]
    assert all(g2 >= g1 for g1, g2 in zip(gaps, gaps[1:]))  # never closer together as data grows
    assert gaps[-4:] == [1000] * 4
    # the early runs cost a few dozen runs over the first 4000 experiences, not one per experience
    assert len([p for p in points if p <= 4000]) < 30
    assert run_points(msgspec.structs.replace(cfg, growth=0), 3001, FIRST) == [1000, 2000, 3000]


@pytest.mark.e2e
def test_a_run_asked_for_before_rewards_have_joined_says_why_and_puts_off_nothing(daemon_factory) -> None:
    d: DaemonProcess = daemon_factory({"rewards": {"wait_window": 3600}})
    with Policy("bot", socket=d.socket, state_dir=d.state_dir, seed=1) as policy:
        for _ in range(FIRST + 5):
            choice = policy.decide({"kind": "a"}, ["x", "y"])
            policy.reward(choice.id, 1.0)
        assert policy.flush(60), policy.stats()
    with pytest.raises(RequestFailed, match=r"only 0 joined experiences so far; need at least \d+ \(a decision joins its reward"
                       r" once its wait window has passed: rewards.wait_window, 3600 s") as failed:
        d.request(Train(agent="bot"), timeout=120)
    assert failed.value.code == "too_few_experiences"
    trainer = d.status().trainer
    assert trainer["failures"] == 0 and trainer["consecutive_failures"] == 0 and trainer["next_attempt"] == 0
    assert trainer["last_run"]["outcome"] == "failed" and "wait window" in trainer["last_run"]["error"]


@pytest.mark.e2e
@pytest.mark.slow
def test_a_daemon_trains_on_its_own_as_soon_as_experience_is_scarce_but_sufficient(daemon_factory) -> None:
    # min_new_examples far away: only the growth rule can start these runs
    d: DaemonProcess = daemon_factory(
        {"rewards": {"wait_window": 0.2}, "trainer": {"growth": 0.25, "check_interval": 0.2, "min_new_examples": 1_000_000}}
    )
    rng = random.Random(1)
    with Policy("bot", socket=d.socket, state_dir=d.state_dir, seed=1) as policy:

        def send(n: int) -> None:
            for _ in range(n):
                kind = rng.choice("abc")
                choice = policy.decide({"kind": kind}, ["x", "y", "z"])
                policy.reward(choice.id, float(choice.action == {"a": "x", "b": "y", "c": "z"}[kind]))
            assert policy.flush(60), policy.stats()

        send(FIRST - 1)
        # one experience short of a first run: nothing is due however long the daemon looks
        wait_for(lambda: d.status().experience["new_since_training"] == FIRST - 1, 60, "matured experiences")
        assert d.status().trainer["runs"] == 0
        send(1)
        first = wait_for(lambda: d.status().trainer["last_run"], 300, f"a first run on its own\n{d.log()}")
        assert first.get("outcome") in ("promoted", "rejected"), first
        assert d.status().trainer["trained_on"] == FIRST
        # too few to hold any out: the gate judged the learner's out-of-fold predictions
        assert first["gate"].endswith(f"(cross-fitted: each of the {FIRST} rows scored by the learner fit without it)")
        trained_on = d.status().trainer["trained_on"]
        send(int(trained_on * 0.25) + 3)
        wait_for(lambda: d.status().trainer["trained_on"] > trained_on, 300, f"a second run after 25% more\n{d.log()}")
        assert d.status().trainer["runs"] >= 2 and d.status().trainer["failures"] == 0


@pytest.mark.e2e
@pytest.mark.slow
def test_a_cross_fitted_first_model_goes_live_fit_on_every_row(daemon_factory) -> None:
    d: DaemonProcess = daemon_factory(
        {"rewards": {"wait_window": 0.2}, "trainer": {"growth": 0.25, "check_interval": 0.2, "min_new_examples": 1_000_000}}
    )
    # the logging policy uniform, as this test reckons with; the online head would learn to beat any first model
    offline = OnlineConfig(enabled=False)
    with Policy("bot", socket=d.socket, state_dir=d.state_dir, seed=3, refresh_interval=0.1, online=offline) as policy:
        for _ in range(FIRST):
            choice = policy.decide({"task": "fetch"}, ["good", "bad"])
            policy.reward(choice.id, float(choice.action == "good"))
        assert policy.flush(60), policy.stats()
        run = wait_for(lambda: d.status().trainer["last_run"], 300, f"a first run on its own\n{d.log()}")
        assert run.get("outcome") == "promoted", run
        live = {m["version"]: m for m in d.request(ModelsRequest()).models}[run["version"]]
        training, verdict = live["training"], live["gate"]
        assert (training["train_rows"], training["holdout_rows"]) == (FIRST, 0), training
        assert training["cross_fitted"] and training["refit"] and "cross_fit" not in training, training
        assert verdict["baseline"] == "logged policy" and verdict["holdout_rows"] == verdict["refit_rows"] == FIRST
        # the agent picks it up and, six decisions in, prefers the action that paid
        wait_for(lambda: policy.decide({"task": "fetch"}, ["good", "bad"]) and policy.model_version == run["version"],
                 60, "the client loading the model")
        chosen = [policy.decide({"task": "fetch"}, ["good", "bad"]).action for _ in range(50)]
        assert chosen.count("good") > 40, chosen
