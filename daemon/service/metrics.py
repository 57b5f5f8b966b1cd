"""Prometheus metrics: the daemon's own counters, read when scraped.

Nothing here counts on the hot path except :class:`DecideLatency`, which the socket's decider
updates once per batch. Everything else is read from the counters ``status`` reports (ingest, the
server, and each model line's scheduler, monitor and model source) by a custom collector at scrape time, on
the event loop, so the numbers are consistent with one another and cost nothing between scrapes.
The registry is the daemon's own (``CollectorRegistry``), never prometheus_client's global one.
"""

from __future__ import annotations

import bisect
import re
from typing import Any, Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from reflexd import __version__

# seconds; a socket decide takes ~50 µs to a few ms, a batch under load longer
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_VERSION_NUMBER = re.compile(r"(\d+)$")


class DecideLatency:
    """A latency histogram updated once per decided batch, weighted by the requests in it.

    prometheus_client's Histogram takes a lock and one ``observe`` per value; the decider runs on
    the event loop only, so plain integers do, and a batch of n requests is one bisect.
    """

    __slots__ = ("bounds", "counts", "total", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.total = 0
        self.sum = 0.0

    def observe(self, seconds: float, requests: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += requests
        self.total += requests
        self.sum += seconds * requests

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        buckets, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts):
            running += count
            buckets.append((bound, running))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.sum)


def version_number(version: str | None) -> int:
    """``v0012`` → 12; no version (or one without a number) → 0."""
    m = _VERSION_NUMBER.search(version or "")
    return int(m.group(1)) if m else 0


def _counter(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=list(labels) if labels else None)
    if labels:
        family.add_metric(list(labels.values()), value)
    else:
        family.add_metric([], value)
    return family


