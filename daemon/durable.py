"""Files that survive a crash and folders no one else can tamper with: fsync by path, whole-file
replacement, private directories."""

from __future__ import annotations

import os
import stat
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


def private_dir(path: Path, what: str) -> str | None:
    """Make ``path`` (0750) if missing; why it cannot be trusted with ``what``, or None if it can.

    Whoever else can write to a directory can swap what the daemon keeps there, so it must belong
    to the daemon's user and not be writable by group or others.
    """
    path.mkdir(mode=0o750, parents=True, exist_ok=True)
    st = os.stat(path)
    if st.st_uid != os.geteuid():
        return f"{path} belongs to uid {st.st_uid}, not to the daemon (uid {os.geteuid()}); refusing to keep {what} there"
    return open_to_others(path, what, st)


def open_to_others(path: Path, what: str, st: os.stat_result | None = None) -> str | None:
    """Why the existing directory ``path`` cannot be trusted with ``what`` whoever owns it (group or
    others may write to it), or None. ``check-config``, run by whichever user, asks only this."""
    st = st or os.stat(path)
    if st.st_mode & 0o022:
        fix = (
            f"use a directory of its own below it, such as {path / 'reflexd'}, which the daemon creates 0750"
            if st.st_mode & stat.S_ISVTX  # a shared directory like /tmp: not one to chmod
            else f"chmod go-w {path}"
        )
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); refusing to keep {what} there ({fix})"
    return None
