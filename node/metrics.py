"""Prometheus metrics of the node: what came in, what was refused, where jobs stand, how long they took.

Two kinds of figures, so that ingest never pays for monitoring:

* counters the SCP bumps in memory as each C-STORE is answered (a dict update
  under a lock: well under a microsecond), through ``CountingIngestor``;
* figures read from the audit DB only when Prometheus scrapes (jobs by state,
  deliveries, the turnaround histogram), by ``AuditCollector``. A scrape that
  cannot reach the DB leaves those series out and logs why; it never raises
  into the HTTP server and never touches the SCP's threads.

Each ``NodeMetrics`` owns its registry (no global state: tests run several
nodes in one process). ``gvr node`` serves it on ``metrics_port`` (0: off).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from node.audit.db import AuditDB
from node.audit.models import Delivery, DeliveryStatus, Job, JobState
from node.config import Settings
from node.duplicates import SopInstanceLocks
from node.errors import StoreStatus
from node.ingest import Ingestor, IngestResult, StoreRequest
from node.limits import ResourceLimits
from node.metrics_health import HealthCollector
from node.spool import Spool

log = logging.getLogger(__name__)

# From one second (a tiny study on a GPU) to an hour (a CPU node that fell behind).
TURNAROUND_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
# A job SENT this long before the newest one seen is assumed observed (bounds the memory of ids).
_OBSERVED_WINDOW = timedelta(minutes=10)


class NodeMetrics:
    """The node's registry: ingest counters plus the audit-DB collector."""

    def __init__(self, audit: AuditDB | None = None, settings: Settings | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.instances_received = Counter(
            "gvr_instances_received", "C-STORE requests answered by the SCP (any status)", registry=self.registry
        )
        self.instances_rejected = Counter(
            "gvr_instances_rejected", "C-STORE requests answered with a failure status, by status",
            ["status"], registry=self.registry,
        )  # fmt: skip
        # not registered itself: AuditCollector feeds it and yields it on the same scrape
        self.turnaround = Histogram(
            "gvr_job_turnaround_seconds", "seconds from a job's creation (study assembled) to SENT",
            buckets=TURNAROUND_BUCKETS, registry=None,
        )  # fmt: skip
        self.collector: AuditCollector | None = None
        if audit is not None:
            self.collector = AuditCollector(audit, self.turnaround)
            self.registry.register(self.collector)
            # issue 11: queue depth, live workers, durations, failures by cause and per job
            self.registry.register(HealthCollector(settings, audit))
        self._server: Any = None

    def count_store(self, result: IngestResult) -> None:
        """Count one answered C-STORE. Never raises: a metrics fault must not fail an instance."""
        try:
            self.instances_received.inc()
            if result.status != StoreStatus.SUCCESS:
                self.instances_rejected.labels(status=_status_name(result.status)).inc()
        except Exception:  # monitoring is best effort; ingest goes on whatever happens here
            log.exception("could not count a C-STORE in the metrics")

    def count_stores(self, counts: dict[int, int]) -> None:
        """C-STOREs another SCP process answered (issue 12: ``scp_processes``), as ``{status: how many}``."""
        try:
            for status, how_many in counts.items():
                self.instances_received.inc(how_many)
                if status != StoreStatus.SUCCESS:
                    self.instances_rejected.labels(status=_status_name(status)).inc(how_many)
        except Exception:  # monitoring is best effort
            log.exception("could not count forwarded C-STOREs in the metrics")

    def serve(self, address: str, port: int) -> int | None:
        """Serve ``/metrics`` on address:port in a daemon thread; returns the port, None if it failed.

        A port already taken is logged, not raised: the node keeps receiving without metrics.
        """
        try:
            server, _thread = start_http_server(port, addr=address, registry=self.registry)
        except OSError as error:
            log.error("metrics endpoint not started on %s:%d: %s (setting metrics_port, GVR_METRICS_PORT; "
                      "the node runs without it)", address, port, error)  # fmt: skip
            return None
        self._server = server
        bound = int(server.server_address[1])
        log.info("Prometheus metrics on http://%s:%d/metrics", address, bound)
        return bound

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _status_name(status: int) -> str:
    try:
        return StoreStatus(status).name
    except ValueError:
        return f"0x{int(status):04X}"


class StoreCounter(Protocol):
    """What ``CountingIngestor`` tells of each answered C-STORE (``NodeMetrics``, or an SCP process's tally)."""

    def count_store(self, result: IngestResult) -> None: ...


class CountingIngestor(Ingestor):
    """The node's ``Ingestor`` that also counts each answer (the SCP needs no change)."""

    def __init__(
        self,
        spool: Spool,
        audit: AuditDB,
        actor: str,
        metrics: StoreCounter,
        limits: ResourceLimits | None = None,
        locks: SopInstanceLocks | None = None,
    ) -> None:
        super().__init__(spool, audit, actor, limits, locks)
        self.metrics = metrics

    def receive(self, request: StoreRequest) -> IngestResult:
        result = super().receive(request)
        self.metrics.count_store(result)
        return result


class AuditCollector(Collector):
    """Scrape-time figures from the audit DB: three small aggregate queries per scrape.

    The turnaround histogram is fed here too: each scrape observes the jobs that
    reached SENT since the previous one (counted once; jobs SENT before this
    process started are not, as Prometheus expects of a fresh counter).
    """

    def __init__(self, audit: AuditDB, turnaround: Histogram) -> None:
        self.audit = audit
        self.turnaround = turnaround
        self._since = datetime.now(UTC)
        self._observed: dict[str, datetime] = {}
        self._lock = threading.Lock()

    def describe(self) -> list[Any]:
        return []  # dynamic: nothing is queried when the collector is registered

    def collect(self) -> Iterator[Any]:
        try:
            with self.audit.session() as session:
                jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
                deliveries = dict(
                    session.execute(select(Delivery.status, func.count()).group_by(Delivery.status)).all()
                )
                self._observe_sent(session)
        except SQLAlchemyError as error:
            log.warning("metrics scrape could not read the audit DB: %s", error)
            return
        by_state = GaugeMetricFamily("gvr_jobs", "jobs in the audit DB, by state", labels=["state"])
        for state in JobState:
            by_state.add_metric([state.value], float(jobs.get(state, 0)))
        yield by_state
        sent = CounterMetricFamily("gvr_deliveries_sent", "result objects C-STOREd to a destination")
        sent.add_metric([], float(deliveries.get(DeliveryStatus.SENT, 0)))
        yield sent
        yield from self.turnaround.collect()

    def _observe_sent(self, session: Any) -> None:
        with self._lock:
            rows = session.execute(
                select(Job.id, Job.created_at, Job.updated_at).where(
                    Job.state == JobState.SENT, Job.updated_at >= self._since
                )
            ).all()
            newest = self._since
            for job_id, created, updated in rows:
                created_at, updated_at = _as_utc(created), _as_utc(updated)
                newest = max(newest, updated_at)
                if job_id in self._observed:
                    continue
                self._observed[job_id] = updated_at
                self.turnaround.observe(max(0.0, (updated_at - created_at).total_seconds()))
            # look back a window on the next scrape (a commit can land with an earlier time)
            self._since = max(self._since, newest - _OBSERVED_WINDOW)
            self._observed = {k: v for k, v in self._observed.items() if v >= self._since}


def _as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
