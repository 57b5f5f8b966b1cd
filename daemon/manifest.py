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
