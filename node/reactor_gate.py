"""A pause for pynetdicom's association reactor that cannot be stale (issue 10, part 4).

pynetdicom runs a reactor thread per association that takes any DIMSE message off
the queue and serves it as a request. Before ``send_c_store`` waits for its
response it pauses the reactor: ``_reactor_checkpoint.clear()``, then it waits
until ``_is_paused`` is true. The reactor sets ``_is_paused = True``, calls
``checkpoint.wait()`` and only after waking sets it back to ``False``. So right
after a C-STORE has ended (``checkpoint.set()``), ``_is_paused`` still says True
until the woken reactor thread really runs: the next ``send_c_store`` sees that
stale True, sends its request, and if the reactor thread is scheduled only after
the answer has arrived (a loaded host: 1 in ~1,500 C-STOREs with four busy
processes on two cores), it takes the C-STORE-RSP, logs "Received unexpected
C-STORE service message" and drops it; ``send_c_store`` then waits for its DIMSE
timeout (30 s) and the association is aborted, although the PACS stored the object.

``ReactorGate`` replaces the checkpoint (same ``set``/``clear``/``wait``). The
reactor waits inside it under a lock and re-checks the flag before leaving, and
``hold`` returns only when the reactor is inside and cannot leave before the next
``set``: a pause that is true when it is reported. Meant for upstream; pynetdicom
offers no hook for the checkpoint, so ``install`` swaps it on an established
association (the old one is set, so a reactor waiting on it leaves at once).
"""

from __future__ import annotations

import threading
import time
from typing import Any

HOLD_POLL_S = 0.0001


class ReactorGate:
    """The reactor's checkpoint: open (set) lets it run, closed (clear) holds it inside ``wait``."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._open = True
        self._inside = False  # the reactor waits in here and leaves only after set()

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._open = False

    def wait(self, timeout: float | None = None) -> bool:
        """The reactor's side: return only while the gate is open (checked again under the lock)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._inside = True
            try:
                while not self._open:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._cond.wait(remaining)
            finally:
                self._inside = False
        return True

    def hold(self, reactor: threading.Thread) -> bool:
        """Close the gate and return once the reactor is inside it: True, or False if the reactor ended."""
        self.clear()
        while reactor.is_alive():
            with self._cond:
                if self._inside and not self._open:
                    return True
            time.sleep(HOLD_POLL_S)
        return False


def install(assoc: Any, gate: ReactorGate | None = None) -> ReactorGate:
    """Give an established pynetdicom ``Association`` a ``ReactorGate`` as its reactor checkpoint."""
    gate = gate or ReactorGate()
    previous = assoc._reactor_checkpoint
    assoc._reactor_checkpoint = gate
    previous.set()  # a reactor waiting on the old checkpoint comes round to the gate
    return gate


def hold_reactor(assoc: Any) -> bool:
    """Before a DIMSE request: hold the association's reactor inside its gate (``install`` first).

    ``send_c_store`` then finds it truly paused and opens the gate again after its response.
    Returns False when the association's reactor has ended (the association is gone).
    """
    gate = assoc._reactor_checkpoint
    if not isinstance(gate, ReactorGate):
        raise TypeError("hold_reactor needs an association with a ReactorGate: call reactor_gate.install first")
    return gate.hold(assoc)
