"""reflexd: a local learning sidecar for autonomous agents.

The public face is small: ``Policy`` (the in-process client), ``load_config`` and the errors.
``Policy`` is imported lazily so that ``import reflexd`` stays light for tools that only read
configuration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import Config, load_config, parse_config
from .errors import (
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
    from .client import Choice, Policy

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
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'reflexd' has no attribute {name!r}")
