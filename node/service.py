"""The node process: storage SCP + assembler over one audit DB, spool and broker."""

from __future__ import annotations

import logging
import threading

from node.assembler import Assembler
from node.audit.db import AuditDB, actor_name
from node.audit.migrate import upgrade
from node.celery_app import enqueue_analysis, enqueue_delivery, make_celery
from node.config import Settings
from node.heartbeat import HeartbeatWriter, heartbeat_path, supervised_threads
from node.limits import ResourceLimits
from node.metrics import CountingIngestor, NodeMetrics
from node.reconciler import Reconciler
from node.scp import AssociationLog, StorageSCP
from node.scp_processes import ScpProcesses, shared_locks
from node.spool import Spool
from node.supervision import ServiceThreadDiedError

log = logging.getLogger(__name__)


class NodeService:
    """Everything ``gvr node`` runs, built from one settings object."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        upgrade(settings.audit_url)  # idempotent; keeps the embedded default one command
        self.audit = AuditDB(settings.audit_url)
        self.spool = Spool(settings.spool_dir, settings.min_free_disk_mb * 1024 * 1024, owner="node")
        self.celery = make_celery(settings)
        actor = actor_name("node")
        # issue 6: counters bumped per C-STORE (in memory), DB figures read only when scraped
        self.metrics = NodeMetrics(self.audit, settings)
        self.assembler = Assembler(settings, self.audit, lambda job: enqueue_analysis(self.celery, job), actor)
        # issue 10: the audit DB drives recovery; this loop re-publishes every overdue job
        self.reconciler = Reconciler(settings, self.audit, lambda job: enqueue_analysis(self.celery, job),
                                     lambda job: enqueue_delivery(self.celery, job), actor)  # fmt: skip
        # issue 12: scp_processes > 1 adds SCP processes on the same port; the same-UID lock spans them
        locks = shared_locks(settings) if settings.scp_processes > 1 else None
        limits = ResourceLimits.from_settings(settings)
        self.scp = StorageSCP(
            settings,
            CountingIngestor(self.spool, self.audit, actor, self.metrics, limits, locks),
            AssociationLog(self.audit, actor),
            on_release=self.assembler.mark_released,
        )
        self.assembler.in_flight = self.scp.associations.studies_in_flight
        self.scp_children: ScpProcesses | None = None
        if settings.scp_processes > 1:
            self.scp_children = ScpProcesses(settings, self.assembler.mark_released, self.metrics.count_stores)
            self.assembler.in_flight = self._studies_in_flight
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.thread_died = threading.Event()
        self.dead_threads: list[str] = []
        # issue 11: `gvr status` sees the service threads through this file (node/heartbeat.py)
        self.heartbeat = HeartbeatWriter(heartbeat_path(settings.resolved_data_dir), lambda: supervised_threads(self))

    def _on_thread_death(self, name: str, error: BaseException) -> None:
        self.dead_threads.append(name)
        self.thread_died.set()

    def start(self) -> int:
        removed = self.spool.clear_partial_writes()
        if removed:
            log.info("removed %d partial write(s) left by an earlier crash", removed)
        self.port = self.scp.start()
        if self.scp_children is not None:
            self.scp_children.start(self.port)
        self.assembler.start(on_death=self._on_thread_death)
        self.reconciler.start(on_death=self._on_thread_death)
        self.heartbeat.start()
        if self.settings.metrics_port:  # issue 6: a failure to bind is logged, never fatal
            self.metrics_port = self.metrics.serve(self.settings.bind_address, self.settings.metrics_port)
        return self.port

    def stop(self) -> None:
        self.heartbeat.stop(f"thread(s) died: {', '.join(self.dead_threads)}" if self.dead_threads else "stopped")
        if self.scp_children is not None:
            self.scp_children.stop()
        self.scp.stop()
        self.assembler.stop()
        self.reconciler.stop()
        self.metrics.stop()
        self.audit.dispose()

    def _studies_in_flight(self) -> set[str]:
        """Studies an open association sends, in this process or an SCP process (issue 12)."""
        assert self.scp_children is not None
        return self.scp.associations.studies_in_flight() | self.scp_children.in_flight()

    def run_until(self, stop: threading.Event, check_seconds: float = 0.5) -> None:
        """Serve until ``stop`` is set; raises ServiceThreadDiedError when a supervised thread died."""
        self.start()
        try:
            while not stop.wait(check_seconds):
                if self.thread_died.is_set() or self.silent_deaths():
                    break
        finally:
            self.stop()
        dead = self.dead_threads or self.silent_deaths()
        if self.thread_died.is_set() or (not stop.is_set() and dead):
            raise ServiceThreadDiedError(f"background thread(s) died: {', '.join(dead)}")

    def silent_deaths(self) -> list[str]:
        """Supervised loops that ended without reporting it (should not happen; checked anyway)."""
        return [loop.name for loop in (self.assembler.loop, self.reconciler.loop) if not loop.alive]
