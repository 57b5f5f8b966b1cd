"""reflexd: a local learning sidecar for autonomous agents.

The public face is small: ``Policy`` (the in-process client), ``load_config`` and every error
type (each with its stable ``code``).
``Policy`` is imported lazily so that ``import reflexd`` stays light for tools that only read
configuration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from reflexd.config import Config, ExplorationConfig, OnlineConfig, load_config, parse_config
from reflexd.errors import (
    AnalysisError,
    BadLine,
    ConfigError,
    DaemonStartFailed,
    DaemonUnavailable,
    DuplicateModel,
    EvaluationError,
    ExportError,
    FeatureMismatch,
    FleetError,
    Forbidden,
    FrameError,
    FrameTooLarge,
    ImportFileError,
    InstallError,
    LineUnknown,
    ModelIntegrityError,
    ModelNotFound,
    PointerMoved,
    PolicySpecError,
    QueryError,
    RedactionError,
    ReflexdError,
    RejectedData,
    RequestFailed,
    RequestTimeout,
    SnapshotError,
    SnapshotRefused,
    SocketError,
    StateDirError,
    StorageError,
    StoreDamaged,
    StoreInUse,
    TooFewExperiences,
    TraceError,
    TrainerFault,
    TrainingError,
    UnknownExplorer,
    UnknownExporter,
    UnknownLearner,
    UnknownPlugin,
    UsageError,
)

if TYPE_CHECKING:
    from reflexd.client.policy import Choice, Policy

__version__ = "0.1.0"

__all__ = [
    "AnalysisError",
    "BadLine",
    "Choice",
    "Config",
    "ConfigError",
    "DaemonStartFailed",
    "DaemonUnavailable",
    "DuplicateModel",
    "EvaluationError",
    "ExplorationConfig",
    "OnlineConfig",
    "ExportError",
    "FeatureMismatch",
    "FleetError",
    "Forbidden",
    "FrameError",
    "FrameTooLarge",
    "ImportFileError",
    "InstallError",
    "ModelIntegrityError",
    "LineUnknown",
    "ModelNotFound",
    "PointerMoved",
    "Policy",
    "PolicySpecError",
    "QueryError",
    "RedactionError",
    "ReflexdError",
    "RejectedData",
    "RequestFailed",
    "RequestTimeout",
    "SnapshotError",
    "SnapshotRefused",
    "SocketError",
    "StateDirError",
    "StorageError",
    "StoreDamaged",
    "StoreInUse",
    "TooFewExperiences",
    "TraceError",
    "TrainerFault",
    "TrainingError",
    "UnknownExplorer",
    "UnknownExporter",
    "UnknownLearner",
    "UnknownPlugin",
    "UsageError",
    "load_config",
    "parse_config",
]


def __getattr__(name: str) -> Any:
    if name in ("Policy", "Choice"):
        from reflexd.client import policy

        return getattr(policy, name)
    raise AttributeError(f"module 'reflexd' has no attribute {name!r}")
