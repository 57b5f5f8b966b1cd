"""reflexd: a local learning sidecar for autonomous agents.

The public face is small: ``Policy`` (the in-process client), ``load_config`` and the errors.
``Policy`` is imported lazily so that ``import reflexd`` stays light for tools that only read
configuration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from reflexd.config import Config, load_config, parse_config
from reflexd.errors import (
    ConfigError,
    DaemonUnavailable,
    FrameError,
    FrameTooLarge,
    ModelIntegrityError,
    ModelNotFound,
    ReflexdError,
    RequestFailed,
    StorageError,
    TrainingError,
)

if TYPE_CHECKING:
    from reflexd.client.policy import Choice, Policy

__version__ = "0.1.0"

__all__ = [
    "Choice",
    "Config",
    "ConfigError",
    "DaemonUnavailable",
    "FrameError",
    "FrameTooLarge",
    "ModelIntegrityError",
    "ModelNotFound",
    "Policy",
    "ReflexdError",
    "RequestFailed",
    "StorageError",
    "TrainingError",
    "load_config",
    "parse_config",
]


def __getattr__(name: str) -> Any:
    if name in ("Policy", "Choice"):
        from reflexd.client import policy

        return getattr(policy, name)
    raise AttributeError(f"module 'reflexd' has no attribute {name!r}")
