"""What a model version is: its manifest, the gate's verdict on it, and the run that made it.

A manifest is written once, beside the model file, when a version enters the registry; clients
read it to hash features and explore exactly as the model was trained. ``format`` 1 is what
reflexd 0.1.0 wrote (no ``format`` key, ``training`` an open mapping): it still loads.
"""

from __future__ import annotations

from typing import Any

import msgspec

from reflexd.config import ExplorationConfig
from reflexd.features import FeatureSpec

MODEL_FILE = "policy.onnx"
MANIFEST_FILE = "manifest.json"
FORMAT = 2


class GateResult(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    passed: bool
    reason: str
    estimator: str
    baseline: str  # "incumbent vNNNN" or "logged policy"
    candidate_value: float
    baseline_value: float
    difference: float
    lower: float
    upper: float
    confidence: float
    margin: float
    holdout_rows: int
    estimates: dict[str, float] = {}
    # > 0: the live model is the candidate refit on this many rows, holdout included (trainer.refit_below)
    refit_rows: int = 0


class Training(msgspec.Struct, frozen=True, kw_only=True):
    """The run that made a model: its rows and window, and what it cost.

    Unknown keys are ignored and every field has a default, so manifests from other versions load.
    """

    train_rows: int = 0  # the candidate was fit on these; a refit on these and the holdout
    holdout_rows: int = 0
    dropped_rows: int = 0
    refit: bool = False  # the live file is fit on every row, holdout included (trainer.refit_below)
    cross_fitted: bool = False  # judged on out-of-fold predictions over every row (holdout_rows 0)
    candidate_sha256: str | None = None  # a refit's: the file the gate judged
    window_start: float | None = None  # received_at of the oldest row in the snapshot
    window_end: float | None = None  # received_at of the newest
    seed: int | None = None
    epochs: int | None = None
    train_loss: float | None = None
    refitted: bool | None = None
    load_seconds: float | None = None
    import_seconds: float | None = None
    fit_seconds: float | None = None
    export_seconds: float | None = None
    graph_reused: bool | None = None
    parity_seconds: float | None = None
    cpu_seconds: float | None = None
    parity_diff: float | None = None
    parity_ok: bool | None = None
    refit_parity_diff: float | None = None
    torch_version: str | None = None

    @property
    def experience(self) -> int:
        """The joined experiences of the run, training and holdout rows. A client's exploration
        clock starts there when it loads the model, and the scheduler counts new experience from there."""
        return self.train_rows + self.holdout_rows

    @property
    def fit_rows(self) -> int:
        """The rows the live file was fit on: a refit's include its holdout."""
        return self.experience if self.refit else self.train_rows


class FleetHost(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One host's archive in a fleet model's training: where it was read and what it gave."""

    path: str  # as named to `reflexd fleet train` (a local path or a URI pyarrow reads)
    rows: int  # its joined experiences (train and holdout)
    train_rows: int
    holdout_rows: int  # its newest, in the pooled holdout
    window_start: float | None = None  # received_at of its oldest experience
    window_end: float | None = None


class FleetOrigin(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A fleet model's origin (``reflexd fleet train``): the hosts it learned from, the workers that
    trained it, and the pooled holdout's verdict (a host that pulls it judges it again on its own
    holdout, and that verdict is the manifest's ``gate``)."""

    hosts: list[FleetHost]
    rows: int  # every host's joined experiences
    train_rows: int
    holdout_rows: int
    workers: int  # Ray Train workers, training data-parallel
    gate: GateResult  # on the pooled holdout
    ray_version: str


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    version: str
    parent: str | None
    created: float
    learner: str
    features: FeatureSpec
    exploration: ExplorationConfig
    agent_exploration: dict[str, ExplorationConfig] = {}
    training: Training = Training()
    gate: GateResult | None = None
    sha256: str
    file: str = MODEL_FILE
    format: int = 1  # absent in 0.1.0's manifests; new ones are written with FORMAT
    fleet: FleetOrigin | None = None  # a fleet model's (reflexd fleet train); None for a host's own

    def exploration_for(self, agent: str) -> ExplorationConfig:
        return self.agent_exploration.get(agent, self.exploration)

    @property
    def fit_rows(self) -> int:
        """The rows the live file was fit on: a fleet model's are the fleet's (``fleet.train_rows``).
        Once a host has pulled it, ``training`` describes that host's judging snapshot instead
        (``Scheduler.adopt``), which it was not fit on."""
        return self.fleet.train_rows if self.fleet is not None else self.training.fit_rows


_decoder = msgspec.json.Decoder(Manifest)


def decode_manifest(data: bytes) -> Manifest:
    return _decoder.decode(data)


def build_manifest(fields: dict[str, Any]) -> Manifest:
    """A manifest from plain fields (as the scheduler assembles them), written in the current format."""
    return msgspec.convert({**fields, "format": FORMAT}, Manifest, from_attributes=True)


# ---- the behaviour model (reflexd.trainer.behaviour) ------------------------------------------
# A sequence model over an agent's steps, kept in its own registry line (``models/behaviour/``,
# ``reflexd.deciding.behaviour.BehaviourRegistry``) so the reward model's registry is untouched.

BEHAVIOUR_MODEL_FILE = "model.onnx"
BEHAVIOUR_INT8_FILE = "model.int8.onnx"  # the same step graph with int8 weights, beside model.onnx
BEHAVIOUR_FORMAT = 1
# the exported step graph's names: one step of a batch of episodes, recurrent state in and out
BEHAVIOUR_INPUTS = ("observation", "action", "reward", "h", "c")
BEHAVIOUR_OUTPUTS = ("action_probs", "success", "h_out", "c_out")


class BehaviourArchitecture(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    cell: str = "lstm"
    hidden: int  # the recurrent state's width (h and c are [layers, batch, hidden])
    layers: int
    dropout: float
    embedding: int  # the action embedding's width
    head_hidden: int  # the decision head's hidden layer


class ReliabilityBin(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    lower: float
    upper: float
    predicted: float  # mean predicted probability of the pairs in the bin
    observed: float  # how often those actions were the ones taken
    count: int


class BehaviourCalibration(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How well the next-action probabilities (and the success prediction) match what happened,
    on held-out episodes (or the training ones when none could be held out: ``held_out`` False)."""

    held_out: bool
    episodes: int
    steps: int
    brier: float | None  # multi-class Brier of the next-action distribution, mean per step (0 best, 2 worst)
    nll: float | None  # mean negative log-likelihood of the action taken, per step (nats)
    accuracy: float | None  # how often the most likely action was the one taken
    bins: list[ReliabilityBin] = []  # reliability of every (step, action) probability, 10 equal bins
    success_brier: float | None = None  # of P(success) at every step of complete episodes
    success_episodes: int = 0


class BehaviourTraining(msgspec.Struct, frozen=True, kw_only=True):
    agents: list[str] = []
    episodes: int = 0
    steps: int = 0
    holdout_episodes: int = 0
    complete_episodes: int = 0  # with a done step: the success head learns from these only
    truncated_episodes: int = 0  # longer than max_steps: only their first max_steps were used
    window_start: float | None = None
    window_end: float | None = None
    seed: int | None = None
    epochs: int | None = None
    optimizer: str | None = None
    train_loss: float | None = None
    load_seconds: float | None = None
    import_seconds: float | None = None
    fit_seconds: float | None = None
    export_seconds: float | None = None
    parity_seconds: float | None = None
    parity_diff: float | None = None
    parity_ok: bool | None = None
    cpu_seconds: float | None = None
    torch_version: str | None = None
    int8_seconds: float | None = None  # quantising the step graph
    int8_parity_diff: float | None = None  # the int8 graph against torch, as parity_diff
    int8_parity_ok: bool | None = None
    int8_refused: str | None = None  # why no int8 graph was published with this model


class BehaviourInt8(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The step graph with int8 weights (``onnxruntime.quantization.quantize_dynamic``, QInt8):
    the same inputs and outputs as the float graph, faster per step at the default size,
    its probabilities within ``parity_tolerance`` of torch's (not 1e-5)."""

    file: str = BEHAVIOUR_INT8_FILE
    sha256: str
    weight_type: str = "QInt8"
    parity_diff: float
    parity_tolerance: float


class BehaviourManifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A behaviour model version: what its file computes and how to feed it.

    ``vocabulary[i]`` is the action whose probability is ``action_probs[:, i]`` and whose index
    the ``action`` input takes; index 0 is every action outside the vocabulary. Success is the
    episode's final (done) step having a reward > 0 (``success``). ``nll_threshold`` is the mean
    per-step negative log-likelihood above which an episode is unusual (the ``nll_quantile`` of
    the snapshot's episodes)."""

    kind: str = "behaviour"
    format: int = BEHAVIOUR_FORMAT
    version: str  # "" until the registry gives it one
    parent: str | None = None
    created: float
    sha256: str
    file: str = BEHAVIOUR_MODEL_FILE
    features: FeatureSpec
    vocabulary: list[str]
    architecture: BehaviourArchitecture
    max_steps: int  # episodes were cut to their first max_steps steps in training
    success: str = "final step done with reward > 0"
    nll_threshold: float
    nll_quantile: float
    calibration: BehaviourCalibration
    training: BehaviourTraining = BehaviourTraining()
    # None in manifests written before it existed, and when the int8 graph failed its parity
    # check (``training.int8_refused`` says why): clients then run the float graph
    int8: BehaviourInt8 | None = None


_behaviour_decoder = msgspec.json.Decoder(BehaviourManifest)


def decode_behaviour_manifest(data: bytes) -> BehaviourManifest:
    return _behaviour_decoder.decode(data)
