"""The one YAML file an operator edits, decoded into frozen msgspec Structs.

Unknown keys are rejected and every error names the key path (``socket.max_frame_bytes``).
Per-agent overrides are merged onto the global section before decoding, so an override is
checked exactly like the section it overrides.
"""

from __future__ import annotations

import grp
import ipaddress
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec
import yaml

from reflexd.errors import ConfigError
from reflexd.extensions import EXPLORATION, LEARNERS, available
from reflexd.features import FeatureSpec
from reflexd.split import holdout_rows, holdout_run_rows

DEFAULT_PATH = "/etc/reflexd/reflexd.yaml"

Positive = Annotated[int, msgspec.Meta(gt=0)]
Count = Annotated[int, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Probability = Annotated[float, msgspec.Meta(ge=0, le=1)]
OctalMode = Annotated[str, msgspec.Meta(pattern=r"^0?[0-7]{3,4}$")]
ModeBits = Annotated[int, msgspec.Meta(ge=0, le=0o7777)]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class SocketConfig(_Section):
    path: str = "/run/reflexd/reflexd.sock"
    mode: OctalMode | ModeBits = "0660"  # YAML reads an unquoted 0660 as the octal int it is
    group: str | int | None = None
    allowed_uids: list[int] = []
    allowed_gids: list[int] = []
    # administrative requests (adopt, promote, rollback, forget): root, the daemon's own uid, these
    # uids and members of these gids (reflexd.service.server.ADMIN_REQUESTS)
    admin_uids: list[int] = []
    admin_gids: list[int] = []
    # a frame is held whole while it is decoded, so a cap is a memory bound too: at most 1 GiB
    max_frame_bytes: Annotated[int, msgspec.Meta(gt=0, le=1 << 30)] = 1 << 20
    max_connections: Positive = 256
    reserved_connections: Count = 4  # beyond max_connections, for root and the daemon's own user
    frame_timeout: PositiveFloat = 30.0
    idle_timeout: PositiveFloat = 600.0  # a connection silent this long between frames is closed
    request_timeout: PositiveFloat = 120.0  # bound on a request waiting on the store (flush, train, forget)

    @property
    def mode_bits(self) -> int:
        return self.mode if isinstance(self.mode, int) else int(self.mode, 8)


class IngestConfig(_Section):
    batch_size: Positive = 10_000
    flush_interval: PositiveFloat = 0.05
    queue_size: Positive = 100_000
    spool_bytes: Positive = 256 << 20
    segment_bytes: Positive = 16 << 20
    dead_letter_bytes: Positive = 4096


class RewardConfig(_Section):
    wait_window: NonNegative = 30.0
    default: float = 0.0
    aggregation: Literal["sum", "first", "last", "mean", "min", "max"] = "sum"
    # credit a decision that names an episode with the discounted return from it to the episode's
    # end (its own reward, then each later decision's, then the end's final reward) instead of its own
    episode_return: bool = False
    discount: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0  # γ of that return
    # seconds after an episode's last decision without an end: it ends then, with `default` as its final reward
    episode_timeout: PositiveFloat = 3600.0


class RetentionConfig(_Section):
    days: PositiveFloat = 30.0
    compression: Literal["zstd", "snappy", "gzip", "uncompressed"] = "zstd"
    check_interval: PositiveFloat = 3600.0
    # pruning the archive after each pass, whole days oldest first (reflexd.service.store.retention):
    # days whose rows are all older than this; None keeps them (must exceed `days`)
    archive_max_days: PositiveFloat | None = None
    # the archive's size in MiB; past it the oldest days go; None: no limit
    archive_max_mb: Positive | None = None


class StoreConfig(_Section):
    # DuckDB's memory: the indexes on event ids (resident, ~70 bytes per stored event), spool loads
    # and training snapshots (~250 MiB at trainer.max_examples), and cached table blocks (the rest)
    memory_limit_mb: Annotated[int, msgspec.Meta(ge=64)] = 512
    threads: Positive = 2
    # seconds a loaded spool segment waits for a CHECKPOINT (into the database file) before it is deleted
    checkpoint_interval: PositiveFloat = 10.0


class FeatureConfig(_Section):
    context_dim: Positive = 128
    action_dim: Positive = 32
    seed: Annotated[int, msgspec.Meta(ge=0, lt=2**32)] = 0


class TrainerConfig(_Section):
    learner: str = "mlp"
    min_new_examples: Positive = 1000
    # while experience is scarce, a run is also due once it has grown by this fraction (see
    # reflexd.learning.runs.due_after); 0 leaves min_new_examples alone in charge
    growth: NonNegative = 0.25
    check_interval: PositiveFloat = 5.0
    idle_load: PositiveFloat = 0.8
    # the load average alone must not stall learning on a busy host (the trainer's idle priority is
    # what protects the agents): a due run waits at most this many seconds for idle CPU; 0: forever
    max_idle_wait: NonNegative = 900.0
    max_threads: Positive = 1
    max_wall_time: PositiveFloat = 600.0
    max_examples: Positive = 200_000
    holdout_fraction: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.2
    # runs on too few experiences to hold any out (13 with the defaults) start at this many (at
    # least gate.first_min_holdout): each row is scored by the learner fit on the others, and the
    # gate judges those scores (see reflexd.split); 0 waits for a holdout run
    cross_fit_from: Annotated[int, msgspec.Meta(ge=0)] = 6
    # a candidate the gate passes from a snapshot of fewer rows goes live refit on every row, its
    # holdout included (see reflexd.trainer); 0 always deploys the gated candidate itself (and a
    # cross-fitted run the learner fit on every row, as ever)
    refit_below: Annotated[int, msgspec.Meta(ge=0)] = 50_000
    epochs: Positive = 5
    min_steps: Positive = 1000
    learning_rate: PositiveFloat = 0.003
    batch_size: Positive = 256
    hidden_size: Positive = 64
    ensemble: Annotated[int, msgspec.Meta(ge=1, le=32)] = 4
    # learner: transformer (reflexd.plugins.learners.transformer); transformer_dim must be a
    # multiple of transformer_heads
    transformer_dim: Annotated[int, msgspec.Meta(ge=1, le=512)] = 32
    transformer_layers: Annotated[int, msgspec.Meta(ge=1, le=8)] = 2
    transformer_heads: Annotated[int, msgspec.Meta(ge=1, le=16)] = 4
    retry_backoff: PositiveFloat = 30.0
    # address space (RLIMIT_AS) of the trainer subprocess; torch alone maps ~2.3 GB of it
    max_memory_mb: Positive = 4096


class ExplorationConfig(_Section):
    strategy: str = "squarecb"  # a name in the reflexd.exploration entry-point group
    epsilon: Probability = 0.1
    epsilon_min: Probability = 0.01
    decay: NonNegative = 0.0
    temperature: PositiveFloat = 0.1
    ucb_c: NonNegative = 1.0
    gamma: PositiveFloat = 10.0
    gamma_exponent: NonNegative = 0.5
    default_action: str | None = None


class OnlineConfig(_Section):
    # a Bayesian linear head every reward updates at once, between batch models (see
    # reflexd.deciding.online): the policy before any model, a correction beside a live one
    enabled: bool = True
    prior: PositiveFloat = 1.0  # ridge penalty: larger keeps the head nearer the agent's mean reward for longer
    # the ridge penalty beside a live model (the head starts afresh with each one), on every input,
    # the model's score among them: how far to trust the scores is learned, from a prior weight of 0
    model_prior: PositiveFloat = 1.0
    # with each new live model (or none) the head starts afresh and first relearns this many of the
    # newest rewards of this process's own decisions beside the new model's scores, so that it does
    # not serve the model uncorrected while it learns again; 0: start empty
    warm_rows: Count = 1000
    # (agent, action) regressions kept, up to ~310 KiB each on wide contexts; least recent dropped
    max_arms: Positive = 256
    pending: Positive = 10_000  # decisions remembered until their reward comes


class LearningConfig(_Section):
    # which agents learn together (reflexd.lines): each scope is a model line of its own in the
    # registry, with its own gate, rollback monitor, online head and training runs
    scope: Literal["agent", "group", "shared"] = "agent"
    # scope group: group name -> its agents; an agent in no group learns alone
    groups: dict[
        Annotated[str, msgspec.Meta(min_length=1, max_length=256)],  # "" would be the folder of every group
        list[Annotated[str, msgspec.Meta(min_length=1, max_length=256)]],
    ] = {}


class GateConfig(_Section):
    estimator: Literal["ips", "snips", "dr"] = "dr"
    confidence: Annotated[float, msgspec.Meta(gt=0.5, lt=1)] = 0.95
    margin: NonNegative = 0.02
    min_holdout: Positive = 3
    # on fewer holdout rows a replacement's interval is too wide to decide anything (and its normal
    # approximation too rough to trust), so its point estimate decides; 0: the interval always does
    point_estimate_below: Annotated[int, msgspec.Meta(ge=0)] = 10
    # a first model (no incumbent) is compared with the logging policy on a gentler rule: the
    # downside is bounded (exploration goes on, and a later run's gate judges it as an incumbent,
    # or replaces it by a cross-fitted run's rule) while every decision made without a model is
    # spent at the logging policy's value
    first_min_holdout: Positive = 3
    first_confidence: Annotated[float, msgspec.Meta(gt=0.5, lt=1)] = 0.8
    parity_tolerance: PositiveFloat = 1e-5
    # automatic rollback (reflexd.service.monitor): live reward of the current model against its predecessor's
    auto_rollback: bool = True
    rollback_check_interval: PositiveFloat = 60.0
    rollback_min_decisions: Annotated[int, msgspec.Meta(ge=2)] = 500
    rollback_margin: NonNegative = 0.0


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


MIN_KEY_BYTES = 16


class RedactionConfig(_Section):
    """Fields removed (``drop``) or replaced by a keyed hash (``hash``) before anything is stored.

    Holds data only: the key is read from ``key_file`` (``read_key``) by whoever compiles the rules,
    so neither the key nor the compiled rules travel with the config (the trainer's copy included).
    ``parse_config`` makes a relative ``key_file`` relative to the config file's folder.
    """

    drop: list[str] = []
    hash: list[str] = []
    key_file: str | None = None
    dead_letter_raw: bool = True


class MetricsConfig(_Section):
    """The HTTP endpoint for Prometheus and health checks (``reflexd.service.http``); off by default."""

    path: str | None = None  # a Unix socket, checked like socket.path's directory; mode 0660
    host: str = "127.0.0.1"  # loopback only: the config check refuses any other address
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] | None = None
    timeout: PositiveFloat = 10.0  # longest one HTTP exchange may take


