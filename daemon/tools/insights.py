"""``reflexd insights`` as text: the newest extraction's rules, patterns, anomalies and trends.

Each finding is one line a person can read out; ``--json`` prints the reply itself instead.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from reflexd.wire.protocol import Insights

SHOWN = 10  # per kind; --json has them all


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


def render(reply: Insights) -> list[str]:
    """The reply as lines of text, each kind under its heading, newest run named first."""
    if reply.run is None:
        return ["no extraction yet: `reflexd insights --now` runs one (it needs matured experience)"]
    run = reply.run
    lines = [
        f"extraction {run.get('id')} at {_ago(run.get('at'))} on {run.get('experiences', 0)} experiences"
        f" ({_ago(run.get('window_start'))} .. {_ago(run.get('window_end'))})"
    ]
    published = [r for r in reply.rules if r.get("status") == "published"]
    others = [r for r in reply.rules if r.get("status") != "published"]
    lines.append(f"rules      {len(published)} published, {len(others)} not (candidates waiting for a later window, or retired)")
    for rule in published[:SHOWN]:
        lines.append(f"  {rule['text']}")
        lines.append(f"      first found {_ago(rule.get('first_seen'))}, last confirmed {_ago(rule.get('last_confirmed'))}")
    for rule in [r for r in others if r.get("status") == "retired"][:SHOWN]:
        why = rule.get("retired_why") or rule.get("why") or "no longer holds"
        lines.append(f"  retired: {rule['text']}: {why}")
    lines.append(f"patterns   {len(reply.patterns)}")
    for p in reply.patterns[:SHOWN]:
        lines.append("  " + _line(p, ("agent", "action", "when", "segment", "value", "ci", "support")))
    lines.append(f"anomalies  {len(reply.anomalies)}")
    for a in sorted(reply.anomalies, key=lambda a: a.get("at") or 0, reverse=True)[:SHOWN]:
        lines.append(f"  {_ago(a.get('at'))}  {a.get('kind')}  " + _line(a, ("agent", "action", "feature", "size", "evidence")))
    lines.append(f"trends     {len(reply.trends)}")
    for t in reply.trends[:SHOWN]:
        lines.append("  " + _line(t, ("agent", "action", "model_version", "direction", "since", "value", "ci", "count")))
    return lines
