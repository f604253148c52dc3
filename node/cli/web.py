"""``gvr web``: the review page (jobs, a job's timeline and pictures, workers), behind a login.

``gvr web --add-user NAME`` adds a user or changes their password: the password
is read from the terminal (or one line of stdin), never from argv, and only its
scrypt hash is stored.
"""

from __future__ import annotations

import argparse
import getpass
import socket
import sys

from node.cli.common import add_config_option, settings_from, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gvr web",
        description="Serve the review page: jobs with filters, each job's timeline, pictures and report, "
        "re-send and re-run buttons, workers. Needs a user: gvr web --add-user NAME.",
    )
    parser.add_argument("--host", help="address to listen on (setting web_bind_address, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (setting web_port, default 8080)")
    parser.add_argument("--add-user", metavar="NAME", help="add a user (or set their password) and exit")
    add_config_option(parser)
    return parser


def _read_password(name: str) -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass(f"password for {name}: ")
    if first != getpass.getpass("again: "):
        raise ValueError("the two passwords differ")
    return first


def _add_user(name: str, args: argparse.Namespace) -> int:
    from node.web.app import users_file
    from node.web.auth import set_password

    path = users_file(settings_from(args))
    try:
        set_password(path, name, _read_password(name))
    except ValueError as error:
        print(f"gvr web: {error}", file=sys.stderr)
        return 2
    print(f"user {name} saved in {path}")
    return 0


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.add_user:
        return _add_user(args.add_user, args)
    import uvicorn

    from node.web.app import context_from, create_app, users_file
    from node.web.auth import load_users

    settings = settings_from(args)
    try:
        users = load_users(users_file(settings))
    except ValueError as error:  # a hand-edited line that is not name:hash
        print(f"gvr web: {error}", file=sys.stderr)
        return 2
    if not users:
        print(f"gvr web: no users in {users_file(settings)}; add one with: .venv/bin/gvr web --add-user NAME",
              file=sys.stderr)  # fmt: skip
        return 2
    ctx = context_from(settings)
    host, port = args.host or settings.web_bind_address, args.port or settings.web_port
    try:
        sock = _bind(host, port)
    except OSError as error:
        print(f"gvr web: cannot listen on {host}:{port} ({error.strerror}); choose another with --port "
              "or GVR_WEB_PORT", file=sys.stderr)  # fmt: skip
        return 2
    print(f"review page on http://{host}:{sock.getsockname()[1]}/ (Ctrl-C stops it)", flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(ctx), log_level="warning", access_log=False))
    server.run(sockets=[sock])
    return 0