class TracesConfig(_Section):
    """The OTLP/HTTP trace receiver (``reflexd.collect``): OpenTelemetry GenAI spans in as steps; off by default.

    Which attributes become a step's observation, the reward expressions and the step operations
    are checked by ``reflexd.collect.spans.problems`` (the kernel reads no room); this section's own
    checks are the listeners'.
    """

    enabled: bool = False
    path: str = "/run/reflexd/traces.sock"  # a Unix socket of its own, mode 0660, peers checked as on socket.path
    host: str = "127.0.0.1"  # loopback only: the config check refuses any other address
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None  # 0: a free port the kernel picks
    max_body_bytes: Positive = 16 << 20  # a request's body as sent, and again once decompressed
    timeout: PositiveFloat = 30.0  # longest reading one request may take (and a kept-alive connection idle)
    # span (and resource) attributes a step's observation may hold: exact keys or prefixes ending in "*"
    attributes: list[str] = msgspec.field(
        default_factory=lambda: [
            "gen_ai.operation.name",
            "gen_ai.provider.name",
            "gen_ai.request.model",
            "gen_ai.request.temperature",
            "gen_ai.request.top_p",
            "gen_ai.request.max_tokens",
            "gen_ai.tool.type",
            "gen_ai.output.type",
        ]
    )
    capture_content: bool = False  # keep message content and every other attribute, redacted
    # operation name -> the attribute naming the action a step of that operation took
    steps: dict[str, str] = msgspec.field(
        default_factory=lambda: {
            "execute_tool": "gen_ai.tool.name",
            "chat": "gen_ai.request.model",
            "generate_content": "gen_ai.request.model",
            "text_completion": "gen_ai.request.model",
        }
    )
    reward: str = "success"  # an episode's reward, credited at its last step
    step_reward: str = "0"  # each step's own reward
    missing_agent: Literal["service", "reject"] = "service"  # an invoke_agent span without gen_ai.agent.name
    episode_timeout: PositiveFloat = 300.0  # steps whose invoke_agent span never comes wait this long
    max_pending_spans: Positive = 100_000  # steps (and the spans linking them) waiting for their episode


