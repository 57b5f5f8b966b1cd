"""Every failure reflexd reports has its own exception type with its message built in."""

from __future__ import annotations


class ReflexdError(Exception):
    """Base of every error reflexd raises on purpose."""


class ConfigError(ReflexdError):
    """The configuration file is missing, unreadable or invalid."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


class FrameError(ReflexdError):
    """A frame on the socket could not be read as a message."""

    def __init__(self, reason: str, code: str = "malformed") -> None:
        self.reason = reason
        self.code = code
        super().__init__(reason)


class FrameTooLarge(FrameError):
    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes", code="too_large")


class ModelIntegrityError(ReflexdError):
    """A model file in the registry does not match its manifest."""

    def __init__(self, version: str, reason: str) -> None:
        self.version = version
        self.reason = reason
        super().__init__(f"model {version} refused: {reason}")


class ModelNotFound(ReflexdError):
    def __init__(self, version: str) -> None:
        self.version = version
        super().__init__(f"no model version {version!r} in the registry")


class PointerMoved(ReflexdError):
    """The live model changed while a decision about it was being taken."""

    def __init__(self, expected: str, current: str | None) -> None:
        self.expected = expected
        self.current = current
        super().__init__(f"the live model is {current or 'none'}, no longer {expected}")


class DaemonUnavailable(ReflexdError):
    """The daemon's socket could not be reached."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        super().__init__(f"cannot reach reflexd at {path}: {reason}")


class RequestFailed(ReflexdError):
    """The daemon answered a request with an error."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(f"{code}: {message}")


class StorageError(ReflexdError):
    """A write to the store failed (disk full, I/O error)."""


class RejectedData(StorageError):
    """DuckDB refused a batch for what it holds, not for the disk: retrying would fail alike."""


class TrainingError(ReflexdError):
    """A training run failed; the message says how."""


class TrainerFault(TrainingError):
    """The trainer subprocess itself failed: ``kind`` is "killed" (by a signal), "timeout"
    (``trainer.max_wall_time``), "out_of_memory" (``trainer.max_memory_mb``) or "exit" (a non-zero
    exit status); ``returncode`` is its exit status (negative: the signal that ended it)."""

    def __init__(self, kind: str, message: str, returncode: int | None = None) -> None:
        self.kind = kind
        self.returncode = returncode
        super().__init__(message)
