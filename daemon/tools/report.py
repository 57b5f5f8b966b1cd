"""``reflexd report``: the insights as one self-contained HTML page.

The plots are matplotlib SVG written into the page itself, with no script and no link out, so the
file can be mailed, attached to a ticket or opened from disk. Everything shown comes from one
``insights`` reply; text from the store is escaped.
"""

from __future__ import annotations

import html
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from reflexd.errors import UsageError
from reflexd.tools.insights import ci_text, when_text
from reflexd.wire.protocol import Insights

MAX_RULES_PLOTTED = 30


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UsageError("reflexd report draws with matplotlib: pip install 'reflexd[report]'") from None
    matplotlib.use("Agg")  # no display: a file, never a window
    # agent and action names are labels, never TeX: a "$" in a name must not be read as math
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    fig.clf()
    text = buf.getvalue()
    return text[text.index("<svg") :]  # the XML prolog and doctype do not belong inside HTML


def _when(at: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(at)) if isinstance(at, (int, float)) else "-"


def _trends_plot(plt: Any, trends: list[dict[str, Any]]) -> str | None:
    series = [t for t in trends if t.get("points") and t.get("action") is None and t.get("model_version") is None]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for t in series:
        mid = [(p["start"] + p["end"]) / 2 for p in t["points"]]
        ax.plot(mid, [p["value"] for p in t["points"]], marker="o", label=f"{t['agent']} ({t.get('direction')})")
        ax.fill_between(mid, [p["ci"][0] for p in t["points"]], [p["ci"][1] for p in t["points"]], alpha=0.2)
    ax.set_ylabel("mean reward")
    ax.set_title("Reward per agent over time (95% intervals)")
    ticks = ax.get_xticks()
    ax.set_xticks(ticks)
    ax.set_xticklabels([time.strftime("%m-%d %H:%M", time.localtime(x)) for x in ticks], rotation=30, fontsize=7)
    ax.legend(fontsize=7)
    return _svg(fig)


def _rules_plot(plt: Any, rules: list[dict[str, Any]]) -> str | None:
    shown = [r for r in rules if r.get("status") == "published"][:MAX_RULES_PLOTTED]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(shown) + 1.2))
    for i, r in enumerate(shown):
        low, high = r["ci"]
        ax.plot([low, high], [i, i], color="tab:blue")
        ax.plot([r["lift"]], [i], "o", color="tab:blue")
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels([f"{r['agent']}: {r['action']} vs {r['baseline']}" for r in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("lift in reward (95% interval, on decisions the rule was not found on)")
    ax.set_title("Published rules")
    return _svg(fig)


def _anomalies_plot(plt: Any, anomalies: list[dict[str, Any]]) -> str | None:
    if not anomalies:
        return None
    kinds = sorted({a["kind"] for a in anomalies})
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(kinds) + 1.4))
    for a in anomalies:
        ax.plot([a["at"]], [kinds.index(a["kind"])], "D", color="tab:red")
    ax.set_yticks(range(len(kinds)))
    ax.set_yticklabels(kinds, fontsize=8)
    ticks = ax.get_xticks()
    ax.set_xticks(ticks)
    ax.set_xticklabels([time.strftime("%m-%d %H:%M", time.localtime(x)) for x in ticks], rotation=30, fontsize=7)
    ax.set_title("Anomalies on a timeline")
    return _svg(fig)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0 1.5rem}td,th{border:1px solid #ccc;padding:.2rem .4rem;text-align:left}
th{background:#f3f3f3}.note{color:#666;font-size:.85rem}svg{max-width:100%;height:auto}"""


def render_html(reply: Insights) -> str:
    plt = _pyplot()
    run = reply.run or {}
    title = "reflexd insights"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{_STYLE}</style></head><body>"]
    parts.append(f"<h1>{title}</h1>")
    if reply.run is None:
        parts.append("<p>No extraction yet: <code>reflexd report --now</code> runs one first.</p></body></html>")
        return "".join(parts)
    parts.append(
        f"<p class='note'>Extraction {html.escape(str(run.get('id')))} at {_when(run.get('at'))}, on "
        f"{run.get('experiences', 0)} experiences from {_when(run.get('window_start'))} to {_when(run.get('window_end'))}; "
        f"reward model: {html.escape(str(run.get('reward_model', '-')))}. Rules are published only after they held on "
        "decisions they were not found on (docs/insights.md).</p>"
    )
    for heading, svg in (
        ("Trends", _trends_plot(plt, reply.trends)),
        ("Rules", _rules_plot(plt, reply.rules)),
        ("Anomalies", _anomalies_plot(plt, reply.anomalies)),
    ):
        parts.append(f"<h2>{heading}</h2>")
        parts.append(svg or "<p class='note'>none</p>")
    plt.close("all")
    rules = sorted(reply.rules, key=lambda r: (r.get("status") != "published", -abs(r.get("lift") or 0)))
    parts.append("<h2>All rules</h2>")
    parts.append(_table(
        ["status", "agent", "rule", "first found", "last confirmed", "retired why"],
        [[r.get("status"), r.get("agent"), r.get("text", ""), _when(r.get("first_seen")), _when(r.get("last_confirmed")),
          r.get("retired_why") or ""] for r in rules],
    ))
    parts.append("<h2>Patterns</h2>")
    parts.append(_table(
        ["agent", "action", "segment", "value", "interval", "decisions"],
        [[p.get("agent"), p.get("action"), when_text(p.get("when") or []) if p.get("when") else "everywhere",
          f"{p.get('value', 0):.3f}", ci_text(p.get("ci")), p.get("support")] for p in reply.patterns],
    ))
    parts.append("<h2>Anomaly details</h2>")
    parts.append(_table(
        ["at", "kind", "agent", "summary"],
        [[_when(a.get("at")), a.get("kind"), a.get("agent") or "", a.get("summary", "")]
         for a in sorted(reply.anomalies, key=lambda a: a.get("at") or 0, reverse=True)],
    ))
    notes = run.get("notes") or []
    if notes:
        parts.append("<h2>Not examined</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(reply: Insights, out: str | os.PathLike[str]) -> Path:
    """Write ``index.html`` into the folder ``out`` (made if missing); its path."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    if folder.stat().st_uid != os.getuid():  # another user's folder could hold links we would follow
        raise UsageError(f"--out {folder} belongs to another user: name a folder of your own")
    path = folder / "index.html"
    page = render_html(reply).encode("utf-8")
    # a new file of our own (O_EXCL), renamed over index.html: nothing planted there is written through
    fd, tmp = tempfile.mkstemp(prefix=".index-", suffix=".html", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(page)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
