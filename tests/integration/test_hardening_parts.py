"""What a hostile tester found (issue: nothing lost, round two), each reproduced in-process.

The daemon-level halves are in tests/e2e/test_hardening.py.
"""

from __future__ import annotations

import resource
from pathlib import Path

import msgspec
import pytest

from reflexd.config import Config, SocketConfig, keep_restart_only, parse_config
from reflexd.deciding.scoring import ModelSource
from reflexd.durable import private_dir
from reflexd.manifest import MANIFEST_FILE
from reflexd.registry import Registry
from reflexd.service.server import FD_HEADROOM, fd_budget_problems
from test_serving import add_version


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    reg = Registry(tmp_path / "models")
    reg.ensure()
    return reg


# ---- 9: a version that lost its manifest --------------------------------------------------


def test_a_version_without_its_manifest_is_skipped_and_its_number_not_reused(registry: Registry, tmp_path: Path) -> None:
    for seed in range(3):
        add_version(registry, tmp_path, seed)
    (registry.root / "v0003" / MANIFEST_FILE).unlink()
    # before: the next version was v0003 again, and every later run failed renaming onto it
    added = add_version(registry, tmp_path, 9)
    assert added.version == "v0004"
    assert registry.versions() == ["v0001", "v0002", "v0004"] and registry.broken() == ["v0003"]
    listed = {m["version"]: m for m in registry.summary()}
    assert "no manifest.json" in listed["v0003"]["error"] and "error" not in listed["v0004"]


# ---- 10: model files changed on disk ------------------------------------------------------


def _flip_last_byte(path: Path) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    return data


def test_the_served_models_file_is_checked_again_and_a_change_reported(registry: Registry, tmp_path: Path) -> None:
    v1 = add_version(registry, tmp_path, 1)
    registry.promote(v1.version)
    live = ModelSource(registry)
    assert live.refresh() and live.verify() and live.file_error is None
    original = _flip_last_byte(registry.root / v1.version / v1.file)
    assert not live.verify()
    assert live.file_error.startswith(f"model {v1.version} refused: sha256") and "still serving" in live.file_error
    assert live.scorer is not None and live.scorer.version == v1.version  # the sound copy goes on serving
    (registry.root / v1.version / v1.file).write_bytes(original)
    assert live.verify() and live.file_error is None


def test_a_refused_version_is_tried_again_once_its_file_is_restored(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ModelSource, "RETRY_SECONDS", 0.0)
    v1, v2 = add_version(registry, tmp_path, 1), add_version(registry, tmp_path, 2)
    registry.promote(v1.version)
    live = ModelSource(registry)
    assert live.refresh()
    original = _flip_last_byte(registry.root / v2.version / v2.file)
    registry.promote(v1.version)  # history only; CURRENT is written below, bypassing promote's check
    (registry.root / "CURRENT").write_text(v2.version + "\n")
    assert not live.refresh() and "sha256" in live.error and live.scorer.version == v1.version
    assert not live.refresh()  # nothing changed: refused again, the pointer's stamp unchanged
    (registry.root / v2.version / v2.file).write_bytes(original)
    # before: the stamp had not moved, so the restored version was never loaded and the error stayed
    assert live.refresh() and live.scorer.version == v2.version and live.error is None


# ---- 11: directories others can write -----------------------------------------------------


def test_a_state_directory_others_may_write_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert private_dir(state, "its database") is None and (state.stat().st_mode & 0o777) == 0o750
    state.chmod(0o777)
    assert "writable by group or others (mode 0777)" in private_dir(state, "its database")


# ---- 5: the connection cap against the file-descriptor limit ------------------------------


def test_connection_caps_past_the_descriptor_limit_are_warned_about() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    fits = Config(socket=SocketConfig(max_connections=max(1, soft - FD_HEADROOM - 10), reserved_connections=1))
    assert fd_budget_problems(fits) == []
    over = Config(socket=SocketConfig(max_connections=soft + 1))
    (warning,) = fd_budget_problems(over)
    assert warning.startswith("socket.max_connections:") and f"may open {soft}" in warning


# ---- 7: settings a reload cannot change ---------------------------------------------------


def test_a_reload_keeps_the_running_state_dir_socket_path_and_store() -> None:
    running = parse_config("state_dir: /a\nsocket: {path: /a/s}\nstore: {threads: 1}\n")
    new = parse_config("state_dir: /b\nsocket: {path: /b/s, max_connections: 7}\nstore: {threads: 2}\ngate: {margin: 0.1}\n")
    kept, pending = keep_restart_only(new, running)
    assert pending == ["state_dir", "socket.path", "store"]
    assert (kept.state_dir, kept.socket.path, kept.store) == (running.state_dir, running.socket.path, running.store)
    assert kept.socket.max_connections == 7 and kept.gate.margin == 0.1  # the rest takes effect
    assert keep_restart_only(running, running) == (running, [])
    assert msgspec.json.encode(kept)  # still a plain config


# ---- the log itself on a full disk ----------------------------------------------------------


def test_a_log_line_that_cannot_be_written_is_dropped_not_raised(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from reflexd import log

    closed = open(tmp_path / "log", "w")
    closed.close()
    monkeypatch.setattr("sys.stderr", closed)
    log.configure("info", "json")
    before = log._Lines.dropped
    log.get("t").error("cannot be written")  # before: ValueError/OSError into the caller
    assert log._Lines.dropped == before + 1
