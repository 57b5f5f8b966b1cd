"""Every failure reflexd reports on purpose: one exception type each, its message built in.

Each type carries a stable ``code``: the daemon sends it in the wire's ``error`` replies and the
CLI's ``--json`` output, so renaming a class never changes the protocol. ``tests`` keep the codes
unique and check that no other module defines an exception.
"""

from __future__ import annotations

from typing import ClassVar


class ReflexdError(Exception):
    """Base of every error reflexd raises on purpose."""

    code: ClassVar[str] = "error"


# ---- configuration and start-up -----------------------------------------------------------


class ConfigError(ReflexdError):
    """The configuration file is missing, unreadable or invalid."""

    code = "config"

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


class SocketError(ReflexdError):
    """The socket path cannot be used."""

    code = "socket"


class DaemonStartFailed(ReflexdError):
    """A daemon started as a child process (tests, benchmarks, the demo) did not come up."""

    code = "start_failed"

    def __init__(self, log_tail: str) -> None:
        super().__init__(f"the daemon did not start; its log:\n{log_tail}")


class UsageError(ReflexdError):
    """A command line that cannot be carried out as given."""

    code = "usage"


class UnknownPlugin(ReflexdError):
    """No plugin of that name is registered in an entry-point group."""

    code = "unknown_plugin"
    kind = "plugin"

    def __init__(self, group: str, name: str, available: list[str]) -> None:
        self.group = group
        self.name = name
        self.available = available
        choices = ", ".join(available) if available else "none installed"
        super().__init__(f"unknown {self.kind} {name!r}; available: {choices}")


class UnknownExplorer(UnknownPlugin, ValueError):
    code = "unknown_exploration"
    kind = "exploration strategy"


# ---- the wire -----------------------------------------------------------------------------


class FrameError(ReflexdError):
    """A frame on the socket could not be read as a message.

    ``code`` says how: ``malformed`` (not JSON/msgpack), ``invalid`` (not a valid message),
    ``timeout`` (left half-sent), ``too_large``.
    """

    code = "malformed"

    def __init__(self, reason: str, code: str | None = None) -> None:
        self.reason = reason
        if code is not None:
            self.code = code  # type: ignore[misc]  # one type, several wire codes
        super().__init__(reason)


class FrameTooLarge(FrameError):
    code = "too_large"

    def __init__(self, size: int, limit: int, hint: str = "") -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes{hint}")


class RedactionError(FrameError):
    """A message could not be redacted, so it is refused rather than stored as it came."""

    code = "invalid"

    def __init__(self, reason: str) -> None:
        super().__init__(f"cannot redact: {reason}")


class DaemonUnavailable(ReflexdError):
    """The daemon's socket could not be reached, or the connection failed.

    ``connecting``: it failed while connecting (``errno`` says why: ENOENT, ECONNREFUSED when no
    daemon listens); ``timed_out``: no answer came within the timeout.
    """

    code = "unavailable"

    def __init__(
        self, path: str, reason: str, errno: int | None = None, connecting: bool = False, timed_out: bool = False
    ) -> None:
        self.path = path
        self.errno = errno
        self.connecting = connecting
        self.timed_out = timed_out
        super().__init__(f"cannot reach reflexd at {path}: {reason}")


class RequestFailed(ReflexdError):
    """The daemon answered a request with an error; ``code`` is the one it sent."""

    code = "request_failed"

    def __init__(self, code: str, message: str) -> None:
        self.code = code  # type: ignore[misc]  # the daemon's code, passed on
        super().__init__(f"{code}: {message}")


class Forbidden(ReflexdError):
    """A peer the socket lets in sent a request reserved to administrators (``adopt``, ``promote``,
    ``rollback``, ``forget``): root, the daemon's own user, ``socket.admin_uids`` and members of
    ``socket.admin_gids`` may send those."""

    code = "forbidden"

    def __init__(self, request: str, uid: int) -> None:
        self.request = request
        self.uid = uid
        super().__init__(
            f"{request}: uid {uid} may not send it; it changes what is served or deletes data, which root, the"
            " daemon's own user and the peers in socket.admin_uids or socket.admin_gids may do"
        )


class RequestTimeout(ReflexdError):
    """A request waited on storage or training longer than ``socket.request_timeout``."""

    code = "request_timeout"

    def __init__(self, what: str, seconds: float, cause: str | None = None) -> None:
        self.seconds = seconds
        why = f"; the store reports: {cause}" if cause else ""
        super().__init__(f"{what} after {seconds:g} s (socket.request_timeout){why}")


# ---- models -------------------------------------------------------------------------------


class ModelIntegrityError(ReflexdError):
    """A model file in the registry does not match its manifest."""

    code = "model_integrity"

    def __init__(self, version: str, reason: str) -> None:
        self.version = version
        self.reason = reason
        super().__init__(f"model {version} refused: {reason}")


class ModelNotFound(ReflexdError):
    code = "model_not_found"

    def __init__(self, version: str, detail: str | None = None) -> None:
        self.version = version
        super().__init__(detail or f"no model version {version!r} in the registry")


class LineUnknown(ReflexdError):
    """A request about models that does not say whose: each agent (or group) learns in its own
    model line (``learning.scope``), so it must name one, and an agent with no line yet has none."""

    code = "line_unknown"


class PointerMoved(ReflexdError):
    """The live model changed while a decision about it was being taken."""

    code = "pointer_moved"

    def __init__(self, expected: str, current: str | None) -> None:
        self.expected = expected
        self.current = current
        super().__init__(f"the live model is {current or 'none'}, no longer {expected}")


class InstallError(ReflexdError):
    """``reflexd install-service`` cannot go on; the message says why and what to do."""

    code = "install"


