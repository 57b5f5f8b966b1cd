"""Scoring without logging and explaining, against a daemon subprocess over its socket and CLI.

Known truth: before any model the default policy's epsilon decays with each logged decision
(epsilon / (1 + t)), so the probabilities a ``decide`` with ``log: false`` returns show exactly
where exploration's clock stands; and the model put live afterwards scores by the context's
``task`` alone, so ``reflexd explain`` must put ``task`` first and give every other key 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import onnx
from conftest import DaemonProcess, line_registry
from onnx import TensorProto, helper, numpy_helper
from reflexd.config import ExplorationConfig
from reflexd.features import FeatureSpec, Hasher
from reflexd.wire.connection import Connection
from reflexd.wire.protocol import Ack, Decide, Decided, Explain, Explanation, Flush, Promote, Scored

pytestmark = pytest.mark.e2e

REFLEXD = Path(sys.executable).parent / "reflexd"
EPSILON = {"strategy": "epsilon_greedy", "epsilon": 0.5, "epsilon_min": 0.0, "decay": 1.0, "default_action": "q"}
TASKS = ("code", "chat", "math")
DC, DA = 64, 8


def default_probs(t: int) -> list[float]:
    """The default policy over p, q, r with default action q after t logged decisions."""
    eps = 0.5 / (1 + t)
    return [eps / 3, 1 - eps + eps / 3, eps / 3]


def ctx(i: int) -> dict[str, Any]:
    return {"task": TASKS[i % 3], "lang": ("en", "de")[i % 2], "tokens": 50 * i, "user": {"tier": "pro", "email": "a@b"}}


def experience(d: DaemonProcess) -> tuple[dict[str, int], int]:
    """What the store holds once everything sent is loaded, and how many events the daemon took in."""
    with Connection(d.socket) as conn:
        assert isinstance(conn.request(Flush(loaded=True)), Ack)
    status = d.loaded_status()
    stored = {k: v for k, v in status.experience.items() if k != "new_since_training"}  # that one matures with time
    return stored, status.ingest["received"]


def reflexd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REFLEXD), *args], capture_output=True, text=True, timeout=120, check=False)


def task_spec() -> tuple[FeatureSpec, np.ndarray]:
    """A feature seed under which task's slots are its own, and the mask of those slots."""
    for seed in range(200):
        spec = FeatureSpec(context_dim=DC, action_dim=DA, seed=seed)
        hasher = Hasher(spec)
        task = {int(j) for t in TASKS for j in np.flatnonzero(hasher.context({"task": t}))}
        rest = {int(j) for i in range(6) for j in np.flatnonzero(hasher.context({**ctx(i), "task": None}))}
        if len(task) == len(TASKS) and not task & rest:
            mask = np.zeros(DC, dtype=np.float32)
            mask[sorted(task)] = 1.0
            return spec, mask
    raise AssertionError("no seed keeps task's slots apart")


