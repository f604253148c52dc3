"""pynetdicom's association threads woken by their queues (node.reactor_wakeup), not by polling timers.

With ``IDLE_SECONDS`` raised to 5 s, anything that still depended on a timed wake-up
would take seconds: echoes, stores and the release must all finish in well under that.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node import reactor_wakeup
from node.reactor_wakeup import ReactorGate
from tests.factories import DX_FOR_PRESENTATION, make_image

SLOW_IDLE_S = 5.0


def test_gate_keeps_the_checkpoint_meaning() -> None:
    """Cleared, ``wait`` blocks like ``threading.Event.wait`` even when work is queued; set, it returns."""
    gate = ReactorGate(lambda: True, idle_seconds=SLOW_IDLE_S)
    assert gate.is_set()
    gate.clear()
    assert not gate.is_set()
    assert gate.wait(timeout=0.05) is False
    threading.Timer(0.05, gate.set).start()
    started = time.monotonic()
    assert gate.wait() is True
    assert time.monotonic() - started < SLOW_IDLE_S / 2


def test_gate_idles_until_poked() -> None:
    """Open with nothing to do, ``wait`` waits for a poke (work queued), not for its idle time."""
    work: list[int] = []
    gate = ReactorGate(lambda: bool(work), idle_seconds=SLOW_IDLE_S)

    def queue_work() -> None:
        work.append(1)
        gate.poke()

    threading.Timer(0.05, queue_work).start()
    started = time.monotonic()
    assert gate.wait() is True
    assert time.monotonic() - started < SLOW_IDLE_S / 2
    started = time.monotonic()
    assert gate.wait() is True  # work still queued: no wait at all
    assert time.monotonic() - started < 0.5


def test_gate_returns_after_idle_time() -> None:
    gate = ReactorGate(lambda: False, idle_seconds=0.05)
    started = time.monotonic()
    assert gate.wait() is True
    assert 0.04 <= time.monotonic() - started < 2


def test_install_refuses_started_threads() -> None:
    class Started:
        def is_alive(self) -> bool:
            return True

    assoc = Started()
    assoc.dul = Started()  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="before"):
        reactor_wakeup.install(assoc)
    with pytest.raises(ValueError, match="positive"):
        reactor_wakeup.install(assoc, idle_seconds=0)


def test_node_serves_without_timed_wakeups(running_node: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Echoes, stores and the release on an association whose idle threads would sleep 5 s."""
    monkeypatch.setattr(reactor_wakeup, "IDLE_SECONDS", SLOW_IDLE_S)
    service = running_node()
    images = [make_image(generate_uid(), seed=seed) for seed in range(3)]
    ae = AE(ae_title="GVRSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(DX_FOR_PRESENTATION, ExplicitVRLittleEndian)
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", service.port, ae_title="GVRNODE")
    assert assoc.is_established
    accepted = service.scp._server.active_associations if service.scp._server else []
    assert [type(a.dul) for a in accepted] == [reactor_wakeup.WakingDUL]
    for image in images:
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(image).Status == 0x0000
    assoc.release()
    assert assoc.is_released
    elapsed = time.monotonic() - started
    assert elapsed < SLOW_IDLE_S / 2, f"an association of 6 exchanges took {elapsed:.1f} s: something polled"


class RecordingClock:
    """Stands in for the ``time`` module: records each sleep instead of sleeping."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


def _sleeps_in_thread(clock: reactor_wakeup.ReactorClock, checkpoint: Any) -> list[float]:
    """The reactor's 1 ms sleep and another, called from a thread whose checkpoint is ``checkpoint``."""
    recorder: RecordingClock = clock._clock  # type: ignore[assignment]

    def reactor_pass() -> None:
        clock.sleep(0.001)
        clock.sleep(0.01)

    thread = threading.Thread(target=reactor_pass)
    thread._reactor_checkpoint = checkpoint  # type: ignore[attr-defined]
    thread.start()
    thread.join()
    return recorder.slept


def test_reactor_sleep_skipped_only_behind_a_gate() -> None:
    """A gated reactor waits in its gate, so its per-pass 1 ms sleep goes; ungated ones (SCUs) keep every sleep."""
    gated = _sleeps_in_thread(reactor_wakeup.ReactorClock(RecordingClock()), ReactorGate(lambda: False, 0.01))  # type: ignore[arg-type]
    assert gated == [0.01]
    ungated = _sleeps_in_thread(reactor_wakeup.ReactorClock(RecordingClock()), threading.Event())  # type: ignore[arg-type]
    assert ungated == [0.001, 0.01]
    assert reactor_wakeup.ReactorClock(time).monotonic is time.monotonic
