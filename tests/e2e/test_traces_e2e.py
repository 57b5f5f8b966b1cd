"""Trace ingest through the daemon itself: ``reflexd run`` with ``traces.enabled``, the OpenTelemetry
SDK's own OTLP/HTTP exporter sending a GenAI-shaped agent run to the loopback port the daemon
reports, and the steps read back with ``reflexd query``; content never stored."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from conftest import wait_for
from test_metrics_e2e import unix_get, values

pytestmark = pytest.mark.e2e
SECRET = "my card is 4111 1111 1111 1111"


def run_agent(provider: TracerProvider, tool: str, ok: bool) -> None:
    tracer = provider.get_tracer("router.agent")
    with tracer.start_as_current_span("invoke_agent router", attributes={
        "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "router",
    }) as agent:
        with tracer.start_as_current_span("chat small-model", attributes={
            "gen_ai.operation.name": "chat", "gen_ai.request.model": "small-model",
            "gen_ai.usage.input_tokens": 120, "gen_ai.usage.output_tokens": 30, "gen_ai.input.messages": SECRET,
        }):
            pass
        with tracer.start_as_current_span(f"execute_tool {tool}", attributes={
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool, "gen_ai.tool.call.arguments": SECRET,
        }):
            pass
        agent.add_event("gen_ai.evaluation.result", {"gen_ai.evaluation.score.value": 1.0 if ok else 0.0})


def test_the_sdk_exports_agent_runs_to_the_daemon_which_stores_them_as_episodes(daemon_factory, tmp_path) -> None:
    d = daemon_factory({"traces": {"enabled": True, "path": str(tmp_path / "t.sock"), "port": 0, "reward": "score"},
                        "metrics": {"path": str(tmp_path / "m.sock")}})
    (port,) = d.status().traces["ports"]
    provider = TracerProvider(resource=Resource.create({"service.name": "router-svc"}))
    exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces", compression=Compression.Gzip, timeout=30)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    for i in range(5):
        run_agent(provider, "search" if i % 2 else "calculator", ok=i % 2 == 0)
    assert provider.force_flush(30_000)
    provider.shutdown()

    wait_for(lambda: d.loaded_status().experience.get("steps", 0) >= 10, 60, "the traced steps in the store")
    done = subprocess.run(
        [sys.executable, "-m", "reflexd", "query", "--socket", d.socket, "--json",
         "SELECT agent, episode, \"index\", action, reward, done, observation FROM steps ORDER BY episode, \"index\""],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr + d.log_tail()
    rows = json.loads(done.stdout)  # one object per row
    assert len(rows) == 10 and {r["agent"] for r in rows} == {"router"} and len({r["episode"] for r in rows}) == 5
    assert {r["action"] for r in rows} == {"small-model", "search", "calculator"}
    finals = sorted(r["reward"] for r in rows if r["done"])  # the episode's score, credited at its last step
    assert finals == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert SECRET not in done.stdout
    traces = d.status().traces
    assert traces["episodes"] == 5 and traces["rejected_spans"] == 0
    # what status says of the receiver, the operator sees without --json, and Prometheus scrapes
    shown = subprocess.run([sys.executable, "-m", "reflexd", "status", "--socket", d.socket],
                           capture_output=True, text=True, timeout=120).stdout
    assert f"traces     requests {traces['requests']}  spans 15  steps 10  episodes 5" in shown, shown
    scraped = values(unix_get(str(tmp_path / "m.sock"), "/metrics")[1])
    assert scraped[("reflexd_traces_episodes_total", ())] == 5 and scraped[("reflexd_traces_steps_total", ())] == 10
    assert scraped[("reflexd_traces_requests_total", (("status", "200"),))] == traces["by_status"][200] == traces["requests"]


def test_decisions_named_after_a_traced_episode_are_credited_with_its_outcome(daemon_factory, tmp_path) -> None:
    """The agent's only reflexd call is decide, with its invoke_agent span's ids as the episode:
    the trace's evaluation score comes back as those decisions' reward (rewards.episode_return)."""
    from reflexd.client.policy import Policy
    from reflexd.wire.protocol import Evaluate

    d = daemon_factory({
        "traces": {"enabled": True, "path": str(tmp_path / "t.sock"), "port": 0, "reward": "score"},
        "rewards": {"wait_window": 0.2, "default": 0.0, "episode_return": True},
    })
    (port,) = d.status().traces["ports"]
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces", timeout=30)))
    tracer = provider.get_tracer("router.agent")
    with Policy("router", socket=d.socket, state_dir=d.state_dir) as policy:
        for i in range(40):
            with tracer.start_as_current_span("invoke_agent router", attributes={
                "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "router",
            }) as agent:
                ids = agent.get_span_context()
                choice = policy.decide({"n": i}, ["search", "calculator"], episode=f"{ids.trace_id:032x}{ids.span_id:016x}")
                with tracer.start_as_current_span(f"execute_tool {choice.action}", attributes={
                    "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": choice.action,
                }):
                    pass
                agent.add_event("gen_ai.evaluation.result", {"gen_ai.evaluation.score.value": 1.0 if i % 4 else 0.0})
        assert policy.flush(30)
    assert provider.force_flush(30_000)
    provider.shutdown()
    wait_for(lambda: d.loaded_status().experience.get("new_since_training", 0) >= 40, 60, "the decisions to mature")
    logged = d.request(Evaluate(policies=["action:search"], agent="router"), timeout=120).rows[0]
    # the logging policy's value is the mean joined reward: 30 of the 40 episodes scored 1
    assert logged.value.value == pytest.approx(0.75)
