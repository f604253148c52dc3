"""issue 12: ``gvr node`` with ``scp_processes`` 2, as real processes: one port, two listening processes.

Which process serves an association is read from ``/proc``: the server side of
its TCP connection (local port = the node's) belongs to one pid's file descriptors.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy import select

from node.audit.models import Instance, InstanceStatus, Study, StudyState
from node.scp import set_nodelay
from node.scp_processes import RESTART_DELAY_S, STEADY_LIFE_S, restart_delay
from tests.factories import DX_FOR_PRESENTATION, make_image, write
from tests.node.test_node_process import NodeProcess, _jobs_for, _wait_for
from tests.peers import free_port

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT (Linux)")


@pytest.fixture
def two_process_node(tmp_path: Path) -> Iterator[NodeProcess]:
    node = NodeProcess(tmp_path, scp_processes="2", study_stable_seconds="3600", release_quiet_seconds="0.5",
                       metrics_port=str(free_port()))  # fmt: skip
    node.start()
    _wait_for(lambda: "SCP process(es) listening beside gvr node" in node.log.read_text(), 60, "the SCP process")
    yield node
    node.stop()


def child_pids(parent: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent and "spawn_main" in _cmdline(entry):
                children.append(int(entry.name))
    return children


def _cmdline(entry: Path) -> str:
    try:
        return (entry / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def serving_pid(node: NodeProcess, client_port: int) -> int | None:
    """The node process holding the server side of the connection from ``client_port``."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
        if state == "01" and int(local.split(":")[1], 16) == node.port and int(remote.split(":")[1], 16) == client_port:
            inodes.add(f"socket:[{inode}]")
    assert node.proc is not None
    for pid in [node.proc.pid, *child_pids(node.proc.pid)]:
        if _open_files(pid) & inodes:
            return pid
    return None


def _open_files(pid: int) -> set[str]:
    """What ``pid``'s descriptors point at; one closed while we look is skipped, not the whole process."""
    targets: set[str] = set()
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return targets
    for descriptor in descriptors:
        try:
            targets.add(os.readlink(descriptor))
        except OSError:
            continue
    return targets


def listening_pids(node: NodeProcess) -> set[int]:
    """The node's processes holding a socket that listens on the node's port."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == node.port:
            inodes.add(f"socket:[{fields[9]}]")
    assert node.proc is not None
    return {pid for pid in [node.proc.pid, *child_pids(node.proc.pid)] if _open_files(pid) & inodes}


def open_association(node: NodeProcess) -> tuple[Association, int | None]:
    ae = AE(ae_title="GVRSCU")
    ae.add_requested_context(DX_FOR_PRESENTATION, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="GVRNODE")
    assert assoc.is_established
    set_nodelay(assoc.dul.socket.socket)
    time.sleep(0.05)
    return assoc, serving_pid(node, assoc.dul.socket.socket.getsockname()[1])


def open_associations(node: NodeProcess, at_least: int) -> list[tuple[Association, int | None]]:
    """``at_least`` open associations, more while one process served them all (SO_REUSEPORT picks at random)."""
    opened = [open_association(node) for _ in range(at_least)]
    while len({pid for _, pid in opened}) < 2 and len(opened) < 3 * at_least:
        opened.append(open_association(node))
    return opened


def send(assoc: Association, paths: list[Path]) -> list[int]:
    return [int(assoc.send_c_store(dcmread(path)).Status) for path in paths]


def send_at_once(opened: list[tuple[Association, int | None]], paths: list[list[Path]]) -> list[list[int]]:
    """Association i sends ``paths[i]`` from a thread of its own, all starting together; then each is released."""
    start = threading.Barrier(len(opened))
    statuses: list[list[int]] = [[] for _ in opened]

    def run(i: int) -> None:
        start.wait()
        statuses[i].extend(send(opened[i][0], paths[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(opened))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for assoc, _ in opened:
        assoc.release()
    return statuses


def _rows(node: NodeProcess, sop_uids: list[str]) -> list[Instance]:
    with node.audit().session() as session:
        return list(session.scalars(select(Instance).where(Instance.sop_instance_uid.in_(sop_uids))))


def test_concurrent_associations_are_served_by_both_processes_and_complete_on_release(
    two_process_node: NodeProcess, tmp_path: Path
) -> None:
    """(a) every instance of 8 concurrent associations: one ACCEPTED row and file, both processes served;
    (b) a study sent over an SCP process's association becomes a job on its release (study_stable 3600 s)."""
    node = two_process_node
    opened = open_associations(node, 8)
    studies = {uid: [write(make_image(uid, seed=i), tmp_path / uid) for i in range(5)]
               for uid in (generate_uid() for _ in opened)}  # fmt: skip
    pids = {pid for _, pid in opened}
    assert None not in pids
    statuses = send_at_once(opened, list(studies.values()))
    assert all(status == [0] * 5 for status in statuses)
    assert len(pids) == 2, f"{len(opened)} associations all went to one process ({pids})"

    sop_uids = [str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for p in studies.values() for path in p]
    rows = _rows(node, sop_uids)
    assert sorted(str(row.sop_instance_uid) for row in rows) == sorted(sop_uids)
    assert {row.status for row in rows} == {InstanceStatus.ACCEPTED}
    assert all(Path(str(row.spool_path)).is_file() for row in rows)
    for study_uid in studies:  # only the release completes a study here: it did, whichever process served it
        _wait_for(lambda study_uid=study_uid: _jobs_for(node.audit(), study_uid), 10, f"the job of {study_uid}")


