"""Making what was written survive a crash: fsync by path, and whole-file replacement."""

from __future__ import annotations

import os
from pathlib import Path

from reflexd.errors import StorageError


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory so that names created or renamed in it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: after a crash it holds the old bytes or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"writing {path} failed: {exc.strerror or exc}") from None