def _counters(prefix: str, rows: Iterable[tuple[str, float, str]]) -> Iterator[CounterMetricFamily]:
    """One unlabelled counter per (name, value, doc), named ``prefix_name``."""
    for name, value, doc in rows:
        yield _counter(f"{prefix}_{name}", doc, value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class DaemonCollector(Collector):
    """Reads a running daemon's counters (``Daemon.status`` shows the same ones) at scrape time.

    ``daemon`` needs ``ingest``, ``server``, ``lines`` (each with ``name``, ``scheduler``, ``monitor``
    and ``models``), ``started`` and ``rollbacks_requested``; ``loop_lag`` (seconds) comes from the HTTP endpoint's heartbeat.
    """

    def __init__(self, daemon: Any, loop_lag: Any = lambda: 0.0) -> None:
        self.daemon = daemon
        self.loop_lag = loop_lag

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        yield InfoMetricFamily("reflexd_build", "The running reflexd version.", value={"version": __version__})
        yield _gauge("reflexd_start_time_seconds", "Unix time the daemon started.", d.started)
        yield _gauge("reflexd_event_loop_lag_seconds", "How late the event loop's last heartbeat ran (0.1 s ticks).", self.loop_lag())
        yield from self._ingest(d.ingest)
        yield from self._server(d.server)
        lines = d.lines.all()  # each model line (reflexd.lines), labelled by its name
        yield from self._training(lines)
        yield from self._model(d, lines)
        traces = getattr(d, "traces", None)  # made once the server runs; absent while traces.enabled is off
        if traces is not None and d.config.traces.enabled:
            yield from self._traces(traces)

    def _ingest(self, ingest: Any) -> Iterator[Metric]:
        c = ingest.counters
        yield from _counters("reflexd_ingest", (
            ("received", c.received, "Events read off the socket (experience events and decisions the daemon made)."),
            ("stored", c.stored, "Events stored in DuckDB."),
            ("duplicates", c.duplicates, "Events not stored again because their id was already stored."),
            ("dead_letters", c.dead_letters, "Frames that could not be used, and decisions whose id another decision holds, kept in dead_letters."),
            ("id_taken", c.id_taken, "Of the dead letters, acknowledged decisions whose id another decision holds."),
            ("recovered_from_spool", c.recovered, "Events a previous run acknowledged, loaded from the spool at start."),
            ("refused_by_store", c.refused, "Events DuckDB refused, kept in spool/rejected/."),
            ("restored_after_loss", c.restored, "Events the store had lost since its last checkpoint, loaded again."),
            ("client_dropped", c.client_dropped, "Events clients reported dropping from a full buffer."),
            ("unlogged_decisions", c.unlogged, "Socket decisions served while the queue was full, so not stored."),
        ))
        yield _counter("reflexd_storage_write_errors", "Failed spool appends and DuckDB loads (each retried).", c.write_errors)
        by_type = CounterMetricFamily("reflexd_ingest_stored_by_table", "Events stored in DuckDB, by table.", labels=["table"])
        for kind, value in sorted(c.by_type.items()):
            by_type.add_metric([kind], value)
        yield by_type
        yield _gauge("reflexd_ingest_queued_events", "Events accepted and in memory, not yet in the spool.", c.queued)
        yield _gauge("reflexd_ingest_spooled_events", "Events acknowledged (in the spool), not yet in DuckDB.", c.spooled)
        yield _gauge("reflexd_backlog_events", "Events accepted and not yet in DuckDB (queued plus spooled).", ingest.backlog)
        yield _gauge("reflexd_spool_pending_bytes", "Spool bytes not yet loaded into DuckDB.", ingest.spool.pending_bytes)
        yield _gauge(
            "reflexd_storage_error",
            "1 while the last spool append or DuckDB load failed (status storage.error says why), else 0.",
            1 if ingest.storage_error else 0,
        )

    def _server(self, server: Any) -> Iterator[Metric]:
        yield _gauge("reflexd_connections", "Open connections on the agents' socket.", server.connections)
        refused = CounterMetricFamily(
            "reflexd_connections_closed", "Connections turned away or ended by the daemon, by reason.", labels=["reason"]
        )
        refused.add_metric(["refused"], server.refused - server.shed)
        refused.add_metric(["shed"], server.shed)
        refused.add_metric(["idle"], server.idle_closed)
        refused.add_metric(["revoked"], server.revoked)
        yield refused
        yield server.decider.latency.family(
            "reflexd_decide_latency_seconds",
            "Socket decide requests: seconds from their batch forming to their replies being ready.",
        )

    def _training(self, lines: list[Any]) -> Iterator[Metric]:
        families = {
            "runs": CounterMetricFamily("reflexd_training_runs", "Training runs started, by model line.", labels=["line"]),
            "failures": CounterMetricFamily(
                "reflexd_training_failures", "Training runs that failed (the trainer, the snapshot or the export).", labels=["line"]
            ),
            "verdicts": CounterMetricFamily(
                "reflexd_gate_verdicts", "The gate's verdicts on candidates: passed (promoted) or rejected.", labels=["line", "verdict"]
            ),
            "consecutive": GaugeMetricFamily(
                "reflexd_training_consecutive_failures", "Failed runs in a row (the backoff doubles with each).", labels=["line"]
            ),
            "busy": GaugeMetricFamily(
                "reflexd_training_in_progress", "1 while a training run is snapshotting, training or gating.", labels=["line"]
            ),
            "duration": GaugeMetricFamily(
                "reflexd_training_last_run_duration_seconds", "Wall time of the last finished run (0 before any).", labels=["line"]
            ),
            "rows": GaugeMetricFamily("reflexd_training_trained_on_examples", "Experiences the last run's snapshot held.", labels=["line"]),
            "refused": GaugeMetricFamily(
                "reflexd_gate_refused_in_a_row", "Candidates the gate refused since the line's last promotion.", labels=["line"]
            ),
        }
        for line in lines:
            if line.scheduler is None:
                continue
            s, name = line.scheduler.status, [line.name]
            families["runs"].add_metric(name, s.runs)
            families["failures"].add_metric(name, s.failures)
            families["verdicts"].add_metric([line.name, "passed"], s.promoted)
            families["verdicts"].add_metric([line.name, "rejected"], s.rejected)
            families["consecutive"].add_metric(name, s.consecutive_failures)
            families["busy"].add_metric(name, 0 if s.state == "idle" else 1)
            families["duration"].add_metric(name, _duration(s.last_run))
            families["rows"].add_metric(name, s.trained_on)
            families["refused"].add_metric(name, s.refused_in_a_row)
        yield from families.values()

    def _traces(self, traces: Any) -> Iterator[Metric]:
        c = traces.counters
        yield from _counters("reflexd_traces", (
            ("spans", c.spans, "Spans in OTLP export requests the receiver accepted."),
            ("steps", c.steps, "Steps made from spans and made durable."),
            ("episodes", c.episodes, "Episodes made from invoke_agent spans."),
            ("late_steps", c.late_steps, "Steps stored after their episode."),
            ("expired_steps", c.expired, "Steps stored without their invoke_agent span (timed out, or too many pending)."),
            ("rejected_spans", c.rejected_spans, "Spans refused (reported in partial_success)."),
            ("refused_steps", c.refused_steps, "Acknowledged steps refused later with their episode."),
            ("reward_errors", c.reward_errors, "Reward expressions that gave no value (0 stored)."),
        ))
        answered = CounterMetricFamily(
            "reflexd_traces_requests", "OTLP export requests answered, by HTTP status.", labels=["status"]
        )
        for status, count in sorted(c.by_status.items()):
            answered.add_metric([str(status)], count)
        yield answered
        yield _gauge("reflexd_traces_waiting_steps", "Steps waiting for their episode's invoke_agent span.", traces.waiting)

    def _model(self, d: Any, lines: list[Any]) -> Iterator[Metric]:
        live = InfoMetricFamily("reflexd_model", "The model version each line serves (absent while none).", labels=["line", "learner"])
        number = GaugeMetricFamily("reflexd_model_version", "Number of the served model version (v0012 → 12); 0 while none.", labels=["line"])
        failing = GaugeMetricFamily(
            "reflexd_model_load_error", "1 while the version CURRENT names cannot be served (status model.load_error), else 0.", labels=["line"]
        )
        checks = CounterMetricFamily("reflexd_rollback_checks", "Comparisons the rollback monitor made.", labels=["line"])
        automatic = 0
        for line in lines:
            scorer = line.models.scorer
            version = scorer.version if scorer is not None else None
            if scorer is not None:
                live.add_metric([line.name, scorer.manifest.learner], {"version": version})
            number.add_metric([line.name], version_number(version))
            failing.add_metric([line.name], 1 if line.models.error else 0)
            if line.monitor is not None:
                checks.add_metric([line.name], line.monitor.checks)
                automatic += line.monitor.rollbacks
        yield live
        yield number
        yield failing
        rollbacks = CounterMetricFamily("reflexd_rollbacks", "Rollbacks to the previous model version (or from the first to none), by trigger.", labels=["trigger"])
        rollbacks.add_metric(["automatic"], automatic)
        rollbacks.add_metric(["request"], d.rollbacks_requested)
        yield rollbacks
        yield checks


def _duration(last_run: dict[str, Any] | None) -> float:
    if not last_run:
        return 0.0
    if "seconds" in last_run:
        return float(last_run["seconds"])
    if "finished" in last_run and "at" in last_run:
        return float(last_run["finished"]) - float(last_run["at"])
    return 0.0


class Metrics:
    """The daemon's registry: its counters, the decide latency, and the process's own
    (``process_cpu_seconds_total``, ``process_resident_memory_bytes``, open file descriptors)."""

    def __init__(self, daemon: Any, loop_lag: Any = lambda: 0.0) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DaemonCollector(daemon, loop_lag))
        ProcessCollector(registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
