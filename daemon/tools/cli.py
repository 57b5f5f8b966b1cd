"""The ``reflexd`` command line."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

import msgspec

from reflexd import __version__
from reflexd.config import DEFAULT_PATH, exposed_key, load_config, socket_of
from reflexd.errors import (
    ConfigError,
    DaemonUnavailable,
    ReflexdError,
    SocketError,
    StateDirError,
    StoreDamaged,
    UsageError,
)

EX_CONFIG = 78  # sysexits.h: configuration error
EX_DATAERR = 65  # sysexits.h: input data incorrect (a damaged store)
EX_TEMPFAIL = 75  # sysexits.h: temporary failure (the store is in use)

_DESCRIPTION = """\
reflexd: a local learning sidecar for autonomous agents.

Agents log decisions and rewards over a Unix socket; reflexd stores them, trains small models
when the CPU is idle, gates each candidate by off-policy evaluation, and publishes the winner as
an ONNX file that agents load in-process. Between models, each reward updates the agent's online
head at once, so an agent adapts from its first decisions. What the experience teaches (rules,
patterns, anomalies, trends) is extracted, checked on later data, and shown by `reflexd insights`.
"""

_EPILOG = """\
Client commands find the socket from --socket, else $REFLEXD_SOCKET, else socket.path in the
config file (--config, $REFLEXD_CONFIG or /etc/reflexd/reflexd.yaml), else /run/reflexd/reflexd.sock.

Commands that print data (check-config, check-store, status, decide, explain, train, models, forget, import,
evaluate, insights, report, query, export, fleet train) take
--json: the same data as one JSON document on stdout and nothing else there; exit codes do not change.
`reflexd COMMAND --help` describes each command, with examples.

examples:
  reflexd run --config configs/reflexd.yaml
  reflexd check-config /etc/reflexd/reflexd.yaml
  reflexd check-store
  reflexd status
  reflexd status --json
  reflexd decide --agent router --context '{"task": "code"}' --actions small,large
  reflexd decide --agent router --context '{"task": "code"}' --actions small,large --no-log
  reflexd explain --agent router --context '{"task": "code"}' --actions small,large
  reflexd train
  reflexd models list
  reflexd forget --agent router
  reflexd import logged.dsjson --agent router
  reflexd evaluate v0003 action:large --agent router
  reflexd insights --agent router --now
  reflexd report --out /tmp/reflexd-report
  reflexd query "SELECT agent, count(*) FROM decisions GROUP BY agent"
  reflexd export --format dsjson --agent router --out router.dsjson
  reflexd fleet train /srv/hosts/a/archive s3://archives/b --out fleet-model
  reflexd models pull fleet-model
  reflexd demo
