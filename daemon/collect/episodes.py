"""Episodes from spans that arrive in pieces: steps wait for their invoke_agent span, then go out whole.

Children end, and so are exported, before their parent: an episode's steps come before its
``invoke_agent`` span, in the same export request or in earlier ones. So steps wait here (and in
``reflexd.collect.journal``, since their requests were acknowledged) until their episode is known:

- A step belongs to the nearest ``invoke_agent`` span above it, through any spans between (kept
  as links, ids only, while steps of their trace wait).
- When an episode's span arrives, its waiting steps go out: indexed from 0 by start time, the
  last one ``done``. Each step's reward is ``traces.step_reward`` over its own outcomes; the last
  one's also carries ``traces.reward`` over the episode's.
- A step arriving after its episode went out (a child that outlived its parent) goes out with the
  next index, not ``done``, and only its own reward.
- A step whose parents reach the trace's root with no ``invoke_agent`` span among them is a step
  of an episode named after that root (an agent that does not trace its invocations).
- A step still waiting after ``traces.episode_timeout`` (or the oldest, past
  ``traces.max_pending_spans``) goes out with the steps waiting under the same missing span, as
  an episode named after it: the id that episode would have had if the missing span was its
  ``invoke_agent`` span.
- An episode is remembered, for its late steps, for ``traces.episode_timeout`` after it went out.

Each step is a ``Step`` (id: trace id + span id, so a span sent again is stored once) and an
``Event`` of kind ``step_outcome`` (its outcomes and own reward, under the same id); each episode
an ``Event`` of kind ``episode`` (its outcomes, step count and reward; id: trace id + span id of
the span it is named after). The agent is the episode's: ``gen_ai.agent.name`` of its span, or
for an episode without one, of its first step that has one, else by ``traces.missing_agent``.

Nothing here waits or writes: ``add`` and ``expire`` return a ``Plan``; the caller makes its
messages durable and its records journaled, then reports ``committed`` or ``failed`` (which puts
everything back as it was, so that the request can be sent again).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable

from reflexd import log
from reflexd.collect.reward import Expression, variables
from reflexd.collect.spans import MAX_PARENT_HOPS, Rules, SpanRecord, merge, without
from reflexd.wire.protocol import MAX_REWARD, Event, Step

_log = log.get("reflexd.collect")
EPISODE_KIND = "episode"
EPISODE_END_KIND = "episode_end"  # what the reward join reads (reflexd.learning.join)
STEP_KIND = "step_outcome"


@dataclass
class Plan:
    """What one ``add`` or ``expire`` decided."""

    events: list[Any] = field(default_factory=list)  # Steps and Events to make durable
    dead: list[str] = field(default_factory=list)  # reasons to dead-letter
    rejected: list[str] = field(default_factory=list)  # for spans of this request, why each was refused
    journal: list[SpanRecord] = field(default_factory=list)  # waiting records not journaled yet
    done: list[str] = field(default_factory=list)  # keys of records no longer waiting
    taken: list[SpanRecord] = field(default_factory=list)  # records that stopped waiting (back if failed)
    closed: list[tuple[str, str]] = field(default_factory=list)  # episodes remembered from now
    late: list[tuple[tuple[str, str], str]] = field(default_factory=list)  # (episode, step span) added late
    steps: int = 0
    episodes: int = 0
    late_steps: int = 0
    expired: int = 0  # steps that went out without their invoke_agent span
    refused: int = 0  # steps refused with their episode
    reward_errors: int = 0


class _Closed:
    """An episode that went out: what its late steps need."""

    __slots__ = ("agent", "next_index", "attrs", "steps", "at")

    def __init__(self, agent: str | None, next_index: int, attrs: dict[str, Any], steps: set[str], at: float) -> None:
        self.agent, self.next_index, self.attrs, self.steps, self.at = agent, next_index, attrs, steps, at


class Assembler:
    """Waiting steps and links by trace, and the episodes that went out lately."""

    def __init__(self, rules: Rules, timeout: float, max_waiting: int) -> None:
        self.rules = rules
        self.timeout = timeout
        self.max_waiting = max_waiting
        self._traces: dict[str, dict[str, SpanRecord]] = {}  # trace id -> span id -> step or link
        self._waiting = 0
        self._journaled: set[str] = set()
        self._inflight: dict[str, SpanRecord] = {}  # taken by a plan not yet committed or failed
        self._closed: OrderedDict[tuple[str, str], _Closed] = OrderedDict()
        self._reward_error_logged: str | None = None

    @property
    def waiting(self) -> int:
        """Steps and links waiting for their episode."""
        return self._waiting

    def live(self) -> list[SpanRecord]:
        """Every record the journal must keep: waiting, or taken by a plan not yet durable."""
        return [r for spans in self._traces.values() for r in spans.values()] + list(self._inflight.values())

    def restore(self, records: Iterable[SpanRecord]) -> None:
        """Records a previous run journaled: waiting again, journaled already."""
        for record in records:
            spans = self._traces.setdefault(record.trace, {})
            if record.span not in spans:
                spans[record.span] = record
                self._waiting += 1
            self._journaled.add(record.key)

    def forget(self, agent: str) -> int:
        """Drop what waits for ``agent``'s episodes: every waiting record of a trace in which a
        span names it (as its agent or, with ``missing_agent: service``, its service), and the
        episodes of its that went out lately, so no late step is stored under it. How many went."""
        doomed = [
            trace for trace, spans in self._traces.items()
            if any(agent in (r.agent, r.service) for r in spans.values())
        ]
        dropped = 0
        for trace in doomed:
            for record in self._traces.pop(trace).values():
                self._waiting -= 1
                self._journaled.discard(record.key)
                dropped += 1
        for key in [k for k, closed in self._closed.items() if closed.agent == agent]:
            del self._closed[key]
        return dropped

    # ---- deciding ------------------------------------------------------------------------

    def add(self, records: Iterable[SpanRecord], now: float) -> Plan:
        """Take a request's records: close the episodes they complete, keep the rest waiting."""
        plan = Plan()
        heads: dict[str, dict[str, SpanRecord]] = {}
        current: set[str] = set()  # keys of this request's records, whose refusal it is told of
        touched: dict[str, None] = {}
        for record in records:
            if record.role == "episode":
                if (record.trace, record.span) not in self._closed:  # else sent again: it went out already
                    heads.setdefault(record.trace, {})[record.span] = record
                    current.add(record.key)
                touched[record.trace] = None
                continue
            spans = self._traces.setdefault(record.trace, {})
            if record.span not in spans:
                spans[record.span] = record
                self._waiting += 1
            current.add(record.key)
            touched[record.trace] = None
        for trace in touched:
            self._resolve(plan, trace, heads.get(trace, {}), now, current)
        while self._waiting > self.max_waiting and self._traces:
            oldest = next(iter(self._traces))  # dicts keep arrival order: the first trace waited longest
            self._expire_trace(plan, oldest, now, current, everything=True)
        plan.journal = [
            r for trace in touched for r in self._traces.get(trace, {}).values() if r.key not in self._journaled
        ]
        return plan

    def expire(self, now: float) -> Plan:
        """Send out the steps that waited ``timeout``; forget episodes that went out that long ago."""
        plan = Plan()
        cutoff = now - self.timeout
        for trace in list(self._traces):
            spans = self._traces[trace]
            if any(r.role == "step" and r.received <= cutoff for r in spans.values()):
                self._expire_trace(plan, trace, now, set(), everything=False)
            elif not any(r.role == "step" for r in spans.values()):
                self._drop_trace(plan, trace)
        while self._closed:
            key, closed = next(iter(self._closed.items()))
            if closed.at > cutoff and len(self._closed) <= self.max_waiting:
                break
            del self._closed[key]
        return plan

    # ---- after the caller made a plan durable, or could not --------------------------------

    def committed(self, plan: Plan) -> None:
        for record in plan.journal:
            self._journaled.add(record.key)
        for key in plan.done:
            self._journaled.discard(key)
        for record in plan.taken:
            self._inflight.pop(record.key, None)

    def failed(self, plan: Plan) -> None:
        """Undo ``plan``: its records wait again, its episodes are forgotten, as if never decided."""
        for record in plan.taken:
            self._inflight.pop(record.key, None)
            spans = self._traces.setdefault(record.trace, {})
            if record.span not in spans:
                spans[record.span] = record
                self._waiting += 1
        for key in plan.closed:
            self._closed.pop(key, None)
        for key, span in plan.late:
            closed = self._closed.get(key)
            if closed is not None:
                closed.steps.discard(span)

    # ---- inside --------------------------------------------------------------------------

    def _find(self, trace: str, spans: dict[str, SpanRecord], record: SpanRecord, heads: dict[str, SpanRecord]) -> tuple[str, str]:
        """Where ``record`` belongs: ("episode", span) under the nearest invoke_agent span known,
        ("root", span) under a root reached with none, ("missing", span) under a span not seen."""
        parent, last = record.parent, record.span
        for _ in range(MAX_PARENT_HOPS):
            if parent is None:
                return "root", last
            if parent in heads or (trace, parent) in self._closed:
                return "episode", parent
            above = spans.get(parent)
            if above is None:
                return "missing", parent
            last, parent = above.span, above.parent
        return "missing", parent or last  # a chain this long is taken for a loop

    def _groups(self, trace: str, heads: dict[str, SpanRecord]) -> dict[tuple[str, str], list[SpanRecord]]:
        spans = self._traces.get(trace, {})
        groups: dict[tuple[str, str], list[SpanRecord]] = {}
        for record in spans.values():
            if record.role == "step":
                groups.setdefault(self._find(trace, spans, record, heads), []).append(record)
        return groups

    def _resolve(self, plan: Plan, trace: str, heads: dict[str, SpanRecord], now: float, current: set[str]) -> None:
        groups = self._groups(trace, heads)
        for span, head in heads.items():
            self._episode(plan, trace, span, head.agent, groups.pop(("episode", span), []), head, now, current, "invoke_agent")
        for (where, span), steps in groups.items():
            if where == "episode":
                self._late(plan, trace, span, steps, current)
            elif where == "root":
                self._episode(plan, trace, span, self._agent_of(steps), steps, None, now, current, "root")
        if not any(r.role == "step" for r in self._traces.get(trace, {}).values()):
            self._drop_trace(plan, trace)

    def _expire_trace(self, plan: Plan, trace: str, now: float, current: set[str], everything: bool) -> None:
        cutoff = now - self.timeout
        for (where, span), steps in self._groups(trace, {}).items():
            if not everything and not any(s.received <= cutoff for s in steps):
                continue
            if where == "episode":
                self._late(plan, trace, span, steps, current)
            else:
                plan.expired += len(steps)
                self._episode(plan, trace, span, self._agent_of(steps), steps, None, now, current, "root" if where == "root" else "timeout")
        if not any(r.role == "step" for r in self._traces.get(trace, {}).values()):
            self._drop_trace(plan, trace)

    def _drop_trace(self, plan: Plan, trace: str) -> None:
        """A trace with no step waiting: its links are no longer needed."""
        for record in self._traces.pop(trace, {}).values():
            self._waiting -= 1
            self._taken(plan, record)

    def _take(self, plan: Plan, record: SpanRecord) -> None:
        """``record`` stops waiting (for good once ``plan`` is committed)."""
        if self._traces.get(record.trace, {}).pop(record.span, None) is not None:
            self._waiting -= 1
        self._taken(plan, record)

    def _taken(self, plan: Plan, record: SpanRecord) -> None:
        plan.taken.append(record)
        plan.done.append(record.key)
        self._inflight[record.key] = record

    def _agent_of(self, steps: list[SpanRecord]) -> str | None:
        ordered = sorted(steps, key=_order)
        for step in ordered:
            if step.agent:
                return step.agent
        if self.rules.cfg.missing_agent == "service":
            for step in ordered:
                if step.service:
                    return step.service
        return None

    def _refuse(self, plan: Plan, episode: str, steps: list[SpanRecord], current: set[str], why: str) -> None:
        for step in steps:
            self._take(plan, step)
            if step.key in current:
                plan.rejected.append(f"span {step.trace}/{step.span}: a step of episode {episode}, {why}")
        if steps:
            plan.refused += len(steps)
            plan.dead.append(f"episode {episode}: {len(steps)} steps refused: {why}")

    def _episode(
        self,
        plan: Plan,
        trace: str,
        span: str,
        agent: str | None,
        steps: list[SpanRecord],
        head: SpanRecord | None,
        now: float,
        current: set[str],
        closed_by: str,
    ) -> None:
        episode = trace + span
        steps = sorted(steps, key=_order)
        self._closed[(trace, span)] = _Closed(agent, len(steps), head.attrs if head else {}, {s.span for s in steps}, now)
        self._closed.move_to_end((trace, span))
        plan.closed.append((trace, span))
        if agent is None:
            self._refuse(plan, episode, steps, current, "no agent names it (gen_ai.agent.name; traces.missing_agent)")
            return
        rules = self.rules
        base = head.attrs if head is not None else {}
        own = [self._reward(rules.step_reward, _step_variables(s), plan) for s in steps]
        if head is not None:
            outcome = _episode_variables(head, steps)
            end = head.end
        else:
            outcome = _orphan_variables(steps)
            end = max(s.end for s in steps)
        episode_reward = self._reward(rules.reward, outcome, plan)
        for index, (step, reward) in enumerate(zip(steps, own)):
            self._take(plan, step)
            last = index == len(steps) - 1
            if last and not abs(reward + episode_reward) <= MAX_REWARD:  # two huge rewards adding up past it, say
                plan.reward_errors += 1
                episode_reward = reward = 0.0
            plan.events.append(
                Step(
                    agent=agent,
                    episode=episode,
                    index=index,
                    observation=self._observation(base, step),
                    action=step.action or "",
                    reward=reward + episode_reward if last else reward,
                    done=last,
                    id=trace + step.span,
                    ts=step.start,
                )
            )
            plan.events.append(_step_event(agent, episode, index, step, reward))
        plan.events.append(
            Event(
                agent=agent,
                kind=EPISODE_KIND,
                id=episode,
                ts=end,
                data={
                    "episode": episode,
                    "trace_id": trace,
                    "span_id": span,
                    "closed_by": closed_by,  # invoke_agent, root or timeout
                    "success": bool(outcome["success"]),
                    "error_type": head.error_type if head is not None else None,
                    "seconds": outcome["seconds"],
                    **{k: int(outcome[k]) for k in ("input_tokens", "output_tokens", "tokens", "steps", "failed_steps")},
                    "score": outcome["score"] if outcome["scored"] else None,
                    "reward": episode_reward,
                },
            )
        )
        # the episode's end as an agent would send it (episode_end): decisions its agent made with
        # this episode id (trace id + invoke_agent span id) are credited with its return
        plan.events.append(
            Event(agent=agent, kind=EPISODE_END_KIND, id=episode + ":end", ts=end, data={"episode": episode, "reward": episode_reward})
        )
        plan.steps += len(steps)
        plan.episodes += 1

    def _late(self, plan: Plan, trace: str, span: str, steps: list[SpanRecord], current: set[str]) -> None:
        closed = self._closed[(trace, span)]
        episode = trace + span
        fresh = []
        for step in sorted(steps, key=_order):
            if step.span in closed.steps:
                self._take(plan, step)  # sent again: it went out with its episode
            else:
                fresh.append(step)
        if closed.agent is None:
            self._refuse(plan, episode, fresh, current, "its episode has no agent (gen_ai.agent.name; traces.missing_agent)")
            return
        for step in fresh:
            self._take(plan, step)
            index = closed.next_index
            closed.next_index += 1
            closed.steps.add(step.span)
            plan.late.append(((trace, span), step.span))
            reward = self._reward(self.rules.step_reward, _step_variables(step), plan)
            plan.events.append(
                Step(
                    agent=closed.agent,
                    episode=episode,
                    index=index,
                    observation=self._observation(closed.attrs, step),
                    action=step.action or "",
                    reward=reward,
                    id=trace + step.span,
                    ts=step.start,
                )
            )
            plan.events.append(_step_event(closed.agent, episode, index, step, reward))
            plan.steps += 1
            plan.late_steps += 1

    def _observation(self, base: dict[str, Any], step: SpanRecord) -> dict[str, Any]:
        """The step's attributes over its episode's; the action's own attribute from neither (the
        episode's span may name the model a chat step chose)."""
        key = self.rules.steps.get(step.operation or "")
        if key is not None:
            base = without(base, key)
        return merge(base, step.attrs)

    def _reward(self, expression: Expression, values: dict[str, float], plan: Plan) -> float:
        """The expression's value; 0 when it has none here (a division by zero, say), logged once per message."""
        try:
            value = expression(values)
            if abs(value) > MAX_REWARD:  # a step or outcome would refuse it
                raise ValueError(f"{value:g} is beyond ±{MAX_REWARD:g}")
            return value
        except ValueError as exc:
            plan.reward_errors += 1
            if self._reward_error_logged != str(exc):
                self._reward_error_logged = str(exc)
                _log.warning("a reward expression has no value for a span; 0 is stored", error=str(exc))
            return 0.0


