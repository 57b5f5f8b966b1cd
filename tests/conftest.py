"""Shared fixtures: a real daemon, started as a subprocess on temporary directories."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from reflexd.config import LearningConfig
from reflexd.errors import DaemonStartFailed
from reflexd.lines import line_of, line_path
from reflexd.registry import Registry
from reflexd.testing import START_TIMEOUT, STOP_TIMEOUT, LocalDaemon, deep_merge, poll  # noqa: F401


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test naming ``what``."""
    try:
        return poll(predicate, timeout, what, interval)
    except TimeoutError as timed_out:
        pytest.fail(str(timed_out))


class StartFailed(DaemonStartFailed, pytest.fail.Exception):
    """A daemon that did not start, in a test: both the launcher's ``DaemonStartFailed`` and
    pytest's ``Failed`` (what ``pytest.fail`` raises), so ``pytest.raises`` of either catches it and,
    uncaught, it fails the test with the daemon's log in the message."""

    def __init__(self, failed: DaemonStartFailed) -> None:
        message = str(failed)
        Exception.__init__(self, message)
        self.msg, self.pytrace = message, True


class DaemonProcess(LocalDaemon):
    """:class:`reflexd.testing.LocalDaemon`, the one launcher of the tests, the bench and the demo,
    whose failures are test failures (``pytest.fail``), the log's tail in the message."""

    def start(self, timeout: float = START_TIMEOUT) -> DaemonProcess:
        try:
            super().start(timeout)
        except DaemonStartFailed as failed:
            raise StartFailed(failed) from None
        return self

    def loaded_status(self, timeout: float = 60.0) -> Any:
        try:
            return super().loaded_status(timeout)
        except TimeoutError as timed_out:
            pytest.fail(str(timed_out))


def line_registry(d: LocalDaemon, agent: str) -> Registry:
    """The registry of ``agent``'s model line in daemon ``d`` (``learning.scope: agent``, the default)."""
    models = d.state_dir / "models"
    return Registry(line_path(models, line_of(agent, LearningConfig())), models)


def base_config(root: Path, sock_dir: Path) -> dict[str, Any]:
    return {
        "state_dir": str(root / "state"),
        "socket": {"path": str(sock_dir / "reflexd.sock")},
        "ingest": {"flush_interval": 0.01},
        "rewards": {"wait_window": 0.5},
        # trains only when a test asks (or sets min_new_examples / growth itself)
        "trainer": {"check_interval": 0.5, "idle_load": 1000.0, "min_new_examples": 1_000_000, "growth": 0, "epochs": 5},
        "log": {"format": "json", "level": "info"},
    }


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start real daemons (``reflexd run`` subprocesses); every one is stopped at teardown."""
    started: list[DaemonProcess] = []
    # socket paths are limited to 108 bytes, so the socket lives in a short directory
    sock_dir = Path(tempfile.mkdtemp(prefix="rx-"))

    def start(config: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> DaemonProcess:
        root = tmp_path / f"d{len(started)}"
        root.mkdir()
        cfg = deep_merge(base_config(root, sock_dir / f"s{len(started)}"), config or {})
        d = DaemonProcess(root=root, config=cfg, env=env or {})
        started.append(d)
        return d.start()

    try:
        yield start
    finally:
        try:
            for d in started:  # stop() never raises: SIGTERM, then SIGKILL if it hangs
                d.stop()
        finally:
            shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.fixture
def daemon(daemon_factory: Callable[..., DaemonProcess]) -> DaemonProcess:
    return daemon_factory()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (socket paths are limited to 108 bytes), 0755 like /run, so
    that other users may enter it and the daemon's peer check, not the directory's mode, decides."""
    path = Path(tempfile.mkdtemp(prefix="rx-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--crash-cycles", type=int, default=20, help="SIGKILL/restart cycles in tests/e2e/test_crash.py (make bench-crash runs 200)"
    )


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """Torch on one thread, as the trainer runs it: two threads on a busy two-core machine make
    training timings swing tenfold."""
    import torch  # here, so that tests which never train do not pay for the import

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
