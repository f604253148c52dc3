"""Wake pynetdicom's per-association threads when there is work, instead of polling (issue 12).

pynetdicom 3.0 serves each association with two threads that poll. The DUL reactor
(``DULServiceProvider.run_reactor``) sleeps ``_run_loop_delay`` (1 ms; the node used
0.1 ms) whenever a pass found nothing; the acceptor's ``Association._run_reactor``
sleeps 1 ms and then looks at its DIMSE queue. Profiled with storescu sending 500
x 0.5 MB: with 8 associations, 16 polling threads took ~5.8 ms of CPU per instance
(one association: ~3 ms), and each instance waited on average half a poll before its
handler ran. ``install`` changes both threads, before they start, to block until
something arrives:

- **DUL thread**: it blocks in ``select`` on the peer's socket and a wake-up socket
  pair, at most ``idle_seconds``. Putting a primitive to send (``to_provider_queue``),
  an event (``event_queue``) or setting ``_kill_thread`` writes a byte to the pair.
  ``_run_loop_delay`` becomes 0: the wait happens in ``_is_transport_event`` instead.
- **association thread**: its reactor checkpoint (a ``threading.Event`` that pauses
  the reactor while the acceptor itself sends) becomes a ``ReactorGate`` whose
  ``wait`` also waits, at most ``idle_seconds``, until a DIMSE message or a DUL
  primitive (release, abort) is queued. The reactor's own 1 ms sleep before the gate
  is skipped (``ReactorClock``): it delayed each instance's handler by up to 1 ms and,
  on one stop-and-wait association, its response by as much (~12 % of the thread's
  wall time per 0.5 MB instance).

Anything not woken (timers: ARTIM, network idle) is still seen within ``idle_seconds``.
Written against pynetdicom 3.0.4; upstream, the same change is an event in
``run_reactor`` and ``_run_reactor`` set by the queues' producers.
"""

from __future__ import annotations

import queue
import select
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pynetdicom.association
from pynetdicom.dul import DULServiceProvider

IDLE_SECONDS = 0.01  # longest sleep of an idle thread: timers and kill flags are seen this late at worst


class NotifyingQueue(queue.Queue[Any]):
    """A ``queue.Queue`` that calls ``notify`` after each ``put``."""

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__()
        self._notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


