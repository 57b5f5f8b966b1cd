"""bench.promotion's protocol, run small: the rules it compares are what they say."""

from __future__ import annotations

from bench import promotion


def test_each_rule_serves_the_same_decisions_and_relearning_changes_what_it_earns() -> None:
    found = promotion.run(seed=1, before=300, after=150)
    assert set(found) == set(promotion.RULES)
    assert all(0.0 <= regret < 1.0 for regret in found.values())
    # both relearn all 300 rewards there are: the same head, the same draws, the same regret
    assert found["warm_rows 1000"] == found["warm_rows 3000"]
    assert found["warm_rows 1000"] != found["warm_rows 0"]
    assert found["no model"] != found["warm_rows 0"]