def task_model(path: Path, mask: np.ndarray) -> Path:
    """scores[b, a] = actions[b, a] · ((context[b] ⊙ mask) @ M): only the masked slots count."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(mask, "mask"),
        numpy_helper.from_array(rng.normal(size=(DC, DA)).astype(np.float32), "m"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last"),
    ]
    nodes = [
        helper.make_node("Mul", ["context", "mask"], ["masked"]),
        helper.make_node("MatMul", ["masked", "m"], ["mixed"]),
        helper.make_node("Unsqueeze", ["mixed", "one"], ["mixed3"]),
        helper.make_node("Mul", ["actions", "mixed3"], ["am"]),
        helper.make_node("ReduceSum", ["am", "last"], ["scores"], keepdims=0),
        helper.make_node("Abs", ["scores"], ["spread"]),
    ]
    graph = helper.make_graph(
        nodes,
        "task-only",
        [
            helper.make_tensor_value_info("context", TensorProto.FLOAT, ["batch", DC]),
            helper.make_tensor_value_info("actions", TensorProto.FLOAT, ["batch", "n_actions", DA]),
        ],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", "n_actions"]),
            helper.make_tensor_value_info("spread", TensorProto.FLOAT, ["batch", "n_actions"]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    path.write_bytes(model.SerializeToString())
    return path


def test_unlogged_decides_and_explains_store_nothing_and_leave_the_clock_alone(daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory({"exploration": EPSILON, "redaction": {"drop": ["user.email"]}})
    before = experience(d)
    with Connection(d.socket) as conn:
        # pipelined, so the daemon reads them together and answers them as one batch
        conn.send([Decide(agent="a", context=ctx(i), actions=["p", "q", "r"], log=False, req=i) for i in range(40)])
        replies = [conn.receive() for _ in range(40)]
        explained = conn.request(Explain(agent="a", context=ctx(0), actions=["p", "q", "r"], req="e"))
    assert all(isinstance(r, Scored) for r in replies) and [r.req for r in replies] == list(range(40))
    assert all(r.scores is None and r.spread is None and r.strategy == "default" and r.id is None for r in replies)
    assert all(r.probs == pytest.approx(default_probs(0)) for r in replies)
    assert isinstance(explained, Explanation) and explained.req == "e" and explained.keys == []
    assert [a.prob for a in explained.actions] == pytest.approx(default_probs(0))
    # apprentice mode: the agent's own choice, explained as a decision serves it
    args = ("explain", "--socket", d.socket, "--agent", "a", "--context", json.dumps(ctx(0)), "--actions", "p,q,r")
    served = reflexd(*args, "--default", "q", "--json")
    assert served.returncode == 0, served.stderr
    with Connection(d.socket) as conn:
        scored = conn.request(Decide(agent="a", context=ctx(0), actions=["p", "q", "r"], default="q", log=False))
    doc = json.loads(served.stdout)
    assert doc["strategy"] == "default" and doc["chosen"] == "q" and doc["keys"] == []
    assert [a["prob"] for a in doc["actions"]] == pytest.approx(scored.probs)
    wrong = reflexd(*args, "--default", "z")
    assert wrong.returncode == 1 and "default 'z' is not among the actions" in wrong.stderr, wrong.stderr
    assert experience(d) == before  # nothing stored, nothing even received

    # the clock stood still: the first logged decision is still made at t = 0, and it moves it
    with Connection(d.socket) as conn:
        decided = conn.request(Decide(agent="a", context=ctx(1), actions=["p", "q", "r"], id="only"))
        after = conn.request(Decide(agent="a", context=ctx(1), actions=["p", "q", "r"], id="echo", log=False))
    assert isinstance(decided, Decided) and decided.prob == pytest.approx(default_probs(0)[["p", "q", "r"].index(decided.action)])
    assert isinstance(after, Scored) and after.id == "echo" and after.probs == pytest.approx(default_probs(1))
    stored, received = experience(d)
    assert stored["decisions"] == before[0]["decisions"] + 1 and received == before[1] + 1

    # a model that scores by task alone goes live; the command line explains and scores with it
    spec, mask = task_spec()
    registry = line_registry(d, "a")
    registry.add(
        task_model(tmp_path / "task.onnx", mask),
        {
            "parent": None, "created": 1_700_000_000.0, "learner": "test", "features": spec,
            "exploration": ExplorationConfig(strategy="softmax", temperature=0.5, epsilon_min=0.05),
        },
    )
    with Connection(d.socket) as conn:
        conn.request(Promote(version="v0001", agent="a"))
    context = json.dumps(ctx(2))
    proc = reflexd("explain", "--socket", d.socket, "--agent", "a", "--context", context, "--actions", "p,q,r", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["type"] == "explanation" and doc["model_version"] == "v0001" and doc["strategy"] == "softmax"
    keys = [k["key"] for k in doc["keys"]]
    assert keys[0] == "task" and set(keys) == {"task", "lang", "tokens", "user.tier"}  # user.email dropped
    assert doc["keys"][0]["margin"] > 0 and all(k["margin"] == 0 and k["score"] == 0 for k in doc["keys"][1:])
    scores = [a["score"] for a in doc["actions"]]
    assert doc["chosen"] == "pqr"[scores.index(max(scores))]

    top = reflexd("explain", "--socket", d.socket, "--agent", "a", "--context", context, "--actions", "p,q,r", "--top", "1")
    assert top.returncode == 0, top.stderr
    assert "model v0001 (softmax)" in top.stdout and top.stdout.strip().splitlines()[-1].split()[0] == "task"
    assert "lang" not in top.stdout

    proc = reflexd("decide", "--socket", d.socket, "--agent", "a", "--context", context, "--actions", "p,q,r", "--no-log", "--json")
    assert proc.returncode == 0, proc.stderr
    scored = json.loads(proc.stdout)
    assert scored["type"] == "scored" and scored["actions"] == ["p", "q", "r"] and scored["model_version"] == "v0001"
    assert scored["scores"] == pytest.approx(scores) and scored["probs"] == pytest.approx([a["prob"] for a in doc["actions"]])
    assert experience(d) == (stored, received)  # the model's scoring logged nothing either
    # without --json, a table: each action's score, spread and probability, as the JSON gives them
    table = reflexd("decide", "--socket", d.socket, "--agent", "a", "--context", context, "--actions", "p,q,r", "--no-log")
    assert table.returncode == 0, table.stderr
    head, columns, *rows = table.stdout.strip().splitlines()
    assert head == "model v0001 (softmax); nothing logged" and columns.split() == ["action", "score", "spread", "prob"]
    assert [row.split()[0] for row in rows] == ["p", "q", "r"]
    assert [float(row.split()[1]) for row in rows] == pytest.approx(scored["scores"], abs=1e-4)
    assert [float(row.split()[3]) for row in rows] == pytest.approx(scored["probs"], abs=1e-4)
    assert experience(d) == (stored, received)
