"""Background loops that outlive their errors, and a node that exits when one dies anyway.

A pass of a loop (the assembler's) may fail in ways nobody listed: the audit DB
away, a MemoryError on a huge header, a bug. ``SupervisedLoop`` logs each failed
pass (the error's type and where, not its message: messages can quote patient
data) and runs the next one. Only what is not an ``Exception`` (SystemExit, a
KeyboardInterrupt, a failure of the logging itself) ends the thread; it then
calls ``on_death``, and the node stops and exits non-zero so its service
manager restarts it (``deploy/systemd/gvr-node.service``: Restart=always),
rather than running on with a dead assembler and silently queueing nothing.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable

log = logging.getLogger(__name__)


class ServiceThreadDiedError(RuntimeError):
    """A supervised background loop ended: the process must exit non-zero."""


def describe_error(error: BaseException) -> str:
    """The error's type and where it was raised, without its message (library messages quote values)."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {'/'.join(frames[-1].filename.split('/')[-2:])}:{frames[-1].lineno}" if frames else ""
    return f"{type(error).__name__}{where}"


def withheld(error: BaseException) -> str:
    """The error's type and where it was raised, not its message: library messages quote values (PHI)."""
    return f"{describe_error(error)} (message withheld: it may quote patient data)"


class SupervisedLoop:
    """Runs ``body`` every ``interval`` seconds in a daemon thread until stopped; survives any Exception."""

    def __init__(
        self,
        name: str,
        body: Callable[[], object],
        interval: float,
        on_death: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"loop interval {interval} s must be positive")
        self.name = name
        self.body = body
        self.interval = interval
        self.on_death = on_death
        self.failed_passes = 0
        self.death: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._one_pass()
                self._stop.wait(self.interval)
        except BaseException as error:  # noqa: BLE001 - the supervisor reports every death, then lets it end
            self.death = error
            log.critical("%s thread died (%s): the node stops so that it is restarted", self.name,
                         describe_error(error))  # fmt: skip
            if self.on_death is not None:
                self.on_death(self.name, error)

    def _one_pass(self) -> None:
        try:
            self.body()
        except Exception as error:  # noqa: BLE001 - a loop pass may fail any way; the next pass retries
            self.failed_passes += 1
            log.error("%s pass failed (%s); next pass in %.1f s", self.name, describe_error(error), self.interval)
