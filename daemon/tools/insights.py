"""``reflexd insights`` as text: the newest extraction's rules, patterns, anomalies and trends.

Each finding is one line a person can read out; ``--json`` prints the reply itself instead.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from reflexd.wire.protocol import Insights

SHOWN = 10  # per kind; --all and --json have them all


def when_text(conditions: Iterable[dict[str, Any]]) -> str:
    """``[{feature: task, op: ==, value: code}, ...]`` → ``task = code and difficulty > 0.6``."""
    parts = []
    for c in conditions:
        op = "=" if c.get("op") in ("==", "=", "eq") else c.get("op", "?")
        value = c.get("value")
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        parts.append(f"{c.get('feature')} {op} {shown}")
    return " and ".join(parts) or "everywhere"


def ci_text(ci: Any) -> str:
    if not ci or len(ci) != 2 or ci[0] is None:
        return "no interval"
    return f"95% CI [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _ago(at: Any) -> str:
    if not isinstance(at, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _line(finding: dict[str, Any], keys: tuple[str, ...]) -> str:
    return "  ".join(f"{k} {_value(finding[k])}" for k in keys if finding.get(k) is not None)


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
        return f"[{v[0]:.3g}, {v[1]:.3g}]"
    if isinstance(v, list) and (not v or isinstance(v[0], dict)):  # conditions; none: everywhere
        return when_text(v)
    return str(v)


def render(reply: Insights, shown: int | None = SHOWN) -> list[str]:
    """The reply as lines of text, each kind under its heading, newest run named first; at most
    ``shown`` findings of each kind (None: every one), with a line saying how many more there are."""
    if reply.run is None:
        return ["no extraction yet: `reflexd insights --now` runs one (it needs matured experience)"]
    run, summary = reply.run, reply.summary or {}
    rows = run.get("experiences", 0)
    lines = [
        f"extraction {run.get('id')} at {_ago(run.get('at'))} on {rows} experiences"
        f" ({_ago(run.get('window_start'))} .. {_ago(run.get('window_end'))})"
    ]
    agent = summary.get("agent")
    if agent is not None and summary.get("agent_has_decisions") is False:
        lines.append(
            f"note: no decision of agent {agent!r} is in the store (is the name right?);"
            " only findings about no one agent follow"
        )
    # runs stored before a run kept its own setting carry none: the daemon's present one stands in
    min_support = run.get("min_support") or summary.get("min_support")
    if isinstance(min_support, int) and rows < min_support:
        lines.append(
            f"note: this run read {rows} experiences; a rule, pattern or check needs at least"
            f" insights.min_support = {min_support} decisions, so there are too few to find any yet"
        )
    published = [r for r in reply.rules if r.get("status") == "published"]
    others = [r for r in reply.rules if r.get("status") != "published"]
    retired = [r for r in others if r.get("status") == "retired"]
    lines.append(f"rules      {len(published)} published, {len(others)} not (candidates waiting for a later window, or retired)")
    for rule in _first(published, shown):
        lines.append(f"  {rule['text']}")
        lines.append(f"      first found {_ago(rule.get('first_seen'))}, last confirmed {_ago(rule.get('last_confirmed'))}")
    lines += _more(published, shown, "published rules")
    for rule in _first(retired, shown):
        why = rule.get("retired_why") or rule.get("why") or "no longer holds"
        lines.append(f"  retired: {rule['text']}: {why}")
    lines += _more(retired, shown, "retired rules")
    lines.append(f"patterns   {len(reply.patterns)}")
    for p in _first(reply.patterns, shown):
        lines.append("  " + _line(p, ("agent", "action", "when", "segment", "value", "ci", "support")))
    lines += _more(reply.patterns, shown, "patterns")
    lines.append(f"anomalies  {len(reply.anomalies)}")
    newest_first = sorted(reply.anomalies, key=lambda a: a.get("at") or 0, reverse=True)
    for a in _first(newest_first, shown):
        lines.append(_anomaly(a))
    lines += _more(newest_first, shown, "anomalies")
    lines.append(f"trends     {len(reply.trends)}")
    for t in _first(reply.trends, shown):
        lines.append(_trend(t))
    lines += _more(reply.trends, shown, "trends")
    notes = run.get("notes") or []
    # a run's notes are about the whole run, whichever agent the findings were narrowed to
    lines.append(f"notes      {len(notes)}" + (" (the run's, about every agent)" if agent is not None and notes else ""))
    lines += [f"  {n}" for n in _first(notes, shown)]
    lines += _more(notes, shown, "notes")
    return lines


def _trend(t: dict[str, Any]) -> str:
    """``router  action large  declining since 2026-12-06 08:00:00 by -0.21: newest window 0.43 [0.39,
    0.47] on 812 decisions``: ``value``, ``ci`` and ``count`` are the newest window's."""
    what = _line(t, ("agent", "action", "model_version"))
    moved = t.get("direction")
    if t.get("since") is not None:
        moved = f"{moved} since {_ago(t['since'])}"
    if isinstance(t.get("change"), (int, float)) and t.get("direction") != "flat":
        moved += f" by {t['change']:+.3g}"
    newest = f"newest window {_value(t.get('value'))} {_value(t.get('ci'))}" if t.get("ci") else f"newest window {_value(t.get('value'))}"
    if t.get("count") is not None:
        newest += f" on {t['count']} decisions"
    return f"  {what}  {moved}: {newest}"


def _anomaly(a: dict[str, Any]) -> str:
    """``2026-12-06 08:00:00  reward_change  router: router's reward fell by 0.17 from 0.539 to 0.369``."""
    head = f"  {_ago(a.get('at'))}  {a.get('kind')}" + (f"  {a['agent']}" if a.get("agent") else "")
    if a.get("summary"):
        return f"{head}: {a['summary']}"
    return f"{head}  " + _line(a, ("action", "feature", "size"))  # the evidence dict is for --json


def _first(items: list[Any], shown: int | None) -> list[Any]:
    return list(items) if shown is None else list(items)[:shown]


def _more(items: list[Any], shown: int | None, what: str) -> list[str]:
    if shown is None or len(items) <= shown:
        return []
    return [f"  ... {len(items) - shown} more {what}: `reflexd insights --all` (or --json) shows them all"]
