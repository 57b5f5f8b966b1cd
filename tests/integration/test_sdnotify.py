"""The notify protocol from the daemon's side, and the watchdog's tie to the event loop."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path

import anyio
import pytest

from reflexd.service import sdnotify


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch):
    path = Path(f"/tmp/rx-sd-{uuid.uuid4().hex[:8]}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()
    path.unlink(missing_ok=True)


def test_notify_sends_fields_as_one_datagram(notify_socket: socket.socket) -> None:
    assert sdnotify.notify("READY=1", "STATUS=ok")
    assert notify_socket.recv(1024) == b"READY=1\nSTATUS=ok"
    assert sdnotify.reloading()
    fields = notify_socket.recv(1024).decode().split("\n")
    assert fields[0] == "RELOADING=1" and fields[1].startswith("MONOTONIC_USEC=")


def test_without_systemd_notify_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False


def test_watchdog_interval_is_half_the_timeout_and_only_for_our_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() == 2.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None


def test_a_stalled_event_loop_stops_the_pings(notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 50 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    arrivals: list[float] = []
    done = threading.Event()

    def listen() -> None:
        notify_socket.settimeout(0.1)
        while not done.is_set():
            try:
                if notify_socket.recv(64) == b"WATCHDOG=1":
                    arrivals.append(time.monotonic())
            except TimeoutError:
                pass

    listener = threading.Thread(target=listen)
    listener.start()
    stall = {}

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sdnotify.watchdog)
            while len(arrivals) < 3:
                await anyio.sleep(0.01)
            stall["start"] = time.monotonic()
            time.sleep(1.0)  # the stall under test: blocks the event loop, not a wait
            stall["end"] = time.monotonic()
            while not arrivals or arrivals[-1] < stall["end"]:
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()

    try:
        anyio.run(main)
    finally:
        done.set()
        listener.join()
    during = [t for t in arrivals if stall["start"] + 0.1 < t < stall["end"]]
    assert not during, "pings kept coming while the loop was blocked"
    assert any(t >= stall["end"] for t in arrivals), "pings did not resume after the stall"
