"""``reflexd demo``: a real daemon, a simulated LLM agent, and proof that it adapts.

The agent routes tasks to one of five strategies (model size, tools, retries). Whether a
strategy succeeds depends on the task's kind and difficulty; what it costs depends on the
user's tier. Reward = success − cost − latency penalties, so the best strategy changes with the
context and no single action is best. The demo starts ``reflexd run`` on a temporary state
directory, lets the agent decide through ``reflexd.Policy`` at a steady rate while the daemon
trains and promotes models on its own, and reports reward and regret per window.
"""

from __future__ import annotations

import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reflexd.errors import ReflexdError
from reflexd.testing import LocalDaemon
from reflexd.wire.protocol import Flush, InsightsRequest

TASKS = ("chat", "code", "math", "search")

# Strategy → (cost, latency s, success at difficulty 0 per task, drop in success per unit difficulty)
STRATEGIES: dict[str, tuple[float, float, dict[str, float], float]] = {
    "small-model": (1.0, 0.4, {"chat": 0.92, "code": 0.55, "math": 0.40, "search": 0.50}, 0.50),
    "large-model": (8.0, 2.0, {"chat": 0.95, "code": 0.85, "math": 0.75, "search": 0.60}, 0.25),
    "small+tools": (2.0, 1.0, {"chat": 0.85, "code": 0.70, "math": 0.85, "search": 0.90}, 0.40),
    "large+tools": (10.0, 3.0, {"chat": 0.93, "code": 0.93, "math": 0.92, "search": 0.95}, 0.15),
    "small+retry": (2.5, 1.1, {"chat": 0.94, "code": 0.66, "math": 0.52, "search": 0.62}, 0.45),
}
# Free users care about cost, pro users about latency.
WEIGHTS = {"free": (0.035, 0.02), "pro": (0.01, 0.08)}


class World:
    """The simulated environment; ``expected`` is exact, so regret is exact too.

    ``strategies`` (a subset of STRATEGIES) and ``weights`` (a tier's cost and latency weights)
    make the world of another agent: other actions, other preferences.
    """

    def __init__(
        self,
        seed: int,
        strategies: tuple[str, ...] = tuple(STRATEGIES),
        weights: dict[str, tuple[float, float]] = WEIGHTS,
    ) -> None:
        self.rng = random.Random(seed)
        self.strategies = strategies
        self.weights = weights
        self.actions = [
            {"id": name, "features": {"cost": cost, "latency": lat, "tools": "tools" in name, "retry": "retry" in name}}
            for name, (cost, lat, _, _) in STRATEGIES.items()
            if name in strategies
        ]

    def context(self) -> dict[str, Any]:
        r = self.rng
        return {
            "task": r.choice(TASKS),
            "difficulty": round(r.random(), 3),
            "tier": "pro" if r.random() < 0.3 else "free",
            "prompt_tokens": int(r.lognormvariate(6, 0.8)),
        }

    def expected(self, context: dict[str, Any], action: str) -> float:
        cost, latency, skill, slope = STRATEGIES[action]
        p = min(0.99, max(0.02, skill[context["task"]] - slope * context["difficulty"]))
        wc, wl = self.weights[context["tier"]]
        return p - wc * cost - wl * latency

    def reward(self, context: dict[str, Any], action: str) -> float:
        cost, latency, skill, slope = STRATEGIES[action]
        p = min(0.99, max(0.02, skill[context["task"]] - slope * context["difficulty"]))
        wc, wl = self.weights[context["tier"]]
        success = 1.0 if self.rng.random() < p else 0.0
        return success - wc * cost - wl * latency * self.rng.uniform(0.7, 1.3)

    def best(self, context: dict[str, Any]) -> float:
        return max(self.expected(context, a) for a in self.strategies)

    def uniform(self, context: dict[str, Any]) -> float:
        """What the default policy (uniform, with no model and nothing learned) expects to earn."""
        return sum(self.expected(context, a) for a in self.strategies) / len(self.strategies)


# ``reflexd demo --agents 3``: agents with their own actions and preferences, one daemon
AGENTS: tuple[tuple[str, tuple[str, ...], dict[str, tuple[float, float]]], ...] = (
    ("llm-router", tuple(STRATEGIES), WEIGHTS),
    # a coding assistant: no retries, and cost weighs on every tier
    ("code-assistant", ("small-model", "large-model", "large+tools"), {"free": (0.05, 0.01), "pro": (0.03, 0.02)}),
    # a search agent: small models only, latency weighs on every tier
    ("search-agent", ("small-model", "small+tools", "small+retry"), {"free": (0.01, 0.10), "pro": (0.01, 0.15)}),
)


