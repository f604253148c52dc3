"""The shared fixtures themselves: each real peer starts, answers, and leaves nothing behind."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
import redis
import sqlalchemy

from tests.peers import (
    free_port,
    nodelay_env,
    port_answers,
    pydicom_test_files,
    require_tool,
    start_process,
    stop_process,
    storescu_option,
    wait_for_http,
    wait_for_port,
)
from tests.peers_orthanc import Orthanc
from tests.peers_servers import REDIS_CLAIM_KEY, PostgresServer, claim_redis_db, release_redis_db


def test_free_port_is_bindable_and_wait_for_port_times_out() -> None:
    """A free port has no listener, so waiting on it times out quickly instead of sleeping blindly."""
    port = free_port()
    assert not port_answers("127.0.0.1", port)
    with pytest.raises(TimeoutError, match=str(port)):
        wait_for_port("127.0.0.1", port, timeout=0.3)
    with pytest.raises(TimeoutError, match="did not answer"):
        wait_for_http(f"http://127.0.0.1:{port}/", timeout=0.3)


def test_postgres_url_database_created_then_dropped(postgres_server: PostgresServer) -> None:
    """The fixture's database exists during the test and is gone after, even with a connection left open."""
    name = postgres_server.create_database()
    engine = sqlalchemy.create_engine(postgres_server.url(name))
    connection = engine.connect()  # left open on purpose: the drop must terminate it
    assert connection.execute(sqlalchemy.text("select current_database()")).scalar() == name
    assert name in postgres_server.databases()
    postgres_server.drop_database(name)
    assert name not in postgres_server.databases()
    engine.dispose()


def test_postgres_url_is_an_empty_database(postgres_url: str) -> None:
    """The URL points at an empty database of the test's own."""
    engine = sqlalchemy.create_engine(postgres_url)
    try:
        assert sqlalchemy.inspect(engine).get_table_names() == []
        assert engine.url.database is not None and engine.url.database.startswith("gvr_test_")
    finally:
        engine.dispose()


def test_redis_claim_picks_empty_db_and_release_removes_only_its_keys(redis_server: tuple[str, int]) -> None:
    """Two claims get different DBs; release deletes the test's keys and the marker, nothing else."""
    host, port = redis_server
    first, token = claim_redis_db(host, port)
    second, other = claim_redis_db(host, port)
    try:
        assert first != second
        client = redis.Redis(host=host, port=port, db=first)
        client.set("some-key", "1")
        client.rpush("gpu", "message")
        release_redis_db(host, port, first, other)  # wrong owner: touches nothing
        assert client.dbsize() == 3
    finally:
        release_redis_db(host, port, first, token)
        release_redis_db(host, port, second, other)
    assert redis.Redis(host=host, port=port, db=first).dbsize() == 0
    assert redis.Redis(host=host, port=port, db=second).dbsize() == 0


def test_redis_url_answers_and_holds_only_the_marker(redis_url: str) -> None:
    """The claimed DB starts with just the claim marker."""
    client = redis.Redis.from_url(redis_url)
    assert client.ping()
    assert client.keys("*") == [REDIS_CLAIM_KEY.encode()]


def test_orthanc_fixture_answers_rest(orthanc: Orthanc) -> None:
    """Orthanc starts on its free ports with our config and answers /system."""
    system = orthanc.request("GET", "/system")
    assert system["DicomAet"] == "ORTHANC"
    assert system["DicomPort"] == orthanc.dicom_port
    assert orthanc.studies() == []


def test_pydicom_test_files_cover_transfer_syntax_families() -> None:
    """The bundled files span implicit, explicit, deflate, JPEG, JPEG-LS, JPEG 2000 and RLE."""
    files = pydicom_test_files()
    syntaxes = {f.transfer_syntax for f in files}
    expected = {
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.4.50",
    }
    expected |= {"1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"}
    assert expected <= syntaxes
    for path, syntax, sop_class in files:
        assert path.is_file() and syntax.startswith("1.2.840.10008.1.2") and sop_class.startswith("1.2.840")


def test_storescu_sends_every_test_file_to_dcmtk_storescp(
    storescu: Callable[..., Any], tmp_path: Path
) -> None:
    """``run_storescu`` with ``storescu_option`` delivers each bundled file in its own transfer syntax."""
    storescp = require_tool("storescp", "dcmtk")
    port, received = free_port(), tmp_path / "received"
    received.mkdir()
    log = tmp_path / "storescp.log"
    scp = start_process(
        [storescp, "+xa", "+uf", "-od", str(received), "-aet", "GVRNODE", str(port)], log, nodelay_env()
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=10, process=scp, log=log)
        files = pydicom_test_files()
        for path, syntax, _sop_class in files:
            result = storescu(port, [path], storescu_option(syntax), "-R")
            assert result.returncode == 0, result.stderr
    finally:
        assert stop_process(scp) in (0, -15)
    stored = {pydicom.dcmread(p).file_meta.TransferSyntaxUID for p in received.iterdir()}
    assert stored == {f.transfer_syntax for f in files}


def test_orthanc_fixture_uploads_and_stores_to_a_modality(orthanc: Orthanc, tmp_path: Path) -> None:
    """Upload through REST, read tags, then C-STORE to a declared storescp modality."""
    storescp = require_tool("storescp", "dcmtk")
    ct = next(f for f in pydicom_test_files() if f.path.name == "CT_small.dcm")
    answer = orthanc.upload(ct.path)
    assert orthanc.find_instances() == [answer["ID"]] and orthanc.studies() == [answer["ParentStudy"]]
    assert orthanc.instance_tags(answer["ID"])["SOPInstanceUID"] == ct.sop_instance_uid()
    port, received, log = free_port(), tmp_path / "received", tmp_path / "storescp.log"
    received.mkdir()
    scp = start_process([storescp, "-od", str(received), "-aet", "PEER", str(port)], log, nodelay_env())
    try:
        wait_for_port("127.0.0.1", port, timeout=10, process=scp, log=log)
        orthanc.add_modality("peer", "PEER", "127.0.0.1", port)
        orthanc.store_to("peer", [answer["ID"]])
    finally:
        stop_process(scp)
    assert len(list(received.iterdir())) == 1


def test_node_process_fixture_starts_gvr_node_and_stops_it(node_process: Callable[..., Any]) -> None:
    """``gvr node`` starts from GVR_* variables, answers C-ECHO, and exits cleanly on SIGTERM."""
    echoscu = require_tool("echoscu", "dcmtk")
    node = node_process()
    command = [echoscu, "-aet", "GVRTEST", "-aec", "GVRNODE", "127.0.0.1", str(node.port)]
    echo = subprocess.run(command, check=False, env=nodelay_env(), capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stderr + node.log()
    assert node.stop() == 0, node.log()
    assert (node.data_dir / "audit.sqlite3").is_file()
