"""The ``reflexd`` command line as installed: help text with examples, ``--json`` output, exit codes.

Every test runs the real console script (``.venv/bin/reflexd``) as a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from conftest import DaemonProcess, line_registry, wait_for
from linear_models import linear_model
from reflexd.config import parse_config
from reflexd.features import FeatureSpec
from reflexd.manifest import GateResult
from reflexd.tools.cli import _behaviour_line, _print_lines, _removed_counts, build_parser
from reflexd.wire.connection import Connection
from reflexd.wire.protocol import Ack, Decision, Flush, Outcome

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "configs" / "reflexd.yaml"
REFLEXD = Path(sys.executable).parent / "reflexd"
COMMANDS = ["run", "check-config", "check-store", "status", "decide", "reward", "explain", "train", "models", "forget", "import", "evaluate", "insights", "report", "query", "export", "install-service", "fleet", "demo"]
EX_CONFIG = 78


def reflexd(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    assert REFLEXD.exists(), REFLEXD
    return subprocess.run(
        [str(REFLEXD), *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
    )


def as_json(proc: subprocess.CompletedProcess[str], code: int = 0) -> Any:
    """stdout parsed as one JSON document (nothing else may be there), once the exit code is checked."""
    assert proc.returncode == code, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        pytest.fail(f"stdout is not pure JSON ({exc}):\n{proc.stdout}")


# ---- help ----------------------------------------------------------------------------------


def test_every_command_is_covered_here() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_description_and_examples(command: str) -> None:
    proc = reflexd(command, "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "examples:" in out and f"reflexd {command}" in out.split("examples:", 1)[1], out
    # a description paragraph between the usage lines and the argument list
    description = out.split("\n\n", 2)[1]
    assert not description.lstrip().startswith(("options:", "positional arguments:")), out
    assert len(description.split()) >= 15, description


def test_top_level_help_has_examples() -> None:
    proc = reflexd("--help")
    assert proc.returncode == 0 and "examples:" in proc.stdout
    assert "--json" in proc.stdout


def test_train_needs_no_flag_and_keeps_now_as_a_no_op() -> None:
    assert "(default; kept for compatibility)" in " ".join(reflexd("train", "--help").stdout.split())
    # without a daemon both reach the socket (exit 1), neither is a usage error (exit 2)
    for args in (["train"], ["train", "--now"], ["train", "--json"]):
        proc = reflexd(*args, "--socket", "/nonexistent/reflexd.sock")
        assert proc.returncode == 1, (args, proc.stderr)
        assert "cannot reach reflexd" in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("buffered", [True, False])
def test_output_to_a_reader_gone_ends_quietly_with_sigpipes_status(buffered: bool) -> None:
    """`reflexd status | head -2`: the pipe's reader is gone before the output is all written
    (buffered, the output is written at the end; unbuffered, as it is printed)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    read, write = os.pipe()
    os.close(read)  # every write now fails with EPIPE
    try:
        done = subprocess.run([str(REFLEXD), "check-config", str(SHIPPED)], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120, env=env)
    finally:
        os.close(write)
    assert done.returncode == 128 + signal.SIGPIPE and done.stderr == "", done.stderr


# ---- check-config --json -------------------------------------------------------------------


def test_check_config_json_accepts_the_shipped_file() -> None:
    doc = as_json(reflexd("check-config", "--json", str(SHIPPED)))
    assert doc == {"ok": True, "path": str(SHIPPED), "problems": [], "warnings": []}


