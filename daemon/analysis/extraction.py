"""``extract``: a snapshot of matured decisions in, patterns, rules, anomalies and trends out.

Agent by agent: pseudo-outcomes (``outcomes``), patterns and candidate rules on the find window
(``rules``), checks of every rule on decisions it was not found on, change points, exploration
health and context drift (``anomalies``), trends (``trends``); then the run's rule checks are
decided together (Bonferroni over all of them) and bursts of dead letters and errors, and models
below their gate's prediction, are looked for over the whole window.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from reflexd.analysis import anomalies, experience, rules, trends
from reflexd.analysis.experience import Experience
from reflexd.analysis.findings import Anomaly, Counts, ExtractionInputs, Insights, Pattern, Trend
from reflexd.analysis.outcomes import agent_outcomes, covered
from reflexd.config import InsightsConfig

if TYPE_CHECKING:
    from reflexd.deciding.scoring import Scorer


DEFAULTS = InsightsConfig()


def extract(
    table: pa.Table,
    inputs: ExtractionInputs,
    settings: InsightsConfig = DEFAULTS,
    scorer: Scorer | None = None,
    seed: int = 0,
) -> Insights:
    """Everything a snapshot (``rewards.snapshot``'s columns) teaches, given the daemon's ``inputs``.

    ``scorer`` is the live model: with ``reward_model: auto`` its scores are the reward model of
    the pseudo-outcomes; without it (or with ``cross_fit``) one is cross-fitted here.
    """
    live = scorer if settings.reward_model == "auto" else None
    exp = experience.from_table(table, live)
    return analyse(exp, inputs, settings, None if live is None else live.version, seed)


def analyse(
    exp: Experience, inputs: ExtractionInputs, settings: InsightsConfig, live_version: str | None = None, seed: int = 0
) -> Insights:
    """``extract`` on decisions already loaded (``experience.from_parquet`` streams a file into them);
    ``live_version`` names the model whose scores ``exp.live_scores`` holds, if any."""
    started = time.perf_counter()
    notes = list(exp.notes)
    t = np.sort(exp.received_at)  # every agent's decisions, in time order
    if len(exp):
        span = [float(t[0]), float(t[-1])]
    else:
        span = [inputs.now, inputs.now]
        notes.append("the snapshot holds no usable decisions")
    split = rules.split_time(t, settings.find_fraction)
    if len(exp) > 1 and span[1] <= split.cut:
        notes.append(
            f"all {len(exp)} decisions were received at one time (one import of a log, say): insights time decisions by"
            " when the daemon received them, so no rule could be checked on later decisions, and trends and anomalies"
            " have no time to run over"
        )
    elif exp.made is not None and len(exp) > 1 and _received(t) * 100 < exp.made[1] - exp.made[0]:
        notes.append(
            f"the {len(exp)} decisions were received within {_duration(_received(t))} but made over"
            f" {_duration(exp.made[1] - exp.made[0])} by their own timestamps (one import of a log, say): insights"
            " time decisions by when the daemon received them, so the times of anomalies and trends here are the"
            " import's, and the check window holds what was received last, not what happened last"
        )
    del t
    spans = trends.windows(span[0], span[1], settings.trend_windows)
    book = rules.RuleBook(inputs.rules, inputs.now, settings)
    baselines = rules.previous_baselines(inputs.rules)
    live = live_version is not None and exp.live_scores is not None
    found_patterns: list[Pattern] = []
    found_anomalies: list[Anomaly] = []
    found_trends: list[Trend] = []
    for index, agent in enumerate(exp.agents):
        rows = exp.rows_of(index)
        if rows.stop == rows.start:
            continue
        data = agent_outcomes(exp, index, live, seed)
        uncovered = [action for a, action in enumerate(data.actions) if not covered(data, np.flatnonzero(data.available[:, a]), a)]
        if uncovered:
            notes.append(
                f"{agent}: the log tried {', '.join(uncovered)} too rarely, or never, in part of the decisions that offered"
                " them (the importance weights do not average 1), so what they would earn is estimated only in segments"
                " where it tried them enough, and they have no trends or changes"
            )
        if data.left_out:
            notes.append(f"{agent}: only the {len(data.actions)} most chosen actions were analysed; not {', '.join(data.left_out)}")
        book.add_found(rules.find_rules(data, split, settings, baselines.get(agent), seed))
        book.gather(data)
        found_patterns += rules.patterns(data, split, settings, seed)
        found_anomalies += anomalies.reward_changes(data, settings, inputs.models)
        found_anomalies += anomalies.exploration(data, spans, settings)
        window = inputs.training_windows.get(agent) or inputs.training_windows.get("")
        if window is None:
            notes.append(f"context drift for {agent}: no training window of a live model was given")
        else:
            drifted, note = anomalies.drift(data.exp, agent, window, settings)
            found_anomalies += drifted
            if note:
                notes.append(note)
        found_trends += trends.trends(data, spans, settings)
        del data  # one agent's pseudo-outcomes at a time
    found_rules, checks = book.decide()
    start, end = (span[0], max(span[1], inputs.now)) if len(exp) else (_earliest(inputs), inputs.now)
    found_anomalies += anomalies.bursts(
        np.asarray(inputs.dead_letters), start, end, settings, kind="dead_letter_burst", agent=None
    )
    for agent, times in sorted(inputs.errors.items()):
        found_anomalies += anomalies.bursts(np.asarray(times), start, end, settings, kind="error_burst", agent=agent or None)
    found_anomalies += anomalies.below_gate(exp, inputs.models, settings)
    found_anomalies.sort(key=lambda a: (-a.at, a.kind))
    return Insights(
        generated_at=inputs.now,
        window=span,
        find_window=split.find,
        check_window=split.check,
        rows=len(exp),
        dropped=exp.dropped,
        agents=[a for i, a in enumerate(exp.agents) if exp.rows_of(i).stop > exp.rows_of(i).start],
        reward_model=f"live {live_version}" if live else "cross_fit",
        confidence=settings.confidence,
        rule_checks=checks,
        rules=found_rules,
        patterns=found_patterns,
        anomalies=found_anomalies,
        trends=found_trends,
        counts=Counts(
            rules_published=sum(r.status == "published" for r in found_rules),
            rules_candidate=sum(r.status == "candidate" for r in found_rules),
            rules_retired=sum(r.status == "retired" for r in found_rules),
            patterns=len(found_patterns),
            anomalies=len(found_anomalies),
            trends=len(found_trends),
        ),
        notes=notes,
        seconds=time.perf_counter() - started,
    )


def _received(t: np.ndarray) -> float:
    """The span of receipt times ``t`` (sorted) from their 1st to 99th percentile, as
    ``Experience.made`` spans the decisions' own."""
    lo, hi = np.percentile(t, [1.0, 99.0])
    return float(hi - lo)


def _duration(seconds: float) -> str:
    """``3.2 s``, ``45 min``, ``6.5 h``, ``12 days``."""
    unit, size = next(((u, z) for u, z in (("days", 86400.0), ("h", 3600.0), ("min", 60.0)) if seconds >= z), ("s", 1.0))
    value = seconds / size
    return f"{value:.0f} {unit}" if value >= 10 else f"{value:.1f} {unit}"


def _earliest(inputs: ExtractionInputs) -> float:
    times = list(inputs.dead_letters) + [x for v in inputs.errors.values() for x in v]
    return min(times, default=inputs.now)
