"""The model registry: every version kept with its manifest, one atomic pointer to the live one.

Layout under ``models/``::

    v0001/policy.onnx      the model (the candidate, or its refit: see gate.refit_rows), byte for
                           byte what the gate evaluated
    v0001/manifest.json    what it is, what it was trained on, how it passed the gate, sha256
    CURRENT                the live version's name (replaced by atomic rename)
    history.json           stack of promoted versions; rollback pops it

A model is only ever loaded through ``load`` here, which checks the file against the sha256
in its manifest; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import msgspec

from reflexd.durable import atomic_write, fsync_path
from reflexd.errors import ModelIntegrityError, ModelNotFound, PointerMoved
from reflexd.features import scheme_refusal
from reflexd.lines import next_number
from reflexd.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    Manifest,
    build_manifest,
    decode_manifest,
)

CURRENT_FILE = "CURRENT"
HISTORY_FILE = "history.json"
_VERSION_RE = re.compile(r"v(\d{4,})")


_history_decoder = msgspec.json.Decoder(list[str])


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_model(manifest: Manifest, data: bytes, name: str) -> None:
    """ModelIntegrityError naming ``name`` unless ``data`` is the file ``manifest`` describes (its
    sha256) and its features were hashed the way this version hashes them."""
    refusal = scheme_refusal(manifest.features)
    if refusal is not None:
        raise ModelIntegrityError(name, refusal)
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.sha256:
        raise ModelIntegrityError(name, f"sha256 {digest[:12]}… does not match manifest {manifest.sha256[:12]}…")


def read_model_dir(path: Path | str) -> tuple[Manifest, bytes, bytes]:
    """(manifest, its raw bytes, the model's bytes) of a model written outside a registry (a fleet
    model: ``MANIFEST_FILE`` and the file it names, in ``path`` or beside ``path`` when that is the
    manifest itself), checked with ``check_model``; ModelIntegrityError says what is wrong."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE if path.is_dir() else path
    try:
        raw = manifest_path.read_bytes()
    except OSError as exc:
        raise ModelIntegrityError(str(path), f"cannot read {manifest_path}: {exc.strerror or exc}") from None
    try:
        manifest = decode_manifest(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ModelIntegrityError(str(path), f"unreadable manifest {manifest_path}: {exc}") from None
    model_path = manifest_path.parent / manifest.file
    if Path(manifest.file).name != manifest.file:
        raise ModelIntegrityError(str(path), f"the manifest names {manifest.file!r}, not a file beside it")
    try:
        data = model_path.read_bytes()
    except OSError as exc:
        raise ModelIntegrityError(str(path), f"cannot read {model_path}: {exc.strerror or exc}") from None
    check_model(manifest, data, str(path))
    return manifest, raw, data


class Registry:
    """One model line's registry (``reflexd.lines``). ``models`` is the models directory holding
    every line, across which version numbers are counted; by default ``root`` is it."""

    def __init__(self, root: Path | str, models: Path | str | None = None) -> None:
        self.root = Path(root)
        self.models = Path(models) if models is not None else self.root
        # promote and rollback read, change and write CURRENT and history.json; the daemon's
        # scheduler, monitor and requests call them from different threads
        self._lock = threading.RLock()

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    # ---- reading ----------------------------------------------------------------------

    def versions(self) -> list[str]:
        return [v for v in self._directories() if (self.root / v / MANIFEST_FILE).is_file()]

    def broken(self) -> list[str]:
        """Version folders without a manifest (lost or never written): skipped, never reused."""
        return [v for v in self._directories() if not (self.root / v / MANIFEST_FILE).is_file()]

    def _directories(self) -> list[str]:
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir() if _VERSION_RE.fullmatch(p.name) and p.is_dir()]
        return sorted(found, key=lambda v: int(v[1:]))

    def manifest(self, version: str) -> Manifest:
        path = self.root / version / MANIFEST_FILE
        if not _VERSION_RE.fullmatch(version) or not path.is_file():
            raise ModelNotFound(version)
        try:
            return decode_manifest(path.read_bytes())
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ModelIntegrityError(version, f"unreadable manifest: {exc}") from None

    def current(self) -> str | None:
        try:
            version = (self.root / CURRENT_FILE).read_text().strip()
        except FileNotFoundError:
            return None
        return version or None

    def current_stamp(self) -> tuple[int, int] | None:
        """A cheap change detector for the pointer (inode, mtime); None when there is none."""
        try:
            st = os.stat(self.root / CURRENT_FILE)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns)

    def history(self) -> list[str]:
        try:
            return _history_decoder.decode((self.root / HISTORY_FILE).read_bytes())
        except FileNotFoundError:
            return []
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ModelIntegrityError(HISTORY_FILE, f"unreadable promotion history: {exc}") from None

    def load(self, version: str) -> tuple[Manifest, bytes]:
        """The manifest and model bytes, refused unless the bytes match the manifest's sha256 and
        its features were hashed the way this version hashes them (so neither promote nor rollback
        ever points agents at a model they would refuse)."""
        manifest = self.manifest(version)
        refusal = scheme_refusal(manifest.features)
        if refusal is not None:
            raise ModelIntegrityError(version, refusal)
        path = self.root / version / manifest.file
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelIntegrityError(version, f"cannot read {manifest.file}: {exc.strerror or exc}") from None
        check_model(manifest, data, version)
        return manifest, data

    # ---- writing (the daemon's side) ---------------------------------------------------

    def next_version(self) -> str:
        # a folder that lost its manifest still holds its number, in this line or another
        existing = self._directories()
        n = max(int(existing[-1][1:]) + 1 if existing else 1, next_number(self.models))
        return f"v{n:04d}"

    def add(self, model_file: Path, manifest_fields: dict[str, Any]) -> Manifest:
        """Copy a candidate in as the next version; the directory appears whole or not at all."""
        self.ensure()
        version = self.next_version()
        staging = self.root / f".staging-{version}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        dest_model = staging / MODEL_FILE
        shutil.copyfile(model_file, dest_model)
        with open(dest_model, "rb+") as f:
            os.fsync(f.fileno())
        manifest = build_manifest(
            {**manifest_fields, "version": version, "sha256": sha256_of(dest_model), "file": MODEL_FILE}
        )
        atomic_write(staging / MANIFEST_FILE, msgspec.json.format(msgspec.json.encode(manifest)))
        os.rename(staging, self.root / version)
        fsync_path(self.root)
        return manifest

    def promote(self, version: str) -> Manifest:
        manifest, _ = self.load(version)  # never point at a model that would be refused
        with self._lock:
            history = self.history()
            if not history or history[-1] != version:
                history.append(version)
            atomic_write(self.root / HISTORY_FILE, msgspec.json.encode(history))
            atomic_write(self.root / CURRENT_FILE, version.encode() + b"\n")
        return manifest

    def rollback(self, expect: str | None = None) -> str | None:
        """Back to the version that was live before the current one; returns it. From the first
        version promoted, back to no model (None): CURRENT is left empty, and agents decide as
        they did before it (the online head alone, or the default policy) until the next promotion.

        With ``expect``, only if ``expect`` is still the live version (PointerMoved otherwise), so a
        decision taken about one version never rolls back another promoted meanwhile.
        """
        return self.step_back(expect)[1]

    def step_back(self, expect: str | None = None) -> tuple[str, str | None]:
        """``rollback``, returning the version withdrawn as well as the one now live, both read
        under the lock that moves the pointer."""
        with self._lock:
            history = self.history()
            current = self.current()
            if expect is not None and current != expect:
                raise PointerMoved(expect, current)
            if current is not None and (not history or history[-1] != current):
                history.append(current)
            if current is None:
                raise ModelNotFound("live", "no model is live: nothing to roll back")
            history.pop()
            target = history[-1] if history else None
            if target is not None:
                self.load(target)
            atomic_write(self.root / HISTORY_FILE, msgspec.json.encode(history))
            atomic_write(self.root / CURRENT_FILE, target.encode() + b"\n" if target else b"")
        return current, target

    def predecessor(self) -> tuple[str | None, str | None]:
        """The live version and the one live before it (what ``rollback`` would return to)."""
        with self._lock:
            history = self.history()
            current = self.current()
        if current is not None and (not history or history[-1] != current):
            history.append(current)
        return current, (history[-2] if len(history) >= 2 else None)

    def summary(self) -> list[dict[str, Any]]:
        out = []
        for v in self._directories():
            try:
                out.append(msgspec.to_builtins(self.manifest(v)))
            except ModelNotFound:
                out.append({"version": v, "error": f"{v} has no {MANIFEST_FILE}: skipped, and its number is not reused"})
            except ModelIntegrityError as exc:
                out.append({"version": v, "error": str(exc)})
        return out
