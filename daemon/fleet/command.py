"""``reflexd fleet train``'s handler: progress bars on stderr, the summary on stdout.

``reflexd.tools.cli`` defines the command line and calls ``train`` here when the command runs, so
neither Ray nor this module is imported by any other command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from typing import Any

from reflexd.config import DEFAULT_PATH, Config, load_config
from reflexd.fleet.archive import HostRows


def _config(args: argparse.Namespace) -> tuple[Config, str]:
    path = args.config or os.environ.get("REFLEXD_CONFIG") or (DEFAULT_PATH if os.path.exists(DEFAULT_PATH) else None)
    if path:
        return load_config(path), path
    return Config(), "the defaults"


def train(args: argparse.Namespace, since: float | None) -> int:
    from tqdm import tqdm

    from reflexd.fleet.train import Progress, require_ray, train_fleet

    require_ray()  # before anything is read: FleetError with the install line
    config, source = _config(args)
    bars: dict[str, Any] = {}
    quiet = args.json and not sys.stderr.isatty()

    def close(name: str) -> None:
        bar = bars.pop(name, None)
        if bar is not None:
            bar.close()

    def hosts(n: int) -> None:
        bars["read"] = tqdm(total=n, unit="host", desc="reading archives", file=sys.stderr, disable=quiet)

    def host_read(host: HostRows) -> None:
        bar = bars.get("read")
        if bar is not None:
            bar.update(1)
            parts = [part for part in host.path.rstrip("/").split("/") if part and part != "archive"]
            bar.set_postfix_str(f"{parts[-1] if parts else host.path}: {host.table.num_rows} rows")

    def epochs(epoch: int, total: int, loss: float) -> None:
        bar = bars.get("train")
        if bar is None:
            bar = bars["train"] = tqdm(
                total=total, unit="epoch", desc=f"training on {args.workers} workers", file=sys.stderr, disable=quiet
            )
        bar.update(epoch - bar.n)
        bar.set_postfix(loss=f"{loss:.4g}")

    def stage(name: str) -> None:
        if name != "reading":
            close("read")
        if name in ("gating", "writing"):
            close("train")
        if name == "training" and not quiet:
            print("starting Ray Train workers…", file=sys.stderr, flush=True)

    try:
        run = train_fleet(
            args.archives,
            args.out,
            config,
            workers=args.workers,
            address=args.address,
            seed=args.seed,
            max_rows=args.max_rows_per_host,
            agent=args.agent,
            since=since,
            storage=args.storage,
            progress=Progress(hosts=hosts, host_read=host_read, epochs=epochs, stage=stage),
            verbose=args.verbose,
        )
    finally:
        for name in list(bars):
            close(name)
    summary = run.as_dict()
    summary["config"] = source
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(render(summary))
    return 0


def render(summary: dict[str, Any]) -> str:
    """The run as a person reads it: one line per host, the totals, the costs and the verdict."""

    def when(t: float | None) -> str:
        return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M") if t is not None else "-"

    hosts = summary["hosts"]
    width = min(max((len(h["path"]) for h in hosts), default=4), 60)
    lines = [f"{'host archive':{width}}  {'rows':>9} {'train':>9} {'holdout':>8}  window (UTC)"]
    for h in hosts:
        path = h["path"] if len(h["path"]) <= width else "…" + h["path"][-(width - 1) :]
        lines.append(
            f"{path:{width}}  {h['rows']:>9} {h['train_rows']:>9} {h['holdout_rows']:>8}  "
            f"{when(h['window_start'])} – {when(h['window_end'])}"
        )
    lines.append(
        f"{'all ' + str(len(hosts)) + ' hosts':{width}}  {summary['rows']:>9} {summary['train_rows']:>9} "
        f"{summary['holdout_rows']:>8}  ({summary['dropped_rows']} unusable rows left out)"
    )
    lines.append("")
    lines.append(
        f"read {summary['read_seconds']:.1f} s, trained {summary['train_seconds']:.1f} s on {summary['workers']} Ray "
        f"workers (fit {summary.get('fit_seconds', 0):.1f} s, export {summary.get('export_seconds', 0):.1f} s), "
        f"gated {summary['gate_seconds']:.1f} s; {summary['seconds']:.1f} s in all (config: {summary['config']})"
    )
    verdict = "PASSED" if summary["passed"] else "REJECTED"
    lines.append(f"pooled gate {verdict}: {summary['gate']}")
    lines.append(f"wrote {summary['model']} and {summary['manifest']} (sha256 {summary['sha256'][:16]}…)")
    lines.append(f"bring it to a host, whose own gate decides: reflexd models pull {summary['out']}")
    return "\n".join(lines)
