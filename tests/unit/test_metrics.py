"""The Prometheus collectors and the HTTP endpoint's replies, on a stand-in daemon (no sockets)."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from reflexd.config import ConfigError, parse_config
from reflexd.service.endpoint import Endpoint
from reflexd.service.ingest import Counters
from reflexd.service.metrics import DecideLatency, Metrics, version_number
from reflexd.service.scheduler import TrainerStatus

LINE = (("line", "agent:a"),)


def fake_daemon(**over: Any) -> SimpleNamespace:
    counters = Counters(received=10, stored=7, duplicates=1, dead_letters=2, queued=3, spooled=4, by_type={"decisions": 5, "outcomes": 2})
    ingest = SimpleNamespace(counters=counters, backlog=7, spool=SimpleNamespace(pending_bytes=1234), storage_error=None)
    latency = DecideLatency()
    server = SimpleNamespace(connections=2, refused=5, shed=1, idle_closed=3, revoked=0, decider=SimpleNamespace(latency=latency))
    status = TrainerStatus(runs=4, promoted=2, rejected=1, failures=1, last_run={"outcome": "promoted", "seconds": 2.5})
    manifest = SimpleNamespace(learner="mlp")
    models = SimpleNamespace(scorer=SimpleNamespace(version="v0012", manifest=manifest), error=None)
    monitor = SimpleNamespace(rollbacks=1, checks=9)
    line = SimpleNamespace(name="agent:a", scheduler=SimpleNamespace(status=status), models=models, monitor=monitor)
    d = SimpleNamespace(
        ingest=ingest,
        server=server,
        lines=SimpleNamespace(all=lambda: [line]),
        scheduler=line.scheduler,  # the one line's, for the tests below
        models=models,
        started=time.time() - 5,
        rollbacks_requested=2,
    )
    for key, value in over.items():
        setattr(d, key, value)
    return d


def samples(daemon: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = Metrics(daemon).exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_collector_reports_the_daemons_counters_with_prometheus_names() -> None:
    got = samples(fake_daemon())
    assert got[("reflexd_ingest_received_total", ())] == 10
    assert got[("reflexd_ingest_stored_total", ())] == 7
    assert got[("reflexd_ingest_duplicates_total", ())] == 1
    assert got[("reflexd_ingest_dead_letters_total", ())] == 2
    assert got[("reflexd_ingest_stored_by_table_total", (("table", "decisions"),))] == 5
    assert got[("reflexd_ingest_queued_events", ())] == 3
    assert got[("reflexd_ingest_spooled_events", ())] == 4
    assert got[("reflexd_backlog_events", ())] == 7
    assert got[("reflexd_spool_pending_bytes", ())] == 1234
    assert got[("reflexd_storage_error", ())] == 0
    assert got[("reflexd_connections", ())] == 2
    assert got[("reflexd_connections_closed_total", (("reason", "refused"),))] == 4  # shed counted apart
    assert got[("reflexd_connections_closed_total", (("reason", "shed"),))] == 1
    assert got[("reflexd_connections_closed_total", (("reason", "idle"),))] == 3
    assert got[("reflexd_training_runs_total", LINE)] == 4
    assert got[("reflexd_training_failures_total", LINE)] == 1
    assert got[("reflexd_gate_verdicts_total", (("line", "agent:a"), ("verdict", "passed")))] == 2
    assert got[("reflexd_gate_verdicts_total", (("line", "agent:a"), ("verdict", "rejected")))] == 1
    assert got[("reflexd_training_last_run_duration_seconds", LINE)] == 2.5
    assert got[("reflexd_training_in_progress", LINE)] == 0
    assert got[("reflexd_model_info", (("learner", "mlp"), ("line", "agent:a"), ("version", "v0012")))] == 1
    assert got[("reflexd_model_version", LINE)] == 12
    assert got[("reflexd_model_load_error", LINE)] == 0
    assert got[("reflexd_rollbacks_total", (("trigger", "automatic"),))] == 1
    assert got[("reflexd_rollbacks_total", (("trigger", "request"),))] == 2
    assert got[("reflexd_rollback_checks_total", LINE)] == 9
    assert ("reflexd_build_info", (("version", __import__("reflexd").__version__),)) in got
    assert 0 < time.time() - got[("reflexd_start_time_seconds", ())] < 60
    assert ("process_resident_memory_bytes", ()) in got  # the process collector, on the same registry


def test_collector_reads_the_counters_afresh_at_each_scrape() -> None:
    d = fake_daemon()
    assert samples(d)[("reflexd_storage_error", ())] == 0
    d.ingest.counters.received += 5
    d.ingest.storage_error = "[Errno 27] File too large"
    d.models.scorer = None
    d.scheduler.status.state = "training"
    d.scheduler.status.last_run = {"outcome": "failed", "at": 100.0, "finished": 103.5}
    got = samples(d)
    assert got[("reflexd_ingest_received_total", ())] == 15
    assert got[("reflexd_storage_error", ())] == 1
    assert got[("reflexd_model_version", LINE)] == 0
    assert not any(name == "reflexd_model_info" for name, _ in got)  # no live model: no sample
    assert got[("reflexd_training_in_progress", LINE)] == 1
    assert got[("reflexd_training_last_run_duration_seconds", LINE)] == 3.5


def test_decide_latency_is_a_cumulative_histogram_weighted_by_requests() -> None:
    d = fake_daemon()
    latency = d.server.decider.latency
    latency.observe(0.0002, 3)  # one batch of 3 requests
    latency.observe(0.003)
    latency.observe(10.0)  # past the last bound: +Inf only
    got = samples(d)
    name = "reflexd_decide_latency_seconds"
    assert got[(f"{name}_count", ())] == 5
    assert got[(f"{name}_sum", ())] == pytest.approx(0.0006 + 0.003 + 10.0)
    assert got[(f"{name}_bucket", (("le", "0.0001"),))] == 0
    assert got[(f"{name}_bucket", (("le", "0.00025"),))] == 3
    assert got[(f"{name}_bucket", (("le", "0.005"),))] == 4
    assert got[(f"{name}_bucket", (("le", "2.5"),))] == 4
    assert got[(f"{name}_bucket", (("le", "+Inf"),))] == 5


def test_version_number() -> None:
    assert version_number("v0012") == 12
    assert version_number(None) == 0
    assert version_number("fleet") == 0


def _status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def test_endpoint_routes_and_readiness() -> None:
    d = fake_daemon()
    endpoint = Endpoint(parse_config("metrics: {path: /tmp/x/metrics.sock}"), d)
    metrics = endpoint.route(b"/metrics")
    assert _status(metrics) == 200 and b"Content-Type: text/plain; version=" in metrics
    assert b"Connection: close" in metrics and b"reflexd_ingest_received_total 10.0" in metrics
    assert _status(endpoint.route(b"/healthz")) == 200
    ready = endpoint.route(b"/readyz")
    assert _status(ready) == 200
    assert msgspec.json.decode(ready.split(b"\r\n\r\n", 1)[1]) == {"ready": True, "reasons": []}
    d.ingest.storage_error = "[Errno 27] File too large"
    unready = endpoint.route(b"/readyz")
    assert _status(unready) == 503
    assert "storage is not writable" in msgspec.json.decode(unready.split(b"\r\n\r\n", 1)[1])["reasons"][0]
    d.ingest.storage_error = None
    endpoint.beat -= 5  # the event loop has not run the heartbeat for five seconds
    assert "event loop" in endpoint.readiness()[0]
    assert _status(endpoint.route(b"/nope")) == 404


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.4", "example.com", "::"])
def test_config_refuses_a_non_loopback_metrics_host(host: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"metrics: {{host: '{host}', port: 9465}}")
    assert any(p.startswith("metrics.host:") for p in info.value.problems)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_config_takes_a_loopback_metrics_host(host: str) -> None:
    assert parse_config(f"metrics: {{host: '{host}', port: 9465}}").metrics.port == 9465


def test_metrics_path_must_not_be_the_agents_socket() -> None:
    with pytest.raises(ConfigError):
        parse_config("socket: {path: /run/r/s.sock}\nmetrics: {path: /run/r/s.sock}")


def test_a_reload_keeps_the_running_metrics_section() -> None:
    from reflexd.config import keep_restart_only

    running = parse_config("metrics: {path: /run/r/m.sock}")
    new = parse_config("metrics: {port: 9465}\ngate: {margin: 0.1}")
    kept, pending = keep_restart_only(new, running)
    assert pending == ["metrics"] and kept.metrics == running.metrics and kept.gate.margin == 0.1
