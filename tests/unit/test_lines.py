"""Model lines (reflexd.lines): which line an agent learns in, where it lives, how versions are numbered."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reflexd.config import ConfigError, LearningConfig, feature_spec, parse_config
from reflexd.lines import SHARED, folder_name, line_folders, line_of, line_path, next_number
from reflexd.registry import Registry


def test_each_scope_puts_an_agent_in_its_line() -> None:
    assert line_of("router", LearningConfig()) == "agent:router"  # the default: every agent alone
    assert line_of("router", LearningConfig(scope="shared")) == SHARED
    grouped = LearningConfig(scope="group", groups={"support": ["triage", "refunds"]})
    assert line_of("refunds", grouped) == "group:support"
    assert line_of("router", grouped) == "agent:router"  # in no group: alone


def test_models_read_the_agent_wherever_a_line_may_hold_several_agents() -> None:
    """A group's agents share one model as a shared line's do: the agent's id is one of its inputs,
    so that it can tell them apart where their worlds differ; an agent's own line needs none."""
    assert feature_spec(parse_config("learning: {scope: shared}")).agent is True
    assert feature_spec(parse_config("learning: {scope: group, groups: {support: [triage, refunds]}}")).agent is True
    assert feature_spec(parse_config("")).agent is False


def test_line_folders_sit_under_the_models_directory(tmp_path: Path) -> None:
    assert line_path(tmp_path, SHARED) == tmp_path
    assert line_path(tmp_path, "agent:router") == tmp_path / "agents" / "router"
    assert line_path(tmp_path, "group:support") == tmp_path / "groups" / "support"


@given(st.text(min_size=1, max_size=256))
def test_any_agent_id_is_one_safe_folder_name(agent: str) -> None:
    name = folder_name(agent)
    assert "/" not in name and "\0" not in name and name not in (".", "..") and not name.startswith(".")
    assert 0 < len(name.encode()) <= 120


def test_distinct_agents_get_distinct_folders() -> None:
    ids = ["a/b", "a%2Fb", "..", ".", "a b", "é", "x" * 300, "x" * 299 + "y", "plain-id_1.v2"]
    assert len({folder_name(a) for a in ids}) == len(ids)
    assert folder_name("plain-id_1.v2") == "plain-id_1.v2"  # plain names stay readable


def test_version_numbers_are_counted_across_lines(tmp_path: Path) -> None:
    left = Registry(line_path(tmp_path, "agent:left"), tmp_path)
    right = Registry(line_path(tmp_path, "agent:right"), tmp_path)
    (left.root / "v0003").mkdir(parents=True)  # a folder without its manifest still holds its number
    assert next_number(tmp_path) == 4 and right.next_version() == "v0004"
    (tmp_path / "v0007").mkdir()  # the shared line's own
    assert left.next_version() == "v0008"
    assert set(line_folders(tmp_path)) == {tmp_path, left.root}  # right has no folder yet


def test_the_config_checks_its_groups() -> None:
    with pytest.raises(ConfigError, match="learning.groups: only read with learning.scope: group"):
        parse_config("learning: {groups: {a: [x]}}\n")
    with pytest.raises(ConfigError, match="learning.groups.b: agent 'x' is listed in group 'a' already"):
        parse_config("learning: {scope: group, groups: {a: [x], b: [x]}}\n")
    with pytest.raises(ConfigError, match="learning.groups.a: agent 'x' is listed twice"):
        parse_config("learning: {scope: group, groups: {a: [x, y, x]}}\n")
    with pytest.raises(ConfigError, match="learning.groups.b: lists no agent"):
        parse_config("learning: {scope: group, groups: {a: [x], b: []}}\n")
    with pytest.raises(ConfigError, match="learning.scope"):
        parse_config("learning: {scope: everyone}\n")
    assert parse_config("learning: {scope: group, groups: {a: [x, y]}}\n").learning.groups == {"a": ["x", "y"]}