def test_check_config_json_names_each_problem_and_exits_78(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("agents:\n  a:\n    bogus: {}\n  b:\n    exploration: {epsilon: 2}\n")
    doc = as_json(reflexd("check-config", "--json", str(bad)), code=EX_CONFIG)
    assert doc["ok"] is False and doc["path"] == str(bad)
    assert any("agents.a" in p for p in doc["problems"]), doc
    assert any("agents.b.exploration.epsilon" in p for p in doc["problems"]), doc

    missing = as_json(reflexd("check-config", "--json", str(tmp_path / "absent.yaml")), code=EX_CONFIG)
    assert missing["ok"] is False and missing["problems"]


def test_check_config_refuses_the_directories_run_would_refuse(tmp_path: Path) -> None:
    """What `run` refuses at start for the socket and the state, check-config says first."""
    shared, sticky = tmp_path / "shared", tmp_path / "sticky"
    shared.mkdir()
    sticky.mkdir()
    shared.chmod(0o777)
    sticky.chmod(0o1777)
    config = tmp_path / "c.yaml"
    config.write_text(f"state_dir: {shared}\nsocket: {{path: {sticky / 'r.sock'}}}\n")
    doc = as_json(reflexd("check-config", "--json", str(config)), code=EX_CONFIG)
    assert doc["problems"] == [
        f"socket.path: {sticky} is writable by group or others (mode 1777); refusing to keep the socket there "
        f"(use a directory of its own below it, such as {sticky / 'reflexd'}, which the daemon creates 0750)",
        f"state_dir: {shared} is writable by group or others (mode 0777); refusing to keep its database, spool "
        f"and models there (chmod go-w {shared})",
    ], doc
    config.write_text(f"state_dir: {tmp_path / 'new'}\nsocket: {{path: {sticky / 'reflexd' / 'r.sock'}}}\n"
                      f"metrics: {{path: {shared / 'm.sock'}}}\ntraces: {{enabled: true, path: {sticky / 't.sock'}}}\n")
    problems = as_json(reflexd("check-config", "--json", str(config)), code=EX_CONFIG)["problems"]
    assert [p.split(":")[0] for p in problems] == ["metrics.path", "traces.path"], problems
    config.write_text(f"state_dir: {tmp_path / 'new'}\nsocket: {{path: {sticky / 'reflexd' / 'r.sock'}}}\n")
    assert as_json(reflexd("check-config", "--json", str(config)))["ok"] is True  # made 0750 by the daemon


def test_check_config_warns_of_a_key_file_others_may_read_and_refuses_two_files(tmp_path: Path) -> None:
    key = tmp_path / "hash.key"
    key.write_text("k" * 32)
    key.chmod(0o644)
    config = tmp_path / "c.yaml"
    config.write_text(f"redaction: {{hash: [user.email], key_file: {key}}}\n")
    doc = as_json(reflexd("check-config", "--json", str(config)))
    assert doc["ok"] is True and any(f"{key} may be read by group or others (mode 0644)" in w for w in doc["warnings"]), doc
    key.chmod(0o600)
    assert not any("key_file" in w for w in as_json(reflexd("check-config", "--json", str(config)))["warnings"])
    both = reflexd("check-config", str(config), "--config", str(tmp_path / "other.yaml"))
    assert both.returncode != 0 and "two files" in both.stderr, both.stderr


def test_check_config_refuses_a_place_below_a_file_and_run_exits_78_saying_why(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    config = tmp_path / "c.yaml"
    config.write_text(f"state_dir: {afile / 'state'}\nsocket: {{path: {tmp_path / 'run' / 'r.sock'}}}\n")
    (problem,) = as_json(reflexd("check-config", "--json", str(config)), code=EX_CONFIG)["problems"]
    assert problem == f"state_dir: {afile} is not a directory, so {afile / 'state'} cannot be made", problem
    # started anyway, the daemon says so and exits 78, which the unit does not restart, not 1 with a traceback
    run = reflexd("run", "--config", str(config), timeout=120)
    assert run.returncode == EX_CONFIG, run.stderr
    assert f"reflexd: state_dir {afile / 'state'}: Not a directory" in run.stderr and "Traceback" not in run.stderr
    config.write_text(f"state_dir: {tmp_path / 'state'}\nsocket: {{path: {afile / 'sub' / 'r.sock'}}}\n")
    run = reflexd("run", "--config", str(config), timeout=120)
    assert run.returncode == EX_CONFIG and f"reflexd: socket.path {afile / 'sub' / 'r.sock'}: " in run.stderr, run.stderr
    # and the listeners made in the daemon's task group: the metrics and the traces sockets
    for section, on in (("metrics", ""), ("traces", "enabled: true, ")):
        config.write_text(f"state_dir: {tmp_path / 'state'}\nsocket: {{path: {tmp_path / 'run' / 'r.sock'}}}\n"
                          f"{section}: {{{on}path: {afile / 'm.sock'}}}\n")
        run = reflexd("run", "--config", str(config), timeout=120)
        assert run.returncode == EX_CONFIG, run.stderr
        assert f"reflexd: {section}.path {afile / 'm.sock'}: " in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_json_commands_print_nothing_on_stdout_when_the_daemon_is_away() -> None:
    for args in (["status"], ["models", "list"], ["decide", "--agent", "a", "--actions", "x,y"]):
        proc = reflexd(*args, "--json", "--socket", "/nonexistent/reflexd.sock")
        assert proc.returncode == 1 and proc.stdout == "", (args, proc.stdout)


def test_query_reads_the_store_itself_only_when_no_daemon_listens(tmp_path: Path) -> None:
    """No socket or nobody listening: the stopped daemon's store, read-only. A daemon that does not
    answer in --timeout, or a connection that breaks, is said so, and the store is left alone."""
    import socket

    from reflexd.service.store import Store

    state = tmp_path / "state"
    config = tmp_path / "reflexd.yaml"
    config.write_text(f"state_dir: {state}\n")
    Store(state / "reflexd.duckdb").close()
    sock = str(tmp_path / "reflexd.sock")

    def query(*flags: str) -> subprocess.CompletedProcess[str]:
        return reflexd("query", "--config", str(config), "--socket", sock, "--json", *flags, "SELECT count(*) AS n FROM decisions")

    gone = query()  # ENOENT
    assert as_json(gone) == [{"n": 0}] and "the daemon is not running" in gone.stderr
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(sock)  # the file, and nobody listening: ECONNREFUSED
        refused = query()
        assert as_json(refused) == [{"n": 0}] and "not running" in refused.stderr
        listener.listen(1)  # connections wait in the backlog, and no answer comes
        slow = query("--timeout", "1")
        assert slow.returncode == 1 and slow.stdout == "", slow.stderr
        assert "did not answer the snapshot request within --timeout 1 s" in slow.stderr
        assert "not running" not in slow.stderr
        while True:  # the one left in the backlog
            listener.settimeout(0)
            try:
                listener.accept()[0].close()
            except BlockingIOError:
                break
        listener.settimeout(None)
        hangs_up = threading.Thread(target=lambda: listener.accept()[0].close())
        hangs_up.start()
        broken = query()
        hangs_up.join(timeout=60)
        # closed by the daemon, or a broken pipe: either way a daemon was there, so the store is left alone
        assert broken.returncode == 1 and broken.stdout == "" and "cannot reach reflexd" in broken.stderr, broken.stderr
        assert "not running" not in broken.stderr


def test_forget_counts_are_read_from_the_daemon_message() -> None:
    message = "forgot agent 'bot': removed 3 decisions, 0 dead letters, 2 archive files"
    assert _removed_counts(message) == {"decisions": 3, "dead_letters": 0, "archive_files": 2}
    assert _removed_counts("forgot agent 'bot': removed ") == {}
    assert _removed_counts("something else") is None


# ---- against a daemon ----------------------------------------------------------------------


def cli(d: DaemonProcess, *args: str, code: int = 0) -> Any:
    return as_json(reflexd(*args, "--json", "--socket", d.socket, timeout=300), code=code)


def decisions_file(path: Path, n: int) -> Path:
    lines = []
    for i in range(n):
        kind = "ab"[i % 2]
        chosen = "xy"[(i // 2) % 2]
        lines.append(
            {
                "type": "decision",
                "id": f"d{i}",
                "agent": "bot",
                "context": {"kind": kind},
                "actions": ["x", "y"],
                "chosen": chosen,
                "prob": 0.5,
            }
        )
        lines.append({"type": "outcome", "decision_id": f"d{i}", "reward": float({"a": "x", "b": "y"}[kind] == chosen)})
    lines.append("{not json")
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.mark.e2e
def test_status_decide_models_and_forget_print_json(daemon: DaemonProcess) -> None:
    status = cli(daemon, "status")
    assert {"version", "pid", "ingest", "backlog", "experience", "model", "trainer"} <= status.keys()
    assert status["pid"] == daemon.proc.pid and status["model"] is None

    # nothing to train on: the run fails, exit 1 as without --json, and says why on stdout too
    failed = cli(daemon, "train", code=1)
    assert failed["outcome"] == "failed" and "experiences" in failed["error"] and failed["code"], failed

    decided = cli(daemon, "decide", "--agent", "bot", "--context", '{"kind": "a"}', "--actions", "x,y")
    assert {"id", "action", "prob", "model_version", "strategy"} <= decided.keys()
    assert decided["action"] in ("x", "y") and decided["model_version"] is None
    # without --json, for a reader: the action, its probability, what chose it, the decision's id
    plain = reflexd("decide", "--agent", "bot", "--actions", "x", "--socket", daemon.socket)
    assert plain.returncode == 0, plain.stderr
    action, _, prob, by, _, _, _, decision = plain.stdout.split()
    assert (action, prob, by, len(decision)) == ("x", "1", "no", 32), plain.stdout
    assert "no model (default)" in plain.stdout

    # the agent that decided has its own model line (learning.scope: agent), with no model yet
    assert cli(daemon, "models", "list") == {"current": None, "serving": None, "line": "agent:bot", "models": []}
    unknown = reflexd("models", "show", "v0099", "--json", "--socket", daemon.socket)
    assert unknown.returncode == 1 and unknown.stdout == "" and "v0099" in unknown.stderr

    wait_for(lambda: daemon.status().experience.get("decisions", 0) >= 2, 30, "the decisions to be stored")
    forgot = cli(daemon, "forget", "--agent", "bot", "--yes")
    assert forgot["agent"] == "bot" and "forgot agent" in forgot["message"]
    assert forgot["removed"]["decisions"] == 2, forgot
    assert daemon.status().experience.get("decisions", 0) == 0


@pytest.mark.e2e
@pytest.mark.slow
def test_import_then_train_then_models_print_json(daemon: DaemonProcess, tmp_path: Path) -> None:
    n = 40
    summary = cli(daemon, "import", str(decisions_file(tmp_path / "log.ndjson", n)), "--format", "ndjson")
    assert summary["decisions"] == n and summary["outcomes"] == n and summary["imported"] == 2 * n, summary
    assert summary["duplicates"] == 0 and summary["rejected_lines"] == 1
    assert summary["rejected"][0]["line"] == 2 * n + 1 and summary["format"] == "ndjson"

    again = cli(daemon, "import", str(tmp_path / "log.ndjson"))
    assert again["imported"] == 0 and again["duplicates"] == 2 * n, again

    # every decision past the reward window, so the run sees them all
    wait_for(lambda: daemon.status().experience["new_since_training"] >= n, 30, "the imported decisions to mature")
    run = cli(daemon, "train")
    assert run["outcome"] in ("promoted", "rejected"), run
    assert run["version"] == "v0001" and run["gate"] and run["message"].startswith(run["outcome"])
    assert run["train_rows"] is not None and run["seconds"] > 0, run

    listing = cli(daemon, "models", "list")
    assert [m["version"] for m in listing["models"]] == ["v0001"]
    assert listing["current"] == ("v0001" if run["outcome"] == "promoted" else None)
    shown = cli(daemon, "models", "show", "v0001")
    assert shown["version"] == "v0001" and shown["gate"]["reason"] == run["gate"]

    assert cli(daemon, "status")["trainer"]["last_run"]["version"] == "v0001"


def test_a_client_command_reaches_the_daemon_named_by_a_config_with_errors_elsewhere(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    """The daemon keeps its running config through a bad edit: status after one still reaches it,
    warning what is wrong; a config whose socket.path itself is wrong, or that cannot be read, does not."""
    edited = tmp_path / "edited.yaml"
    edited.write_text(f"socket:\n  path: {daemon.socket}\nrewards:\n  wait_windw: 3\n")
    shown = reflexd("status", "--config", str(edited), timeout=300)
    assert shown.returncode == 0 and shown.stdout.startswith("reflexd "), shown.stderr
    assert "warning" in shown.stderr and "wait_windw" in shown.stderr and daemon.socket in shown.stderr, shown.stderr
    for wrong in ("socket:\n  path: relative.sock\n", "socket: /tmp/dev.sock\n", "socket:\n  pth: /tmp/dev.sock\n",
                  f"socket:\n  path: /tmp/{'x' * 120}.sock\nrewards: {{wait_windw: 3}}\n"):
        edited.write_text(wrong)  # the socket itself wrong: never the default socket instead
        assert reflexd("status", "--config", str(edited), timeout=300).returncode == EX_CONFIG, wrong
    assert reflexd("status", "--config", str(tmp_path / "missing.yaml"), timeout=300).returncode == EX_CONFIG


def test_status_for_an_agent_names_the_line_it_learns_in() -> None:
    from reflexd.tools.cli import _line_of

    lines = {"group:support": {"agents": ["refunds", "triage"]}, "agent:router": {"agents": ["router"]}}
    assert _line_of(lines, "refunds") == "group:support" and _line_of(lines, "router") == "agent:router"
    assert _line_of({"shared": {"agents": None}}, "refunds") == "shared"
    assert _line_of({}, "new") == "agent:new"  # no line yet: it will be its own


def test_status_with_several_lines_after_a_failed_run_prints_each_line(daemon_factory: Any) -> None:
    # the backoff outlasts a slow machine's commands; the trainer is stopped long before it could finish
    daemon = daemon_factory({"trainer": {"retry_backoff": 3600, "max_wall_time": 0.01}, "rewards": {"wait_window": 0}})
    for agent in ("a", "b"):
        reflexd("decide", "--agent", agent, "--actions", "x,y", "--socket", daemon.socket, timeout=300)
    with Connection(daemon.socket) as conn:  # enough joined experiences for a first run of a's
        conn.send([Decision(id=f"d{i}", agent="a", context={"i": i}, actions=["x", "y"], chosen="x", prob=0.5) for i in range(8)]
                  + [Outcome(decision_id=f"d{i}", reward=1.0, agent="a") for i in range(8)] + [Flush(loaded=True)])
        assert isinstance(conn.receive(), Ack)
    trained = reflexd("train", "--agent", "a", "--socket", daemon.socket, timeout=300)
    assert trained.returncode != 0 and "max_wall_time" in trained.stderr, trained.stderr  # a failed run, backing off
    shown = reflexd("status", "--socket", daemon.socket, timeout=300)
    assert shown.returncode == 0, shown.stderr
    rows = [row for row in shown.stdout.splitlines() if row.startswith("line ")]
    assert len(rows) == 2 and "backing off after a failed run" in rows[0] and "agent:b" in rows[1], shown.stdout
    assert cli(daemon, "status")["trainer"]["consecutive_failures"] == 1
    one = reflexd("status", "--agent", "b", "--socket", daemon.socket, timeout=300).stdout
    assert "experience (every agent) decisions 10" in one and "agent:b new since training" in one, one
    failed = reflexd("status", "--agent", "a", "--socket", daemon.socket, timeout=300).stdout
    assert "next run: backing off after a failed run, 3" in failed and "s more" in failed, failed  # ~3600 s left


def test_status_counts_the_outcomes_that_name_no_stored_decision(daemon: DaemonProcess) -> None:
    decided = cli(daemon, "decide", "--agent", "bot", "--actions", "x,y")
    with Connection(daemon.socket) as conn:  # one reward for the decision, two for ids of the agent's own making
        conn.send([Outcome(decision_id=decided["id"], reward=1.0)])
        conn.send([Outcome(decision_id=f"mine-{i}", reward=1.0) for i in range(2)])
        conn.send([Flush(loaded=True)])
        while not isinstance(conn.receive(), Ack):
            pass
    assert cli(daemon, "status")["experience"]["outcomes_without_decision"] == 2
    shown = reflexd("status", "--socket", daemon.socket, timeout=300)
    assert "2 outcomes of the last hour name no stored decision" in shown.stdout, shown.stdout


def test_promoting_a_version_the_gate_refused_says_so_and_a_list_says_when_none_is_live(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    cli(daemon, "decide", "--agent", "bot", "--actions", "x,y")  # the agent's model line
    wait_for(lambda: daemon.status().experience.get("decisions", 0) >= 1, 30, "the decision to be stored")
    spec = FeatureSpec(64, 64, 0)
    model = tmp_path / "model.onnx"
    model.write_bytes(linear_model(spec, {"x": 0.0, "y": 1.0}))
    refused = GateResult(
        passed=False, reason="difference +0.010, interval [-0.050, 0.070] includes 0: rejected", estimator="dr",
        baseline="logged policy", candidate_value=0.51, baseline_value=0.5, difference=0.01, lower=-0.05, upper=0.07,
        confidence=0.8, margin=0.0, holdout_rows=40,
    )
    exploration = parse_config("{}").exploration
    version = line_registry(daemon, "bot").add(
        model, {"parent": None, "created": 1.0, "learner": "mlp", "features": spec, "exploration": exploration, "gate": refused}
    ).version
    promoted = reflexd("models", "promote", version, "--agent", "bot", "--socket", daemon.socket)
    assert promoted.returncode == 0, promoted.stderr
    assert f"{version} is live in agent:bot; the gate had refused it (difference +0.010" in promoted.stdout, promoted.stdout
    assert reflexd("models", "rollback", "--agent", "bot", "--socket", daemon.socket).returncode == 0
    listed = reflexd("models", "list", "--agent", "bot", "--socket", daemon.socket).stdout
    assert version in listed and "no version is live: agents decide with the online head" in listed, listed


def test_reward_sends_a_decisions_outcome_and_refuses_what_is_no_reward(daemon: DaemonProcess) -> None:
    decided = cli(daemon, "decide", "--agent", "bot", "--actions", "x,y")
    before = daemon.loaded_status().experience
    sent = cli(daemon, "reward", decided["id"], "-0.5", "--id", "o-reward-1")  # a negative reward is a number, not an option
    assert sent == {"decision_id": decided["id"], "reward": -0.5, "id": "o-reward-1"}
    shown = reflexd("reward", decided["id"], "1", "--socket", daemon.socket, timeout=300)
    assert shown.returncode == 0 and shown.stdout.strip() == f"sent reward 1 for decision {decided['id']}", shown.stderr
    after = daemon.loaded_status().experience
    assert after["outcomes"] == before["outcomes"] + 2
    assert after["outcomes_without_decision"] == before["outcomes_without_decision"]  # both joined the decision
    for bad, said in (("nan", "REWARD: 'nan' is not a finite number"), ("good", "REWARD: 'good' is not a number")):
        refused = reflexd("reward", decided["id"], bad, "--socket", daemon.socket, timeout=300)
        assert refused.returncode == 1 and said in refused.stderr, refused.stderr
    refused = reflexd("reward", "", "1", "--socket", daemon.socket, timeout=300)
    assert refused.returncode == 1 and "not a valid outcome" in refused.stderr, refused.stderr


def test_exporting_an_agent_nothing_was_kept_of_says_so(daemon: DaemonProcess) -> None:
    proc = reflexd("export", "--agent", "nobody", "--format", "ndjson", "--socket", daemon.socket, timeout=300)
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    assert "note: nothing of agent 'nobody' in the window: is the name right?" in proc.stderr, proc.stderr


def test_importing_an_empty_file_exits_1_saying_so(daemon: DaemonProcess, tmp_path: Path) -> None:
    empty = tmp_path / "empty.ndjson"
    empty.write_text("")
    proc = reflexd("import", str(empty), "--format", "ndjson", "--socket", daemon.socket, timeout=300)
    assert proc.returncode == 1 and f"{empty} holds no line to import" in proc.stderr, proc.stderr


def test_a_file_every_line_of_which_is_refused_under_the_wrong_format_is_told_its_format(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    logged = tmp_path / "vw.log"
    logged.write_text(json.dumps({
        "_label_cost": -1, "_label_probability": 0.5, "_label_Action": 1, "_labelIndex": 0, "EventId": "e1",
        "Timestamp": "2024-03-01T12:00:00Z", "a": [1, 2], "c": {"_multi": [{"id": "t1"}, {"id": "t2"}]}, "p": [0.5, 0.5],
    }) + "\n")
    proc = reflexd("import", str(logged), "--format", "ndjson", "--socket", daemon.socket, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert f"every line was refused as ndjson; {logged} reads as dsjson (--format dsjson)" in proc.stderr, proc.stderr


def test_forgetting_a_name_nothing_was_kept_of_says_so(daemon: DaemonProcess) -> None:
    proc = reflexd("forget", "--agent", "nosuch", "--yes", "--socket", daemon.socket, timeout=300)
    assert proc.returncode == 0 and "forgot agent 'nosuch': removed 0 outcomes, 0 decisions" in proc.stdout
    assert "note: nothing was kept of agent 'nosuch' (no rows" in proc.stderr and "is the name right?" in proc.stderr


def test_status_says_a_behaviour_run_is_under_way_and_what_its_calibration_was_measured_on() -> None:
    published = {"outcome": "published", "episodes": 80,
                 "calibration": {"brier": 0.732, "episodes": 16, "held_out": True}}
    line = _behaviour_line({"live": None, "state": "training", "last_run": None})
    assert line == "no model yet; a run is under way (training)", line
    line = _behaviour_line({"live": "v0001", "state": "idle", "last_run": published})
    assert line == "live v0001  (brier 0.732 on 16 held-out episodes; trained on 80 episodes)", line
    none = {**published, "calibration": {"brier": None, "episodes": 3, "held_out": False}}
    assert "brier n/a on 3 training episodes" in _behaviour_line({"live": "v0002", "last_run": none})


def test_status_by_line_says_how_many_refusals_lost_to_the_online_head(capsys) -> None:
    trainer = {"runs": 5, "promoted": 0, "rejected": 4, "unconfirmed": 2, "state": "idle"}
    _print_lines({
        "agent:a": {"serving": None, "trainer": trainer},
        "agent:b": {"serving": "v0003", "trainer": {**trainer, "unconfirmed": 0}},
    })
    a, b = capsys.readouterr().out.splitlines()
    assert "rejected 4 (2 lost to the online head during their run)" in a
    assert b.endswith("rejected 4") and "serving v0003" in b