# the agent's Policy explores so before any model, as the daemon's models do after
DEMO_EXPLORATION = {"strategy": "epsilon_greedy", "epsilon": 0.1}


def demo_config(root: Path) -> dict[str, Any]:
    return {
        "state_dir": str(root / "state"),
        "socket": {"path": str(root / "run" / "reflexd.sock")},
        "rewards": {"wait_window": 1.0, "default": 0.0},
        # the demo's own agent keeps the CPU busy, so it does not wait for an idle machine
        "trainer": {"min_new_examples": 1000, "check_interval": 1.0, "idle_load": 1000.0},
        "exploration": DEMO_EXPLORATION,
        "log": {"format": "json", "level": "info"},
    }


@dataclass
class Record:
    rewards: list[float] = field(default_factory=list)
    regrets: list[float] = field(default_factory=list)
    versions: list[str | None] = field(default_factory=list)
    latencies_us: list[float] = field(default_factory=list)
    gains: list[float] = field(default_factory=list)  # reward earned less the default policy's expected


ADAPTATION_WINDOW = 200


def first_adaptation(gains: list[float], window: int = ADAPTATION_WINDOW) -> int | None:
    """The first decision from which the next ``window`` decisions earned more than the default
    policy would have (uniform: the expected reward of each context averaged over the actions),
    with a 95% interval that excludes it; None if no window did."""
    for start in range(0, len(gains) - window + 1, 50):
        part = np.asarray(gains[start : start + window])
        if part.mean() - 1.96 * part.std(ddof=1) / math.sqrt(window) > 0:
            return start + 1
    return None


def progress_bar(iterable: Any = None, **kw: Any) -> Any:
    """A tqdm bar on stderr: redrawn in place on a terminal; into a log (make demo in CI) a line
    every 30 s, not one per update."""
    from tqdm import tqdm

    every = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, mininterval=every, **kw)


def simulate(agents: list[tuple[Any, World]], decisions: int, rate: float, progress: Any = None) -> list[Record]:
    """Run the agents, (policy, world) each, in turn at ``rate`` decisions per second in all;
    reward comes back at once. One record per agent."""
    recs = [Record() for _ in agents]
    start = time.monotonic()
    for i in range(decisions):
        policy, world = agents[i % len(agents)]
        rec = recs[i % len(agents)]
        ctx = world.context()
        t0 = time.perf_counter_ns()
        choice = policy.decide(ctx, world.actions)
        rec.latencies_us.append((time.perf_counter_ns() - t0) / 1000)
        r = world.reward(ctx, choice.action)
        policy.reward(choice.id, r)
        rec.rewards.append(r)
        rec.regrets.append(world.best(ctx) - world.expected(ctx, choice.action))
        rec.gains.append(r - world.uniform(ctx))
        rec.versions.append(choice.model_version)
        if progress is not None:
            progress(i, recs[0])
        lag = start + (i + 1) / rate - time.monotonic()
        if lag > 0:
            time.sleep(lag)
    return recs


def windows(rec: Record, n: int = 12) -> list[dict[str, Any]]:
    size = max(1, math.ceil(len(rec.rewards) / n))
    rows = []
    for lo in range(0, len(rec.rewards), size):
        hi = min(lo + size, len(rec.rewards))
        versions = sorted({v or "none" for v in rec.versions[lo:hi]})
        rows.append(
            {
                "from": lo + 1,
                "to": hi,
                "models": ",".join(versions),
                "reward": float(np.mean(rec.rewards[lo:hi])),
                "regret": float(np.mean(rec.regrets[lo:hi])),
            }
        )
    return rows