"""


def _socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return args.socket
    if os.environ.get("REFLEXD_SOCKET"):
        return os.environ["REFLEXD_SOCKET"]
    socket = _socket_section(args)
    if socket is not None:
        return socket.path
    from reflexd.wire.connection import DEFAULT_SOCKET

    return DEFAULT_SOCKET


def _config_path(args: argparse.Namespace) -> str | None:
    """The config a client command reads: --config, else $REFLEXD_CONFIG (both must exist), else
    the default file where there is one."""
    return args.config or os.environ.get("REFLEXD_CONFIG") or (DEFAULT_PATH if os.path.exists(DEFAULT_PATH) else None)


_WARNED: set[str] = set()  # config files whose errors this command has warned of


def _socket_section(args: argparse.Namespace) -> Any:
    """The ``socket`` section of the client's config (None: no config), warning once if the rest
    of the file has errors (``config.socket_of``)."""
    path = _config_path(args)
    if path is None:
        return None
    socket, problem = socket_of(path)
    if problem is not None and path not in _WARNED:
        _WARNED.add(path)
        print(f"reflexd: warning: {problem}\n  (reaching the daemon at its socket.path, {socket.path}, all the same)", file=sys.stderr)
    return socket


def _request(args: argparse.Namespace, msg: msgspec.Struct, timeout: float = 30.0) -> Any:
    from reflexd.wire.connection import request

    return request(msg, _socket_path(args), timeout=timeout)


def _print(obj: Any) -> None:
    print(json.dumps(msgspec.to_builtins(obj), indent=2, sort_keys=False))


def _parse_done(message: str, pattern: str) -> dict[str, str] | None:
    """The fields of a daemon ``ok`` message of a known shape, or None if it has another."""
    import re

    found = re.fullmatch(pattern, message, flags=re.DOTALL)
    return found.groupdict() if found else None


def _removed_counts(message: str) -> dict[str, int] | None:
    """``forgot agent 'a': removed 3 decisions, 1 dead letters`` → {"decisions": 3, "dead_letters": 1}."""
    fields = _parse_done(message, r"forgot agent .*: removed (?P<counts>.*)")
    if fields is None:
        return None
    counts: dict[str, int] = {}
    for part in filter(None, fields["counts"].split(", ")):
        number, _, what = part.partition(" ")
        if not number.isdigit() or not what:
            return None
        counts[what.replace(" ", "_")] = int(number)
    return counts


# ---- commands ----------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from reflexd.service.daemon import run

    run(args.config)
    return 0


def _refused_places(config: Any) -> list[str]:
    """The directories named that the daemon would refuse to start with, for what it keeps there:
    only that group or others may write to them, which no user of the daemon changes (the owner
    check waits for the start, as check-config may run as another user, root at install)."""
    from reflexd.durable import open_to_others

    places = [("socket.path", Path(config.socket.path).parent, "the socket"),
              ("state_dir", config.state_path, "its database, spool and models")]
    if config.metrics.path:
        places.append(("metrics.path", Path(config.metrics.path).parent, "the socket"))
    if config.traces.enabled:
        places.append(("traces.path", Path(config.traces.path).parent, "the socket"))
    found = []
    for key, path, what in places:
        try:
            refusal = open_to_others(path, what) if path.is_dir() else _not_a_folder(path)
        except OSError:  # not this user's to look into (check-config as another user): the start checks it
            refusal = None
        if refusal is not None:
            found.append(f"{key}: {refusal}")
    return found


def _not_a_folder(path: Path) -> str | None:
    """Why ``path`` cannot be made: the nearest of its parents that exists is not a directory."""
    for parent in (path, *path.parents):
        if parent.exists():
            if parent.is_dir():
                return None
            return f"{path} is not a directory" if parent == path else f"{parent} is not a directory, so {path} cannot be made"
    return None


def cmd_check_config(args: argparse.Namespace) -> int:
    if args.path and args.config and Path(args.path).resolve() != Path(args.config).resolve():
        raise UsageError(f"check-config was given two files, {args.path} and --config {args.config}: name one")
    path = args.path or args.config or os.environ.get("REFLEXD_CONFIG") or DEFAULT_PATH
    from reflexd.collect.spans import problems as trace_problems
    from reflexd.service.server import fd_budget_problems

    try:
        config = load_config(path)
        # the trace mapping's expressions are parsed by the receiver's own parser, as at start
        mapping = trace_problems(config.traces) if config.traces.enabled else []
        if mapping:
            raise ConfigError(str(path), mapping)
        places = _refused_places(config)
        if places:
            raise ConfigError(str(path), places)
    except ConfigError as exc:
        if args.json:
            _print({"ok": False, "path": exc.source, "problems": exc.problems, "warnings": []})
            return EX_CONFIG
        print(f"{exc.source}: invalid configuration", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return EX_CONFIG
    # valid, but this process's limits would not let it work as configured, or a secret is exposed
    warnings = fd_budget_problems(config) + [w for w in (exposed_key(config.redaction),) if w]
    if args.json:
        _print({"ok": True, "path": str(path), "problems": [], "warnings": warnings})
        return 0
    print(f"{path}: ok")
    for warning in warnings:
        print(f"  warning: {warning}", file=sys.stderr)
    return 0


def cmd_check_store(args: argparse.Namespace) -> int:
    import time

    from reflexd.errors import StorageError, StoreDamaged, StoreInUse
    from reflexd.service.store import Store

    config = load_config(args.config or os.environ.get("REFLEXD_CONFIG") or DEFAULT_PATH)
    path = config.db_path
    started = time.monotonic()
    rows: dict[str, int] | None = None
    error: StorageError | None = None
    try:
        rows = Store.check_file(path, config.store)
    except StorageError as exc:
        error = exc
    seconds = round(time.monotonic() - started, 3)
    state, status = "sound" if rows is not None else "missing", 0
    if isinstance(error, StoreDamaged):
        state, status = "damaged", EX_DATAERR
    elif isinstance(error, StoreInUse):
        state, status = "in_use", EX_TEMPFAIL
    elif error is not None:
        state, status = "unchecked", 1
    if args.json:
        _print(
            {
                "ok": status == 0, "path": str(path), "state": state, "rows": rows or {}, "seconds": seconds,
                "code": error.code if error else None, "error": str(error) if error else None,
            }
        )
        return status
    if error is not None:
        print(f"reflexd: {error}", file=sys.stderr)
    elif rows is None:
        print(f"{path}: no store yet (the daemon creates it at its first start)")
    else:
        counts = "  ".join(f"{table} {n}" for table, n in rows.items())
        print(f"{path}: sound, every column of every table read back in {seconds:.1f} s ({counts})")
    return status


def _ago(at: float) -> str:
    import time

    return f"{max(0.0, time.time() - at):.0f} s ago"


def _line_of(lines: dict[str, Any], agent: str) -> str:
    """The name of the model line ``agent`` learns in (``agent:A``, ``group:G``, ``shared``), as status lists them."""
    return next((name for name, line in lines.items() if agent in (line.get("agents") or [])), None) or (
        "shared" if "shared" in lines else f"agent:{agent}"
    )


def cmd_status(args: argparse.Namespace) -> int:
    from reflexd.wire.protocol import StatusRequest

    reply = _request(args, StatusRequest(agent=args.agent))
    if args.json:
        _print(reply)
        return 0
    ing = reply.ingest
    print(f"reflexd {reply.version}  pid {reply.pid}  up {reply.uptime:.0f} s  socket {reply.socket}")
    print(
        f"ingest     received {ing['received']}  stored {ing['stored']}  duplicates {ing['duplicates']}"
        f"  dead letters {ing['dead_letters']}  backlog {reply.backlog} ({ing.get('spooled', 0)} in the spool)"
        f"  connections {ing['connections']}"
    )
    keys = ("client_dropped", "unlogged_decisions", "write_errors", "refused", "refused_by_store", "restored_after_loss")
    losses = {k: ing.get(k, 0) for k in keys}
    if any(losses.values()):
        print("           " + "  ".join(f"{k.replace('_', ' ')} {v}" for k, v in losses.items()))
    exp = reply.experience
    # the counts are the store's, every agent's; what is new since training is the line's asked about
    whose = f"  {_line_of(reply.lines, args.agent)} new since training" if args.agent else "  new since training"
    print(
        f"experience {'(every agent) ' if args.agent else ''}decisions {exp.get('decisions', 0)}"
        f"  outcomes {exp.get('outcomes', 0)}  steps {exp.get('steps', 0)}  events {exp.get('events', 0)}"
        f"{whose} {exp['new_since_training']}"
    )
    unjoined = exp.get("outcomes_without_decision", 0)  # absent from an older daemon's reply
    if unjoined:
        print(
            f"           {unjoined} outcomes of the last hour name no stored decision and join nothing:"
            " reward the id decide returned"
        )
    if reply.traces:  # the OTLP receiver, when traces.enabled
        tr = reply.traces
        trouble = {k: tr.get(k, 0) for k in ("rejected_spans", "bad_requests", "forbidden", "unavailable", "reward_errors")}
        print(
            f"traces     requests {tr.get('requests', 0)}  spans {tr.get('spans', 0)}  steps {tr.get('steps', 0)}"
            f"  episodes {tr.get('episodes', 0)}  waiting {tr.get('waiting', 0)}"
            + "".join(f"  {k.replace('_', ' ')} {v}" for k, v in trouble.items() if v)
        )
    if len(reply.lines) > 1 and args.agent is None:
        _print_lines(reply.lines)
    elif reply.model:
        gate = (reply.model.get("gate") or {}).get("reason", "no gate record")
        print(f"model      {reply.model.get('version', '-')}  ({reply.model.get('train_rows')} rows)  gate: {gate}")
        if reply.model.get("load_error"):
            print(f"           load error: {reply.model['load_error']}")
    else:
        how = "the online head, as it learns from their rewards," if reply.online else "the default action,"
        print(f"model      none yet (agents decide with {how} exploring)")
    t = reply.trainer
    print(
        f"trainer    {t['state']}  runs {t['runs']}  promoted {t['promoted']}"
        f"  rejected {t['rejected']}{_unconfirmed(t)}"
        f"  failures {t['failures']}" + (f"  last error: {t['last_error']}" if t.get("last_error") else "")
    )
    if t["state"] == "idle":
        import time

        # a backoff counted down now (several lines' sum has no next_attempt: each line's row says it)
        left = t.get("next_attempt", 0.0) - time.time() if t.get("consecutive_failures") else 0.0
        waiting = f"backing off after a failed run, {left:.0f} s more" if left > 0 else t.get("waiting")
        if waiting:
            print(f"           next run: {waiting}")
    mon = reply.monitor
    if mon:
        found = mon.get("last") or {}
        # the comparison stands until the next check (monitor.check_interval): say how old it is
        last = f"({_ago(found['at'])}) {found.get('reason')}" if found.get("at") else "not checked yet"
        print(f"rollback   {'auto' if mon.get('auto_rollback') else 'off'}  rollbacks {mon.get('rollbacks', 0)}  last check {last}")
    ins = reply.insights
    if ins:
        print(f"insights   {_insights_line(ins)}")
    if reply.behaviour:
        print(f"behaviour  {_behaviour_line(reply.behaviour)}")
    if reply.storage.get("error"):
        print(f"storage    NOT ACKNOWLEDGING: {reply.storage['error']}")
    conf = reply.config or {}
    if conf.get("reload_error"):
        print(f"config     LAST RELOAD FAILED ({_ago(conf['reload_failed_at'])}), the config loaded {_ago(conf['loaded_at'])} runs:"
              f" {conf['reload_error']}")
    if conf.get("restart_pending"):
        print(f"config     changed in the file, in force at restart: {', '.join(conf['restart_pending'])}")
    return 0


def _insights_line(ins: dict[str, Any]) -> str:
    """``3 rules published, 2 anomalies (newest: reward_change 2026-12-06 08:00)`` or why there is none yet."""
    import time

    last = ins.get("last_run") or {}
    if ins.get("state") not in (None, "idle"):
        return f"{ins['state']}…"
    if "rules_published" not in ins:
        why = last.get("error") or ins.get("waiting") or "none yet"
        return f"no extraction yet ({why})"
    line = f"{ins['rules_published']} rules published, {ins.get('anomalies', 0)} anomalies"
    newest = ins.get("newest_anomaly")
    if newest:
        line += f" (newest: {newest.get('kind')} at {time.strftime('%Y-%m-%d %H:%M', time.localtime(newest.get('at') or 0))})"
    if last.get("outcome") == "failed":
        line += f"; last extraction failed: {last.get('error')}"
    return line


def cmd_decide(args: argparse.Namespace) -> int:
    from reflexd.wire.protocol import Decide

    context, actions = _context_and_actions(args)
    try:
        fields = {"type": "decide", "agent": args.agent, "context": context, "actions": actions, "log": not args.no_log}
        if args.slots is not None:
            fields["slots"] = args.slots
        if args.default is not None:
            fields["default"] = args.default
        msg = msgspec.convert(fields, Decide)
    except msgspec.ValidationError as exc:
        raise UsageError(f"not a valid decide request: {exc}") from None
    reply = _request(args, msg)
    if args.json:
        _print(reply)
    else:
        print("\n".join(_decided_lines(reply)))
    return 0


def cmd_reward(args: argparse.Namespace) -> int:
    import math
    import uuid

    from reflexd.wire.connection import Connection
    from reflexd.wire.protocol import Flush, Outcome

    try:
        reward = float(args.reward)
    except ValueError:
        raise UsageError(f"REWARD: {args.reward!r} is not a number") from None
    if not math.isfinite(reward):
        raise UsageError(f"REWARD: {args.reward!r} is not a finite number")
    try:
        outcome = msgspec.convert(
            {"type": "outcome", "decision_id": args.decision_id, "reward": reward, "id": args.id or f"cli-{uuid.uuid4().hex}"},
            Outcome,
        )
    except msgspec.ValidationError as exc:
        raise UsageError(f"not a valid outcome: {exc}") from None
    with Connection(_socket_path(args)) as conn:
        conn.send([outcome])
        conn.request(Flush())  # the outcome's refusal, if any, comes first and raises
    if args.json:
        _print({"decision_id": outcome.decision_id, "reward": outcome.reward, "id": outcome.id})
    else:
        print(f"sent reward {reward:g} for decision {outcome.decision_id}")
    return 0


def _decided_lines(reply: Any) -> list[str]:
    """A decide reply for a reader: the action chosen (each slot's), or every action's score."""
    from reflexd.wire.protocol import Decided, DecidedSlate

    def by(version: str | None, strategy: str) -> str:
        return f"model {version} ({strategy})" if version else f"no model ({strategy})"

    def chose(d: Any) -> str:  # a Decided or one SlotDecided of a slate: the same fields
        return f"{d.action}  prob {d.prob:.4g}  {by(d.model_version, d.strategy)}  id {d.id}"

    if isinstance(reply, Decided):
        return [chose(reply)]
    if isinstance(reply, DecidedSlate):
        return [f"slate {reply.slate}", *(f"  slot {slot.slot}: {chose(slot)}" for slot in reply.slots)]
    # Scored (--no-log): nothing was chosen or logged
    width = max(6, *(len(a) for a in reply.actions))
    lines = [
        f"{by(reply.model_version, reply.strategy)}; nothing logged",
        f"{'action':<{width}}  {'score':>9}  {'spread':>9}  {'prob':>7}",
    ]
    for k, action in enumerate(reply.actions):
        score = f"{reply.scores[k]:9.4f}" if reply.scores is not None else f"{'-':>9}"
        spread = f"{reply.spread[k]:9.4f}" if reply.spread is not None else f"{'-':>9}"
        lines.append(f"{action:<{width}}  {score}  {spread}  {reply.probs[k]:7.4f}")
    return lines


def _context_and_actions(args: argparse.Namespace) -> tuple[Any, Any]:
    """--context (a JSON object) and --actions (comma-separated ids, or a JSON list) as given."""
    try:
        context = json.loads(args.context)
        spec = args.actions.lstrip()
        actions = json.loads(spec) if spec.startswith("[") else [a.strip() for a in spec.split(",") if a.strip()]
    except json.JSONDecodeError as exc:
        raise UsageError(f"--context or --actions is not valid JSON: {exc}") from None
    return context, actions


def cmd_explain(args: argparse.Namespace) -> int:
    from reflexd.deciding.explaining import render
    from reflexd.wire.protocol import Explain

    context, actions = _context_and_actions(args)
    if args.top is not None and args.top < 1:
        raise UsageError("--top must be at least 1")
    try:
        msg = msgspec.convert(
            {"type": "explain", "agent": args.agent, "context": context, "actions": actions, "top": args.top,
             "default": args.default},
            Explain,
        )
    except msgspec.ValidationError as exc:
        raise UsageError(f"not a valid explain request: {exc}") from None
    reply = _request(args, msg)
    if args.json:
        _print(reply)
    else:
        print(render(reply))
    return 0


def _last_run(args: argparse.Namespace) -> dict[str, Any] | None:
    """The trainer's last run as the daemon's status reports it (None if it cannot be had)."""
    from reflexd.wire.protocol import StatusRequest

    try:
        return _request(args, StatusRequest(agent=args.agent)).trainer.get("last_run")
    except ReflexdError:
        return None


def cmd_train(args: argparse.Namespace) -> int:
    from reflexd.errors import RequestFailed
    from reflexd.wire.protocol import Train

    # --now is the default and accepted for compatibility: a request always trains now
    print("training… (the daemon snapshots, trains, exports and gates; this can take a minute)", file=sys.stderr)
    try:
        reply = _request(args, Train(agent=args.agent), timeout=args.timeout)
    except RequestFailed as exc:
        if args.json:
            last = _last_run(args)
            failed = {"outcome": "failed", "code": exc.code, "error": str(exc)}
            if last and last.get("outcome") == "failed" and str(last.get("error")) in str(exc):
                failed = {**last, "code": exc.code}
            _print(failed)
        raise  # reported on stderr by main; exit 1 as without --json
    if not args.json:
        print(reply.message)
        return 0
    if "\n" in reply.message:  # every line trained in turn: a summary of each
        done = r"(?:(?P<line>\S+): )?(?P<outcome>\S+) (?P<version>\S+)(?: in \S+)?: (?P<gate>.*)"
        _print({"runs": [_parse_done(said, done) or {"message": said} for said in reply.message.splitlines()], "message": reply.message})
        return 0
    run = _parse_done(reply.message, r"(?P<outcome>\S+) (?P<version>\S+)(?: in \S+)?: (?P<gate>.*)") or {}
    last = _last_run(args)
    if last and run and last.get("version") == run.get("version"):
        run = last  # the scheduler's summary of this very run: adds train_rows, at, seconds
    _print({**run, "message": reply.message})
    return 0


def _max_frame_bytes(args: argparse.Namespace) -> tuple[int, str]:
    """The daemon's ``socket.max_frame_bytes`` as its config says (--config, $REFLEXD_CONFIG or the
    default file), else the default; and where it was found."""
    from reflexd.config import SocketConfig

    socket = _socket_section(args)
    if socket is not None:
        return socket.max_frame_bytes, str(_config_path(args))
    return SocketConfig().max_frame_bytes, "the default (name the daemon's config with --config)"


def _unconfirmed(trainer: dict[str, Any]) -> str:
    """How many of the rejected were first models the online head had learned past (``trainer.unconfirmed``)."""
    n = trainer.get("unconfirmed")
    return f" ({n} lost to the online head during their run)" if n else ""


def _behaviour_line(beh: dict[str, Any]) -> str:
    """status's behaviour model: what is live, a run under way, and the last run's calibration or failure."""
    last = beh.get("last_run") or {}
    line = f"live {beh['live']}" if beh.get("live") else "no model yet"
    if beh.get("state") not in (None, "idle"):
        line += f"; a run is under way ({beh['state']})"
    if last.get("outcome") == "published":
        cal = last["calibration"]
        brier = "n/a" if cal.get("brier") is None else f"{cal['brier']:.3f}"
        # runs published before the calibration's own counts were kept say only what they trained on
        judged = (f"{cal['episodes']} {'held-out' if cal.get('held_out') else 'training'} episodes"
                  if "episodes" in cal else "held-out steps")
        line += f"  (brier {brier} on {judged}; trained on {last['episodes']} episodes)"
    elif last.get("outcome") == "failed":
        line += f"; last run failed: {last.get('error')}"
    if beh.get("waiting") and not beh.get("live"):
        line += f": {beh['waiting']}"
    return line


def _print_lines(lines: dict[str, Any]) -> None:
    """``status`` with several model lines: one row each (``--agent A`` shows one line whole)."""
    for name, line in lines.items():
        t = line.get("trainer") or {}
        said = f"serving {line.get('serving') or 'no model'}  runs {t.get('runs', 0)}  promoted {t.get('promoted', 0)}"
        said += f"  rejected {t.get('rejected', 0)}{_unconfirmed(t)}"
        if t.get("refused_in_a_row"):
            said += f" ({t['refused_in_a_row']} in a row, last: {t.get('last_refusal')})"
        if t.get("state", "idle") != "idle":
            said += f"  {t['state']}"
        elif t.get("waiting"):
            said += f"  waiting: {t['waiting']}"
        print(f"line       {name}  {said}")


def cmd_models_pull(args: argparse.Namespace) -> int:
    """``models pull PATH``: read a model and its manifest here, check them, and send them to the
    daemon, whose own gate judges them (the daemon opens no path a peer names)."""
    from reflexd.errors import RequestFailed
    from reflexd.registry import read_model_dir
    from reflexd.wire.framing import MSGPACK, encode_frame
    from reflexd.wire.protocol import Adopt

    if not args.version:
        raise UsageError("models pull needs a PATH: a folder holding manifest.json and the model, or the manifest")
    manifest, raw, model = read_model_dir(args.version)  # sha256 and feature scheme checked here first
    msg = Adopt(manifest=raw, model=model, source=os.path.abspath(args.version), agent=args.agent)
    size = len(encode_frame(msg, MSGPACK))
    limit, where = _max_frame_bytes(args)
    too_large = (
        f"{args.version}: the model and its manifest make a {size}-byte request, over the daemon's "
        f"socket.max_frame_bytes ({limit}, {where}): raise socket.max_frame_bytes in the daemon's config "
        f"to at least {size} and reload it (SIGHUP), then pull again"
    )
    if size > limit:
        raise UsageError(too_large)
    origin = manifest.fleet
    if not args.json:
        described = (
            f"fleet model {manifest.version} ({origin.rows} rows from {len(origin.hosts)} hosts; pooled gate: "
            f"{'passed' if origin.gate.passed else 'REJECTED'})" if origin is not None else f"model {manifest.version}"
        )
        print(f"pulling {described}: the daemon judges it on its own holdout…", file=sys.stderr)
    try:
        done = _request(args, msg, timeout=args.timeout)
    except RequestFailed as exc:
        if exc.code == "too_large":
            raise UsageError(f"{too_large} (the daemon said: {exc})") from None
        raise
    except DaemonUnavailable as exc:
        if "closed" in str(exc) or "reset" in str(exc).lower() or "broken pipe" in str(exc).lower():
            raise UsageError(f"{too_large}? the daemon closed the connection: {exc}") from None
        raise
    found = _parse_done(done.message, r"(?P<outcome>\S+) (?P<version>\S+)(?: in \S+)?: (?P<gate>.*)") or {}
    if args.json:
        _print({**found, "message": done.message, "source": msg.source, "sha256": manifest.sha256})
    else:
        print(done.message)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from reflexd.wire.protocol import ModelsRequest, Promote, Rollback

    if args.action == "pull":
        return cmd_models_pull(args)
    if args.action in ("promote", "rollback"):
        if args.action == "promote" and not args.version:
            raise UsageError("models promote needs a VERSION")
        agent = args.agent
        done = _request(args, Promote(version=args.version, agent=agent) if args.action == "promote" else Rollback(agent=agent))
        if args.json:
            _print({"message": done.message, "current": _request(args, ModelsRequest(agent=agent)).current})
        else:
            print(done.message)
        return 0
    reply = _request(args, ModelsRequest(agent=args.agent))
    if args.action == "show":
        if not args.version:
            raise UsageError("models show needs a VERSION")
        found = [m for m in reply.models if m.get("version") == args.version]
        if not found:
            where = f" --agent {args.agent}" if args.agent else ""
            raise UsageError(f"no model version {args.version!r}; see `reflexd models list{where}`")
        _print(found[0])  # the manifest, JSON with or without --json
        return 0
    if args.json:
        _print({"current": reply.current, "serving": reply.serving, "line": reply.line, "models": reply.models})
        return 0
    if not reply.models:
        print("no models yet")
        return 0
    print(f"{'':2}{'version':8} {'created':20} {'rows':>8}  gate")
    import datetime as dt

    from reflexd.manifest import Training

    for m in reply.models:
        # * marks what the daemon serves; ! a CURRENT it could not load (status says why)
        version = m.get("version")
        live = "*" if version == reply.serving else "!" if version == reply.current else " "
        created = dt.datetime.fromtimestamp(m.get("created", 0)).strftime("%Y-%m-%d %H:%M:%S")
        gate = (m.get("gate") or {}).get("reason", m.get("error", ""))
        rows = msgspec.convert(m["training"], Training).fit_rows if m.get("training") else ""
        if isinstance(m.get("fleet"), dict):  # a pulled fleet model: fit on the fleet's rows
            rows = m["fleet"].get("train_rows", rows)
        print(f"{live:2}{m.get('version', '?'):8} {created:20} {rows!s:>8}  {gate}")
    if reply.current is None and reply.serving is None:
        print("no version is live: agents decide with the online head, or the default policy")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from reflexd.wire.protocol import Forget

    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError("forget deletes data for good; say --yes to confirm when not on a terminal")
        question = (
            f"Delete everything reflexd stores about agent {args.agent!r} (database rows, Parquet archive,"
            " training snapshots)? Models already trained are kept. [y/N] "
        )
        try:
            if args.json:  # stdout carries the JSON only: ask on stderr
                print(question, end="", file=sys.stderr, flush=True)
                answer = sys.stdin.readline()
            else:
                answer = input(question)
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted", file=sys.stderr)
            return 1
    reply = _request(args, Forget(agent=args.agent), timeout=args.timeout)
    if args.json:
        removed = _removed_counts(reply.message)
        _print({"agent": args.agent, "message": reply.message, **({"removed": removed} if removed is not None else {})})
        return 0
    print(reply.message)
    if _nothing_of_its_own(reply.message):
        print(
            f"note: nothing was kept of agent {args.agent!r} (no rows, archive, dead letters, insights or spool lines);"
            " is the name right? (`reflexd status` lists lines by agent). Snapshots that may hold any agent's rows"
            " were deleted all the same.",
            file=sys.stderr,
        )
    return 0


def _nothing_of_its_own(message: str) -> bool:
    """Did the daemon's ``forget`` reply remove nothing that was the agent's own? Snapshots and
    evaluation windows may hold every agent's rows, so they go whoever is forgotten."""
    removed = _removed_counts(message)
    if removed is None:
        return False
    return not any(n for what, n in removed.items() if not what.endswith(("snapshots", "windows")))


