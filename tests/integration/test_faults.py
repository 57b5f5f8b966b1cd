"""Trainer faults against a real daemon: the trainer crashes, hangs, or runs out of memory.

Each time the daemon carries on (ingests, answers), records the failure with a message that says
what happened, and backs off before retrying, doubling the wait with each consecutive failure.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from conftest import DaemonProcess, wait_for
from reflexd.client.policy import Policy
from reflexd.config import Config, TrainerConfig
from reflexd.errors import RequestFailed
from reflexd.service.scheduler import trainer_fault
from reflexd.trainer.result import EXIT_OUT_OF_MEMORY, memory_exhausted, read_result
from reflexd.wire.protocol import Decide, Train
from test_trainer import write_snapshot

e2e = pytest.mark.e2e

ACTIONS = ["x", "y", "z"]
BEST = {"a": "x", "b": "y", "c": "z"}


def feed(d: DaemonProcess, n: int, seed: int = 0) -> None:
    """``n`` rewarded decisions through the real client, durable in the daemon on return."""
    rng = random.Random(seed)
    with Policy("bot", socket=d.socket, state_dir=d.state_dir, seed=seed) as policy:
        for _ in range(n):
            kind = rng.choice(sorted(BEST))
            choice = policy.decide({"kind": kind}, ACTIONS)
            policy.reward(choice.id, float(choice.action == BEST[kind]))
        assert policy.flush(60), policy.stats()


def matured(d: DaemonProcess, n: int) -> None:
    wait_for(lambda: d.status().experience["new_since_training"] >= n, 30, f"{n} matured decisions")


def children(pid: int) -> list[int]:
    """Child processes of ``pid`` (from /proc/<pid>/task/*/children, else every /proc/*/stat)."""
    found: list[int] = []
    tasks = Path(f"/proc/{pid}/task")
    listed = [t / "children" for t in tasks.iterdir()] if tasks.is_dir() else []
    if listed and all(f.exists() for f in listed):
        for f in listed:
            found += [int(c) for c in f.read_text().split()]
        return found
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name may hold spaces or parentheses: ppid is the 2nd field after the last ')'
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def trainer_children(d: DaemonProcess) -> list[int]:
    out = []
    for child in children(d.proc.pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"reflexd.trainer" in cmdline:
            out.append(child)
    return out


def train_now(d: DaemonProcess) -> subprocess.Popen[str]:
    """``reflexd train --now`` as an operator runs it; the caller waits on the process."""
    return subprocess.Popen(
        [sys.executable, "-m", "reflexd", "train", "--now", "--socket", d.socket],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def assert_still_serving(d: DaemonProcess, seed: int) -> None:
    stored = d.loaded_status().ingest["stored"]
    feed(d, 30, seed=seed)
    assert d.loaded_status().ingest["stored"] >= stored + 60  # 30 decisions and their 30 outcomes
    reply = d.request(Decide(agent="ops", context={"kind": "a"}, actions=ACTIONS))
    assert reply.action in ACTIONS


@pytest.fixture
def slow_trainer(daemon_factory) -> DaemonProcess:
    # epochs without end: the trainer is still fitting when the test (or the limit) stops it
    d = daemon_factory({"rewards": {"wait_window": 0.2}, "trainer": {"epochs": 100_000, "retry_backoff": 30}})
    feed(d, 200)
    matured(d, 200)
    return d


@e2e
def test_trainer_killed_by_a_signal_is_a_recorded_failure_with_backoff(slow_trainer: DaemonProcess) -> None:
    d = slow_trainer
    cli = train_now(d)
    pid = wait_for(lambda: trainer_children(d), 60, f"the trainer subprocess to start\n{d.log()}")[0]
    assert d.status().trainer["trainer_pid"] == pid
    # killed mid-fit, with torch loaded, rather than while it starts
    fitting = lambda: any("event=epoch" in p.read_text() for p in (d.state_dir / "runs").glob("*/trainer.log"))  # noqa: E731
    wait_for(fitting, 240, f"the trainer to start fitting\n{d.log()}")  # torch's import alone, on a loaded 2-core host
    os.kill(pid, signal.SIGKILL)
    out, err = cli.communicate(timeout=60)

    assert cli.returncode == 1, (out, err)
    assert "trainer was killed by SIGKILL" in err
    t = d.status().trainer
    assert t["failures"] == 1 and t["consecutive_failures"] == 1
    assert "SIGKILL" in t["last_error"] and "exit status -9" in t["last_error"]
    assert t["last_run"]["fault"] == "killed" and t["last_run"]["returncode"] == -9
    assert t["state"] == "idle" and t["trainer_pid"] is None
    assert t["next_attempt"] > time.time() + 20  # retry_backoff 30 s from the failure
    assert t["next_attempt"] == pytest.approx(t["last_run"]["finished"] + 30, abs=1e-3)
    assert trainer_children(d) == []
    assert_still_serving(d, seed=1)
    assert d.proc.poll() is None


@e2e
def test_trainer_over_max_wall_time_is_killed_and_recorded(daemon_factory) -> None:
    d = daemon_factory({"rewards": {"wait_window": 0.2}, "trainer": {"epochs": 100_000, "max_wall_time": 1.0}})
    feed(d, 200)
    matured(d, 200)
    started = time.monotonic()
    with pytest.raises(RequestFailed, match=r"max_wall_time \(1 s\)"):
        d.request(Train(), timeout=60)
    assert time.monotonic() - started < 30

    t = d.status().trainer
    assert t["failures"] == 1
    assert t["last_error"] == "trainer exceeded max_wall_time (1 s) and was killed"
    assert t["last_run"]["fault"] == "timeout" and t["last_run"]["returncode"] == -signal.SIGKILL
    assert t["next_attempt"] > time.time()
    assert trainer_children(d) == []  # killed, and reaped
    assert_still_serving(d, seed=2)


@e2e
def test_trainer_out_of_memory_fails_cleanly(daemon_factory) -> None:
    d = daemon_factory({"rewards": {"wait_window": 0.2}, "trainer": {"max_memory_mb": 200}})
    feed(d, 200)
    matured(d, 200)
    cli = train_now(d)
    out, err = cli.communicate(timeout=60)
    assert cli.returncode == 1, (out, err)
    assert "trainer ran out of memory (max_memory_mb=200)" in err

    t = d.status().trainer
    assert t["failures"] == 1
    assert t["last_error"].startswith("trainer ran out of memory (max_memory_mb=200)")
    assert t["last_run"]["fault"] == "out_of_memory" and t["last_run"]["returncode"] == 3
    assert_still_serving(d, seed=3)


@e2e
def test_consecutive_failures_double_the_backoff_and_a_good_run_resets_it(daemon_factory) -> None:
    backoff = 0.4
    d = daemon_factory(
        {
            "rewards": {"wait_window": 0.2},
            # the scheduler itself retries: enough new experience, an "idle" CPU, a run that fails
            "trainer": {"min_new_examples": 100, "check_interval": 0.1, "retry_backoff": backoff, "max_memory_mb": 200},
        }
    )
    feed(d, 200)
    failures: dict[int, dict] = {}

    def three_failures() -> bool:
        t = d.status().trainer
        if t["failures"] and t["last_run"]["outcome"] == "failed":
            failures.setdefault(t["failures"], {**t["last_run"], "next_attempt": t["next_attempt"]})
        return len(failures) >= 3

    wait_for(three_failures, 60, f"three failed runs\n{d.log()}", interval=0.02)
    first, second, third = failures[1], failures[2], failures[3]
    assert [f["retry_in"] for f in (first, second, third)] == [backoff, 2 * backoff, 4 * backoff]
    for f in (first, second, third):
        assert f["next_attempt"] == pytest.approx(f["finished"] + f["retry_in"], abs=1e-3)
        assert "out of memory" in f["error"]
    # and the scheduler really waited out each backoff before the next attempt
    assert second["at"] >= first["next_attempt"] - 0.01
    assert third["at"] >= second["next_attempt"] - 0.01

    # the operator fixes the config; the next retry succeeds and the backoff is forgotten
    d.config["trainer"].update(max_memory_mb=4096, epochs=3)
    d.write_config()
    d.signal(signal.SIGHUP)
    def succeeded() -> dict | None:
        trainer = d.status().trainer
        return trainer if trainer["last_run"]["outcome"] != "failed" else None

    t = wait_for(succeeded, 120, f"a successful run\n{d.log()}")
    assert t["consecutive_failures"] == 0 and t["last_error"] is None
    assert t["failures"] >= 3 and t["last_run"]["outcome"] in ("promoted", "rejected")


# ---- the pieces, without a daemon ------------------------------------------------------------


def test_the_trainer_reports_running_out_of_memory_with_its_own_exit_status(tmp_path: Path) -> None:
    config = Config(trainer=TrainerConfig(max_memory_mb=200))
    (tmp_path / "config.json").write_bytes(msgspec.json.encode(config))
    done = subprocess.run(
        [sys.executable, "-m", "reflexd.trainer", str(write_snapshot(tmp_path / "snap.parquet", 300)),
         str(tmp_path / "out"), "--config", str(tmp_path / "config.json")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == EXIT_OUT_OF_MEMORY, done.stderr
    assert "reflexd.trainer: error: trainer ran out of memory (max_memory_mb=200):" in done.stderr
    with pytest.raises(Exception, match=r"^trainer ran out of memory \(max_memory_mb=200\)"):
        read_result(tmp_path / "out")


@pytest.mark.parametrize(
    "text",
    [
        "MemoryError: Unable to allocate 2.44 MiB for an array with shape (5000, 128)",
        "ArrowMemoryError: malloc of size 65536 failed",
        "RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate 16777216 bytes",
        "ImportError: libtorch_cpu.so: failed to map segment from shared object",
        "terminate called after throwing an instance of 'std::bad_alloc'",
        "BFCArena::AllocateRawInternal Failed to allocate memory for requested buffer",
    ],
)
def test_allocation_failures_read_as_out_of_memory(text: str) -> None:
    assert memory_exhausted(text)


def test_ordinary_errors_do_not_read_as_out_of_memory() -> None:
    assert not memory_exhausted("reflexd.trainer: error: snapshot s.parquet has 3 usable rows after dropping 0; a run needs at least 6 (trainer.cross_fit_from)")
    assert not memory_exhausted("reflexd.trainer event=epoch epoch=3/5 loss=0.1")


def fault(tmp_path: Path, code: int, log: str, result: dict | None = None) -> Exception:
    (tmp_path / "trainer.log").write_text(log)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    if result is not None:
        (out / "result.json").write_bytes(msgspec.json.encode(result))
    return trainer_fault(code, tmp_path / "trainer.log", out, max_mb=512)


def test_trainer_exit_statuses_become_clear_messages(tmp_path: Path) -> None:
    killed = fault(tmp_path, -9, "reflexd.trainer event=epoch epoch=7/50 loss=0.2\n")
    assert (killed.kind, killed.returncode) == ("killed", -9)
    assert str(killed).startswith("trainer was killed by SIGKILL")
    assert "exit status -9" in str(killed) and "epoch=7/50" in str(killed)

    segv = fault(tmp_path, -11, "")
    assert segv.kind == "killed" and "trainer was killed by SIGSEGV, exit status -11; last output: no output" == str(segv)

    aborted = fault(tmp_path, -6, "terminate called after throwing an instance of 'std::bad_alloc'\n")
    assert aborted.kind == "out_of_memory"
    assert str(aborted) == "trainer ran out of memory (max_memory_mb=512) and was killed by SIGABRT"

    oom = fault(tmp_path, 3, "", {"error": "trainer ran out of memory (max_memory_mb=512): MemoryError: x"})
    assert oom.kind == "out_of_memory" and str(oom).endswith("MemoryError: x")

    failed = fault(tmp_path, 2, "reflexd.trainer: error: too few rows\n", {"error": "too few rows"})
    assert (failed.kind, str(failed)) == ("exit", "trainer exited with status 2: too few rows")
