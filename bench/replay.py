"""In-process replay of bench/learning.py's protocol: try a learning setting in minutes, not an hour.

    python -m bench.replay [--streams wine iris] [--seeds 12] [--set gate.margin=0.05 ...] [-v]

Kept from the real path: the streams and their shuffles, feature hashing, exploration with exact
propensities, the client's exploration clock and the spread each strategy is handed
(``exploring.spread_from``: the online head's or the model's, as ``Chooser._policy``), the daemon's
run schedule (``learning.runs.run_points`` from ``split.first_run_rows``), the holdout split, the
learner's fit, the refit on every row, and the daemon's own rule for which model goes live
(``learning.runs.judge_run``), and below a holdout run's size the trainer's own cross-fitting
(``trainer.cross_fit``) judged by ``gate.evaluate_cross_fit``, all with the config the ``--set``
options make. Left out: the daemon, the store and the trainer subprocess, ONNX (the parity check
holds its scores to torch's), the live-reward rollback monitor, the ``trainer.max_examples`` cap
and ``max_wall_time``, per-agent settings and ``default_action`` (the benchmark's client sets
none). Exploration draws as the client does (``random.Random(seed)``, one ``.random()`` per
decision), so a seed makes the decisions of bench/learning.py's run wherever torch's scores match
ONNX's: with the defaults, the replay earned what the benchmark's daemons earned, with the same run
outcomes, on each of wine's seeds 0–38 and iris's 0–9.

Prints each stream's mean reward ± std over seeds, its ratio to the best VW configuration on the
same seeds (every configuration of bench/learning.py is run on each) and the difference from it
seed by seed, and both by decision range; ``-v`` adds each seed's run outcomes (13P: promoted at
13 experiences, 17r: rejected, 8f: failed).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from functools import partial
from math import isfinite
from types import SimpleNamespace
from typing import Any

import msgspec
import numpy as np

from bench import learning_peers as peers
from bench import learning_streams as streams
from reflexd.config import Config, ConfigError, parse_config
from reflexd.deciding import exploring
from reflexd.deciding.online import OnlineHead
from reflexd.errors import TrainingError
from reflexd.features import FeatureSpec, Hasher, action_ids
from reflexd.learning import gate, runs
from reflexd.learning.dataset import Batch, split_holdout
from reflexd.learning.runs import run_points
from reflexd.manifest import GateResult, Training
from reflexd.split import cross_fitted, first_run_rows
from reflexd.testing import deep_merge
from reflexd.trainer.fit import cross_fit


class TorchScorer:
    """A fitted model where the gate expects a ``reflexd.deciding.scoring.Scorer``: scores, version and
    the manifest fields the gate reads (the feature spec, and the run's rows and window)."""

    def __init__(self, model: Any, version: str, spec: FeatureSpec, training: Training) -> None:
        self.model, self.version = model, version
        self.manifest = SimpleNamespace(features=spec, training=training)

    def score_batch(self, context: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            scores, spread = self.model(torch.from_numpy(context), torch.from_numpy(actions))
        return scores.numpy(), spread.numpy()


def replay(stream: streams.Stream, seed: int, config: Config, train: bool = True) -> tuple[np.ndarray, list[str]]:
    """(reward earned on each example, each run's outcome) for one stream and seed; without
    ``train``, no model is ever trained: the online head decides every decision."""
    from reflexd.extensions import load_learner

    spec = FeatureSpec(config.features.context_dim, config.features.action_dim, config.features.seed)
    hasher = Hasher(spec)
    contexts = np.stack([hasher.context(c) for c in stream.contexts]).astype(np.float32)
    action_set = hasher.actions(stream.actions).astype(np.float32)
    n, n_actions = stream.n, len(stream.actions)
    ids = action_ids(stream.actions)
    learner = load_learner(config.trainer.learner)
    points = set(run_points(config.trainer, n, first_run_rows(config))) if train else set()
    # the client's own generator, drawn once per decision as its Chooser does: a seed makes the
    # decisions bench/learning.py's client makes, and so the same run
    rng = random.Random(seed)
    chosen, prob, earned = np.zeros(n, np.int64), np.zeros(n), np.zeros(n)
    live: TorchScorer | None = None
    clock = 0  # the client's: the live model's run experience plus decisions since it loaded
    outcomes: list[str] = []
    # the client's online head, as reflexd.deciding.choosing uses it (the benchmark sets no default)
    head = OnlineHead(config.online) if config.online.enabled else None
    for i in range(n):
        x = head.features(stream.contexts[i]) if head is not None else None
        base = None
        p = None  # None: the default policy decides (uniform: the benchmark's client sets no default)
        # the spread handed to exploration is the strategy's to say, as in Chooser._policy: the
        # head's posterior (in reward units) for thompson and linucb, before and beside a model;
        # the model's beside one otherwise; before one, ucb the head's at unit noise, others none
        strategy = config.exploration.strategy
        if live is None:
            if x is not None and config.exploration.default_action not in ids and head.knows(stream.name, ids):
                means = head.means(stream.name, x, ids)
                source = exploring.spread_from(strategy, False)
                spread = head.spread(stream.name, x, ids, noise=source == "head") if source is not None else None
                p = _distribution(config, means, spread, clock)
        else:
            scores, spread = live.score_batch(contexts[i : i + 1], action_set[None])
            base, spread = scores[0].tolist(), spread[0]
            combined = base if x is None else head.means(stream.name, x, ids, base)
            if x is not None and exploring.spread_from(strategy, True) == "head":
                spread = head.spread(stream.name, x, ids, base, noise=True)
            p = _distribution(config, combined, spread, clock)
            if p is None:  # as the client's failed model: the default policy, nothing for the head
                base, x = None, None
        if p is None:
            p = exploring.default_distribution(config.exploration, n_actions, None, clock)
        clock += 1
        a = exploring.sample(p, rng.random())
        chosen[i], prob[i], earned[i] = a, p[a], stream.reward[i, a]
        if x is not None:
            head.remember(str(i), stream.name, ids[a], x, base[a] if base is not None else None, i)
            head.learn(str(i), float(earned[i]))
        m = i + 1
        if m not in points:
            continue
        batch = Batch(
            ids=[str(j) for j in range(m)],
            agents=[stream.name] * m,
            context=contexts[:m],
            action_sets=action_set[None],
            action_set=np.zeros(m, np.int64),
            mask=np.ones((m, n_actions), bool),
            action_ids=[ids] * m,
            chosen=chosen[:m].copy(),
            prob=prob[:m].copy(),
            reward=earned[:m].copy(),
            received_at=np.arange(m, dtype=np.float64),
        )
        promoted, verdict = _run(batch, learner, config, live, spec, len(outcomes) + 1)
        outcomes.append(f"{m}{'f' if verdict is None else 'P' if verdict.passed else 'r'}")
        if promoted is not None:
            # the client's clock: the model's experience, or with the head all its decisions (m)
            live, clock = promoted, m
            if head is not None:  # relearning its newest rewards beside the model, as the Chooser's head does
                head.follow(promoted.version, partial(_rescore, promoted, contexts, action_set, chosen))
    return earned, outcomes


def _rescore(
    scorer: TorchScorer, contexts: np.ndarray, action_set: np.ndarray, chosen: np.ndarray, rows: list[int]
) -> list[float | None]:
    """The head's ``rescore``: ``scorer``'s score of the action chosen at each of ``rows`` (the
    decisions' indices, their sources)."""
    scores, _ = scorer.score_batch(contexts[rows], np.repeat(action_set[None], len(rows), axis=0))
    return scores[np.arange(len(rows)), chosen[rows]].tolist()


def _distribution(config: Config, scores: list[float], spread: Any, t: int) -> list[float] | None:
    """Exploration's distribution, or None where the client's Chooser falls back to the default
    policy: the strategy raised, or its probabilities are not finite."""
    try:
        p = exploring.distribution(config.exploration, scores, spread, t)
    except Exception:  # noqa: BLE001 -- as the client's: a strategy's errors are its own
        return None
    return p if isfinite(sum(p)) else None


def _run(
    batch: Batch, learner: Any, config: Config, incumbent: TorchScorer | None, spec: FeatureSpec, run: int
) -> tuple[TorchScorer | None, GateResult | None]:
    """What the scheduler does with one run: (the model that goes live or None, the verdict, or
    None for a run that failed)."""
    m = len(batch)
    if cross_fitted(config, m):
        try:
            found = cross_fit(learner, batch, config.trainer, 0)
        except TrainingError:  # the daemon records a failed run, and its model stays live
            return None, None
        scores, spread = np.asarray(found.scores), np.asarray(found.spread)
        verdict = gate.evaluate_cross_fit(
            batch, scores, spread, config.exploration, config.gate, incumbent, online=config.online
        )
        if not verdict.passed:
            return None, verdict
        training = Training(train_rows=m, window_end=m - 1.0, refit=True, cross_fitted=True)
        return TorchScorer(learner.fit(batch, config.trainer, 0, None), f"v{run:04d}", spec, training), verdict
    train, holdout = split_holdout(batch, config.trainer.holdout_fraction)
    training = Training(train_rows=len(train), holdout_rows=len(holdout), window_end=m - 1.0)
    candidate = TorchScorer(learner.fit(train, config.trainer, 0, None), f"v{run:04d}", spec, training)

    def refit() -> TorchScorer:
        refit_model = learner.fit(batch, config.trainer, 0, None)
        return TorchScorer(refit_model, candidate.version, spec, msgspec.structs.replace(training, refit=True))

    judged = runs.judge_run(
        candidate, incumbent, holdout, config.exploration, config.gate,
        refit if m < config.trainer.refit_below else None, online=config.online,
    )
    return judged.live, judged.verdict


def _setting(text: str) -> dict[str, Any]:
    """``gate.margin=0.05`` as ``{"gate": {"margin": 0.05}}`` (the value read as JSON, else a string)."""
    path, sep, raw = text.partition("=")
    if not sep or not path:
        raise argparse.ArgumentTypeError(f"expected SECTION.KEY=VALUE, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    for key in reversed(path.split(".")):
        value = {key: value}
    return value


def summary(name: str, ours: np.ndarray, vw: dict[str, np.ndarray]) -> str:
    """A stream's lines: reflexd's mean ± std over seeds, its ratio to the best VW configuration on
    the same seeds and its difference from it seed by seed, and both by decision range.
    ``ours`` and each of ``vw`` are [seeds, n] rewards earned."""
    means = ours.mean(axis=1)
    best = max(vw, key=lambda label: vw[label].mean())
    theirs = vw[best].mean(axis=1)
    spread = means.std(ddof=1) if len(means) > 1 else 0.0
    lines = [
        f"{name:15s} {means.mean():.3f} ± {spread:.3f}  {means.mean() / theirs.mean():.3f} × the best VW on these "
        f"seeds ({best} {theirs.mean():.3f}); seed by seed {streams.describe_paired(*streams.paired(means, theirs))}",
        "  by decision:",
    ]
    for label, earned in (("reflexd", ours), (best, vw[best])):
        lines.append(f"    {label:<14}{streams.describe_ranges(streams.by_decision(earned))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--streams", nargs="+", default=list(streams.ALL), choices=streams.ALL + streams.EXTRA, metavar="STREAM",
        help=f"streams to replay (default all: {', '.join(streams.ALL)}; by name also river's datasets: "
        f"{', '.join(streams.EXTRA)})",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per stream (default 3)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run from this one (default 0)")
    parser.add_argument(
        "--limit", type=int, default=None,
        help="examples per stream: the datasets cut to at most this many, the synthetic streams (xor-ring, "
        "agent-strategy; 4000 by default) made this long",
    )
    parser.add_argument(
        "--set", dest="settings", type=_setting, action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="a config setting, as in reflexd.yaml (repeatable): --set gate.margin=0.05",
    )
    parser.add_argument(
        "--head-only", action="store_true",
        help="no training runs: the online head decides every decision (seconds per seed)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print each seed's run outcomes")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    for setting in args.settings:
        overrides = deep_merge(overrides, setting)
    try:
        # JSON is YAML: the daemon's own loader applies its checks to the settings
        config = parse_config(json.dumps(overrides), "--set")
    except ConfigError as exc:
        parser.error(str(exc))

    import torch

    torch.set_num_threads(config.trainer.max_threads)
    started = time.perf_counter()
    settings = json.dumps(overrides) if overrides else "the defaults"
    print(f"replay of {', '.join(args.streams)}, {args.seeds} seeds, settings: {settings}")
    for name in args.streams:
        ours: list[np.ndarray] = []
        vw: dict[str, list[np.ndarray]] = {label: [] for label in peers.VW_CONFIGS}
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            stream = streams.build(name, seed, args.limit)
            earned, outcomes = replay(stream, seed, config, train=not args.head_only)
            ours.append(earned)
            for label, vw_args in peers.VW_CONFIGS.items():
                vw[label].append(peers.run_vw(stream, vw_args, seed)["earned"])
            if args.verbose:
                print(f"  {name} seed {seed}: {earned.mean():.3f}  {' '.join(outcomes)}", flush=True)
        print(summary(name, np.stack(ours), {label: np.stack(runs) for label, runs in vw.items()}), flush=True)
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
