"""The behaviour model's training run: steps snapshot → LSTM → ONNX step graph → parity → manifest.

    python -m reflexd.trainer.behaviour SNAPSHOT OUT_DIR --config SETTINGS_JSON [--seed N]

SNAPSHOT is a Parquet file of the steps table (``reflexd.learning.steps``). SETTINGS_JSON is
``msgspec.json.encode(settings)`` of a ``BehaviourSettings``, inline or the path of a file
holding it ({} takes every default). The run writes ``OUT_DIR/model.onnx``,
``OUT_DIR/model.int8.onnx`` (the same graph with int8 weights, when it passed its own parity
check), ``OUT_DIR/manifest.json`` (a ``reflexd.manifest.BehaviourManifest`` with ``version`` "") and
``OUT_DIR/result.json`` (the same manifest, or ``{"error": ...}``); the daemon adds it to the
registry with ``BehaviourRegistry(models / "behaviour").add_run(OUT_DIR)`` when
``training.parity_ok``, then ``promote``s the version.

Exit status as ``python -m reflexd.trainer``'s: 0 when a model was produced (even if parity
failed: ``training.parity_ok`` says so and the daemon must not publish it), 2 for a training
failure (one line on stderr), 3 when the run ran out of memory (``max_memory_mb``), 1 for a bug.

The model. Each step t of an episode is (observation o_t, action a_t, reward r_t). A stacked LSTM
reads x_t = [hash(o_t); embed(a_t); sign(r_t)·log1p|r_t|] and its top layer's state h_t feeds a
success head (P(the episode succeeds) after step t). The decision head predicts a_t from
[h_{t-1}; hash(o_t)]: the episode so far (every earlier observation, action and reward, the
previous ones last) and the observation the action was chosen on. The network is trained with
torch's fused ``nn.LSTM`` over whole (padded) episodes and exported as a single-step graph that
computes the same cells with explicit gates, with the recurrent state (h, c) as inputs and
outputs, so a client can run an episode one step at a time; the parity check runs held-out
episodes step by step through onnxruntime and compares with torch's sequence forward.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from reflexd.config import BehaviourConfig as BehaviourSettings
from reflexd.errors import TrainingError
from reflexd.features import FeatureSpec, Hasher
from reflexd.learning.steps import Episode, load_steps
from reflexd.manifest import (
    BEHAVIOUR_INPUTS,
    BEHAVIOUR_INT8_FILE,
    BEHAVIOUR_MODEL_FILE,
    BEHAVIOUR_OUTPUTS,
    MANIFEST_FILE,
    BehaviourArchitecture,
    BehaviourCalibration,
    BehaviourInt8,
    BehaviourManifest,
    BehaviourTraining,
    ReliabilityBin,
)
from reflexd.trainer.result import EXIT_OUT_OF_MEMORY, Failure, memory_exhausted, write_result
from reflexd.worker import event_logger, limit_memory, lower_priority, out_of_memory

MAX_PARITY_EPISODES = 200
BINS = 10
# The int8 graph's parity tolerance, as a difference in a probability (the float graph's stays
# ``parity_tolerance``, 1e-5). Dynamic quantisation rounds every weight matrix to 255 levels of
# its largest magnitude and each product's activations to 256 levels, and the error is carried
# from step to step in the recurrent state, so 1e-5 can never hold. On the bench's agent the
# largest differences from the float graph are ~0.01 (hidden 32) to ~0.02 (hidden 256, 3 layers)
# over 700 episodes, the mean under 0.001 (with the step input quantised too: 0.09, see
# ``quantize``). 0.05 leaves room for other agents' data; a graph further off than that moves
# early warnings visibly and is not published.
INT8_PARITY_TOLERANCE = 0.05


_log = event_logger("reflexd.trainer.behaviour")


# ---- data --------------------------------------------------------------------------------------


def vocabulary_of(episodes: list[Episode], max_vocab: int) -> list[str]:
    """"" (every other action) then the most frequent actions, ties by name."""
    counts: dict[str, int] = {}
    for ep in episodes:
        for a in ep.actions:
            counts[a] = counts.get(a, 0) + 1
    ranked = sorted(counts, key=lambda a: (-counts[a], a))
    return ["", *ranked[: max(0, max_vocab - 1)]]


class Sequences(msgspec.Struct):
    """Episodes' steps, flat: episode i's steps are rows ``offsets[i]:offsets[i + 1]``. Padded
    batches are built one at a time (``pad``), so memory grows with the steps, not with
    episodes × the longest episode."""

    obs: np.ndarray  # [S, Dc] float32
    actions: np.ndarray  # [S] int64
    rewards: np.ndarray  # [S] float32
    offsets: np.ndarray  # [N + 1] int64
    success: np.ndarray  # [N] float32 (0 where unknown)
    known: np.ndarray  # [N] bool: complete episodes

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def pad(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(obs [B, T, Dc], actions [B, T], rewards [B, T], mask [B, T]) of episodes ``idx``, T their longest."""
        lengths = self.lengths[idx]
        t = int(lengths.max(initial=1))
        b = len(idx)
        obs = np.zeros((b, t, self.obs.shape[1]), dtype=np.float32)
        actions = np.zeros((b, t), dtype=np.int64)
        rewards = np.zeros((b, t), dtype=np.float32)
        mask = np.arange(t)[None, :] < lengths[:, None]
        for j, i in enumerate(idx):
            r = self.rows(int(i))
            k = r.stop - r.start
            obs[j, :k], actions[j, :k], rewards[j, :k] = self.obs[r], self.actions[r], self.rewards[r]
        return obs, actions, rewards, mask


