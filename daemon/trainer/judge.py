"""The gate, run in the trainer subprocess beside the candidate it judges.

The holdout is hashed and both models score it here rather than in the daemon: that work grows
with the experience, and the daemon's memory must not. The rule is the one every model goes live
by (``learning.runs.judge_run``, and ``gate.evaluate_cross_fit`` for a cross-fitted run); the
daemon registers the verdict, and refuses it if the live model changed while the run was under
way (``TrainResult.judged_against``); a first model that passed is judged again, by another subprocess, on
the decisions made during the run (``reflexd.trainer.confirm``).
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np

from reflexd.config import Config, ExplorationConfig, RewardConfig
from reflexd.deciding.scoring import Scorer
from reflexd.errors import ModelIntegrityError, TrainingError
from reflexd.learning import gate, runs
from reflexd.learning.dataset import Batch, load_holdout
from reflexd.manifest import MODEL_FILE
from reflexd.registry import read_model_dir
from reflexd.trainer.result import REFIT_FILE, TrainResult, run_manifests


def load_incumbent(path: Path, threads: int) -> Scorer:
    """The live model from a folder holding its manifest and file (the daemon writes the copy it
    serves), checked against its sha256 like any model loaded."""
    try:
        manifest, _, data = read_model_dir(path)
        return Scorer(manifest, data, threads)
    except ModelIntegrityError as exc:
        raise TrainingError(f"cannot load the live model to judge the candidate against: {exc}") from None


def judge(
    config: Config,
    out_dir: Path,
    result: TrainResult,
    snapshot: str,
    rows: Batch,
    holdout: Batch,
    incumbent: Scorer | None,
) -> TrainResult:
    """``result`` with the gate's verdict on the run's candidate, and which file goes live if it passed.

    ``rows`` are the snapshot's rows (a cross-fitted run's evidence is on every one of them),
    ``holdout`` the newest of them, which the candidate was not fit on.
    """

    def rewards_for(agent: str) -> RewardConfig:
        return config.for_agent(agent).rewards

    def exploration_for(agent: str) -> ExplorationConfig:  # as the candidate's manifest will say (run_manifests)
        return config.for_agent(agent).exploration

    against = incumbent.version if incumbent is not None else None
    manifest, refit = run_manifests(config, result, out_dir, against)
    if result.cross_fit is not None:
        found = result.cross_fit
        scores, spread = np.asarray(found.scores, dtype=np.float64), np.asarray(found.spread, dtype=np.float64)
        verdict = gate.evaluate_cross_fit(
            rows, scores, spread, exploration_for, config.gate, incumbent, rewards_for, config.online, manifest.features
        )
        return msgspec.structs.replace(result, gate=verdict, judged_against=against)
    threads = config.trainer.max_threads
    candidate = Scorer(manifest, (out_dir / MODEL_FILE).read_bytes(), threads)
    incumbent_holdout = None
    if incumbent is not None and incumbent.manifest.features != manifest.features:
        incumbent_holdout = load_holdout(snapshot, incumbent.manifest.features, config.trainer.holdout_fraction)
    judged = runs.judge_run(
        candidate,
        incumbent,
        holdout,
        exploration_for,  # each agent's rows judged as its clients will explore them
        config.gate,
        (lambda: Scorer(refit, (out_dir / REFIT_FILE).read_bytes(), threads)) if refit is not None else None,
        incumbent_holdout,
        incumbent.manifest.exploration_for if incumbent is not None else None,
        rewards_for,  # rows whose rewards are episode returns are judged by episode
        config.online,  # a strategy exploring by the head's posterior is judged with the spread served
    )
    refitted = refit is not None and judged.live is not None and judged.live is not candidate
    return msgspec.structs.replace(
        result, gate=judged.verdict, judged_against=against, deploy=REFIT_FILE if refitted else MODEL_FILE
    )
