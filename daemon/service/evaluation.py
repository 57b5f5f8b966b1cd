"""Policies judged on a window of the store: the ``evaluate`` request and the rollback monitor's check.

Both take one snapshot of the window (the training snapshot's reward join, narrowed by agent,
time or model version), load it hashed with each model's feature spec, and hand the rows to the
pure code in ``reflexd.learning``. Where an agent's rewards are episode returns, both judge its
decisions by episode, as the gate does (``reflexd.learning.episodes``). Everything here blocks
(DuckDB, Parquet, onnxruntime): callers run it in a worker thread, never on the event loop.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any, Callable

import msgspec
import numpy as np

from reflexd.config import Config, feature_spec
from reflexd.deciding.scoring import Scorer
from reflexd.errors import EvaluationError
from reflexd.features import FeatureSpec
from reflexd.learning import evaluate, ope
from reflexd.learning.dataset import Batch, load_snapshot
from reflexd.learning.episodes import ByEpisode, RewardsFor, credited_episodes
from reflexd.registry import Registry
from reflexd.service.store import Store
from reflexd.wire.protocol import Evaluate, Evaluation

WINDOWS_DIR = "windows"  # under state_dir: each window's snapshot, deleted once loaded
STALE_SECONDS = 3600.0  # a window file this old was left by a daemon that stopped mid-way


class Window:
    """One snapshot of matured decisions, loaded hashed with whichever feature specs are asked for.

    Every spec gives the same rows in the same order (the file is read once per spec). The file is
    removed on ``close`` (or leaving the ``with`` block), and a loaded Batch does not need it.
    """

    def __init__(
        self, store: Store, config: Config, now: float, max_rows: int, *, default_spec: FeatureSpec, **filters: Any
    ) -> None:
        directory = config.state_path / WINDOWS_DIR
        directory.mkdir(parents=True, exist_ok=True)
        _remove_stale(directory)
        self.path = directory / f"{uuid.uuid4().hex}.parquet"
        self.default_spec = default_spec
        self._batches: dict[FeatureSpec, Batch] = {}
        self._ids: list[str] | None = None
        try:
            self.rows = store.snapshot(self.path, now, config, max_rows, **filters).rows
        except BaseException:
            self.close()
            raise

    def batch(self, spec: FeatureSpec | None = None) -> Batch:
        spec = spec or self.default_spec
        found = self._batches.get(spec)
        if found is None:
            found = self._batches[spec] = load_snapshot(str(self.path), spec)
            if self._ids is None:
                self._ids = found.ids
            elif found.ids != self._ids:  # the same file: only a bug could make them differ
                raise EvaluationError("the window's rows differ between feature specs")
        return found

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
        self.path.with_name(self.path.name + ".partial").unlink(missing_ok=True)

    def __enter__(self) -> Window:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remove_stale(directory: Path) -> None:
    cutoff = time.time() - STALE_SECONDS
    for path in directory.glob("*.parquet*"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
        except OSError:
            pass


class Models:
    """Model versions loaded from the registry (sha256 and feature scheme checked), kept for reuse.

    ``served`` gives the model the daemon serves, used as it is when its version is asked for.
    """

    KEEP = 4

    def __init__(self, registry: Registry, served: Callable[[], Scorer | None] = lambda: None) -> None:
        self.registry = registry
        self.served = served
        self._loaded: dict[str, Scorer] = {}

    def load(self, version: str) -> Scorer:
        serving = self.served()
        if serving is not None and serving.version == version:
            return serving
        found = self._loaded.get(version)
        if found is None:
            manifest, model = self.registry.load(version)
            found = Scorer(manifest, model)
            while len(self._loaded) >= self.KEEP:
                self._loaded.pop(next(iter(self._loaded)))
        else:
            self._loaded.pop(version)
        self._loaded[version] = found  # the most recently used last
        return found


def rewards_for(config: Config) -> RewardsFor:
    """An agent's reward settings (its ``agents:`` override, else the global ones), as the
    scheduler hands them to the gate."""
    return lambda agent: config.for_agent(agent).rewards


def evaluate_window(store: Store, models: Models, config: Config, msg: Evaluate, now: float) -> Evaluation:
    """Answer an ``evaluate`` request: snapshot the window, evaluate every policy on it."""
    started = time.perf_counter()
    serving = models.served()
    live = serving.version if serving is not None else models.registry.current()
    spec = feature_spec(config)
    with Window(
        store, config, now, config.trainer.max_examples, default_spec=spec,
        agent=msg.agent, since=msg.since, until=msg.until,
    ) as window:
        result = evaluate.run(
            msg.policies,
            window.batch,
            models.load,
            live,
            reward_model=msg.reward_model,
            discover_settings=msg.discover,
            confidence=config.gate.confidence,
            estimator=config.gate.estimator,
            agent=msg.agent,
            since=msg.since,
            until=msg.until,
            tables=msg.tables,
            rewards_for=rewards_for(config),
            online=config.online,
        )
    # the whole of it, the snapshot included
    return msgspec.structs.replace(result, req=msg.req, seconds=round(time.perf_counter() - started, 3))


class SameWindow(msgspec.Struct, frozen=True, kw_only=True):
    """Two model versions' deployed policies evaluated on the same rows: per-row terms of one
    estimator, or per-episode terms when the rows' rewards are episode returns (``episodes``)."""

    rows: int
    estimator: str
    current: np.ndarray  # per-row (per-episode) terms of the live version's policy
    predecessor: np.ndarray  # of the predecessor's, on the same rows
    observed: float  # the mean observed reward of the rows (per episode: discounted return), the live version's own
    episodes: int | None = None  # judged by episode: how many; None: row by row