def report(rec: Record, status: Any) -> str:
    lines = ["", f"{'decisions':>15}  {'model':<18}{'mean reward':>12}{'mean regret':>13}"]
    for w in windows(rec):
        lines.append(f"{w['from']:>7}–{w['to']:<7}  {w['models']:<18}{w['reward']:>12.3f}{w['regret']:>13.3f}")
    lat = np.array(rec.latencies_us)
    before = [r for r, v in zip(rec.regrets, rec.versions) if v is None]
    last = rec.versions[-1]
    after = [r for r, v in zip(rec.regrets, rec.versions) if v == last and v is not None]
    lines.append("")
    if before:
        lines.append(f"regret before any model (online head):  {np.mean(before):.3f} over {len(before)} decisions")
    if after:
        lines.append(f"regret with the last model {last}:         {np.mean(after):.3f} over {len(after)} decisions")
    adapted = first_adaptation(rec.gains)
    lines.append(
        "first adaptation: "
        + (
            f"decisions {adapted}–{adapted + ADAPTATION_WINDOW - 1} earned more than the default policy would have, "
            "95% interval excluding it"
            if adapted is not None
            else "none (no 200-decision window earned more than the default policy, 95%)"
        )
    )
    lines.append(
        f"total regret against the best possible choice: {sum(rec.regrets):.1f} "
        f"(first 2,000 decisions: {sum(rec.regrets[:2000]):.1f})"
    )
    lines.append(
        f"decide latency in-process: p50 {np.percentile(lat, 50):.0f} µs, p99 {np.percentile(lat, 99):.0f} µs"
        " (one call every few ms, each starting with cold CPU caches; `make bench` times calls back to back)"
    )
    t = status.trainer
    unconfirmed = (
        f" ({t['unconfirmed']} of them passed on their holdout,"
        " then lost to the online head on the decisions made during their run)"
        if t.get("unconfirmed") else ""
    )
    lines.append(
        f"daemon: {status.ingest['stored']} events stored, {t['runs']} training run{'s' if t['runs'] != 1 else ''}, "
        f"{t['promoted']} promoted, {t['rejected']} rejected{unconfirmed}"
    )
    return "\n".join(lines)


RULES_SHOWN = 5


def holds(conditions: list[dict[str, Any]], context: dict[str, Any]) -> bool:
    """Whether a rule's ``when`` holds for one context (a missing feature matches no condition)."""
    for c in conditions:
        if c["feature"] not in context:
            return False
        v, want = context[c["feature"]], c["value"]
        ok = {
            "==": lambda: str(v).lower() == str(want).lower(),
            "!=": lambda: str(v).lower() != str(want).lower(),
            "in": lambda: str(v) in want,
            "not in": lambda: str(v) not in want,
            "<=": lambda: v <= want,
            ">": lambda: v > want,
        }[c["op"]]()
        if not ok:
            return False
    return True


def true_lift(world: World, rule: dict[str, Any], samples: int = 20_000) -> float | None:
    """What the world itself says the rule's action earns over its baseline in its segment (None:
    the segment is empty or names an action this world does not have)."""
    if rule["action"] not in world.strategies or rule["baseline"] not in world.strategies:
        return None
    rng_state = world.rng.getstate()
    world.rng.seed(12345)  # the same contexts for every rule, and the world's own stream untouched
    try:
        inside = [c for c in (world.context() for _ in range(samples)) if holds(rule["when"], c)]
    finally:
        world.rng.setstate(rng_state)
    if not inside:
        return None
    return float(np.mean([world.expected(c, rule["action"]) - world.expected(c, rule["baseline"]) for c in inside]))


def rules_report(found: Any, world: World) -> str:
    """The rules the extraction published, each beside the world's true lift on its segment."""
    rules = sorted((r for r in found.rules if r["status"] == "published"), key=lambda r: -abs(r["lift"]))
    run = found.run or {}
    lines = ["", f"what the experience teaches (reflexd insights, on {run.get('experiences', 0)} decisions):"]
    if not rules:
        lines.append("  no rule held on decisions it was not found on")
        return "\n".join(lines)
    right = 0
    for shown, rule in enumerate(rules):
        truth = true_lift(world, rule)
        agrees = truth is not None and (truth > 0) == (rule["lift"] > 0)
        right += agrees
        if shown < RULES_SHOWN:
            verdict = "the world agrees" if agrees else "the world disagrees"
            lines.append(f"  {rule['text']}")
            lines.append(f"      true lift {truth:+.3f}: {verdict}" if truth is not None else "      (no such segment in the world)")
    # the sign count covers every published rule, so the reader must know when some are not listed
    listed = f" ({RULES_SHOWN} shown of {len(rules)})" if len(rules) > RULES_SHOWN else ""
    lines.append(f"rules published: {len(rules)}{listed}, of which {right} have the sign of the world's true lift")
    return "\n".join(lines)


def agents_report(names: list[str], worlds: list[World], recs: list[Record]) -> str:
    """One line per agent: its actions, its regret early and late, when it first adapted, and the
    last model it decided with (each agent learns in its own model line)."""
    lines = [
        "",
        f"{'agent':<16}{'actions':>8}{'decisions':>11}{'regret, first 500':>19}{'regret, last 1,000':>20}"
        f"{'its model':>11}  first adaptation",
    ]
    for name, world, rec in zip(names, worlds, recs):
        adapted = first_adaptation(rec.gains)
        lines.append(
            f"{name:<16}{len(world.actions):>8}{len(rec.regrets):>11}{np.mean(rec.regrets[:500]):>19.3f}"
            f"{np.mean(rec.regrets[-1000:]):>20.3f}{(rec.versions[-1] if rec.versions else None) or 'none':>11}  "
            + (f"decisions {adapted}–{adapted + ADAPTATION_WINDOW - 1}" if adapted is not None else "none")
        )
    return "\n".join(lines)