class InsightsConfig(_Section):
    """Knowledge extraction (``reflexd.analysis``): patterns, rules, anomalies and trends."""

    enabled: bool = True  # extract on a schedule; `reflexd insights --now` works either way
    interval: PositiveFloat = 3600.0  # seconds between scheduled extractions, with min_new new experiences
    min_new: Positive = 500  # new matured experiences that make a scheduled extraction due
    max_examples: Positive = 1_000_000  # newest matured decisions an extraction reads
    max_wall_time: PositiveFloat = 1800.0  # the extraction subprocess is killed after this many seconds
    keep_runs: Annotated[int, msgspec.Meta(ge=2)] = 20  # extractions kept in the store, to compare

    # two-sided level of every interval reported (rules, patterns, trends, change evidence)
    confidence: Annotated[float, msgspec.Meta(gt=0.5, lt=1)] = 0.95
    # chance per run that any rule check passes for a rule that does not hold: Bonferroni over the run's checks
    false_rule_rate: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.05
    # share of a snapshot's decisions, oldest first, that segments are found on; the rest checks them
    find_fraction: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.5
    min_support: Annotated[int, msgspec.Meta(ge=10)] = 200  # fewest decisions a pattern, rule or check rests on
    max_conditions: Annotated[int, msgspec.Meta(ge=1, le=8)] = 3  # the segment trees' depth
    max_segments: Annotated[int, msgspec.Meta(ge=2, le=64)] = 8  # the segment trees' leaves
    split_z: PositiveFloat = 4.0  # a tree splits only where the halves differ by this many standard errors
    reward_model: Literal["auto", "cross_fit"] = "auto"  # auto: the live model when the run has one
    change_size: PositiveFloat = 0.1  # reward change (reward units) the change detectors are tuned for
    false_alarms_per_100k: PositiveFloat = 1.0  # change detectors' false alarms per 100,000 decisions of a stream
    drift_psi: PositiveFloat = 0.1  # population stability index from which a feature's drift is reported
    min_propensity: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.01
    trend_windows: Annotated[int, msgspec.Meta(ge=2, le=100)] = 8
    burst_seconds: PositiveFloat = 300.0  # bin of the dead-letter and error burst counts
    keep_days: PositiveFloat = 30.0  # retired rules and unconfirmed candidates are forgotten after this
    max_memory_mb: Positive = 4096  # the extraction subprocess's address-space cap, as trainer.max_memory_mb