def _order(record: SpanRecord) -> tuple[float, str]:
    return record.start, record.span


def _step_variables(step: SpanRecord) -> dict[str, float]:
    inp, out = step.input_tokens or 0, step.output_tokens or 0
    return variables(
        success=step.success, error=not step.success, seconds=step.seconds, input_tokens=inp, output_tokens=out,
        tokens=inp + out, score=step.score or 0.0, scored=step.score is not None, steps=1, failed_steps=not step.success,
    )


def _episode_variables(head: SpanRecord, steps: list[SpanRecord]) -> dict[str, float]:
    # an invoke_agent span reporting no usage of its own costs what its steps used
    inp = head.input_tokens if head.input_tokens is not None else sum(s.input_tokens or 0 for s in steps)
    out = head.output_tokens if head.output_tokens is not None else sum(s.output_tokens or 0 for s in steps)
    failed = sum(not s.success for s in steps)
    return variables(
        success=head.success, error=not head.success, seconds=head.seconds, input_tokens=inp, output_tokens=out,
        tokens=inp + out, score=head.score or 0.0, scored=head.score is not None, steps=len(steps), failed_steps=failed,
    )


def _orphan_variables(steps: list[SpanRecord]) -> dict[str, float]:
    # no span of its own to judge it by: it succeeded if its steps did, and lasted as long as they did
    inp = sum(s.input_tokens or 0 for s in steps)
    out = sum(s.output_tokens or 0 for s in steps)
    failed = sum(not s.success for s in steps)
    scores = [s.score for s in steps if s.score is not None]
    return variables(
        success=not failed, error=bool(failed), seconds=max(s.end for s in steps) - min(s.start for s in steps),
        input_tokens=inp, output_tokens=out, tokens=inp + out, score=scores[-1] if scores else 0.0,
        scored=bool(scores), steps=len(steps), failed_steps=failed,
    )


def _step_event(agent: str, episode: str, index: int, step: SpanRecord, reward: float) -> Event:
    inp, out = step.input_tokens or 0, step.output_tokens or 0
    return Event(
        agent=agent,
        kind=STEP_KIND,
        id=step.trace + step.span,
        ts=step.end,
        data={
            "episode": episode,
            "index": index,
            "operation": step.operation,
            "action": step.action,
            "success": step.success,
            "error_type": step.error_type,
            "seconds": step.seconds,
            "input_tokens": inp,
            "output_tokens": out,
            "tokens": inp + out,
            "score": step.score,
            "reward": reward,
        },
    )
