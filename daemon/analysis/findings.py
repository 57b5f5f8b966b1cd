"""What an extraction finds, and what the daemon hands it: plain msgspec Structs, no numbers code.

The daemon reads these (``reflexd.analysis.result``) without numpy or scikit-learn, stores them
with the window they came from, and serves them over the socket; so every field is JSON-ready
(times are Unix seconds, intervals are ``[low, high]`` lists) and unknown fields are refused.

A rule's life: ``candidate`` (found on one window, not yet checked on a later one) →
``published`` (held on a later window it was not found on) → ``retired`` (a later check, with
enough decisions to tell, found it no longer holds; ``retired_why`` says how). Candidates that a
check with enough decisions refutes are dropped, not retired: they were never published.
"""

from __future__ import annotations

from typing import Literal

import msgspec

ConditionOp = Literal["==", "!=", "in", "not in", "<=", ">"]
RuleStatus = Literal["published", "candidate", "retired"]
AnomalyKind = Literal[
    "reward_change",  # a change point in an agent's reward, or in an action's reward given the context
    "dead_letter_burst",
    "error_burst",
    "context_drift",  # a feature distributed differently from the live model's training window
    "exploration",  # propensities or effective sample size too low to keep learning honestly
    "below_gate",  # a live model earning less than the gate predicted
    "unusual_trajectory",  # an episode that loops, repeats a failing call, or the behaviour model finds unlikely
]
Direction = Literal["improving", "declining", "flat"]


class _Finding(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class Condition(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One test on a raw context feature (dotted path for nested keys).

    ``==``/``!=`` take one categorical value (booleans read as ``"true"``/``"false"``), ``in``/
    ``not in`` a list of them, ``<=``/``>`` a number. A condition holds only where the context has
    the feature: a decision without it matches no condition on it.
    """

    feature: str
    op: ConditionOp
    value: float | str | list[str]


class Rule(_Finding, kw_only=True):
    """"When ``when``, ``action`` earns ``lift`` more than ``baseline``" (negative: less).

    ``lift``, ``ci``, ``support`` and ``ess`` are the newest check's, on decisions the rule was not found
    on (for a candidate never checked yet: the finding window's, marked by ``confirmed_window``
    None). ``check_confidence`` is the level that check's interval was tested at (Bonferroni over
    the run's checks); ``ci`` is at the run's ``confidence`` for reading.
    """

    id: str  # stable: a hash of agent, action, baseline and conditions
    agent: str
    action: str
    baseline: str  # the action it is compared with
    when: list[Condition]
    lift: float
    ci: list[float]
    support: int
    status: RuleStatus
    text: str  # the rule as one sentence, for people and prompts
    first_seen: float  # when a run first found it
    last_confirmed: float | None = None  # when a run last saw it hold
    retired_at: float | None = None
    retired_why: str | None = None
    found_window: list[float]  # [start, end] received_at of the decisions it was (last) found on
    found_lift: float
    found_ci: list[float]
    found_support: int
    confirmed_window: list[float] | None = None  # [start, end] of the decisions of the last check that held
    check_confidence: float | None = None
    checked_until: float  # received_at of the newest decision any check used: the next one starts after it
    # effective decisions behind ``lift`` (Kish, of the smaller of the two actions' importance
    # weights in the segment); None in findings stored before it was kept
    ess: float | None = None


class Pattern(_Finding, kw_only=True):
    """What ``action`` earns in one segment of the context (``when`` empty: everywhere), by DR.

    The segment was found on ``found_window``; its value is estimated on ``window``, later
    decisions, so it is not flattered by having been chosen.
    """

    agent: str
    action: str
    when: list[Condition]
    value: float
    ci: list[float]
    support: int
    window: list[float]
    found_window: list[float]
    ess: float | None = None  # effective decisions behind ``value`` (Kish, of the action's importance weights)


class Anomaly(_Finding, kw_only=True):
    kind: AnomalyKind
    agent: str | None = None
    action: str | None = None
    feature: str | None = None
    model_version: str | None = None
    at: float  # when it began (a change point's estimated start; a burst's first bin)
    detected_at: float | None = None  # when the detector fired (change points)
    size: float  # in the kind's units: reward for changes, PSI for drift, events for bursts
    summary: str  # one sentence
    evidence: dict[str, float | str | bool | None | list[float | str]]
    # chance of such an alarm on data without the anomaly: per 100,000 decisions of a stream for
    # change points, per run for bursts and drift; None for threshold checks (exploration)
    false_alarm_rate: float | None = None


class TrendPoint(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    start: float
    end: float
    value: float
    ci: list[float]
    count: int


class Trend(_Finding, kw_only=True):
    """One series over time windows: an agent's reward as earned (``action`` and ``model_version``
    None), what always taking ``action`` would earn (DR), or a model version's reward as earned.

    ``value``/``ci``/``count`` are the newest window's. ``direction`` compares the newest window
    with the first (their difference's interval, ``change_ci``, excludes zero; taken at the
    Bonferroni level over the agent's series), and ``since`` is the start of the earliest window
    from which every window differs from the first that way.
    """

    agent: str
    action: str | None = None
    model_version: str | None = None
    metric: Literal["reward", "dr_value"]
    start: float
    end: float
    value: float
    ci: list[float]
    count: int
    direction: Direction
    since: float | None = None
    change: float  # newest window minus first
    change_ci: list[float]
    points: list[TrendPoint]


class Counts(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    rules_published: int
    rules_candidate: int
    rules_retired: int
    patterns: int
    anomalies: int
    trends: int


class Insights(_Finding, kw_only=True):
    generated_at: float
    window: list[float]  # [start, end] received_at of the snapshot's decisions
    find_window: list[float]  # the older part, where segments and rules are found
    check_window: list[float]  # the newer part, where they are checked and patterns estimated
    rows: int  # decisions analysed
    dropped: int  # rows left out (unusable fields, slots after a slate's first)
    agents: list[str]
    reward_model: str  # "live <version>" or "cross_fit"
    confidence: float
    rule_checks: int  # rule checks this run: the Bonferroni divisor of false_rule_rate
    rules: list[Rule]
    patterns: list[Pattern]
    anomalies: list[Anomaly]
    trends: list[Trend]
    counts: Counts
    notes: list[str]  # what could not be examined and why
    seconds: float


class ModelRecord(_Finding, kw_only=True):
    """One model version's live period and what the gate predicted it would earn."""

    version: str
    live_from: float
    live_until: float | None = None  # None: still live
    agent: str | None = None  # None: serves every agent
    predicted: float | None = None  # the gate's estimate of its value
    predicted_low: float | None = None
    predicted_high: float | None = None


class ExtractionInputs(_Finding, kw_only=True):
    """What the daemon hands the extraction besides the snapshot (``--inputs`` JSON)."""

    now: float
    rules: list[Rule] = []  # the previous run's, for their history
    models: list[ModelRecord] = []
    # [start, end] received_at of the live model's training snapshot, per agent ("" for a model
    # serving every agent): context drift compares newer traffic with it
    training_windows: dict[str, list[float]] = {}
    dead_letters: list[float] = []  # received_at of dead letters
    errors: dict[str, list[float]] = {}  # agent → received_at of its error events
