"""Deciding: score the actions with the live ONNX model, explore, return the exact probability.

Shared by the in-process client (``reflexd.Policy``) and the daemon's socket ``decide``. Imports
neither torch nor duckdb: numpy, onnxruntime and msgspec are all a decision needs.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import numpy as np
import onnxruntime as ort

from reflexd import log
from reflexd.errors import ModelIntegrityError, ReflexdError
from reflexd.features import Hasher
from reflexd.manifest import Manifest
from reflexd.registry import Registry

BATCH_ROWS = 4096

_log = log.get("reflexd.scoring")


def cpu_session(model: bytes | str, threads: int) -> ort.InferenceSession:
    """An onnxruntime session on the CPU, run in the caller's thread with ``threads`` for its ops."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


class _Bound:
    """Pre-allocated arrays bound to a session's inputs and outputs for one action count."""

    def __init__(self, session: ort.InferenceSession, context_dim: int, action_dim: int, n_actions: int) -> None:
        self.context = np.zeros((1, context_dim), dtype=np.float32)
        self.actions = np.zeros((1, n_actions, action_dim), dtype=np.float32)
        self.scores = np.zeros((1, n_actions), dtype=np.float32)
        self.spread = np.zeros((1, n_actions), dtype=np.float32)
        self.binding = session.io_binding()
        self.binding.bind_cpu_input("context", self.context)
        self.binding.bind_cpu_input("actions", self.actions)
        for name, out in (("scores", self.scores), ("spread", self.spread)):
            self.binding.bind_output(name, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        # the one row of each, viewed once here rather than on every decision
        self.context_row = self.context[0]
        self.actions_row = self.actions[0]
        self.scores_row = self.scores[0]
        self.spread_row = self.spread[0]


class Scorer:
    """One loaded model version."""

    def __init__(self, manifest: Manifest, model: bytes, threads: int = 1) -> None:
        self.manifest = manifest
        self.version = manifest.version
        self.model = model  # the file's bytes as loaded (and checked): what is served, whatever the disk holds now
        self.hasher = Hasher(manifest.features)
        try:
            self.session = cpu_session(model, threads)
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad graphs
            raise ModelIntegrityError(manifest.version, f"onnxruntime cannot load it: {exc}") from None
        self._local = threading.local()  # agents may decide from several threads

    def score(self, context: dict[str, Any], actions: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        """Scores and spread of each action; the arrays are reused by this thread's next call."""
        bound = self._bound(len(actions))
        self.hasher.context(context, out=bound.context_row)
        np.copyto(bound.actions_row, self.hasher.actions(actions))
        self.session.run_with_iobinding(bound.binding)
        return bound.scores_row, bound.spread_row

    def _bound(self, n_actions: int) -> _Bound:
        # Inputs and outputs bound once per action count: a decision then costs one run on
        # buffers onnxruntime already knows (about 5 µs less than session.run).
        cache: dict[int, _Bound] | None = getattr(self._local, "bound", None)
        if cache is None:
            cache = self._local.bound = {}
        bound = cache.get(n_actions)
        if bound is None:
            spec = self.manifest.features
            bound = cache[n_actions] = _Bound(
                self.session, spec.context_dim, spec.action_dim, n_actions
            )
        return bound

    def score_batch(self, context: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores for [N, Dc] contexts and [N, A, Da] actions, run in chunks to bound memory."""
        parts = [
            self.session.run(None, {"context": context[i : i + BATCH_ROWS], "actions": actions[i : i + BATCH_ROWS]})
            for i in range(0, len(context), BATCH_ROWS)
        ]
        if not parts:
            n_actions = actions.shape[1] if actions.ndim == 3 else 0
            empty = np.zeros((0, n_actions), dtype=np.float32)
            return empty, empty
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def score_many(self, contexts: list[dict[str, Any]], actions: list[list[Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Scores and spread of several decisions offering the same number of actions, in one run.

        The ONNX contract keeps batch rows apart (the gate scores its holdout the same way), so
        row i is what ``score(contexts[i], actions[i])`` returns.
        """
        if len(contexts) == 1:  # alone, the buffers bound once cost less than a fresh run
            scores, spread = self.score(contexts[0], actions[0])
            return scores[None], spread[None]
        spec = self.manifest.features
        ctx = np.empty((len(contexts), spec.context_dim), dtype=np.float32)  # each row zeroed by the hasher
        acts = np.empty((len(contexts), len(actions[0]), spec.action_dim), dtype=np.float32)
        hasher = self.hasher
        for i, (context, offered) in enumerate(zip(contexts, actions)):
            hasher.context(context, out=ctx[i])
            acts[i] = hasher.actions(offered)  # usually the same set every time: cached
        return self.score_batch(ctx, acts)


class ModelSource:
    """Follows the registry's CURRENT pointer; a model that fails to load leaves the last good one,
    and an empty pointer (a rollback from the first model) leaves none.

    ``refresh`` is cheap when nothing changed (one stat), so callers may poll it often. A version
    that failed to load is tried again every RETRY_SECONDS (its file may be restored);
    ``verify`` re-reads the served version's file, which someone may change on disk.
    """

    RETRY_SECONDS = 5.0

    def __init__(self, registry: Registry, threads: int = 1) -> None:
        self.registry = registry
        self.threads = threads
        self.scorer: Scorer | None = None
        self.error: str | None = None  # why CURRENT is not what is served (or a decision failed)
        self.file_error: str | None = None  # the served version's file no longer matches its manifest
        self._stamp: tuple[int, int] | None = None
        self._retry_at = 0.0
        self._lock = threading.Lock()  # the daemon refreshes from worker threads, more than one at times
        # told of each model loaded, on the loading thread, just before it is served, and (None) of
        # the model dropped (the Chooser's online head relearns its newest rewards beside the new
        # model, or none, there, not on a decision's thread)
        self.on_load: Callable[[Scorer | None], None] | None = None

    def refresh(self) -> bool:
        """Load the current version if the pointer moved; True when the live model changed."""
        with self._lock:
            return self._refresh()

    def _refresh(self) -> bool:
        stamp = self.registry.current_stamp()
        retry = self.error is not None and time.monotonic() >= self._retry_at
        if stamp == self._stamp and not retry:
            return False
        self._stamp = stamp
        version = self.registry.current()
        if version is None:  # none yet, or rolled back from the first model: nothing is served
            changed = self.scorer is not None
            if changed:
                self._tell(None, version)
            self.scorer = None
            self.error = self.file_error = None
            return changed
        if self.scorer is not None and self.scorer.version == version:
            self.error = None  # the pointer came back to the model we serve
            return False
        try:
            manifest, model = self.registry.load(version)
            scorer = Scorer(manifest, model, self.threads)
        except ReflexdError as exc:
            self.error = str(exc)
            self._retry_at = time.monotonic() + self.RETRY_SECONDS
            return False
        self._tell(scorer, version)
        self.scorer = scorer
        self.error = self.file_error = None
        return True

    def _tell(self, scorer: Scorer | None, version: str | None) -> None:
        if self.on_load is not None:
            try:
                self.on_load(scorer)
            except Exception:  # the model is served (or dropped) all the same; the listener is beside serving
                _log.exception("a listener failed on a model load", version=version)

    def switch(self, registry: Registry) -> None:
        """Follow another registry (the agent's model line moved) from now on, serving nothing of the old one."""
        with self._lock:
            self.registry = registry
            self.scorer = None
            self.error = self.file_error = None
            self._stamp = None
            self._refresh()

    def verify(self) -> bool:
        """Check the served version's file against its manifest again; False (``file_error`` says why)
        if it changed. The copy loaded when it was sound goes on serving."""
        scorer = self.scorer
        if scorer is None:
            return True
        try:
            self.registry.load(scorer.version)
        except ReflexdError as exc:
            self.file_error = f"{exc}; still serving the copy loaded before the file changed"
            return False
        self.file_error = None
        return True
