"""A worker subprocess (the trainer, the extractor) run under a wall-time limit.

The child is killed when the limit passes or the daemon stops waiting for it (its task is
cancelled), and always reaped, so no run outlives the daemon or leaves a zombie behind.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio


class Finished:
    """How a child ended: its exit status, and whether the wall-time limit killed it."""

    __slots__ = ("returncode", "timed_out")

    def __init__(self, returncode: int | None, timed_out: bool) -> None:
        self.returncode = returncode
        self.timed_out = timed_out


async def run_child(
    cmd: Sequence[str],
    log_file: Path,
    env: dict[str, str],
    wall_time: float,
    started: Callable[[int | None], None] = lambda pid: None,
) -> Finished:
    """Run ``cmd`` with stdout and stderr in ``log_file``; ``started`` hears its pid, then None."""
    with open(log_file, "wb") as out:
        proc = await anyio.open_process(list(cmd), stdin=None, stdout=out, stderr=out, env=env)
        started(proc.pid)
        try:
            with anyio.move_on_after(wall_time) as limit:
                await proc.wait()
        finally:
            started(None)
            if proc.returncode is None:  # over the limit, or the daemon is stopping
                proc.kill()
                with anyio.CancelScope(shield=True):
                    await proc.wait()
    return Finished(proc.returncode, limit.cancelled_caught)


def prune(folder: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest run folders under ``folder``."""
    runs = sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    for old in runs[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
