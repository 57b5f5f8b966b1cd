"""Knowledge extraction end to end: a planted world's log imported into a real daemon, an
extraction run by ``reflexd insights --now`` in its subprocess, the rule found and published with
the right sign, the same findings through the socket and the client, in ``status``, in the HTML
report, and gone with ``forget``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import DaemonProcess, wait_for
from reflexd.client.policy import Policy
from reflexd.wire.protocol import Forget, InsightsRequest

pytestmark = pytest.mark.e2e

N = 3000
T0 = 1_767_225_600.0
# what each action pays by task: large is better on code, small on chat
PAYS = {("code", "large"): 0.8, ("code", "small"): 0.4, ("chat", "large"): 0.3, ("chat", "small"): 0.6}


def write_log(path: Path) -> None:
    """Logged by a policy that mostly takes large on code and small on chat (confounded, as real
    logs are), with the probabilities it drew with."""
    rng = np.random.default_rng(11)
    with open(path, "w") as f:
        for i in range(N):
            task = "code" if rng.random() < 0.5 else "chat"
            p_large = 0.8 if task == "code" else 0.2
            chosen = "large" if rng.random() < p_large else "small"
            prob = p_large if chosen == "large" else 1 - p_large
            row = {"type": "decision", "id": f"d{i:05d}", "agent": "router", "ts": T0 + 60 * i,
                   "context": {"task": task, "difficulty": round(float(rng.random()), 3)},
                   "actions": ["small", "large"], "chosen": chosen, "prob": prob}
            f.write(json.dumps(row) + "\n")
            reward = float(rng.random() < PAYS[(task, chosen)])
            f.write(json.dumps({"type": "outcome", "decision_id": row["id"], "reward": reward}) + "\n")


def reflexd(d: DaemonProcess, *args: str, json_out: bool = True) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "reflexd", *args, "--socket", d.socket, *(["--json"] if json_out else [])],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr + d.log_tail()
    return json.loads(done.stdout) if json_out else done.stdout


def large_minus_small_on(rule: dict[str, Any], task: str) -> float | None:
    """What the rule says large earns over small where ``task`` holds, or None if it says nothing there."""
    for c in rule["when"]:
        if c["feature"] != "task":
            continue
        value = c["value"]
        holds = {"==": task == value, "!=": task != value, "in": task in value, "not in": task not in value}.get(c["op"])
        if not holds:
            return None
    if not any(c["feature"] == "task" for c in rule["when"]):
        return None
    pair = (rule["action"], rule["baseline"])
    if pair == ("large", "small"):
        return rule["lift"]
    if pair == ("small", "large"):
        return -rule["lift"]
    return None


def test_insights_now_publishes_the_planted_rule_and_forget_removes_it(daemon_factory, tmp_path: Path) -> None:
    d = daemon_factory({"rewards": {"wait_window": 0.3}, "insights": {"min_support": 100}})
    log = tmp_path / "world.ndjson"
    write_log(log)
    reflexd(d, "import", str(log), "--format", "ndjson")
    wait_for(lambda: d.loaded_status().experience["new_since_training"] >= N, 60, "the import to mature")

    before = reflexd(d, "insights")
    assert before["run"] is None and before["rules"] == []

    found = reflexd(d, "insights", "--now", "--agent", "router")
    assert found["run"]["experiences"] == N
    assert found["run"]["min_support"] == 100  # the setting the run used, kept with it
    assert found["summary"]["agent_has_decisions"] is True
    assert "no decision of agent 'nobody' is in the store" in reflexd(d, "insights", "--agent", "nobody", json_out=False)
    assert set(found) >= {"rules", "patterns", "anomalies", "trends"}
    published = [r for r in found["rules"] if r["status"] == "published"]
    assert published, found["rules"]
    for rule in published:  # every required field, and an interval around the lift
        assert {"agent", "action", "baseline", "when", "lift", "ci", "support", "status", "first_seen", "last_confirmed"} <= set(rule)
        assert rule["ci"][0] <= rule["lift"] <= rule["ci"][1]
    on_code = [v for r in published if (v := large_minus_small_on(r, "code")) is not None]
    on_chat = [v for r in published if (v := large_minus_small_on(r, "chat")) is not None]
    assert on_code or on_chat, published
    assert all(v > 0 for v in on_code) and all(v < 0 for v in on_chat), published  # the truth's signs

    # the same over the socket, and through the agent's own client
    reply = d.request(InsightsRequest(agent="router"))
    assert [r["id"] for r in reply.rules] == [r["id"] for r in found["rules"]]
    with Policy("router", socket=d.socket, state_dir=d.state_dir) as policy:
        texts = [r["text"] for r in policy.insights().rules if r["status"] == "published"]
    assert texts and all("task" in t for t in texts)

    status = reflexd(d, "status")
    assert status["insights"]["rules_published"] == len(published)
    assert "rules published" in reflexd(d, "status", json_out=False)
    assert "published" in reflexd(d, "insights", json_out=False)

    out = tmp_path / "report"
    reflexd(d, "report", "--out", str(out), json_out=False)
    page = (out / "index.html").read_text()
    assert "<svg" in page and "<script" not in page and "Published rules" in page

    d.request(Forget(agent="router"))
    assert reflexd(d, "insights", "--agent", "router")["rules"] == []
    after = reflexd(d, "status")["insights"]
    assert after["rules_published"] == 0 and (after["newest_anomaly"] or {}).get("agent") != "router"


def test_an_extraction_that_cannot_make_its_folder_fails_and_the_daemon_goes_on(daemon_factory, tmp_path: Path) -> None:
    d = daemon_factory({"rewards": {"wait_window": 0.3}})
    (d.state_dir / "insights").write_text("not a folder")  # where the run folders go
    done = subprocess.run(
        [sys.executable, "-m", "reflexd", "insights", "--now", "--socket", d.socket],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1 and "insights" in done.stderr, done.stderr
    # before: the OSError escaped the extraction and stopped the daemon
    assert d.running and d.status().insights["last_run"]["outcome"] == "failed"


def test_the_report_is_written_only_into_a_folder_of_ones_own_and_names_are_not_math(tmp_path: Path) -> None:
    import os

    from reflexd.errors import UsageError
    from reflexd.tools.report import write_report
    from reflexd.wire.protocol import Insights

    rule = {"agent": "a$\\foo$", "action": "x$", "baseline": "y", "when": [], "lift": 0.2, "ci": [0.1, 0.3],
            "support": 300, "status": "published", "text": "everywhere, x$ earns +0.2 over y"}
    trend = {"agent": "a$\\foo$", "points": [{"start": 0.0, "end": 1.0, "value": 0.5, "ci": [0.4, 0.6], "count": 9}],
             "direction": "flat"}
    reply = Insights(run={"id": "r", "at": 1.0, "experiences": 9}, rules=[rule], trends=[trend])
    page = write_report(reply, tmp_path / "mine").read_text()
    assert "x$ earns" in page and "<script" not in page
    if os.getuid() != 0:
        return  # handing a folder to another user needs root
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)  # another user's folder (the tests run as root)
    with pytest.raises(UsageError, match="another user"):
        write_report(reply, theirs)