def plot(rec: Record, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    k = 300
    x = np.arange(len(rec.rewards))
    kernel = np.ones(k) / k
    reward = np.convolve(rec.rewards, kernel, mode="valid")
    regret = np.convolve(rec.regrets, kernel, mode="valid")
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    ax.plot(x[k - 1 :], reward, label=f"reward (moving mean of {k})", color="tab:blue")
    ax.plot(x[k - 1 :], regret, label="regret vs best choice", color="tab:red")
    previous = None
    for i, v in enumerate(rec.versions):
        if v != previous and v is not None:
            ax.axvline(i, color="grey", ls="--", lw=0.8)
            ax.text(i, 0.97, f" {v}", transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="grey")
        previous = v
    ax.set_xlabel("decision")
    ax.set_title("reflexd demo: a simulated LLM agent learning which strategy to use")
    ax.legend(loc="center right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def run_demo(
    decisions: int = 12_000,
    out_dir: str = "demo-out",
    seed: int = 7,
    rate: float = 300.0,
    agents: int = 1,
    insights: bool = True,
) -> int:
    from reflexd.client.policy import Policy
    from reflexd.config import ExplorationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="reflexd-demo-"))
    config = demo_config(root)
    if not 1 <= agents <= len(AGENTS):
        raise ValueError(f"--agents must be from 1 to {len(AGENTS)}, not {agents}")
    names = [name for name, _, _ in AGENTS[:agents]]
    worlds = [World(seed + k, strategies, weights) for k, (_, strategies, weights) in enumerate(AGENTS[:agents])]
    print(f"reflexd demo: daemon state in {root}, {decisions} decisions at {rate:g}/s", file=sys.stderr)
    try:
        with LocalDaemon(root, config) as daemon:
            explore = ExplorationConfig(**DEMO_EXPLORATION)
            policies = [
                Policy(name, socket=daemon.socket, state_dir=config["state_dir"], seed=seed + k, exploration=explore)
                for k, name in enumerate(names)
            ]
            with progress_bar(total=decisions, unit="dec") as bar:

                def progress(i: int, rec: Record) -> None:
                    if i % 100 == 99:
                        reward = f"{np.mean(rec.rewards[-500:]):.3f}"
                        bar.set_postfix(model=rec.versions[-1] or "none", reward=reward, refresh=False)
                        bar.update(100)

                recs = simulate(list(zip(policies, worlds)), decisions, rate, progress)
                bar.update(decisions - bar.n)
            for policy in policies:
                if not policy.flush(60):
                    print(f"warning: events not acknowledged within 60 s: {policy.stats()}", file=sys.stderr)
                policy.close()
            # acknowledged events may still be in the spool: the count reported is of stored ones
            daemon.request(Flush(loaded=True), timeout=60)
            found = None
            if insights:
                print("extracting what the experience teaches…", file=sys.stderr)
                try:
                    found = daemon.request(InsightsRequest(agent=names[0], now=True), timeout=600)
                except ReflexdError as exc:  # too little matured experience in a short run, say
                    print(f"no insights: {exc}", file=sys.stderr)
            status = daemon.status()
            shutil.copy(daemon.log_path, out / "daemon.log")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rec = recs[0]
    text = report(rec, status)
    if agents > 1:
        text += "\n" + agents_report(names, worlds, recs)
    if found is not None:
        text += "\n" + rules_report(found, worlds[0])
    print(text)
    (out / "report.txt").write_text(text + "\n")
    if plot(rec, out / "learning-curve.png"):
        print(f"\nplot: {out / 'learning-curve.png'}   report: {out / 'report.txt'}")
    else:
        print("\n(install matplotlib for the learning-curve plot)")
    if not any(rec.versions):
        # the gate kept the head-driven policy: no candidate was shown to beat it (daemon.log says why),
        # or one passed only after the agent's last decision
        late = "no model served the agent: the one promoted went live after its last decision"
        said = late if agents == 1 and status.trainer["promoted"] else "no model was promoted during the demo"
        print(f"{said}; see {out / 'daemon.log'}", file=sys.stderr)
    if first_adaptation(rec.gains) is None:
        print("the agent never earned clearly more than the default policy", file=sys.stderr)
        return 1
    return 0
