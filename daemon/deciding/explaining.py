"""Explaining: each action's score, spread and probability, and the context keys that moved the choice.

Attribution is by occlusion over the keys the agent sent. Each leaf of the context (a dotted path
such as ``user.tier``; a list counts as one leaf with its key, whatever it holds) is removed in
turn and the actions scored again; a key's effect is what the scores lose without it:

- ``score``: the chosen action's score with the key minus its score without it;
- ``margin``: the chosen action's lead over the runner-up with the key minus the lead without it.

The chosen action is the one the model scores highest (what exploitation picks), the runner-up the
next. Keys come largest ``|margin|`` first. Removing a key is not the same as giving it a neutral
value, and keys that act only together (each redundant with another) each show little alone:
occlusion measures one key at a time against the rest of this context, not a global importance.

The context is hashed once; each occluded context is that vector less its leaf's own features
(hashing is additive), and all of them are scored in one model run. Pure: a ``Scorer`` (or None),
exploration settings and the exploration clock in, a ``protocol.Explanation`` out; nothing is
logged. Shared by the client (``Policy.explain``), the daemon (the ``explain`` request) and the
command line (``render``).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from reflexd.deciding import exploring
from reflexd.deciding.scoring import BATCH_ROWS, Scorer
from reflexd.features import MAX_DEPTH, action_ids
from reflexd.wire.protocol import ActionExplained, Explanation, KeyEffect

if TYPE_CHECKING:
    from reflexd.deciding.online import OnlineHead

Path = tuple[Any, ...]
_ROUNDING = 8 * float(np.finfo(np.float32).eps)  # relative: scores come from a float32 model


def leaves(context: dict[str, Any]) -> list[tuple[Path, Any]]:
    """The context's leaves as (key path, value), in the context's order.

    Mappings are followed (as deep as the hasher follows them); anything else, a list included, is
    a leaf. None and empty mappings and lists carry no features and are left out.
    """
    found: list[tuple[Path, Any]] = []

    def walk(obj: dict[Any, Any], path: Path, depth: int) -> None:
        for key, value in obj.items():
            here = (*path, key)
            if value is None or (isinstance(value, (dict, list, tuple)) and not value):
                continue
            if isinstance(value, dict) and depth < MAX_DEPTH:
                walk(value, here, depth + 1)
            else:
                found.append((here, value))

    walk(context, (), 0)
    return found


def key_name(path: Path) -> str:
    """``("user", "tier")`` → ``"user.tier"``: the dotted path the hasher names features by."""
    return ".".join(str(k) for k in path)


def without(context: dict[str, Any], path: Path) -> dict[str, Any]:
    """A copy of ``context`` with the leaf at ``path`` removed (the input is not changed)."""
    copy = dict(context)
    if len(path) == 1:
        del copy[path[0]]
    else:
        copy[path[0]] = without(context[path[0]], path[1:])
    return copy


def _alone(path: Path, value: Any) -> dict[Any, Any]:
    """A context holding only this leaf, at its place: hashed, it gives exactly the leaf's features."""
    for key in reversed(path):
        value = {key: value}
    return value


