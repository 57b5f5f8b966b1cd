"""``reflexd run`` as a child process on a config of its own, for the demo and the benchmarks."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from reflexd.errors import DaemonStartFailed, DaemonUnavailable
from reflexd.wire.connection import request
from reflexd.wire.protocol import StatusRequest


class LocalDaemon:
    """Writes ``root/reflexd.yaml``, logs to ``root/daemon.log``; ``start`` returns once it answers."""

    def __init__(self, root: Path, config: dict[str, Any]) -> None:
        self.root = root
        self.config = config
        self.socket: str = config["socket"]["path"]
        self.log_path = root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> LocalDaemon:
        config_path = self.root / "reflexd.yaml"
        config_path.write_text(yaml.safe_dump(self.config))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "reflexd", "run", "--config", str(config_path)], stdout=log, stderr=log
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                request(StatusRequest(), self.socket, timeout=5)
                return self
            except DaemonUnavailable:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise DaemonStartFailed(self.log_tail()) from None
                time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (the daemon drains what it accepted and exits), SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def __enter__(self) -> LocalDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
