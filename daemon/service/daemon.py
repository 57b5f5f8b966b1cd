"""The daemon: wires ingest, store, scheduler, registry and the socket together and runs them.

Lifecycle: open the store, bind the socket, tell systemd READY; SIGHUP reloads the config (a
bad file leaves the old one in force); SIGTERM/SIGINT stop accepting, drain what was accepted
into the store, and exit.
"""

from __future__ import annotations

import errno
import gc
import grp
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import anyio
import msgspec
from anyio.abc import SocketListener

from reflexd import __version__, log
from reflexd.collect.receiver import TraceReceiver, durably
from reflexd.config import (
    CLIENT_SETTINGS_FILE,
    Config,
    client_settings,
    exposed_key,
    keep_restart_only,
    load_config,
)
from reflexd.deciding.choosing import slate_events
from reflexd.deciding.online import ARITHMETIC as ONLINE_ARITHMETIC
from reflexd.durable import atomic_write, private_dir
from reflexd.errors import (
    ConfigError,
    LineUnknown,
    ModelNotFound,
    ReflexdError,
    RequestTimeout,
    SocketError,
    StateDirError,
    StorageError,
    TooFewExperiences,
    TrainingError,
)
from reflexd.service import activation, sdnotify
from reflexd.service.behaviour import BehaviourTrainer
from reflexd.service.endpoint import Endpoint
from reflexd.service.evaluation import WINDOWS_DIR, evaluate_window
from reflexd.service.ingest import Ingest
from reflexd.service.insights import Extractor
from reflexd.service.lines import Line, Lines
from reflexd.service.monitor import Monitor
from reflexd.service.scheduler import RUNS_DIR, Scheduler, TrainerStatus, check_pulled, may_hold, schedule
from reflexd.service.server import Server, fd_budget_problems, give_group, prepare_path
from reflexd.service.snapshots import Snapshots
from reflexd.service.spool import Spool
from reflexd.service.store import Store
from reflexd.wire.protocol import (
    Adopt,
    Decide,
    Decided,
    DecidedSlate,
    Decision,
    Done,
    Evaluate,
    Explain,
    Forget,
    InsightsRequest,
    Learned,
    Learnings,
    LearningsRequest,
    ModelsReply,
    ModelsRequest,
    Outcome,
    Promote,
    Release,
    Rollback,
    Scored,
    SlotDecided,
    Snapshot,
    StatusReply,
    StatusRequest,
    Train,
)

_log = log.get("reflexd")
MODEL_POLL_SECONDS = 0.5
MODEL_VERIFY_SECONDS = 30.0  # and at every status request
# status counts the outcomes of the last hour that name no stored decision: recent, so that
# outcomes whose decisions retention has since deleted are not counted
UNJOINED_WINDOW = 3600.0