class BehaviourConfig(_Section):
    """The behaviour model (``reflexd.trainer.behaviour``): an LSTM over each agent's steps that
    predicts its next action and its episode's success. The trainer reads every key; the daemon
    reads ``enabled``, ``min_new_episodes`` and ``max_wall_time`` to schedule it."""

    enabled: bool = True  # train one once enough episodes have ended (no steps, no run)
    min_new_episodes: Positive = 200  # ended episodes since the last run that make the next one due
    max_wall_time: PositiveFloat = 1800.0  # the training subprocess is killed after this many seconds
    hidden: Positive = 256
    layers: Positive = 3
    dropout: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.1
    embedding: Positive = 16  # the action embedding's width
    head_hidden: Positive = 64  # the decision head's hidden layer
    optimizer: Literal["rmsprop", "adam"] = "rmsprop"
    learning_rate: PositiveFloat = 1e-3
    alpha: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.99  # RMSprop's smoothing constant
    epochs: Positive = 20
    batch_episodes: Positive = 64
    max_steps: Positive = 128  # longer episodes are cut to their first max_steps steps
    max_vocab: Annotated[int, msgspec.Meta(ge=2)] = 256  # the most frequent actions; the rest share index 0
    context_dim: Positive = 128  # the observation's hashed width (reflexd.features)
    feature_seed: int = 0
    holdout_fraction: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.2  # the newest episodes, for calibration
    min_episodes: Positive = 20
    nll_quantile: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.99  # unusual-sequence threshold: this quantile of episodes' mean NLL
    success_weight: Annotated[float, msgspec.Meta(ge=0)] = 1.0  # the success loss's weight beside the next-action loss
    parity_tolerance: PositiveFloat = 1e-5  # as gate.parity_tolerance
    max_threads: Positive = 1
    max_memory_mb: Positive = 4096


class AgentConfig(_Section):
    """The sections an agent may override; anything not given comes from the global section."""

    rewards: RewardConfig = RewardConfig()
    exploration: ExplorationConfig = ExplorationConfig()


class Config(_Section):
    state_dir: str = "/var/lib/reflexd"
    socket: SocketConfig = SocketConfig()
    ingest: IngestConfig = IngestConfig()
    rewards: RewardConfig = RewardConfig()
    retention: RetentionConfig = RetentionConfig()
    store: StoreConfig = StoreConfig()
    features: FeatureConfig = FeatureConfig()
    trainer: TrainerConfig = TrainerConfig()
    exploration: ExplorationConfig = ExplorationConfig()
    online: OnlineConfig = OnlineConfig()
    learning: LearningConfig = LearningConfig()
    gate: GateConfig = GateConfig()
    log: LogConfig = LogConfig()
    redaction: RedactionConfig = RedactionConfig()
    metrics: MetricsConfig = MetricsConfig()
    traces: TracesConfig = TracesConfig()
    insights: InsightsConfig = InsightsConfig()
    behaviour: BehaviourConfig = BehaviourConfig()
    agents: dict[str, AgentConfig] = {}

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def db_path(self) -> Path:
        return self.state_path / "reflexd.duckdb"

    @property
    def models_path(self) -> Path:
        return self.state_path / "models"

    @property
    def archive_path(self) -> Path:
        return self.state_path / "archive"

    def for_agent(self, agent: str) -> AgentConfig:
        found = self.agents.get(agent)
        if found is not None:
            return found
        return AgentConfig(rewards=self.rewards, exploration=self.exploration)


def feature_spec(config: Config) -> FeatureSpec:
    """How models trained under ``config`` hash features: its ``features`` section, and the agent's
    id as a context key wherever a model line may be shared by several agents (``learning.scope``
    ``shared`` or ``group``), so that one model can still tell them apart; under ``group`` an agent
    in no group hashes it too (a constant input), as the host's one spec (``models pull`` checks)."""
    f = config.features
    return FeatureSpec(f.context_dim, f.action_dim, f.seed, agent=config.learning.scope != "agent")


CLIENT_SETTINGS_FILE = "clients.json"  # in the models directory, which agents already read


class ClientSettings(msgspec.Struct, frozen=True):
    """What the daemon's config says to the agents' in-process clients (``reflexd.Policy``): the
    daemon writes it to ``<state_dir>/models/clients.json`` at start and on each reload, so the
    one YAML file governs the clients too. A file a client cannot read (from a newer daemon that
    says more, say) leaves it on its own defaults.
    """

    features: FeatureConfig = FeatureConfig()
    online: OnlineConfig = OnlineConfig()
    rewards: RewardConfig = RewardConfig()
    agent_rewards: dict[str, RewardConfig] = {}
    # how an agent explores before any model is live (a model's manifest says so after): as the
    # daemon's socket decides for it, unless the client was given an exploration of its own
    exploration: ExplorationConfig = ExplorationConfig()
    agent_exploration: dict[str, ExplorationConfig] = {}
    # which model line an agent's client serves from; a file from before model lines (no learning)
    # was written by a daemon serving one registry, the models folder itself
    learning: LearningConfig = LearningConfig(scope="shared")

    def rewards_for(self, agent: str) -> RewardConfig:
        return self.agent_rewards.get(agent, self.rewards)

    def exploration_for(self, agent: str) -> ExplorationConfig:
        return self.agent_exploration.get(agent, self.exploration)