class WakeupPair:
    """A socket pair the DUL thread selects on beside the peer's socket; ``wake`` makes it readable."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self.waiting = False  # set by the DUL thread around its select: no syscall when it is busy

    def wake(self) -> None:
        if not self.waiting:
            return
        try:
            self.writer.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # full (already readable) or closed (the association is gone)

    def drain(self) -> None:
        try:
            while self.reader.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


class WakingDUL(DULServiceProvider):
    """``DULServiceProvider`` that waits in ``_is_transport_event`` until the socket or a producer wakes it.

    Installed by class assignment on pynetdicom's own instance (its thread target is
    already bound), so it adds no state of its own beyond ``_wakeup``.
    """

    _wakeup: WakeupPair
    idle_seconds: float

    @property
    def _kill_thread(self) -> bool:
        return bool(self.__dict__.get("_kill_thread", False))

    @_kill_thread.setter
    def _kill_thread(self, value: bool) -> None:
        self.__dict__["_kill_thread"] = value
        if value:
            self._wakeup.wake()

    def _is_transport_event(self) -> bool:
        self._wait_for_work()
        return bool(super()._is_transport_event())

    def _wait_for_work(self) -> None:
        wakeup = self._wakeup
        wakeup.waiting = True  # before the checks below: a producer that missed them wakes the select
        try:
            if self._kill_thread or not self.event_queue.empty() or not self.to_provider_queue.empty():
                return
            peer = self.socket.socket if self.socket is not None and self.socket._is_connected else None
            if isinstance(peer, ssl.SSLSocket) and peer.pending():
                return  # decrypted bytes already buffered: select would not see them
            watched: list[Any] = [wakeup.reader] if peer is None else [peer, wakeup.reader]
            try:
                readable, _, _ = select.select(watched, [], [], self.idle_seconds)
            except (OSError, ValueError):
                return  # a closed socket: pynetdicom's own check turns it into Evt17
        finally:
            wakeup.waiting = False
        if wakeup.reader in readable:
            wakeup.drain()


class ReactorGate:
    """Stands in for ``Association._reactor_checkpoint`` (a ``threading.Event``).

    ``set``/``clear``/``is_set`` keep the Event's meaning (the acceptor pauses its
    reactor by clearing it); ``wait`` additionally waits up to ``idle_seconds`` for
    ``has_work`` when the gate is open and there is nothing to do.
    """

    def __init__(self, has_work: Callable[[], bool], idle_seconds: float) -> None:
        self._condition = threading.Condition()
        self._open = True
        self._has_work = has_work
        self.idle_seconds = idle_seconds

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        with self._condition:
            self._open = True
            self._condition.notify_all()

    def clear(self) -> None:
        with self._condition:
            self._open = False

    def poke(self) -> None:
        """Something was queued for the reactor."""
        with self._condition:
            self._condition.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        with self._condition:
            idled = False
            while True:
                while not self._open:
                    if not self._condition.wait(timeout) and timeout is not None:
                        return False
                if idled or self._has_work():
                    return True
                self._condition.wait(self.idle_seconds)
                idled = True


REACTOR_LOOP_SLEEP = 0.001  # the sleep at the top of each pass of pynetdicom 3.0's Association._run_reactor


class ReactorClock:
    """``pynetdicom.association``'s ``time`` module, but without the reactor's per-pass sleep when a gate waits.

    The sleep is skipped only in an association thread whose checkpoint is a ``ReactorGate``
    (an installed association: the gate blocks until there is work, so nothing spins); every
    other call, other threads and associations without the gate (the node's SCU side) see
    ``time`` unchanged. pynetdicom calls ``time.sleep`` through its module global, so this
    swaps that global once per process.
    """

    def __init__(self, clock: ModuleType) -> None:
        self._clock = clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._clock, name)

    def sleep(self, seconds: float) -> None:
        if seconds == REACTOR_LOOP_SLEEP and isinstance(
            getattr(threading.current_thread(), "_reactor_checkpoint", None), ReactorGate
        ):
            return
        self._clock.sleep(seconds)


def _skip_reactor_sleep() -> None:
    if not isinstance(getattr(pynetdicom.association, "time", None), ReactorClock):
        setattr(pynetdicom.association, "time", ReactorClock(time))  # noqa: B010 - a module global, not exported


def install(assoc: Any, idle_seconds: float | None = None) -> None:
    """Make ``assoc``'s DUL and reactor threads event-driven; call before ``assoc.start()`` (EVT_CONN_OPEN)."""
    idle_seconds = IDLE_SECONDS if idle_seconds is None else idle_seconds
    if idle_seconds <= 0:
        raise ValueError(f"idle_seconds must be positive, got {idle_seconds}")
    dul = assoc.dul
    if dul.is_alive() or assoc.is_alive():
        raise RuntimeError("reactor_wakeup.install must run before the association's threads start")
    wakeup = WakeupPair()
    weakref.finalize(dul, wakeup.close)
    dul.__class__ = WakingDUL
    dul._wakeup = wakeup
    dul.idle_seconds = idle_seconds
    dul.event_queue = _moved(dul.event_queue, wakeup.wake)  # holds Evt5 (connection open) already
    dul.to_provider_queue = _moved(dul.to_provider_queue, wakeup.wake)
    dul._run_loop_delay = 0  # the wait is in _wait_for_work now

    dimse = assoc.dimse
    gate = ReactorGate(lambda: not dimse.msg_queue.empty() or not dul.to_user_queue.empty(), idle_seconds)
    dimse.msg_queue = _moved(dimse.msg_queue, gate.poke)
    dul.to_user_queue = _moved(dul.to_user_queue, gate.poke)
    gate_was_open = assoc._reactor_checkpoint.is_set()
    assoc._reactor_checkpoint = gate
    if not gate_was_open:
        gate.clear()
    _skip_reactor_sleep()


def _moved(old: queue.Queue[Any], notify: Callable[[], None]) -> NotifyingQueue:
    """A ``NotifyingQueue`` holding what ``old`` held (no other thread uses it yet)."""
    new = NotifyingQueue(notify)
    while True:
        try:
            new.put(old.get_nowait())
        except queue.Empty:
            return new