class Daemon:
    """Owns the parts and wires them: each gets the collaborators it uses, and the config by a getter
    (``settings``) so that a reload reaches them all at once."""

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.started = time.time()
        # what ``status`` says of the config in force (``reload``)
        self.config_state: dict[str, Any] = {
            "path": config_path, "loaded_at": self.started, "reloads": 0, "reload_error": None, "reload_failed_at": None,
            "restart_pending": [],
        }
        # a model line per agent, group or all (learning.scope): its registry, served model, chooser
        # with the online head learning from the rewards of the socket's decisions, scheduler, monitor
        self.lines = Lines(self.settings, self._exploration_for)
        # held by a training run (of any line), and by forget: no snapshot is taken while an agent is deleted
        self.training_lock = anyio.Lock()
        # evaluate requests: one at a time (each holds a window of decisions in memory), models kept loaded
        self.evaluation_lock = anyio.Lock()
        self.rollbacks_requested = 0  # `reflexd rollback`; the monitor counts its automatic ones
        self.endpoint = Endpoint(config, self)  # metrics and health over HTTP, if metrics.path/port say so
        self.store: Store
        self.ingest: Ingest
        self.server: Server
        self.snapshots: Snapshots  # read-out snapshots: `reflexd query` and `reflexd export`
        self.extractor: Extractor  # knowledge extraction: `reflexd insights`
        self.behaviour: BehaviourTrainer  # the behaviour model over agents' steps
        self.traces: TraceReceiver  # OTLP/HTTP trace ingest, when traces.enabled
        self.socket_activated = False  # the agents' socket came from systemd (reflexd.socket)
        # set by a reload that changes the retention section: the pass runs again at once, so a
        # shorter check_interval or days takes effect now, not after the old interval's sleep
        self._retention_changed: anyio.Event | None = None

    def settings(self) -> Config:
        return self.config

    def _exploration_for(self, agent: str, manifest: Any) -> Any:
        # exploration travels with the model, so socket and in-process decisions explore alike
        if manifest is not None:
            return manifest.exploration_for(agent)
        return self.config.for_agent(agent).exploration

    # ---- running ---------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.config
        # a socket systemd passed (reflexd.socket) is checked before anything else is opened
        inherited = activation.inherited_socket(cfg.socket.path)
        self.socket_activated = inherited is not None
        try:
            refusal = private_dir(cfg.state_path, "its database, spool and models")
            if refusal is None:  # nothing is made in a directory that is refused
                cfg.models_path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateDirError(f"state_dir {cfg.state_dir}: {_cannot(exc)}") from None
        if refusal is not None:
            raise StateDirError(refusal)
        await anyio.to_thread.run_sync(self._publish_client_settings)
        # a damaged database file is refused (StoreDamaged) before anything writes to it
        await anyio.to_thread.run_sync(Store.check_file, cfg.db_path, cfg.store)
        self.store = await anyio.to_thread.run_sync(Store, cfg.db_path, cfg.store)
        spool = await anyio.to_thread.run_sync(Spool, cfg.state_path / "spool", cfg.ingest.segment_bytes)
        self.ingest = Ingest(self.store, spool, cfg.ingest)
        if cfg.online.enabled:
            self.ingest.on_outcomes = self._learn
        self.lines.open(await anyio.to_thread.run_sync(self.store.agents), self._line_services)
        for line in self.lines.all():  # lines with a live model serve it from the first decision
            await anyio.to_thread.run_sync(line.models.refresh)
        self.snapshots = Snapshots(self.settings, self.store)
        self.extractor = Extractor(
            self.settings, self.store, self.ingest,
            lambda: [(line.registry, self.lines.agents_of(line.name)) for line in self.lines.all()], self.training_lock,
        )
        self.behaviour = BehaviourTrainer(self.settings, self.store, self.training_lock)
        self.server = Server(cfg, self.ingest, self)
        for warning in fd_budget_problems(cfg):
            _log.warning("file descriptors", problem=warning)
        exposed = exposed_key(cfg.redaction)
        if exposed:
            _log.warning("redaction key exposed", problem=exposed)
        if inherited is None:
            sock_path = Path(cfg.socket.path)
            try:
                prepare_path(sock_path)
                listener = await anyio.create_unix_listener(sock_path, mode=cfg.socket.mode_bits)
            except OSError as exc:
                raise SocketError(f"socket.path {sock_path}: {_cannot(exc)}") from None
            self._apply_socket_permissions(sock_path)
        else:
            # systemd made the file, with its unit's mode and group, and keeps it: not ours to change
            sock, bound = inherited
            listener = await SocketListener.from_socket(sock)
            sock_path = Path(bound)
            if bound != cfg.socket.path:
                _log.warning(
                    "the socket systemd passed is not at socket.path; clients that read socket.path will not find it",
                    socket=bound,
                    socket_path=cfg.socket.path,
                )
        try:
            await self.endpoint.open_listeners()
            async with anyio.create_task_group() as writer_tg:
                writer_tg.start_soon(self.ingest.run)
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self.server.serve, listener)
                        # spans become steps and episodes, made durable as the socket's events are
                        self.traces = TraceReceiver(self.settings, self.server, durably(self.ingest, self.settings))
                        await tg.start(self.traces.run)
                        tg.start_soon(self.lines.run, self.store, tg, _start_line)
                        tg.start_soon(schedule, self._schedulers, self.store, self.settings)
                        tg.start_soon(self._follow_models)
                        tg.start_soon(self._retention)
                        tg.start_soon(self.snapshots.run)
                        tg.start_soon(self.extractor.run)
                        tg.start_soon(self.behaviour.run)
                        tg.start_soon(sdnotify.watchdog)
                        tg.start_soon(self._signals, tg.cancel_scope)
                        if self.endpoint.enabled:
                            tg.start_soon(self.endpoint.serve)
                        _log.info(
                            "reflexd ready",
                            socket=str(sock_path),
                            socket_activated=self.socket_activated,
                            state_dir=cfg.state_dir,
                            pid=os.getpid(),
                            online_head=ONLINE_ARITHMETIC if cfg.online.enabled else "off",
                        )
                        sdnotify.notify("READY=1", "STATUS=accepting events")
                finally:
                    # the listener is stopped; the writer commits what was accepted, then returns
                    self.ingest.close()
        finally:
            await self.endpoint.aclose()
            await listener.aclose()
            if not self.socket_activated:
                sock_path.unlink(missing_ok=True)
            await anyio.to_thread.run_sync(self.store.close)
            _log.info("reflexd stopped", stored=self.ingest.counters.stored)

    def _schedulers(self) -> list[Scheduler]:
        return [line.scheduler for line in self.lines.all() if line.scheduler is not None]

    def _line_services(self, line: Line) -> None:
        """A line's scheduler (training its agents' experience, one run at a time across lines) and
        rollback monitor, once the store is open (no I/O: a line may be made while deciding)."""
        line.scheduler = Scheduler(
            self.settings, self.store, self.ingest, line.registry, line.models, self.training_lock,
            agents=lambda: self.lines.agents_of(line.name), line=line.name,
        )
        line.monitor = Monitor(self.settings, line.registry, self.store, line.models)

    def _learn(self, outcomes: list[Outcome]) -> None:
        """The online head of the line that made each decision learns its reward, each line's
        rewards of a batch together; an outcome that does not name its agent is offered to each
        line's head until one made that decision."""
        by_line: dict[str, tuple[Line, list[tuple[str, float]], list[str]]] = {}
        for outcome in outcomes:
            if outcome.agent is None:
                self._learn_together(by_line)  # those before it first: a decision's first outcome wins
                for line in self.lines.all():
                    if line.chooser.learn(outcome.decision_id, outcome.reward):
                        break
                continue
            line = self.lines.existing(outcome.agent)
            if line is not None:
                _, rewards, agents = by_line.setdefault(line.name, (line, [], []))
                rewards.append((outcome.decision_id, outcome.reward))
                agents.append(outcome.agent)  # a line of several agents learns each outcome for its own agent's decision
        self._learn_together(by_line)

    @staticmethod
    def _learn_together(by_line: dict[str, tuple[Line, list[tuple[str, float]], list[str]]]) -> None:
        for line, rewards, agents in by_line.values():
            line.chooser.learn_many(rewards, agents)
        by_line.clear()

    def _apply_socket_permissions(self, path: Path) -> None:
        """The socket's mode, and its group on both the socket and its directory.

        Group members need the directory (0750) as much as the socket (0660) to connect.
        """
        sock = self.config.socket
        os.chmod(path, sock.mode_bits)
        if sock.group is None:
            return
        gid = sock.group if isinstance(sock.group, int) else grp.getgrnam(sock.group).gr_gid
        give_group(path.parent, gid)
        give_group(path, gid)

    async def _signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self.reload()
                    continue
                _log.info("stopping", signal=signal.Signals(signum).name)
                sdnotify.notify("STOPPING=1")
                scope.cancel()
                return

    def _reload_failed(self, exc: ConfigError) -> bool:
        _log.error("config reload failed; keeping the running config", error=str(exc))
        sdnotify.notify("READY=1", "STATUS=reload failed; old config in force")
        self.config_state.update(reload_error=str(exc), reload_failed_at=time.time())
        return False

    async def reload(self) -> bool:
        sdnotify.reloading()
        try:
            new = await anyio.to_thread.run_sync(load_config, self.config_path)
        except ConfigError as exc:
            return self._reload_failed(exc)
        # until a restart the running values stay: nothing moves to a new state_dir half-way
        new, pending = keep_restart_only(new, self.config)
        for setting in pending:
            _log.warning(f"{setting} changes take effect at restart")
        try:
            self.server.configure(new)  # reads the redaction key: the one step that can still fail
        except ConfigError as exc:
            return self._reload_failed(exc)
        self.config_state.update(
            loaded_at=time.time(), reloads=self.config_state["reloads"] + 1, reload_error=None, reload_failed_at=None,
            restart_pending=list(pending),
        )
        retention_changed = new.retention != self.config.retention
        self.config = new
        if retention_changed and self._retention_changed is not None:
            self._retention_changed.set()
        log.configure(new.log.level, new.log.format)
        self.ingest.configure(new.ingest)
        for line in self.lines.all():
            if line.online is not None:
                line.online.settings = new.online
        try:
            await anyio.to_thread.run_sync(self._publish_client_settings)
        except OSError as exc:
            _log.error("cannot publish the clients' settings", error=str(exc))
        try:
            if not self.socket_activated:
                self._apply_socket_permissions(Path(self.config.socket.path))
        except OSError as exc:
            _log.error("cannot apply the socket's new mode or group", error=str(exc))
        _log.info("config reloaded", path=self.config_path)
        sdnotify.notify("READY=1", "STATUS=config reloaded")
        return True

    def _publish_client_settings(self) -> None:
        """``models/clients.json``: what the config says to the agents' in-process clients."""
        atomic_write(self.config.models_path / CLIENT_SETTINGS_FILE, msgspec.json.encode(client_settings(self.config)))

    async def _follow_models(self) -> None:
        checked = time.monotonic()
        while True:
            # every line in one pass off the event loop: a thread hop each would cost a host with
            # thousands of agents' lines a core at this poll's rate
            await anyio.to_thread.run_sync(_follow, self.lines.all())
            if time.monotonic() - checked >= MODEL_VERIFY_SECONDS:
                checked = time.monotonic()
                await anyio.to_thread.run_sync(_verify_models, self.lines.all())
            await anyio.sleep(MODEL_POLL_SECONDS)

    async def _verify_model(self, line: Line) -> None:
        """``_verify_models`` of one line, off the event loop."""
        await anyio.to_thread.run_sync(_verify_models, [line])

    async def _retention(self) -> None:
        while True:
            # made before the settings are read: a reload during the pass below runs the next at once
            self._retention_changed = anyio.Event()
            cfg = self.config.retention
            cutoff = time.time() - cfg.days * 86400
            try:
                moved = await anyio.to_thread.run_sync(
                    self.store.archive, cutoff, self.config.archive_path, cfg.compression
                )
            except ReflexdError as exc:
                _log.error("archiving failed", error=str(exc))
            except Exception as exc:  # a bug must not end the retention task, and the daemon with it
                _log.exception("archiving failed unexpectedly", error=f"{type(exc).__name__}: {exc}")
            else:
                if any(moved.values()):
                    _log.info("archived old experience", **moved)
            if cfg.archive_max_days is not None or cfg.archive_max_mb is not None:
                await self._prune_archive(cfg)
            with anyio.move_on_after(cfg.check_interval):
                await self._retention_changed.wait()

    async def _prune_archive(self, cfg: Any) -> None:
        """Delete the archive's oldest day partitions past ``retention.archive_max_days`` or
        ``retention.archive_max_mb`` (``retention.prune_archive``), after each archiving pass."""
        max_bytes = cfg.archive_max_mb << 20 if cfg.archive_max_mb is not None else None
        try:
            pruned = await anyio.to_thread.run_sync(
                self.store.prune_archive, self.config.archive_path, time.time(), cfg.archive_max_days, max_bytes
            )
        except ReflexdError as exc:
            _log.error("pruning the archive failed", error=str(exc))
            return
        except Exception as exc:  # a bug must not end the retention task, and the daemon with it
            _log.exception("pruning the archive failed unexpectedly", error=f"{type(exc).__name__}: {exc}")
            return
        if pruned.partitions:
            _log.info("pruned the archive", **msgspec.structs.asdict(pruned))

    # ---- requests --------------------------------------------------------------------

    def decide(self, msgs: list[Decide]) -> list[tuple[Any, list[Decision]] | Scored]:
        """Answer several decide requests at once, in order: each answer with the decisions it logs.

        Plain requests are scored together in one pass; ``log`` false ones are only scored (a
        Scored reply, nothing logged, exploration's clock left alone); ``slots`` ones are ranked.
        """
        answers: list[Any] = [None] * len(msgs)
        plain = [i for i, m in enumerate(msgs) if m.log and m.slots is None]
        choices = self._by_line(
            plain, msgs, lambda line, some: line.chooser.choose_many([(m.agent, m.context, m.actions, m.id, m.default) for m in some], decoded=True)
        )
        for i, choice in zip(plain, choices):
            msg = msgs[i]
            reply = Decided(
                id=choice.id,
                action=choice.action,
                prob=choice.prob,
                model_version=choice.model_version,
                strategy=choice.strategy,
                req=msg.req,
            )
            event = choice.event(msg.agent, msg.context, msg.actions)
            if msg.episode is not None:
                event = msgspec.structs.replace(event, episode=msg.episode)
            answers[i] = (reply, [event])
        unlogged = [i for i, m in enumerate(msgs) if not m.log]
        scored = self._by_line(
            unlogged, msgs, lambda line, some: line.chooser.score_many([(m.agent, m.context, m.actions, m.default) for m in some])
        )
        for i, reply in zip(unlogged, scored):
            answers[i] = msgspec.structs.replace(reply, id=msgs[i].id, req=msgs[i].req)
        for i, msg in enumerate(msgs):
            if msg.log and msg.slots is not None:
                answers[i] = self._slate(msg)
        return answers

    def _by_line(self, indices: list[int], msgs: list[Decide], each: Any) -> list[Any]:
        """``each(line, requests)`` for the requests of each model line (scored together), in order."""
        grouped: dict[str, tuple[Line, list[int]]] = {}
        for i in indices:
            line = self.lines.for_agent(msgs[i].agent)
            grouped.setdefault(line.name, (line, []))[1].append(i)
        out: dict[int, Any] = {}
        for line, members in grouped.values():
            out.update(zip(members, each(line, [msgs[i] for i in members])))
        return [out[i] for i in indices]

    def _slate(self, msg: Decide) -> tuple[DecidedSlate, list[Decision]]:
        choices = self.lines.for_agent(msg.agent).chooser.choose_slate(msg.agent, msg.context, msg.actions, msg.slots or 1, msg.id)
        slots = [
            SlotDecided(
                id=c.id, slot=c.slot or 0, action=c.action, prob=c.prob, model_version=c.model_version, strategy=c.strategy
            )
            for c in choices
        ]
        reply = DecidedSlate(slate=choices[0].slate or "", slots=slots, req=msg.req)
        events = slate_events(choices, msg.agent, msg.context, msg.actions)
        if msg.episode is not None:
            events = [msgspec.structs.replace(e, episode=msg.episode) for e in events]
        return reply, events

    async def _line(self, agent: str | None, what: str, make: bool = False) -> Line:
        """The model line a request about ``agent`` is for (without one, the only line). A name no
        agent has used, and whose line has no folder, makes no line (a typo would otherwise get a
        scheduler and a monitor), unless ``make``: LineUnknown says so."""
        if agent is None:
            return self.lines.one(None, what)
        line = self.lines.existing(agent)
        if line is None:
            await self.lines.discover(self.store)
            line = self.lines.existing(agent)
        if line is None:
            # a line with models on disk (registered for the agent before it decides, say) is one
            if make or self.lines.path_of(self.lines.line_name(agent)).is_dir():
                return self.lines.for_agent(agent)
            raise LineUnknown(f"{what}: agent {agent!r} has logged no decision, so it has no model line yet")
        return line

    def learned(self, msgs: list[Learned]) -> None:
        """Online-head updates agents' Policies share: the daemon's head of each agent's line
        learns them too (its socket decisions benefit), each action's together, and they are
        passed on to the line's other processes (``LearningsRequest``)."""
        by_line: dict[str, tuple[Line, list[Learned]]] = {}
        for msg in msgs:
            line = self.lines.for_agent(msg.agent)
            by_line.setdefault(line.name, (line, []))[1].append(msg)
            line.relay.add(msg)
        for line, shared in by_line.values():
            if line.online is not None:
                line.online.absorb_many(shared)

    async def request(self, msg: msgspec.Struct) -> msgspec.Struct:
        req = getattr(msg, "req", None)
        if isinstance(msg, _ABOUT_LINES) and getattr(msg, "agent", None) is None:
            await self.lines.discover(self.store)  # "the only line" must count agents stored a moment ago
        if isinstance(msg, Explain):
            msg = self.server.redactor.apply(msg)  # explained as decided: on the redacted context
            explanation = await anyio.to_thread.run_sync(
                self.lines.for_agent(msg.agent).chooser.explain, msg.agent, msg.context, msg.actions, msg.top, msg.default
            )
            return msgspec.structs.replace(explanation, req=req)
        if isinstance(msg, StatusRequest):
            return await self.status(req, msg.agent)
        if isinstance(msg, ModelsRequest):
            if msg.agent is None and not self.lines.all():  # no agent has decided yet: no models either
                return ModelsReply(current=None, models=[], serving=None, req=req)
            line = await self._line(msg.agent, "models")
            scorer = line.models.scorer
            return ModelsReply(
                current=line.registry.current(),
                models=await anyio.to_thread.run_sync(line.registry.summary),
                serving=scorer.version if scorer is not None else None,
                line=line.name,
                req=req,
            )
        if isinstance(msg, Promote):
            line = await self._line(msg.agent, "promote")
            try:
                manifest = await anyio.to_thread.run_sync(line.registry.promote, msg.version)
            except ModelNotFound as exc:
                if exc.version != msg.version or line.name == "shared":
                    raise
                # numbers are counted across lines: the version may well be another agent's
                raise ModelNotFound(msg.version, f"no model version {msg.version!r} in model line {line.name}") from None
            await self._model_event(line, msg.version, "promoted", "by request")
            if line.scheduler is not None:
                await anyio.to_thread.run_sync(line.scheduler.release)  # automatic runs resume after a rollback by hand
            gate = manifest.gate
            # an operator's call to make, and said back: a model the gate refused now serves
            refused = f"; the gate had refused it ({gate.reason})" if gate is not None and not gate.passed else ""
            return Done(message=f"{msg.version} is live{_in(line)}{refused}", req=req)
        if isinstance(msg, Rollback):
            line = await self._line(msg.agent, "rollback")
            withdrawn, target = await anyio.to_thread.run_sync(line.registry.step_back)
            self.rollbacks_requested += 1
            if line.scheduler is not None:  # kept back: no automatic run promotes another model meanwhile
                why = f"rolled back by hand from {withdrawn} to {target or 'no model'}"
                await anyio.to_thread.run_sync(line.scheduler.hold, why)
            resume = "; automatic training waits until a version is promoted or `reflexd train` is run"
            if target is None:  # from the first model: the event is the withdrawn version's
                await self._model_event(line, withdrawn, "rolled_back", "by request, to no model")
                return Done(message=f"rolled back from {withdrawn} to no model{_in(line)}{resume}", req=req)
            await self._model_event(line, target, "rolled_back", "by request")
            return Done(message=f"rolled back to {target}{_in(line)}{resume}", req=req)
        if isinstance(msg, Train):
            # one line, or each in turn: a request to train trains every agent's line
            if msg.agent is None and not self.lines.all():
                raise TrainingError("no joined experiences yet: no agent has logged a decision")
            one = msg.agent is not None or len(self.lines.all()) <= 1
            if msg.agent is not None and self.lines.existing(msg.agent) is None:
                # an agent whose first events are still on their way to the store: stored first, its
                # line is found among the store's agents (a name nothing was logged under makes none)
                await self.ingest.barrier_within(
                    self.config.socket.request_timeout, "training: the store did not take in the events", loaded=True
                )
            lines = [await self._line(msg.agent, "train")] if one else self.lines.all()
            said = []
            for line in lines:
                assert line.scheduler is not None
                summary = await line.scheduler.train_once("requested")
                if summary.get("outcome") == "failed":
                    if len(lines) == 1:
                        raise (TooFewExperiences if summary.get("code") == TooFewExperiences.code else TrainingError)(summary["error"])
                    said.append(f"{line.name}: failed: {summary['error']}")
                    continue
                said.append(f"{summary['outcome']} {summary['version']}{_in(line)}: {summary['gate']}")
            return Done(message="\n".join(said), req=req)
        if isinstance(msg, Forget):
            removed = await self.forget(msg.agent)
            counts = ", ".join(f"{n} {what.replace('_', ' ')}" for what, n in removed.items())
            return Done(message=f"forgot agent {msg.agent!r}: removed {counts}", req=req)
        if isinstance(msg, Evaluate):
            return await self.evaluate(msg)
        if isinstance(msg, Adopt):
            # a model this host could never serve is refused as such, whichever line it was for
            await anyio.to_thread.run_sync(check_pulled, self.config, msg.manifest, msg.model, msg.source or "the pulled model")
            line = await self._line(msg.agent, "pull", make=True)
            assert line.scheduler is not None
            summary = await line.scheduler.adopt(msg.manifest, msg.model, msg.source)
            return Done(message=f"{summary['outcome']} {summary['version']}: {summary['gate']}", req=req)
        if isinstance(msg, InsightsRequest):
            return await self.extractor.answer(msg)
        if isinstance(msg, LearningsRequest):
            updates, last, missed = self.lines.for_agent(msg.agent).relay.since(msg.after)
            return Learnings(updates=updates, next=last, missed=missed, req=req)
        if isinstance(msg, Snapshot):
            return await self.snapshots.take(msg)  # writes in a worker thread, one at a time
        if isinstance(msg, Release):
            if msg.renew:  # its reader is still reading it
                return await self.snapshots.renew(msg.id, req)
            return await self.snapshots.release(msg.id, req)
        raise AssertionError(f"no handler for {type(msg).__name__}")  # the decoder admits no other type

    async def forget(self, agent: str) -> dict[str, int]:
        """Delete what is stored about ``agent``: rows, dead letters naming it, archive partitions,
        training snapshots, and its events among the spool lines the store once refused
        (``spool/rejected/``).

        Events already accepted but still queued in ingest are committed first (the barrier), so
        none of them is written after the delete. A training run in progress is waited for: its
        snapshot may hold the agent's rows, and no new snapshot is taken until this is done.
        Models already trained keep what they learned.
        """
        async with self.training_lock:
            await self.ingest.barrier_within(
                self.config.socket.request_timeout, f"forget: the store did not take in {agent!r}'s queued events", loaded=True
            )
            try:
                # no read-out snapshot is written meanwhile; those kept may hold the agent's rows
                async with self.snapshots.lock:
                    # checkpoints on both sides: spool/loaded/ must not give the agent's events back after
                    # a crash, and the delete must not live in the write-ahead log alone
                    await self.ingest.checkpoint()
                    removed = await anyio.to_thread.run_sync(self.store.forget, agent, self.config.archive_path)
                    removed["query_snapshots"] = await self.snapshots.remove_all()
                    await self.ingest.checkpoint()
                    removed["training_snapshots"] = await anyio.to_thread.run_sync(
                        _remove_snapshots, self.config.state_path / RUNS_DIR, lambda run: may_hold(run, agent)
                    )
                    removed["extraction_snapshots"] = await anyio.to_thread.run_sync(
                        _remove_snapshots, self.extractor.runs_dir
                    )
                    removed["behaviour_snapshots"] = await anyio.to_thread.run_sync(
                        _remove_snapshots, self.behaviour.runs_dir
                    )
                    # evaluation windows are deleted once read; any a crash left behind hold the agent's rows too
                    removed["evaluation_windows"] = await anyio.to_thread.run_sync(
                        _remove_windows, self.config.state_path / WINDOWS_DIR
                    )
                    removed["rejected_spool_events"] = await anyio.to_thread.run_sync(self.ingest.spool.forget, agent)
                    for line in self.lines.all():  # the online updates passed on hold hashed inputs of its contexts
                        line.relay.forget(agent)
                        if line.online is not None:  # and the head its contexts, kept to relearn them
                            line.online.forget(agent)
                    traces = getattr(self, "traces", None)
                    removed["waiting_trace_spans"] = await traces.forget(agent) if traces is not None else 0
                    await self.extractor.forgotten()
            except OSError as exc:  # deleting archive partitions or snapshot files
                raise StorageError(f"forgetting agent {agent!r} failed: {exc}") from exc
        _log.info("agent forgotten", agent=agent, **removed)
        return removed

    async def evaluate(self, msg: Evaluate) -> Any:
        """Evaluate policies on a window of logged decisions (``reflexd.service.evaluation``): the
        snapshot, loading and estimates run in a worker thread, one evaluation at a time."""
        limit = self.config.socket.request_timeout
        with anyio.move_on_after(limit) as waited:
            await self.evaluation_lock.acquire()
        if waited.cancelled_caught:
            raise RequestTimeout("evaluate: another evaluation is still running", limit)
        try:
            line = await self._line(msg.agent, "evaluate")
            return await anyio.to_thread.run_sync(evaluate_window, self.store, line.evaluation, self.config, msg, time.time())
        finally:
            self.evaluation_lock.release()

    def _traces_status(self) -> dict[str, Any] | None:
        traces = getattr(self, "traces", None)  # made once the server runs
        if traces is None or not self.config.traces.enabled:
            return None
        return {**msgspec.to_builtins(traces.counters), "waiting": traces.waiting, "path": str(traces.path) if traces.path else None, "ports": list(traces.ports)}

    async def _model_event(self, line: Line, version: str, event: str, reason: str) -> None:
        await anyio.to_thread.run_sync(line.models.refresh)  # loading a model is no work for the event loop
        _log.info(f"model {event}", line=line.name, version=version, reason=reason)
        await anyio.to_thread.run_sync(self.store.record_model_event, version, event, {"reason": reason}, time.time())

    async def _line_model(self, line: Line) -> dict[str, Any] | None:
        """What a line serves: its live model, or why CURRENT is not what is served."""
        scorer = line.models.scorer
        model = None
        if scorer is not None:
            m = scorer.manifest
            model = {
                "version": m.version,
                "created": m.created,
                "learner": m.learner,
                "train_rows": m.fit_rows,  # a pulled fleet model's: the fleet's
                "gate": msgspec.to_builtins(m.gate) if m.gate else None,
            }
        await self._verify_model(line)
        if line.models.error:
            model = {**(model or {}), "load_error": line.models.error}
        if line.models.file_error:
            model = {**(model or {}), "file_error": line.models.file_error}
        current = line.registry.current()
        if model is not None and current != model.get("version"):
            model["current"] = current  # CURRENT names a version the daemon does not serve
        broken = line.registry.broken()
        if broken:
            model = {**(model or {}), "broken_versions": broken}
        return model

    def _online(self, line: Line) -> dict[str, Any] | None:
        head = line.online
        return {**head.stats(), "apprentice": dict(line.chooser.apprentice)} if head is not None else None

    async def status(self, req: Any = None, agent: str | None = None) -> StatusReply:
        """The daemon's state. ``model``, ``trainer``, ``monitor`` and ``online`` are the model line
        of ``agent``, or of the only line there is; with more lines and no agent, ``trainer`` and
        ``online`` add the lines up and ``lines`` has a summary of each."""
        c = self.ingest.counters
        counts = await anyio.to_thread.run_sync(self.store.counts)
        now = time.time()
        asked = [await self._line(agent, "status")] if agent is not None else None  # may make the agent's line
        everything = self.lines.all()
        lines = asked if asked is not None else everything
        # new since training: each line's own since its last run, added up over several (every agent's before any line)
        counted = [line.scheduler.counted() for line in lines if line.scheduler is not None] or [(0.0, None)]
        matured = sum(await anyio.to_thread.run_sync(self.store.matured_counts, counted, now, self.config))
        unjoined = await anyio.to_thread.run_sync(self.store.outcomes_without_decision, now - UNJOINED_WINDOW)
        summary = {line.name: await self._line_summary(line) for line in everything}
        if len(lines) == 1:
            one = lines[0]
            assert one.scheduler is not None and one.monitor is not None
            model, trainer, monitor, online = (
                await self._line_model(one), one.scheduler.status.as_dict(), one.monitor.as_dict(), self._online(one)
            )
        elif not lines:  # no agent yet: no line, nothing trained
            model, trainer, monitor, online = None, TrainerStatus().as_dict(), {}, None
        else:
            model, monitor = None, {}
            trainer = _added([line.scheduler.status.as_dict() for line in lines if line.scheduler is not None])
            heads = [self._online(line) for line in lines]
            online = _added([h for h in heads if h is not None]) if any(h is not None for h in heads) else None
        return StatusReply(
            version=__version__,
            pid=os.getpid(),
            uptime=round(now - self.started, 3),
            state_dir=self.config.state_dir,
            socket=self.config.socket.path,
            ingest={
                "received": c.received,
                "stored": c.stored,
                "duplicates": c.duplicates,
                "dead_letters": c.dead_letters,
                "id_taken": c.id_taken,
                "queued": c.queued,
                "spooled": c.spooled,
                "recovered_from_spool": c.recovered,
                "refused_by_store": c.refused,
                "restored_after_loss": c.restored,
                "write_errors": c.write_errors,
                "unlogged_decisions": c.unlogged,
                "client_dropped": c.client_dropped,
                "connections": self.server.connections,
                "refused": self.server.refused,
                "shed": self.server.shed,  # turned away while out of file descriptors
                "idle_closed": self.server.idle_closed,
                "revoked": self.server.revoked,  # ended by a reload that no longer allows their peer
                "forbidden": self.server.forbidden,  # administrative requests refused (socket.admin_uids/admin_gids)
                **{f"stored_{k}": v for k, v in c.by_type.items()},
            },
            backlog=self.ingest.backlog,
            experience={**counts, "new_since_training": matured, "outcomes_without_decision": unjoined},
            model=model,
            trainer=trainer,
            monitor=monitor,
            online=online,
            lines=summary,
            config=dict(self.config_state),
            insights=self.extractor.summary(),
            traces=self._traces_status(),
            behaviour=await anyio.to_thread.run_sync(self.behaviour.summary),
            storage={
                "error": self.ingest.storage_error,
                "db_bytes": _size(self.config.db_path),
                "spool_bytes": self.ingest.spool.pending_bytes,
            },
            req=req,
        )


    async def _line_summary(self, line: Line) -> dict[str, Any]:
        """One line of ``status``: its agents, what it serves, its trainer and monitor at a glance."""
        scorer = line.models.scorer
        s = line.scheduler.status if line.scheduler is not None else None
        monitor = line.monitor
        return {
            "agents": self.lines.agents_of(line.name),
            "path": str(line.registry.root),
            "serving": scorer.version if scorer is not None else None,
            "load_error": line.models.error,
            "trainer": None if s is None else {
                "state": s.state, "runs": s.runs, "promoted": s.promoted, "rejected": s.rejected,
                "failures": s.failures, "refused_in_a_row": s.refused_in_a_row, "unconfirmed": s.unconfirmed,
                "waiting": s.waiting,
                "last_error": s.last_error,
                "last_refusal": s.refusals[-1]["reason"] if s.refusals else None,
            },
            "rollbacks": monitor.rollbacks if monitor is not None else 0,
            "online": None if line.online is None else {"arms": line.online.stats()["arms"], "updates": line.online.updates},
        }