def _propensities(args: argparse.Namespace) -> Any:
    """The live behaviour model of the daemon's state directory, as the importer's estimator."""
    from reflexd.deciding.behaviour import BEHAVIOUR_DIR, BehaviourRegistry, BehaviourSource
    from reflexd.tools.importer import Propensities

    if args.format not in ("auto", "ndjson"):
        raise UsageError("--estimate-propensities fills in decisions of reflexd NDJSON that have no prob")
    if args.models:
        models = Path(args.models)
    else:
        config = _read_config(args)
        if config is None:
            raise UsageError("name the daemon's models directory with --models, or its config with --config")
        models = config.models_path
    source = BehaviourSource(BehaviourRegistry(models / BEHAVIOUR_DIR))
    source.refresh()
    if source.model is None:
        raise UsageError(
            f"no behaviour model is live under {models / BEHAVIOUR_DIR}: the daemon trains one from agents' steps "
            "(behaviour.*), or log each decision's prob"
        )
    return Propensities(source.model)


def cmd_import(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from reflexd.tools import importer
    from reflexd.wire.connection import Connection, request
    from reflexd.wire.protocol import StatusRequest

    fmt = args.format if args.format != "auto" else importer.detect_format(args.file)
    estimate = _propensities(args) if args.estimate_propensities else None
    items = importer.parse(args.file, fmt, args.agent, estimate)  # a generator: the file is read as it is sent
    total = importer.count_lines(args.file)
    socket = _socket_path(args)
    # status on connections of its own: the daemon numbers the import connection's frames in errors
    ingest = request(StatusRequest(), socket).ingest
    before, taken_before = ingest.get("duplicates", 0), ingest.get("id_taken", 0)
    with Connection(socket, timeout=args.timeout) as conn:
        with tqdm(total=total, unit="line", desc=f"importing {fmt}", file=sys.stderr, mininterval=0.5) as bar:

            def progress(line: int) -> None:
                if line > bar.n:
                    bar.update(line - bar.n)

            summary = importer.send(items, conn, args.file, batch_size=args.batch, on_line=progress)
            bar.update(total - bar.n)
    # the daemon counts duplicates for everyone: another agent's resends in this window count too
    ingest = request(StatusRequest(), socket).ingest
    duplicates = ingest.get("duplicates", 0) - before
    # decisions whose ids other agents' decisions hold (dead-lettered as id_taken); others' in this window count too
    taken = ingest.get("id_taken", 0) - taken_before
    sent = summary.decisions + summary.outcomes
    status = 0 if summary.decisions or summary.outcomes else 1  # every line refused, or none at all
    if not (sent or summary.rejected):
        print(f"reflexd: {args.file} holds no line to import", file=sys.stderr)
    elif not sent and args.format != "auto" and (found := importer.detect_format(args.file)) != fmt:
        # every line refused under a format given by hand: the reasons name fields of the wrong format,
        # unless the file's first line reads as another (detection alone may only guess, by its name)
        first = next(iter(importer.parse(args.file, found, args.agent)), None)
        if isinstance(first, importer.Record):
            print(f"reflexd: every line was refused as {fmt}; {args.file} reads as {found} (--format {found})", file=sys.stderr)
    if args.json:
        _print(
            {
                "file": args.file,
                "format": fmt,
                "decisions": summary.decisions,
                "outcomes": summary.outcomes,
                "imported": max(0, sent - duplicates - taken),
                "duplicates": duplicates,
                "id_taken": taken,
                "rejected_lines": len(summary.rejected),
                # the first --show-rejected of them, as {"path", "line", "reason"}
                "rejected": summary.rejected[: args.show_rejected],
            }
        )
        return status
    print(
        f"sent {summary.decisions} decisions and {summary.outcomes} outcomes from {args.file} ({fmt}):"
        f" imported {max(0, sent - duplicates - taken)}, duplicates (already stored) {duplicates},"
        f" rejected lines {len(summary.rejected)}"
    )
    if taken:
        print(
            f"  {taken} decisions not stored: other agents' decisions hold their ids (decision ids are unique across"
            " agents; `reflexd query \"SELECT reason FROM dead_letters WHERE code = 'id_taken'\"` names them)"
        )
    for rejected in summary.rejected[: args.show_rejected]:
        print(f"  rejected {rejected}")
    if len(summary.rejected) > args.show_rejected:
        print(f"  … and {len(summary.rejected) - args.show_rejected} more")
    return status


def _when(text: str | None, flag: str) -> float | None:
    """A time given as epoch seconds or ISO-8601 (a time without a zone is local) as epoch seconds."""
    if text is None:
        return None
    import datetime as dt
    import math

    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = dt.datetime.fromisoformat(text.strip()).timestamp()
        except ValueError:
            raise UsageError(f"{flag}: {text!r} is neither epoch seconds nor an ISO-8601 time (2026-03-01T12:00:00Z)") from None
    if not math.isfinite(seconds):
        raise UsageError(f"{flag}: {text!r} is not a finite time")
    return seconds


def _num(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 1000 else f"{x:.4g}"


def _interval(found: Any, signed: bool = False) -> str:
    if found is None:
        return "-"
    num = (lambda x: ("+" if x >= 0 else "") + _num(x)) if signed else _num
    return f"{num(found.value)} [{num(found.lower)}, {num(found.upper)}]" + ("*" if found.clipped else "")


def render_evaluation(reply: Any) -> str:
    """An Evaluation as one comparison table, the logging policy first, then any discovery."""
    import datetime as dt

    def when(t: float | None) -> str:
        return dt.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds") if t is not None else ""

    window = [f"agent {reply.agent}"] if reply.agent else ["every agent"]
    window += [f"from {when(reply.since)}"] if reply.since is not None else []
    window += [f"before {when(reply.until)}"] if reply.until is not None else []
    scoring = f"DR and DM score with {reply.reward_model}" if reply.reward_model else "no reward model: no DR or DM"
    by_episode = reply.unit == "episode"
    lines = [
        f"{reply.decisions} matured decisions ({', '.join(window)}; {reply.dropped} left out), rewards observed in "
        f"[{_num(reply.reward_min)}, {_num(reply.reward_max)}], {reply.confidence * 100:g}% intervals, {scoring}",
    ]
    if by_episode:
        lines.append(
            f"unit: episode ({reply.episodes} episodes): rewards are episode returns, so each estimator is its "
            "per-decision form over episodes (IPS: PDIS, SNIPS: weighted PDIS, DR: per-decision DR) and intervals and "
            "ESS count episodes"
        )
    ess = f"ESS of {reply.episodes} episodes" if by_episode else "ESS"
    header = ["policy", "IPS", "SNIPS", "DR", f"vs logging ({reply.estimator})", ess, "agrees"]
    table = [header]
    notes = []
    for row in reply.rows:
        name = f"{row.policy} (baseline)" if row.kind == "logging" else row.policy
        table.append(
            [
                name,
                _interval(row.ips),
                _interval(row.snips),
                _interval(row.dr),
                _interval(row.versus_logging, signed=True),
                f"{row.ess:.1f}",
                "-" if row.agreement is None else f"{row.agreement * 100:.1f}%",
            ]
        )
        for estimator in ("ips", "snips", "dr"):
            found = getattr(row, estimator)
            if found is not None and found.clipped and row.kind != "logging":
                notes.append(
                    f"* {row.policy} {estimator.upper()}: the interval [{_num(found.lower)}, {_num(found.upper)}] reaches "
                    f"beyond the rewards observed; bounded to them it is [{_num(found.bounded_lower)}, {_num(found.bounded_upper)}]"
                )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))).rstrip())
    lines += notes
    if reply.discovery is not None:
        found = reply.discovery
        lines.append("")
        lines.append(f"discovery on {found.model} ({found.estimator}, {len(found.candidates)} exploration settings):")
        lines.append(f"  {'recommended ' + found.policy + ': ' + _interval(found.value) if found.policy else found.reason}")
        if found.policy:
            lines.append(f"  ({found.reason})")
        for row in found.candidates[:5]:
            lines.append(f"    {row.policy}: {_interval(row.value)}  ESS {row.ess:.1f}" + (" episodes" if by_episode else ""))
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from reflexd.wire.protocol import Evaluate, probability_tables

    try:
        msg = Evaluate(
            policies=list(args.policies),
            tables=probability_tables(list(args.policies)),
            agent=args.agent,
            since=_when(args.since, "--since"),
            until=_when(args.until, "--until"),
            reward_model=args.reward_model,
            discover=args.discover,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    reply = _request(args, msg, timeout=args.timeout)
    if args.json:
        _print(reply)
    else:
        print(render_evaluation(reply))
    return 0


def _read_config(args: argparse.Namespace) -> Any:
    """The config whose store a stopped daemon left, or None when none is named or found (a socket
    named on its own may be another daemon's)."""
    named = args.config or os.environ.get("REFLEXD_CONFIG")
    if named:
        return load_config(named)
    if not (args.socket or os.environ.get("REFLEXD_SOCKET")) and os.path.exists(DEFAULT_PATH):
        return load_config(DEFAULT_PATH)
    return None


def _data(args: argparse.Namespace) -> Any:
    """What query and export read (``reflexd.tools.readout.Source``): a snapshot the running daemon
    writes, or, when it is not running, its database file opened read-only."""
    import errno

    from reflexd.errors import QueryError, StoreInUse
    from reflexd.tools import readout
    from reflexd.wire.protocol import Release, Snapshot

    archive = not args.no_archive
    try:
        reply = _request(args, Snapshot(archive=archive), timeout=args.timeout)
    except DaemonUnavailable as unreachable:
        if unreachable.timed_out:
            raise QueryError(
                f"the daemon at {unreachable.path} did not answer the snapshot request within --timeout"
                f" {args.timeout:g} s: a snapshot of a big store takes a while, give it a longer --timeout (the"
                " daemon deletes the one it writes on its own)"
            ) from None
        # only a daemon that is not there (no socket, nobody listening) lets the store be read itself
        if not (unreachable.connecting and unreachable.errno in (errno.ENOENT, errno.ECONNREFUSED)):
            raise
        config = _read_config(args)
        if config is None:
            raise
        try:
            source = readout.from_store(config, archive=archive)
        except StoreInUse as held:
            raise UsageError(
                f"{unreachable}; and {held.path} is held by {held.holder}: a daemon runs there, reach it with --socket"
            ) from None
        print(
            f"reflexd: the daemon is not running; reading {config.db_path} read-only (a daemon started before"
            " this command ends cannot open it)",
            file=sys.stderr,
        )
        return source

    def release() -> None:
        try:
            _request(args, Release(id=reply.id))
        except ReflexdError:
            pass  # the daemon deletes it on its own minutes later

    def renew() -> None:
        try:
            _request(args, Release(id=reply.id, renew=True))
        except ReflexdError:
            pass  # tried again in a while; unrenewed, the snapshot lasts its first 15 minutes

    return readout.from_snapshot(reply, release, renew)


def cmd_query(args: argparse.Namespace) -> int:
    from reflexd.tools import readout

    sql = sys.stdin.read() if args.sql == "-" else args.sql
    if args.max_rows is not None and args.max_rows < 0:
        raise UsageError("--max-rows must be 0 (every row) or more")
    with _data(args) as source:
        result = readout.run_query(source, sql)
        if args.json:
            readout.write_json(result, sys.stdout)
        elif args.csv:
            readout.write_csv(result, sys.stdout)
        else:
            readout.write_table(result, sys.stdout, max_rows=args.max_rows or None, width=args.width)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from reflexd.tools import exporter

    if args.format == "parquet" and args.out == "-":
        raise UsageError("a Parquet export is a folder of files: name it with --out DIR")
    if args.json and args.out == "-":
        raise UsageError("--json prints a summary on stdout, where the export would go: name a file with --out")
    window = exporter.Window(agent=args.agent, since=_when(args.since, "--since"), until=_when(args.until, "--until"))
    with _data(args) as source:
        counts = exporter.export(source, args.format, args.out, window)
    where = "stdout" if args.out == "-" else args.out
    if args.agent and not any(counts.values()):
        print(f"note: nothing of agent {args.agent!r} in the window: is the name right?", file=sys.stderr)
    if args.json:
        _print({"format": args.format, "out": args.out, "counts": counts})
        return 0
    written = ", ".join(f"{n} {table.replace('_', ' ')}" for table, n in counts.items() if table != "not_matured")
    print(f"exported {written} to {where} ({args.format})", file=sys.stderr)
    if counts.get("not_matured"):
        print(
            f"  {counts['not_matured']} decisions left out: their reward wait window is not over yet", file=sys.stderr
        )
    return 0


def cmd_insights(args: argparse.Namespace) -> int:
    from reflexd.tools.insights import SHOWN, render
    from reflexd.wire.protocol import InsightsRequest

    if args.now:
        print("extracting… (the daemon snapshots its experience and analyses it in a subprocess)", file=sys.stderr)
    msg = InsightsRequest(agent=args.agent, since=_when(args.since, "--since"), now=args.now)
    reply = _request(args, msg, timeout=args.timeout)
    if args.json:
        _print({k: getattr(reply, k) for k in ("run", "rules", "patterns", "anomalies", "trends", "summary")})
        return 0
    print("\n".join(render(reply, None if args.all else SHOWN)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from reflexd.tools.report import write_report
    from reflexd.wire.protocol import InsightsRequest

    reply = _request(args, InsightsRequest(agent=args.agent, now=args.now), timeout=args.timeout)
    path = write_report(reply, args.out)
    print(f"report written to {path}", file=sys.stderr)
    if args.json:
        _print({"path": str(path), "run": reply.run})
    return 0


def cmd_fleet_train(args: argparse.Namespace) -> int:
    # Ray (the fleet extra) is imported by reflexd.fleet.train when this runs, and by no other command
    from reflexd.fleet.command import train

    return train(args, _when(args.since, "--since"))


def cmd_demo(args: argparse.Namespace) -> int:
    if args.traces:
        from reflexd.tools.demo_traces import run_traces_demo

        return run_traces_demo(episodes=args.decisions or 4000, out_dir=args.out, seed=args.seed, rate=args.rate / 6)
    from reflexd.tools.demo import run_demo

    return run_demo(
        decisions=args.decisions or 12_000, out_dir=args.out, seed=args.seed, rate=args.rate, agents=args.agents,
        insights=not args.no_insights,
    )


def cmd_install_service(args: argparse.Namespace) -> int:
    from reflexd.tools.install import InstallError, install

    try:
        install(args)
    except InstallError as exc:
        print(f"reflexd: install-service: {exc}", file=sys.stderr)
        return 1
    return 0


def _examples(*lines: str) -> str:
    return "examples:\n" + "".join(f"  {line}\n" for line in lines)


_AGENT_LINE = (
    "the agent whose model line this is about (learning.scope: each agent, or group, has its own "
    "models, trainer and rollback monitor); needed once there is more than one line"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reflexd", description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"reflexd {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help="config file (default: $REFLEXD_CONFIG or /etc/reflexd/reflexd.yaml)")
    client = argparse.ArgumentParser(add_help=False, parents=[common])
    client.add_argument("--socket", help="daemon socket path (overrides the config)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, short: str, description: str, examples: list[str], **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=short,
            description=description,
            epilog=_examples(*examples),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kw,
        )

    def json_flag(p: argparse.ArgumentParser, what: str, text: str | None = None) -> None:
        p.add_argument(
            "--json", action="store_true", help=text or f"print {what} as JSON on stdout (and nothing else there)"
        )

    p = command(
        "run",
        "run the daemon in the foreground",
        "Run the daemon in the foreground until SIGTERM or SIGINT; SIGHUP reloads the config (a bad file\n"
        "leaves the old one in force). Logs go to stderr, nothing to stdout. Exit 0 after a clean stop,\n"
        "78 if the config is invalid or names a state_dir or socket that cannot be used, 65 if the store\n"
        "is damaged (see check-store).",
        ["reflexd run --config configs/reflexd.yaml", "REFLEXD_CONFIG=/etc/reflexd/reflexd.yaml reflexd run"],
        parents=[common],
    )
    p.set_defaults(func=cmd_run)

    p = command(
        "check-config",
        "validate a config file (exit 0, or 78 with the errors)",
        "Validate a config file without starting anything. Prints 'PATH: ok' and exits 0, or lists the\n"
        "problems with their key paths on stderr and exits 78 (EX_CONFIG, which the systemd unit's\n"
        "ExecStartPre= relies on). A wrong type, value or unknown key is reported alone, the first\n"
        "found (decoding stops there); past those, every setting that makes no sense with the others,\n"
        "and a directory of a socket (socket.path, metrics.path, traces.path) or state_dir that the\n"
        "daemon would refuse (writable by group or others, such as /tmp itself) or could not make\n"
        "(below a file). A valid file that this process's limits would keep from working as configured\n"
        "(a file-descriptor limit below what the socket's connections need), or whose redaction key\n"
        "file group or others may read, still passes, with a 'warning:' line each on stderr. --json prints\n"
        '{"ok": true|false, "path": ..., "problems": [...], "warnings": [...]} instead, with the same\n'
        "exit codes.",
        ["reflexd check-config /etc/reflexd/reflexd.yaml", "reflexd check-config --json configs/reflexd.yaml"],
        parents=[common],
    )
    p.add_argument("path", nargs="?", help="file to check (default: --config, $REFLEXD_CONFIG or /etc/reflexd/reflexd.yaml)")
    json_flag(p, '{"ok", "path", "problems", "warnings"}')
    p.set_defaults(func=cmd_check_config)

    p = command(
        "check-store",
        "check the database file for damage (exit 0, or 65 if damaged)",
        "Read every column of every table of the store (<state_dir>/reflexd.duckdb) read-only, so that\n"
        "DuckDB checks each data block against its checksum, and report. The daemon runs the same check\n"
        "at start and refuses a damaged store. Run it with the daemon stopped: DuckDB lets one process\n"
        "open the file, so a running daemon's lock is reported (exit 75). Exit 0 if the store is sound or\n"
        "does not exist yet, 65 (EX_DATAERR) if it is damaged (docs/operations.md says how to recover),\n"
        '78 if the config naming it cannot be read, 1 if it could not be checked. --json prints {"ok", "path", "state": sound|missing|damaged|\n'
        'in_use|unchecked, "rows": {table: rows} ({} unless read), "seconds", "code": the error\'s code\n'
        '(null if none), "error": its message (null if none)}.',
        ["reflexd check-store --config /etc/reflexd/reflexd.yaml", "reflexd check-store --json"],
        parents=[common],
    )
    json_flag(p, '{"ok", "path", "state", "rows", "seconds", "code", "error"}')
    p.set_defaults(func=cmd_check_store)

    p = command(
        "status",
        "ingest counts, backlog, live model and its gate, trainer state",
        "Ask the running daemon how it is doing: ingest counters and backlog, stored experience, the live\n"
        "model and its gate verdict, the trainer and the automatic-rollback monitor, and a failed config\n"
        "reload or settings waiting for a restart. Each agent (or group)\n"
        "learns in its own model line (learning.scope): with several lines a row each, --agent A shows A's\n"
        "line whole. --json prints the whole status reply (its fields are described in docs/operations.md).\n"
        "Exit 1 if the daemon cannot be reached.",
        ["reflexd status", "reflexd status --agent router", "reflexd status --json", "reflexd status --socket /run/reflexd/reflexd.sock"],
        parents=[client],
    )
    p.add_argument("--agent", help=_AGENT_LINE)
    json_flag(p, "the full status reply")
    p.set_defaults(func=cmd_status)

    p = command(
        "decide",
        "ask the daemon for one decision (logged like any other)",
        "Ask the daemon to choose one of --actions for --context, as an agent would; the decision is\n"
        "logged like any other, so an outcome can be sent for its id (reflexd reward ID REWARD). Prints\n"
        "the action chosen, its probability, the model and strategy that chose it, and the decision's id\n"
        "(--json: id, action, prob, model_version, strategy). With --no-log nothing is chosen or logged,\n"
        "and exploration's clock does not move: it prints every action's score, spread and probability\n"
        "(--json: id, actions, scores, spread, probs, model_version, strategy; scores and spread are null\n"
        "without a model). With --slots K it ranks K of the actions (a slate): one decision is logged per\n"
        "slot, and it prints the slate id and each slot's action, probability given the slots before it,\n"
        "and id (--json: slate, slots). Exit 1 on a bad --context or --actions, or if the daemon cannot\n"
        "be reached.",
        [
            """reflexd decide --agent router --context '{"task": "code"}' --actions small,large""",
            """reflexd decide --agent feed --context '{"user": "u1"}' --actions a,b,c,d --slots 3""",
            """reflexd decide --agent router --actions '[{"id": "small", "features": {"cost": 1}}, "large"]'""",
            """reflexd decide --agent router --context '{"task": "code"}' --actions small,large --no-log""",
            """reflexd decide --agent router --context '{"task": "code"}' --actions small,large --default small""",
        ],
        parents=[client],
    )
    p.add_argument("--agent", required=True, help="agent id")
    p.add_argument("--context", default="{}", help="context as a JSON object")
    p.add_argument("--actions", required=True, help='comma-separated action ids, or a JSON list of ids / {"id", "features"}')
    p.add_argument(
        "--no-log", action="store_true",
        help="only score: print every action's score, spread and probability; nothing is logged or learned",
    )
    p.add_argument("--slots", type=int, metavar="K", help="rank K of the actions (a slate), one decision per slot")
    p.add_argument(
        "--default", metavar="ACTION",
        help="the agent's own choice (apprentice mode): served, with exploration, until a model is live",
    )
    json_flag(p, "the reply")
    p.set_defaults(func=cmd_decide)

    p = command(
        "reward",
        "send one decision's outcome: its reward",
        "Send the outcome of a logged decision (the id decide printed, or one an agent logged): its\n"
        "reward joins the decision as an agent's Policy.reward would (rewards.aggregation combines several;\n"
        "rewards.wait_window bounds when it counts); the daemon's online head learns the first one of a\n"
        "decision made over the socket (an in-process Policy's head learns from Policy.reward). Returns once\n"
        "the daemon has the outcome on disk; prints the decision id and reward (--json: decision_id, reward,\n"
        "id). An outcome whose id was sent before is a duplicate and counted once. An outcome for an id no\n"
        "decision has is kept too, and counted in status (experience.outcomes_without_decision). Exit 1 on a\n"
        "reward that is not a finite number, an outcome the daemon refuses, or if it cannot be reached.",
        [
            """reflexd reward d-5f2c... 1.0""",
            """reflexd reward d-5f2c... 0.25 --id d-5f2c...:rating""",
        ],
        parents=[client],
    )
    p.add_argument("decision_id", metavar="DECISION_ID", help="the decision's id, as decide printed it")
    p.add_argument("reward", metavar="REWARD", help="the reward, a finite number")
    p.add_argument("--id", help="the outcome's own id, so that sending it again counts once (default: a new one)")
    json_flag(p, "what was sent")
    p.set_defaults(func=cmd_reward)

    p = command(
        "explain",
        "why the live model ranks the actions as it does: scores, probabilities, the keys that moved it",
        "Ask the daemon why its live model ranks --actions as it does for --context: each action's score,\n"
        "spread and probability, and the context keys that moved the choice most. Each key (a dotted path\n"
        "such as user.tier; a list counts as one key) is removed in turn and the actions scored again: its\n"
        "'margin' is how much it widens the chosen action's lead over the runner-up, its 'score' how much it\n"
        "adds to the chosen action's score (docs/learning.md, Explaining). Largest |margin| first. Nothing\n"
        "is logged. With no model live, the online head as it decides once it has learned for these actions\n"
        "(model_version null), else (or with --default) the default policy's probabilities and no keys.\n"
        "--json prints the explanation: agent, actions [{id, score, spread, prob}], chosen, runner_up, keys\n"
        "[{key, score, margin, best_without}], model_version, strategy. Exit 1 on a bad --context or\n"
        "--actions, or if the daemon cannot be reached.",
        [
            """reflexd explain --agent router --context '{"task": "code", "user": {"tier": "pro"}}' --actions small,large""",
            """reflexd explain --agent router --context '{"task": "code"}' --actions small,large --top 5 --json""",
        ],
        parents=[client],
    )
    p.add_argument("--agent", required=True, help="agent id")
    p.add_argument("--context", default="{}", help="context as a JSON object")
    p.add_argument("--actions", required=True, help='comma-separated action ids, or a JSON list of ids / {"id", "features"}')
    p.add_argument("--top", type=int, help="show only the N keys that moved the choice most (default: every key)")
    p.add_argument(
        "--default", metavar="ACTION",
        help="the agent's own choice (apprentice mode), as decide takes it: explained as decisions serve it",
    )
    json_flag(p, "the explanation")
    p.set_defaults(func=cmd_explain)

    p = command(
        "insights",
        "what the agents' experience teaches: rules, patterns, anomalies, trends",
        "Show what the newest knowledge extraction found (docs/insights.md): rules (\"when task = code,\n"
        "large earns +0.21 over small, 95% CI [...], 812 decisions\"), published only after they held on\n"
        "decisions they were not found on; patterns (each action's value per context segment, doubly\n"
        "robust); anomalies (reward change points, dead-letter and error bursts, context drift,\n"
        "exploration health, a live model below its gate's prediction); trends (reward per agent, action\n"
        "and model version over time). The daemon extracts on a schedule (insights.interval); --now runs\n"
        "an extraction first and waits for it. Text lists up to 10 findings of each kind (newest anomaly\n"
        "first) and says how many more there are (--all lists every one), then the run's notes: what it\n"
        "could not examine and why. --json prints one object with lists rules, patterns, anomalies,\n"
        "trends, and run and summary.",
        ["reflexd insights", "reflexd insights --agent router --now", "reflexd insights --since 2026-12-01 --json"],
        parents=[client],
    )
    p.add_argument(
        "--agent",
        help="only the findings about this agent (and those about no one agent); a note says so when no decision of it is in the store",
    )
    p.add_argument("--since", help="anomalies from this time on, trends ending after it (epoch seconds or ISO-8601)")
    p.add_argument("--now", action="store_true", help="run an extraction first and wait for it")
    p.add_argument("--all", action="store_true", help="show every finding, not only the first 10 of each kind")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the answer (default 1800)")
    json_flag(p, "the findings")
    p.set_defaults(func=cmd_insights)

    p = command(
        "report",
        "write the insights as one self-contained HTML page with plots",
        "Write the newest extraction's findings as one HTML page (plots inline, no scripts, readable\n"
        "without a server): reward trends, rules with their intervals, anomalies on a timeline, and the\n"
        "tables behind them. Needs matplotlib (pip install 'reflexd[report]').",
        ["reflexd report --out /tmp/reflexd-report", "reflexd report --agent router --now"],
        parents=[client],
    )
    p.add_argument("--out", default="reflexd-report", help="folder for index.html (default ./reflexd-report)")
    p.add_argument("--agent", help="only the findings about this agent")
    p.add_argument("--now", action="store_true", help="run an extraction first and wait for it")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the answer (default 1800)")
    json_flag(p, "where the report went")
    p.set_defaults(func=cmd_report)

    p = command(
        "train",
        "start a training run now and wait for its result",
        "Start a training run now and wait for its result, ignoring the idle, new-data and retry-backoff\n"
        "conditions the scheduler waits for: the daemon snapshots its experience, trains a candidate in a\n"
        "subprocess, exports it and gates it by off-policy evaluation; a candidate that passes goes live.\n"
        "Prints 'promoted VERSION in LINE: REASON' or 'rejected VERSION in LINE: REASON' (no 'in LINE' with\n"
        "learning.scope: shared) and exits 0 (a rejected candidate is not an error); a failed run exits 1.\n"
        "--json prints the run's summary (outcome, version, gate, train_rows, at, seconds, message), or\n"
        '{"outcome": "failed", "error": ...} with exit 1. Each agent (or group) learns in its own model\n'
        "line (learning.scope): --agent A trains A's line; without it every line is trained in turn, one\n"
        'line of output each (--json: {"runs": [...], "message"}). A run asked for before enough decisions\n'
        "have joined their rewards (their wait windows still open) exits 1 saying so, and puts no automatic\n"
        "run off; a train also ends the hold a `reflexd models rollback` put on the line.",
        ["reflexd train", "reflexd train --agent router", "reflexd train --json --timeout 300"],
        parents=[client],
    )
    p.add_argument("--agent", help="train this agent's model line (default: every line in turn)")
    p.add_argument("--now", action="store_true", help="train now (default; kept for compatibility)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the run (default 900)")
    json_flag(p, "the run's summary")
    p.set_defaults(func=cmd_train)

    p = command(
        "models",
        "list, show, promote, roll back or pull model versions",
        "List the model versions in a model line's registry (--agent A: A's line; needed once agents learn in\n"
        "lines of their own, learning.scope) with their creation time, rows and gate verdict (* marks the\n"
        "version the daemon serves, ! a CURRENT it could not load); show one version's manifest (JSON); make\n"
        "a version live (promote); or go back to the version live before the current one (rollback; from the\n"
        "first model, to no model: agents decide as before it, with the online head alone, until a version is\n"
        "promoted). Exit 1 for an unknown version, or a rollback with no model live. --json: list prints\n"
        '{"current", "serving", "models"} with every manifest, show the manifest, promote and rollback\n'
        '{"message", "current"}.\n\n'
        "pull PATH brings in a model trained elsewhere (a fleet model from `reflexd fleet train`): PATH is the\n"
        "folder holding manifest.json and policy.onnx, or the manifest. The files are read and checked here\n"
        "(sha256, feature scheme) and sent to the daemon, which never opens the path: it judges the model on\n"
        "its own latest snapshot's holdout against its live model by the rule its own runs go live by, and\n"
        "registers it, promoted or rejected (docs/fleet.md). A model whose features are hashed differently\n"
        "from the daemon's (features: context_dim, action_dim, seed) is refused, and so is one already in the\n"
        "registry (the same sha256: the message names its version). A training run in progress is waited for\n"
        "at most the daemon's socket.request_timeout; then pull again. Prints 'promoted VERSION: REASON' or\n"
        "'rejected VERSION: REASON' and exits 0; exits 1 if it cannot be judged (a holdout too small registers\n"
        "nothing: pull again once new experience has come in), or if the request is larger than the daemon's\n"
        "socket.max_frame_bytes (read from --config when given). If --timeout passes first, the daemon still\n"
        "registers the model. promote, rollback and pull are for administrators: root, the daemon's user,\n"
        "socket.admin_uids and socket.admin_gids (others get a forbidden error). --json prints\n"
        '{"outcome", "version", "gate", "message", "source", "sha256"}.',
        [
            "reflexd models list",
            "reflexd models list --agent router",
            "reflexd models show v0003",
            "reflexd models promote v0002",
            "reflexd models rollback --agent router",
            "reflexd models --json",
            "reflexd models pull /srv/fleet/model-2026-12-06",
            "reflexd models pull fleet-out/manifest.json --config /etc/reflexd/reflexd.yaml --json",
        ],
        parents=[client],
    )
    p.add_argument(
        "action", nargs="?", default="list", choices=["list", "show", "promote", "rollback", "pull"],
        help="list (the default; * marks the served version), show VERSION, promote VERSION, rollback (which holds the"
        " line's automatic training until a promote or a train), or pull PATH",
    )
    p.add_argument("version", nargs="?", help="model version for show and promote (e.g. v0003); PATH for pull")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for a pull to be judged (default 900)")
    p.add_argument("--agent", help=_AGENT_LINE)
    json_flag(p, "the result")
    p.set_defaults(func=cmd_models)

    p = command(
        "forget",
        "delete everything stored about an agent (database, archive, snapshots, refused lines, dead letters)",
        "Delete everything the daemon stores about one agent: database rows, dead letters, Parquet archive\n"
        "partitions, the training snapshots that may hold its rows (its own line's, a group's, the shared\n"
        "line's) and refused spool lines; models already trained are kept. Only administrators may (root,\n"
        "the daemon's user, socket.admin_uids and socket.admin_gids). Asks first on a terminal (--yes\n"
        "otherwise). Prints what was removed and exits 0 (with a note on stderr if nothing of the agent's\n"
        'own was kept); exits 1 if the answer is not yes. --json prints {"agent", "message", "removed":\n'
        "{what: count}}.",
        ["reflexd forget --agent router", "reflexd forget --agent router --yes --json"],
        parents=[client],
    )
    p.add_argument("--agent", required=True, help="agent id")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation (needed when not on a terminal)")
    p.add_argument(
        "--timeout", type=float, default=900.0, help="seconds to wait (a training run in progress is waited for)"
    )
    json_flag(p, "what was removed")
    p.set_defaults(func=cmd_forget)

    p = command(
        "import",
        "send decisions logged by another policy (reflexd NDJSON, VW DSJSON, Open Bandit Dataset CSV) to the daemon",
        "Send decisions and outcomes logged by another policy to the daemon: reflexd NDJSON (decision and\n"
        "outcome lines), Vowpal Wabbit DSJSON (cb_explore_adf) or an Open Bandit Dataset CSV (each row a\n"
        "slot of a slate: a slot decision and its click). Events already stored count as\n"
        "duplicates, so an import can be repeated. Progress goes to stderr, a summary to stdout (--json:\n"
        "file, format, decisions, outcomes, imported, duplicates, rejected_lines and the first rejected\n"
        "lines). Exit 1 if no line could be sent (every line refused, or an empty file).",
        [
            "reflexd import logged.dsjson --agent router",
            "reflexd import decisions.ndjson --format ndjson --json",
            "reflexd import bts/all/all.csv --format obd --agent zozo",
        ],
        parents=[client],
    )
    p.add_argument("file", help="the log: one JSON object per line, or an Open Bandit Dataset CSV")
    p.add_argument(
        "--format", choices=["auto", "ndjson", "dsjson", "obd"], default="auto",
        help="ndjson (reflexd decision/outcome lines), dsjson (Vowpal Wabbit cb_explore_adf) or obd (Open Bandit"
        " Dataset CSV); default: by the file (.dsjson, .csv, else by its first line)",
    )
    p.add_argument(
        "--agent", help="agent id for the imported decisions (dsjson, obd default: imported; ndjson: replaces the logged one)"
    )
    p.add_argument("--batch", type=int, default=1000, help="messages per acknowledged batch (default 1000)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each acknowledgement")
    p.add_argument("--show-rejected", type=int, default=20, help="rejected lines to list (default 20)")
    p.add_argument(
        "--estimate-propensities", action="store_true",
        help="decisions logged without prob get the live behaviour model's estimate, marked with the strategy "
             "'estimated:behaviour VERSION' (ndjson)",
    )
    p.add_argument("--models", help="models directory to take the behaviour model from (default: the config's)")
    json_flag(p, "the summary")
    p.set_defaults(func=cmd_import)

    p = command(
        "evaluate",
        "estimate what other policies would have earned on the logged decisions (IPS, SNIPS, DR)",
        "Estimate off-policy, on the matured decisions the daemon has logged, what each POLICY would have\n"
        "earned, beside the logging policy (the baseline: its value is the mean observed reward). A POLICY\n"
        "is a model version (v0003; live: the live one) exploring as its manifest says, action:ID (always\n"
        "that action), file:PATH (per-decision probabilities, NDJSON lines {\"id\": decision id, \"probs\":\n"
        "{action id: p}}, read here and sent with the request), or a version with exploration settings of one's own\n"
        "(v0003@strategy=softmax,temperature=0.5; any key of the exploration config section the strategy\n"
        "reads: epsilon under squarecb is refused, as it would change nothing). Prints one\n"
        "table: IPS, SNIPS and DR with intervals at gate.confidence, the difference from the logging policy,\n"
        "the effective sample size (Σw)²/Σw² and the share of decisions where the policy's likeliest action\n"
        "is the logged one. An interval reaching beyond the rewards observed is marked * and given bounded\n"
        "to them. DR and DM score with the live model (--reward-model to choose; without any model they are\n"
        "left out). --discover also tries a grid of exploration settings on the first model named (else\n"
        "the live one) and recommends the one with the best lower bound, if that is above the logging\n"
        "policy's lower bound (docs/learning.md). --since/--until select decisions by their own time (ts;\n"
        "an imported decision keeps its logged time): epoch seconds or ISO-8601 (local time without a zone).\n"
        "Where rewards are episode returns (rewards.episode_return) decisions are judged by episode: each\n"
        "estimator in its per-decision form over episodes, intervals and ESS counting episodes (unit: episode).\n"
        "--json prints the evaluation (decisions, rows [{policy, kind, value, ips, snips, dm, dr,\n"
        "versus_logging, ess, agreement}], discovery, unit, episodes, ...). Exit 1 on a policy that cannot be read or\n"
        "applied, too few decisions, or if the daemon cannot be reached.",
        [
            "reflexd evaluate v0003 action:large",
            "reflexd evaluate live v0002 'live@strategy=epsilon_greedy,epsilon=0.05' --agent router --since 2026-03-01",
            "reflexd evaluate file:/tmp/probs.ndjson --since 1767225600 --until 1767312000 --json",
            "reflexd evaluate live --discover",
            "reflexd evaluate v0002 --reward-model v0003",
        ],
        parents=[client],
    )
    p.add_argument("policies", nargs="*", metavar="POLICY", help="vNNNN, live, action:ID, file:PATH or VERSION@key=value,...")
    p.add_argument("--agent", help="only this agent's decisions (default: every agent's)")
    p.add_argument("--since", help="decisions made at or after this time (epoch seconds or ISO-8601)")
    p.add_argument("--until", help="decisions made before this time (epoch seconds or ISO-8601)")
    p.add_argument("--reward-model", metavar="VERSION", help="the model whose scores DR and DM use (default: the live one)")
    p.add_argument("--discover", action="store_true", help="search exploration settings on a model and recommend one")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the evaluation (default 600)")
    json_flag(p, "the evaluation")
    p.set_defaults(func=cmd_evaluate)

    p = command(
        "install-service",
        "install reflexd as a systemd service: a venv under /opt/reflexd, the units, /etc/reflexd",
        "Install reflexd on this host as a systemd service, from the source tree this command comes from\n"
        "(--source names another): a venv of its own under --prefix (/opt/reflexd) with reflexd and the\n"
        "CPU-only torch in it, so the units run PREFIX/bin/reflexd; reflexd.service and reflexd.socket in\n"
        "/etc/systemd/system, the sysusers and tmpfiles snippets in /etc/sysusers.d and /etc/tmpfiles.d,\n"
        "and the documented default config at /etc/reflexd/reflexd.yaml with socket.group: reflexd (an\n"
        "existing config is kept). Installing again upgrades the venv and the units. Nothing is started:\n"
        "it prints the systemd commands that create the user and enable the units. --destdir stages every\n"
        "file under another root, for a package or an image. `make install-service` runs the same code\n"
        "with the system's python3. Exit 0, or 1 with the reason (docs/operations.md).",
        [
            "sudo reflexd install-service",
            "sudo reflexd install-service --prefix /srv/reflexd --find-links /opt/wheels --torch-index ''",
            "reflexd install-service --destdir /tmp/stage",
        ],
    )
    from reflexd.tools.install import add_arguments as install_arguments

    install_arguments(p)
    p.set_defaults(func=cmd_install_service)

    p = command(
        "query",
        "run a read-only SQL query on the stored experience and the archive, while the daemon runs",
        "Run one SQL query (DuckDB's dialect) on the daemon's data: the tables decisions, outcomes, steps,\n"
        "events, dead_letters and models, each experience table with its rows in the Parquet archive too,\n"
        "so every row is there once. The daemon writes a snapshot of every table as of one moment (the\n"
        "snapshot request; it runs on while it does, and the query renews it while it reads) and the\n"
        "query runs on it here, in a DuckDB of its own that reads no other file: it can never write to\n"
        "the store. When no daemon is there (no socket, nobody listening), its database file (from\n"
        "--config) is opened read-only instead, and a daemon started meanwhile cannot open it until the\n"
        "query ends. Columns are as docs/operations.md describes them (steps' index; context, actions,\n"
        "probs, observation, data and detail are JSON: context->>'task'). Only queries run (SELECT,\n"
        "WITH, FROM, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN of a query). Prints a table (at most --max-rows\n"
        "rows, cells cut at --width), --json a JSON array of objects (JSON columns nested), --csv CSV\n"
        "with a header. SQL - reads it from stdin. Exit 1 with DuckDB's message on SQL it refuses, if the\n"
        "snapshot is not written within --timeout, or if neither the daemon nor its store can be read.",
        [
            'reflexd query "SELECT agent, count(*) AS decisions, avg(prob) FROM decisions GROUP BY agent"',
            """reflexd query "SELECT d.chosen, avg(o.reward) FROM decisions d JOIN outcomes o ON o.decision_id = d.id GROUP BY 1" --csv""",
            """reflexd query "SELECT context->>'task' AS task, count(*) FROM decisions WHERE ts > epoch(now()) - 86400 GROUP BY 1" --json""",
            "reflexd query 'DESCRIBE decisions'",
            "reflexd query --no-archive - < report.sql",
        ],
        parents=[client],
    )
    p.add_argument("sql", metavar="SQL", help="one query; - reads it from stdin")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="print the rows as a JSON array of objects on stdout")
    shape.add_argument("--csv", action="store_true", help="print the rows as CSV with a header on stdout")
    p.add_argument("--max-rows", type=int, default=1000, help="rows the table shows (default 1000; 0: all)")
    p.add_argument("--width", type=int, default=60, help="characters a table cell shows (default 60; 0: all)")
    p.add_argument("--no-archive", action="store_true", help="leave the Parquet archive out (only what DuckDB holds)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds to wait for the snapshot to be written (default 300), then exit 1")
    p.set_defaults(func=cmd_query)

    p = command(
        "export",
        "write the stored experience out as Parquet, reflexd NDJSON or Vowpal Wabbit DSJSON",
        "Write the daemon's data out, from the same snapshot as query, renewed while the export runs (or\n"
        "the stopped daemon's store read-only, which a daemon cannot open until the export ends), the\n"
        "Parquet archive included. --format parquet writes a folder (--out DIR) with a file per table,\n"
        "columns as the archive has them. ndjson writes decision and outcome lines, what\n"
        "`reflexd import` reads: importing them into another daemon stores the same decisions and\n"
        "outcomes. dsjson writes one Vowpal Wabbit cb_explore_adf line per matured decision (vw\n"
        "--cb_explore_adf --dsjson reads it): _label_cost is minus the reward joined as training joins it,\n"
        "_label_probability the logged probability; decisions whose wait window is not over are left out\n"
        "and counted. --agent, --since and --until narrow it (the decision's own time, epoch seconds or\n"
        "ISO-8601); outcomes go with their decisions. NDJSON and DSJSON go to stdout unless --out FILE\n"
        "(written whole or not at all). A summary goes to stderr; --json prints it on stdout (needs\n"
        "--out). Exit 1 if the data cannot be read or written.",
        [
            "reflexd export --format ndjson --out experience.ndjson",
            "reflexd export --format dsjson --agent router --since 2026-03-01 --out router.dsjson",
            "reflexd export --format parquet --out /tmp/reflexd-export --json",
            "reflexd export --format ndjson --agent router | gzip > router.ndjson.gz",
        ],
        parents=[client],
    )
    p.add_argument("--format", choices=["parquet", "ndjson", "dsjson"], default="ndjson",
                   help="parquet (a folder, a file per table), ndjson (what reflexd import reads; default) or dsjson"
                   " (Vowpal Wabbit cb_explore_adf)")
    p.add_argument("--agent", help="only this agent's data (default: every agent's)")
    p.add_argument("--since", help="decisions made at or after this time (epoch seconds or ISO-8601)")
    p.add_argument("--until", help="decisions made before this time (epoch seconds or ISO-8601)")
    p.add_argument("--out", default="-", help="the file (ndjson, dsjson) or new folder (parquet); default - (stdout)")
    p.add_argument("--no-archive", action="store_true", help="leave the Parquet archive out (only what DuckDB holds)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds to wait for the snapshot to be written (default 300), then exit 1")
    json_flag(p, "a summary (format, out, counts by table)")
    p.set_defaults(func=cmd_export)

    p = command(
        "fleet",
        "train one model on many hosts' archives with Ray (the fleet extra), for hosts to pull",
        "Commands that work across hosts. They need the optional fleet extra (Ray):\n"
        "pip install 'reflexd[fleet]'. `reflexd fleet train --help` describes the one there is.",
        ["reflexd fleet train /srv/archives/host-* --out fleet-model", "reflexd fleet train --help"],
    )
    fleet = p.add_subparsers(dest="fleet_command", metavar="SUBCOMMAND", required=True)
    p = fleet.add_parser(
        "train",
        help="read hosts' Parquet archives, train one model on Ray workers, gate it, write ONNX + manifest",
        description=(
            "Read many hosts' Parquet archives (each a host's <state_dir>/archive, or its state directory; a\n"
            "local path or any filesystem pyarrow opens: file://, s3://, gs://, hdfs://, abfs://), join their\n"
            "decisions and rewards as each host's own snapshot does (the config's rewards and agents sections;\n"
            "the archive holds only rows older than the host's retention.days, so the fleet sees none newer),\n"
            "and train one model with Ray: a Ray task reads each host, and Ray Train's TorchTrainer fits the\n"
            "config's learner data-parallel on --workers CPU workers. Each host's newest trainer.holdout_fraction\n"
            "of experiences is held out; the model is gated on that pooled holdout by off-policy evaluation\n"
            "against the logging policy (the gate section: a host's first-model rule), and written to --out as\n"
            "policy.onnx and manifest.json, the files a host's registry holds (the manifest's `fleet` names the\n"
            "hosts, rows, workers and the pooled verdict). A host brings it in with `reflexd models pull OUT`,\n"
            "where its own gate decides whether it goes live. Settings (features, trainer, gate, exploration,\n"
            "rewards) come from --config ($REFLEXD_CONFIG, /etc/reflexd/reflexd.yaml, else the defaults): use\n"
            "the hosts' features section, or they refuse the model. Progress goes to stderr, a summary to\n"
            "stdout (--json: out, model, manifest, sha256, passed, gate, hosts, rows, train_rows, holdout_rows,\n"
            "workers and the seconds each stage took). Exit 0 once the model is written (a model the pooled gate\n"
            "rejects is written too, and the summary says so); 1 if it cannot be trained (no archive, too few\n"
            "experiences, Ray missing or failing). docs/fleet.md describes the architecture and its costs."
        ),
        epilog=_examples(
            "reflexd fleet train /srv/reflexd/host-a/archive /srv/reflexd/host-b/archive --out fleet-model",
            "reflexd fleet train s3://reflexd-archives/host-1 s3://reflexd-archives/host-2 --out /srv/fleet/m1 --workers 4",
            "reflexd fleet train /srv/hosts/*/ --out fleet-model --address auto --storage s3://bucket/ray",
            "reflexd fleet train /srv/hosts/*/ --out fleet-model --agent router --since 2026-11-01 --json",
            "reflexd models pull fleet-model",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    p.add_argument("archives", nargs="+", metavar="ARCHIVE", help="a host's archive (or state directory): a path or URI")
    p.add_argument("--out", required=True, help="folder to write policy.onnx and manifest.json to")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (one CPU each; default 2)")
    p.add_argument(
        "--address",
        help="a running Ray cluster to use (ray.init's address: auto on one of its nodes, or HOST:PORT); "
        "default: start a new local one on this machine's CPUs, even with one already running here or RAY_ADDRESS set",
    )
    p.add_argument(
        "--storage", help="where Ray Train keeps the model it hands back (default: a temporary folder; a multi-node "
        "cluster needs a path or URI every node reaches)",
    )
    p.add_argument("--agent", help="only this agent's decisions (default: every agent's)")
    p.add_argument(
        "--since", help="only decisions made at or after this time (epoch seconds or ISO-8601); older archive days are not read"
    )
    p.add_argument(
        "--max-rows-per-host", type=int, metavar="N",
        help="the newest N experiences of each host (default: trainer.max_examples); only the newest archive days "
        "holding them are read",
    )
    p.add_argument("--seed", type=int, default=0, help="the learner's seed (default 0)")
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs")
    json_flag(p, "the run's summary")
    p.set_defaults(func=cmd_fleet_train)

    p = command(
        "demo",
        "start a daemon on a temporary state directory and watch a simulated agent learn",
        "Start a daemon on a temporary state directory, let a simulated agent decide and earn rewards,\n"
        "and watch the daemon train and promote models. Progress goes to stderr; a report is printed and\n"
        "written with the daemon log (and, with matplotlib, a learning-curve plot) under --out.\n"
        "With --agents 2 or 3, agents with other actions and preferences decide in turn beside the\n"
        "first, each learning in its own model line, and a line per agent is added to the report.\n"
        "At the end the daemon extracts what the experience teaches (reflexd insights): the rules it\n"
        "published are printed, each beside the simulated world's true lift on its segment.\n"
        "Exit 1 if the agent never earned clearly more than the default policy (no first adaptation).",
        [
            "reflexd demo",
            "reflexd demo --decisions 20000 --out /tmp/reflexd-demo --seed 3",
            "reflexd demo --agents 3 --decisions 18000",
            "reflexd demo --traces",
        ],
    )
    p.add_argument("--decisions", type=int, default=None, help="interactions to simulate (default 12000)")
    p.add_argument("--rate", type=float, default=300.0, help="agent decisions per second (default 300)")
    p.add_argument("--out", default="demo-out", help="where to write the report and plot (default ./demo-out)")
    p.add_argument("--seed", type=int, default=7, help="random seed of the simulated world (default 7)")
    p.add_argument(
        "--agents", type=int, default=1, choices=(1, 2, 3),
        help="agents deciding in turn, each with its own actions and preferences (default 1)",
    )
    p.add_argument("--no-insights", action="store_true", help="skip the knowledge extraction at the end")
    p.add_argument(
        "--traces", action="store_true",
        help="a tool-using agent that teaches reflexd only through its OpenTelemetry traces "
             "(--decisions then counts its episodes, default 4000)",
    )
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # here, not at the interpreter's exit, so that a reader gone shows below
    except BrokenPipeError:
        if not _reader_gone():  # a pipe of the command's own (a child's, say): a real error
            raise
        # `reflexd status | head`: the rest is not wanted, and the interpreter's last flush at exit
        # must not fail again on the closed pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _reader_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it (poll says POLLERR)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"reflexd: {exc}", file=sys.stderr)
        if exc.source == DEFAULT_PATH and not os.path.exists(DEFAULT_PATH):
            print("reflexd: name your config with --config FILE or $REFLEXD_CONFIG", file=sys.stderr)
        return EX_CONFIG
    except StoreDamaged as exc:  # `run` refusing a damaged store, as check-store would
        print(f"reflexd: {exc}", file=sys.stderr)
        return EX_DATAERR
    except (StateDirError, SocketError) as exc:  # a place the config names that cannot be used: a restart would not help
        print(f"reflexd: {exc}", file=sys.stderr)
        return EX_CONFIG
    except DaemonUnavailable as exc:
        print(f"reflexd: {exc}", file=sys.stderr)
        if exc.timed_out:  # a daemon answered too slowly: where it is was not the problem
            return 1
        print(
            "reflexd: point at your daemon with --socket PATH, $REFLEXD_SOCKET, or its config (--config FILE or "
            "$REFLEXD_CONFIG)",
            file=sys.stderr,
        )
        return 1
    except ReflexdError as exc:
        print(f"reflexd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
