"""``gvr node`` as a real process: crash safety, the Redis broker, PostgreSQL, no torch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import select

from node.audit.db import AuditDB
from node.audit.models import Instance, InstanceStatus, Job, Study, StudyState
from node.config import Peer
from node.scp import set_nodelay
from node.scu import FileToSend, send_files
from tests.factories import DX_FOR_PRESENTATION, make_image, write, write_study
from tests.peers import free_port, wait_for_port


class NodeProcess:
    """``gvr node`` in a subprocess with GVR_* settings; logs go to a file."""

    def __init__(self, tmp_path: Path, data_dir: Path | None = None, **settings: str) -> None:
        self.port = free_port()
        self.data_dir = data_dir or tmp_path / "data"
        self.log = tmp_path / f"node-{self.port}.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GVR_")}
        self.env.update(
            GVR_DATA_DIR=str(self.data_dir), GVR_PORT=str(self.port), GVR_BIND_ADDRESS="127.0.0.1",
            GVR_ALLOWED_CALLING_AETS="GVRSCU,STORESCU", GVR_STUDY_STABLE_SECONDS="1",
            GVR_ASSEMBLER_POLL_SECONDS="0.2", GVR_MIN_FREE_DISK_MB="0",
        )  # fmt: skip
        self.env.update({f"GVR_{k.upper()}": v for k, v in settings.items()})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def peer(self) -> Peer:
        return Peer(ae_title="GVRNODE", host="127.0.0.1", port=self.port)

    def start(self) -> NodeProcess:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node.cli.main", "node"], env=self.env, stdout=log, stderr=log
            )
        wait_for_port("127.0.0.1", self.port, timeout=30)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def audit(self) -> AuditDB:
        return AuditDB(self.env.get("GVR_DATABASE_URL") or f"sqlite:///{self.data_dir / 'audit.sqlite3'}")


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Any]:
    nodes: list[NodeProcess] = []

    def make(data_dir: Path | None = None, **settings: str) -> NodeProcess:
        node = NodeProcess(tmp_path, data_dir, **settings)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()


def _wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _jobs_for(audit: AuditDB, study_uid: str) -> list[Job]:
    with audit.session() as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None or study.state != StudyState.ASSEMBLED:
            return []
        return list(session.scalars(select(Job).where(Job.study_id == study.id)))


def test_node_sigkill_mid_association_loses_no_acknowledged_instance(node_factory: Any, tmp_path: Path) -> None:
    """Kill -9 during a multi-instance association; after restart all acked instances are kept and assembled."""
    node = node_factory().start()
    study_uid = generate_uid()
    paths = [write(make_image(study_uid, seed=i, size=256), tmp_path / "study") for i in range(40)]
    acknowledged: list[str] = []
    killer: threading.Thread | None = None

    ae = AE(ae_title="GVRSCU")
    ae.add_requested_context(DX_FOR_PRESENTATION, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="GVRNODE")
    assert assoc.is_established
    set_nodelay(assoc.dul.socket.socket)
    for index, path in enumerate(paths):
        if index == 15:
            killer = threading.Thread(target=node.kill)
            killer.start()
        try:
            response = assoc.send_c_store(path)
        except (RuntimeError, ValueError, OSError):
            break
        if not assoc.is_established or "Status" not in response:
            break
        if response.Status == 0:
            acknowledged.append(FileToSend.read(path).sop_instance_uid)
    assert killer is not None
    killer.join(10)
    assoc.abort()
    assert 15 <= len(acknowledged) < len(paths), "the kill should land mid-association"

    restarted = node_factory(data_dir=node.data_dir).start()  # same data dir, new port
    try:
        audit = restarted.audit()
        with audit.session() as session:
            rows = {
                row.sop_instance_uid: row
                for row in session.scalars(select(Instance).where(Instance.status == InstanceStatus.ACCEPTED))
            }
        for sop_uid in acknowledged:
            assert sop_uid in rows, f"acknowledged instance {sop_uid} missing from the audit DB"
            assert Path(rows[sop_uid].spool_path).is_file()
        assert not any((node.data_dir / "spool" / "tmp" / "node").iterdir()), "partial writes must be cleared"
        jobs = _wait_for(lambda: _jobs_for(audit, study_uid), 20, "the study to be assembled after restart")
        assert len(jobs) == 1
    finally:
        restarted.stop()


def test_node_redis_broker_one_message_per_complete_study(node_factory: Any, redis_url: str, tmp_path: Path) -> None:
    """With Redis as the broker, a completed study puts exactly one message on the gpu queue."""
    import redis

    node = node_factory(broker_url=redis_url).start()
    study_uid, paths = write_study(tmp_path / "s", 3)
    assert all(r.ok for r in send_files([FileToSend.read(p) for p in paths], node.peer, "GVRSCU"))
    jobs = _wait_for(lambda: _jobs_for(node.audit(), study_uid), 20, "a job")
    _wait_for(lambda: _jobs_for(node.audit(), study_uid)[0].enqueued_at, 10, "the job to be enqueued")
    client = redis.Redis.from_url(redis_url)
    time.sleep(1.0)  # let a stray second message, if any, arrive before counting
    messages = client.lrange("gpu", 0, -1)
    assert len(messages) == 1
    message = json.loads(messages[0])
    assert message["headers"]["task"] == "inference.analyze_study"
    assert json.loads(__import__("base64").b64decode(message["body"]))[0] == [jobs[0].id]
    client.delete("gpu")


def test_node_default_broker_takes_the_job(node_factory: Any, tmp_path: Path) -> None:
    """On the embedded default (SQLite broker, no server) a complete study's job reaches the queue."""
    import sqlite3

    node = node_factory().start()
    study_uid, paths = write_study(tmp_path / "s", 1)
    assert all(r.ok for r in send_files([FileToSend.read(p) for p in paths], node.peer, "GVRSCU"))
    _wait_for(lambda: _jobs_for(node.audit(), study_uid), 20, "a job")
    _wait_for(lambda: _jobs_for(node.audit(), study_uid)[0].enqueued_at, 10, "the job on the SQLite broker")
    with sqlite3.connect(node.data_dir / "broker.sqlite3") as broker:
        payloads = [row[0] for row in broker.execute("select payload from kombu_message")]
    assert len(payloads) == 1 and "inference.analyze_study" in payloads[0]


def test_node_postgresql_audit_db(node_factory: Any, postgres_url: str, tmp_path: Path) -> None:
    """The node runs on PostgreSQL: instances audited, study assembled into a job."""
    node = node_factory(database_url=postgres_url).start()
    study_uid, paths = write_study(tmp_path / "s", 2)
    assert all(r.ok for r in send_files([FileToSend.read(p) for p in paths], node.peer, "GVRSCU"))
    audit = node.audit()
    try:
        jobs = _wait_for(lambda: _jobs_for(audit, study_uid), 20, "a job on PostgreSQL")
        assert len(jobs) == 1
        with audit.session() as session:
            count = len(list(session.scalars(select(Instance).where(Instance.study_uid == study_uid))))
        assert count == 2
    finally:
        audit.dispose()
        node.stop()


def test_node_entry_point_never_imports_torch() -> None:
    """The SCP side stays light: importing the node's entry points leaves torch unloaded."""
    code = (
        "import sys, node.cli.main, node.service, node.cli.node_cmd, node.cli.send, node.cli.echo,"
        " node.delivery, node.results.build;"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