# requests about models that name no agent: answered for the only line there is
_ABOUT_LINES = (ModelsRequest, Promote, Rollback, Train, Adopt, Evaluate)


def _follow(lines: list[Line]) -> None:
    """Each line's online head gives the default reward to decisions whose wait window passed with
    no outcome, and its served model follows its registry's pointer (blocking: a worker thread)."""
    for line in lines:
        if line.online is not None:
            line.online.expire()
        try:
            if line.models.refresh():
                scorer = line.models.scorer  # None: the pointer emptied by a rollback from the first model
                _log.info("serving model" if scorer else "serving no model", line=line.name,
                          version=scorer.version if scorer else None)
        except OSError as exc:  # the registry unreadable for now (out of descriptors, say): next poll
            _log.warning("cannot read the model registry", line=line.name, error=str(exc))


def _verify_models(lines: list[Line]) -> None:
    """Re-read each line's served model's file (``ModelSource.verify``); a change is logged once."""
    for line in lines:
        before = line.models.file_error
        if not line.models.verify() and line.models.file_error != before:
            _log.error("the served model's file changed on disk", line=line.name, error=line.models.file_error)


async def _start_line(line: Line, tg: Any) -> None:
    """A line's model loaded (off the event loop), then its scheduler, counting new experience
    from its live model's snapshot, and its monitor running."""
    assert line.scheduler is not None and line.monitor is not None
    await anyio.to_thread.run_sync(line.models.refresh)
    await anyio.to_thread.run_sync(line.scheduler.recall_hold)
    line.scheduler.start_from(line.models.scorer.manifest if line.models.scorer else None)  # ``schedule`` checks it from now
    tg.start_soon(line.monitor.run)