def test_a_study_an_scp_process_still_sends_is_not_complete(two_process_node: NodeProcess, tmp_path: Path) -> None:
    """The parent's assembler sees a child's open association as sending its study (in flight)."""
    node = two_process_node
    assert node.proc is not None
    study_uid = generate_uid()
    paths = [write(make_image(study_uid, seed=i), tmp_path / "study") for i in range(2)]
    held: list[Association] = []
    for _ in range(40):  # an association the child serves (SO_REUSEPORT chooses)
        assoc, pid = open_association(node)
        if pid != node.proc.pid:
            break
        held.append(assoc)
    else:
        pytest.fail("40 associations in a row went to gvr node itself")
    for other in held:
        other.release()
    assert send(assoc, paths[:1]) == [0]
    second, _ = open_association(node)
    assert send(second, paths[1:]) == [0]
    second.release()
    time.sleep(3)  # release_quiet_seconds 0.5, assembler poll 0.2: it would be a job by now
    with node.audit().session() as session:
        assert session.scalar(select(Study.state).where(Study.study_uid == study_uid)) == StudyState.RECEIVING
    assoc.release()
    _wait_for(lambda: _jobs_for(node.audit(), study_uid), 10, "the job once the child's association is released")


def test_one_sop_instance_sent_at_once_over_many_associations(two_process_node: NodeProcess, tmp_path: Path) -> None:
    """(c) one ACCEPTED row per SOP instance, the other copies DUPLICATE, across both processes."""
    node = two_process_node
    study_uid = generate_uid()
    paths = [write(make_image(study_uid, seed=i), tmp_path / "same") for i in range(6)]
    opened = open_associations(node, 8)
    assert len({pid for _, pid in opened}) == 2, "the associations all went to one process"
    statuses = send_at_once(opened, [paths] * len(opened))
    assert all(status == [0] * len(paths) for status in statuses)
    sop_uids = [str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in paths]
    rows = _rows(node, sop_uids)
    for sop_uid in sop_uids:
        mine = [row.status for row in rows if row.sop_instance_uid == sop_uid]
        assert sorted(mine) == sorted([InstanceStatus.ACCEPTED] + [InstanceStatus.DUPLICATE] * (len(opened) - 1))
    assert all(Path(str(row.spool_path)).is_file() for row in rows)
    # /metrics (the parent's) counts the C-STOREs the SCP process answered too
    url = f"http://127.0.0.1:{node.env['GVR_METRICS_PORT']}/metrics"
    expected = f"gvr_instances_received_total {float(len(paths) * len(opened))}"
    _wait_for(lambda: expected in urllib.request.urlopen(url, timeout=5).read().decode(), 5, expected)


