"""Running a behaviour model: its registry line, its ONNX step graph, whole episodes through it.

The exported graph computes one step of a batch of episodes (``reflexd.manifest.BEHAVIOUR_INPUTS``):
``observation`` [B, Dc] float32 (the step's hashed observation), ``action`` [B] int64 (the
vocabulary index of the action the step took), ``reward`` [B] float32 (its reward), ``h`` and
``c`` [layers, B, hidden] (the state after the episode's previous steps, zeros before the first)
→ ``action_probs`` [B, V] (the distribution the model expected the step's action to come from,
given the episode so far and this observation), ``success`` [B] (P(the episode succeeds), after
this step), ``h_out``, ``c_out`` (the state after this step). A version may also hold the same
graph with int8 weights (``manifest.int8``, its own file and sha256): faster per step, its
probabilities within a few hundredths of the float graph's; ``int8=True`` asks for it where
there is one (the early-warning client does), everything else runs the float graph.

Imports neither torch nor duckdb: the client, the daemon and ``reflexd.learning`` may use it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from reflexd.deciding.scoring import cpu_session
from reflexd.durable import atomic_write, fsync_path
from reflexd.errors import ModelIntegrityError, ModelNotFound, ReflexdError, TrainingError
from reflexd.features import Hasher, scheme_refusal
from reflexd.manifest import (
    BEHAVIOUR_INT8_FILE,
    BEHAVIOUR_MODEL_FILE,
    MANIFEST_FILE,
    BehaviourManifest,
    decode_behaviour_manifest,
)
from reflexd.registry import _VERSION_RE, Registry, sha256_of

BEHAVIOUR_DIR = "behaviour"  # under the models directory: models/behaviour/vNNNN/
RESULT_FILE = "result.json"
OTHER = 0  # the vocabulary index of every action outside it


def check_behaviour(manifest: BehaviourManifest, data: bytes, name: str, int8: bool = False) -> None:
    """Refuse ``data`` unless it is the file the manifest names (the int8 graph's with ``int8``)."""
    import hashlib

    refusal = scheme_refusal(manifest.features)
    if refusal is not None:
        raise ModelIntegrityError(name, refusal)
    file, want = graph_file(manifest, int8), (manifest.int8.sha256 if int8 and manifest.int8 else manifest.sha256)
    digest = hashlib.sha256(data).hexdigest()
    if digest != want:
        raise ModelIntegrityError(name, f"{file}: sha256 {digest[:12]}… does not match manifest {want[:12]}…")


def graph_file(manifest: BehaviourManifest, int8: bool = False) -> str:
    """The file of the graph a client runs: the int8 one when asked for and there is one."""
    file = manifest.int8.file if int8 and manifest.int8 is not None else manifest.file
    if Path(file).name != file:
        raise ModelIntegrityError(manifest.version or "candidate", f"the manifest names {file!r}, not a file beside it")
    return file


def _copy_checked(source: Path, dest: Path, expected: str | None, what: str) -> str:
    """Copy ``source`` to ``dest`` in a staging folder, fsynced; its sha256, refused (the staging
    folder removed) unless it is ``expected`` (when given)."""
    try:
        shutil.copyfile(source, dest)
    except OSError as exc:
        shutil.rmtree(dest.parent, ignore_errors=True)
        raise ModelIntegrityError(str(source), f"cannot read it: {exc.strerror or exc}") from None
    with open(dest, "rb+") as f:
        os.fsync(f.fileno())
    digest = sha256_of(dest)
    if expected and digest != expected:
        shutil.rmtree(dest.parent, ignore_errors=True)
        raise ModelIntegrityError(str(source), f"the file does not match its manifest's {what}")
    return digest


class BehaviourRegistry(Registry):
    """The behaviour models' own line, ``models/behaviour/``: the same layout, pointer and history
    as the reward model's ``Registry``, with ``BehaviourManifest`` manifests and ``model.onnx`` files."""

    def manifest(self, version: str) -> BehaviourManifest:  # type: ignore[override]
        path = self.root / version / MANIFEST_FILE
        if not _VERSION_RE.fullmatch(version) or not path.is_file():
            raise ModelNotFound(version)
        try:
            return decode_behaviour_manifest(path.read_bytes())
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ModelIntegrityError(version, f"unreadable manifest: {exc}") from None

    def load(self, version: str, int8: bool = False) -> tuple[BehaviourManifest, bytes]:  # type: ignore[override]
        """The manifest and the float graph's bytes, or with ``int8`` the int8 graph's where the
        version has one (the float graph's where it has none), sha256 checked."""
        manifest = self.manifest(version)
        file = graph_file(manifest, int8)
        try:
            data = (self.root / version / file).read_bytes()
        except OSError as exc:
            raise ModelIntegrityError(version, f"cannot read {file}: {exc.strerror or exc}") from None
        check_behaviour(manifest, data, version, int8)
        return manifest, data

    def promote(self, version: str) -> BehaviourManifest:  # type: ignore[override]
        # the early-warning client runs the int8 graph: never point it at one it would refuse
        if self.manifest(version).int8 is not None:
            self.load(version, int8=True)
        return super().promote(version)  # type: ignore[return-value]

    def add(self, model_file: Path, manifest: BehaviourManifest) -> BehaviourManifest:  # type: ignore[override]
        """Copy a trained model in as the next version (whole or not at all); its manifest gets
        the version, the live version as parent, and the sha256 of the copy."""
        self.ensure()
        version = self.next_version()
        staging = self.root / f".staging-{version}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        digest = _copy_checked(Path(model_file), staging / BEHAVIOUR_MODEL_FILE, manifest.sha256, "sha256")
        int8 = manifest.int8
        if int8 is not None:
            source = Path(model_file).parent / graph_file(manifest, int8=True)
            int8_digest = _copy_checked(source, staging / BEHAVIOUR_INT8_FILE, int8.sha256, "int8 sha256")
            int8 = msgspec.structs.replace(int8, sha256=int8_digest, file=BEHAVIOUR_INT8_FILE)
        final = msgspec.structs.replace(
            manifest, version=version, parent=self.current(), sha256=digest, file=BEHAVIOUR_MODEL_FILE, int8=int8
        )
        atomic_write(staging / MANIFEST_FILE, msgspec.json.format(msgspec.json.encode(final)))
        os.rename(staging, self.root / version)
        fsync_path(self.root)
        return final

    def add_run(self, out_dir: str | os.PathLike[str]) -> BehaviourManifest:
        """Add what a training run wrote in ``out_dir`` (``read_behaviour_run``) as the next version."""
        manifest = read_behaviour_run(out_dir)
        return self.add(Path(out_dir) / manifest.file, manifest)


def read_behaviour_run(out_dir: str | os.PathLike[str]) -> BehaviourManifest:
    """The manifest a ``python -m reflexd.trainer.behaviour`` run wrote, or TrainingError with its
    error (or saying why there is none)."""
    path = Path(out_dir) / RESULT_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TrainingError(f"behaviour trainer wrote no {path} (killed, or crashed before starting)") from None
    except OSError as exc:
        raise TrainingError(f"unreadable behaviour result {path}: {exc}") from None
    try:
        found = msgspec.json.decode(raw)
        if isinstance(found, dict) and "error" in found:
            raise TrainingError(str(found["error"]))
        return msgspec.convert(found, BehaviourManifest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise TrainingError(f"unreadable behaviour result {path}: {exc}") from None


class BehaviourModel:
    """One loaded behaviour model version: its float graph, or its int8 one (``precision``
    "int8"; the caller says which ``model`` is)."""

    def __init__(self, manifest: BehaviourManifest, model: bytes | str, threads: int = 1, int8: bool = False) -> None:
        self.manifest = manifest
        self.version = manifest.version
        self.precision = "int8" if int8 else "fp32"
        self.vocabulary = list(manifest.vocabulary)
        self.index = {a: i for i, a in enumerate(self.vocabulary) if i != OTHER}
        self.hasher = Hasher(manifest.features)
        self.layers = manifest.architecture.layers
        self.hidden = manifest.architecture.hidden
        try:
            self.session = cpu_session(model, threads)
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad graphs
            raise ModelIntegrityError(manifest.version or "candidate", f"onnxruntime cannot load it: {exc}") from None

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str], threads: int = 1, int8: bool = False) -> BehaviourModel:
        """A model from a run's output or a version's folder (``manifest.json`` and its file, the
        int8 one with ``int8`` where there is one), sha256 checked."""
        path = Path(path)
        try:
            manifest = decode_behaviour_manifest((path / MANIFEST_FILE).read_bytes())
            int8 = int8 and manifest.int8 is not None
            data = (path / graph_file(manifest, int8)).read_bytes()
        except OSError as exc:
            raise ModelIntegrityError(str(path), f"cannot read it: {exc}") from None
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ModelIntegrityError(str(path), f"unreadable manifest: {exc}") from None
        check_behaviour(manifest, data, str(path), int8)
        return cls(manifest, data, threads, int8)

    def action_index(self, action: str) -> int:
        return self.index.get(action, OTHER)

    def zero_state(self, batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.layers, batch, self.hidden)
        return np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)

    def run(
        self, observation: np.ndarray, action: np.ndarray, reward: np.ndarray, h: np.ndarray, c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One step of a batch: (action_probs [B, V], success [B], h_out, c_out)."""
        probs, success, h_out, c_out = self.session.run(
            None, {"observation": observation, "action": action, "reward": reward, "h": h, "c": c}
        )
        return probs, success, h_out, c_out

    def run_episodes(self, episodes: Sequence[Any], batch: int = 256) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every step of every episode (objects with ``observations``, ``actions``, ``rewards``):
        per episode (action_probs [T, V], success [T]), episodes run side by side in batches."""
        out: list[tuple[np.ndarray, np.ndarray]] = []
        dim = self.manifest.features.context_dim
        for start in range(0, len(episodes), batch):
            chunk = episodes[start : start + batch]
            n = len(chunk)
            lengths = [len(ep.actions) for ep in chunk]
            steps = max(lengths, default=0)
            probs = [np.zeros((k, len(self.vocabulary)), dtype=np.float32) for k in lengths]
            success = [np.zeros(k, dtype=np.float32) for k in lengths]
            h, c = self.zero_state(n)
            obs = np.zeros((n, dim), dtype=np.float32)
            act = np.zeros(n, dtype=np.int64)
            rew = np.zeros(n, dtype=np.float32)
            for t in range(steps):
                live = [i for i in range(n) if t < lengths[i]]
                for i in live:
                    ep = chunk[i]
                    self.hasher.context(ep.observations[t], out=obs[i])
                    act[i] = self.action_index(ep.actions[t])
                    rew[i] = ep.rewards[t]
                p, s, h_new, c_new = self.run(obs, act, rew, h, c)
                for i in live:
                    probs[i][t] = p[i]
                    success[i][t] = s[i]
                # an ended episode's slot keeps its state (its outputs are never read)
                h, c = h_new, c_new
            out.extend(zip(probs, success))
        return out

    def distribution(self, probs: np.ndarray) -> dict[str, float]:
        """{action: probability} of one row of ``action_probs`` (the other actions' mass under "")."""
        return dict(zip(self.vocabulary, probs.tolist()))


class BehaviourSource:
    """Follows ``models/behaviour/CURRENT``; a version that fails to load leaves the last good one
    (as ``reflexd.deciding.scoring.ModelSource`` does for the reward model). With ``int8`` it
    loads a version's int8 graph where the version has one; a version whose int8 file fails its
    sha256 is refused as a whole, never quietly run on its float graph."""

    RETRY_SECONDS = 5.0

    def __init__(self, registry: BehaviourRegistry, threads: int = 1, *, int8: bool = False) -> None:
        self.registry = registry
        self.threads = threads
        self.int8 = int8
        self.model: BehaviourModel | None = None
        self.error: str | None = None
        self._stamp: tuple[int, int] | None = None
        self._retry_at = 0.0

    def refresh(self) -> bool:
        """Load the current version if the pointer moved; True when the model changed."""
        stamp = self.registry.current_stamp()
        retry = self.error is not None and time.monotonic() >= self._retry_at
        if stamp == self._stamp and not retry:
            return False
        self._stamp = stamp
        version = self.registry.current()
        if version is None:  # none yet, or rolled back from the first model: nothing is served
            changed = self.model is not None
            self.model, self.error = None, None
            return changed
        if self.model is not None and self.model.version == version:
            self.error = None
            return False
        try:
            manifest, data = self.registry.load(version, int8=self.int8)
            self.model = BehaviourModel(manifest, data, self.threads, int8=self.int8 and manifest.int8 is not None)
        except ReflexdError as exc:
            self.error = str(exc)
            self._retry_at = time.monotonic() + self.RETRY_SECONDS
            return False
        self.error = None
        return True
