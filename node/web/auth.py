"""Who may use the review page: a users file of ``name:hash`` lines, scrypt hashes, a session secret.

Passwords never travel in argv or the environment: ``gvr web --add-user NAME`` reads
one from the terminal (or stdin) and appends its hash. scrypt is in the standard
library and memory-hard, so a stolen users file costs an attacker real work.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1  # ~40 ms per check on these cores
_USER_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


def hash_password(password: str) -> str:
    """``scrypt$N$r$p$salt$key`` (base64), ready for the users file."""
    if not password:
        raise ValueError("an empty password is not a password")
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    return "$".join(["scrypt", str(_SCRYPT_N), str(_SCRYPT_R), str(_SCRYPT_P), _b64(salt), _b64(key)])


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (a ``hash_password`` string); False for a malformed hash."""
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(key)
        actual = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                                dklen=len(expected))  # fmt: skip
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def check_login(users: dict[str, str], name: str, password: str) -> bool:
    """Whether ``name`` is a user and ``password`` is theirs, in the same time either way."""
    stored = users.get(name)
    matches = verify_password(password, stored or _dummy_hash())
    return stored is not None and matches


@functools.cache
def _dummy_hash() -> str:
    """A hash no password matches: checking it costs as much as a real one, so an unknown
    user name takes as long to refuse as a wrong password (no timing oracle for names)."""
    return hash_password(secrets.token_urlsafe(16))


def check_user_name(name: str) -> str:
    if not _USER_NAME.match(name):
        raise ValueError(f"invalid user name {name!r}: 1-64 letters, digits or _ . @ -")
    return name


def load_users(path: Path) -> dict[str, str]:
    """name -> hash from the users file; a missing file holds no users. Blank and ``#`` lines are skipped."""
    if not path.is_file():
        return {}
    users: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, stored = line.partition(":")
        if not sep or not _USER_NAME.match(name) or not stored.startswith("scrypt$"):
            raise ValueError(f"{path}, line {number}: expected 'name:scrypt$...' (gvr web --add-user NAME)")
        users[name] = stored
    return users


def set_password(path: Path, name: str, password: str) -> None:
    """Add ``name`` to the users file, or replace their hash; the file is readable by its owner only."""
    check_user_name(name)
    users = load_users(path)
    users[name] = hash_password(password)
    _write_private(path, "".join(f"{user}:{stored}\n" for user, stored in users.items()).encode())


def session_secret(path: Path) -> str:
    """The key that signs session cookies, made once and kept (0600), so a restart keeps people logged in."""
    if path.is_file():
        return path.read_text().strip()
    secret = secrets.token_urlsafe(48)
    _write_private(path, secret.encode())
    return secret


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