def sequences(episodes: list[Episode], vocab: list[str], spec: FeatureSpec, max_steps: int) -> Sequences:
    hasher = Hasher(spec)
    index = {a: i for i, a in enumerate(vocab) if i}
    lengths = np.array([min(len(e), max_steps) for e in episodes], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    total = int(offsets[-1])
    obs = np.zeros((total, spec.context_dim), dtype=np.float32)
    actions = np.zeros(total, dtype=np.int64)
    rewards = np.zeros(total, dtype=np.float32)
    success = np.zeros(len(episodes), dtype=np.float32)
    known = np.zeros(len(episodes), dtype=bool)
    for i, ep in enumerate(episodes):
        base = int(offsets[i])
        for j in range(int(lengths[i])):
            hasher.context(ep.observations[j], out=obs[base + j])
            actions[base + j] = index.get(ep.actions[j], 0)
            rewards[base + j] = ep.rewards[j]
        # a cut episode's outcome is not what its first max_steps steps led to
        if ep.success is not None and len(ep) <= max_steps:
            known[i] = True
            success[i] = 1.0 if ep.success else 0.0
    return Sequences(obs, actions, rewards, offsets, success, known)


def split_episodes(episodes: list[Episode], fraction: float) -> tuple[list[Episode], list[Episode]]:
    """(train, holdout): the newest ``fraction`` of episodes (by their newest step) held out."""
    order = sorted(range(len(episodes)), key=lambda i: (episodes[i].received_at or 0.0, i))
    cut = len(episodes) - round(len(episodes) * fraction)
    if fraction > 0 and cut == len(episodes) and len(episodes) >= 2:
        cut -= 1
    return [episodes[i] for i in order[:cut]], [episodes[i] for i in order[cut:]]


# ---- the model (torch is imported inside, after the memory cap) ---------------------------------


def build_model(obs_dim: int, vocab: int, s: BehaviourSettings) -> Any:
    import torch
    from torch import nn

    class BehaviourNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, s.embedding)
            self.lstm = nn.LSTM(
                obs_dim + s.embedding + 1, s.hidden, s.layers,
                dropout=s.dropout if s.layers > 1 else 0.0, batch_first=True,
            )
            self.decide_hidden = nn.Linear(s.hidden + obs_dim, s.head_hidden)
            self.decide_out = nn.Linear(s.head_hidden, vocab)
            self.success_head = nn.Linear(s.hidden, 1)

        def forward(self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor):
            """Sequences [B, T, ...] → (action logits [B, T, V], success logits [B, T])."""
            r = torch.sign(rewards) * torch.log1p(torch.abs(rewards))
            x = torch.cat([obs, self.embed(actions), r.unsqueeze(-1)], dim=-1)
            out, _ = self.lstm(x)
            prev = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
            logits = self.decide_out(torch.relu(self.decide_hidden(torch.cat([prev, obs], dim=-1))))
            return logits, self.success_head(out).squeeze(-1)

    return BehaviourNet()


