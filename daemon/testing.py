"""``reflexd run`` as a child process on a config of its own: the one launcher of the tests, the
benchmarks and the demo.

    with LocalDaemon(root, deep_merge(defaults, {"trainer": {"epochs": 10}})) as d:
        print(d.status().model)

``root`` holds the config the daemon is started with (``root/reflexd.yaml``, written from
``config`` on every start) and its log (``root/daemon.log``, stdout and stderr, appended across
restarts). The socket and state directory are whatever ``config`` names.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

from reflexd.errors import DaemonStartFailed, DaemonUnavailable
from reflexd.wire.connection import request
from reflexd.wire.protocol import StatusRequest

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0

T = TypeVar("T")


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra``'s keys laid over it, section by section (neither is changed)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def poll(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Call ``predicate`` until it returns something truthy, and return that; ``TimeoutError`` naming
    ``what`` once ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class LocalDaemon:
    """One ``python -m reflexd run --config root/reflexd.yaml`` child process.

    ``start`` returns once the daemon answers a status request (``DaemonStartFailed`` with the log's
    tail if it exits or stays silent); ``stop`` sends SIGTERM (the daemon drains what it accepted)
    and SIGKILL if it hangs; ``kill`` is SIGKILL at once; ``restart`` is stop then start. As a
    context manager it starts on entry and stops on exit.
    """

    def __init__(self, root: Path, config: dict[str, Any], env: dict[str, str] | None = None) -> None:
        self.root = Path(root)
        self.config = config
        self.env: dict[str, str] = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        # run through a wrapper command, handing it these descriptors (a test playing systemd's
        # socket activation sets both: the wrapper puts the socket at fd 3 and sets LISTEN_PID)
        self.wrapper: list[str] = []
        self.pass_fds: tuple[int, ...] = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, socket={self.socket!r}, pid={self.pid})"

    # where things are
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

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def write_config(self, config: dict[str, Any] | None = None) -> None:
        """Write ``config`` (or the current one) to ``config_path``; SIGHUP makes a running daemon read it."""
        if config is not None:
            self.config = config
        self.config_path.write_text(yaml.safe_dump(self.config))

    # the process
    def start(self, timeout: float = START_TIMEOUT) -> LocalDaemon:
        self.write_config()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.wrapper, sys.executable, "-m", "reflexd", "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env} if self.env else None,
                pass_fds=self.pass_fds,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                request(StatusRequest(), self.socket, timeout=5)
                return self
            except DaemonUnavailable:
                exited = self.proc.poll()
                if exited is not None or time.monotonic() > deadline:
                    self.kill()
                    why = f"exited with {exited}" if exited is not None else f"no answer within {timeout:.0f} s"
                    raise DaemonStartFailed(f"{why} on {self.socket}\n{self.log_tail()}") from None
                time.sleep(0.05)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``. The exit status, or None if
        it had to be killed or never started."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, timeout: float = START_TIMEOUT) -> LocalDaemon:
        self.stop()
        return self.start(timeout)

    def signal(self, signum: int) -> None:
        assert self.proc is not None, "the daemon was never started"
        self.proc.send_signal(signum)

    # talking to it
    def request(self, msg: Any, timeout: float = 30.0) -> Any:
        return request(msg, self.socket, timeout=timeout)

    def status(self) -> Any:
        return self.request(StatusRequest())

    def loaded_status(self, timeout: float = 60.0) -> Any:
        """Status once everything accepted is in the store (acknowledged events may still be spooled)."""
        return poll(lambda: (s := self.status()).backlog == 0 and s, timeout, "the spool to be loaded")

    def log_tail(self, chars: int = 4000) -> str:
        """The last ``chars`` characters of the daemon's log ("" before the first start)."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    log = log_tail

    def __enter__(self) -> LocalDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
