"""``reflexd demo --traces``: an agent that teaches reflexd only through its OpenTelemetry traces.

A simulated tool-using agent solves tasks in episodes: it calls tools until two calls have
succeeded, then answers, right with a chance that falls with every failed call. Which tool works
depends on the task. The agent is instrumented with the OpenTelemetry SDK alone (GenAI spans:
``invoke_agent``, ``execute_tool``, an evaluation score on success), exported over OTLP/HTTP to
the daemon's trace receiver; its only reflexd call is choosing the tool (``Policy.decide`` with
the episode's id, the trace and span ids of its ``invoke_agent`` span). It never reports a
reward: the receiver turns each trace into an episode whose end credits the agent's decisions
with the episode's outcome (``rewards.episode_return``), and the daemon learns from that.
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from reflexd.testing import LocalDaemon
from reflexd.tools.demo import progress_bar

TOOLS = ("search", "calculator", "browser", "code")
TASKS = ("math", "lookup", "coding")
# the chance each tool's call succeeds, by task: every task has one good tool and one fair one
SUCCESS = {
    "math": {"search": 0.30, "calculator": 0.90, "browser": 0.20, "code": 0.60},
    "lookup": {"search": 0.90, "calculator": 0.10, "browser": 0.60, "code": 0.20},
    "coding": {"search": 0.40, "calculator": 0.10, "browser": 0.20, "code": 0.90},
}
RIGHT_AFTER_FAILURES = (0.95, 0.7, 0.45, 0.2)  # the answer's chance of being right, by failed calls
MAX_CALLS = 8
AGENT = "tool-agent"


def traces_config(root: Path) -> dict[str, Any]:
    return {
        "state_dir": str(root / "state"),
        "socket": {"path": str(root / "run" / "reflexd.sock")},
        "traces": {"enabled": True, "path": str(root / "run" / "traces.sock"), "port": 0, "reward": "score"},
        # each decision is credited with its episode's outcome, which the trace brings
        "rewards": {"wait_window": 1.0, "default": 0.0, "episode_return": True, "episode_timeout": 60},
        "trainer": {"min_new_examples": 1500, "check_interval": 1.0, "idle_load": 1000.0},
        "exploration": {"strategy": "epsilon_greedy", "epsilon": 0.1},
        "online": {"enabled": False},  # the agent reports no rewards: what it learns comes from traces
        "insights": {"enabled": False},
        "behaviour": {"enabled": False},
        "log": {"format": "json", "level": "info"},
    }


def run_episode(tracer: Any, policy: Any, rng: random.Random) -> tuple[bool, int, str | None]:
    """One task, traced; whether its answer was right, how many tool calls it made, and the model
    version that chose them (None: the default policy)."""
    from opentelemetry.trace import Status, StatusCode

    task = rng.choice(TASKS)
    with tracer.start_as_current_span("invoke_agent tool-agent", attributes={
        "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": AGENT,
    }) as agent:
        ids = agent.get_span_context()
        episode = f"{ids.trace_id:032x}{ids.span_id:016x}"  # the receiver names the episode so
        ok = failed = calls = 0
        version = None
        while ok < 2 and calls < MAX_CALLS:
            context = {"task": task, "failures": failed, "successes": ok}
            choice = policy.decide(context, list(TOOLS), episode=episode)
            tool, version = choice.action, choice.model_version
            calls += 1
            with tracer.start_as_current_span(f"execute_tool {tool}", attributes={
                "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool,
            }) as span:
                if rng.random() < SUCCESS[task][tool]:
                    ok += 1
                else:
                    failed += 1
                    span.set_status(Status(StatusCode.ERROR, "the tool failed"))
                    span.set_attribute("error.type", "ToolFailed")
        right = ok >= 2 and rng.random() < RIGHT_AFTER_FAILURES[min(failed, 3)]
        agent.add_event("gen_ai.evaluation.result", {"gen_ai.evaluation.score.value": 1.0 if right else 0.0})
    return right, calls, version


def run_traces_demo(episodes: int = 4000, out_dir: str = "demo-out", seed: int = 7, rate: float = 50.0) -> int:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from reflexd.client.policy import Policy
    from reflexd.config import ExplorationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="reflexd-demo-traces-"))
    config = traces_config(root)
    rng = random.Random(seed)
    print(f"reflexd demo --traces: daemon state in {root}, {episodes} episodes at {rate:g}/s", file=sys.stderr)
    outcomes: list[tuple[bool, int, str | None]] = []
    try:
        with LocalDaemon(root, config) as daemon:
            port = daemon.status().traces["ports"][0]
            provider = TracerProvider(resource=Resource.create({"service.name": "tool-agent-svc"}))
            exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces", timeout=30)
            provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=200))
            tracer = provider.get_tracer("tool-agent")
            explore = ExplorationConfig(strategy="epsilon_greedy", epsilon=0.1)
            with Policy(AGENT, socket=daemon.socket, state_dir=config["state_dir"], seed=seed, exploration=explore) as policy:
                start = time.monotonic()
                for i in progress_bar(range(episodes), unit="episode"):
                    outcomes.append(run_episode(tracer, policy, rng))
                    # an agent's pace, so the trainer's runs land while it works
                    lag = start + (i + 1) / rate - time.monotonic()
                    if lag > 0:
                        time.sleep(lag)
                policy.flush(60)
            provider.force_flush(30_000)
            provider.shutdown()
            status = daemon.status()
            shutil.copy(daemon.log_path, out / "daemon-traces.log")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = traces_report(outcomes, status)
    print(text)
    (out / "report-traces.txt").write_text(text + "\n")
    return 0 if any(v for _, _, v in outcomes) else 1


def traces_report(outcomes: list[tuple[bool, int, str | None]], status: Any) -> str:
    """Success rate and tool calls per episode, before the first model and with the last one."""
    before = [(r, c) for r, c, v in outcomes if v is None]
    last = outcomes[-1][2] if outcomes else None
    after = [(r, c) for r, c, v in outcomes if v == last and v is not None]
    lines = ["", f"{'episodes':<34}{'count':>7}{'success rate':>14}{'tool calls':>12}"]
    for name, rows in (("before any model (uniform tools)", before), (f"with the last model {last}", after)):
        if rows:
            lines.append(
                f"{name:<34}{len(rows):>7}{sum(r for r, _ in rows) / len(rows):>14.3f}{sum(c for _, c in rows) / len(rows):>12.2f}"
            )
    t = status.trainer
    traces = status.traces or {}
    lines.append(
        f"daemon: {traces.get('spans', 0)} spans in, {traces.get('episodes', 0)} episodes, "
        f"{t['runs']} training runs, {t['promoted']} promoted; the agent sent no reward itself"
    )
    if not after:
        lines.append("no model was promoted during the demo: more --decisions, or see daemon-traces.log")
    return "\n".join(lines)
