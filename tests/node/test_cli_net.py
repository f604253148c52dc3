"""``gvr echo`` and ``gvr send`` against a running node, as a user would call them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from node.audit.models import Instance, InstanceStatus
from node.cli.main import main
from tests.factories import write_study


def test_cli_echo_reports_success(running_node: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """gvr echo prints the status and exits 0."""
    service = running_node()
    assert main(["echo", f"GVRNODE@127.0.0.1:{service.port}"]) == 0
    assert "0x0000 (success)" in capsys.readouterr().out


def test_cli_echo_unreachable_peer_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    """A port nobody listens on gives a clear message and exit status 1."""
    from tests.peers import free_port

    assert main(["echo", f"NOBODY@127.0.0.1:{free_port()}", "--timeout", "2"]) == 1
    assert "gvr echo: failed:" in capsys.readouterr().err


def test_cli_send_folder_stores_every_file(running_node: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """gvr send FOLDER sends every DICOM file in it and skips the rest, saying so."""
    service = running_node()
    write_study(tmp_path / "study", 4)
    (tmp_path / "study" / "notes.txt").write_text("not DICOM")
    assert main(["send", str(tmp_path / "study"), "--to", f"GVRNODE@127.0.0.1:{service.port}"]) == 1
    out = capsys.readouterr().out
    assert "sent 4 of 4" in out and "1 unreadable" in out
    with service.audit.session() as session:
        accepted = session.scalar(select(func.count()).where(Instance.status == InstanceStatus.ACCEPTED))
    assert accepted == 4


def test_cli_send_bad_peer_syntax_is_a_usage_error() -> None:
    """A destination that is not AE@host:port is refused by the parser (exit 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["send", "x.dcm", "--to", "just-a-host"])
    assert exit_info.value.code == 2