def step_module(net: Any) -> Any:
    """The single-step graph of ``net``: the same weights, the LSTM's cells written out."""
    import torch
    from torch import nn

    layers = net.lstm.num_layers

    class BehaviourStep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, observation, action, reward, h, c):
            n = self.net
            probs = torch.softmax(
                n.decide_out(torch.relu(n.decide_hidden(torch.cat([h[layers - 1], observation], dim=-1)))), dim=-1
            )
            r = torch.sign(reward) * torch.log1p(torch.abs(reward))
            x = torch.cat([observation, n.embed(action), r.unsqueeze(-1)], dim=-1)
            hs, cs = [], []
            for k in range(layers):
                gates = (
                    x @ getattr(n.lstm, f"weight_ih_l{k}").t() + getattr(n.lstm, f"bias_ih_l{k}")
                    + h[k] @ getattr(n.lstm, f"weight_hh_l{k}").t() + getattr(n.lstm, f"bias_hh_l{k}")
                )
                i, f, g, o = gates.chunk(4, dim=-1)
                c_new = torch.sigmoid(f) * c[k] + torch.sigmoid(i) * torch.tanh(g)
                h_new = torch.sigmoid(o) * torch.tanh(c_new)
                hs.append(h_new)
                cs.append(c_new)
                x = h_new
            success = torch.sigmoid(n.success_head(x)).squeeze(-1)
            return probs, success, torch.stack(hs), torch.stack(cs)

    return BehaviourStep().eval()


def fit(seqs: Sequences, vocab_size: int, s: BehaviourSettings, seed: int, progress=None) -> tuple[Any, float | None, int]:
    """Train on ``seqs``; (model in eval mode, last epoch's mean loss, epochs)."""
    import torch

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = build_model(seqs.obs.shape[1], vocab_size, s)
    if s.optimizer == "adam":
        opt = torch.optim.Adam(net.parameters(), lr=s.learning_rate)
    elif s.optimizer == "rmsprop":
        opt = torch.optim.RMSprop(net.parameters(), lr=s.learning_rate, alpha=s.alpha)
    else:
        raise TrainingError(f"unknown behaviour optimizer {s.optimizer!r} (rmsprop or adam)")
    n = len(seqs)
    ce = torch.nn.CrossEntropyLoss(reduction="none")
    bce = torch.nn.BCEWithLogitsLoss(reduction="none")
    last = None
    net.train()
    for epoch in range(1, s.epochs + 1):
        order = torch.randperm(n, generator=gen).numpy()
        total = count = 0.0
        for start in range(0, n, s.batch_episodes):
            idx = order[start : start + s.batch_episodes]
            obs, actions, rewards, mask = (torch.from_numpy(a) for a in seqs.pad(idx))
            logits, succ = net(obs, actions, rewards)
            steps = mask.sum().clamp(min=1)
            loss_a = (ce(logits.reshape(-1, vocab_size), actions.reshape(-1)).reshape(mask.shape) * mask).sum() / steps
            sm = mask & torch.from_numpy(seqs.known[idx]).unsqueeze(1)
            target = torch.from_numpy(seqs.success[idx]).unsqueeze(1).expand_as(succ)
            loss_s = (bce(succ, target) * sm).sum() / sm.sum().clamp(min=1)
            loss = loss_a + s.success_weight * loss_s
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        last = total / max(count, 1.0)
        if not math.isfinite(last):
            raise TrainingError(f"the behaviour model's loss is not finite at epoch {epoch}")
        if progress is not None:
            progress(epoch, s.epochs, last)
    return net.eval(), last, s.epochs


