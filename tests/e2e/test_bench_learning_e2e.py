"""bench/learning.py drives a real daemon: decisions through an in-process Policy, a training run
of the agent's own model line at each point, and the client serving whatever the gate promoted."""

from __future__ import annotations

import pytest

from bench import learning, learning_streams

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_the_learning_benchmark_runs_reflexd_through_its_training_runs() -> None:
    stream = learning_streams.build("iris", 0, 30)
    result = learning.run_reflexd(stream, 0, "defaults", [6, 13, 20])
    assert [run["at"] for run in result["runs"]] == [6, 13, 20]
    for run in result["runs"]:
        assert run["outcome"] in ("promoted", "rejected"), run["message"]
        assert run["rows"] == run["at"]  # each run trained on every example so far
    assert result["earned"].shape == (30,)
    assert result["promoted"] == sum(run["outcome"] == "promoted" for run in result["runs"])
    if result["promoted"]:  # served from the decision after the first promotion on
        first = next(run["at"] for run in result["runs"] if run["outcome"] == "promoted")
        assert result["first_model_at"] == first
