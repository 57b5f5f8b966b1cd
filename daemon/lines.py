"""Model lines: which agents learn together, and where their models live.

``learning.scope`` decides an agent's line:

- ``agent`` (the default): every agent its own line, ``models/agents/<agent>/``;
- ``group``: the agents of a ``learning.groups`` entry share ``models/groups/<group>/``, and an
  agent in no group has its own line;
- ``shared``: one line for all agents, the models directory itself (the layout before lines).

A line is a registry of its own (versions, CURRENT, history) with its own gate, rollback monitor,
online head and training runs. Version numbers are counted across every line (``next_number``),
so a version name (``v0007``) names one model wherever it is logged, evaluated or recorded.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Protocol

SHARED = "shared"
AGENTS_DIR = "agents"
GROUPS_DIR = "groups"
_VERSION_RE = re.compile(r"v(\d{4,})")
_PLAIN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_MAX_NAME = 120  # bytes of a folder name kept readable; longer names end in a digest


class LearningSettings(Protocol):
    scope: str
    groups: dict[str, list[str]]


def line_of(agent: str, learning: LearningSettings) -> str:
    """The line ``agent`` learns in: ``shared``, ``group:<name>`` or ``agent:<id>``."""
    if learning.scope == SHARED:
        return SHARED
    if learning.scope == "group":
        for group, members in learning.groups.items():
            if agent in members:
                return f"group:{group}"
    return f"agent:{agent}"


def line_path(models: Path, line: str) -> Path:
    """The folder of ``line`` under the models directory ``models``."""
    if line == SHARED:
        return models
    kind, _, name = line.partition(":")
    return models / (GROUPS_DIR if kind == "group" else AGENTS_DIR) / folder_name(name)


def folder_name(name: str) -> str:
    """``name`` as one safe folder name: plain names as they are, others percent-encoded (never
    ``.``/``..``, never a slash), and past ``_MAX_NAME`` bytes cut and ended with a digest."""
    if not _PLAIN.fullmatch(name):
        name = "".join(c if _PLAIN.fullmatch(c) and c != "." else "".join(f"%{b:02X}" for b in c.encode()) for c in name)
    if len(name.encode()) > _MAX_NAME:
        name = name[: _MAX_NAME - 17] + "~" + hashlib.sha256(name.encode()).hexdigest()[:16]
    return name


def line_folders(models: Path) -> list[Path]:
    """Every line folder there is under ``models``: the shared one and each agent's and group's."""
    found = [models]
    for kind in (AGENTS_DIR, GROUPS_DIR):
        parent = models / kind
        if parent.is_dir():
            found += sorted(p for p in parent.iterdir() if p.is_dir())
    return found


def next_number(models: Path) -> int:
    """One past the highest version number in any line (a folder without its manifest counts:
    numbers are never reused)."""
    highest = 0
    for folder in line_folders(models):
        for p in folder.iterdir() if folder.is_dir() else ():
            m = _VERSION_RE.fullmatch(p.name)
            if m and p.is_dir():
                highest = max(highest, int(m.group(1)))
    return highest + 1
