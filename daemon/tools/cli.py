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
from reflexd.errors import ConfigError, ReflexdError

EX_CONFIG = 78  # sysexits.h: configuration error

_DESCRIPTION = """\
reflexd: a local learning sidecar for autonomous agents.

Agents log decisions and rewards over a Unix socket; reflexd stores them, trains small models
when the CPU is idle, gates each candidate by off-policy evaluation, and publishes the winner as
an ONNX file that agents load in-process.
"""

_EPILOG = """\
Client commands find the socket from --socket, else $REFLEXD_SOCKET, else socket.path in the
config file (--config, $REFLEXD_CONFIG or /etc/reflexd/reflexd.yaml), else /run/reflexd/reflexd.sock.

examples:
  reflexd run --config configs/reflexd.yaml
  reflexd check-config /etc/reflexd/reflexd.yaml
  reflexd status
  reflexd decide --agent router --context '{"task": "code"}' --actions small,large
  reflexd train --now
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


# ---- commands ----------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from reflexd.service.daemon import run

    run(args.config)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    path = args.path or args.config or os.environ.get("REFLEXD_CONFIG") or DEFAULT_PATH
    try:
        load_config(path)
    except ConfigError as exc:
        print(f"{exc.source}: invalid configuration", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return EX_CONFIG
    print(f"{path}: ok")
    return 0


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
    keys = ("client_dropped", "unlogged_decisions", "write_errors", "refused", "refused_by_store")
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
        raise _UsageError(f"--context or --actions is not valid JSON: {exc}") from None
    try:
        msg = msgspec.convert({"type": "decide", "agent": args.agent, "context": context, "actions": actions}, Decide)
    except msgspec.ValidationError as exc:
        raise _UsageError(f"not a valid decide request: {exc}") from None
    _print(_request(args, msg))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from reflexd.wire.protocol import Train

    print("training… (the daemon snapshots, trains, exports and gates; this can take a minute)", file=sys.stderr)
    reply = _request(args, Train(), timeout=args.timeout)
    print(reply.message)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from reflexd.wire.protocol import ModelsRequest, Promote, Rollback

    if args.action == "promote":
        if not args.version:
            raise _UsageError("models promote needs a VERSION")
        print(_request(args, Promote(version=args.version)).message)
        return 0
    if args.action == "rollback":
        print(_request(args, Rollback()).message)
        return 0
    reply = _request(args, ModelsRequest())
    if args.action == "show":
        if not args.version:
            raise _UsageError("models show needs a VERSION")
        found = [m for m in reply.models if m.get("version") == args.version]
        if not found:
            raise _UsageError(f"no model version {args.version!r}; see `reflexd models list`")
        _print(found[0])
        return 0
    if not reply.models:
        print("no models yet")
        return 0
    print(f"{'':2}{'version':8} {'created':20} {'rows':>8}  gate")
    import datetime as dt

    from reflexd.registry import fit_rows

    for m in reply.models:
        live = "*" if m.get("version") == reply.current else " "
        created = dt.datetime.fromtimestamp(m.get("created", 0)).strftime("%Y-%m-%d %H:%M:%S")
        gate = (m.get("gate") or {}).get("reason", m.get("error", ""))
        rows = fit_rows(m["training"]) if m.get("training") else ""
        print(f"{live:2}{m.get('version', '?'):8} {created:20} {rows!s:>8}  {gate}")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from reflexd.wire.protocol import Forget

    if not args.yes:
        if not sys.stdin.isatty():
            raise _UsageError("forget deletes data for good; say --yes to confirm when not on a terminal")
        question = (
            f"Delete everything reflexd stores about agent {args.agent!r} (database rows, Parquet archive,"
            " training snapshots)? Models already trained are kept. [y/N] "
        )
        try:
            answer = input(question)
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted", file=sys.stderr)
            return 1
    reply = _request(args, Forget(agent=args.agent), timeout=args.timeout)
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
    print(
        f"sent {summary.decisions} decisions and {summary.outcomes} outcomes from {args.file} ({fmt}):"
        f" imported {max(0, sent - duplicates)}, duplicates (already stored) {duplicates},"
        f" rejected lines {len(summary.rejected)}"
    )
    for rejected in summary.rejected[: args.show_rejected]:
        print(f"  rejected {rejected}")
    if len(summary.rejected) > args.show_rejected:
        print(f"  … and {len(summary.rejected) - args.show_rejected} more")
    return 1 if summary.rejected and not (summary.decisions or summary.outcomes) else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from reflexd.tools.demo import run_demo

    return run_demo(decisions=args.decisions, out_dir=args.out, seed=args.seed, rate=args.rate)


class _UsageError(ReflexdError):
    pass


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

    p = sub.add_parser("run", parents=[common], help="run the daemon in the foreground")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", parents=[common], help="validate a config file (exit 0, or 78 with the errors)")
    p.add_argument("path", nargs="?", help="file to check (default: --config, $REFLEXD_CONFIG or /etc/reflexd/reflexd.yaml)")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("status", parents=[client], help="ingest counts, backlog, live model and its gate, trainer state")
    p.add_argument("--json", action="store_true", help="print the full status as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("decide", parents=[client], help="ask the daemon for one decision (logged like any other)")
    p.add_argument("--agent", required=True, help="agent id")
    p.add_argument("--context", default="{}", help="context as a JSON object")
    p.add_argument("--actions", required=True, help='comma-separated action ids, or a JSON list of ids / {"id", "features"}')
    p.set_defaults(func=cmd_decide)

    p = sub.add_parser("train", parents=[client], help="start a training run now and wait for its result")
    p.add_argument(
        "--now", action="store_true", required=True,
        help="required: train now, ignoring the idle, new-data and retry-backoff conditions",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the run (default 900)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("models", parents=[client], help="list, show, promote or roll back model versions")
    p.add_argument(
        "action", nargs="?", default="list", choices=["list", "show", "promote", "rollback"],
        help="list (the default; * marks the live version), show VERSION, promote VERSION, or rollback",
    )
    p.add_argument("version", nargs="?", help="model version for show and promote (e.g. v0003)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "forget",
        parents=[client],
        help="delete everything stored about an agent (database, archive, snapshots, refused lines, dead letters)",
    )
    p.add_argument("--agent", required=True, help="agent id")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation (needed when not on a terminal)")
    p.add_argument(
        "--timeout", type=float, default=900.0, help="seconds to wait (a training run in progress is waited for)"
    )
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser(
        "import",
        parents=[client],
        help="send decisions logged by another policy (reflexd NDJSON or VW DSJSON) to the daemon",
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
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "demo", help="start a daemon on a temporary state directory and watch a simulated agent learn"
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
    except ReflexdError as exc:
        print(f"reflexd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
