"""``gvr web`` on the command line: adding a user from stdin, and refusing to start with a sentence."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import pytest

from node.cli import web as web_cmd
from node.web.auth import check_login, load_users


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GVR_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def test_add_user_reads_the_password_from_stdin_and_stores_only_a_hash(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret words\n"))
    assert web_cmd.main(["--add-user", "alice"]) == 0
    users_file = data_dir / "web-users"
    assert "s3cret" not in users_file.read_text() and users_file.stat().st_mode & 0o777 == 0o600
    assert check_login(load_users(users_file), "alice", "s3cret words")
    assert not check_login(load_users(users_file), "alice", "s3cret")
    assert "user alice saved" in capsys.readouterr().out


def test_refuses_to_start_without_users_or_on_a_busy_port(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert web_cmd.main([]) == 2
    assert "no users" in capsys.readouterr().err and not data_dir.exists()  # nothing written before it refuses
    monkeypatch.setattr("sys.stdin", io.StringIO("pw\n"))
    web_cmd.main(["--add-user", "alice"])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert web_cmd.main(["--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "GVR_WEB_PORT" in err
