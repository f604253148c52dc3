"""Mistakes a new user makes, run as ``gvr`` subprocesses: each gets a sentence and the right exit status.

Exit status 2 is a usage or configuration mistake, 1 a failure of something
outside (a peer refused). No mistake may print a traceback or pydantic's links.
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from node.cli.main import COMMANDS
from tests.peers import LOOPBACK, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mistake:
    """One row: what the user ran, with which env and config file, and what must come out."""

    name: str
    argv: list[str]
    expected: list[str]
    status: int = 2
    env: dict[str, str] = field(default_factory=dict)
    toml: str | None = None  # written to {toml} (a path put in argv/env as "{toml}")


MISTAKES = [
    Mistake("toml syntax", ["status", "--config", "{toml}"], ["{toml}", "line 2", "key 'port'", "TOML syntax"],
            toml='ae_title = "GVRNODE"\nport = \n'),
    Mistake("toml unknown key", ["db", "current", "--config", "{toml}"],
            ["{toml}", "line 1", "key 'prot'", "did you mean port?"], toml="prot = 104\n"),
    Mistake("toml bad value", ["db", "current"], ["{toml}, line 1, key 'port'", "less than or equal to 65535"],
            env={"GVR_CONFIG": "{toml}"}, toml="port = 70000\n"),
    Mistake("config file missing", ["audit"], ["missing.toml", "GVR_CONFIG", "does not exist"],
            env={"GVR_CONFIG": "{tmp}/missing.toml"}),
    Mistake("misspelt destinations", ["node"], ["GVR_DESTINATION", "did you mean GVR_DESTINATIONS?",
            "GVR_ALLOW_UNKNOWN_ENV"], env={"GVR_DESTINATION": "PACS@127.0.0.1:104"}),
    Mistake("misspelt ae title", ["status"], ["did you mean GVR_AE_TITLE?"], env={"GVR_AE_TTILE": "WARD7"}),
    Mistake("unknown allowed", ["db", "current"], ["none (empty database", "did you mean GVR_DESTINATIONS?"],
            status=0, env={"GVR_DESTINATION": "PACS@h:104", "GVR_ALLOW_UNKNOWN_ENV": "true"}),
    Mistake("port not a number", ["status"], ["GVR_PORT: input should be a valid integer", "'eleven'"],
            env={"GVR_PORT": "eleven"}),
    Mistake("ae title too long in env", ["node"], ["GVR_AE_TITLE", "AE title longer than 16 characters"],
            env={"GVR_AE_TITLE": "ABCDEFGHIJKLMNOPQRST"}),
    Mistake("tls half pair", ["node"], ["tls_cert and tls_key must be set together"],
            env={"GVR_TLS_CERT": "node.pem"}),
    Mistake("ae title too long in argument", ["echo", "ABCDEFGHIJKLMNOPQRST@127.0.0.1:104"],
            ["AE title longer than 16 characters"]),
    Mistake("peer without port", ["send", "x.dcm", "--to", "just-a-host"], ["expected AE@host:port"]),
    Mistake("peer port out of range", ["echo", "PACS@127.0.0.1:99999"], ["port 99999 is not in 1-65535"]),
    Mistake("misspelt command", ["stauts"], ["unknown command 'stauts'", "did you mean status?"]),
    Mistake("closed port", ["echo", "NOBODY@127.0.0.1:{free_port}", "--timeout", "3"],
            ["connection refused", "nothing listens on port"], status=1),
    Mistake("status window", ["status", "--window-minutes", "0"], ["--window-minutes must be >= 1"]),
    Mistake("database url not a url", ["status"], ["GVR_DATABASE_URL: not a URL"],
            env={"GVR_DATABASE_URL": "gvr:s3cret@db.example.internal/gvr"}),
    Mistake("data folder wrong", ["status", "--check", "db"], ["Health: DOWN", "audit.sqlite3 does not exist",
            "GVR_DATA_DIR"], status=1, env={"GVR_DATA_DIR": "{tmp}/typo"}),
]  # fmt: skip


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def run_gvr(argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``gvr ARGV`` in a fresh interpreter with only these GVR_* variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GVR_")}
    clean.update(env, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "node.cli.main", *argv], capture_output=True, text=True,
                          env=clean, cwd=cwd, timeout=timeout, check=False)  # fmt: skip


def assert_no_traceback(output: str) -> None:
    assert "Traceback" not in output and "errors.pydantic.dev" not in output and "type=" not in output, output


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.name for m in MISTAKES])
def test_cli_mistake_gets_a_sentence_and_exit_status(mistake: Mistake, tmp_path: Path) -> None:
    """Each mistake prints what is wrong and where, with exit status 2 (usage, config) or 1 (a peer)."""
    values = {"tmp": str(tmp_path), "toml": str(tmp_path / "gvr.toml"), "free_port": str(free_port())}
    if mistake.toml is not None:
        (tmp_path / "gvr.toml").write_text(mistake.toml)
    env = {"GVR_DATA_DIR": str(tmp_path / "data")} | {k: _fill(v, values) for k, v in mistake.env.items()}
    result = run_gvr([_fill(arg, values) for arg in mistake.argv], env, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == mistake.status, output
    for expected in mistake.expected:
        assert _fill(expected, values) in output, output
    assert_no_traceback(output)
    assert "s3cret" not in output


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket() as holder:
        holder.bind((LOOPBACK, 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def test_cli_node_busy_port_names_port_and_setting(held_port: int, tmp_path: Path) -> None:
    """``gvr node`` on a port in use says which port and which setting, exit status 2."""
    env = {"GVR_DATA_DIR": str(tmp_path / "data"), "GVR_PORT": str(held_port)}
    result = run_gvr(["node"], env, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert f"port {held_port} on 127.0.0.1 is already in use (setting port, GVR_PORT)" in output
    assert_no_traceback(output)


def test_cli_version_names_the_package(tmp_path: Path) -> None:
    """``gvr --version`` prints the installed version, exit 0."""
    from importlib.metadata import version

    result = run_gvr(["--version"], {}, tmp_path)
    assert (result.returncode, result.stdout.strip()) == (0, f"gvr {version('gvr-node')}")


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_cli_help_has_no_none_default_or_markup(command: str) -> None:
    """Help shows no "(default: None)", no default twice, no RST or markdown backticks."""
    module: Any = importlib.import_module(COMMANDS[command][0])
    for parser in _parsers(module.build_parser()):
        text = parser.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, text
        assert "`" not in text, text
        formatter: Any = parser._get_formatter()
        for action in parser._actions:
            shown = formatter._expand_help(action) if action.help else ""
            assert shown.lower().count("default") <= 1, shown


# -- association failures, against real peers --------------------------------------------------


def _echo(peer: str, capsys: pytest.CaptureFixture[str], *options: str) -> tuple[int, str]:
    from node.cli.main import main

    status = main(["echo", peer, *options])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def test_cli_echo_wrong_called_ae_is_rejection_in_words(running_node: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """A called AE title the node does not answer to: A-ASSOCIATE-RJ with result, source and reason in words."""
    service = running_node()
    status, output = _echo(f"WRONGAE@127.0.0.1:{service.port}", capsys)
    assert status == 1
    assert "rejected the association: A-ASSOCIATE-RJ, rejected permanent" in output
    assert "reason: called ae title not recognised" in output and "check the part before @" in output


def test_cli_echo_unknown_calling_ae_is_rejection_in_words(
    running_node: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A calling AE title not in allowed_calling_aets: the reason names it and says what to do."""
    service = running_node(allowed_calling_aets=["PACS"])
    status, output = _echo(f"GVRNODE@127.0.0.1:{service.port}", capsys, "--calling-ae", "STRANGER")
    assert status == 1
    assert "reason: calling ae title not recognised" in output
    assert "does not accept our calling AE title STRANGER" in output


def test_cli_echo_silent_peer_is_a_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    """A port that accepts TCP but never answers the association request is reported as a timeout."""
    with socket.socket() as silent:
        silent.bind((LOOPBACK, 0))
        silent.listen()
        held: list[socket.socket] = []
        acceptor = threading.Thread(target=lambda: held.append(silent.accept()[0]), daemon=True)
        acceptor.start()
        status, output = _echo(f"SILENT@127.0.0.1:{silent.getsockname()[1]}", capsys, "--timeout", "1")
        for connection in held:
            connection.close()
    assert status == 1
    assert "did not answer the association request within 1 s" in output