def same_window(
    store: Store, config: Config, now: float, current: Scorer, predecessor: Scorer, max_rows: int
) -> SameWindow:
    """Both versions' policies off-policy on the newest ``max_rows`` matured decisions the live
    version (``current``) made, by ``gate.estimator`` with the live model's scores as the reward model.

    Each is judged exploring as its manifest says (per agent) at its run's experience, as the gate
    judges a candidate and its incumbent, and by episode where rewards are episode returns
    (``credited_episodes``, with the config's reward settings).
    """
    with Window(store, config, now, max_rows, default_spec=current.manifest.features, model_version=current.version) as window:
        rows = window.batch(current.manifest.features)
        prev_rows = window.batch(predecessor.manifest.features)
        n = len(rows)
        if n == 0:
            empty = np.zeros(0)
            return SameWindow(rows=0, estimator=config.gate.estimator, current=empty, predecessor=empty, observed=0.0)
        mask = rows.mask
        cur_scores, cur_spread = current.score_batch(rows.context, rows.actions)
        prev_scores, prev_spread = predecessor.score_batch(prev_rows.context, prev_rows.actions)
    for model, scores in ((current, cur_scores), (predecessor, prev_scores)):
        if not np.isfinite(np.asarray(scores, dtype=np.float64)[mask]).all():
            raise EvaluationError(f"model {model.version}'s scores are not finite on the live model's recent decisions")
    agents = rows.agents
    # each with the spread its clients hand a strategy exploring by the online head, as the gate judged it
    pi_cur = evaluate.model_probs(
        cur_scores, cur_spread, mask, agents, current.manifest.exploration_for, current.manifest.training.experience,
        rows.context, config.online, current.manifest.features,
    )
    pi_prev = evaluate.model_probs(
        prev_scores, prev_spread, mask, agents, predecessor.manifest.exploration_for,
        predecessor.manifest.training.experience, prev_rows.context, config.online, predecessor.manifest.features,
    )
    q_hat = np.where(mask, np.asarray(cur_scores, dtype=np.float64), 0.0)
    estimator = config.gate.estimator
    episodes = credited_episodes(rows, rewards_for(config))
    by_episode = None if episodes is None else ByEpisode(episodes, rows.chosen, rows.prob, rows.reward, q_hat)
    try:
        if by_episode is None:
            terms = ope.ESTIMATORS[estimator]
            current_terms = terms(pi_cur, rows.chosen, rows.prob, rows.reward, q_hat)
            predecessor_terms = terms(pi_prev, rows.chosen, rows.prob, rows.reward, q_hat)
        else:
            current_terms = by_episode.term(estimator, pi_cur)
            predecessor_terms = by_episode.term(estimator, pi_prev)
    except ValueError as exc:  # SNIPS of a policy that never takes a logged action
        raise EvaluationError(f"{estimator} cannot compare {current.version} with {predecessor.version}: {exc}") from None
    return SameWindow(
        rows=n,
        estimator=estimator,
        current=current_terms,
        predecessor=predecessor_terms,
        observed=float(rows.reward.mean() if by_episode is None else by_episode.observed.mean()),
        episodes=None if by_episode is None else by_episode.count,
    )