def client_settings(config: Config) -> ClientSettings:
    return ClientSettings(
        features=config.features,
        online=config.online,
        rewards=config.rewards,
        agent_rewards={agent: c.rewards for agent, c in config.agents.items()},
        exploration=config.exploration,
        agent_exploration=agent_exploration(config),
        learning=config.learning,
    )


def read_client_settings(models: Path) -> ClientSettings | None:
    """The settings a daemon published in ``models``, or None if it has published none (or they
    cannot be read: a client then keeps its own defaults rather than fail)."""
    try:
        found = msgspec.json.decode((models / CLIENT_SETTINGS_FILE).read_bytes())
        # settings a newer daemon adds are left out, not a reason to drop every other one
        return msgspec.convert(_known(ClientSettings, found), ClientSettings)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def _known(cls: Any, data: Any) -> Any:
    """``data`` with only the keys the Struct ``cls`` and the Structs in it know (also as a dict's values)."""
    if not isinstance(data, dict):
        return data
    kept = {}
    for field in msgspec.structs.fields(cls):
        if field.encode_name not in data:
            continue
        value, kind = data[field.encode_name], field.type
        if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
            value = _known(kind, value)
        elif get_origin(kind) is dict and isinstance(value, dict):
            inner = get_args(kind)[1]
            if isinstance(inner, type) and issubclass(inner, msgspec.Struct):
                value = {k: _known(inner, v) for k, v in value.items()}
        kept[field.encode_name] = value
    return kept


_PATH_RE = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def _problem(err: msgspec.ValidationError, prefix: str = "", raw: Any = None) -> str:
    m = _PATH_RE.match(str(err))
    assert m is not None
    path = prefix + _keyed(m["path"] or "", raw)
    path = path.lstrip(".").replace("[", ".").replace("]", "").replace("'", "").replace('"', "")
    msg = m["msg"]
    msg = msg[0].lower() + msg[1:] if msg else msg
    if msg.startswith("invalid enum value"):
        allowed = _choices(path)
        if allowed:
            msg += f"; expected one of {', '.join(map(str, allowed))}"
    return f"{path}: {msg}" if path else msg


def _keyed(path: str, raw: Any) -> str:
    """msgspec's ``path`` (``.learning.groups[...][1]``) with each mapping's key it leaves out
    (``[...]``) named: the key of ``raw`` whose value does not convert, found by walking the
    Config's types beside ``raw``; left as it is where it cannot be found."""
    if "[...]" not in path or raw is None:
        return path
    kind: Any = Config
    out = []
    for token in re.findall(r"\.[^.\[]+|\[[^\]]*\]", path):
        while get_origin(kind) is Annotated:
            kind = get_args(kind)[0]
        if token.startswith("."):
            name = token[1:]
            fields = msgspec.structs.fields(kind) if isinstance(kind, type) and issubclass(kind, msgspec.Struct) else ()
            kind = next((f.type for f in fields if f.encode_name == name), None)
            raw = raw.get(name) if isinstance(raw, dict) else None
        elif token == "[...]" and get_origin(kind) is dict and isinstance(raw, dict):
            kind = get_args(kind)[1]
            key = next((k for k, v in raw.items() if not _converts(v, kind)), None)
            if key is None:
                return path
            token, raw = f".{key}", raw[key]
        elif token[1:-1].isdigit() and isinstance(raw, list) and int(token[1:-1]) < len(raw):
            kind = get_args(kind)[0] if get_args(kind) else None
            raw = raw[int(token[1:-1])]
        out.append(token)
    return "".join(out)


def _converts(value: Any, kind: Any) -> bool:
    try:
        msgspec.convert(value, kind, strict=True)
    except msgspec.ValidationError:
        return False
    return True


def _choices(path: str) -> tuple[Any, ...] | None:
    """The values a ``Literal`` setting at ``path`` (``rewards.aggregation``, ``agents.a.rewards...``) may take."""
    kind: Any = Config
    for part in path.split("."):
        if get_origin(kind) is dict:
            kind = get_args(kind)[1]  # ``part`` is a key of the mapping (an agent's id)
            continue
        if not (isinstance(kind, type) and issubclass(kind, msgspec.Struct)):
            return None
        kind = next((f.type for f in msgspec.structs.fields(kind) if f.encode_name == part), None)
    while get_origin(kind) is Annotated:
        kind = get_args(kind)[0]
    return get_args(kind) if get_origin(kind) is Literal else None