def _in(line: Line) -> str:
    return "" if line.name == "shared" else f" in {line.name}"


def _added(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Several lines' trainer (or online head) status as one: counts added up, each line's state listed."""
    out: dict[str, Any] = {"lines": len(parts)}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or key in ("next_attempt", "cutoff"):
                continue
            out[key] = out.get(key, 0) + value
    states = sorted({p["state"] for p in parts if "state" in p})
    if states:
        out["state"] = next((s for s in states if s != "idle"), "idle")
        out["states"] = states
    waiting = [p.get("waiting") for p in parts if p.get("waiting")]
    if parts and "waiting" in parts[0]:
        out["waiting"] = waiting[0] if len(waiting) == 1 else (f"{len(waiting)} lines waiting" if waiting else None)
    return out


def _remove_windows(directory: Path) -> int:
    windows = list(directory.glob("*.parquet*")) if directory.is_dir() else []  # .partial ones too
    for window in windows:
        window.unlink(missing_ok=True)
    return len(windows)


def _remove_snapshots(runs: Path, holds: Callable[[str], bool] = lambda run: True) -> int:
    """Delete what run folders keep of the rows they trained on: snapshots (a crash's ``.partial``
    ones too, and the decisions a first model is confirmed on) and results (a cross-fitted run's
    lists every decision id); of the runs whose folder name ``holds`` the rows asked about."""
    kept = (
        "*/snapshot.parquet*", "*/fresh.parquet*", "*/steps.parquet*", "*/out/result.json", "*/out/insights.json*",
        "*/inputs.json",
    )
    found = [p for pattern in kept for p in runs.glob(pattern)] if runs.is_dir() else []
    snapshots = [p for p in found if holds(p.relative_to(runs).parts[0])]
    for snapshot in snapshots:
        snapshot.unlink(missing_ok=True)
    return len(snapshots)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _cannot(exc: OSError) -> str:
    """Why a place the daemon makes could not be made, with what fixes a read-only one under systemd."""
    said = f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
    if exc.errno == errno.EROFS:
        said += (
            "; under the shipped systemd unit (ProtectSystem=strict) the file system is read-only but for"
            " /var/lib/reflexd, /run/reflexd and a private /tmp: add the folder to ReadWritePaths= in a drop-in"
        )
    return said


def run(config_path: str | None) -> None:
    """Entry point of ``reflexd run``."""
    config = load_config(config_path)
    log.configure(config.log.level, config.log.format)
    # What the daemon creates (database, archive, models) is its user's and its group's alone.
    os.umask(0o027)
    # Past a file-size limit a write should fail (EFBIG, retried like a full disk), not kill us.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # Queued events are many small containers: with the default thresholds the cyclic collector
    # walks them over and over (a third of ingest time). Freeze what start-up built, collect rarely.
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)
    try:
        anyio.run(Daemon(config, config_path).run)
    except ExceptionGroup as group:
        # a listener that could not be made fails in a task group: its own error says why, and
        # `reflexd run` turns it into an exit status as it does the ones raised before them
        found = _sole(group)
        if found is None:
            raise
        raise found from None


def _sole(group: BaseExceptionGroup) -> ReflexdError | None:
    """The one reflexd error a task group's failure comes down to, if there is exactly one."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 and isinstance(leaves[0], ReflexdError) else None
