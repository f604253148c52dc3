"""Concurrent writers share one audit transaction: a group commit (issue 12).

With 8 associations sending at once, each instance paid a transaction of its own:
``BEGIN``, two statements, and a commit that flushes the SQLite WAL (or a PostgreSQL
round trip and WAL flush), one after the other under the database's single writer.
Here the first caller to arrive becomes the **leader**: it takes every item queued
so far, writes them in one transaction, commits once, and wakes each waiting caller
with its own outcome. Items that arrive while a commit is in flight queue up for the
next leader, so nobody waits for a timer: with one association a caller simply
commits its own item, with eight a commit carries several.

The contract each caller relies on: ``commit(item)`` returns only after a commit that
contains ``item`` succeeded, and raises when it did not, so an instance is never
acknowledged before its row is durable. A group that fails with an ``IntegrityError``
(one item broke a unique constraint, e.g. a SOP instance another node process
accepted) is retried item by item, so only the offending caller sees the error; any
other failure (database unreachable, disk full) fails every caller of the group.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from node.audit.db import AuditDB

Item = TypeVar("Item")
BatchWriter = Callable[[Connection, list[Item]], None]
MAX_GROUP = 64  # bounds one transaction's size (and a leader's extra work) when many callers queue


class GroupCommitInterruptedError(RuntimeError):
    """The leader stopped (an exception that is not an ``Exception``) before this item's outcome was known."""


@dataclass(eq=False)
class _Waiter(Generic[Item]):
    item: Item
    wake: threading.Event = field(default_factory=threading.Event)
    lead: bool = False  # woken to lead the next group rather than with an outcome
    settled: bool = False
    error: BaseException | None = None


class GroupCommit(Generic[Item]):
    """Commit items of concurrent callers together; each caller learns its own item's outcome.

    Parameters
    ----------
    audit:
        The audit database; each group runs in one ``AuditDB.transaction``.
    write_batch:
        Writes a list of items on a connection inside the open transaction (e.g. one
        multi-row insert); called with a single item when a group is retried item by item.
    max_group:
        The most items one transaction carries.
    """

    def __init__(self, audit: AuditDB, write_batch: BatchWriter[Item], max_group: int = MAX_GROUP) -> None:
        if max_group < 1:
            raise ValueError(f"max_group must be at least 1, got {max_group}")
        self.audit = audit
        self.write_batch = write_batch
        self.max_group = max_group
        self._lock = threading.Lock()
        self._queue: list[_Waiter[Item]] = []
        self._leading = False  # a leader is committing, or has been chosen and woken

    def queued(self) -> int:
        """Callers waiting for a leader to take their item (a gauge for tests and metrics)."""
        with self._lock:
            return len(self._queue)

    def commit(self, item: Item) -> None:
        """Return once ``item`` is committed; raise the error that kept it from being committed."""
        waiter = _Waiter(item)
        with self._lock:
            self._queue.append(waiter)
            if not self._leading:
                self._leading = waiter.lead = True
        if not waiter.lead:
            waiter.wake.wait()
        if waiter.lead:
            self._lead()
        if waiter.error is not None:
            raise waiter.error

    def _lead(self) -> None:
        with self._lock:
            group, self._queue = self._queue[: self.max_group], self._queue[self.max_group :]
        try:
            self._write(group)
        finally:
            with self._lock:
                successor = self._queue[0] if self._queue else None
                if successor is None:
                    self._leading = False
                else:
                    successor.lead = True  # the queue goes on: hand leadership over, never leave it idle
            for waiter in group:
                if not waiter.settled:
                    waiter.error = GroupCommitInterruptedError("the audit commit was interrupted; nothing acknowledged")
                waiter.settled, waiter.lead = True, False
                waiter.wake.set()
            if successor is not None:
                successor.wake.set()

    def _write(self, group: list[_Waiter[Item]]) -> None:
        try:
            with self.audit.transaction() as connection:
                self.write_batch(connection, [waiter.item for waiter in group])
        except IntegrityError as error:
            if len(group) == 1:
                _settle(group, error)
            else:  # which item broke a constraint is unknown: each commits (or fails) on its own
                for waiter in group:
                    self._write([waiter])
            return
        except Exception as error:  # noqa: BLE001 - handed to every caller of the group, who decides
            _settle(group, error)
            return
        _settle(group, None)


def _settle(group: list[_Waiter[Item]], error: BaseException | None) -> None:
    for waiter in group:
        waiter.error, waiter.settled = error, True
