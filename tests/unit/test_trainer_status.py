"""The trainer's status keeps the gate's refusals since the last promotion, with their numbers."""

from __future__ import annotations

import msgspec
import numpy as np

from reflexd.config import GateConfig
from reflexd.learning.gate import compare
from reflexd.service.scheduler import KEEP_REFUSALS, TrainerStatus


def refusal(seed: int):
    rng = np.random.default_rng(seed)
    n = 40
    chosen = rng.integers(0, 2, n)
    reward = (chosen == 0) * 0.5 + rng.random(n) * 0.5  # action 0, the incumbent's, is better
    q = np.zeros((n, 2))
    both = np.full((n, 2), 0.5)
    # the candidate always takes action 1, the incumbent action 0
    candidate, incumbent = np.tile([0.0, 1.0], (n, 1)), np.tile([1.0, 0.0], (n, 1))
    return compare(candidate, incumbent, chosen, both[np.arange(n), chosen], reward, q, GateConfig(), "incumbent v0001")


def test_refusals_are_kept_with_their_numbers_and_counted_until_a_promotion() -> None:
    status = TrainerStatus()
    verdicts = [refusal(seed) for seed in range(KEEP_REFUSALS + 2)]
    assert not any(v.passed for v in verdicts)
    for i, verdict in enumerate(verdicts):
        status.refused(f"v{i + 2:04d}", verdict)
    shown = status.as_dict()
    assert shown["refused_in_a_row"] == KEEP_REFUSALS + 2
    assert [r["version"] for r in shown["refusals"]] == [f"v{i + 2:04d}" for i in range(2, KEEP_REFUSALS + 2)]
    last = shown["refusals"][-1]
    assert last["holdout_rows"] == 40 and last["lower"] < last["difference"] < last["upper"]
    assert last["reason"] == verdicts[-1].reason
    msgspec.json.encode(shown)  # the status reply carries it as JSON
