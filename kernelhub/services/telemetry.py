"""What an operator watches: the sandbox lifecycle log lines and the Prometheus metrics of one gateway.

:class:`Telemetry` is told of each lifecycle event by :class:`~kernelhub.services.sandboxes.Sandboxes`
(created, ready, failed, stopped, deleted, reaped), of each execution's end by
:class:`~kernelhub.services.executor.Executor`, and of each error answer by the one place errors become answers
(:mod:`kernelhub.handlers.base`). It writes one INFO line per lifecycle event to the ``kernelhub.services``
logger (ids, tenant names, templates, reasons and times: never a key, never code) and keeps the counters and
histograms below in a :class:`~prometheus_client.CollectorRegistry` of its own (not the process-wide default,
so one process can run several hubs, as the tests do). Gauges of what is live now (sandboxes by template and
state, sessions, the warm pool) are read from the hub when scraped, never kept twice.

The metrics (``GET /metrics``, Prometheus text format):

- ``kernelhub_sandboxes{template, state}``: sandboxes by state (``starting``, ``running``, ``stopped``,
  ``failed``; stopped ones until ``--Hub.stopped_retention_s``);
- ``kernelhub_sessions{type, language}``: open sessions of running sandboxes;
- ``kernelhub_sandboxes_created_total{template}``, ``kernelhub_sandboxes_failed_total{template}``,
  ``kernelhub_sandboxes_stopped_total{template, reason}`` (reason ``deleted``, ``idle``, ``lifetime``,
  ``oom``, ``shutdown``, ...);
- ``kernelhub_sandbox_start_seconds{template}``: histogram, from the request to the first kernel ready;
- ``kernelhub_executions_total{status, reason}``: ended executions by status (``ok``, ``error``, ``timeout``,
  ``killed``) and reason (``oom``, ``pids``, ``timeout``, ``output_truncated``, ... or empty);
- ``kernelhub_execution_seconds{status}``: histogram of their run time (from start to end, queueing excluded);
- ``kernelhub_errors_total{code}``: error answers by ``error`` code (:mod:`kernelhub.errors`);
- ``kernelhub_pool_ready{template}``, ``kernelhub_pool_starting{template}``, ``kernelhub_pool_size{template}``:
  the warm pool, when the hub has one (see :data:`PoolState`);
- ``kernelhub_egress_bytes_total{direction}``: bytes sandboxes received from (``in``) and sent to (``out``) the
  network through their egress proxies, ``kernelhub_egress_denied_total``: egress refusals,
  ``kernelhub_egress_proxies``: proxies open now (when the hub has egress, see :data:`EgressTotals`);
- ``kernelhub_info{version}``: always 1.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__

if TYPE_CHECKING:
    from .executions import Execution
    from .sandboxes import SandboxRecord

log = logging.getLogger("kernelhub.services")

#: What a warm pool reports, per template: ``{template: {"ready": n, "starting": n, "size": n}}`` (a mapping, or
#: an object with those attributes, per template). The hub's ``pool`` (an object with ``state()``) feeds it.
PoolState = Mapping[str, Any]
POOL_FIELDS = ("ready", "starting", "size")
#: What the egress service reports: ``{"net_rx_bytes", "net_tx_bytes", "denied", "proxies"}``
#: (:meth:`~kernelhub.services.egress.EgressService.totals`).
EgressTotals = Mapping[str, int]
#: Histogram buckets for starts and executions, seconds.
START_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
EXECUTION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)


class _LiveCollector(Collector):
    """The gauges read from the hub when scraped: sandboxes, sessions, the pool."""

    def __init__(self, records: Callable[[], Iterable[SandboxRecord]],
                 pool_state: Callable[[], PoolState | None],
                 egress_totals: Callable[[], EgressTotals | None] = lambda: None) -> None:
        self.records = records
        self.pool_state = pool_state
        self.egress_totals = egress_totals

    def collect(self) -> Iterator[Metric]:
        sandboxes = GaugeMetricFamily("kernelhub_sandboxes", "Sandboxes the gateway holds, by template and state.",
                                      labels=["template", "state"])
        sessions = GaugeMetricFamily("kernelhub_sessions", "Open sessions of running sandboxes, by type and "
                                     "language.", labels=["type", "language"])
        by_state: dict[tuple[str, str], int] = {}
        by_session: dict[tuple[str, str], int] = {}
        for record in list(self.records()):
            key = (record.template.name, record.state)
            by_state[key] = by_state.get(key, 0) + 1
            if record.state == "running":
                for session in list(record.sessions.values()):
                    skey = (session.type, session.language or "")
                    by_session[skey] = by_session.get(skey, 0) + 1
        for (template, state), count in sorted(by_state.items()):
            sandboxes.add_metric([template, state], count)
        for (kind, language), count in sorted(by_session.items()):
            sessions.add_metric([kind, language], count)
        yield sandboxes
        yield sessions
        info = GaugeMetricFamily("kernelhub_info", "This gateway's version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield from self._egress()
        pool = self.pool_state()
        if not pool:
            return
        families = {name: GaugeMetricFamily(f"kernelhub_pool_{name}", f"The warm pool's {name} sandboxes, by "
                                            "template." if name != "size" else "The warm pool's target size, by "
                                            "template.", labels=["template"]) for name in POOL_FIELDS}
        for template, entry in sorted(pool.items()):
            for name in POOL_FIELDS:
                value = entry.get(name) if isinstance(entry, Mapping) else getattr(entry, name, None)
                if isinstance(value, (int, float)):
                    families[name].add_metric([str(template)], value)
        yield from families.values()

    def _egress(self) -> Iterator[Metric]:
        totals = self.egress_totals()
        if totals is None:
            return
        moved = CounterMetricFamily("kernelhub_egress_bytes", "Bytes sandboxes received from (in) and sent to "
                                    "(out) the network through their egress proxies.", labels=["direction"])
        moved.add_metric(["in"], totals["net_rx_bytes"])
        moved.add_metric(["out"], totals["net_tx_bytes"])
        yield moved
        yield CounterMetricFamily("kernelhub_egress_denied", "Egress requests and tunnels refused.",
                                  value=totals["denied"])
        yield GaugeMetricFamily("kernelhub_egress_proxies", "Sandbox egress proxies open now.",
                                value=totals["proxies"])


class Telemetry:
    """One gateway's lifecycle log lines and metrics (see the module). Built by the hub with what its gauges
    read: ``records`` (every :class:`~kernelhub.services.sandboxes.SandboxRecord`), ``pool_state`` (the warm
    pool's :data:`PoolState`, or None without a pool) and ``egress_totals`` (:data:`EgressTotals`, or None
    without egress)."""

    def __init__(self, records: Callable[[], Iterable[SandboxRecord]],
                 pool_state: Callable[[], PoolState | None] = lambda: None,
                 egress_totals: Callable[[], EgressTotals | None] = lambda: None) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.created = Counter("kernelhub_sandboxes_created", "Sandboxes created, by template.", ["template"],
                               registry=reg)
        self.failed = Counter("kernelhub_sandboxes_failed", "Sandboxes that failed to start or died, by "
                              "template.", ["template"], registry=reg)
        self.stopped = Counter("kernelhub_sandboxes_stopped", "Sandboxes stopped, by template and reason.",
                               ["template", "reason"], registry=reg)
        self.start_seconds = Histogram("kernelhub_sandbox_start_seconds", "Time from a sandbox_create to its "
                                       "first kernel ready, seconds.", ["template"], buckets=START_BUCKETS,
                                       registry=reg)
        self.executions = Counter("kernelhub_executions", "Ended executions, by status and reason.",
                                  ["status", "reason"], registry=reg)
        self.execution_seconds = Histogram("kernelhub_execution_seconds", "Run time of ended executions "
                                           "(queueing excluded), seconds.", ["status"], buckets=EXECUTION_BUCKETS,
                                           registry=reg)
        self.errors = Counter("kernelhub_errors", "Error answers, by error code.", ["code"], registry=reg)
        reg.register(_LiveCollector(records, pool_state, egress_totals))

    # -- sandboxes (called by Sandboxes) ------------------------------------------------------------------

    def sandbox_created(self, record: SandboxRecord) -> None:
        """A sandbox exists (its first kernel is starting)."""
        self.created.labels(record.template.name).inc()
        limits = record.limits
        log.info("sandbox %s created for tenant %s: template %s, memory %d MiB, cpu %s, pids %d, disk %d MiB",
                 record.id, record.tenant.name, record.template.name, limits.memory_mb, limits.cpu, limits.pids,
                 limits.disk_mb)

    def sandbox_ready(self, record: SandboxRecord, seconds: float) -> None:
        """Its first kernel answered: ``seconds`` since the create was asked for."""
        self.start_seconds.labels(record.template.name).observe(seconds)
        log.info("sandbox %s ready in %.2f s", record.id, seconds)

    def sandbox_failed(self, template: str, sandbox_id: str | None, reason: str) -> None:
        """The sandbox could not start (``sandbox_id`` None when it never got one), or died on its own."""
        self.failed.labels(template).inc()
        log.info("sandbox %s failed: %s", sandbox_id or "(not created)", reason)

    def sandbox_stopped(self, record: SandboxRecord, reason: str) -> None:
        """Everything in it was stopped and its resources freed, for ``reason``."""
        self.stopped.labels(record.template.name, reason).inc()
        log.info("sandbox %s stopped (%s) after %.0f s", record.id, reason, max(0.0, time.time() - record.created_at))

    def sandbox_deleted(self, record: SandboxRecord) -> None:
        """``sandbox_delete``: the tenant asked for it."""
        log.info("sandbox %s deleted by tenant %s", record.id, record.tenant.name)

    def sandbox_reaped(self, record: SandboxRecord, reason: str, seconds: float) -> None:
        """The reaper stops it: ``idle`` for ``seconds`` (its ``idle_timeout_s``), or its ``lifetime`` is up."""
        what = f"idle for {seconds:.0f} s" if reason == "idle" else f"its lifetime of {seconds:.0f} s is over"
        log.info("sandbox %s reaped: %s", record.id, what)

    # -- executions and errors ----------------------------------------------------------------------------

    def execution_event(self, event: dict[str, Any]) -> None:
        """An execution's listener (:meth:`Execution.add_listener`): counts it on its ``end`` event."""
        if event.get("type") != "end" or not isinstance(event.get("execution"), dict):
            return
        ex = event["execution"]
        status = str(ex.get("status"))
        self.executions.labels(status, str(ex.get("reason") or "")).inc()
        if isinstance(ex.get("duration_ms"), int):
            self.execution_seconds.labels(status).observe(ex["duration_ms"] / 1000)

    def watch(self, execution: Execution) -> None:
        """Count ``execution`` when it ends."""
        execution.add_listener(self.execution_event)

    def error(self, code: str) -> None:
        """An error answer with ``code`` was sent."""
        self.errors.labels(code).inc()
