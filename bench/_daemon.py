"""The daemon under test: ``reflexd.testing.LocalDaemon`` on temporary directories, with its memory sampled."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from reflexd.config import parse_config
from reflexd.lines import line_of, line_path
from reflexd.testing import START_TIMEOUT, STOP_TIMEOUT, LocalDaemon, deep_merge

HUGE = 1_000_000_000


def bench_config(state_dir: Path, socket_path: Path, train_rows: int) -> dict[str, Any]:
    """Defaults everywhere except what would make the daemon act on its own during the run."""
    return {
        "state_dir": str(state_dir),
        "socket": {"path": str(socket_path)},
        # short, so the training experience matures right after it is sent
        "rewards": {"wait_window": 0.2},
        # never trains by itself (only when asked), whatever the load; max_examples bounds the
        # snapshot to the newest joined experience, which the bench sends just before training
        "trainer": {"min_new_examples": HUGE, "growth": 0, "idle_load": float(HUGE), "max_examples": train_rows},
        "retention": {"check_interval": 86400},
        "log": {"format": "json", "level": "info"},
    }


def proc_status(pid: int, field: str) -> int:
    """A ``kB`` field (VmRSS, VmHWM) of /proc/<pid>/status, in bytes; 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            pass
    return found


class ChildWatcher(threading.Thread):
    """Samples the daemon's children (the trainer subprocess): their peak RSS and time alive.

    VmHWM only grows, so the last sample before the child exits is its peak; times are
    within the 20 ms sampling period.
    """

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.first_seen: float | None = None
        self.last_seen: float | None = None
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.02):
            for child in children(self.pid):
                hwm = proc_status(child, "VmHWM")
                if hwm:
                    self.peak = max(self.peak, hwm)
                    self.last_seen = time.perf_counter()
                    self.first_seen = self.first_seen or self.last_seen

    def stop(self) -> None:
        self._done.set()
        self.join()

    @property
    def seconds_alive(self) -> float:
        return (self.last_seen - self.first_seen) if self.first_seen and self.last_seen else 0.0


class RssSampler(threading.Thread):
    """The daemon's VmRSS every 10 ms for as long as it runs, so each step's own peak can be read.

    VmHWM keeps only the highest value since start; which step reached it, and how high a later
    step went, needs the samples (``peak(start, end)``, wall-clock times).
    """

    PERIOD = 0.01

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.PERIOD):
            rss = proc_status(self.pid, "VmRSS")
            if rss:
                self.samples.append((time.time(), rss))

    def peak(self, start: float, end: float) -> int:
        return max((rss for t, rss in self.samples if start <= t <= end), default=0)

    def stop(self) -> None:
        self._done.set()
        self.join()


class BenchDaemon(LocalDaemon):
    """A ``LocalDaemon`` on fresh temporary directories (removed by ``stop``), ``bench_config`` with
    ``overrides`` laid over it, and its RSS sampled from start to stop."""

    def __init__(self, train_rows: int, overrides: dict[str, Any] | None = None) -> None:
        root = Path(tempfile.mkdtemp(prefix="reflexd-bench-"))
        # socket paths are capped at 108 bytes, so the socket gets its own short directory
        self.sock_dir = Path(tempfile.mkdtemp(prefix="rxb-", dir="/tmp"))
        # fixed here: the daemon is started with the config written from this very dict
        config = bench_config(root / "state", self.sock_dir / "r.sock", train_rows)
        super().__init__(root, deep_merge(config, overrides or {}))
        self.sampler: RssSampler | None = None

    def start(self, timeout: float = START_TIMEOUT) -> BenchDaemon:
        super().start(timeout)
        assert self.pid is not None
        self.sampler = RssSampler(self.pid)
        self.sampler.start()
        return self

    def line_folder(self, agent: str) -> Path:
        """The folder of ``agent``'s model line (its versions, CURRENT, history), as this daemon's
        ``learning`` settings place it: ``models/agents/<agent>/`` by default."""
        learning = parse_config(json.dumps(self.config), "the bench config").learning
        return line_path(self.state_dir / "models", line_of(agent, learning))

    def rss(self) -> int:
        assert self.pid is not None
        return proc_status(self.pid, "VmRSS")

    def peak_rss(self) -> int:
        assert self.pid is not None
        return proc_status(self.pid, "VmHWM")

    def peak_rss_between(self, start: float, end: float) -> int:
        """The highest VmRSS sampled between two ``time.time()`` readings."""
        assert self.sampler is not None
        return self.sampler.peak(start, end)

    def restart(self, timeout: float = START_TIMEOUT) -> BenchDaemon:
        """Stop and start again on the same directories (``stop`` would remove them)."""
        if self.sampler is not None:
            self.sampler.stop()
            self.sampler = None
        LocalDaemon.stop(self)
        return self.start(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Stop the daemon (drain, then SIGKILL if it hangs) and remove the temp dirs."""
        try:
            if self.sampler is not None:
                self.sampler.stop()
                self.sampler = None
            return super().stop(timeout)
        finally:
            shutil.rmtree(self.sock_dir, ignore_errors=True)
            shutil.rmtree(self.root, ignore_errors=True)
