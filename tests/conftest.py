"""Shared fixtures: a real daemon, started as a subprocess on temporary directories."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from reflexd.errors import DaemonUnavailable
from reflexd.wire.connection import request
from reflexd.wire.protocol import StatusRequest

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass
class DaemonProcess:
    root: Path
    config: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        return self.config["socket"]["path"]

    @property
    def state_dir(self) -> Path:
        return Path(self.config["state_dir"])

    @property
    def config_path(self) -> Path:
        return self.root / "reflexd.yaml"

    @property
    def log_path(self) -> Path:
        return self.root / "daemon.log"

    def write_config(self, config: dict[str, Any] | None = None) -> None:
        if config is not None:
            self.config = config
        self.config_path.write_text(yaml.safe_dump(self.config))

    def start(self) -> DaemonProcess:
        self.write_config()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reflexd", "run", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        log.close()
        wait_for(self._ready, START_TIMEOUT, f"the daemon to answer on {self.socket}\n{self.log()}")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(f"daemon exited with {self.proc.returncode} during start:\n{self.log()}")
        try:
            request(StatusRequest(), self.socket, timeout=5)
        except DaemonUnavailable:
            return False
        return True

    def request(self, msg: Any, timeout: float = 30.0) -> Any:
        return request(msg, self.socket, timeout=timeout)

    def status(self) -> Any:
        return self.request(StatusRequest())

    def loaded_status(self, timeout: float = 60.0) -> Any:
        """Status once everything accepted is in the store (acknowledged events may still be spooled)."""
        return wait_for(lambda: (s := self.status()).backlog == 0 and s, timeout, "the spool to be loaded")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


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
        cfg = _merge(base_config(root, sock_dir / f"s{len(started)}"), config or {})
        d = DaemonProcess(root=root, config=cfg, env=env or {})
        started.append(d)
        return d.start()

    yield start
    for d in started:
        d.stop()
    shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.fixture
def daemon(daemon_factory: Callable[..., DaemonProcess]) -> DaemonProcess:
    return daemon_factory()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--crash-cycles", type=int, default=20, help="SIGKILL/restart cycles in tests/test_crash.py (make bench-crash runs 200)"
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