def _merge_agents(raw: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """Expand each agent's partial override into full sections built on the global ones."""
    agents = raw.get("agents")
    if agents is None:
        return raw
    if not isinstance(agents, dict):
        problems.append("agents: expected a mapping of agent id to overrides")
        return raw
    merged: dict[str, Any] = {}
    for agent, override in agents.items():
        override = override or {}
        if not isinstance(override, dict):
            problems.append(f"agents.{agent}: expected a mapping")
            continue
        unknown = set(override) - {"rewards", "exploration"}
        if unknown:
            problems.append(f"agents.{agent}: unknown key(s) {sorted(map(str, unknown))}; allowed: rewards, exploration")
            continue
        full: dict[str, Any] = {}
        for section in ("rewards", "exploration"):
            base = raw.get(section) or {}
            extra = override.get(section) or {}
            if not isinstance(base, dict) or not isinstance(extra, dict):
                problems.append(f"agents.{agent}.{section}: expected a mapping")
                continue
            full[section] = {**base, **extra}
        try:
            # decoded one by one because msgspec's error paths do not name mapping keys
            msgspec.convert(full, AgentConfig, strict=True)
        except msgspec.ValidationError as exc:
            problems.append(_problem(exc, prefix=f".agents.{agent}"))
        merged[str(agent)] = full
    return {**raw, "agents": merged}


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last, so a
    second ``socket:`` section appended below the first silently undoes all of the first.

    Each mapping's own pairs are checked once, before ``<<`` merges copy other pairs in (a merged
    mapping's keys may be overridden, as YAML allows; and a mapping another merges is flattened
    before it is built, so it is checked there, as it was written)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._checked: set[int] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        if id(node) not in self._checked:
            self._checked.add(id(node))
            first: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue  # a key that is no scalar: the safe loader's own error says so
                key = self.construct_object(key_node)
                seen = first.setdefault(key, key_node.start_mark)
                if seen is not key_node.start_mark:
                    said = f"{key!r} is given twice (first at line {seen.line + 1}); the second would replace the first"
                    raise yaml.constructor.ConstructorError(None, None, said, key_node.start_mark)
        super().flatten_mapping(node)


