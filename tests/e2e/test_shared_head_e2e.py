"""Online learning shared between processes: what one process's Policy learns from its rewards,
another process deciding for the same agent learns within a second, through the daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from conftest import DaemonProcess, wait_for
from reflexd.client.policy import Policy

pytestmark = pytest.mark.e2e

BEST = {"code": "large", "chat": "small", "math": "tools"}
ACTIONS = ["small", "large", "tools"]

# another process: an agent's worker that decides, earns rewards and learns from them
LEARNER = """
import json, random, sys
from reflexd.client.policy import Policy
best = {"code": "large", "chat": "small", "math": "tools"}
rng = random.Random(5)
with Policy("router", socket=sys.argv[1], state_dir=sys.argv[2], seed=7, refresh_interval=0.1) as policy:
    for i in range(int(sys.argv[3])):
        task = rng.choice(list(best))
        choice = policy.decide({"task": task}, ["small", "large", "tools"])
        policy.reward(choice.id, 1.0 if choice.action == best[task] else 0.0)
    assert policy.flush(60)
    print(json.dumps({"stats": policy.stats()["online"]}))
"""


def test_what_one_process_learns_reaches_another_within_a_second(daemon_factory: Any) -> None:
    d: DaemonProcess = daemon_factory()
    with Policy("router", socket=d.socket, state_dir=d.state_dir, seed=1, refresh_interval=0.1) as observer:
        observer.decide({"task": "code"}, ACTIONS)  # it decides too, learning nothing itself
        learner = subprocess.Popen(
            [sys.executable, "-c", LEARNER, d.socket, str(d.state_dir), "300"], stdout=subprocess.PIPE, text=True
        )
        try:
            wait_for(lambda: observer.stats()["online"]["absorbed"] >= 300, 60, "the other process's 300 updates")
            out, _ = learner.communicate(timeout=60)
        finally:
            learner.kill()
        assert learner.returncode == 0
        report = json.loads(out)
        learned = report["stats"]
        # its own 300 are not learned twice; all it may absorb is the observer's one decision, taught
        # the default once its wait window passed (on a loaded host, after the learner had started)
        assert learned["updates"] - learned["absorbed"] == 300 and learned["absorbed"] <= 1, learned
        # the observer, which earned no reward itself, decides as the learner taught it (how soon
        # updates arrive is measured in bench.online, not asserted here)
        for task, best in BEST.items():
            scored = observer.score({"task": task}, ACTIONS)
            assert scored.scores is not None and ACTIONS[scored.scores.index(max(scored.scores))] == best, (task, scored)
        stats = observer.stats()["online"]
        assert stats["updates"] == 300 + stats["defaults"]  # its one decision, unrewarded, taught the default
        # the daemon's head learned them too, for its socket decisions (those of one read together),
        # and perhaps the observer's default
        assert 300 <= d.status().online["absorbed"] <= 301
