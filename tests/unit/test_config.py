"""The config file: the shipped default, the key paths in errors, per-agent merging, the CLI check."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from reflexd.config import (
    AgentConfig,
    Config,
    ExplorationConfig,
    RewardConfig,
    load_config,
    parse_config,
)
from reflexd.errors import ConfigError
from reflexd.split import cross_fitted, first_run_rows, holdout_run_rows

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "configs" / "reflexd.yaml"
REFLEXD = Path(sys.executable).parent / "reflexd"


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="test.yaml")
    assert info.value.source == "test.yaml"
    assert info.value.problems, "a ConfigError must carry at least one problem"
    return info.value.problems


def one_problem(text: str) -> str:
    problems = problems_of(text)
    assert len(problems) == 1, problems
    return problems[0]


# ---- the shipped file ---------------------------------------------------------------------


def test_shipped_file_equals_all_defaults() -> None:
    shipped = load_config(SHIPPED)
    default = Config()
    # compare section by section first, so a difference names the section
    for field in msgspec.structs.fields(Config):
        assert getattr(shipped, field.name) == getattr(default, field.name), field.name
    assert shipped == default


def _struct_type(tp: Any) -> type | None:
    return tp if isinstance(tp, type) and issubclass(tp, msgspec.Struct) else None


def _walk(struct_type: type, raw: Any, path: str, missing: list[str]) -> None:
    assert isinstance(raw, dict), f"{path or 'top level'} should be a mapping in the shipped file"
    for field in msgspec.structs.fields(struct_type):
        key = f"{path}.{field.name}" if path else field.name
        if field.encode_name not in raw:
            missing.append(key)
            continue
        sub = _struct_type(field.type)
        if sub is not None:
            _walk(sub, raw[field.encode_name], key, missing)


def test_every_config_key_appears_in_shipped_file() -> None:
    raw = yaml.safe_load(SHIPPED.read_text())
    missing: list[str] = []
    _walk(Config, raw, "", missing)
    assert missing == []
    # and the walk really went into the sections
    assert "max_frame_bytes" in raw["socket"] and "default_action" in raw["exploration"]


_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][A-Za-z0-9_]*):(?P<rest>.*)$")


def test_every_key_in_shipped_file_is_commented() -> None:
    """Every key is explained by a comment right above it.

    Leaf keys: the line above is a comment, or the key follows other keys of its section that
    sit right under a comment block which names it (one comment explaining a small group, like
    allowed_uids/allowed_gids or epsilon_min/decay). Section headers (``socket:``) are explained
    by the comments on their keys: the first line inside every section must be a comment.
    """
    lines = SHIPPED.read_text().splitlines()
    uncommented: list[str] = []
    checked = 0
    for i, line in enumerate(lines):
        m = _KEY_LINE.match(line)
        if m is None:
            continue
        checked += 1
        key = m["key"]
        if m["rest"].strip() == "":  # a section header
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if not nxt.lstrip().startswith("#"):
                uncommented.append(f"line {i + 1}: section {key} does not start with a comment")
            continue
        if i > 0 and lines[i - 1].lstrip().startswith("#"):
            continue
        # grouped: walk up over sibling keys to the comment block heading the group
        j = i - 1
        while j >= 0:
            prev = _KEY_LINE.match(lines[j])
            if prev is None or prev["indent"] != m["indent"] or prev["rest"].strip() == "":
                break
            j -= 1
        block = []
        while j >= 0 and lines[j].lstrip().startswith("#"):
            block.append(lines[j])
            j -= 1
        names = {key, key.rsplit("_", 1)[-1]}
        if not block or not any(re.search(rf"\b{re.escape(n)}\b", " ".join(block)) for n in names):
            uncommented.append(f"line {i + 1}: {key}")
    assert checked > 60, "the key-line pattern should match the whole shipped file"
    assert uncommented == []


def test_empty_file_gives_defaults() -> None:
    assert parse_config("") == Config()
    assert parse_config("# only a comment\n") == Config()


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.state_dir = "/tmp/x"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.socket.max_frame_bytes = 1  # type: ignore[misc]


# ---- errors name the key path -------------------------------------------------------------


def test_unknown_top_level_key_rejected() -> None:
    msg = one_problem("state_dir: /x\nbogus_key: 1\n")
    assert "bogus_key" in msg


def test_unknown_nested_key_names_section_and_key() -> None:
    msg = one_problem("socket:\n  bogus_key: 1\n")
    assert msg.startswith("socket")
    assert "bogus_key" in msg


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("socket:\n  max_frame_bytes: big\n", "socket.max_frame_bytes"),
        ("socket:\n  max_frame_bytes: true\n", "socket.max_frame_bytes"),
        ("rewards:\n  wait_window: soon\n", "rewards.wait_window"),
        ("log:\n  level: 3\n", "log.level"),
        ("state_dir: [a, b]\n", "state_dir"),
        ("socket:\n  allowed_uids: [1, x]\n", "socket.allowed_uids"),
        ("exploration: 5\n", "exploration"),
    ],
)
def test_wrong_type_names_the_path(text: str, path: str) -> None:
    msg = one_problem(text)
    assert msg.startswith(path + ":") or msg.startswith(path + "."), msg
    assert "expected" in msg


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("ingest:\n  batch_size: -1\n", "ingest.batch_size"),
        ("ingest:\n  batch_size: 0\n", "ingest.batch_size"),
        ("rewards:\n  wait_window: -0.5\n", "rewards.wait_window"),
        ("trainer:\n  holdout_fraction: 1.5\n", "trainer.holdout_fraction"),
        ("trainer:\n  holdout_fraction: 0\n", "trainer.holdout_fraction"),
        ("trainer:\n  ensemble: 33\n", "trainer.ensemble"),
        ("exploration:\n  epsilon: 1.01\n", "exploration.epsilon"),
        ("gate:\n  confidence: 0.5\n", "gate.confidence"),
        ("features:\n  seed: 4294967296\n", "features.seed"),
        ("rewards:\n  aggregation: median\n", "rewards.aggregation"),
        ("exploration:\n  strategy: boltzmann\n", "exploration.strategy"),
        ("retention:\n  compression: lz4\n", "retention.compression"),
        ("socket:\n  mode: '0999'\n", "socket.mode"),
        ("socket:\n  mode: 'rw-rw----'\n", "socket.mode"),
        ("socket:\n  mode: '66'\n", "socket.mode"),
    ],
)
def test_constraint_violation_names_the_path(text: str, path: str) -> None:
    assert one_problem(text).startswith(path + ":")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("rewards:\n  aggregation: median\n", "rewards.aggregation: invalid enum value 'median'; expected one of sum, first, last, mean, min, max"),
        ("agents:\n  a:\n    rewards:\n      aggregation: x\n", "agents.a.rewards.aggregation: invalid enum value 'x'; expected one of sum, first, last, mean, min, max"),
    ],
)
def test_a_value_not_among_a_settings_choices_is_refused_with_the_choices(text: str, problem: str) -> None:
    assert one_problem(text) == problem


@pytest.mark.parametrize("mode", [660, 640, 600])
def test_an_unquoted_decimal_mode_is_refused_with_how_to_write_it(mode: int) -> None:
    problem = one_problem(f"socket:\n  mode: {mode}\n")
    assert problem.startswith(f"socket.mode: {mode} ({mode:#o} in octal) has bits beyond 0777: write the mode quoted")
    assert parse_config(f"socket:\n  mode: 0{mode}\n").socket.mode_bits == int(str(mode), 8)  # YAML's octal int


@pytest.mark.parametrize(("mode", "bits"), [("0660", 0o660), ("640", 0o640), ("01777", 0o1777)])
def test_valid_octal_modes(mode: str, bits: int) -> None:
    assert parse_config(f"socket:\n  mode: '{mode}'\n").socket.mode_bits == bits


def test_epsilon_min_above_epsilon_rejected() -> None:
    msg = one_problem("exploration:\n  epsilon: 0.1\n  epsilon_min: 0.2\n")
    assert msg.startswith("exploration.epsilon_min:")
    # equal is fine
    assert parse_config("exploration:\n  epsilon: 0.2\n  epsilon_min: 0.2\n").exploration.epsilon_min == 0.2


def test_a_mappings_key_is_named_in_its_values_errors() -> None:
    """msgspec leaves a mapping's key out of its paths (``learning.groups[...]``); the config names it."""
    assert one_problem("learning: {scope: group, groups: {ok: [a], support: triage}}").startswith(
        "learning.groups.support: expected `array`, got `str`"
    )
    assert one_problem("learning: {scope: group, groups: {support: [triage, '']}}").startswith(
        "learning.groups.support.1: expected `str` of length >= 1"
    )


