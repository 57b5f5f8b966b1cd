"""``reflexd evaluate`` end to end: a log imported with ``reflexd import`` into a real daemon, then
evaluated by the command line and the client, reproducing the estimators computed directly on the
same rows to 1e-9 (a constant action, a model version, a file of probabilities)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import DaemonProcess, line_registry, wait_for
from linear_models import register
from reflexd.client.policy import Policy
from reflexd.deciding.scoring import Scorer
from reflexd.features import FeatureSpec
from reflexd.learning import ope
from reflexd.learning.gate import target_probs

pytestmark = pytest.mark.e2e

N = 1500
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z: the decisions' logged times, one a minute
PAYS = {"small": 0.35, "large": 0.6, "xl": 0.5}


def write_log(path: Path) -> list[dict[str, Any]]:
    """A logging policy's decisions with their probabilities, and their outcomes (known truth)."""
    rng = np.random.default_rng(5)
    rows = []
    with open(path, "w") as f:
        for i in range(N):
            actions = ["small", "large", "xl"] if i % 3 else ["small", "large"]
            probs = np.array([0.5, 0.3, 0.2]) if len(actions) == 3 else np.array([0.7, 0.3])
            k = int(rng.choice(len(actions), p=probs))
            row = {"type": "decision", "id": f"log-{i:05d}", "agent": "router", "context": {"task": ["code", "chat"][i % 2]},
                   "actions": actions, "chosen": actions[k], "prob": float(probs[k]), "probs": probs.tolist(), "ts": T0 + 60 * i}
            reward = float(rng.random() < PAYS[actions[k]])
            f.write(json.dumps(row) + "\n")
            f.write(json.dumps({"type": "outcome", "decision_id": row["id"], "reward": reward}) + "\n")
            rows.append({**row, "reward": reward, "k": k})
    return rows


def reflexd(d: DaemonProcess, *args: str, json_out: bool = True) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "reflexd", *args, "--socket", d.socket, *(["--json"] if json_out else [])],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr + d.log_tail()
    return json.loads(done.stdout) if json_out else done.stdout