def predict(net: Any, seqs: Sequences, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(action probabilities [S, V], success probabilities [S]) of every step, row for row with
    ``seqs``, from torch's sequence forward over whole episodes."""
    import torch

    probs, success = [], []
    with torch.inference_mode():
        net.eval()
        for start in range(0, len(seqs), chunk):
            idx = np.arange(start, min(start + chunk, len(seqs)))
            obs, actions, rewards, mask = seqs.pad(idx)
            logits, succ = net(torch.from_numpy(obs), torch.from_numpy(actions), torch.from_numpy(rewards))
            probs.append(torch.softmax(logits, -1).numpy()[mask])
            success.append(torch.sigmoid(succ).numpy()[mask])
    if not probs:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.float32)
    return np.concatenate(probs), np.concatenate(success)


# ---- judging -----------------------------------------------------------------------------------


def calibration(probs: np.ndarray, success: np.ndarray, seqs: Sequences, held_out: bool) -> BehaviourCalibration:
    steps = len(seqs.actions)
    if steps == 0:
        return BehaviourCalibration(held_out=held_out, episodes=len(seqs), steps=0, brier=None, nll=None, accuracy=None)
    p, y = probs, seqs.actions
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    brier = float(((p - onehot) ** 2).sum(1).mean())
    nll = float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())
    accuracy = float((p.argmax(1) == y).mean())
    bins = []
    flat, hit = p.ravel(), onehot.ravel()
    which = np.minimum((flat * BINS).astype(int), BINS - 1)
    for b in range(BINS):
        sel = which == b
        k = int(sel.sum())
        if k:
            bins.append(ReliabilityBin(b / BINS, (b + 1) / BINS, float(flat[sel].mean()), float(hit[sel].mean()), k))
    per_step_known = np.repeat(seqs.known, seqs.lengths)
    success_brier = None
    if per_step_known.any():
        target = np.repeat(seqs.success, seqs.lengths)
        success_brier = float(((success[per_step_known] - target[per_step_known]) ** 2).mean())
    return BehaviourCalibration(
        held_out=held_out, episodes=len(seqs), steps=steps, brier=brier, nll=nll, accuracy=accuracy, bins=bins,
        success_brier=success_brier, success_episodes=int(seqs.known.sum()),
    )


def episode_nll(probs: np.ndarray, seqs: Sequences) -> np.ndarray:
    """Each episode's mean negative log-likelihood per step of the actions it took."""
    taken = probs[np.arange(len(seqs.actions)), seqs.actions]
    nll = -np.log(np.clip(taken, 1e-12, None))
    sums = np.add.reduceat(nll, seqs.offsets[:-1]) if len(nll) else np.zeros(len(seqs))
    return np.where(seqs.lengths > 0, sums, 0.0) / np.maximum(seqs.lengths, 1)


def export(net: Any, path: Path, obs_dim: int, s: BehaviourSettings) -> float:
    """Write the step graph to ``path`` (self-contained, batch dynamic); seconds taken."""
    import logging
    import warnings

    import torch
    from torch.export import Dim

    import onnx
    from reflexd.errors import ExportError

    started = time.perf_counter()
    step = step_module(net)
    b = 2  # not 1: torch.export would specialise the axis into a constant
    example = (
        torch.zeros(b, obs_dim), torch.zeros(b, dtype=torch.int64), torch.zeros(b),
        torch.zeros(s.layers, b, s.hidden), torch.zeros(s.layers, b, s.hidden),
    )
    batch = Dim("batch")
    shapes = {"observation": {0: batch}, "action": {0: batch}, "reward": {0: batch}, "h": {1: batch}, "c": {1: batch}}
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                step, example, str(path), dynamo=True, input_names=list(BEHAVIOUR_INPUTS),
                output_names=list(BEHAVIOUR_OUTPUTS), dynamic_shapes=shapes, external_data=False, verbose=False,
            )
    except (torch.onnx.OnnxExporterError, OSError) as exc:
        raise ExportError(str(path), " ".join(str(exc).split())[:500] or type(exc).__name__) from exc
    finally:
        onnx_logger.setLevel(level)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(str(path), f"onnx.checker: {exc}") from exc
    return time.perf_counter() - started


