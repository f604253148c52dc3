"""Settings problems as sentences a user can act on: which file, line, key or variable, and what to do.

``load_settings`` stays the plain constructor (pydantic's ``ValidationError``
for code and tests); every ``gvr`` command loads through ``checked_settings``,
which adds what pydantic cannot know about:

* the TOML file: a missing file (``--config`` or ``GVR_CONFIG``) and a syntax
  error are named with the file, line and key, before pydantic reads it;
* ``GVR_*`` variables no setting has (``GVR_DESTINATION``): pydantic ignores
  them, so a typo silently drops a setting. They are refused with the closest
  known name unless ``GVR_ALLOW_UNKNOWN_ENV=true``;
* a value pydantic refused: one line per problem, naming the variable or the
  file line it came from, without pydantic's links and type dumps.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from node.config import ENV_PREFIX, Settings, load_settings

log = logging.getLogger(__name__)

# GVR_* names that are not settings: the TOML file's path, a worker's node name, the tests' switches.
EXTRA_VARIABLES = frozenset({ENV_PREFIX + "CONFIG", ENV_PREFIX + "WORKER_NODENAME"})  # the second: gvr worker
_RESERVED_PREFIXES = (ENV_PREFIX + "TEST_",)
# Values never repeated in a message: they may hold a password.
_SECRET_FIELDS = frozenset({"database_url", "broker_url"})
_TOML_POSITION = re.compile(r"^(?P<what>.*) \(at line (?P<line>\d+), column (?P<column>\d+)\)$")
_TOML_KEY = re.compile(r"^\s*(?P<key>[A-Za-z0-9_.\-\"']+)\s*=")


class SettingsError(ValueError):
    """The settings cannot be used; the message says where the problem is and what to do."""


def known_variables() -> list[str]:
    return sorted({ENV_PREFIX + name.upper() for name in Settings.model_fields} | EXTRA_VARIABLES)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """``GVR_*`` variables no setting reads, each with the closest known name when there is one."""
    known = known_variables()
    problems = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known or name.startswith(_RESERVED_PREFIXES):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(f"unknown variable {name}{hint}")
    return problems


def checked_settings(config_file: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Load the settings as ``gvr`` commands do; raises ``SettingsError`` with one sentence per problem."""
    env = os.environ if environ is None else environ
    toml_path = config_file if config_file is not None else _path_or_none(env.get(ENV_PREFIX + "CONFIG"))
    toml_text = _read_toml(toml_path, "--config" if config_file is not None else ENV_PREFIX + "CONFIG")
    unknown = unknown_variables(env)
    try:
        settings = load_settings(config_file)
    except ValidationError as error:
        problems = unknown + describe_validation_error(error, toml_path, toml_text, env)
        raise SettingsError(_joined(problems, unknown)) from None
    if unknown and not settings.allow_unknown_env:
        raise SettingsError(_joined(unknown, unknown))
    for problem in unknown:
        log.warning("%s: ignored (allow_unknown_env is on)", problem)
    return settings


def _joined(problems: list[str], unknown: list[str]) -> str:
    text = "invalid settings:\n" + "\n".join(f"  - {problem}" for problem in problems)
    if unknown:
        text += (f"\nFix the variable names (`env | grep {ENV_PREFIX}`), or set "
                 f"{ENV_PREFIX}ALLOW_UNKNOWN_ENV=true to start anyway.")  # fmt: skip
    return text


def _path_or_none(value: str | None) -> Path | None:
    return Path(value) if value else None


def _read_toml(path: Path | None, origin: str) -> str | None:
    """The file's text after a syntax check; None without a file."""
    if path is None:
        return None
    if not path.is_file():
        raise SettingsError(f"config file {path} (from {origin}) does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SettingsError(f"config file {path} cannot be read: {error}") from None
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(_toml_syntax_message(path, text, str(error))) from None
    return text


def _toml_syntax_message(path: Path, text: str, message: str) -> str:
    match = _TOML_POSITION.match(message)
    if match is None:
        return f"config file {path}: TOML syntax error: {message}"
    line = int(match["line"])
    lines = text.splitlines()
    key = _TOML_KEY.match(lines[line - 1]) if 0 < line <= len(lines) else None
    where = f"line {line}" + (f", key '{key['key']}'" if key else "")
    return (f"config file {path}, {where}: TOML syntax error: {match['what'].lower()} (column {match['column']}); "
            "strings need quotes, lists brackets, e.g. destinations = [\"PACS@pacs:104\"]")  # fmt: skip


def describe_validation_error(
    error: ValidationError, toml_path: Path | None, toml_text: str | None, environ: Mapping[str, str]
) -> list[str]:
    """One sentence per pydantic error, naming the variable or the file line the value came from."""
    toml_keys = _toml_key_lines(toml_text)
    problems = []
    for item in error.errors(include_url=False):
        field = str(item["loc"][0]) if item["loc"] else ""
        message = _plain_message(item)
        if not field:  # a check across settings (the TLS pair)
            problems.append(message)
            continue
        variable = ENV_PREFIX + field.upper()
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(field, list(Settings.model_fields), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{_toml_where(toml_path, toml_keys, field)}: unknown setting{hint}")
        elif variable in environ:
            problems.append(f"{variable}: {message}{_got(field, item)}")
        elif field in toml_keys:
            problems.append(f"{_toml_where(toml_path, toml_keys, field)}: {message}{_got(field, item)}")
        else:
            problems.append(f"setting {field}: {message}{_got(field, item)}")
    return problems


def _plain_message(item: Any) -> str:
    message = str(item["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return message[:1].lower() + message[1:] if message[:2] != message[:2].upper() else message


def _got(field: str, item: Any) -> str:
    value = item.get("input")
    if field in _SECRET_FIELDS or not isinstance(value, str | int | float) or isinstance(value, bool):
        return ""
    shown = repr(value)
    return f" (got {shown})" if shown not in str(item["msg"]) and len(shown) <= 80 else ""


def _toml_key_lines(text: str | None) -> dict[str, int]:
    """Top-level keys of the TOML text and the line each is on (settings are flat)."""
    lines: dict[str, int] = {}
    for number, line in enumerate((text or "").splitlines(), start=1):
        if line.lstrip().startswith("["):
            break
        match = _TOML_KEY.match(line)
        if match:
            lines.setdefault(match["key"].strip("\"'"), number)
    return lines


def _toml_where(path: Path | None, keys: dict[str, int], field: str) -> str:
    line = keys.get(field)
    return f"config file {path}" + (f", line {line}" if line else "") + f", key '{field}'"
