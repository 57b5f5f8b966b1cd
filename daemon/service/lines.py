"""The daemon's model lines (``reflexd.lines``): one registry, served model, chooser, online head,
training scheduler and rollback monitor per line, made when the line's first agent shows up.

Training runs one at a time across lines (the training lock, FIFO); each line's scheduler checks
its own agents' new experience, so a busy agent cannot starve a quiet one of its turn.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import unquote

import anyio
import anyio.abc

from reflexd import log
from reflexd.config import Config
from reflexd.deciding.choosing import Chooser
from reflexd.deciding.online import OnlineHead, learned
from reflexd.deciding.scoring import ModelSource
from reflexd.errors import LineUnknown, ReflexdError
from reflexd.features import FeatureSpec
from reflexd.lines import AGENTS_DIR, GROUPS_DIR, SHARED, folder_name, line_of, line_path
from reflexd.registry import Registry
from reflexd.service.evaluation import Models
from reflexd.service.monitor import Monitor
from reflexd.service.scheduler import Scheduler
from reflexd.wire.protocol import Learned

_log = log.get("reflexd.lines")
DISCOVER_SECONDS = 5.0  # how often agents the store has seen (logged by in-process clients) get their line
START_SECONDS = 0.5  # how soon a line made by a decision gets its scheduler and monitor running


class Relay:
    """A line's online-head updates, numbered, the newest ``KEEP`` kept: those its agents' Policies
    share (``Learned``) and the daemon's own (socket decisions), for every process deciding for
    them to learn (``LearningsRequest``), each a fraction of a second later."""

    KEEP = 50_000
    BATCH = 5_000  # updates in one reply at most

    def __init__(self) -> None:
        self._kept: deque[tuple[int, Learned | None]] = deque(maxlen=self.KEEP)
        self.last = 0
        self._lock = threading.Lock()  # added to from the event loop and the head's expiry thread

    def add(self, update: Learned) -> None:
        with self._lock:
            self.last += 1
            self._kept.append((self.last, update))

    def since(self, after: int) -> tuple[list[Learned], int, int]:
        """(updates numbered after ``after``, the last one's number, how many were no longer kept).
        A number past the last (the daemon restarted since) starts the reader afresh from now."""
        with self._lock:
            if after >= self.last or not self._kept:
                return [], self.last, 0
            first = self._kept[0][0]  # numbers run on with no gap: a forgotten update leaves a None
            start = max(after + 1, first)
            found = list(islice(self._kept, start - first, start - first + self.BATCH))
        return [u for _, u in found if u is not None], found[-1][0], start - after - 1

    def forget(self, agent: str) -> None:
        with self._lock:
            for i, (n, u) in enumerate(self._kept):
                if u is not None and u.agent == agent:
                    self._kept[i] = (n, None)


@dataclass(eq=False)
class Line:
    name: str
    registry: Registry
    models: ModelSource
    chooser: Chooser
    evaluation: Models  # model versions loaded for `evaluate`, kept for reuse
    relay: Relay
    scheduler: Scheduler | None = None  # made once the store is open
    monitor: Monitor | None = None
    started: bool = False

    @property
    def online(self) -> OnlineHead | None:
        return self.chooser.online


class Lines:
    """Every model line the daemon serves, by name; ``for_agent`` makes a line on first use."""

    def __init__(self, settings: Callable[[], Config], exploration_for: Callable[[str, Any], Any]) -> None:
        self._settings = settings
        self._exploration_for = exploration_for
        self._lines: dict[str, Line] = {}
        self._agents: dict[str, set[str]] = {}  # line -> the agents seen deciding or stored in it
        self._services: Callable[[Line], None] | None = None

    @property
    def config(self) -> Config:
        return self._settings()

    def line_name(self, agent: str) -> str:
        return line_of(agent, self.config.learning)

    def for_agent(self, agent: str) -> Line:
        name = self.line_name(agent)
        line = self._lines.get(name) or self._make(name)
        members = self._agents.setdefault(name, set())
        if agent not in members:
            members.add(agent)
        return line

    def existing(self, agent: str) -> Line | None:
        """``agent``'s line if it has been made (a reward for a decision it never saw makes none)."""
        return self._lines.get(self.line_name(agent))

    def named(self, name: str) -> Line:
        line = self._lines.get(name)
        if line is None:
            raise LineUnknown(f"no model line {name!r} (lines: {', '.join(sorted(self._lines)) or 'none yet'})")
        return line

    def all(self) -> list[Line]:
        return [self._lines[name] for name in sorted(self._lines)]

    def agents_of(self, name: str) -> list[str] | None:
        """The agents whose experience trains line ``name``: None for the shared line (every agent),
        a group's members and those seen in it, or the one agent."""
        if name == SHARED:
            return None
        kind, _, rest = name.partition(":")
        if kind == "group":
            return sorted(set(self.config.learning.groups.get(rest, ())) | self._agents.get(name, set()))
        return [rest]

    def one(self, agent: str | None, what: str) -> Line:
        """The line a request about ``agent`` is for; without one, the only line there is (LineUnknown
        when there are several, or none yet while agents learn apart)."""
        if agent is not None:
            return self.for_agent(agent)
        lines = self.all()
        if len(lines) == 1:
            return lines[0]
        if not lines and self.config.learning.scope == SHARED:
            return self._make(SHARED)
        if not lines:
            raise LineUnknown(f"{what}: no agent has decided yet, so no model line exists (learning.scope {self.config.learning.scope})")
        named = []  # each line by an agent --agent takes: a group's line by one of its agents
        for line in lines:
            agents = self.agents_of(line.name)
            if not agents:  # a group with no agent known (gone from the config): by its name
                named.append(line.name)
            else:
                named.append(f"--agent {agents[0]}" + (f" ({line.name})" if line.name.startswith("group:") else ""))
        raise LineUnknown(f"{what}: name an agent: each learns in its own model line ({', '.join(named)})")

    def _make(self, name: str) -> Line:
        cfg = self.config
        models = cfg.models_path
        registry = Registry(line_path(models, name), models)
        source = ModelSource(registry)
        head, relay = None, Relay()
        if cfg.online.enabled:
            spec = FeatureSpec(cfg.features.context_dim, cfg.features.action_dim, cfg.features.seed)
            head = OnlineHead(cfg.online, spec, lambda agent: self.config.for_agent(agent).rewards)
            head.on_update = lambda *update: relay.add(learned(head, *update))  # socket decisions' updates, passed on
        line = Line(
            name, registry, source, Chooser(source, self._exploration_for, online=head), Models(registry, lambda: source.scorer), relay
        )
        self._lines[name] = line
        if self._services is not None:
            self._services(line)
        return line

    # ---- at start and while running -----------------------------------------------------

    def open(self, agents: list[str], services: Callable[[Line], None]) -> None:
        """Make the lines of ``agents`` (the store's) and of every line folder on disk, and give each
        line, now and later, its scheduler and monitor (``services``)."""
        self._services = services
        for line in self._lines.values():
            services(line)
        if self.config.learning.scope == SHARED:
            self._make(SHARED)  # the one line, there before any agent
        for agent in agents:
            self.for_agent(agent)
        for name in self._on_disk():
            if name not in self._lines:
                self._make(name)
        legacy = Registry(self.config.models_path).current() if self.config.learning.scope != SHARED else None
        if legacy is not None:  # an install from before lines: its live model is the shared line's
            _log.warning(
                "the models directory's live model is not served: agents learn in lines of their own "
                "(learning.scope); set learning.scope: shared to go on serving it",
                version=legacy, scope=self.config.learning.scope,
            )

    def _on_disk(self) -> list[str]:
        """Lines with models on disk that this config still routes agents to."""
        models = self.config.models_path
        scope = self.config.learning.scope
        if scope == SHARED:
            return []
        found = []
        agents_dir = models / AGENTS_DIR
        # a folder names its agent plainly or percent-encoded (a name cut short and ended with a digest
        # comes back by the store's agents), a line only while the config routes that agent alone
        for p in sorted(agents_dir.iterdir()) if agents_dir.is_dir() else ():
            agent = unquote(p.name, errors="replace") if "%" in p.name else p.name
            if p.is_dir() and folder_name(agent) == p.name and self.line_name(agent) == f"agent:{agent}":
                found.append(f"agent:{agent}")
        if scope == "group":
            for group in self.config.learning.groups:
                if (models / GROUPS_DIR / folder_name(group)).is_dir():
                    found.append(f"group:{group}")
        return found

    async def discover(self, store: Any) -> None:
        """Give every agent the store has seen its line now (a request about models, say, right after
        an import: the periodic look in ``run`` may not have come yet)."""
        for agent in await anyio.to_thread.run_sync(store.agents):
            self.for_agent(agent)

    async def run(
        self, store: Any, tg: anyio.abc.TaskGroup, start: Callable[[Line, anyio.abc.TaskGroup], Awaitable[None]]
    ) -> None:
        """Start each line's tasks as it appears, and give agents only the store has seen (their
        clients decide in-process) their line."""
        discovered = 0.0
        failed = None
        while True:
            for line in self.all():
                if not line.started:
                    line.started = True
                    try:
                        await start(line, tg)
                    except (ReflexdError, OSError) as exc:  # its registry unreadable for now: at the next pass
                        line.started = False
                        _log.warning("cannot start the model line yet", line=line.name, error=str(exc))
            await anyio.sleep(START_SECONDS)
            if anyio.current_time() - discovered < DISCOVER_SECONDS:
                continue
            discovered = anyio.current_time()
            try:
                await self.discover(store)
                failed = None
            except (ReflexdError, OSError) as exc:
                if str(exc) != failed:
                    _log.warning("cannot list the agents for their model lines", error=str(exc))
                failed = str(exc)

    def path_of(self, name: str) -> Path:
        return line_path(self.config.models_path, name)
