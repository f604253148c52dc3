"""Scrape-time figures for alerting: queues, workers, how long jobs take, and why they fail.

Read when Prometheus scrapes the node, never on the SCP's threads:

* ``gvr_queue_depth{queue}``: messages waiting on the broker (``gvr status`` reads the same);
* ``gvr_workers_alive{queue}``: workers answering Celery's broadcast (Redis only: on the
  SQLite broker the series is absent, since nothing can be known);
* ``gvr_inference_duration_seconds``: from a job's ``job.running`` event to its
  ``job.inferred`` event (one attempt of the model);
* ``gvr_delivery_duration_seconds``: from ``job.inferred`` to ``job.sent`` (results
  ready to results in the PACS, queue wait and retries included);
* ``gvr_jobs_failed{cause}``: jobs now FAILED, by where they failed: ``inference``,
  ``delivery`` (after a result existed), ``abandoned`` (the node's reconciler gave up);
* ``gvr_delivery_failures_total``: jobs whose delivery failed at least once (a retry
  was scheduled or it ended FAILED), each job counted once however many objects or
  attempts failed.

The histograms observe each event once, from the events appended since the
previous scrape (audit events are append-only and their ids only grow).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import and_, distinct, func, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, aliased

from node.audit.db import AuditDB
from node.audit.models import Event, Job, JobState
from node.broker_stats import QUEUES, is_redis, live_workers, queue_depths
from node.config import Settings

log = logging.getLogger(__name__)

INFERENCE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
DELIVERY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 3600)
# (histogram, event that ends the span, event that starts it)
_SPANS = (("inference", "job.inferred", "job.running"), ("delivery", "job.sent", "job.inferred"))
_LOOKBACK_IDS = 1000  # a transaction may commit a lower event id after a higher one was seen
_WORKER_TIMEOUT_S = 0.5


class HealthCollector(Collector):
    """Queue depths, live workers, duration histograms, failures by cause (see the module docstring)."""

    def __init__(self, settings: Settings | None, audit: AuditDB) -> None:
        self.settings = settings
        self.audit = audit
        self.durations = {
            "inference": Histogram("gvr_inference_duration_seconds", "seconds from job.running to job.inferred",
                                   buckets=INFERENCE_BUCKETS, registry=None),
            "delivery": Histogram("gvr_delivery_duration_seconds", "seconds from job.inferred to job.sent",
                                  buckets=DELIVERY_BUCKETS, registry=None),
        }  # fmt: skip
        self._lock = threading.Lock()
        self._last_id: int | None = None  # None: not read yet; history before the process is not observed
        self._seen: set[int] = set()

    def describe(self) -> list[Any]:
        return []  # dynamic: nothing is queried when the collector is registered

    def collect(self) -> Iterator[Any]:
        if self.settings is not None:
            yield from self._broker_figures(self.settings)
        try:
            with self.audit.session() as session:
                failed = failed_by_cause(session)
                delivery_failures = jobs_with_delivery_failures(session)
                self._observe_spans(session)
        except SQLAlchemyError as error:
            log.warning("metrics scrape could not read the audit DB: %s", error)
            return
        by_cause = GaugeMetricFamily("gvr_jobs_failed", "jobs now FAILED, by cause", labels=["cause"])
        for cause in ("inference", "delivery", "abandoned"):
            by_cause.add_metric([cause], float(failed.get(cause, 0)))
        yield by_cause
        counted = CounterMetricFamily("gvr_delivery_failures", "jobs whose delivery failed at least once")
        counted.add_metric([], float(delivery_failures))
        yield counted
        for histogram in self.durations.values():
            yield from histogram.collect()

    def _broker_figures(self, settings: Settings) -> Iterator[Any]:
        depths = queue_depths(settings.celery_broker_url)
        if depths.error is None:
            depth = GaugeMetricFamily("gvr_queue_depth", "messages waiting on the broker", labels=["queue"])
            for queue in QUEUES:
                depth.add_metric([queue], float(depths.waiting.get(queue, 0)))
            yield depth
        if is_redis(settings.celery_broker_url):
            workers = live_workers(settings, _WORKER_TIMEOUT_S)
            if workers.error is None:
                alive = GaugeMetricFamily("gvr_workers_alive", "workers answering, by queue", labels=["queue"])
                for queue in QUEUES:
                    alive.add_metric([queue], float(len(workers.by_queue.get(queue, []))))
                yield alive

    def _observe_spans(self, session: Session) -> None:
        with self._lock:
            newest = session.scalar(select(func.max(Event.id))) or 0
            if self._last_id is None:
                self._last_id = newest
                return
            floor = max(0, self._last_id - _LOOKBACK_IDS)
            for name, end_kind, start_kind in _SPANS:
                for event_id, seconds in span_seconds(session, end_kind, start_kind, floor):
                    if event_id not in self._seen:
                        self._seen.add(event_id)
                        self.durations[name].observe(max(0.0, seconds))
            self._last_id = max(self._last_id, newest)
            self._seen = {i for i in self._seen if i > self._last_id - _LOOKBACK_IDS}


def span_seconds(session: Session, end_kind: str, start_kind: str, after_id: int) -> list[tuple[int, float]]:
    """(end event id, seconds since the latest start event of the same job) for end events after ``after_id``."""
    start = aliased(Event)
    started = (
        select(func.max(start.at))
        .where(start.subject_kind == "job", start.subject_id == Event.subject_id, start.kind == start_kind,
               start.at <= Event.at)
        .scalar_subquery()
    )
    rows = session.execute(
        select(Event.id, Event.at, started).where(Event.kind == end_kind, Event.subject_kind == "job",
                                                   Event.id > after_id)
    ).all()
    return [(int(i), (end - begin).total_seconds()) for i, end, begin in rows if begin is not None]


def failed_by_cause(session: Session) -> dict[str, int]:
    """FAILED jobs: 'abandoned' when the node (reconciler) failed it, else 'delivery' after a result, else 'inference'."""
    inferred = select(Event.id).where(Event.subject_kind == "job", Event.subject_id == Job.id,
                                      Event.kind == "job.inferred").exists()  # fmt: skip
    by_node = select(Event.id).where(Event.subject_kind == "job", Event.subject_id == Job.id,
                                     Event.kind == "job.failed", Event.actor.like("%:node")).exists()  # fmt: skip
    rows = session.execute(select(Job.id, by_node, inferred).where(Job.state == JobState.FAILED)).all()
    counts: dict[str, int] = {}
    for _job, abandoned, after_result in rows:
        cause = "abandoned" if abandoned else "delivery" if after_result else "inference"
        counts[cause] = counts.get(cause, 0) + 1
    return counts


def jobs_with_delivery_failures(session: Session) -> int:
    """Jobs with a delivery retry, or that failed after their result existed: each counted once."""
    inferred = aliased(Event)
    after_result = select(inferred.id).where(inferred.subject_kind == "job", inferred.subject_id == Event.subject_id,
                                             inferred.kind == "job.inferred", inferred.id < Event.id).exists()  # fmt: skip
    condition = or_(Event.kind == "delivery.retry", and_(Event.kind == "job.failed", after_result))
    return int(session.scalar(select(func.count(distinct(Event.subject_id))).where(
        Event.subject_kind == "job", condition)) or 0)  # fmt: skip
