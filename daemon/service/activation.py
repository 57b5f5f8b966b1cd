"""Socket activation (sd_listen_fds(3)): the listening socket systemd opened for the daemon.

``reflexd.socket`` binds /run/reflexd/reflexd.sock with the owner, group and mode its unit names
and, when the service starts, passes it as file descriptor 3 with ``LISTEN_PID`` (the daemon's
pid), ``LISTEN_FDS`` (how many descriptors, from 3 on) and ``LISTEN_FDNAMES`` (their names,
colon-separated) in the environment. The daemon accepts on it as on a socket it bound itself, with
the same peer checks, and leaves the file alone: systemd made it and keeps it open across
restarts, so agents that connect while the daemon restarts wait in its backlog.

As sd_listen_fds does, the variables are removed from the environment once read (the trainer
subprocess must not think it was passed sockets) and the descriptors are marked close-on-exec.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import NamedTuple

from reflexd.durable import open_to_others
from reflexd.errors import SocketError

LISTEN_FDS_START = 3
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class Passed(NamedTuple):
    """One descriptor systemd passed: its number and its name (``FileDescriptorName=``, by default
    the socket unit's name), or None when systemd gave no names."""

    fd: int
    name: str | None

    def describe(self) -> str:
        return f"fd {self.fd}" + (f" ({self.name!r})" if self.name else "") + " passed by systemd"


def listen_fds(unset_environment: bool = True) -> list[Passed]:
    """The descriptors systemd passed to this process: none unless ``LISTEN_PID`` is our pid.

    ``SocketError`` if the variables cannot be read or a descriptor they announce is not open.
    """
    env = os.environ
    pid, count, names = (env.get(key) for key in _VARIABLES)
    if unset_environment:
        for key in _VARIABLES:
            env.pop(key, None)
    if not pid or not count:
        return []
    try:
        meant_for, n = int(pid), int(count)
    except ValueError:
        raise SocketError(f"socket activation: LISTEN_PID={pid!r} and LISTEN_FDS={count!r} must be numbers") from None
    if meant_for != os.getpid():
        return []  # set for another process (a parent that passed its environment on)
    if n < 0:
        raise SocketError(f"socket activation: LISTEN_FDS={count!r} is negative")
    labels: list[str | None] = list(names.split(":")) if names else []
    if len(labels) != n:
        labels = [None] * n  # names missing or not one per descriptor: go by number
    passed = [Passed(LISTEN_FDS_START + i, labels[i] or None) for i in range(n)]
    for p in passed:
        try:
            os.set_inheritable(p.fd, False)  # close-on-exec: the trainer subprocess must not hold it
        except OSError as exc:
            raise SocketError(f"socket activation: {p.describe()} is not open ({exc.strerror})") from None
    return passed


def listening_socket(passed: Passed) -> socket.socket:
    """``passed`` as a socket, checked to be a listening AF_UNIX stream socket; SocketError otherwise."""
    try:
        sock = socket.socket(fileno=passed.fd)
    except OSError as exc:
        raise SocketError(f"socket activation: {passed.describe()} is not a socket ({exc.strerror})") from None
    try:
        kind = f"{_name(socket.AddressFamily, sock.family)} {_name(socket.SocketKind, sock.type)}"
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise SocketError(
                f"socket activation: {passed.describe()} is {kind}, not a Unix stream socket;"
                " reflexd.socket must listen with ListenStream=/path/to/socket"
            )
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise SocketError(
                f"socket activation: {passed.describe()} is {kind} but not listening"
                " (a connection, as Accept=yes passes); reflexd.socket must use Accept=no"
            )
    except BaseException:
        sock.detach()  # the descriptor stays systemd's to close
        raise
    sock.setblocking(False)
    return sock


def bound_path(sock: socket.socket) -> str:
    """The path a Unix socket is bound to ("@name" for the abstract namespace, "" if unbound)."""
    name = sock.getsockname()
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return "@" + name[1:] if name.startswith("\0") else name


def inherited_socket(expected_path: str) -> tuple[socket.socket, str] | None:
    """The agents' listening socket, if systemd passed one, with the path it is bound to.

    One descriptor is taken whatever its path (the caller compares it with ``socket.path``); of
    several, the one bound to ``expected_path``. None when systemd passed nothing. Refused, like a
    socket the daemon binds itself (and as ``check-config`` says), in a directory that group or
    others may write to: whoever can write there can put another socket at its path for clients
    to reach. The directory's owner is not checked: systemd makes it (``DirectoryMode=``), as root.
    """
    passed = listen_fds()
    if not passed:
        return None
    if len(passed) == 1:
        sock = listening_socket(passed[0])
        return _trusted(sock, bound_path(sock))
    seen = []
    for p in passed:
        try:
            probe = socket.socket(fileno=p.fd)
        except OSError:
            seen.append(f"{p.describe()}: not a socket")
            continue
        try:
            path = bound_path(probe) if probe.family == socket.AF_UNIX else ""
        finally:
            probe.detach()
        if path == expected_path:
            return _trusted(listening_socket(p), path)
        seen.append(f"{p.describe()}: {path or 'not a Unix socket'}")
    raise SocketError(
        f"socket activation: systemd passed {len(passed)} descriptors and none is bound to socket.path"
        f" {expected_path}: " + "; ".join(seen)
    )


def _trusted(sock: socket.socket, path: str) -> tuple[socket.socket, str]:
    """(``sock``, ``path``) if ``path``'s directory is not open to others' writes (an abstract
    socket, "@name", has none); SocketError otherwise."""
    try:
        refusal = open_to_others(Path(path).parent, "the socket") if path.startswith("/") else None
    except OSError as exc:
        sock.close()
        raise SocketError(f"socket activation: cannot check the directory of {path}: {exc.strerror}") from None
    if refusal is not None:
        sock.close()
        raise SocketError(f"socket activation: {refusal}")
    return sock, path


def _name(kind: type[socket.AddressFamily | socket.SocketKind], value: int) -> str:
    try:
        return kind(value).name
    except ValueError:
        return str(int(value))
