"""What a worker subprocess (the trainers, the extraction) does for itself: yield the CPU, cap
its own address space, tell a refused allocation from other failures, and log one line per event.

The daemon limits the wall time from outside (``reflexd.service.child``); these are the limits a
process can only set on itself, before it loads anything large.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable

# an unexplained failure this close to the cap is taken for an allocation it refused
NEAR_LIMIT_BYTES = 64 << 20


def event_logger(name: str) -> Callable[..., None]:
    """``log(event, **fields)`` writing ``<name> event=... k=v`` lines to stderr (the run's log file)."""

    def log(event: str, **fields: object) -> None:
        parts = " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        print(f"{name} event={event} {parts}".rstrip(), file=sys.stderr, flush=True)

    return log


def lower_priority() -> None:
    """Yield the CPU to everything else on the host; a run that cannot do so still runs."""
    try:
        os.nice(19)
    except OSError:
        pass
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):  # AttributeError: no SCHED_IDLE outside Linux
        pass


def limit_memory(max_mb: int, log: Callable[..., None]) -> int | None:
    """Cap this process's address space at ``max_mb`` MiB (never above the hard limit).

    Returns the limit in bytes, or None where it cannot be set (the run then goes on unlimited).
    """
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = max_mb << 20
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, OSError, ValueError) as exc:
        log("memory_limit_not_set", max_memory_mb=max_mb, error=str(exc).replace(" ", "_"))
        return None
    return limit


def status_bytes(field: str) -> int | None:
    """A size from /proc/self/status (VmPeak: address space, VmHWM: resident memory, at their peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        pass
    return None


def out_of_memory(exc: BaseException, limit: int | None, reads_as_memory: Callable[[str], bool] = lambda _: False) -> bool:
    """Was ``exc`` (or what caused it) an allocation refused under the memory ``limit``?

    ``reads_as_memory`` tells an error message that says so in words (torch's, say).
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, MemoryError) or (isinstance(cause, OSError) and cause.errno == errno.ENOMEM):
            return True
        if reads_as_memory(f"{type(cause).__name__}: {cause}"):
            return True
        cause = cause.__cause__ or cause.__context__
    # extensions (and the import machinery) fail strangely when a malloc returns NULL: SystemError
    peak = status_bytes("VmPeak") if limit is not None else None
    return peak is not None and limit is not None and peak >= limit - NEAR_LIMIT_BYTES
