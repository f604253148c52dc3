"""Peer strings are data: escaped before a log line or a terminal shows them, and never PHI in logs.

A peer controls every byte of what it sends: an AffectedSOPInstanceUID holding
CR LF forges a log line, ESC sequences in a header element drive the terminal
that shows them, and pydicom's and pynetdicom's messages quote element values
(a PatientName sent with VR UI comes back in a validation warning). So:

* ``escape_controls`` writes every control or invisible formatting character as
  its Python escape (``\\n``, ``\\x1b``, ``\\u202e``); printable text is unchanged.
* ``PeerDataFilter``, on each handler of the process's logging, escapes every
  message; records of the pydicom and pynetdicom loggers keep their text only
  when it is plain static prose (no digits, no quotes), else they say where the
  message came from and withhold it; a traceback keeps its frames and the
  exception's type, never its message.
* ``capture_warnings`` sends Python warnings to logging the same way: category
  and place always, the text only when the warning was not raised by a DICOM
  library.
"""

from __future__ import annotations

import logging
import re
import traceback
import warnings
from types import TracebackType
from typing import TextIO

# Libraries whose messages can quote values read from the network or a data set.
DICOM_LIBRARIES = ("pydicom", "pynetdicom")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u00ad\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")
# What a library message may hold to be shown as written: prose, no values.
_STATIC_TEXT = re.compile(r"[A-Za-z ,.;:()/\-]{1,120}")
_WITHHELD = "message withheld: DICOM library messages may quote element values"


def _escape_one(match: re.Match[str]) -> str:
    return repr(match.group())[1:-1]


def escape_controls(text: str) -> str:
    """``text`` with each control or formatting character written as its escape; one line always."""
    if text.isprintable():  # the common case, checked in C
        return text
    return _CONTROL.sub(_escape_one, text)


def _from_library(name: str) -> bool:
    return any(name == library or name.startswith(library + ".") for library in DICOM_LIBRARIES)


def _library_text(record: logging.LogRecord) -> str:
    """The library message when it is constant prose (no arguments, digits or quotes), else where it came from."""
    if not record.args and isinstance(record.msg, str) and _STATIC_TEXT.fullmatch(record.msg):
        return record.msg
    return f"{_WITHHELD} ({record.module}:{record.lineno})"


def traceback_without_message(exc_info: tuple[type[BaseException], BaseException, TracebackType | None]) -> str:
    """The traceback's frames (our code and the libraries', no data) and the error's type, never its message."""
    frames = "".join(traceback.format_tb(exc_info[2]))
    return f"Traceback (most recent call last):\n{frames}{exc_info[0].__name__} (message withheld)"


class PeerDataFilter(logging.Filter):
    """A handler filter: every record leaves as one line, library records without values."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "gvr_clean", False):  # already rewritten for another handler
            return True
        if _from_library(record.name):
            record.msg = _library_text(record)
        else:
            record.msg = escape_controls(record.getMessage())
        record.args = None
        if record.exc_info and record.exc_info[0] is not None:
            exc_type, exc_value, exc_tb = record.exc_info
            if exc_value is not None:
                record.exc_text = traceback_without_message((exc_type, exc_value, exc_tb))
        setattr(record, "gvr_clean", True)  # noqa: B010 - LogRecord declares no such attribute
        return True


_warnings_log = logging.getLogger("gvr.warnings")


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    place = "/".join(filename.replace("\\", "/").split("/")[-2:])
    library = any(f"/{name}/" in filename.replace("\\", "/") for name in DICOM_LIBRARIES)
    text = _WITHHELD if library else escape_controls(str(message))
    _warnings_log.warning("%s at %s:%d: %s", category.__name__, escape_controls(place), lineno, text)


def capture_warnings() -> None:
    """Route Python warnings to the ``gvr.warnings`` logger, DICOM library warnings without their text."""
    warnings.showwarning = _show_warning


def install(handlers: list[logging.Handler]) -> None:
    """Put one ``PeerDataFilter`` on each handler (once) and capture warnings."""
    for handler in handlers:
        if not any(isinstance(existing, PeerDataFilter) for existing in handler.filters):
            handler.addFilter(PeerDataFilter())
    capture_warnings()