def test_max_examples_too_small_for_a_holdout_run_is_rejected() -> None:
    needed = holdout_run_rows(Config())
    msg = one_problem(f"trainer:\n  max_examples: {needed - 1}\n")
    assert msg.startswith("trainer.max_examples:") and f"at least {needed} experiences" in msg, msg
    assert parse_config(f"trainer:\n  max_examples: {needed}\n").trainer.max_examples == needed
    # a larger holdout fraction raises the floor with it
    wider = holdout_run_rows(parse_config("trainer:\n  holdout_fraction: 0.5\n"))
    assert wider > needed
    assert one_problem(f"trainer:\n  holdout_fraction: 0.5\n  max_examples: {wider - 1}\n").startswith(
        "trainer.max_examples:"
    )


def test_cross_fitted_runs_start_where_the_gate_can_judge_them() -> None:
    config = Config()
    assert first_run_rows(config) == config.trainer.cross_fit_from < holdout_run_rows(config)
    assert [cross_fitted(config, n) for n in (6, 12, 13)] == [True, True, False]
    off = parse_config("trainer:\n  cross_fit_from: 0\n")
    assert first_run_rows(off) == holdout_run_rows(off) and not cross_fitted(off, 12)
    # from the first holdout run's size on, the setting changes nothing
    late = parse_config(f"trainer:\n  cross_fit_from: {holdout_run_rows(config) + 5}\n")
    assert first_run_rows(late) == holdout_run_rows(config) and not cross_fitted(late, 12)
    # below the rows the gate judges a first model on, cross-fitting starts there: a config that
    # asks for more of them, written before cross-fitting existed, still loads
    assert first_run_rows(parse_config("gate:\n  first_min_holdout: 7\n")) == 7
    assert first_run_rows(parse_config("trainer:\n  cross_fit_from: 3\ngate:\n  first_min_holdout: 4\n")) == 4
    assert one_problem("trainer:\n  cross_fit_from: -1\n").startswith("trainer.cross_fit_from:")