def arrays(rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """chosen, prob, reward and the valid-action mask, padded to three actions."""
    mask = np.array([[True, True, len(r["actions"]) == 3] for r in rows])
    return np.array([r["k"] for r in rows]), np.array([r["prob"] for r in rows]), np.array([r["reward"] for r in rows]), mask


def same(found: dict[str, Any], want: ope.Estimate) -> None:
    got = (found["value"], found["stderr"], found["lower"], found["upper"])
    assert got == pytest.approx((want.value, want.stderr, want.lower, want.upper), abs=1e-9, rel=0)


def test_evaluate_on_an_imported_log_reproduces_the_estimators(daemon_factory, tmp_path: Path) -> None:
    d = daemon_factory({"rewards": {"wait_window": 0.3}, "gate": {"confidence": 0.95}})
    log = tmp_path / "logged.ndjson"
    rows = write_log(log)
    imported = reflexd(d, "import", str(log), "--format", "ndjson")
    assert (imported["decisions"], imported["outcomes"]) == (N, N)
    wait_for(lambda: d.loaded_status().experience["new_since_training"] >= N, 30, "the import to mature")

    chosen, prob, reward, mask = arrays(rows)
    small = np.where(mask, 0.0, 0.0)
    small[:, 0] = 1.0

    # a constant action: IPS and SNIPS to 1e-9, the logging policy's mean reward, no model: no DR
    found = reflexd(d, "evaluate", "action:small")
    assert found["type"] == "evaluation" and found["decisions"] == N and found["reward_model"] is None
    base, row = found["rows"]
    assert base["policy"] == "logging policy" and base["value"]["value"] == pytest.approx(reward.mean(), abs=1e-12)
    same(row["ips"], ope.ips(small, chosen, prob, reward))
    same(row["snips"], ope.snips(small, chosen, prob, reward))
    assert row["dr"] is None and found["estimator"] == "snips"
    w = small[np.arange(N), chosen] / prob
    assert row["ess"] == pytest.approx(w.sum() ** 2 / (w**2).sum(), rel=1e-12)
    assert row["agreement"] == pytest.approx((chosen == 0).mean())
    # the truth: small pays 0.35
    assert row["snips"]["lower"] < PAYS["small"] < row["snips"]["upper"]

    # a model version (registered beside the daemon's, not live) with its own reward model
    spec = FeatureSpec(context_dim=16, action_dim=16, seed=0)
    registry = line_registry(d, "router")
    version = register(registry, tmp_path, spec, {"small": 0.35, "large": 0.6, "xl": 0.5},
                       {"strategy": "softmax", "temperature": 0.1, "epsilon_min": 0.05}, experience=40).version
    found = reflexd(d, "evaluate", version, f"{version}@strategy=epsilon_greedy,epsilon=0.1", "--reward-model", version)
    assert found["reward_model"] == version and found["estimator"] == "dr"
    from reflexd.learning.dataset import from_records

    batch = from_records([{**r, "received_at": r["ts"]} for r in rows], spec)
    manifest, model = registry.load(version)
    scores, spread = Scorer(manifest, model).score_batch(batch.context, batch.actions)
    q_hat = np.where(batch.mask, scores, 0.0)
    for row, cfg in ((found["rows"][1], manifest.exploration),
                     (found["rows"][2], manifest.exploration.__class__(strategy="epsilon_greedy", epsilon=0.1,
                                                                        epsilon_min=0.05, temperature=0.1))):
        pi = target_probs(cfg, scores, spread, batch.mask, 40)
        same(row["ips"], ope.ips(pi, batch.chosen, batch.prob, batch.reward))
        same(row["snips"], ope.snips(pi, batch.chosen, batch.prob, batch.reward))
        same(row["dm"], ope.dm(pi, q_hat))
        same(row["dr"], ope.dr(pi, batch.chosen, batch.prob, batch.reward, q_hat))
    assert found["rows"][1]["value"]["lower"] > found["rows"][0]["value"]["upper"]  # better than the log

    # a file of per-decision probabilities
    probs_file = tmp_path / "probs.ndjson"
    rng = np.random.default_rng(9)
    pi = np.zeros(mask.shape)
    with open(probs_file, "w") as f:
        for i, r in enumerate(rows):
            p = rng.dirichlet(np.ones(len(r["actions"])))
            pi[i, : len(p)] = p
            f.write(json.dumps({"id": r["id"], "probs": dict(zip(r["actions"], p.tolist()))}) + "\n")
    found = reflexd(d, "evaluate", f"file:{probs_file}")
    same(found["rows"][1]["ips"], ope.ips(pi, chosen, prob, reward))
    same(found["rows"][1]["snips"], ope.snips(pi, chosen, prob, reward))

    # a window of the logged times, as ISO-8601 and as epoch seconds
    since = dt.datetime.fromtimestamp(T0 + 60 * 500, dt.timezone.utc).isoformat()
    found = reflexd(d, "evaluate", "action:small", "--since", since, "--until", str(T0 + 60 * 1000), "--agent", "router")
    assert found["decisions"] == 500 and found["since"] == T0 + 60 * 500
    part = slice(500, 1000)
    same(found["rows"][1]["ips"], ope.ips(small[part], chosen[part], prob[part], reward[part]))

    # the table a person reads
    table = reflexd(d, "evaluate", "action:small", "action:large", version, "--reward-model", version, json_out=False)
    assert "logging policy (baseline)" in table and "action:large" in table and version in table
    assert f"{N} matured decisions (every agent" in table

    # the client asks over a connection of its own, for its agent
    with Policy("router", socket=d.socket, state_dir=d.state_dir) as policy:
        answer = policy.evaluate(["action:small"], since=T0 + 60 * 500, until=T0 + 60 * 1000)
    assert answer.decisions == 500 and answer.agent == "router"
    assert answer.rows[1].ips.value == pytest.approx(found["rows"][1]["ips"]["value"], abs=1e-12)


def test_evaluate_says_what_is_wrong(daemon: DaemonProcess, tmp_path: Path) -> None:
    log = tmp_path / "logged.ndjson"
    write_log(log)
    reflexd(daemon, "import", str(log))
    wait_for(lambda: daemon.loaded_status().experience["new_since_training"] >= N, 30, "the import to mature")

    def fails(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "reflexd", "evaluate", *args, "--socket", daemon.socket],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and not done.stdout, done.stdout
        return done.stderr

    assert "evaluation: action:xl: 500 of 1500 decisions in the window did not offer 'xl'" in fails("action:xl")
    assert "policy_spec: policy 'router': not a policy" in fails("router")
    assert "policy_spec: policy 'live': no model is live" in fails("live")
    assert "model_not_found" in fails("v0009")
    assert "--since: 'yesterday' is neither epoch seconds nor an ISO-8601 time" in fails("action:small", "--since", "yesterday")
    assert "name at least one policy" in fails()
    assert "line_unknown: evaluate: agent 'nobody' has logged no decision" in fails("action:small", "--agent", "nobody")
