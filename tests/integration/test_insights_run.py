"""``python -m reflexd.analysis`` as the daemon runs it: a real subprocess on a snapshot the store
wrote (decisions and outcomes loaded from a spool segment into a DuckDB file, then
``Store.snapshot``), its insights.json read back with ``result.read_insights``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest

from linear_models import register
from reflexd.analysis.findings import ExtractionInputs, ModelRecord
from reflexd.analysis.result import EXIT_FAILED, INSIGHTS_FILE, encode_inputs, read_insights
from reflexd.config import Config, InsightsConfig
from reflexd.errors import AnalysisError
from reflexd.features import FeatureSpec
from reflexd.registry import Registry
from reflexd.service import spool
from reflexd.service.store import Store
from reflexd.wire.protocol import Decision, Outcome

N = 6000
NOW = N + 1000.0


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A router whose ``tools`` beats ``plain`` by 0.3 on code tasks and loses 0.2 elsewhere,
    logged uniformly at random, stored as ingest stores it, 20 decisions per spool line."""
    root = tmp_path_factory.mktemp("insights")
    rng = np.random.default_rng(3)
    lines = []
    batch: list[Decision | Outcome] = []
    for i in range(N):
        task = ["code", "chat"][int(rng.integers(0, 2))]
        chosen = ["plain", "tools"][int(rng.integers(0, 2))]
        lift = (0.3 if task == "code" else -0.2) if chosen == "tools" else 0.0
        reward = float(0.5 + lift + rng.normal(0, 0.3))
        batch.append(Decision(id=f"d{i}", agent="router", context={"task": task, "size": float(rng.random())},
                              actions=["plain", "tools"], chosen=chosen, prob=0.5, ts=float(i)))
        batch.append(Outcome(decision_id=f"d{i}", reward=reward, id=f"o{i}", ts=float(i)))
        if (i + 1) % 20 == 0:
            lines.append(spool.encode_line(batch, float(i), len(lines)))
            batch = []
    segment = root / f"segment{spool.SUFFIX}"
    segment.write_bytes(b"".join(lines))
    dest = root / "snapshot.parquet"
    with Store(root / "reflexd.duckdb") as store:
        store.load(segment)
        store.snapshot(dest, NOW, Config(), max_rows=100_000)
    return dest


def _run(snapshot: Path, out: Path, inputs: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reflexd.analysis", str(snapshot), str(out), "--inputs", str(inputs), *extra],
        check=False, capture_output=True, text=True, timeout=120,
    )


def test_the_subprocess_writes_insights_the_daemon_can_read(snapshot: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs.json"
    inputs.write_bytes(encode_inputs(ExtractionInputs(
        now=NOW,
        training_windows={"": [0.0, 3000.0]},
        models=[ModelRecord(version="v0001", live_from=100.0, predicted=0.5, predicted_low=0.45, predicted_high=0.55)],
        dead_letters=[10.0, 20.0],
    )))
    config = tmp_path / "config.json"
    config.write_bytes(msgspec.json.encode(Config(insights=InsightsConfig(min_support=100))))
    done = _run(snapshot, tmp_path / "out", inputs, "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert "event=done" in done.stderr
    insights = read_insights(tmp_path / "out")
    assert insights.rows == N and insights.agents == ["router"] and insights.reward_model == "cross_fit"
    rules = {(r.action, r.baseline, tuple((c.feature, c.op, c.value) for c in r.when)): r
             for r in insights.rules if r.status == "published"}
    # tools is the better action overall (0.55 against 0.5), so it is the baseline: plain loses on
    # code and wins on chat
    code = rules[("plain", "tools", (("task", "==", "code"),))]
    assert code.ci[0] <= -0.3 <= code.ci[1] and code.confirmed_window[0] > code.found_window[1]
    chat = rules[("plain", "tools", (("task", "==", "chat"),))]
    assert chat.ci[0] <= 0.2 <= chat.ci[1]
    assert {p.action for p in insights.patterns} == {"plain", "tools"}
    assert {t.metric for t in insights.trends} == {"reward", "dr_value"}
    assert insights.counts.rules_published == len(rules)
    # the file is plain JSON with the lists the CLI's --json shows
    raw = json.loads((tmp_path / "out" / INSIGHTS_FILE).read_text())
    assert {"rules", "patterns", "anomalies", "trends"} <= set(raw)
    assert {"agent", "action", "baseline", "when", "lift", "ci", "support", "status", "first_seen", "last_confirmed"} <= set(raw["rules"][0])


def test_the_live_model_is_the_reward_model_when_given(snapshot: Path, tmp_path: Path) -> None:
    spec = FeatureSpec()
    registry = Registry(tmp_path / "models")
    manifest = register(registry, tmp_path, spec, {"plain": 0.5, "tools": 0.55}, {})
    inputs = tmp_path / "inputs.json"
    inputs.write_bytes(encode_inputs(ExtractionInputs(now=NOW)))
    done = _run(snapshot, tmp_path / "out", inputs, "--model-dir", str(registry.root / manifest.version))
    assert done.returncode == 0, done.stderr
    insights = read_insights(tmp_path / "out")
    assert insights.reward_model == f"live {manifest.version}"
    # a reward model that ignores the context leaves DR unbiased: the same rules hold
    found = {tuple((c.feature, c.value) for c in r.when): r.lift for r in insights.rules if r.status == "published"}
    assert found[(("task", "code"),)] < 0 < found[(("task", "chat"),)]


def test_bad_inputs_fail_with_exit_2_and_the_reason_in_the_result(snapshot: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs.json"
    inputs.write_text('{"now": "soon"}')
    done = _run(snapshot, tmp_path / "out", inputs)
    assert done.returncode == EXIT_FAILED
    assert "invalid --inputs" in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(AnalysisError, match="invalid --inputs"):
        read_insights(tmp_path / "out")

    inputs.write_bytes(encode_inputs(ExtractionInputs(now=NOW)))
    done = _run(tmp_path / "missing.parquet", tmp_path / "out2", inputs)
    assert done.returncode == EXIT_FAILED and "no such file" in done.stderr
