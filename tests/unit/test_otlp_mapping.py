"""From GenAI spans to steps (reflexd.collect): episodes, steps, rewards, the allow-list, privacy, the journal."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import msgspec
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from reflexd.collect import journal as journal_module
from reflexd.collect.episodes import Assembler, Plan
from reflexd.collect.journal import Journal
from reflexd.collect.reward import Expression, problem, variables
from reflexd.collect.spans import Rules, SpanRecord, nest, problems
from reflexd.config import TracesConfig, parse_config
from reflexd.errors import ConfigError
from reflexd.service.redact import Redactor
from reflexd.wire.protocol import Event, Step

T = "4bf92f3577b34da6a3ce929d0e0e4736"
T2 = "0af7651916cd43dd8448eb211c80319c"
AGENT = "00000000000000a1"
NOW = 1_800_000_000.0
SECRET = "my card is 4111 1111 1111 1111"


def value(v: Any) -> AnyValue:
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    if isinstance(v, float):
        return AnyValue(double_value=v)
    if isinstance(v, list):
        return AnyValue(array_value=ArrayValue(values=[value(x) for x in v]))
    if isinstance(v, dict):
        return AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key=k, value=value(x)) for k, x in v.items()]))
    return AnyValue(string_value=v)


def span(span_id: str, parent: str | None, op: str | None = None, start: float = 0.0, end: float | None = None,
         trace: str = T, error: bool = False, score: float | None = None, **attrs: Any) -> Span:
    """A span; attributes are given with dots as double underscores (gen_ai__tool__name)."""
    attributes = {k.replace("__", "."): v for k, v in attrs.items()}
    if op is not None:
        attributes["gen_ai.operation.name"] = op
    s = Span(
        trace_id=bytes.fromhex(trace), span_id=bytes.fromhex(span_id), parent_span_id=bytes.fromhex(parent or ""),
        name=f"{op or 'internal'} {span_id}", start_time_unix_nano=int((NOW + start) * 1e9),
        end_time_unix_nano=int((NOW + (end if end is not None else start + 1)) * 1e9),
        attributes=[KeyValue(key=k, value=value(v)) for k, v in attributes.items()],
    )
    if error:
        s.status.CopyFrom(Status(code=Status.STATUS_CODE_ERROR))
    if score is not None:
        event = s.events.add(name="gen_ai.evaluation.result")
        event.attributes.append(KeyValue(key="gen_ai.evaluation.score.value", value=value(score)))
    return s


def request(*spans: Span, service: str | None = "svc", **resource: Any) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    attrs = {**({"service.name": service} if service else {}), **{k.replace("__", "."): v for k, v in resource.items()}}
    rs.resource.attributes.extend(KeyValue(key=k, value=value(v)) for k, v in attrs.items())
    rs.scope_spans.add().spans.extend(spans)
    return req


def head(span_id: str = AGENT, agent: str | None = "planner", **kw: Any) -> Span:
    if agent is not None:
        kw["gen_ai__agent__name"] = agent
    kw.setdefault("start", 0.0)
    kw.setdefault("end", 10.0)
    return span(span_id, kw.pop("parent", None), "invoke_agent", **kw)


def tool(span_id: str, name: str, start: float, parent: str = AGENT, **kw: Any) -> Span:
    return span(span_id, parent, "execute_tool", start, gen_ai__tool__name=name, **kw)


def chat(span_id: str, model: str, start: float, parent: str = AGENT, **kw: Any) -> Span:
    return span(span_id, parent, "chat", start, gen_ai__request__model=model, **kw)


class Mapper:
    """Rules and an assembler, fed requests the way the receiver does, each plan committed."""

    def __init__(self, redactor: Redactor | None = None, **traces: Any) -> None:
        self.rules = Rules(TracesConfig(**traces), redactor or Redactor())
        self.assembler = Assembler(self.rules, self.rules.cfg.episode_timeout, self.rules.cfg.max_pending_spans)
        self.rejected: list[str] = []

    def send(self, *spans: Span, now: float = NOW, **resource: Any) -> Plan:
        extracted = self.rules.extract(request(*spans, **resource), now)
        plan = self.assembler.add(extracted.records, now)
        self.rejected = extracted.rejected + plan.rejected
        self.assembler.committed(plan)
        return plan

    def expire(self, now: float) -> Plan:
        plan = self.assembler.expire(now)
        self.assembler.committed(plan)
        return plan


def steps(plan: Plan) -> list[Step]:
    return [e for e in plan.events if type(e) is Step]


def events(plan: Plan, kind: str) -> list[Event]:
    return [e for e in plan.events if type(e) is Event and e.kind == kind]


# ---- episodes and steps -------------------------------------------------------------------------


def test_an_invoke_agent_span_is_an_episode_and_its_children_are_its_steps_by_start_time() -> None:
    m = Mapper()
    # children end (and are exported) before their parent, and not in the order they started
    plan = m.send(
        tool("00000000000000b2", "search", 3.0, gen_ai__tool__type="function"),
        chat("00000000000000b1", "gpt-4o", 1.0, gen_ai__request__temperature=0.2),
        tool("00000000000000b3", "fetch", 5.0),
        head(gen_ai__request__model="gpt-4o", gen_ai__provider__name="openai"),
    )
    out = steps(plan)
    assert [s.action for s in out] == ["gpt-4o", "search", "fetch"]
    assert [s.index for s in out] == [0, 1, 2]
    assert [s.done for s in out] == [False, False, True]
    assert {s.agent for s in out} == {"planner"}
    assert {s.episode for s in out} == {T + AGENT}  # trace id + span id of the invoke_agent span
    assert [s.id for s in out] == [T + "00000000000000b1", T + "00000000000000b2", T + "00000000000000b3"]
    assert out[0].ts == pytest.approx(NOW + 1.0)
    # the context: allowed attributes of the step and of its episode's span, nested; never the action itself
    assert out[0].observation == {"gen_ai": {"operation": {"name": "chat"}, "provider": {"name": "openai"},
                                             "request": {"temperature": 0.2}}}
    assert out[1].observation == {"gen_ai": {"operation": {"name": "execute_tool"}, "provider": {"name": "openai"},
                                             "request": {"model": "gpt-4o"}, "tool": {"type": "function"}}}
    (episode,) = events(plan, "episode")
    assert episode.id == T + AGENT and episode.data["steps"] == 3 and episode.data["closed_by"] == "invoke_agent"
    assert [e.id for e in events(plan, "step_outcome")] == [s.id for s in out]
    assert m.rejected == [] and m.assembler.waiting == 0


def test_steps_wait_for_their_episode_across_requests_and_are_journaled_meanwhile() -> None:
    m = Mapper()
    first = m.send(chat("00000000000000b1", "m1", 1.0))
    assert first.events == [] and [r.span for r in first.journal] == ["00000000000000b1"]
    second = m.send(tool("00000000000000b2", "search", 2.0))
    assert second.events == [] and [r.span for r in second.journal] == ["00000000000000b2"]  # only what is new
    assert m.assembler.waiting == 2
    closing = m.send(head())
    assert [s.action for s in steps(closing)] == ["m1", "search"] and steps(closing)[-1].done
    assert set(closing.done) == {T + "00000000000000b1", T + "00000000000000b2"} and closing.journal == []
    assert m.assembler.waiting == 0


def test_a_step_finds_its_episode_through_spans_between_them() -> None:
    m = Mapper()
    m.send(tool("00000000000000b1", "search", 1.0, parent="00000000000000c1"))
    # a framework's own span between the agent and its tool: kept as a link while steps wait
    m.send(span("00000000000000c1", AGENT, None, 0.5, 3.0, framework__step=1))
    plan = m.send(head())
    assert [(s.episode, s.action) for s in steps(plan)] == [(T + AGENT, "search")]
    assert m.assembler.waiting == 0  # the link went with it


def test_a_sub_agent_is_an_episode_of_its_own() -> None:
    m = Mapper()
    sub = "00000000000000d1"
    plan = m.send(
        chat("00000000000000b1", "small", 1.0, parent=sub),
        head(sub, agent="researcher", parent=AGENT, start=0.5, end=2.0),
        chat("00000000000000b2", "big", 3.0),
        head(),
    )
    by_agent = {s.agent: (s.episode, s.action) for s in steps(plan)}
    assert by_agent == {"researcher": (T + sub, "small"), "planner": (T + AGENT, "big")}


def test_a_step_that_outlives_its_episode_comes_after_it_not_done() -> None:
    m = Mapper()
    m.send(chat("00000000000000b1", "m", 1.0), head())
    late = steps(m.send(tool("00000000000000b2", "cleanup", 11.0)))
    assert [(s.index, s.done, s.episode, s.agent) for s in late] == [(1, False, T + AGENT, "planner")]


def test_spans_sent_again_are_not_stored_again() -> None:
    m = Mapper()
    spans = [chat("00000000000000b1", "m", 1.0), head()]
    assert len(steps(m.send(*spans))) == 1
    again = m.send(*spans)  # an exporter retrying after a lost reply
    assert steps(again) == [] and events(again, "episode") == []
    assert m.assembler.waiting == 0


def test_steps_under_a_root_without_invoke_agent_are_an_episode_of_that_root() -> None:
    m = Mapper()
    root = "00000000000000e1"
    plan = m.send(chat("00000000000000b1", "m", 1.0, parent=root), span(root, None, None, 0.0, 5.0, http__route="/ask"))
    (step,) = steps(plan)
    assert (step.episode, step.agent, step.done) == (T + root, "svc", True)  # named by service.name
    assert events(plan, "episode")[0].data["closed_by"] == "root"


def test_steps_whose_episode_never_comes_go_out_after_the_timeout_named_after_the_missing_span() -> None:
    m = Mapper(episode_timeout=60.0)
    m.send(chat("00000000000000b1", "m", 1.0, gen_ai__agent__name="helper"), tool("00000000000000b2", "t", 2.0))
    assert m.expire(NOW + 30).events == []
    plan = m.expire(NOW + 61)
    out = steps(plan)
    assert [(s.episode, s.agent, s.index, s.done) for s in out] == [
        (T + AGENT, "helper", 0, False), (T + AGENT, "helper", 1, True)  # the agent a step named
    ]
    assert plan.expired == 2 and events(plan, "episode")[0].data["closed_by"] == "timeout"
    assert m.assembler.waiting == 0


def test_past_max_pending_spans_the_oldest_trace_goes_out_first() -> None:
    m = Mapper(max_pending_spans=2)
    m.send(chat("00000000000000b1", "m", 1.0))
    m.send(chat("00000000000000b2", "m", 2.0, trace=T2, parent="00000000000000f2"))
    plan = m.send(chat("00000000000000b3", "m", 3.0, trace=T2, parent="00000000000000f2"))
    assert [s.episode for s in steps(plan)] == [T + AGENT]  # the first trace, not the newest
    assert m.assembler.waiting == 2


def test_a_plan_that_could_not_be_made_durable_is_undone() -> None:
    m = Mapper()
    m.send(chat("00000000000000b1", "m", 1.0))
    extracted = m.rules.extract(request(head()), NOW)
    plan = m.assembler.add(extracted.records, NOW)
    assert len(steps(plan)) == 1 and m.assembler.waiting == 0
    assert [r.span for r in m.assembler.live()] == ["00000000000000b1"]  # the journal must keep it meanwhile
    m.assembler.failed(plan)
    assert m.assembler.waiting == 1
    assert len(steps(m.send(head()))) == 1  # the retry closes the episode afresh


# ---- outcomes and rewards ------------------------------------------------------------------------


def test_rewards_combine_status_tokens_duration_and_evaluations() -> None:
    m = Mapper(reward="success - 0.001 * tokens - 0.1 * seconds + score", step_reward="-error")
    plan = m.send(
        chat("00000000000000b1", "m", 1.0, gen_ai__usage__input_tokens=300, gen_ai__usage__output_tokens=100),
        tool("00000000000000b2", "pay", 2.0, error=True, error__type="Timeout"),
        chat("00000000000000b3", "m", 3.0, gen_ai__usage__input_tokens=50, gen_ai__usage__output_tokens=50),
        head(end=4.0, score=0.5),
    )
    out = steps(plan)
    # the episode: success 1, its steps' 500 tokens (no usage of its own), 4 s, evaluation 0.5
    episode_reward = 1 - 0.5 - 0.4 + 0.5
    assert [s.reward for s in out] == pytest.approx([0.0, -1.0, episode_reward])
    (episode,) = events(plan, "episode")
    assert episode.data["tokens"] == 500 and episode.data["failed_steps"] == 1 and episode.data["score"] == 0.5
    assert episode.data["reward"] == pytest.approx(episode_reward)
    outcome = {e.data["action"]: e.data for e in events(plan, "step_outcome")}
    assert outcome["pay"]["success"] is False and outcome["pay"]["error_type"] == "Timeout"
    assert outcome["m"]["tokens"] == 100


def test_an_invoke_agent_span_with_usage_of_its_own_is_charged_that() -> None:
    m = Mapper(reward="-tokens")
    plan = m.send(chat("00000000000000b1", "m", 1.0, gen_ai__usage__input_tokens=10), head(gen_ai__usage__input_tokens=900))
    assert steps(plan)[-1].reward == -900


def test_an_error_status_or_error_type_is_a_failure() -> None:
    m = Mapper(reward="success")
    assert steps(m.send(chat("00000000000000b1", "m", 1.0), head(error=True)))[-1].reward == 0
    m = Mapper(reward="success")
    assert steps(m.send(chat("00000000000000b1", "m", 1.0), head(error__type="Cancelled")))[-1].reward == 0


def test_a_reward_without_a_value_stores_0_and_is_counted() -> None:
    m = Mapper(reward="1 / steps")
    plan = m.send(head())  # no steps: 1 / 0
    assert events(plan, "episode")[0].data["reward"] == 0.0 and plan.reward_errors == 1


def test_rewards_too_large_for_a_step_are_counted_and_stored_as_0() -> None:
    # each within the bound, the last step's own and the episode's add up past it
    m = Mapper(reward="1e15", step_reward="1e15")
    plan = m.send(head(), tool("00000000000000b1", "t", 1.0), tool("00000000000000b2", "t", 2.0))
    assert [s.reward for s in steps(plan)] == [1e15, 0.0] and plan.reward_errors == 1
    m = Mapper(reward="1e16", episode_timeout=60.0)  # one beyond it, the step waiting for its episode
    m.send(tool("00000000000000b1", "t", 1.0, gen_ai__agent__name="helper"))
    plan = m.expire(NOW + 61)
    assert [s.reward for s in steps(plan)] == [0.0] and plan.reward_errors == 1


@pytest.mark.parametrize(
    ("text", "values", "expected"),
    [
        ("success - 0.001*tokens - 0.1*seconds", {"success": 1, "tokens": 200, "seconds": 3}, 0.5),
        ("score if scored else success", {"success": 1}, 1.0),
        ("score if scored else success", {"score": 0.25, "scored": 1}, 0.25),
        ("max(0, 1 - seconds / 10) * (tokens < 500)", {"seconds": 5, "tokens": 100}, 0.5),
        ("-(failed_steps > 0) + log(exp(2)) + sqrt(abs(-4)) + 7 % 4 + 7 // 2", {"failed_steps": 2}, 9.0),
        ("not error and steps <= 3", {"steps": 2}, 1.0),
        ("2 ** 3 ** 2", {}, 512.0),
    ],
)
def test_reward_expressions_are_arithmetic_over_the_outcomes(text: str, values: dict, expected: float) -> None:
    assert Expression(text)(variables(**values)) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("__import__('os').system('true')", "not a function"),
        ("open('/etc/passwd')", "not a function"),
        ("success.__class__", "not allowed"),
        ("tokens[0]", "not allowed"),
        ("[x for x in 'ab']", "not allowed"),
        ("lambda: 1", "not allowed"),
        ("'text'", "only numbers"),
        ("cost", "not a variable"),
        ("min(1)", "arguments"),
        ("max(*[1, 2])", "plain arguments"),
        ("1 +", "not an expression"),
        ("-" * 100 + "1", "nested"),
        ("1" * 2000, "longer than"),
    ],
)
def test_anything_but_that_arithmetic_is_refused_before_it_runs(text: str, words: str) -> None:
    found = problem(text)
    assert found is not None and words in found


@pytest.mark.parametrize("text", ["1 / (1 - success)", "10.0 ** 400", "log(0)", "(-1) ** 0.5"])
def test_an_expression_without_a_finite_value_says_so(text: str) -> None:
    with pytest.raises(ValueError, match="finite|division|range|domain|complex"):
        Expression(text)(variables(success=1))


# ---- what is kept of a span ----------------------------------------------------------------------


CONTENT = {
    "gen_ai__input__messages": f'[{{"role": "user", "content": "{SECRET}"}}]',
    "gen_ai__output__messages": SECRET,
    "gen_ai__system_instructions": SECRET,
    "gen_ai__prompt": SECRET,
    "gen_ai__completion": SECRET,
    "gen_ai__prompt__0__content": SECRET,
    "gen_ai__tool__call__arguments": SECRET,
    "gen_ai__tool__call__result": SECRET,
}


def stored(plan: Plan) -> bytes:
    """Everything a plan would store, as the spool would have it."""
    return b"".join(msgspec.json.encode(e) for e in plan.events)


def test_message_content_is_never_stored_even_through_a_wildcard() -> None:
    # every content attribute is under these prefixes (gen_ai.* itself admits outcomes, and is refused)
    m = Mapper(attributes=["gen_ai.input.*", "gen_ai.output.*", "gen_ai.system_instructions*", "gen_ai.tool.*",
                          "gen_ai.prompt*", "gen_ai.completion*", "app.*"])
    plan = m.send(tool("00000000000000b1", "search", 1.0, app__tenant="acme", **CONTENT), head(**CONTENT))
    kept = stored(plan)
    assert SECRET.encode() not in kept
    assert steps(plan)[0].observation["app"] == {"tenant": "acme"}  # the wildcard's other attributes are kept
    assert all(SECRET.encode() not in msgspec.json.encode(r) for r in m.assembler.live())


def test_attributes_off_the_allow_list_are_not_kept() -> None:
    m = Mapper()
    plan = m.send(tool("00000000000000b1", "search", 1.0, app__tenant="acme", user__email="a@b.c"), head(), host__name="h1")
    assert steps(plan)[0].observation == {"gen_ai": {"operation": {"name": "execute_tool"}}}


def test_resource_attributes_on_the_allow_list_are_kept() -> None:
    m = Mapper(attributes=["deployment.environment.name"])
    plan = m.send(tool("00000000000000b1", "s", 1.0), head(), deployment__environment__name="prod")
    assert steps(plan)[0].observation == {"deployment": {"environment": {"name": "prod"}}}


def test_with_capture_content_everything_is_kept_through_the_redaction_rules() -> None:
    redactor = Redactor(drop=["gen_ai.input.messages"], hash=["user.email"], key=b"k" * 32)
    m = Mapper(redactor=redactor, capture_content=True)
    plan = m.send(tool("00000000000000b1", "search", 1.0, user__email="a@b.c", gen_ai__usage__input_tokens=12,
                       gen_ai__response__model="m", error__type="timeout", **CONTENT), head())
    observation = steps(plan)[0].observation
    # every attribute but the step's outcome, which a model must not see when it decides
    assert "usage" not in observation["gen_ai"] and "response" not in observation["gen_ai"] and "error" not in observation
    assert "messages" not in observation["gen_ai"].get("input", {})  # dropped by redaction.drop
    assert observation["gen_ai"]["tool"]["call"]["arguments"] == SECRET  # opted in
    assert observation["user"]["email"].startswith("h:") and "a@b.c" not in observation["user"]["email"]
    assert "name" not in observation["gen_ai"]["tool"]  # the action is never the observation


def test_attribute_values_of_every_kind_become_json() -> None:
    m = Mapper(attributes=["app.*"])
    plan = m.send(
        tool("00000000000000b1", "s", 1.0, app__list=[1, "a", True], app__map={"k": 2.5}, app__nan=math.nan),
        head(),
    )
    assert steps(plan)[0].observation["app"] == {"list": [1, "a", True], "map": {"k": 2.5}, "nan": None}


def test_nesting_keeps_a_key_flat_when_a_value_is_in_its_way() -> None:
    assert nest({"a.b": 1, "a.c": 2, "x": 3}) == {"a": {"b": 1, "c": 2}, "x": 3}
    assert nest({"a": 1, "a.b": 2}) == {"a": 1, "a.b": 2}
    assert nest({"m": {"k": 1}, "m.j": 2}) == {"m": {"k": 1}, "m.j": 2}  # a mapping value is a leaf


# ---- who the agent is, and what is refused -----------------------------------------------------


def test_an_invoke_agent_span_without_an_agent_name_is_named_by_its_service() -> None:
    m = Mapper()
    plan = m.send(tool("00000000000000b1", "s", 1.0), head(agent=None), service="billing-bot")
    assert [s.agent for s in steps(plan)] == ["billing-bot"] and m.rejected == []


def test_with_missing_agent_reject_the_episode_and_its_steps_are_refused() -> None:
    m = Mapper(missing_agent="reject")
    m.send(tool("00000000000000b1", "early", 1.0))  # acknowledged before its episode came
    plan = m.send(tool("00000000000000b2", "s", 2.0), head(agent=None))
    assert steps(plan) == []
    assert len(m.rejected) == 2  # the invoke_agent span and the step sent with it
    assert any("gen_ai.agent.name" in r for r in m.rejected)
    assert plan.refused == 2 and len(plan.dead) == 1 and "2 steps refused" in plan.dead[0]
    assert steps(m.send(tool("00000000000000b3", "late", 11.0))) == []  # its late steps too
    assert len(m.rejected) == 1


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (Span(trace_id=b"short", span_id=bytes(range(1, 9)), start_time_unix_nano=1), "trace id"),
        (Span(trace_id=bytes(16), span_id=bytes(range(1, 9)), start_time_unix_nano=1), "trace id"),
        (Span(trace_id=bytes(range(1, 17)), span_id=bytes(8), start_time_unix_nano=1), "span id"),
        (Span(trace_id=bytes(range(1, 17)), span_id=bytes(range(1, 9)), parent_span_id=b"\x01", start_time_unix_nano=1), "parent"),
    ],
)
def test_spans_with_ids_otlp_does_not_allow_are_rejected(bad: Span, words: str) -> None:
    extracted = Mapper().rules.extract(request(bad), NOW)
    assert extracted.records == [] and len(extracted.rejected) == 1 and words in extracted.rejected[0]


def test_steps_without_their_action_or_a_start_time_are_rejected_and_the_rest_taken() -> None:
    m = Mapper()
    no_time = tool("00000000000000b3", "s", 0.0)
    no_time.start_time_unix_nano = 0
    plan = m.send(
        span("00000000000000b1", AGENT, "execute_tool", 1.0),  # no gen_ai.tool.name
        chat("00000000000000b2", "x" * 300, 2.0),
        no_time,
        tool("00000000000000b4", "fine", 3.0),
        head(),
    )
    assert [s.action for s in steps(plan)] == ["fine"]
    assert len(m.rejected) == 3
    assert any("an execute_tool span without gen_ai.tool.name" in r for r in m.rejected), m.rejected
    assert any("longer than" in r for r in m.rejected) and any("start time" in r for r in m.rejected)


def test_spans_of_other_operations_are_neither_stored_nor_rejected() -> None:
    m = Mapper()
    plan = m.send(span("00000000000000b1", None, "embeddings", 1.0), span("00000000000000b2", None, None, 1.0, http__route="/"))
    assert plan.events == [] and m.rejected == [] and m.assembler.waiting == 0


# ---- the config ------------------------------------------------------------------------------------


def test_the_mapping_checks_name_each_problem() -> None:
    cfg = TracesConfig(reward="cost * 2", step_reward="eval('1')", attributes=["gen_ai.input.messages", ""],
                       steps={"invoke_agent": "gen_ai.agent.name", "chat": ""})
    found = problems(cfg)
    assert any(p.startswith("traces.reward: 'cost'") for p in found)
    assert any(p.startswith("traces.step_reward: 'eval'") for p in found)
    assert any("traces.attributes.0: gen_ai.input.messages is message content" in p for p in found)
    assert any(p.startswith("traces.attributes.1") for p in found)
    assert any(p.startswith("traces.steps.invoke_agent") for p in found)
    assert any(p.startswith("traces.steps: 'chat'") for p in found)
    assert problems(TracesConfig(attributes=["gen_ai.input.messages"], capture_content=True)) == []
    assert problems(TracesConfig()) == []
    with pytest.raises(ValueError, match="traces.reward"):
        Rules(cfg, Redactor())


def test_an_allow_list_that_admits_a_steps_outcome_is_refused() -> None:
    (wide, tokens, error) = problems(TracesConfig(attributes=["gen_ai.*", "gen_ai.usage.input_tokens", "error.*", "app.*"]))
    assert wide.startswith("traces.attributes.0: gen_ai.* admits gen_ai.response.*, gen_ai.usage.*, gen_ai.evaluation.*,")
    assert tokens.startswith("traces.attributes.1: gen_ai.usage.input_tokens admits gen_ai.usage.input_tokens, the step's outcome")
    assert error.startswith("traces.attributes.2: error.* admits error.type")
    assert problems(TracesConfig(attributes=["gen_ai.request.*", "gen_ai.operation.name"])) == []


def test_the_listeners_are_checked_with_the_rest_of_the_config() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("socket: {path: /run/x/r.sock}\ntraces: {host: 0.0.0.0, path: /run/x/r.sock}\n")
    assert any("traces.host" in p for p in info.value.problems)
    assert any("traces.path" in p for p in info.value.problems)
    with pytest.raises(ConfigError, match="traces.port"):
        parse_config("metrics: {port: 9465}\ntraces: {port: 9465}\n")
    assert parse_config("traces: {enabled: true, port: 4318, missing_agent: reject}\n").traces.port == 4318


# ---- the journal -------------------------------------------------------------------------------------


def record(span_id: str, received: float = NOW) -> SpanRecord:
    return SpanRecord(trace=T, span=span_id, parent=AGENT, role="step", action="a", start=1.0, end=2.0,
                      attrs={"gen_ai": {"operation": {"name": "chat"}}}, received=received)


def test_the_journal_gives_back_what_still_waits(tmp_path: Path) -> None:
    j = Journal(tmp_path / "traces")
    assert j.load() == []
    j.write([record("00000000000000b1"), record("00000000000000b2")], [])
    j.write([record("00000000000000b3")], [T + "00000000000000b1"])
    j.close()
    assert sorted(r.span for r in Journal(tmp_path / "traces").load()) == ["00000000000000b2", "00000000000000b3"]
    assert Journal(tmp_path / "traces").load()[0] == record("00000000000000b2")


def test_a_line_cut_short_by_a_crash_is_skipped(tmp_path: Path) -> None:
    j = Journal(tmp_path / "traces")
    j.load()
    j.write([record("00000000000000b1")], [])
    j.close()
    with open(j.path, "ab") as f:
        f.write(b'{"add": [{"trace": "4bf9')  # the write a crash interrupted, never acknowledged
    assert [r.span for r in Journal(tmp_path / "traces").load()] == ["00000000000000b1"]
    assert j.path.read_bytes().endswith(b"\n")  # and the file rewritten without it


def test_the_journal_is_rewritten_once_mostly_done_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_module, "COMPACT_AFTER", 10)
    j = Journal(tmp_path / "traces")
    j.load()
    for i in range(12):
        key = f"{i:016x}"
        j.write([record(key)], [T + key])
    assert j.due(live=0)
    size = j.path.stat().st_size
    j.compact([record("00000000000000ff")])
    assert j.path.stat().st_size < size and not j.due(live=1)
    assert [r.span for r in Journal(tmp_path / "traces").load()] == ["00000000000000ff"]


def test_the_journal_refuses_a_directory_others_may_write(tmp_path: Path) -> None:
    (tmp_path / "traces").mkdir(mode=0o777)
    (tmp_path / "traces").chmod(0o777)
    with pytest.raises(Exception, match="writable by group or others"):
        Journal(tmp_path / "traces").load()


def test_a_write_that_fails_half_way_leaves_no_half_line_before_the_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from reflexd.errors import StorageError

    j = Journal(tmp_path / "traces")
    j.load()
    real_write = journal_module.os.write
    calls = {"n": 0}

    def short_then_fail(fd: int, data: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data[:10]))  # ten bytes reach the file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal_module.os, "write", short_then_fail)
    with pytest.raises(StorageError):
        j.write([record("00000000000000b1")], [])  # answered 503: the exporter sends it again
    monkeypatch.setattr(journal_module.os, "write", real_write)
    j.write([record("00000000000000b2")], [])  # answered 200: must survive a restart
    j.close()
    # before: the second line ran on from the first's ten bytes, and load skipped both
    assert [r.span for r in Journal(tmp_path / "traces").load()] == ["00000000000000b2"]


def test_forget_drops_the_steps_waiting_for_an_agents_episodes() -> None:
    m = Mapper(missing_agent="service")
    m.send(chat("00000000000000b1", "m1", 1.0), service="support")
    assert m.assembler.waiting == 1
    assert m.assembler.forget("someone-else") == 0 and m.assembler.waiting == 1
    assert m.assembler.forget("support") == 1
    assert m.assembler.waiting == 0 and m.assembler.live() == []
    # nothing of it is stored when its episode comes after all
    closing = m.send(head(agent="support"), service="support")
    assert steps(closing) == []
