"""End to end: ``reflexd run`` as a subprocess, an agent through ``reflexd.Policy``, real training.

The problem has a known best action per context, so "the agent got better" is a number.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DaemonProcess, line_registry, wait_for
from reflexd.client.policy import Policy
from reflexd.config import OnlineConfig
from reflexd.wire.protocol import ModelsRequest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BEST = {"a": "x", "b": "y", "c": "z"}


def play(policy: Policy, rng: random.Random, n: int) -> float:
    """Decide ``n`` times with rewards; the fraction of decisions that took the best action."""
    hits = 0
    for _ in range(n):
        kind = rng.choice(sorted(BEST))
        choice = policy.decide({"kind": kind, "noise": rng.random()}, ["x", "y", "z"])
        best = choice.action == BEST[kind]
        hits += best
        policy.reward(choice.id, float(rng.random() < (0.8 if best else 0.2)))
    return hits / n


def cli(d: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reflexd", *args, "--socket", d.socket],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture
def learning_daemon(daemon_factory) -> DaemonProcess:
    return daemon_factory(
        {
            "rewards": {"wait_window": 0.3},
            "trainer": {"min_new_examples": 400, "epochs": 10, "ensemble": 2},
            "exploration": {"strategy": "epsilon_greedy", "epsilon": 0.2, "epsilon_min": 0.05},
            "gate": {"min_holdout": 50},
        }
    )


def test_agent_improves_once_a_model_is_promoted(learning_daemon: DaemonProcess) -> None:
    d = learning_daemon
    rng = random.Random(3)
    # the batch path alone: with the online head the agent would improve before any model
    with Policy("bot", socket=d.socket, state_dir=d.state_dir, seed=5, online=OnlineConfig(enabled=False)) as policy:
        before = play(policy, rng, 1500)
        assert policy.flush(60), policy.stats()
        assert policy.model_version is None
        wait_for(lambda: policy.model_version, 300, f"a promoted model to reach the client\n{d.log()}")
        after = play(policy, rng, 600)
        assert policy.flush(60)
        stats = policy.stats()
    assert before < 0.45  # no model: uniform over three actions
    assert after > 0.75, f"best-action rate {before:.2f} → {after:.2f}"
    assert stats["dropped"] == 0 and stats["rejected"] == 0 and stats["settled"] == stats["enqueued"]

    status = d.loaded_status()
    assert status.trainer["promoted"] >= 1
    assert status.model["version"] == stats["model_version"]
    assert status.model["gate"]["passed"] is True
    assert status.ingest["stored"] == stats["enqueued"]

    # the daemon process itself never loads torch: training ran in a subprocess
    maps = Path(f"/proc/{d.proc.pid}/maps").read_text()
    assert "libtorch" not in maps and "torch/lib" not in maps

    live = {m["version"]: m for m in d.request(ModelsRequest()).models}[status.model["version"]]
    assert live["gate"]["holdout_rows"] >= 50
    # the live model is the gated candidate refit on its holdout too
    training = live["training"]
    assert training["refit"], live
    assert live["gate"]["refit_rows"] == training["train_rows"] + training["holdout_rows"], live
    assert status.model["train_rows"] == live["gate"]["refit_rows"]
    onnx = line_registry(d, "bot").root / live["version"] / "policy.onnx"
    import hashlib

    assert hashlib.sha256(onnx.read_bytes()).hexdigest() == live["sha256"]


def test_operator_cli_trains_promotes_and_rolls_back(learning_daemon: DaemonProcess) -> None:
    d = learning_daemon
    rng = random.Random(4)
    with Policy("bot", socket=d.socket, state_dir=d.state_dir, seed=6) as policy:
        play(policy, rng, 800)
        assert policy.flush(60)
    wait_for(lambda: d.status().experience["new_since_training"] >= 400 or d.status().trainer["runs"], 60, "matured experience")

    first = cli(d, "train", "--now")
    assert first.returncode == 0, first.stderr
    assert "v000" in first.stdout
    second = cli(d, "train", "--now")
    assert second.returncode == 0, second.stderr

    listing = cli(d, "models", "list")
    assert listing.returncode == 0 and "v0001" in listing.stdout and "v0002" in listing.stdout

    promote = cli(d, "models", "promote", "v0001")
    assert promote.returncode == 0, promote.stderr
    assert d.request(ModelsRequest()).current == "v0001"
    history = json.loads((line_registry(d, "bot").root / "history.json").read_text())
    assert history[-1] == "v0001"
    for back in reversed(history[:-1]):  # back through every promotion
        rollback = cli(d, "models", "rollback")
        assert rollback.returncode == 0, rollback.stderr
        assert d.request(ModelsRequest()).current == back
    first_model = d.request(ModelsRequest()).current
    with Policy("bot", socket=d.socket, state_dir=d.state_dir, seed=7) as policy:
        assert policy.decide({"kind": "k"}, ["x", "y", "z"]).model_version == first_model
        none = cli(d, "models", "rollback")  # from the first model: to no model
        assert none.returncode == 0 and f"rolled back from {first_model} to no model" in none.stdout, none.stderr
        assert d.request(ModelsRequest()).current is None
        wait_for(lambda: d.request(ModelsRequest()).serving is None, 30, "the daemon to serve no model")
        dropped = lambda: policy.decide({"kind": "k"}, ["x", "y", "z"]).model_version is None  # noqa: E731
        wait_for(dropped, 30, "the agent to drop the model")
    again = cli(d, "models", "rollback")
    assert again.returncode == 1 and "no model is live: nothing to roll back" in again.stderr
    third = cli(d, "train", "--now")  # with no model live, the next run is judged as a first model
    assert third.returncode == 0, third.stderr
    judged = d.request(ModelsRequest()).models[-1]
    assert judged["gate"]["baseline"] == "logged policy", judged
    # CURRENT emptied by hand, as an operator might: the daemon's own poll drops the model
    assert cli(d, "models", "promote", "v0001").returncode == 0
    wait_for(lambda: d.request(ModelsRequest()).serving == "v0001", 30, "the daemon to serve v0001 again")
    (line_registry(d, "bot").root / "CURRENT").write_text("")
    wait_for(lambda: "serving no model" in d.log(), 30, "the daemon's poll to drop the model")
    assert d.request(ModelsRequest()).serving is None and d.running

    missing = cli(d, "models", "promote", "v0099")
    assert missing.returncode == 1 and "v0099" in missing.stderr

    status = cli(d, "status")
    assert status.returncode == 0 and "trainer" in status.stdout and "model" in status.stdout
    assert re.search(r"last check (\(\d+ s ago\) |not checked yet)", status.stdout), status.stdout
    assert " in the spool)" in status.stdout  # how much acknowledged ingest DuckDB has yet to load