def occlusion_scores(
    scorer: Scorer, context: dict[str, Any], actions: list[Any], paths: list[tuple[Path, Any]]
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and spread [1 + len(paths), A]: row 0 for the whole context, row 1 + i without leaf i.

    One model run for up to ``BATCH_ROWS`` rows (more run in chunks of that many).
    """
    hasher = scorer.hasher
    spec = scorer.manifest.features
    base = hasher.context(context)
    rows = hasher.actions(actions)  # cached per action set, read-only
    total = 1 + len(paths)
    chunk = min(total, BATCH_ROWS)
    acts = np.ascontiguousarray(np.broadcast_to(rows, (chunk, *rows.shape)))
    ctx = np.empty((chunk, spec.context_dim), dtype=np.float32)
    scores, spread = [], []
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        for r in range(n):
            i = start + r - 1  # the leaf this row leaves out; -1: none
            if i < 0:
                ctx[r] = 0.0
            else:
                hasher.context(_alone(*paths[i]), out=ctx[r])
        np.subtract(base, ctx[:n], out=ctx[:n])  # hashing is additive: the whole less the leaf
        s, sp = scorer.score_batch(ctx[:n], acts[:n])
        scores.append(s)
        spread.append(sp)
    return np.concatenate(scores), np.concatenate(spread)


class HeadScorer:
    """The online head before any model, where ``explain`` takes a ``Scorer``: each (occluded)
    context row's means and spread for ``agent``'s actions ``ids``, as a decision the head alone
    makes reads them (``spread``: the spread exploration is handed, ``exploring.spread_from``;
    None: none, and the head's posterior spread is reported, as ``Chooser.score`` does). So a
    choice the head made is explained as a model's is, with no model version."""

    version = None

    def __init__(self, head: OnlineHead, agent: str, ids: list[str], spread: str | None) -> None:
        self.head, self.agent, self.ids, self.spread = head, agent, ids, spread
        self.hasher = head.hasher
        self.manifest = SimpleNamespace(features=head.hasher.spec)

    def score_batch(self, context: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        head, agent, ids, noise = self.head, self.agent, self.ids, self.spread == "head"
        scores, spread = np.zeros((len(context), len(ids))), np.zeros((len(context), len(ids)))
        for r, row in enumerate(context):
            x = head.inputs(row)
            scores[r] = head.means(agent, x, ids)
            spread[r] = head.spread(agent, x, ids, noise=noise)
        return scores, spread


def explain(
    scorer: Scorer | HeadScorer | None,
    exploration: exploring.ExplorationSettings,
    agent: str,
    context: dict[str, Any],
    actions: list[Any],
    t: int = 0,
    top: int | None = None,
) -> Explanation:
    """Why ``scorer`` ranks ``actions`` as it does for ``context``, with ``exploration``'s
    probabilities at clock ``t``; the ``top`` keys by ``|margin|`` (all without it).

    Without a scorer: the default policy's probabilities (its ``default_action`` with epsilon,
    else uniform) and no keys. A model that fails or gives non-finite scores raises.
    """
    ids = action_ids(actions)
    if scorer is None:
        default = getattr(exploration, "default_action", None)
        p = exploring.default_distribution(exploration, len(ids), ids.index(default) if default in ids else None, t)
        best = exploring.argmax(p)
        return Explanation(
            agent=agent,
            actions=[ActionExplained(id=a, score=None, spread=None, prob=q) for a, q in zip(ids, p)],
            chosen=ids[best],
            runner_up=None,
            keys=[],
            model_version=None,
            strategy="default",
        )
    paths = leaves(context)
    scores32, spread32 = occlusion_scores(scorer, context, actions, paths)
    if not (np.isfinite(scores32).all() and np.isfinite(spread32).all()):
        raise ValueError("non-finite scores")
    scores = scores32.astype(np.float64)
    full = scores[0].tolist()
    spread = spread32[0].tolist()
    # a strategy the head hands no spread to is handed none here either, as it decides
    handed = None if isinstance(scorer, HeadScorer) and scorer.spread is None else spread
    p = exploring.distribution(exploration, full, handed, t)
    if not np.isfinite(sum(p)):
        raise ValueError("non-finite probabilities")
    chosen = exploring.argmax(full)
    runner = None
    if len(ids) > 1:
        rest = full[:chosen] + full[chosen + 1 :]
        runner = exploring.argmax(rest)
        runner += runner >= chosen
    occluded = scores[1:]
    score_effect = full[chosen] - occluded[:, chosen]
    margin_effect = None
    if runner is not None:
        margin_effect = (full[chosen] - full[runner]) - (occluded[:, chosen] - occluded[:, runner])
    # differences within float32 rounding of the scores are no effect at all: shown as 0
    tol = _ROUNDING * float(np.abs(scores).max())
    score_effect[np.abs(score_effect) <= tol] = 0.0
    if margin_effect is not None:
        margin_effect[np.abs(margin_effect) <= tol] = 0.0
    best_without = (occluded.argmax(axis=1) if len(paths) else np.zeros(0, dtype=np.int64)).tolist()
    if margin_effect is not None:
        order = np.lexsort((-np.abs(score_effect), -np.abs(margin_effect))).tolist()
        margins: list[float | None] = margin_effect.tolist()
    else:
        order = np.argsort(-np.abs(score_effect), kind="stable").tolist()
        margins = [None] * len(paths)
    effects = score_effect.tolist()  # plain floats: numpy's scalars cost more to index and convert
    keys = [
        KeyEffect(key=key_name(paths[i][0]), score=effects[i], margin=margins[i], best_without=ids[best_without[i]])
        for i in order[:top]
    ]
    return Explanation(
        agent=agent,
        actions=[ActionExplained(id=a, score=s, spread=u, prob=q) for a, s, u, q in zip(ids, full, spread, p)],
        chosen=ids[chosen],
        runner_up=None if runner is None else ids[runner],
        keys=keys,
        model_version=scorer.version,
        strategy=exploration.strategy,
    )


def render(explanation: Explanation) -> str:
    """The explanation as text for a terminal: the actions, then the keys."""
    e = explanation
    lines = []
    if e.model_version is None and e.strategy == "default":
        lines.append(f"agent {e.agent}: no model live, so the default policy's probabilities; no keys to attribute")
    else:
        lead = ""
        if e.runner_up is not None:
            by_id = {a.id: a.score for a in e.actions}
            lead = f", runner-up {e.runner_up} by {by_id[e.chosen] - by_id[e.runner_up]:.4g}"  # type: ignore[operator]
        who = f"model {e.model_version}" if e.model_version is not None else "no model live: the online head"
        lines.append(f"agent {e.agent}: {who} ({e.strategy}) scores {e.chosen} highest{lead}")
    width = max(len("action"), *(len(a.id) for a in e.actions))
    lines.append(f"  {'action':<{width}}  {'score':>10}  {'spread':>10}  {'prob':>6}")
    for a in e.actions:
        score = "-" if a.score is None else f"{a.score:.4g}"
        spread = "-" if a.spread is None else f"{a.spread:.4g}"
        mark = "*" if a.id == e.chosen else " "
        lines.append(f"{mark} {a.id:<{width}}  {score:>10}  {spread:>10}  {a.prob:>6.3f}")
    if e.keys:
        kw = max(len("key"), *(len(k.key) for k in e.keys))
        lines.append("")
        lines.append(f"  {'key':<{kw}}  {'margin':>10}  {'score':>10}  best without it")
        for k in e.keys:
            margin = "-" if k.margin is None else _signed(k.margin)
            lines.append(f"  {k.key:<{kw}}  {margin:>10}  {_signed(k.score):>10}  {k.best_without}")
    return "\n".join(lines)


def _signed(x: float) -> str:
    return "0" if x == 0 else f"{x:+.4g}"