def test_a_killed_scp_process_is_restarted_and_the_port_keeps_accepting(
    two_process_node: NodeProcess, tmp_path: Path
) -> None:
    """(d) SIGKILL of the child: associations keep being served, a new child takes its place."""
    node = two_process_node
    assert node.proc is not None
    [child] = child_pids(node.proc.pid)
    os.kill(child, signal.SIGKILL)
    study_uid = generate_uid()
    paths = [write(make_image(study_uid, seed=i), tmp_path / "after") for i in range(12)]
    for path in paths:
        assoc, _ = open_association(node)
        assert send(assoc, [path]) == [0]
        assoc.release()
    # a new SCP process (not a log line: "SCP process(es) listening" at start-up reads alike)
    _wait_for(lambda: [pid for pid in child_pids(node.proc.pid) if pid != child], 30, "the restarted SCP process")
    assert f"SCP process 1 (pid {child}) ended with exit code -9" in node.log.read_text()
    restarted = [pid for pid in child_pids(node.proc.pid) if pid != child]
    assert len(restarted) == 1
    # it holds a listening socket of the port's SO_REUSEPORT group: Linux hands it connections (which
    # ones depends on a hash of the client's address and port, so waiting for one would be a lottery)
    _wait_for(lambda: restarted[0] in listening_pids(node), 60, "the restarted SCP process's listening socket")
    assert node.proc.pid in listening_pids(node)
    seen = []
    for _ in range(40):  # and it is handed connections: 40 misses would be a 1 in 10^12 draw
        assoc, pid = open_association(node)
        assoc.release()
        seen.append(pid)
        if pid in restarted:
            break
    else:
        pytest.fail(f"the restarted SCP process {restarted} served none of 40 associations ({seen}); "
                    f"children now {child_pids(node.proc.pid)}; log:\n{node.log.read_text()[-3000:]}")


def test_stopping_the_node_leaves_no_scp_process(two_process_node: NodeProcess) -> None:
    """(e) SIGTERM stops the child too; a SIGKILLed node's child exits by itself: none keeps the port."""
    node = two_process_node
    assert node.proc is not None
    children = child_pids(node.proc.pid)
    assert len(children) == 1
    node.stop()
    assert node.proc.returncode == 0
    _wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in children), 10, "the child to exit")

    node.start()
    _wait_for(lambda: len(child_pids(node.proc.pid)) == 1, 60, "the new SCP process")  # type: ignore[union-attr]
    children = child_pids(node.proc.pid)  # type: ignore[union-attr]
    node.kill()
    _wait_for(lambda: not any(_running(pid) for pid in children), 10, "the orphaned child to exit")
    _wait_for(lambda: not _listening(node.port), 5, "nothing listening on the port")


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_default_is_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from node.config import Settings
    from node.reuse_port import ReusePortAssociationServer
    from node.scp import build_ae
    from node.tls_handshake import HandshakeInThreadServer

    settings = Settings(data_dir=tmp_path)
    assert settings.scp_processes == 1
    assert build_ae(settings).server_class is HandshakeInThreadServer
    assert build_ae(settings.model_copy(update={"scp_processes": 2})).server_class is ReusePortAssociationServer


def test_restart_delay_backs_off_for_a_process_that_keeps_dying() -> None:
    """A process that dies at once every time waits 1, 2, 4 ... up to 60 s; one that lived long starts over at 1 s."""
    delays, delay = [], 0.0
    for _ in range(8):
        delay = restart_delay(delay, lived=0.5)
        delays.append(delay)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert restart_delay(60.0, lived=STEADY_LIFE_S) == RESTART_DELAY_S
