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
from reflexd.errors import ConfigError, ReflexdError, StoreDamaged, UsageError

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

Commands that print data (check-config, check-store, status, decide, train, models, forget, import) take
--json: the same data as one JSON document on stdout and nothing else there; exit codes do not change.
`reflexd COMMAND --help` describes each command, with examples.

examples:
  reflexd run --config configs/reflexd.yaml
  reflexd check-config /etc/reflexd/reflexd.yaml
  reflexd check-store
  reflexd status
  reflexd status --json
  reflexd decide --agent router --context '{"task": "code"}' --actions small,large
  reflexd train
  reflexd models list
  reflexd forget --agent router
  reflexd import logged.dsjson --agent router
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
        msg = msgspec.convert({"type": "decide", "agent": args.agent, "context": context, "actions": actions}, Decide)
    except msgspec.ValidationError as exc:
        raise UsageError(f"not a valid decide request: {exc}") from None
    _print(_request(args, msg))  # JSON with or without --json
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
        "action, prob, model_version, strategy (--json prints the same). Exit 1 on a bad --context or\n"
        "--actions, or if the daemon cannot be reached.",
        [
            """reflexd decide --agent router --context '{"task": "code"}' --actions small,large""",
            """reflexd decide --agent router --actions '[{"id": "small", "features": {"cost": 1}}, "large"]'""",
        ],
        parents=[client],
    )
    p.add_argument("--agent", required=True, help="agent id")
    p.add_argument("--context", default="{}", help="context as a JSON object")
    p.add_argument("--actions", required=True, help='comma-separated action ids, or a JSON list of ids / {"id", "features"}')
    json_flag(p, "", "accepted for uniformity: the decision is printed as JSON either way")
    p.set_defaults(func=cmd_decide)

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
        "send decisions logged by another policy (reflexd NDJSON or VW DSJSON) to the daemon",
        "Send decisions and outcomes logged by another policy to the daemon: reflexd NDJSON (decision and\n"
        "outcome lines) or Vowpal Wabbit DSJSON (cb_explore_adf). Events already stored count as\n"
        "duplicates, so an import can be repeated. Progress goes to stderr, a summary to stdout (--json:\n"
        "file, format, decisions, outcomes, imported, duplicates, rejected_lines and the first rejected\n"
        "lines). Exit 1 if no line could be sent.",
        ["reflexd import logged.dsjson --agent router", "reflexd import decisions.ndjson --format ndjson --json"],
        parents=[client],
    )
    p.add_argument("file", help="the log: one JSON object per line")
    p.add_argument(
        "--format", choices=["auto", "ndjson", "dsjson"], default="auto",
        help="ndjson (reflexd decision/outcome lines) or dsjson (Vowpal Wabbit cb_explore_adf); default: by the file",
    )
    p.add_argument("--agent", help="agent id for the imported decisions (dsjson default: imported; ndjson: replaces the logged one)")
    p.add_argument("--batch", type=int, default=1000, help="messages per acknowledged batch (default 1000)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each acknowledgement")
    p.add_argument("--show-rejected", type=int, default=20, help="rejected lines to list (default 20)")
    json_flag(p, "the summary")
    p.set_defaults(func=cmd_import)

    p = command(
        "demo",
        "start a daemon on a temporary state directory and watch a simulated agent learn",
        "Start a daemon on a temporary state directory, let a simulated agent decide and earn rewards,\n"
        "and watch the daemon train and promote models. Progress goes to stderr; a report is printed and\n"
        "written with the daemon log (and, with matplotlib, a learning-curve plot) under --out.\n"
        "Exit 1 if no model was promoted.",
        ["reflexd demo", "reflexd demo --decisions 3000 --rate 1000 --out /tmp/reflexd-demo"],
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
        return EX_CONFIG
    except StoreDamaged as exc:  # `run` refusing a damaged store, as check-store would
        print(f"reflexd: {exc}", file=sys.stderr)
        return EX_DATAERR
    except ReflexdError as exc:
        print(f"reflexd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