def test_max_examples_whose_holdout_cannot_judge_a_replacement_is_rejected() -> None:
    # 20 rows hold out 4: enough for a first model (3) but not for gate.min_holdout 5
    msg = one_problem("trainer:\n  max_examples: 20\ngate:\n  min_holdout: 5\n")
    assert msg.startswith("trainer.max_examples:") and "gate.min_holdout (5)" in msg, msg
    assert parse_config("trainer:\n  max_examples: 25\ngate:\n  min_holdout: 5\n").trainer.max_examples == 25


def test_invalid_yaml_gives_line_and_column() -> None:
    # line 2 is "  b: 2": the offending ':' is its 4th character
    msg = one_problem("a: 1\n  b: 2\n")
    assert "line 2, column 4" in msg
    assert "YAML" in msg


def test_a_key_given_twice_is_refused_with_both_lines() -> None:
    # a second section appended below the first would silently undo the first
    msg = one_problem("socket:\n  path: /tmp/r/r.sock\nstate_dir: /tmp/r\nsocket:\n  max_frame_bytes: 2048\n")
    assert "line 4, column 1" in msg and "'socket' is given twice (first at line 1)" in msg
    assert "'mode' is given twice (first at line 2)" in one_problem("socket:\n  mode: '0660'\n  mode: '0600'\n")
    # a merged mapping's keys may still be overridden, as YAML allows
    assert parse_config("online: {<<: {prior: 2.0}, prior: 3.0}\n").online.prior == 3.0
    # and one merged from an anchor that itself merges and overrides, which is flattened before it is built
    nested = ("agents:\n  a: {exploration: &a {gamma: 1.0}}\n  b: {exploration: &b {<<: *a, gamma: 2.0}}\n"
              "exploration: {<<: *b}\n")
    assert parse_config(nested).exploration.gamma == 2.0


