"""The shared fixtures themselves: each real peer starts, answers, and leaves nothing behind."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy

from tests.peers import (
    REDIS_CLAIM_KEY,
    Orthanc,
    PostgresServer,
    claim_redis_db,
    free_port,
    port_answers,
    release_redis_db,
    wait_for_http,
    wait_for_port,
)


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
    with urllib.request.urlopen(f"{orthanc.url}/system", timeout=5) as response:
        import json

        system = json.loads(response.read())
    assert system["DicomAet"] == "ORTHANC"
    assert system["DicomPort"] == orthanc.dicom_port
    assert orthanc.studies() == []