def quantize(path: Path, out: Path) -> float:
    """Write ``path``'s graph with int8 weights to ``out`` (``quantize_dynamic``, QInt8); seconds taken.

    The first LSTM layer's input product stays in float: dynamic quantisation also rounds each
    product's activations to 256 levels of their range, and that layer's input is the hashed
    observation, the action embedding and the signed log reward side by side, its range set by the
    embedding (about −2 to 3), so a level is ~0.02 wide and a −0.1 reward (−0.095) moves by up to a
    tenth of itself. Quantised, it moved P(success) by up to 0.038 at the default size; kept in
    float, by 0.005, for ~10% of the multiply-adds (~20 µs of ~140 per step).

    Weights are quantised to 7 bits (``reduce_range``): on a CPU without VNNI (AVX2 only)
    onnxruntime's u8×s8 products saturate their 16-bit sums at 8 bits, and the graph's parity
    difference was 0.095 (refused) where VNNI hosts had 0.007; at 7 bits it was 0.008 on both."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    import onnx

    started = time.perf_counter()
    graph = onnx.load(str(path)).graph
    made_by = {name: node for node in graph.node for name in node.output}
    step_input = [
        node.name for node in graph.node
        if node.op_type == "MatMul" and (src := made_by.get(node.input[0])) is not None
        and src.op_type == "Concat" and "reward" in _ancestors(src, made_by, graph)
        and "observation" in src.input
    ]
    # it advises (on the root logger) a pre-processing pass meant for convolutional image models
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, nodes_to_exclude=step_input,
                         reduce_range=True)
    finally:
        logging.disable(logging.NOTSET)
    return time.perf_counter() - started


def _ancestors(node: Any, made_by: dict[str, Any], graph: Any, depth: int = 4) -> set[str]:
    """The graph inputs ``node`` reads within ``depth`` nodes."""
    inputs = {i.name for i in graph.input}
    found: set[str] = set()
    frontier = [(node, 0)]
    while frontier:
        n, d = frontier.pop()
        for name in n.input:
            if name in inputs:
                found.add(name)
            elif d < depth and name in made_by:
                frontier.append((made_by[name], d + 1))
    return found


def parity(path: Path, manifest: BehaviourManifest, episodes: list[Episode], seqs: Sequences,
           probs: np.ndarray, success: np.ndarray) -> float:
    """Largest difference between onnxruntime run step by step with its state carried and torch's
    sequence forward (``probs``, ``success``: rows of ``seqs``, whose first episodes are
    ``episodes``), absolute within ±1, relative beyond (as the reward model's parity check)."""
    from reflexd.deciding.behaviour import BehaviourModel

    model = BehaviourModel(manifest, str(path), threads=1)
    diff = 0.0
    for i, (p, s) in enumerate(model.run_episodes(episodes)):
        rows = seqs.rows(i)
        for got, want in ((p, probs[rows]), (s, success[rows])):
            d = np.abs(got - want) / np.maximum(1.0, np.abs(want))
            diff = max(diff, float(np.max(d, initial=0.0)) if np.isfinite(d).all() else math.inf)
    return diff


# ---- the run -----------------------------------------------------------------------------------


def train(snapshot: str | list[Episode], out_dir: Path, settings: BehaviourSettings, seed: int = 0) -> BehaviourManifest:
    """One run: fit, export, check, write ``model.onnx``, ``manifest.json`` and ``result.json`` in
    ``out_dir``; the manifest (version "") is returned. ``snapshot`` may be episodes in memory."""
    return train_model(snapshot, out_dir, settings, seed)[0]


def train_model(
    snapshot: str | list[Episode], out_dir: Path, settings: BehaviourSettings, seed: int = 0
) -> tuple[BehaviourManifest, Any]:
    """``train``, also returning the torch model (in eval mode) the file was exported from."""
    s = settings
    started = time.perf_counter()
    episodes = load_steps(snapshot) if isinstance(snapshot, str) else list(snapshot)
    episodes = [e for e in episodes if len(e)]
    if len(episodes) < s.min_episodes:
        raise TrainingError(f"the snapshot has {len(episodes)} episodes with steps; a behaviour run needs {s.min_episodes}")
    spec = FeatureSpec(context_dim=s.context_dim, action_dim=1, seed=s.feature_seed)
    train_eps, holdout = split_episodes(episodes, s.holdout_fraction)
    vocab = vocabulary_of(train_eps, s.max_vocab)
    train_seqs = sequences(train_eps, vocab, spec, s.max_steps)
    hold_seqs = sequences(holdout, vocab, spec, s.max_steps) if holdout else None
    load_seconds = time.perf_counter() - started
    _log("loaded", episodes=len(episodes), train=len(train_eps), holdout=len(holdout), vocabulary=len(vocab))

    started = time.perf_counter()
    import torch

    torch.set_num_threads(s.max_threads)
    import_seconds = time.perf_counter() - started

    def progress(epoch: int, epochs: int, loss: float) -> None:
        if epoch == epochs or epoch % max(1, epochs // 10) == 0:
            _log("epoch", epoch=f"{epoch}/{epochs}", loss=loss)

    started = time.perf_counter()
    net, loss, epochs = fit(train_seqs, len(vocab), s, seed, progress)
    fit_seconds = time.perf_counter() - started
    _log("fitted", seconds=fit_seconds, episodes_per_s=len(train_eps) * epochs / fit_seconds)

    judged_eps, judged = (holdout, hold_seqs) if hold_seqs is not None else (train_eps, train_seqs)
    probs, success = predict(net, judged)
    cal = calibration(probs, success, judged, held_out=hold_seqs is not None)
    train_probs, _ = predict(net, train_seqs)
    nlls = episode_nll(train_probs, train_seqs)
    if hold_seqs is not None:
        nlls = np.concatenate([nlls, episode_nll(probs, judged)])
    threshold = float(np.quantile(nlls, s.nll_quantile))

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / BEHAVIOUR_MODEL_FILE
    export_seconds = export(net, path, s.context_dim, s)
    times = [e.received_at for e in episodes if e.received_at is not None]
    manifest = BehaviourManifest(
        version="",
        created=time.time(),
        sha256="",
        features=spec,
        vocabulary=vocab,
        architecture=BehaviourArchitecture(
            hidden=s.hidden, layers=s.layers, dropout=s.dropout, embedding=s.embedding, head_hidden=s.head_hidden
        ),
        max_steps=s.max_steps,
        nll_threshold=threshold,
        nll_quantile=s.nll_quantile,
        calibration=cal,
    )
    started = time.perf_counter()
    check = min(len(judged_eps), MAX_PARITY_EPISODES)
    diff = parity(path, manifest, [_cut(e, s.max_steps) for e in judged_eps[:check]], judged, probs, success)
    parity_seconds = time.perf_counter() - started
    ok = diff <= s.parity_tolerance
    _log("exported", seconds=export_seconds, parity_diff=diff, parity_ok=ok)
    from reflexd.registry import sha256_of

    int8, int8_seconds, int8_diff, int8_refused = _int8(path, out_dir / BEHAVIOUR_INT8_FILE, manifest,
                                                       [_cut(e, s.max_steps) for e in judged_eps[:check]],
                                                       judged, probs, success)
    manifest = msgspec.structs.replace(
        manifest,
        sha256=sha256_of(path),
        int8=int8,
        training=BehaviourTraining(
            agents=sorted({e.agent for e in episodes}),
            episodes=len(episodes),
            steps=sum(min(len(e), s.max_steps) for e in episodes),
            holdout_episodes=len(holdout),
            complete_episodes=sum(e.success is not None for e in episodes),
            truncated_episodes=sum(len(e) > s.max_steps for e in episodes),
            window_start=min(times) if times else None,
            window_end=max(times) if times else None,
            seed=seed,
            epochs=epochs,
            optimizer=s.optimizer,
            train_loss=loss,
            load_seconds=load_seconds,
            import_seconds=import_seconds,
            fit_seconds=fit_seconds,
            export_seconds=export_seconds,
            parity_seconds=parity_seconds,
            parity_diff=diff,
            parity_ok=ok,
            cpu_seconds=time.process_time(),
            torch_version=str(torch.__version__),
            int8_seconds=int8_seconds,
            int8_parity_diff=int8_diff,
            int8_parity_ok=int8 is not None if int8_diff is not None else None,
            int8_refused=int8_refused,
        ),
    )
    encoded = msgspec.json.format(msgspec.json.encode(manifest))
    for name in (MANIFEST_FILE, "result.json"):
        tmp = out_dir / (name + ".tmp")
        tmp.write_bytes(encoded)
        os.replace(tmp, out_dir / name)
    return manifest, net


def _int8(
    path: Path, out: Path, manifest: BehaviourManifest, episodes: list[Episode], seqs: Sequences,
    probs: np.ndarray, success: np.ndarray,
) -> tuple[BehaviourInt8 | None, float | None, float | None, str | None]:
    """Quantise the float graph to ``out`` and check it against torch as ``parity`` does, with
    ``INT8_PARITY_TOLERANCE``: (its manifest entry or None, seconds, difference, why refused). A
    refused int8 graph is deleted; the model is still published, with its float graph alone."""
    from reflexd.registry import sha256_of

    started = time.perf_counter()
    diff: float | None = None
    try:
        quantize(path, out)
        diff = parity(out, manifest, episodes, seqs, probs, success)
    except MemoryError:
        raise
    except Exception as exc:  # the quantiser and onnxruntime raise their own untyped errors
        refused = f"quantisation failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    else:
        refused = None if diff <= INT8_PARITY_TOLERANCE else (
            f"its parity difference {diff:.3g} is above the int8 tolerance {INT8_PARITY_TOLERANCE:g}")
    seconds = time.perf_counter() - started
    _log("int8", seconds=seconds, parity_diff=diff, published=refused is None,
         **({"refused": repr(refused)} if refused is not None else {}))
    if refused is not None:
        out.unlink(missing_ok=True)
        return None, seconds, diff, refused
    assert diff is not None
    entry = BehaviourInt8(sha256=sha256_of(out), parity_diff=diff, parity_tolerance=INT8_PARITY_TOLERANCE)
    return entry, seconds, diff, None


def _cut(ep: Episode, max_steps: int) -> Episode:
    if len(ep) <= max_steps:
        return ep
    return Episode(ep.agent, ep.episode, ep.observations[:max_steps], ep.actions[:max_steps], ep.rewards[:max_steps])


def read_settings(arg: str) -> BehaviourSettings:
    text = arg if arg.lstrip().startswith("{") else Path(arg).read_bytes()
    return msgspec.json.decode(text, type=BehaviourSettings)


def main(argv: list[str] | None = None) -> int:
    lower_priority()
    parser = argparse.ArgumentParser(prog="python -m reflexd.trainer.behaviour", description=__doc__.splitlines()[0])
    parser.add_argument("snapshot", help="steps snapshot (Parquet)")
    parser.add_argument("out_dir", help="directory for model.onnx, manifest.json and result.json")
    parser.add_argument("--config", default="{}", help="BehaviourSettings as JSON, or a file holding it")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"reflexd.trainer.behaviour: error: cannot create {out_dir}: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        settings = read_settings(args.config)
    except OSError as exc:
        return _fail(out_dir, f"cannot read --config file: {exc}")
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        return _fail(out_dir, f"invalid --config: {exc}")
    threads = str(settings.max_threads)
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    os.environ.setdefault("MKL_NUM_THREADS", threads)
    limit = limit_memory(settings.max_memory_mb, _log)
    try:
        train(args.snapshot, out_dir, settings, args.seed)
    except Exception as exc:
        if out_of_memory(exc, None if isinstance(exc, TrainingError) else limit, memory_exhausted):
            traceback.print_exc()
            return _fail(out_dir, f"behaviour trainer ran out of memory (max_memory_mb={settings.max_memory_mb}): "
                         f"{type(exc).__name__}: {exc}", EXIT_OUT_OF_MEMORY)
        if isinstance(exc, TrainingError):
            return _fail(out_dir, str(exc))
        traceback.print_exc()
        write_result(out_dir, Failure(f"behaviour trainer bug: {type(exc).__name__}: {exc}"))
        return 1
    return 0


def _fail(out_dir: Path, message: str, status: int = 2) -> int:
    message = " ".join(message.split())
    print(f"reflexd.trainer.behaviour: error: {message}", file=sys.stderr, flush=True)
    try:
        write_result(out_dir, Failure(message))
    except (OSError, MemoryError):
        pass
    return status


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