def test_the_places_the_daemon_makes_are_absolute_and_a_socket_path_fits() -> None:
    assert problems_of('state_dir: ""\n') == ["state_dir: '' is not an absolute path; under systemd the daemon runs in /"]
    assert "('~' is not expanded)" in one_problem("state_dir: ~/reflexd\n")
    assert one_problem("socket: {path: run/r.sock}\n").startswith("socket.path: 'run/r.sock' is not an absolute path")
    long = "/tmp/" + "d" * 100 + "/r.sock"  # 112 bytes: bind() would fail with 'AF_UNIX path too long'
    assert one_problem(f"socket: {{path: {long}}}\n") == "socket.path: 112 bytes long; a Unix socket's path may have at most 107"
    assert one_problem(f"traces: {{enabled: true, path: {long}}}\n").startswith("traces.path: 112 bytes long")
    parse_config(f"traces: {{path: {long}}}\n")  # not checked while the receiver is off
    assert parse_config("socket: {path: /" + "s" * 106 + "}\n").socket.path  # 107 bytes fit


def test_top_level_must_be_a_mapping() -> None:
    assert "mapping" in one_problem("- 1\n- 2\n")


def test_section_with_every_key_commented_out_takes_defaults() -> None:
    # The file says "Every key is optional; a missing key takes the value shown here". Commenting
    # out every key of a section leaves the bare header, which YAML reads as null.
    cfg = parse_config("log:\n  # level: debug\n  # format: json\nrewards:\n  wait_window: 5\n")
    assert cfg.log == Config().log
    assert cfg.rewards.wait_window == 5


# ---- per-agent overrides ------------------------------------------------------------------

_AGENTS = """\
rewards:
  wait_window: 7
  default: -1.0
exploration:
  strategy: softmax
  temperature: 0.5
  epsilon: 0.3
agents:
  router:
    rewards: {aggregation: last}
    exploration: {strategy: squarecb, gamma: 3.0}
  plain: {}
"""


def test_agent_override_merges_onto_global_sections() -> None:
    cfg = parse_config(_AGENTS)
    router = cfg.for_agent("router")
    # overridden keys
    assert router.rewards.aggregation == "last"
    assert router.exploration.strategy == "squarecb"
    assert router.exploration.gamma == 3.0
    # keys not overridden inherit the global (non-default) values, not the defaults
    assert router.rewards.wait_window == 7
    assert router.rewards.default == -1.0
    assert router.exploration.temperature == 0.5
    assert router.exploration.epsilon == 0.3
    # keys set nowhere take the default
    assert router.exploration.ucb_c == ExplorationConfig().ucb_c
    # an agent listed with no overrides gets exactly the global sections
    assert cfg.for_agent("plain") == AgentConfig(rewards=cfg.rewards, exploration=cfg.exploration)
    # an agent not listed gets the global sections
    assert cfg.for_agent("nobody") == AgentConfig(rewards=cfg.rewards, exploration=cfg.exploration)
    assert cfg.rewards == RewardConfig(wait_window=7, default=-1.0)


def test_agent_override_does_not_leak_into_global() -> None:
    cfg = parse_config(_AGENTS)
    assert cfg.rewards.aggregation == "sum"
    assert cfg.exploration.strategy == "softmax"


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("agents:\n  router:\n    rewards:\n      wait_window: nope\n", "agents.router.rewards.wait_window"),
        ("agents:\n  router:\n    rewards:\n      wait_window: -3\n", "agents.router.rewards.wait_window"),
        ("agents:\n  router:\n    exploration:\n      strategy: greedy\n", "agents.router.exploration.strategy"),
        ("agents:\n  router:\n    exploration:\n      bogus: 1\n", "agents.router.exploration"),
        ("agents:\n  router:\n    gate: {margin: 1}\n", "agents.router"),
    ],
)
def test_agent_override_errors_name_the_agent_path(text: str, path: str) -> None:
    msg = one_problem(text)
    assert msg.startswith(path + ":"), msg


def test_agent_override_unknown_key_is_named() -> None:
    assert "bogus" in one_problem("agents:\n  router:\n    exploration:\n      bogus: 1\n")
    assert "gate" in one_problem("agents:\n  router:\n    gate: {margin: 1}\n")


def test_agent_epsilon_min_above_inherited_epsilon_rejected() -> None:
    text = "exploration:\n  epsilon_min: 0.05\nagents:\n  router:\n    exploration: {epsilon: 0.01}\n"
    assert one_problem(text).startswith("agents.router.exploration.epsilon_min:")


def test_every_agent_problem_is_reported() -> None:
    text = "agents:\n  a:\n    bogus: {}\n  b:\n    exploration: {epsilon: 2}\n"
    problems = problems_of(text)
    assert len(problems) == 2
    assert problems[0].startswith("agents.a")
    assert problems[1].startswith("agents.b.exploration.epsilon:")