class FeatureMismatch(ReflexdError):
    """A model brought in from elsewhere (``reflexd models pull``) hashes features differently
    from this host: it would be judged and served on inputs unlike those it was trained on."""

    code = "feature_mismatch"


class DuplicateModel(ReflexdError):
    """A model brought in from elsewhere (``reflexd models pull``) is already in the registry: the
    same file (its sha256) was registered before, as ``version``."""

    code = "duplicate_model"

    def __init__(self, version: str, message: str) -> None:
        self.version = version
        super().__init__(message)


# ---- storage ------------------------------------------------------------------------------


class StorageError(ReflexdError):
    """A write to the store failed (disk full, I/O error)."""

    code = "storage"


class StateDirError(StorageError):
    """The state directory cannot be trusted (someone else owns it, or others may write to it)."""

    code = "state_dir"


class RejectedData(StorageError):
    """DuckDB refused a batch for what it holds, not for the disk: retrying would fail alike."""

    code = "rejected_data"


class StoreDamaged(StorageError):
    """The database file fails its integrity check (a block's checksum, or bytes cut off); nothing is written to it."""

    code = "store_damaged"

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(
            f"the store {path} is damaged: {detail}. reflexd will not use it. Stop the daemon, move the file"
            f" aside with its write-ahead log (mv {path} {path}.damaged; mv {path}.wal {path}.damaged.wal,"
            " if there is one) and start again: the spool's acknowledged events are loaded into a new store,"
            " the Parquet archive keeps older experience, and tables still readable can be copied out of the"
            " damaged file (docs/operations.md, 'A damaged store')"
        )


class StoreInUse(StorageError):
    """Another process (a running daemon) holds the database file's lock."""

    code = "store_in_use"

    def __init__(self, path: str, holder: str) -> None:
        self.path = path
        self.holder = holder
        super().__init__(
            f"the store {path} is open in {holder}, most likely the running daemon; DuckDB lets one process"
            " open it at a time: stop the daemon (systemctl stop reflexd) to check it"
        )


class ImportFileError(ReflexdError):
    """A file as a whole cannot be imported (missing, unreadable, unknown format)."""

    code = "import_file"

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot import {path}: {reason}")


class BadLine(ReflexdError):
    """One line of a file being imported cannot be read as an event; the import goes on without it."""

    code = "bad_line"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


# ---- reading the data out -----------------------------------------------------------------


class SnapshotRefused(ReflexdError):
    """The daemon will not write another read-out snapshot now: it keeps a few at a time, and
    never fills the disk with them."""

    code = "snapshot_refused"


class QueryError(ReflexdError):
    """``reflexd query`` or ``reflexd export`` cannot run as asked: SQL DuckDB refuses (the message
    names the problem), a statement that is not a query, or snapshot files that cannot be read."""

    code = "query"


# ---- evaluation ---------------------------------------------------------------------------


class PolicySpecError(ReflexdError):
    """A policy given to ``evaluate`` cannot be read: its spelling, an exploration setting, or its file."""

    code = "policy_spec"

    def __init__(self, policy: str, reason: str) -> None:
        self.policy = policy
        self.reason = reason
        super().__init__(f"policy {policy!r}: {reason}")


class EvaluationError(ReflexdError):
    """A window of logged decisions cannot be evaluated as asked (too few decisions, a policy that
    does not cover them)."""

    code = "evaluation"


# ---- training -----------------------------------------------------------------------------


class TrainingError(ReflexdError):
    """A training run failed; the message says how."""

    code = "training"


class TooFewExperiences(TrainingError):
    """A run asked for before enough decisions have joined their rewards: nothing failed, and no
    automatic run is put off for it."""

    code = "too_few_experiences"


class TrainerFault(TrainingError):
    """The trainer subprocess itself failed: ``kind`` is "killed" (by a signal), "timeout"
    (``trainer.max_wall_time``), "out_of_memory" (``trainer.max_memory_mb``) or "exit" (a non-zero
    exit status); ``returncode`` is its exit status (negative: the signal that ended it)."""

    code = "trainer_fault"

    def __init__(self, kind: str, message: str, returncode: int | None = None) -> None:
        self.kind = kind
        self.returncode = returncode
        super().__init__(message)


class SnapshotError(TrainingError):
    """A snapshot file cannot be read as training data."""

    code = "snapshot"

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"snapshot {path}: {reason}")


class ExportError(TrainingError):
    """A trained model could not be written as the file clients load."""

    code = "export"

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"ONNX export to {path} failed: {reason}")


class UnknownLearner(UnknownPlugin, TrainingError):
    code = "unknown_learner"
    kind = "learner"


class UnknownExporter(UnknownPlugin, TrainingError):
    code = "unknown_exporter"
    kind = "exporter"


# ---- the fleet ----------------------------------------------------------------------------


class FleetError(ReflexdError):
    """``reflexd fleet train`` cannot go on: the fleet extra (Ray) is missing, an archive cannot be
    read, the hosts hold too few experiences, or a learner does not train data-parallel."""

    code = "fleet"


# ---- traces -------------------------------------------------------------------------------


class TraceError(ReflexdError):
    """An OTLP trace export that cannot be taken in (``reflexd.collect``): a body that does not
    decode, is too large or comes in a media type or encoding the receiver does not read.
    ``status`` is the HTTP status it is answered with (400, 413 or 415)."""

    code = "bad_trace"

    def __init__(self, reason: str, status: int = 400) -> None:
        self.reason = reason
        self.status = status
        super().__init__(reason)


# ---- knowledge extraction -----------------------------------------------------------------


class AnalysisError(ReflexdError):
    """A knowledge extraction (``reflexd.analysis``) cannot run as asked: its inputs or snapshot
    cannot be read, or the extraction subprocess failed; the message says which."""

    code = "analysis"
