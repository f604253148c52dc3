"""Peer strings in logs (issue 9): escaped to one line; pydicom/pynetdicom messages and warnings carry no values."""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator

import pydicom
import pytest

from node import log_hygiene
from node.log_hygiene import PeerDataFilter, escape_controls

NAME = "ZQXWYVERN^OTTOLINE"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """A root handler with the node's filter, as ``setup_logging`` installs it; warnings captured too."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    previous_level, previous_show = root.level, warnings.showwarning
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    log_hygiene.install([handler])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = log_hygiene._show_warning  # catch_warnings restored the original
            yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
        warnings.showwarning = previous_show


def test_escape_controls_one_printable_line() -> None:
    assert escape_controls("1.2.3") == "1.2.3"
    assert escape_controls("a\r\nb\x1b[31m\x7f\u202e\u2028") == "a\\r\\nb\\x1b[31m\\x7f\\u202e\\u2028"
    assert escape_controls("MÜLLER^Zoë") == "MÜLLER^Zoë"  # printable non-ASCII stays


def test_node_record_with_crlf_value_stays_one_line(captured: io.StringIO) -> None:
    logging.getLogger("node.ingest").warning("refused: %s", "1.2.3\r\nINFO node.scp: FORGED")
    lines = captured.getvalue().splitlines()
    assert lines == ["WARNING node.ingest: refused: 1.2.3\\r\\nINFO node.scp: FORGED"]


def test_library_records_withhold_values_keep_static_text(captured: io.StringIO) -> None:
    logging.getLogger("pynetdicom.association").warning(f"Non-conformant 'Affected SOP Instance UID' value '{NAME}'")
    logging.getLogger("pydicom").warning("Invalid value for VR UI: %r", NAME)
    logging.getLogger("pynetdicom.association").warning("Received unexpected C-STORE service message")
    out = captured.getvalue()
    assert "ZQXWYVERN" not in out and "OTTOLINE" not in out
    assert out.count("message withheld") == 2 and "test_log_hygiene:" in out  # where it came from
    assert "Received unexpected C-STORE service message" in out


def test_traceback_keeps_frames_withholds_message(captured: io.StringIO) -> None:
    try:
        raise ValueError(f"Invalid value for VR UI: '{NAME}'")
    except ValueError:
        logging.getLogger("node.scp").exception("store failed")
    out = captured.getvalue()
    assert "Traceback" in out and "test_log_hygiene.py" in out and "ValueError (message withheld)" in out
    assert NAME not in out


def test_pydicom_warning_for_name_sent_as_ui_carries_no_name(captured: io.StringIO) -> None:
    """PatientName with VR UI: pydicom warns (and logs) quoting the value; the log has neither."""
    pydicom.valuerep.validate_value("UI", NAME, pydicom.config.WARN)  # what reading the element does
    warnings.warn("our own warning \x1b[31mx", UserWarning, stacklevel=1)
    out = captured.getvalue()
    assert "ZQXWYVERN" not in out and "OTTOLINE" not in out
    assert "UserWarning at pydicom/" in out and "message withheld" in out
    assert "our own warning \\x1b[31mx" in out and "\x1b" not in out



def test_install_puts_one_filter_per_handler() -> None:
    handler = logging.StreamHandler(io.StringIO())
    previous = warnings.showwarning
    try:
        log_hygiene.install([handler])
        log_hygiene.install([handler])
    finally:
        warnings.showwarning = previous
    assert [type(f) for f in handler.filters] == [PeerDataFilter]