def test_error_in_global_section_is_named_as_global_when_agents_exist() -> None:
    # The problem is in the global rewards section; with an agent listed it must still be
    # reported at rewards.wait_window, not only as if the agent's override were wrong.
    problems = problems_of("rewards:\n  wait_window: -1\nagents:\n  router: {}\n")
    assert any(p.startswith("rewards.wait_window:") for p in problems), problems


def test_a_learner_that_is_not_installed_is_refused_before_any_run_fails_on_it() -> None:
    assert one_problem("trainer: {learner: xgboost}\n") == (
        "trainer.learner: 'xgboost' is not a learner; expected one of mlp, transformer"
    )
    assert parse_config("trainer: {learner: transformer}\n").trainer.learner == "transformer"


def test_a_global_problem_is_reported_once_not_under_each_agent_that_inherits_it() -> None:
    text = (
        "exploration: {epsilon: 0.1, epsilon_min: 0.5, strategy: nope}\nrewards: {default: .nan}\n"
        "agents:\n  a: {rewards: {default: 0}}\n  b: {exploration: {epsilon: 0.9, strategy: squarecb}}\n"
        "  c: {exploration: {strategy: alsonope}, rewards: {default: .inf}}\n"
    )
    assert [p.split(":")[0] for p in problems_of(text)] == [
        "exploration.epsilon_min", "exploration.strategy", "agents.c.exploration.strategy", "rewards.default",
        "agents.c.rewards.default",
    ]


# ---- loading files and the CLI ------------------------------------------------------------


def test_load_config_missing_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "reflexd.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.source == str(missing)
    assert str(missing) in str(info.value)


def test_load_config_reads_file(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("state_dir: /srv/reflexd\nfeatures: {context_dim: 64}\n")
    cfg = load_config(path)
    assert cfg.state_dir == "/srv/reflexd"
    assert cfg.features.context_dim == 64
    assert cfg.models_path == Path("/srv/reflexd/models")


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    assert REFLEXD.exists(), REFLEXD
    return subprocess.run(
        [str(REFLEXD), "check-config", str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def test_cli_check_config_accepts_shipped_file() -> None:
    proc = _check_config(SHIPPED)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


def test_cli_check_config_rejects_bad_file_with_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("agents:\n  a:\n    bogus: {}\n  b:\n    exploration: {epsilon: 2}\n")
    proc = _check_config(bad)
    assert proc.returncode == 78
    assert str(bad) in proc.stderr
    assert "agents.a" in proc.stderr
    assert "agents.b.exploration.epsilon" in proc.stderr


def test_cli_check_config_missing_file(tmp_path: Path) -> None:
    proc = _check_config(tmp_path / "absent.yaml")
    assert proc.returncode == 78
    assert "absent.yaml" in proc.stderr


def test_a_socket_group_that_does_not_exist_is_named() -> None:
    with pytest.raises(ConfigError, match="socket.group: no group named 'no-such-group-x'"):
        parse_config("socket: {group: no-such-group-x}\n")


def test_a_client_reads_the_settings_it_knows_from_a_newer_daemons_clients_json(tmp_path):
    """A daemon upgraded before its agents' clients publishes settings they do not know yet: they
    keep every setting they know (their model line above all) rather than fall back to defaults."""
    import json

    from reflexd.config import CLIENT_SETTINGS_FILE, ClientSettings, LearningConfig, OnlineConfig, read_client_settings

    published = msgspec.to_builtins(
        ClientSettings(learning=LearningConfig(scope="group", groups={"crew": ["a", "b"]}), online=OnlineConfig(prior=3.0))
    )
    published["online"]["a_later_setting"] = 1
    published["agent_rewards"] = {"a": {"wait_window": 2.0, "something_new": True}}
    published["a_later_section"] = {"x": 1}
    (tmp_path / CLIENT_SETTINGS_FILE).write_text(json.dumps(published))
    settings = read_client_settings(tmp_path)
    assert settings.learning.groups == {"crew": ["a", "b"]} and settings.online.prior == 3.0
    assert settings.agent_rewards["a"].wait_window == 2.0
    # a file that is not settings at all still leaves the client on its own defaults
    (tmp_path / CLIENT_SETTINGS_FILE).write_text(json.dumps({"online": {"prior": "high"}}))
    assert read_client_settings(tmp_path) is None