def parse_config(text: str | bytes, source: str = "<config>") -> Config:
    """Decode YAML text into a Config, or raise ConfigError naming what is wrong and where.

    Type errors stop at the first one (msgspec validates in one pass); the checks after
    decoding (overrides, semantics) report every problem they find.
    """
    try:
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506 -- a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(source, [f"{where}not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    except RecursionError:
        raise ConfigError(source, ["nested too deeply to be a reflexd config"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, ["the top level must be a mapping of keys"])
    # a section whose keys are all commented out reads as null: it means "all defaults"
    raw = {k: ({} if v is None and k in Config.__struct_fields__ else v) for k, v in raw.items()}
    # global sections first, so their errors are named as global rather than per agent
    sections = {k: v for k, v in raw.items() if k != "agents"}
    try:
        msgspec.convert(sections, Config, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(source, [_problem(exc, raw=sections)]) from None
    problems: list[str] = []
    raw = _merge_agents(raw, problems)
    if problems:
        raise ConfigError(source, problems)
    try:
        config = msgspec.convert(raw, Config, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(source, [_problem(exc)]) from None
    _check_semantics(config, source)
    _check_redaction(config.redaction, source)
    key_file = config.redaction.key_file
    if key_file is not None:  # from here on the config is read without knowing where it came from
        resolved = str(Path(source).parent / os.path.expanduser(key_file))
        config = msgspec.structs.replace(
            config, redaction=msgspec.structs.replace(config.redaction, key_file=resolved)
        )
    return config


# a Unix socket's path fits sun_path's 108 bytes with its terminating NUL (Linux)
_SOCKET_PATH_BYTES = 107


def _check_paths(config: Config) -> list[str]:
    """The places the daemon makes: absolute (under systemd its working directory is /, and YAML
    does not expand ``~``), and a socket's path short enough to bind."""
    places = [("state_dir", config.state_dir), ("socket.path", config.socket.path)]
    if config.metrics.path is not None:  # "" too: the endpoint would try to bind it
        places.append(("metrics.path", config.metrics.path))
    if config.traces.enabled:
        places.append(("traces.path", config.traces.path))
    problems = []
    for key, value in places:
        if not os.path.isabs(value):
            tilde = " ('~' is not expanded)" if value.startswith("~") else ""
            problems.append(f"{key}: {value!r} is not an absolute path{tilde}; under systemd the daemon runs in /")
        elif key != "state_dir" and len(os.fsencode(value)) > _SOCKET_PATH_BYTES:
            problems.append(
                f"{key}: {len(os.fsencode(value))} bytes long; a Unix socket's path may have at most {_SOCKET_PATH_BYTES}"
            )
    return problems


def _check_semantics(config: Config, source: str) -> None:
    problems = []
    strategies = available(EXPLORATION)
    # an agent's section repeats the global one's problems where it inherits the values at fault:
    # those are reported once, under the global section
    top = config.exploration
    for where, exp in [("exploration", top)] + [(f"agents.{a}.exploration", c.exploration) for a, c in config.agents.items()]:
        own = where == "exploration"
        if exp.epsilon_min > exp.epsilon and (own or (exp.epsilon_min, exp.epsilon) != (top.epsilon_min, top.epsilon)):
            problems.append(f"{where}.epsilon_min: must not exceed epsilon ({exp.epsilon})")
        if exp.strategy not in strategies and (own or exp.strategy != top.strategy):
            problems.append(f"{where}.strategy: {exp.strategy!r} is not an exploration strategy; expected one of {', '.join(strategies)}")
    mode = config.socket.mode
    if isinstance(mode, int) and mode > 0o777:
        # an unquoted 660 is the decimal number 660 (0o1224), which would make the socket s-w--w-r-T;
        # read, the number no longer says how it was written, so the advice is to quote it
        problems.append(
            f"socket.mode: {mode} ({mode:#o} in octal) has bits beyond 0777: write the mode quoted, as '0660'"
            " (YAML reads an unquoted 660 as the decimal number 660)"
        )
    group = config.socket.group
    if isinstance(group, str):
        try:
            grp.getgrnam(group)
        except KeyError:
            problems.append(f"socket.group: no group named {group!r} on this host")
    for where, rewards in [("rewards", config.rewards)] + [(f"agents.{a}.rewards", c.rewards) for a, c in config.agents.items()]:
        # repr, as nan != nan
        if not math.isfinite(rewards.default) and (where == "rewards" or repr(rewards.default) != repr(config.rewards.default)):
            problems.append(f"{where}.default: must be a finite number")
    learners = available(LEARNERS)
    if config.trainer.learner not in learners:
        problems.append(f"trainer.learner: {config.trainer.learner!r} is not a learner; expected one of {', '.join(learners)}")
    if config.trainer.transformer_dim % config.trainer.transformer_heads:
        problems.append(
            f"trainer.transformer_dim: must be a multiple of trainer.transformer_heads ({config.trainer.transformer_heads})"
        )
    problems += _check_run_size(config)
    retention = config.retention
    if retention.archive_max_days is not None and retention.archive_max_days <= retention.days:
        problems.append(
            f"retention.archive_max_days: must exceed retention.days ({retention.days:g}): rows reach the archive"
            f" {retention.days:g} days after they were received, and would be deleted at once"
        )
    problems += _check_paths(config)
    problems += _check_metrics(config)
    problems += _check_traces(config)
    problems += _check_learning(config)
    if problems:
        raise ConfigError(source, problems)


def _check_learning(config: Config) -> list[str]:
    learning, problems = config.learning, []
    if learning.groups and learning.scope != "group":
        problems.append(f"learning.groups: only read with learning.scope: group (it is {learning.scope})")
    seen: dict[str, str] = {}
    for group, agents in learning.groups.items():
        if not agents:
            problems.append(f"learning.groups.{group}: lists no agent (leave the group out, or name its agents)")
        for agent in agents:
            if agent in seen:
                again = "twice" if seen[agent] == group else f"in group {seen[agent]!r} already"
                problems.append(f"learning.groups.{group}: agent {agent!r} is listed {again}")
            seen.setdefault(agent, group)
    return problems


def _check_metrics(config: Config) -> list[str]:
    """The metrics endpoint listens on loopback only, and never on the agents' socket."""
    metrics, problems = config.metrics, []
    if not _is_loopback(metrics.host):
        problems.append(
            f"metrics.host: {metrics.host!r} is not a loopback address; the endpoint listens on loopback only"
            " (127.0.0.1, ::1 or localhost)"
        )
    if metrics.path is not None and (not metrics.path or metrics.path == config.socket.path):
        problems.append(f"metrics.path: {metrics.path!r} must be a path of its own, not socket.path")
    return problems


def _check_traces(config: Config) -> list[str]:
    """The trace receiver listens on loopback only, on a socket path and port of its own."""
    traces, problems = config.traces, []
    if not _is_loopback(traces.host):
        problems.append(
            f"traces.host: {traces.host!r} is not a loopback address; the receiver listens on loopback only"
            " (127.0.0.1, ::1 or localhost)"
        )
    if not traces.path or traces.path in (config.socket.path, config.metrics.path):
        problems.append(f"traces.path: {traces.path!r} must be a path of its own, not socket.path or metrics.path")
    if traces.port and traces.port == config.metrics.port:
        problems.append(f"traces.port: {traces.port} is metrics.port already")
    return problems


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_run_size(config: Config) -> list[str]:
    """A snapshot capped at ``trainer.max_examples`` must hold enough rows for a run to pass."""
    trainer, gate = config.trainer, config.gate
    needed = holdout_run_rows(config)
    if trainer.max_examples < needed:
        return [
            f"trainer.max_examples: a run with a holdout needs at least {needed} experiences "
            f"(trainer.holdout_fraction {trainer.holdout_fraction:g}, gate.first_min_holdout {gate.first_min_holdout}), "
            f"so with {trainer.max_examples} no run could hold any out for the gate"
        ]
    held = holdout_rows(trainer.max_examples, trainer.holdout_fraction)
    if held < gate.min_holdout:
        return [
            f"trainer.max_examples: its holdout of {held} rows (trainer.holdout_fraction {trainer.holdout_fraction:g}) "
            f"is below gate.min_holdout ({gate.min_holdout}), so no model could ever replace another"
        ]
    return []


# Settings a running daemon cannot change: a reload keeps the running values until a restart.
RESTART_ONLY = (
    "state_dir", "socket.path", "store", "metrics", "online.enabled", "learning",
    "traces.enabled", "traces.path", "traces.host", "traces.port",
)


def keep_restart_only(new: Config, running: Config) -> tuple[Config, list[str]]:
    """``new`` with every RESTART_ONLY setting as ``running`` has it, and the names of those that differ."""
    changed = []
    if new.state_dir != running.state_dir:
        changed.append("state_dir")
    if new.socket.path != running.socket.path:
        changed.append("socket.path")
    if new.store != running.store:
        changed.append("store")
    if new.metrics != running.metrics:
        changed.append("metrics")
    if new.online.enabled != running.online.enabled:
        changed.append("online.enabled")
    if new.learning != running.learning:  # agents' model lines are laid out once, at start
        changed.append("learning")
    listening = ("enabled", "path", "host", "port")  # the receiver's sockets are opened once
    changed += [f"traces.{key}" for key in listening if getattr(new.traces, key) != getattr(running.traces, key)]
    kept = msgspec.structs.replace(
        new,
        state_dir=running.state_dir,
        store=running.store,
        metrics=running.metrics,
        socket=msgspec.structs.replace(new.socket, path=running.socket.path),
        online=msgspec.structs.replace(new.online, enabled=running.online.enabled),
        learning=running.learning,
        traces=msgspec.structs.replace(new.traces, **{key: getattr(running.traces, key) for key in listening}),
    )
    return kept, changed


def read_key(cfg: RedactionConfig) -> bytes | None:
    """The hashing key in ``key_file`` (None without one), or ConfigError if it cannot be used."""
    key, problems = _read_redaction_key(cfg, Path.cwd())
    if problems:
        raise ConfigError("redaction", problems)
    return key


def exposed_key(cfg: RedactionConfig) -> str | None:
    """A warning when ``key_file`` may be read by others than its owner: with the key, a hashed
    value is found again by hashing guesses (a user id, an e-mail address)."""
    if cfg.key_file is None:
        return None
    try:
        mode = os.stat(cfg.key_file).st_mode & 0o777
    except OSError:  # unreadable or missing: read_key says so
        return None
    if not mode & 0o077:
        return None
    return (
        f"redaction.key_file: {cfg.key_file} may be read by group or others (mode {mode:04o}); whoever reads it can"
        f" undo the hashing by hashing guesses: chmod 600 {cfg.key_file}, owned by the daemon's user"
    )


def _read_redaction_key(cfg: RedactionConfig, base: Path) -> tuple[bytes | None, list[str]]:
    """The stripped key in ``key_file`` (relative to ``base``), or the problems found reading it."""
    if cfg.key_file is None:
        if cfg.hash:
            return None, ["redaction.key_file: required when redaction.hash lists fields (a file holding the secret key)"]
        return None, []
    path = base / os.path.expanduser(cfg.key_file)
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        return None, [f"redaction.key_file: cannot read {path}: {exc.strerror or exc}"]
    if len(key) < MIN_KEY_BYTES:
        return None, [
            f"redaction.key_file: the key in {path} is {len(key)} bytes; at least {MIN_KEY_BYTES} are needed"
            f" (e.g. `(umask 077; head -c 32 /dev/urandom | base64 > {path})`)"
        ]
    return key, []


def _check_redaction(cfg: RedactionConfig, source: str) -> None:
    """Field paths must be dotted keys, each listed once; the key is read now (load or reload)."""
    problems = []
    seen: dict[str, str] = {}
    for section in ("drop", "hash"):
        for i, path in enumerate(getattr(cfg, section)):
            if not path or any(part == "" for part in path.split(".")):
                problems.append(f"redaction.{section}.{i}: {path!r} is not a dotted field path (like user.email)")
            elif path in seen:
                problems.append(f"redaction.{section}.{i}: {path!r} is already listed in redaction.{seen[path]}")
            else:
                seen[path] = section
    # a relative key_file is taken from the config file's folder
    _, key_problems = _read_redaction_key(cfg, Path(source).parent)
    problems += key_problems
    if problems:
        raise ConfigError(source, problems)


def socket_of(path: str | os.PathLike[str]) -> tuple[SocketConfig, ConfigError | None]:
    """The ``socket`` section of the config file at ``path``, and what is wrong with the rest of
    the file (None: nothing). A client needs the socket alone, and a daemon keeps its running
    config through a bad edit, so a file with errors elsewhere still names it; a file that cannot
    be read, or whose ``socket`` section is itself wrong, raises its ConfigError."""
    try:
        return load_config(path).socket, None
    except ConfigError as problem:
        try:
            raw = yaml.load(Path(path).read_bytes(), Loader=_Loader)  # noqa: S506 -- a SafeLoader
            section = raw.get("socket") if isinstance(raw, dict) else None
            socket = msgspec.convert({} if section is None else section, SocketConfig, strict=True)
        except (OSError, yaml.YAMLError, RecursionError, msgspec.ValidationError, AttributeError):
            raise problem from None
        if any(p.startswith("socket.") for p in problem.problems + _check_paths(Config(socket=socket))):
            raise problem from None
        return socket, problem


def agent_exploration(config: Config) -> dict[str, ExplorationConfig]:
    """Each agent's own exploration (``agents:``), as manifests and ``clients.json`` carry it."""
    return {agent: c.exploration for agent, c in config.agents.items()}


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and decode the config file (``$REFLEXD_CONFIG`` or /etc/reflexd/reflexd.yaml by default)."""
    path = os.fspath(path or os.environ.get("REFLEXD_CONFIG") or DEFAULT_PATH)
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(path, [f"cannot read: {exc.strerror or exc}"]) from None
    return parse_config(text, source=path)
