"""Slow senders cannot hold the association slots (issue 9, part 6): a whole-PDU deadline, not per read.

A real node with 5 association slots and a 2 s PDU deadline. Four peers dribble an
A-ASSOCIATE-RQ one byte every 0.3 s (each read is quick, so a per-read timeout never
fires) and one associates properly, then dribbles a P-DATA PDU. The node must close
each of them within the deadline (plus slack), and a good sender that starts while
they hold every slot (refused while every slot is held, trying again) must have its instance stored within a bound.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

from pynetdicom import AE

from tests.factories import make_image, write
from tests.peers import LOOPBACK
from tests.reliability.harness import CALLING_AE, send_paths

DEADLINE_S = 2.0
SLACK_S = 2.5
DRIBBLE_EVERY_S = 0.3


def _associate_rq() -> bytes:
    """A well-formed A-ASSOCIATE-RQ header and AE titles (never finished: the dribbler stops early)."""
    body = struct.pack(">HH", 1, 0) + b"GVRNODE".ljust(16) + CALLING_AE.encode().ljust(16) + b"\x00" * 32
    return struct.pack(">BBI", 0x01, 0, len(body) + 200) + body


def _dribble(sock: socket.socket, data: bytes, result: dict[str, float], key: str) -> None:
    """Send ``data`` a byte at a time until the node closes the connection; record when it did."""
    began = time.monotonic()
    try:
        for byte in data:
            sock.sendall(bytes([byte]))
            time.sleep(DRIBBLE_EVERY_S)
            sock.settimeout(0.001)
            try:
                if sock.recv(1) == b"":
                    break
            except TimeoutError:
                pass
            except OSError:
                break
    except OSError:
        pass  # reset by the node: closed
    result[key] = time.monotonic() - began


def _dribble_p_data(port: int, result: dict[str, float]) -> None:
    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(LOOPBACK, port, ae_title="GVRNODE")
    assert assoc.is_established
    transport = assoc.dul.socket
    assert transport is not None and transport.socket is not None
    # A P-DATA-TF PDU that declares 1,000 bytes; pynetdicom's own reactor never sees it
    raw = transport.socket.dup()
    assoc._kill = True  # stop the requestor's threads without a release: the raw socket stays open
    _dribble(raw, struct.pack(">BBI", 0x04, 0, 1000) + b"\x00" * 200, result, "p_data")
    raw.close()


def test_slow_senders_are_cut_off_and_a_good_sender_is_served(running_node: Any, tmp_path: Path) -> None:
    node = running_node(allowed_calling_aets=[CALLING_AE], max_associations=5, pdu_deadline_seconds=DEADLINE_S,
                        network_timeout=30, acse_timeout=30)  # fmt: skip
    result: dict[str, float] = {}
    threads = [threading.Thread(target=_dribble_p_data, args=(node.port, result))]
    threads[0].start()
    time.sleep(0.3)  # associated, now dribbling its P-DATA
    socks = [socket.create_connection((LOOPBACK, node.port)) for _ in range(4)]
    threads += [threading.Thread(target=_dribble, args=(sock, _associate_rq(), result, f"rq{i}"))
                for i, sock in enumerate(socks)]  # fmt: skip
    for thread in threads[1:]:
        thread.start()
    time.sleep(0.5)  # every slot now holds a dribbler
    began, path = time.monotonic(), write(make_image("1.2.3.4"), tmp_path)
    good = send_paths(node.port, [path], calling_ae=CALLING_AE)
    rejected = 0
    while good.error == "association not established" and time.monotonic() - began < 20:
        rejected += 1  # every slot busy: refused at once, as a PACS would be; it tries again
        time.sleep(0.2)
        good = send_paths(node.port, [path], calling_ae=CALLING_AE)
    served_in = time.monotonic() - began
    for thread in threads:
        thread.join(30)
    for sock in socks:
        sock.close()
    assert list(good.statuses.values()) == [0], (good.error, result)
    assert rejected > 0, "the dribblers never held every slot: the test proves nothing"
    assert served_in < DEADLINE_S + SLACK_S, f"the good sender waited {served_in:.1f} s"
    assert sorted(result) == ["p_data", "rq0", "rq1", "rq2", "rq3"]
    assert all(seconds < DEADLINE_S + SLACK_S for seconds in result.values()), result
