"""Review of model lines (learning.scope): regressions for defects found in review."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pyarrow as pa

from reflexd.analysis import experience
from reflexd.config import parse_config
from reflexd.features import FeatureSpec, Hasher, with_agent
from reflexd.service.lines import Lines


def _config(root: Path, learning: str) -> Any:
    return parse_config(f"state_dir: {root}\nlearning: {learning}\n")


def test_an_agent_now_in_a_group_gets_no_line_of_its_own_from_its_old_folder(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "{scope: group, groups: {g: [A]}}")
    (cfg.models_path / "agents" / "A").mkdir(parents=True)  # A learned alone before the group was configured
    (cfg.models_path / "agents" / "B").mkdir(parents=True)  # B is in no group: its own line still
    lines = Lines(lambda: cfg, lambda agent, manifest: cfg.exploration)
    lines.open(["A"], lambda line: None)
    assert [line.name for line in lines.all()] == ["agent:B", "group:g"]


def test_a_line_that_cannot_start_yet_does_not_stop_the_daemon(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "{scope: agent}")
    lines = Lines(lambda: cfg, lambda agent, manifest: cfg.exploration)
    lines.open([], lambda line: None)
    lines.for_agent("A")
    tries = []

    async def start(line: Any, tg: Any) -> None:
        tries.append(line.name)
        if len(tries) == 1:
            raise OSError(errno.EMFILE, "Too many open files")  # the registry unreadable for now

    class Store:
        def agents(self) -> list[str]:
            return []

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lines.run, Store(), tg, start)
            with anyio.move_on_after(3):
                while len(tries) < 2:
                    await anyio.sleep(0.05)
            tg.cancel_scope.cancel()

    anyio.run(main)
    assert tries == ["agent:A", "agent:A"]  # tried again, and the task group lived on


class _Spy:
    """A scorer as ``experience`` uses one, keeping the hashed contexts it was handed."""

    def __init__(self, spec: FeatureSpec) -> None:
        self.hasher = Hasher(spec)
        self.manifest = type("M", (), {"features": spec})()
        self.version = "v0001"
        self.seen: list[np.ndarray] = []

    def score_batch(self, ctx: np.ndarray, acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.seen.append(ctx.copy())
        n, a = acts.shape[:2]
        return np.zeros((n, a), dtype=np.float32), np.zeros((n, a), dtype=np.float32)


def test_insights_score_a_shared_lines_model_with_the_agent_it_reads() -> None:
    spec = FeatureSpec(16, 8, 0, agent=True)
    spy = _Spy(spec)
    rows = [
        {"id": f"d{i}", "agent": agent, "received_at": float(i), "context": json.dumps({"n": 1}),
         "actions": '["x", "y"]', "chosen": "x", "prob": 0.5, "reward": 1.0, "model_version": "v0001"}
        for i, agent in enumerate(["left", "right"])
    ]
    experience.from_table(pa.Table.from_pylist(rows), spy)
    hasher = Hasher(spec)
    expected = np.stack([hasher.context(with_agent(spec, agent, {"n": 1})) for agent in ("left", "right")])
    assert np.array_equal(np.concatenate(spy.seen), expected)


def test_an_install_from_before_lines_is_told_its_live_model_is_no_longer_served(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    cfg = _config(tmp_path, "{scope: agent}")
    cfg.models_path.mkdir(parents=True)
    (cfg.models_path / "CURRENT").write_text("v0003\n")  # the one registry before lines
    lines = Lines(lambda: cfg, lambda agent, manifest: cfg.exploration)
    with capture_logs() as logs:
        lines.open(["router"], lambda line: None)
    assert [e.get("version") for e in logs if "not served" in e["event"]] == ["v0003"]
    assert lines.all()[0].registry.current() is None  # router's own line: nothing live yet


def test_client_settings_from_before_lines_mean_one_registry(tmp_path: Path) -> None:
    import msgspec

    from reflexd.config import client_settings, read_client_settings
    from reflexd.lines import line_of, line_path

    published = msgspec.to_builtins(client_settings(_config(tmp_path, "{scope: agent}")))
    published.pop("learning")  # what a daemon from before lines wrote: it serves models/ itself
    models = tmp_path / "models"
    models.mkdir()
    (models / "clients.json").write_text(json.dumps(published))
    settings = read_client_settings(models)
    assert settings is not None and line_path(models, line_of("router", settings.learning)) == models


def test_a_group_has_a_name() -> None:
    import pytest

    from reflexd.config import ConfigError

    with pytest.raises(ConfigError, match="learning.groups"):
        parse_config('learning: {scope: group, groups: {"": [a]}}\n')  # its folder would be models/groups itself


def test_an_agent_whose_id_is_encoded_on_disk_gets_its_line_at_start(tmp_path: Path) -> None:
    from reflexd.lines import folder_name, line_path

    cfg = _config(tmp_path, "{scope: agent}")
    for agent in ("team/router", "..", "é x"):  # quiet past retention.days: none of its decisions in the store
        line_path(cfg.models_path, f"agent:{agent}").mkdir(parents=True)
    (cfg.models_path / "agents" / "bad%ZZ").mkdir()  # not a folder_name: no agent's
    (cfg.models_path / "agents" / "bad%FF").mkdir()  # nor is this: no UTF-8
    (cfg.models_path / "agents" / folder_name("x" * 300)).mkdir()  # cut short: only the store can say whose
    lines = Lines(lambda: cfg, lambda agent, manifest: cfg.exploration)
    lines.open([], lambda line: None)
    assert [line.name for line in lines.all()] == ["agent:..", "agent:team/router", "agent:é x"]
