"""The ``reflexd`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import msgspec

from reflexd import __version__
from reflexd.config import DEFAULT_PATH, load_config
from reflexd.errors import ConfigError, DaemonUnavailable, ReflexdError, StoreDamaged, UsageError

EX_CONFIG = 78  # sysexits.h: configuration error
EX_DATAERR = 65  # sysexits.h: input data incorrect (a damaged store)
EX_TEMPFAIL = 75  # sysexits.h: temporary failure (the store is in use)

_DESCRIPTION = """\
reflexd: a local learning sidecar for autonomous agents.

Agents log decisions and rewards over a Unix socket; reflexd stores them, trains small models
when the CPU is idle, gates each candidate by off-policy evaluation, and publishes the winner as
an ONNX file that agents load in-process.
"""

_EPILOG = """\
Client commands find the socket from --socket, else $REFLEXD_SOCKET, else socket.path in the
config file (--config, $REFLEXD_CONFIG or /etc/reflexd/reflexd.yaml), else /run/reflexd/reflexd.sock.

Commands that print data (check-config, check-store, status, decide, explain, train, models, forget, import,
evaluate) take
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
  reflexd demo
"""


def _socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return args.socket
    if os.environ.get("REFLEXD_SOCKET"):
        return os.environ["REFLEXD_SOCKET"]
    explicit = args.config or os.environ.get("REFLEXD_CONFIG")
    if explicit:
        return load_config(explicit).socket.path  # a config named but missing is an error, not a default
    if os.path.exists(DEFAULT_PATH):
        return load_config(DEFAULT_PATH).socket.path
    from reflexd.wire.connection import DEFAULT_SOCKET

    return DEFAULT_SOCKET


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


def cmd_check_config(args: argparse.Namespace) -> int:
    path = args.path or args.config or os.environ.get("REFLEXD_CONFIG") or DEFAULT_PATH
    from reflexd.service.server import fd_budget_problems

    try:
        config = load_config(path)
    except ConfigError as exc:
        if args.json:
            _print({"ok": False, "path": exc.source, "problems": exc.problems, "warnings": []})
            return EX_CONFIG
        print(f"{exc.source}: invalid configuration", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return EX_CONFIG
    # valid, but this process's limits would not let it work as configured
    warnings = fd_budget_problems(config)
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


def cmd_status(args: argparse.Namespace) -> int:
    from reflexd.wire.protocol import StatusRequest

    reply = _request(args, StatusRequest())
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
    print(
        f"experience decisions {exp.get('decisions', 0)}  outcomes {exp.get('outcomes', 0)}"
        f"  steps {exp.get('steps', 0)}  events {exp.get('events', 0)}  new since training {exp['new_since_training']}"
    )
    if reply.model:
        gate = (reply.model.get("gate") or {}).get("reason", "no gate record")
        print(f"model      {reply.model.get('version', '-')}  ({reply.model.get('train_rows')} rows)  gate: {gate}")
        if reply.model.get("load_error"):
            print(f"           load error: {reply.model['load_error']}")
    else:
        print("model      none yet (agents use the default action with exploration)")
    t = reply.trainer
    print(
        f"trainer    {t['state']}  runs {t['runs']}  promoted {t['promoted']}  rejected {t['rejected']}"
        f"  failures {t['failures']}" + (f"  last error: {t['last_error']}" if t.get("last_error") else "")
    )
    if t.get("waiting") and t["state"] == "idle":
        print(f"           no run yet: {t['waiting']}")
    if t.get("consecutive_failures"):
        import time

        print(f"           retrying in {max(0.0, t['next_attempt'] - time.time()):.0f} s (backoff)")
    mon = reply.monitor
    if mon:
        last = (mon.get("last") or {}).get("reason", "not checked yet")
        print(f"rollback   {'auto' if mon.get('auto_rollback') else 'off'}  rollbacks {mon.get('rollbacks', 0)}  last check: {last}")
    if reply.storage.get("error"):
        print(f"storage    NOT ACKNOWLEDGING: {reply.storage['error']}")
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    from reflexd.wire.protocol import Decide

    try:
        context = json.loads(args.context)
        actions: Any = (
            json.loads(args.actions)
            if args.actions.lstrip().startswith("[")
            else [a.strip() for a in args.actions.split(",") if a.strip()]
        )
    except json.JSONDecodeError as exc:
        raise UsageError(f"--context or --actions is not valid JSON: {exc}") from None
    try:
        fields = {"type": "decide", "agent": args.agent, "context": context, "actions": actions, "log": not args.no_log}
        if args.slots is not None:
            fields["slots"] = args.slots
        msg = msgspec.convert(fields, Decide)
    except msgspec.ValidationError as exc:
        raise UsageError(f"not a valid decide request: {exc}") from None
    _print(_request(args, msg))  # JSON with or without --json
    return 0


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
            {"type": "explain", "agent": args.agent, "context": context, "actions": actions, "top": args.top}, Explain
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
        return _request(args, StatusRequest()).trainer.get("last_run")
    except ReflexdError:
        return None


def cmd_train(args: argparse.Namespace) -> int:
    from reflexd.errors import RequestFailed
    from reflexd.wire.protocol import Train

    # --now is the default and accepted for compatibility: a request always trains now
    print("training… (the daemon snapshots, trains, exports and gates; this can take a minute)", file=sys.stderr)
    try:
        reply = _request(args, Train(), timeout=args.timeout)
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
    run = _parse_done(reply.message, r"(?P<outcome>\S+) (?P<version>\S+): (?P<gate>.*)") or {}
    last = _last_run(args)
    if last and run and last.get("version") == run.get("version"):
        run = last  # the scheduler's summary of this very run: adds train_rows, at, seconds
    _print({**run, "message": reply.message})
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from reflexd.wire.protocol import ModelsRequest, Promote, Rollback

    if args.action in ("promote", "rollback"):
        if args.action == "promote" and not args.version:
            raise UsageError("models promote needs a VERSION")
        done = _request(args, Promote(version=args.version) if args.action == "promote" else Rollback())
        if args.json:
            _print({"message": done.message, "current": _request(args, ModelsRequest()).current})
        else:
            print(done.message)
        return 0
    reply = _request(args, ModelsRequest())
    if args.action == "show":
        if not args.version:
            raise UsageError("models show needs a VERSION")
        found = [m for m in reply.models if m.get("version") == args.version]
        if not found:
            raise UsageError(f"no model version {args.version!r}; see `reflexd models list`")
        _print(found[0])  # the manifest, JSON with or without --json
        return 0
    if args.json:
        _print({"current": reply.current, "serving": reply.serving, "models": reply.models})
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
        print(f"{live:2}{m.get('version', '?'):8} {created:20} {rows!s:>8}  {gate}")
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
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from reflexd.tools import importer
    from reflexd.wire.connection import Connection, request
    from reflexd.wire.protocol import StatusRequest

    fmt = args.format if args.format != "auto" else importer.detect_format(args.file)
    items = importer.parse(args.file, fmt, args.agent)  # a generator: the file is read as it is sent
    total = importer.count_lines(args.file)
    socket = _socket_path(args)
    # status on connections of its own: the daemon numbers the import connection's frames in errors
    before = request(StatusRequest(), socket).ingest.get("duplicates", 0)
    with Connection(socket, timeout=args.timeout) as conn:
        with tqdm(total=total, unit="line", desc=f"importing {fmt}", file=sys.stderr, mininterval=0.5) as bar:

            def progress(line: int) -> None:
                if line > bar.n:
                    bar.update(line - bar.n)

            summary = importer.send(items, conn, args.file, batch_size=args.batch, on_line=progress)
            bar.update(total - bar.n)
    # the daemon counts duplicates for everyone: another agent's resends in this window count too
    duplicates = request(StatusRequest(), socket).ingest.get("duplicates", 0) - before
    sent = summary.decisions + summary.outcomes
    status = 1 if summary.rejected and not (summary.decisions or summary.outcomes) else 0
    if args.json:
        _print(
            {
                "file": args.file,
                "format": fmt,
                "decisions": summary.decisions,
                "outcomes": summary.outcomes,
                "imported": max(0, sent - duplicates),
                "duplicates": duplicates,
                "rejected_lines": len(summary.rejected),
                # the first --show-rejected of them, as {"path", "line", "reason"}
                "rejected": summary.rejected[: args.show_rejected],
            }
        )
        return status
    print(
        f"sent {summary.decisions} decisions and {summary.outcomes} outcomes from {args.file} ({fmt}):"
        f" imported {max(0, sent - duplicates)}, duplicates (already stored) {duplicates},"
        f" rejected lines {len(summary.rejected)}"
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
    lines = [
        f"{reply.decisions} matured decisions ({', '.join(window)}; {reply.dropped} left out), rewards observed in "
        f"[{_num(reply.reward_min)}, {_num(reply.reward_max)}], {reply.confidence * 100:g}% intervals, {scoring}",
    ]
    header = ["policy", "IPS", "SNIPS", "DR", f"vs logging ({reply.estimator})", "ESS", "agrees"]
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
            lines.append(f"    {row.policy}: {_interval(row.value)}  ESS {row.ess:.1f}")
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


def cmd_demo(args: argparse.Namespace) -> int:
    from reflexd.tools.demo import run_demo

    return run_demo(decisions=args.decisions, out_dir=args.out, seed=args.seed, rate=args.rate)


def _examples(*lines: str) -> str:
    return "examples:\n" + "".join(f"  {line}\n" for line in lines)


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
        "78 if the config is invalid, 65 if the store is damaged (see check-store).",
        ["reflexd run --config configs/reflexd.yaml", "REFLEXD_CONFIG=/etc/reflexd/reflexd.yaml reflexd run"],
        parents=[common],
    )
    p.set_defaults(func=cmd_run)

    p = command(
        "check-config",
        "validate a config file (exit 0, or 78 with the errors)",
        "Validate a config file without starting anything. Prints 'PATH: ok' and exits 0, or lists every\n"
        "problem with its key path on stderr and exits 78 (EX_CONFIG, which the systemd unit's\n"
        'ExecStartPre= relies on). --json prints {"ok": true|false, "path": ..., "problems": [...]}\n'
        "instead, with the same exit codes.",
        ["reflexd check-config /etc/reflexd/reflexd.yaml", "reflexd check-config --json configs/reflexd.yaml"],
        parents=[common],
    )
    p.add_argument("path", nargs="?", help="file to check (default: --config, $REFLEXD_CONFIG or /etc/reflexd/reflexd.yaml)")
    json_flag(p, '{"ok", "path", "problems"}')
    p.set_defaults(func=cmd_check_config)

    p = command(
        "check-store",
        "check the database file for damage (exit 0, or 65 if damaged)",
        "Read every column of every table of the store (<state_dir>/reflexd.duckdb) read-only, so that\n"
        "DuckDB checks each data block against its checksum, and report. The daemon runs the same check\n"
        "at start and refuses a damaged store. Run it with the daemon stopped: DuckDB lets one process\n"
        "open the file, so a running daemon's lock is reported (exit 75). Exit 0 if the store is sound or\n"
        "does not exist yet, 65 (EX_DATAERR) if it is damaged (docs/operations.md says how to recover),\n"
        '1 if it could not be checked. --json prints {"ok", "path", "state": sound|missing|damaged|\n'
        'in_use|unchecked, "rows", "seconds", "code", "error"}.',
        ["reflexd check-store --config /etc/reflexd/reflexd.yaml", "reflexd check-store --json"],
        parents=[common],
    )
    json_flag(p, '{"ok", "path", "state", "rows", "error"}')
    p.set_defaults(func=cmd_check_store)

    p = command(
        "status",
        "ingest counts, backlog, live model and its gate, trainer state",
        "Ask the running daemon how it is doing: ingest counters and backlog, stored experience, the live\n"
        "model and its gate verdict, the trainer and the automatic-rollback monitor. --json prints the\n"
        "whole status reply (its fields are described in docs/operations.md). Exit 1 if the daemon cannot be reached.",
        ["reflexd status", "reflexd status --json", "reflexd status --socket /run/reflexd/reflexd.sock"],
        parents=[client],
    )
    json_flag(p, "the full status reply")
    p.set_defaults(func=cmd_status)

    p = command(
        "decide",
        "ask the daemon for one decision (logged like any other)",
        "Ask the daemon to choose one of --actions for --context, as an agent would; the decision is\n"
        "logged like any other, so an outcome can be sent for its id. Prints the reply as JSON: id,\n"
        "action, prob, model_version, strategy (--json prints the same). With --no-log nothing is chosen or\n"
        "logged, and exploration's clock does not move: it prints every action's score, spread and\n"
        "probability (id, actions, scores, spread, probs, model_version, strategy; scores and spread are\n"
        "null without a model). With --slots K it ranks K of the actions (a slate): one decision is logged\n"
        "per slot, and it prints the slate id and each slot's id, action and probability given the slots\n"
        "before it. Exit 1 on a bad --context or --actions, or if the daemon cannot be reached.",
        [
            """reflexd decide --agent router --context '{"task": "code"}' --actions small,large""",
            """reflexd decide --agent feed --context '{"user": "u1"}' --actions a,b,c,d --slots 3""",
            """reflexd decide --agent router --actions '[{"id": "small", "features": {"cost": 1}}, "large"]'""",
            """reflexd decide --agent router --context '{"task": "code"}' --actions small,large --no-log""",
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
    json_flag(p, "", "accepted for uniformity: the decision is printed as JSON either way")
    p.set_defaults(func=cmd_decide)

    p = command(
        "explain",
        "why the live model ranks the actions as it does: scores, probabilities, the keys that moved it",
        "Ask the daemon why its live model ranks --actions as it does for --context: each action's score,\n"
        "spread and probability, and the context keys that moved the choice most. Each key (a dotted path\n"
        "such as user.tier; a list counts as one key) is removed in turn and the actions scored again: its\n"
        "'margin' is how much it widens the chosen action's lead over the runner-up, its 'score' how much it\n"
        "adds to the chosen action's score (docs/learning.md, Explaining). Largest |margin| first. Nothing\n"
        "is logged. With no model live, the default policy's probabilities and no keys. --json prints the\n"
        "explanation: agent, actions [{id, score, spread, prob}], chosen, runner_up, keys [{key, score,\n"
        "margin, best_without}], model_version, strategy. Exit 1 on a bad --context or --actions, or if the\n"
        "daemon cannot be reached.",
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
    json_flag(p, "the explanation")
    p.set_defaults(func=cmd_explain)

    p = command(
        "train",
        "start a training run now and wait for its result",
        "Start a training run now and wait for its result, ignoring the idle, new-data and retry-backoff\n"
        "conditions the scheduler waits for: the daemon snapshots its experience, trains a candidate in a\n"
        "subprocess, exports it and gates it by off-policy evaluation; a candidate that passes goes live.\n"
        "Prints 'promoted VERSION: REASON' or 'rejected VERSION: REASON' and exits 0 (a rejected candidate\n"
        "is not an error); a failed run exits 1. --json prints the run's summary (outcome, version, gate,\n"
        'train_rows, at, seconds, message), or {"outcome": "failed", "error": ...} with exit 1.',
        ["reflexd train", "reflexd train --json --timeout 300"],
        parents=[client],
    )
    p.add_argument("--now", action="store_true", help="train now (default; kept for compatibility)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the run (default 900)")
    json_flag(p, "the run's summary")
    p.set_defaults(func=cmd_train)

    p = command(
        "models",
        "list, show, promote or roll back model versions",
        "List the model versions in the registry with their creation time, rows and gate verdict (* marks\n"
        "the version the daemon serves, ! a CURRENT it could not load); show one version's manifest (JSON); make a version live (promote); or go back to\n"
        "the version live before the current one (rollback). Exit 1 for an unknown version. --json: list\n"
        'prints {"current", "serving", "models"} with every manifest, show the manifest, promote and rollback\n'
        '{"message", "current"}.',
        ["reflexd models list", "reflexd models show v0003", "reflexd models promote v0002", "reflexd models --json"],
        parents=[client],
    )
    p.add_argument(
        "action", nargs="?", default="list", choices=["list", "show", "promote", "rollback"],
        help="list (the default; * marks the served version), show VERSION, promote VERSION, or rollback",
    )
    p.add_argument("version", nargs="?", help="model version for show and promote (e.g. v0003)")
    json_flag(p, "the result")
    p.set_defaults(func=cmd_models)

    p = command(
        "forget",
        "delete everything stored about an agent (database, archive, snapshots, refused lines, dead letters)",
        "Delete everything the daemon stores about one agent: database rows, dead letters, Parquet archive\n"
        "partitions, training snapshots and refused spool lines; models already trained are kept. Asks\n"
        "first on a terminal (--yes otherwise). Prints what was removed and exits 0; exits 1 if the answer\n"
        'is not yes. --json prints {"agent", "message", "removed": {what: count}}.',
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
        "lines). Exit 1 if no line could be sent.",
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
        "(v0003@strategy=softmax,temperature=0.5; any key of the exploration config section). Prints one\n"
        "table: IPS, SNIPS and DR with intervals at gate.confidence, the difference from the logging policy,\n"
        "the effective sample size (Σw)²/Σw² and the share of decisions where the policy's likeliest action\n"
        "is the logged one. An interval reaching beyond the rewards observed is marked * and given bounded\n"
        "to them. DR and DM score with the live model (--reward-model to choose; without any model they are\n"
        "left out). --discover also tries a grid of exploration settings on the first model named (else\n"
        "the live one) and recommends the one with the best lower bound, if that is above the logging\n"
        "policy's lower bound (docs/learning.md). --since/--until select decisions by their own time (ts;\n"
        "an imported decision keeps its logged time): epoch seconds or ISO-8601 (local time without a zone).\n"
        "--json prints the evaluation (decisions, rows [{policy, kind, value, ips, snips, dm, dr,\n"
        "versus_logging, ess, agreement}], discovery, ...). Exit 1 on a policy that cannot be read or\n"
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
        "demo",
        "start a daemon on a temporary state directory and watch a simulated agent learn",
        "Start a daemon on a temporary state directory, let a simulated agent decide and earn rewards,\n"
        "and watch the daemon train and promote models. Progress goes to stderr; a report is printed and\n"
        "written with the daemon log (and, with matplotlib, a learning-curve plot) under --out.\n"
        "Exit 1 if no model was promoted.",
        ["reflexd demo", "reflexd demo --decisions 20000 --out /tmp/reflexd-demo --seed 3"],
    )
    p.add_argument("--decisions", type=int, default=12_000, help="interactions to simulate (default 12000)")
    p.add_argument("--rate", type=float, default=300.0, help="agent decisions per second (default 300)")
    p.add_argument("--out", default="demo-out", help="where to write the report and plot (default ./demo-out)")
    p.add_argument("--seed", type=int, default=7, help="random seed of the simulated world (default 7)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
    except DaemonUnavailable as exc:
        print(f"reflexd: {exc}", file=sys.stderr)
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
